#!/usr/bin/env python
"""Export a model pair's guided denoiser steps to ONNX and build TensorRT engines from them, ahead of a run.

    python build_engines.py --base BASE (--finetuned FT | --lora LORA) [--method finextract cfg]
        [--batch-sizes 8 16] [--precision fp16|fp32] [--out CACHE]

Writes `CACHE/onnx/denoiser-<precision>-<key>/model.onnx` (+ meta.json) and, where TensorRT is
importable, `CACHE/engines/denoiser-<key>-<precision>.plan` (+ .json metadata) and the shared
`CACHE/engines/timing.cache`: the folders `--backend tensorrt` reads (CACHE defaults to the run cache,
`$FINEXTRACT_CACHE` or ~/.cache/finextract). Rules whose terms use the same models share one graph (the
coefficients and the captions are inputs). Valid cached exports and engines are reused; stale ones are
rebuilt. Without TensorRT it still exports the ONNX, says what is missing, and exits with status 2 (0 with
--onnx-only). `CACHE/engines/manifest.json` lists everything produced.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from finextract.rules import METHODS  # plain data: loads no torch


def build_parser() -> argparse.ArgumentParser:
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
        help="guidance rule(s) to build a graph for (coefficients and captions stay runtime inputs)",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16], help="one TensorRT profile each")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--device", default="auto", help="device to trace the export on: auto, cpu, cuda")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (.ckpt/.bin)")
    parser.add_argument(
        "--base-config", default=None, help="for a single-file --base: a local pipeline folder with its configs"
    )
    parser.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "sample"),
        default=None,
        help="override the models' scheduler prediction type (when base and fine-tune disagree)",
    )
    parser.add_argument("--onnx-only", action="store_true", help="export ONNX only; do not build engines")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the run cache to fill (default $FINEXTRACT_CACHE or ~/.cache/finextract)",
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f"--batch-sizes {args.batch_sizes}: batch sizes must be >= 1")
    if args.opset < 17:
        parser.error(f"--opset {args.opset}: needs 17 or newer")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    from tqdm import tqdm

    from finextract.commands.options import model_pair_from
    from finextract.engine.conditioning import encode_conditioning
    from finextract.engine.config import RunConfig, resolve_device
    from finextract.engine.denoiser import GuidedDenoiser
    from finextract.engine.export import ExportSpec, export_cached
    from finextract.engine.tensorrt import BuildConfig, build_unet_engine, require_tensorrt
    from finextract.rules import rule_for

    try:
        device = resolve_device(args.device)
        # the export traces on `device` in `precision`; fp16 tracing needs CUDA
        config = RunConfig.resolve(device=device, dtype=args.precision, backend="torch", cache_dir=args.out)
        config.apply_threads()
        build = BuildConfig(args.precision, tuple(sorted(set(args.batch_sizes))))
        trt_missing = None
        if not args.onnx_only:
            try:
                require_tensorrt()
                if not torch.cuda.is_available():
                    raise RuntimeError("TensorRT engines are built on the GPU they run on; no CUDA GPU is visible here")
            except RuntimeError as error:
                trt_missing = str(error)
        pair = model_pair_from(args, dtype=args.precision, device=device).place(config)
        cache = Path(config.cache_dir)
        manifest = {
            "pair": {"kind": pair.kind, "base": args.base, "finetuned": args.finetuned or args.lora},
            "precision": args.precision,
            "batch_sizes": list(build.batch_sizes),
            "graphs": [],
        }
        graphs: dict[str, dict] = {}
        for method in tqdm(args.method, desc="export", unit="rule"):
            rule = rule_for(method, pair.kind)
            denoiser = GuidedDenoiser(pair, rule)
            spec = ExportSpec.of(
                denoiser,
                encode_conditioning(pair, rule, ""),
                dtype=args.precision,
                opset=args.opset,
                batch_sizes=build.batch_sizes,
            )  # shapes only: the captions are inputs
            exported = export_cached(denoiser, spec, cache)
            entry = graphs.setdefault(
                exported.meta["key"],
                {
                    "methods": [],
                    "models": denoiser.structure["terms"],
                    "onnx": str(exported.path),
                    "onnx_reused": exported.meta["reused"],
                },
            )
            entry["methods"].append(method)
            if not args.onnx_only and trt_missing is None and "engine" not in entry:
                artifact = build_unet_engine(exported, build, cache / "engines")
                entry.update(engine=str(artifact.path), engine_reused=artifact.reused)
        manifest["graphs"] = list(graphs.values())
        manifest["tensorrt"] = "skipped (--onnx-only)" if args.onnx_only else (trt_missing or "built")
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as error:
        print(f"build_engines.py: error: {error}", file=sys.stderr)
        return 1
    (cache / "engines").mkdir(parents=True, exist_ok=True)
    manifest_path = cache / "engines" / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2))
    for entry in manifest["graphs"]:
        print(
            f"{'+'.join(entry['models']):<20} {','.join(entry['methods']):<32} onnx: {entry['onnx']}"
            + (f"  engine: {entry['engine']}" if "engine" in entry else "")
        )
    print(f"manifest: {manifest_path}")
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
