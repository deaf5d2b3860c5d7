"""`finextract generate`: N = 50 x N0 guided samples into a resumable chunked folder.

    finextract generate --base BASE (--finetuned FT | --lora LORA) --caption TEXT --n0 K --out DIR

Rerunning the same command after an interruption continues from the last finished chunk.
"""
from __future__ import annotations

import argparse

from finextract.rules import METHODS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate N guided samples (FineXtract Eq. 13 by default), resumable",
        description="Generate N images guided from the pretrained towards the fine-tuned model, written in "
        "chunks with a manifest; rerun the same command to resume after an interruption.",
    )
    parser.add_argument("--base", required=True, help="pretrained model: diffusers folder or single-file checkpoint")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--finetuned", help="full fine-tune (DreamBooth): pipeline folder, unet/ folder or file")
    model.add_argument("--lora", help="LoRA checkpoint (diffusers, PEFT or kohya format)")
    parser.add_argument("--caption", required=True, help="the training caption c")
    parser.add_argument("--n0", type=int, required=True, help="N0, the number of training images")
    parser.add_argument("--num-images", type=int, default=None, help="N images to generate (default 50 x N0)")
    parser.add_argument("--method", choices=METHODS, default="finextract",
                        help="guidance rule: finextract (Eq. 13), finextract-uncond (Eq. 6), cfg, direct")
    parser.add_argument("--w", type=float, default=None,
                        help="guidance scale (default: DreamBooth 3, LoRA 5 for finextract; 3 for cfg/uncond)")
    parser.add_argument("--k", type=float, default=None, help="Eq. 13 correction k (default: DreamBooth -0.02, LoRA 0)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps, eta = 0 (default 50)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="image i starts from seed + i (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="UNet precision; fp16/bf16 need CUDA (default fp32)")
    parser.add_argument("--backend", default="auto",
                        help="auto (default: onnxruntime on a CPU, torch on CUDA), torch, onnxruntime or tensorrt")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA with the torch backend, replay each DDIM step as a CUDA graph (default on)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickle checkpoints (.ckpt/.bin): only for files you trust")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--out", required=True, help="output folder (chunks + manifest.json); reuse it to resume")
    parser.set_defaults(func=run)


def run(args) -> int:
    from finextract.engine.loading import load_model_pair
    from finextract.generate import generate
    from finextract.runtime import resolve_device, set_threads
    from finextract.sampling import resolve_dtype

    if args.n0 < 1:
        raise ValueError(f"--n0 {args.n0}: must be >= 1")
    num_images = args.num_images if args.num_images is not None else 50 * args.n0
    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)  # refuse fp16 on a CPU before loading anything
    set_threads()
    pair = load_model_pair(args.base, args.finetuned, lora=args.lora, allow_pickle=args.allow_pickle, device=device)
    result = generate(
        pair, args.caption, num_images, method=args.method, w=args.w, k=args.k, steps=args.steps,
        batch_size=args.batch_size, seed=args.seed, device=device, dtype=args.dtype, backend=args.backend,
        out=args.out, progress=not args.no_progress, cuda_graphs=args.cuda_graphs,
    )
    seconds = sum(chunk.get("seconds", 0.0) for chunk in result.manifest["chunks"])
    print(f"{len(result.seeds)} images ({result.manifest['config']['method']}, {pair.kind}) in {args.out}; "
          f"{seconds:.1f} s of sampling recorded in {args.out}/manifest.json")
    return 0
