"""`finextract evaluate`: AS and A-ESR (paper Eq. 1, 2) of extracted images against the training set."""

from __future__ import annotations

from .options import read_image_folder


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="AS / A-ESR of extracted images against training images",
        description="Score extracted images against the real training images (FineXtract Eq. 1, 2).",
    )
    p.add_argument("--extracted", required=True, help="folder of extracted images")
    p.add_argument("--train", required=True, help="folder of the real training images")
    p.add_argument("--json", default=None, help="write the metrics (with per-image best matches) to this file")
    p.add_argument("--sscd", default="default", help="SSCD model: 'default' or a TorchScript/ONNX file")
    p.add_argument("--preset", choices=("sscd", "paper"), default=None, help="SSCD preprocessing (default sscd)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from finextract.engine.config import set_threads
    from finextract.extract import embed_images, evaluate_against
    from finextract.sscd import load_embedder

    images, paths = read_image_folder("--extracted", args.extracted)
    train = read_image_folder("--train", args.train)  # both read before the embedder loads
    set_threads()
    embedder = load_embedder(args.sscd, preset=args.preset)
    metrics, _ = evaluate_against(train, embed_images(embedder, images), embedder)
    for match in metrics["best_match"]:
        match["extracted_file"] = paths[match["extracted"]].name
    metrics["sscd"] = embedder.info
    print(f"AS {metrics['AS']:.4f}  A-ESR0.6 {metrics['A-ESR0.6']:.4f}  A-ESR0.7 {metrics['A-ESR0.7']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0
