"""`finextract bench`: per-step latency, images/s, peak memory and (GPU) MFU of the sampler's DDIM step.

    finextract bench --zoo --backend torch onnxruntime --batch-size 8 32
    finextract bench --sd1-random --device cuda --dtype fp16 --batch-size 8 16 32 --json bench.json
    finextract bench --base BASE --lora LORA --method finextract cfg

Every configuration times the step `finextract generate` runs (`finextract.benchmarking`), so the
figures are the product's own, not a separate benchmark loop's.
"""

from __future__ import annotations

import argparse

from finextract.rules import METHODS

from .options import add_command, add_prediction_type_option, model_pair_from, positive_int


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "bench",
        run,
        help="measure step latency, images/s, peak memory (and MFU on a GPU)",
        description="Time the guided DDIM step per backend, method and batch size; print a table.",
    )
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--base", help="pretrained model (with --finetuned or --lora)")
    models.add_argument("--zoo", action="store_true", help="the tiny random zoo, built in a temporary folder")
    models.add_argument(
        "--sd1-random",
        action="store_true",
        help="randomly initialised SD 1.x-size UNets built from config (no download)",
    )
    p.add_argument(
        "--base-config",
        default=None,
        metavar="DIR",
        help="for a single-file --base: a local diffusers pipeline folder supplying its configs",
    )
    finetune = p.add_mutually_exclusive_group()
    finetune.add_argument("--finetuned", help="DreamBooth checkpoint (with --base)")
    finetune.add_argument("--lora", help="LoRA weights (with --base)")
    p.add_argument(
        "--kind",
        choices=("dreambooth", "lora"),
        default="dreambooth",
        help="pair kind for --zoo / --sd1-random (default dreambooth)",
    )
    p.add_argument(
        "--backend", nargs="+", default=["auto"], help="one or several of auto (default), torch, onnxruntime, tensorrt"
    )
    p.add_argument(
        "--method", nargs="+", choices=METHODS, default=["finextract"], help="guidance rules (default finextract)"
    )
    p.add_argument(
        "--batch-size", nargs="+", type=positive_int, default=[16], help="one or several batch sizes (default 16)"
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=10,
        help="timed DDIM steps per configuration, after 2 warm-up (default 10)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default=None,
        help="UNet precision (default fp16 on CUDA, fp32 on a CPU)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, replay each step as a CUDA graph when the backend allows it (default on)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the GPU's dense fp16/bf16 TFLOP/s for MFU (default $FINEXTRACT_PEAK_TFLOPS or 790, an H200)",
    )
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled checkpoints (only ones you trust)")
    add_prediction_type_option(p)
    p.add_argument("--json", default=None, help="also write the rows and the machine to this JSON file")


def _check(args) -> None:
    if args.base and not (args.finetuned or args.lora):
        raise ValueError("--base needs --finetuned or --lora (or use --zoo / --sd1-random)")
    if args.base_config and not args.base:
        raise ValueError("--base-config goes with a single-file --base")
    if not args.base and (args.finetuned or args.lora):
        raise ValueError("--finetuned / --lora go with --base")


def run(args) -> int:
    import logging
    import platform
    import tempfile
    from pathlib import Path

    import torch

    from finextract.benchmarking import DEFAULT_PEAK_TFLOPS, format_table, measure_sampling, sd1_random_pair
    from finextract.engine.config import RunConfig, resolve_device
    from finextract.store.files import write_json

    _check(args)
    device = resolve_device(args.device)
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    configs = [  # every setting validated before anything loads
        RunConfig.resolve(device=device, dtype=dtype, backend=backend, batch_size=batch, cuda_graphs=args.cuda_graphs)
        for backend in args.backend
        for batch in args.batch_size
    ]
    first = configs[0]
    threads = first.apply_threads()
    log = logging.getLogger("finextract")
    rows = []
    with tempfile.TemporaryDirectory(prefix="finextract-bench-") as scratch:
        if args.sd1_random:
            pair = sd1_random_pair(
                args.kind, device=device, dtype=first.torch_dtype, tokenizer_folder=Path(scratch) / "tokenizer"
            )
        else:
            from finextract.engine.loading import load_model_pair

            if args.zoo:
                from finextract.zoo.build import build_zoo

                zoo = build_zoo(Path(scratch) / "zoo")
                base, finetuned, lora = zoo / "base", None, None
                if args.kind == "dreambooth":
                    finetuned = zoo / "dreambooth"
                else:
                    lora = zoo / "lora" / "pytorch_lora_weights.safetensors"
                pair = load_model_pair(base, finetuned, lora=lora)
            else:
                pair = model_pair_from(args)
        pair.place(first)  # one pair for every backend: backends never change it
        for config in configs:
            for method in args.method:
                log.info(
                    "bench %s %s %s batch %d on %s (%s)",
                    config.backend,
                    method,
                    pair.kind,
                    config.batch_size,
                    device,
                    dtype,
                )
                rows.append(
                    measure_sampling(
                        pair,
                        config,
                        method=method,
                        steps=args.steps,
                        peak_tflops=args.peak_tflops or DEFAULT_PEAK_TFLOPS,
                    )
                )
    print(format_table(rows))
    if args.json:
        machine = {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": threads,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        }
        models = (
            "sd1-random"
            if args.sd1_random
            else "zoo"
            if args.zoo
            else {"base": args.base, "finetuned": args.finetuned, "lora": args.lora}
        )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, {"machine": machine, "models": models, "steps_timed": args.steps, "rows": rows})
        log.info("wrote %s", args.json)
    return 0
