"""`report.html`: extracted images beside their best training matches, clique sizes, threshold."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

LEGEND = (
    "Clique size: how many of the N generated images fell in that image's clique of near-duplicates "
    "(SSCD similarity above the threshold; larger = more often regenerated). AS: mean over training images of "
    "the best match's SSCD similarity (paper Eq. 1). A-ESR0.6 / A-ESR0.7: share of training images whose best "
    "match exceeds 0.6 / 0.7 (paper Eq. 2)."
)


def image_tag(out: Path, path: Path | None = None, image=None, *, width: int = 160) -> str:
    """An `<img>` tag for a page written into `out`: a relative link to `path` when it lies below `out`
    (a file URI when it lies elsewhere), or `image` (uint8 (H, W, 3)) embedded as a PNG data URI.

    Raises:
        ValueError: neither `path` nor `image` is given.
    """
    if path is None and image is None:
        raise ValueError("image_tag needs a path or an image")
    if image is not None:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        src = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    else:
        resolved, root = Path(path).resolve(), Path(out).resolve()
        src = html.escape(resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else resolved.as_uri())
    return f'<img src="{src}" width="{width}" style="image-rendering:pixelated">'


def html_page(title: str, body: str, *, style: str = "") -> str:
    """A whole HTML page (UTF-8, the reports' one style sheet plus `style`) around `body`; `title` is escaped."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} td{{padding:6px;vertical-align:top;text-align:center}}{style}</style></head><body>
<h1>{html.escape(title)}</h1>{body}</body></html>
"""


def metadata_html(result: dict) -> str:
    """HTML for how the training metadata was obtained: the caption (given, none, or recovered from the
    weights with its score and runner-ups) and N0 (given, or estimated with its interval); "" when both
    were simply given."""
    parts = []
    caption = result.get("caption") or {}
    if caption.get("source") == "recovered":
        rows = "".join(
            f"<tr><td>{i}</td><td>{html.escape(c['caption'])}</td><td>{c['score']:.3f}</td></tr>"
            for i, c in enumerate(caption.get("candidates", []))
        )
        parts.append(
            f"<h2>Caption recovered from the weights</h2><p>\u201c{html.escape(caption['caption'])}\u201d, score "
            f"{caption['score']:.3f} (a random direction scores {caption.get('baseline', 0.0):.3f}; "
            f"{caption.get('seconds', 0.0):.1f} s, from {len(caption.get('modules', []))} cross-attention "
            f'projections)</p><table border="1"><tr><th>#</th><th>candidate</th><th>score</th></tr>{rows}</table>'
        )
    elif caption.get("source") == "none":
        parts.append("<h2>Caption</h2><p>unknown: generated without a caption (Eq. 6)</p>")
    n0 = result.get("n0_estimate") or {}
    if n0.get("source") == "estimated":
        low, high = n0["interval"]
        parts.append(
            f"<h2>N0 estimated from the generations</h2><p>N0 = {n0['n0']} (interval {low}..{high}, confidence "
            f"{n0['confidence']:.2f}, from {n0.get('num_thresholds', 0)} thresholds; N = {n0.get('num_images')})</p>"
        )
    return "".join(parts)


def write_report(
    out: str | Path, result: dict, extracted_paths: list[Path], train: tuple | None = None, embed_train: bool = True
) -> Path:
    """Write `out/report.html` for an extraction or clustering result.

    Args:
        out: output folder (holds `extracted/`); images there are linked by relative path.
        result: the `result.json` dict (uses threshold, cliques, metrics, num_degenerate, method, n0, and
            config's kind, caption, base, finetuned / lora for the title and the model paths).
        extracted_paths: PNG of each extracted image, in clique order.
        train: optional (training images as uint8 (H, W, 3) arrays, their paths); embedded as data URIs
            when `embed_train` (the report then opens anywhere), else linked.

    Returns:
        The path of report.html.
    """
    out = Path(out)
    metrics = result.get("metrics")
    best_for_extracted = {
        m["extracted"]: (m["train"], m["similarity"]) for m in (metrics or {}).get("extracted_best_match", [])
    }
    rows = []
    for j, (path, clique) in enumerate(zip(extracted_paths, result["cliques"])):
        cell = image_tag(out, path)
        match = ""
        if metrics and train is not None and j in best_for_extracted:
            i, s = best_for_extracted[j]
            tag = image_tag(out, image=train[0][i]) if embed_train else image_tag(out, train[1][i])
            match = f"{tag}<br>{html.escape(train[1][i].name)}: similarity {s:.3f}"
        rows.append(
            f"<tr><td>{j}</td><td>{cell}<br>{html.escape(path.name)}</td><td>{len(clique)}</td><td>{match}</td></tr>"
        )
    config = result.get("config") or {}
    sources = {**(config.get("models") or {}), **(config.get("inputs") or {})}
    kind = sources.get("kind")
    method, caption = result.get("method", "cluster"), config.get("caption")
    title = "finextract: " + ", ".join(str(part) for part in (kind, method) if part)
    if caption:
        title += f" \u2014 \u201c{caption}\u201d"
    models = [
        f"{label}: <code>{html.escape(str(sources[key]))}</code>"
        for key, label in (("base", "base"), ("finetuned", "fine-tune"), ("lora", "LoRA"), ("images", "images"))
        if sources.get(key)
    ]
    summary = models + [
        f"method: {html.escape(str(method))}",
        f"N0 = {result.get('n0')}",
        f"N = {result.get('num_images')}",
        f"threshold = {result.get('threshold')}",
        f"clique sizes: {[len(c) for c in result['cliques']]}",
    ]
    if result.get("num_degenerate"):
        summary.append(
            f"<b>{result['num_degenerate']} degenerate (non-finite or constant) image(s) were excluded "
            "from clustering</b>"
        )
    if result.get("skipped"):
        summary.append(
            f"{len(result['skipped'])} threshold(s) skipped (search budget): "
            + ", ".join(str(s["threshold"]) for s in result["skipped"])
        )
    if metrics:
        summary.append(
            f"AS = {metrics['AS']:.3f}, A-ESR0.6 = {metrics['A-ESR0.6']:.2f}, A-ESR0.7 = {metrics['A-ESR0.7']:.2f}"
        )
    page = html_page(
        title,
        f"""<ul>{"".join(f"<li>{line}</li>" for line in summary)}</ul>{metadata_html(result)}
<table border="1"><tr><th>#</th><th>extracted</th><th>clique size</th><th>best training match</th></tr>
{"".join(rows)}</table>
<p><small>{LEGEND}</small></p>""",
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
