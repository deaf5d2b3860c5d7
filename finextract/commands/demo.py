"""`finextract demo --out DIR`: extract the fine-tuning photos of the committed trained tiny models.

Runs `Extractor(...).extract` on the trained DreamBooth and LoRA pairs (`finextract zoo path`) with
FineXtract, CFG and Direct (N0 = 5, N = 250, the same seeds for every method), scores each against
the five real fine-tuning photographs (AS, A-ESR0.7, A-ESR0.6), prints a table shaped like the
paper's Table 1 and writes `DIR/report.html` (an index of the six runs: table, the training photos
and each method's extracted images) beside each run's own folder and report.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from .options import positive_int

KINDS = ("dreambooth", "lora")
METHODS = ("finextract", "cfg", "direct")
METHOD_NAMES = {"finextract": "FineXtract", "cfg": "CFG", "direct": "Direct"}
KIND_NAMES = {"dreambooth": "DreamBooth", "lora": "LoRA"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="extract the training photos of the bundled tiny fine-tunes; print a Table-1-style table",
        description="Run FineXtract, CFG and Direct on the committed trained tiny DreamBooth and LoRA models "
        "(N0 = 5, N = 250, the same seeds for every method), score them against the five fine-tuning "
        "photographs (AS, A-ESR) and write report.html. About 5 minutes on 2 CPU cores.",
    )
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per run, report.html)")
    parser.add_argument(
        "--zoo", default=None, help="trained zoo folder (default: the committed one, `finextract zoo path`)"
    )
    parser.add_argument("--n0", type=positive_int, default=5, help="N0, images to extract (default 5)")
    parser.add_argument(
        "--num-images", type=positive_int, default=250, help="N, images generated per run (default 250 = 50 x N0)"
    )
    parser.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i under every method")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: dreambooth,lora")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: finextract,cfg,direct")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images per UNet batch (default 50)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--backend",
        default="auto",
        help="auto (default: onnxruntime on a CPU, its export cached under FINEXTRACT_CACHE or "
        "~/.cache/finextract; torch on CUDA), torch, onnxruntime or tensorrt",
    )
    parser.set_defaults(func=run)


def run_demo(
    out: str | Path,
    zoo: str | Path | None = None,
    *,
    n0: int = 5,
    num_images: int = 250,
    steps: int = 50,
    seed: int = 0,
    kinds=KINDS,
    methods=METHODS,
    batch_size: int = 50,
    device: str = "auto",
    backend: str = "auto",
    progress: bool = True,
) -> dict:
    """Run every (kind, method) extraction on the trained zoo; write runs, demo.json and report.html.

    Returns:
        {"rows": [{"kind", "method", "AS", "A-ESR0.7", "A-ESR0.6", "best_match", "seconds", "folder"}],
         "config": {...}, "seconds": total}.

    Raises:
        FileNotFoundError: no trained zoo at `zoo`.
        ValueError: an unknown kind or method.
    """
    from finextract.extract import Extractor
    from finextract.trained_zoo import default_zoo_folder

    zoo = Path(zoo) if zoo else default_zoo_folder()
    if not (zoo / "base" / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{zoo}: no trained zoo (base/model_index.json); build one with `finextract zoo build --trained`"
        )
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"--kinds {kind!r}: expected some of {','.join(KINDS)}")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"--methods {method!r}: expected some of {','.join(METHODS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    caption = (zoo / "caption.txt").read_text().strip()
    started = time.perf_counter()
    rows = []
    for kind in kinds:
        finetuned = dict(finetuned=zoo / "dreambooth") if kind == "dreambooth" else dict(lora=zoo / "lora")
        extractor = Extractor(zoo / "base", **finetuned, device=device, backend=backend)
        for method in methods:
            t = time.perf_counter()
            folder = out / f"{kind}-{method}"
            result = extractor.extract(
                caption,
                n0,
                num_images=num_images,
                method=method,
                steps=steps,
                seed=seed,
                batch_size=batch_size,
                out=folder,
                train=zoo / "train",
                progress=progress,
            )
            metrics = result.metrics
            _save_best_matches(result.images, metrics["best_match"], folder / "best_match")
            rows.append(
                {
                    "kind": kind,
                    "method": method,
                    "AS": metrics["AS"],
                    "A-ESR0.7": metrics["A-ESR0.7"],
                    "A-ESR0.6": metrics["A-ESR0.6"],
                    "best_match": metrics["best_match"],
                    "seconds": round(time.perf_counter() - t, 1),
                    "folder": folder.name,
                }
            )
    summary = {
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "config": {
            "zoo": str(zoo),
            "caption": caption,
            "n0": n0,
            "num_images": num_images,
            "steps": steps,
            "seed": seed,
            "batch_size": batch_size,
            "device": device,
            "backend": backend,
        },
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_index(out, summary, zoo)
    return summary


def _save_best_matches(images, best_match: list[dict], folder: Path) -> None:
    """Write the extracted image closest to training photo i as `folder/train<i>.png`."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for match in best_match:
        image = np.asarray(images[match["extracted"]], dtype=np.uint8)
        Image.fromarray(image).save(folder / f"train{match['train']}.png")


