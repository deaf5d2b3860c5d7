"""`finextract extract`: generate with model guidance, cluster, and write the extracted images."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("extract", help="extract fine-tuning images (generate + SSCD + cliques)",
                              description="FineXtract: generate N = 50 x N0 guided images, cluster them, write N0 extracted images.")
    p.add_argument("--base", required=True, help="pretrained model (diffusers folder or single file)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--finetuned", help="DreamBooth checkpoint (folder or single file)")
    group.add_argument("--lora", help="LoRA weights (diffusers, PEFT or kohya)")
    p.add_argument("--caption", required=True, help="the training caption c")
    p.add_argument("--n0", type=int, required=True, help="N0: number of images to extract")
    p.add_argument("--num-images", type=int, default=None, help="N generated images (default 50 x N0)")
    p.add_argument("--method", default="finextract", choices=("finextract", "finextract-uncond", "cfg", "direct"))
    p.add_argument("--w", type=float, default=None, help="guidance scale (default per model kind)")
    p.add_argument("--k", type=float, default=None, help="correction term k (default per model kind)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--batch-size", type=int, default=None, help="images per UNet batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="image i starts from seed + i")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--backend", default="auto",
                        help="auto (default: onnxruntime on a CPU, torch on CUDA), torch, onnxruntime or tensorrt")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA with the torch backend, replay each DDIM step as a CUDA graph (default on)")
    p.add_argument("--train", default=None, help="folder of the real training images: adds AS / A-ESR")
    p.add_argument("--save-generated", action="store_true", help="also write all N images to OUT/generated/")
    p.add_argument("--sscd", default="default", help="SSCD model: 'default' or a TorchScript/ONNX file")
    p.add_argument("--preset", choices=("sscd", "paper"), default=None, help="SSCD preprocessing (default sscd)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled checkpoints (only ones you trust)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    from finextract.extract import Extractor
    from finextract.runtime import set_threads

    set_threads()
    extractor = Extractor(args.base, args.finetuned, lora=args.lora, device=args.device, dtype=args.dtype,
                          backend=args.backend, embedder=args.sscd, preset=args.preset,
                          allow_pickle=args.allow_pickle, cuda_graphs=args.cuda_graphs)
    result = extractor.extract(args.caption, args.n0, num_images=args.num_images, method=args.method, w=args.w,
                               k=args.k, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                               out=args.out, train=args.train, save_generated=args.save_generated)
    log = logging.getLogger("finextract")
    log.info("threshold %.2f, clique sizes %s -> %s", result.threshold, [len(c) for c in result.cliques], args.out)
    if result.metrics:
        log.info("AS %.4f, A-ESR0.6 %.2f, A-ESR0.7 %.2f", result.metrics["AS"], result.metrics["A-ESR0.6"],
                 result.metrics["A-ESR0.7"])
    return 0
