"""`finextract inspect PATH [--bases DIR] [--json]`: a checkpoint's family, format, adapters and trainer
metadata; with --bases, its candidate parent bases ranked."""

from __future__ import annotations

from .options import add_command


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "inspect",
        run,
        help="report a checkpoint's family, format, adapters and what its trainer recorded (N0, caption, parent)",
        description="Read a fine-tune, adapter file or folder from its headers, configs and metadata, without "
        "loading a model: family and format; adapter types, ranks and alphas; the modules touched; the training "
        "record its trainer wrote (kohya ss_*, modelspec.*, PEFT, diffusers, finextract finetune), each value "
        "with its key; where the metadata contradicts the weights.",
    )
    p.add_argument("path", help="a fine-tune or adapter: file or folder (as --finetuned / --lora take it)")
    p.add_argument(
        "--bases",
        metavar="DIR",
        default=None,
        help="a folder of candidate bases (pipeline folders, .safetensors / .ckpt files): rank them as the "
        "parent, by the trainer's recorded hashes and name, weight distance (full fine-tunes) and compatibility",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    import json

    from finextract.inspection import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.path, bases=args.bases)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0