def format_table(rows: list[dict]) -> str:
    """The paper's Table 1 layout: one line per method, AS / A-ESR0.7 / A-ESR0.6 per fine-tune kind."""
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    cell = {(r["kind"], r["method"]): r for r in rows}
    width = 28
    lines = [
        " " * 12 + "".join(f"| {KIND_NAMES[k]:<{width}}" for k in kinds),
        f"{'Method':<12}" + "".join(f"| {'AS':<8}{'A-ESR0.7':<10}{'A-ESR0.6':<10}" for _ in kinds),
    ]
    lines.append("-" * len(lines[1]))
    for method in methods:
        line = f"{METHOD_NAMES[method]:<12}"
        for kind in kinds:
            r = cell.get((kind, method))
            line += f"| {r['AS']:<8.3f}{r['A-ESR0.7']:<10.2f}{r['A-ESR0.6']:<10.2f}" if r else f"| {'-':<{width}}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def _write_index(out: Path, summary: dict, zoo: Path) -> None:
    """report.html: the table, the training photos, and each run's extracted images with its own report."""
    import shutil

    train_dir = out / "train"
    train_dir.mkdir(exist_ok=True)
    train = sorted((zoo / "train").glob("*.png"))
    for photo in train:
        shutil.copy(photo, train_dir / photo.name)
    img = 'style="width:96px;height:96px;image-rendering:pixelated;margin:2px"'
    parts = [
        "<!doctype html><meta charset='utf-8'><title>finextract demo</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;text-align:right}</style>",
        "<h1>FineXtract on the tiny trained models</h1>",
        f"<p>Caption <code>{html.escape(summary['config']['caption'])}</code>; N0 = {summary['config']['n0']}, "
        f"N = {summary['config']['num_images']}, {summary['config']['steps']} DDIM steps, "
        f"the same seeds for every method. Total {summary['seconds']:.0f} s.</p>",
        "<table><tr><th>kind</th><th>method</th><th>AS</th><th>A-ESR0.7</th><th>A-ESR0.6</th><th>seconds</th><th></th></tr>",
    ]
    for r in summary["rows"]:
        parts.append(
            f"<tr><td>{KIND_NAMES[r['kind']]}</td><td>{METHOD_NAMES[r['method']]}</td><td>{r['AS']:.3f}</td>"
            f"<td>{r['A-ESR0.7']:.2f}</td><td>{r['A-ESR0.6']:.2f}</td><td>{r['seconds']:.0f}</td>"
            f"<td><a href='{r['folder']}/report.html'>report</a></td></tr>"
        )
    parts.append(
        "</table><p>AS: mean over the training photos of the SSCD similarity to their best extracted "
        "match (paper Eq. 1). A-ESR0.6 / 0.7: share of training photos whose best match exceeds 0.6 / 0.7 "
        "(Eq. 2); matches above 0.6 are marked in bold green below.</p>"
    )
    figure = "<figure style='display:inline-block;margin:4px;text-align:center'><img {img} src='{src}'><figcaption>{caption}</figcaption></figure>"
    parts.append("<h2>Training photographs (X0)</h2><div>")
    parts += [figure.format(img=img, src=f"train/{p.name}", caption=html.escape(p.stem)) for p in train]
    parts.append(
        "</div><h2>Best extracted match per training photo</h2><p>One column per training photo, in the order above.</p>"
    )
    for r in summary["rows"]:
        cells = []
        for match in r["best_match"]:
            similarity = match["similarity"]
            caption = f"{similarity:.2f}" if similarity <= 0.6 else f"<b style='color:#080'>{similarity:.2f}</b>"
            src = f"{r['folder']}/best_match/train{match['train']}.png"
            cells.append(figure.format(img=img, src=src, caption=caption))
        parts.append(f"<h3>{KIND_NAMES[r['kind']]} / {METHOD_NAMES[r['method']]}</h3><div>{''.join(cells)}</div>")
    (out / "report.html").write_text("\n".join(parts) + "\n")


def run(args) -> int:
    import logging

    from finextract.engine.config import set_threads

    set_threads()
    summary = run_demo(
        args.out,
        args.zoo,
        n0=args.n0,
        num_images=args.num_images,
        steps=args.steps,
        seed=args.seed,
        kinds=tuple(args.kinds.split(",")),
        methods=tuple(args.methods.split(",")),
        batch_size=args.batch_size,
        device=args.device,
        backend=args.backend,
    )
    print(format_table(summary["rows"]))
    out = Path(args.out).resolve()
    print(
        f"\n{len(summary['rows'])} extractions in {summary['seconds']:.0f} s. Report: {out / 'report.html'}; "
        f"extracted images: {out}/<kind>-<method>/extracted/; numbers: {out / 'demo.json'}"
    )
    logging.getLogger("finextract").debug("demo config %s", summary["config"])
    return 0
