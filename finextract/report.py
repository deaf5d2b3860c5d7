"""HTML reports: the one HTML writer of finextract.

`write_report` writes an extraction's (or a clustering's) `report.html`. The helpers below build every
other page the same way (the demo's and the sweep's index pages, an audit's index), so all pages share
one stylesheet, one way to show images and one way to embed plots. They are a stable API:

- `page(title, body, style=...)` -> a whole HTML document; `write_page(path, title, body)` writes one.
- `esc(value)` -> HTML-escaped text of any value.
- `image(source, out=..., side=...)` -> an `<img>` at a readable size: an image smaller than `side`
  CSS pixels is scaled up by a whole factor with nearest-neighbour sampling (a tiny model's 32 px
  images stay sharp), a larger one is shown `side` wide; arrays are embedded, files linked.
- `figure(content, caption)`, `table(header, rows)`, `settings_table(mapping)` -> HTML fragments.
- `plot_data_uri(fig)`, `save_plot(fig, path)` -> a matplotlib `Figure` as an embedded or written PNG;
  `new_figure(width, height)` makes one without pyplot (no global state, any thread).
- `histogram_plot(histogram, threshold, start_threshold)` -> the similarity histogram figure.
- `similarity_text(s)` -> a similarity, bold green above 0.7, green above 0.6 (the A-ESR thresholds).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from finextract.metrics import ESR_THRESHOLDS, format_score

#: CSS pixels an image is shown at, at least (smaller images are scaled up by a whole factor).
READABLE_SIDE = 128
#: embedded images larger than this (pixels, longer side) are downscaled first, so a report of an
#: SD-scale run stays a few MB.
EMBED_MAX_SIDE = 256
#: clique members shown beside each extracted image.
CLIQUE_SAMPLES = 6

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px 32px;color:#222;max-width:1400px}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
h3{font-size:1.05em} code{background:#f3f3f3;padding:0 3px;word-break:break-all}
table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #ccc;padding:5px 8px;vertical-align:top}
th{background:#f3f3f3;text-align:left} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.image{text-align:center;font-size:.85em}
table.settings td:first-child{white-space:nowrap;color:#555}
figure{display:inline-block;margin:3px;text-align:center;font-size:.8em;vertical-align:top}
figure img{display:block;margin:auto} figcaption{max-width:200px;margin:auto}
img.pixelated{image-rendering:pixelated;image-rendering:crisp-edges}
.loose{color:#080} .strict{color:#080;font-weight:bold} .muted{color:#777} .note{font-size:.9em;color:#444}
"""


def esc(value) -> str:
    """HTML-escaped `str(value)` (quotes too)."""
    return html.escape(str(value))


def page(title: str, body: str | Iterable[str], *, style: str = "") -> str:
    """A complete HTML5 document with the shared stylesheet plus the page's own CSS `style`; `body` is
    HTML (a string or fragments); `title` (text) is escaped."""
    content = body if isinstance(body, str) else "\n".join(body)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}{style}</style></head>\n<body>\n{content}\n</body></html>\n"
    )


def write_page(path: str | Path, title: str, body: str | Iterable[str], *, style: str = "") -> Path:
    """Write `page(title, body, style=style)` to `path` (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(title, body, style=style), encoding="utf-8")
    return path


def as_array(image) -> np.ndarray:
    """A uint8 (H, W, 3) ndarray of an image given as an ndarray, a (CPU or device) tensor or a PIL image."""
    if hasattr(image, "cpu"):
        image = image.cpu().numpy()
    return np.asarray(image, dtype=np.uint8)


def image_data_uri(image) -> str:
    """A PNG data URI of a uint8 (H, W, 3) image; downscaled (Lanczos) to `EMBED_MAX_SIDE` if larger."""
    pil = Image.fromarray(as_array(image))
    if max(pil.size) > EMBED_MAX_SIDE:
        pil.thumbnail((EMBED_MAX_SIDE, EMBED_MAX_SIDE), Image.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def display_width(width: int, side: int = READABLE_SIDE) -> tuple[int, bool]:
    """(CSS width, nearest-neighbour?) to show an image `width` pixels wide at least `side` wide:
    smaller images get a whole multiple of their width (every pixel an equal square), larger ones `side`."""
    if width >= side:
        return side, False
    return width * math.ceil(side / width), True


def image(source, *, out: str | Path | None = None, side: int = READABLE_SIDE, alt: str = "") -> str:
    """An `<img>` tag at a readable size (see `display_width`).

    Args:
        source: a uint8 (H, W, 3) array / tensor (embedded as a PNG data URI) or an image file (linked
            by a path relative to `out` when it lies under it, else by a file:// URI).
        out: the folder the page is written to (for relative links).
        side: the smallest displayed width in CSS pixels.
        alt: the alternative text.
    """
    if isinstance(source, (str, Path)):
        path = Path(source).resolve()
        with Image.open(path) as opened:
            width = opened.width
        base = Path(out).resolve() if out is not None else None
        src = path.relative_to(base).as_posix() if base is not None and path.is_relative_to(base) else path.as_uri()
    else:
        array = as_array(source)
        width, src = array.shape[1], image_data_uri(array)
    shown, pixelated = display_width(width, side)
    css = ' class="pixelated"' if pixelated else ""
    return f'<img src="{esc(src)}" width="{shown}" alt="{esc(alt)}"{css}>'


def figure(content: str, caption: str = "") -> str:
    """A `<figure>` holding `content` (HTML, e.g. `image(...)`) above an HTML caption."""
    return f"<figure>{content}<figcaption>{caption}</figcaption></figure>"


def table(header: Sequence[str], rows: Iterable[Sequence], *, numeric: Sequence[int] = (), css: str = "") -> str:
    """An HTML table. `header`: column titles (text, escaped); `rows`: cells as HTML (not escaped, so
    they may hold images); `numeric`: column indices aligned right; `css`: the table's class."""
    numeric = set(numeric)

    def cell(tag: str, j: int, value) -> str:
        return f'<{tag} class="num">{value}</{tag}>' if j in numeric else f"<{tag}>{value}</{tag}>"

    head = "".join(cell("th", j, esc(title)) for j, title in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", j, value) for j, value in enumerate(row)) + "</tr>" for row in rows)
    klass = f' class="{esc(css)}"' if css else ""
    return f"<table{klass}><tr>{head}</tr>{body}</table>"


def _setting_text(value) -> str:
    if isinstance(value, list) and len(value) > 8:
        consecutive = all(isinstance(v, int) for v in value) and value == list(range(value[0], value[0] + len(value)))
        shown = f"{value[0]} .. {value[-1]}" if consecutive else f"{value[:4]} ..."
        return f"{esc(shown)} <span class='muted'>({len(value)} values)</span>"
    if isinstance(value, float):
        return esc(f"{value:g}")
    return esc(value)


def settings_table(settings: dict, *, skip: Iterable[str] = ()) -> str:
    """A two-column table of a (nested) settings dict: nested keys joined with dots, long lists shortened,
    None values and the keys in `skip` (dotted names) left out."""
    skip = set(skip)
    rows = []

    def walk(prefix: str, value) -> None:
        if prefix in skip:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif value is not None:
            rows.append((f"<code>{esc(prefix)}</code>", _setting_text(value)))

    walk("", settings)
    return table(("setting", "value"), rows, css="settings")


def similarity_text(similarity: float) -> str:
    """The similarity with 3 digits, marked when it passes an A-ESR threshold (0.6: green, 0.7: bold)."""
    loose, strict = ESR_THRESHOLDS
    css = "strict" if similarity > strict else "loose" if similarity > loose else ""
    text = format_score(similarity)
    return f'<span class="{css}">{text}</span>' if css else text


def new_figure(width: float = 7.0, height: float = 3.2):
    """A matplotlib `Figure` of `width` x `height` inches, made without pyplot (no global state)."""
    from matplotlib.figure import Figure  # heavy: matplotlib (about a second), only when a plot is drawn

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_data_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI (for `<img src=...>`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def save_plot(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def histogram_plot(histogram: dict, threshold: float | None, start_threshold: float | None = None):
    """The histogram of the similarity matrix's off-diagonal values, threshold marked.

    Args:
        histogram: `finextract.metrics.similarity_histogram`'s dict (step, first, counts, pairs).
        threshold: the clustering threshold (a red line; the pairs at or above it are the graph's edges).
        start_threshold: the sweep's first threshold (the 25th percentile), a dashed line.

    Returns:
        A matplotlib `Figure` (log-scaled counts: the few near-duplicate pairs matter most).
    """
    step, first, counts = histogram["step"], histogram["first"], np.asarray(histogram["counts"])
    lefts = (first + np.arange(len(counts))) * step
    fig = new_figure()
    ax = fig.add_subplot()
    ax.bar(lefts, counts, width=step, align="edge", color="#4a78b5", edgecolor="none")
    ax.set_yscale("log")
    ax.set_xlabel("SSCD cosine similarity of a pair of generated images")
    ax.set_ylabel("pairs")
    ax.set_title(f"{histogram['pairs']:,} pairs of generated images", fontsize=10)
    if start_threshold is not None:
        ax.axvline(start_threshold, color="#888", linestyle="--", label=f"sweep start {start_threshold:.2f}")
    if threshold is not None:
        k = round(threshold / step) - first
        edges = int(counts[max(k, 0) :].sum())
        ax.axvline(threshold, color="#c00", label=f"threshold {threshold:.2f} ({edges:,} pairs at or above)")
    if threshold is not None or start_threshold is not None:
        ax.legend(fontsize=8, loc="upper right")
    return fig


LEGEND = (
    "Clique: a set of generated images that are all near-duplicates of each other (every pair's SSCD "
    "similarity at or above the threshold); its size says how often the model regenerated that image "
    "(larger = more likely a training image). AS: mean over training images of the best match's SSCD "
    "similarity (paper Eq. 1). A-ESR0.6 / A-ESR0.7: share of training images whose best match exceeds "
    "0.6 / 0.7 (paper Eq. 2); such matches are shown in green / bold green. The row \u201call N generated\u201d "
    "scores the best image among every generated one: what a perfect pick could reach."
)


def _title(result: dict) -> str:
    config = result.get("config") or {}
    sources = {**(config.get("models") or {}), **(config.get("inputs") or {})}
    method, caption = result.get("method", "cluster"), config.get("caption")
    title = "finextract: " + ", ".join(str(part) for part in (sources.get("kind"), method) if part)
    if caption:
        title += f" \u2014 \u201c{caption}\u201d"
    return title


def _clique_of(cliques: list[list[int]]) -> dict[int, int]:
    return {index: rank for rank, clique in enumerate(cliques) for index in clique}


def _transform_text(metrics: dict, size: list[int]) -> str:
    transform = metrics.get("train_transform") or {}
    original = f"{size[1]}\u00d7{size[0]}"
    if transform.get("name") == "center_crop_resize":
        side = transform["resolution"]
        return original if size == [side, side] else f"{original} \u2192 crop, {side}\u00d7{side}"
    return f"{original}, as is"


def metadata_html(result: dict) -> str:
    """HTML for how the training metadata was obtained: the caption (given, none, read from the trainer
    metadata with its key, or recovered from the weights with its score and runner-ups), N0 (given,
    read from the trainer metadata, or estimated with its interval) and the base (chosen among the
    candidates of a folder, with the ranking); "" when all were simply given."""
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
    elif caption.get("source") == "metadata":
        parts.append(
            f"<h2>Caption from the trainer metadata</h2><p>\u201c{html.escape(caption['caption'])}\u201d, read from "
            f"<code>{html.escape(caption['key'])}</code> of {html.escape(caption.get('file', ''))}</p>"
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
    elif n0.get("source") == "metadata":
        parts.append(
            f"<h2>N0 from the trainer metadata</h2><p>N0 = {n0['n0']}, read from <code>{html.escape(n0['key'])}</code> "
            f"of {html.escape(n0.get('file', ''))}</p>"
        )
    if result.get("base_choice"):
        parts.append(base_choice_html(result["base_choice"]))
    return "".join(parts)


def base_choice_html(choice: dict) -> str:
    """HTML for result.json's "base_choice": the base chosen among a folder's candidates, why, and the ranking."""
    rows = []
    for i, candidate in enumerate(choice["ranking"], 1):
        distance = "-" if candidate["distance"] is None else f"{candidate['distance']:.4f}"
        cells = [str(i), f"<code>{html.escape(str(candidate['path']))}</code>"]
        cells += ["yes" if candidate["compatible"] else "no", html.escape(str(candidate["match"] or "-"))]
        cells += [distance, html.escape(" ".join(candidate["notes"]))]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    rows = "".join(rows)
    return (
        f"<h2>Base chosen among the candidates</h2><p><code>{html.escape(str(choice['chosen']))}</code>, of the "
        f"candidates in <code>{html.escape(str(choice['folder']))}</code>: {html.escape(choice['why'])}</p>"
        '<table border="1"><tr><th>#</th><th>candidate</th><th>compatible</th><th>named by (metadata key)</th>'
        f"<th>weight distance</th><th>notes</th></tr>{rows}</table>"
    )


def write_report(
    out: str | Path,
    result: dict,
    extracted_paths: list[Path],
    train: tuple | None = None,
    *,
    generated=None,
) -> Path:
    """Write `out/report.html` for an extraction or clustering result.

    Sections: the scores (against the extracted images, and against every generated image), each
    training image beside its best match among the extracted images and among all generated images,
    the extracted images with their clique sizes and members, the similarity histogram with the
    threshold, and the settings.

    Args:
        out: output folder (holds `extracted/`); images there are linked by relative path.
        result: the `result.json` dict (threshold, cliques, metrics, similarity_histogram, clustering,
            num_degenerate, method, n0, num_images and config are read; all optional but cliques).
        extracted_paths: PNG of each extracted image, in clique order.
        train: optional (training images as compared: uint8 (H, W, 3) arrays, their paths); embedded.
        generated: optional, every generated image (uint8 (N, H, W, 3) array or tensor, or a list),
            indexed by image number: the best matches among them and clique members are embedded.

    Returns:
        The path of report.html.
    """
    out = Path(out)
    metrics = result.get("metrics") or None
    cliques = result["cliques"]
    clique_of = _clique_of(cliques)
    extracted = result.get("extracted") or []
    body = [f"<h1>{esc(_title(result))}</h1>"]

    if metrics:
        rows = [("extracted N0 images", metrics)]
        if "generated" in metrics:
            rows.append(("all N generated images (a perfect pick)", metrics["generated"]))
        body.append("<h2>Scores against the training images</h2>")
        body.append(
            table(
                ("compared with", "AS", "A-ESR0.6", "A-ESR0.7"),
                [(esc(name), *(format_score(m[key]) for key in ("AS", "A-ESR0.6", "A-ESR0.7"))) for name, m in rows],
                numeric=(1, 2, 3),
            )
        )
        transform = metrics.get("train_transform") or {}
        if transform.get("name") == "center_crop_resize":
            side = transform["resolution"]
            body.append(
                f"<p class='note'>Training images are compared as the fine-tune saw them: the largest centred "
                f"square, resized to {side}\u00d7{side} (bicubic), the model's resolution.</p>"
            )
        elif transform:
            body.append("<p class='note'>Training images are compared as they are (no crop or resize).</p>")

    if metrics and train is not None:
        images, paths = train
        by_train = {m["train"]: m for m in metrics.get("generated", {}).get("best_match", [])}
        body.append("<h2>Each training image and its best matches</h2>")
        rows = []
        for match in metrics["best_match"]:
            i, j = match["train"], match["extracted"]
            size = match.get("train_size") or list(images[i].shape[:2])
            cells = [
                figure(image(images[i], alt=paths[i].name), f"{esc(paths[i].name)}<br>{_transform_text(metrics, size)}")
            ]
            index = extracted[j] if j < len(extracted) else None
            caption = f"#{j}, clique of {len(cliques[j])}" + (f", image {index}" if index is not None else "")
            cells.append(
                figure(
                    image(extracted_paths[j], out=out),
                    f"{caption}<br>similarity {similarity_text(match['similarity'])}",
                )
            )
            best = by_train.get(i)
            if best is not None and generated is not None:
                g = best["generated"]
                rank = clique_of.get(g)
                where = f"in clique #{rank} ({len(cliques[rank])})" if rank is not None else "in no extracted clique"
                cells.append(
                    figure(
                        image(generated[g], alt=f"generated {g}"),
                        f"image {g}, {where}<br>similarity {similarity_text(best['similarity'])}",
                    )
                )
            elif best is not None:
                cells.append(f"image {best['generated']}<br>similarity {similarity_text(best['similarity'])}")
            rows.append(cells)
        header = ["training image (as compared)", "best extracted match"]
        if by_train:
            header.append("best match among all N generated")
        body.append(table(header, rows))

    best_for_extracted = {m["extracted"]: m for m in (metrics or {}).get("extracted_best_match", [])}
    body.append("<h2>Extracted images</h2>")
    rows = []
    for j, (path, clique) in enumerate(zip(extracted_paths, cliques)):
        members = ""
        if generated is not None:
            others = [index for index in clique if j >= len(extracted) or index != extracted[j]][:CLIQUE_SAMPLES]
            members = "".join(figure(image(generated[index], side=64), str(index)) for index in others)
            if len(clique) - 1 > len(others):
                members += f"<span class='muted'> and {len(clique) - 1 - len(others)} more</span>"
        row = [str(j), figure(image(path, out=out), esc(path.name)), str(len(clique)), members]
        if metrics and train is not None and j in best_for_extracted:
            match = best_for_extracted[j]
            i = match["train"]
            row.append(
                figure(
                    image(train[0][i], alt=train[1][i].name),
                    f"{esc(train[1][i].name)}<br>{similarity_text(match['similarity'])}",
                )
            )
        rows.append(row)
    header = ["#", "extracted (clique representative)", "clique size", "other clique members"]
    if metrics and train is not None:
        header.append("closest training image")
    body.append(table(header, rows, numeric=(2,)))

    body.append("<h2>Clustering</h2>")
    clustering = result.get("clustering") or {}
    modes = ((result.get("config") or {}).get("clustering") or {}).get("selection") == "modes"
    lines = [
        f"threshold {result.get('threshold')}: the first at which peeling maximum cliques off the graph "
        f"(pairs with similarity \u2265 threshold) gave N0 = {result.get('n0')} cliques",
        f"clique sizes: {[len(c) for c in cliques]}",
    ]
    if modes:  # no sweep (`finextract.clustering.selection.modes`)
        lines[0] = (
            f"selection modes: the N0 = {result.get('n0')} images with the most similar neighbours, none at "
            f'similarity \u2265 {result.get("threshold")} to another; each "clique" is a pick and its near-copies'
        )
    elif clustering.get("num_cliques"):
        lines.append(f"{clustering['num_cliques']} cliques peeled at the threshold; the N0 largest are extracted")
    if result.get("num_degenerate"):
        lines.append(
            f"<b>{result['num_degenerate']} degenerate (non-finite or constant) generated image(s) were excluded "
            "from clustering</b>"
        )
    if result.get("skipped"):
        lines.append(
            f"{len(result['skipped'])} threshold(s) skipped (search budget exhausted; expected: a graph too dense "
            "to peel within the fixed work budget is skipped, as the paper skips a threshold after 30 s): "
            + ", ".join(str(s["threshold"]) for s in result["skipped"])
        )
    body.append("<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>")
    body.append(metadata_html(result))
    if result.get("similarity_histogram"):
        fig = histogram_plot(result["similarity_histogram"], result.get("threshold"), clustering.get("start_threshold"))
        body.append(f'<img src="{plot_data_uri(fig)}" alt="similarity histogram">')

    config = result.get("config") or {}
    settings = {key: config.get(key) for key in ("models", "inputs", "caption", "method", "w", "k")}
    settings.update(
        {
            "method": result.get("method"),
            "preset": config.get("preset"),  # the procedure preset: {"name", "overrides"} (finextract.spec)
            "n0": result.get("n0"),
            "num_images": result.get("num_images"),
            "seeds": config.get("seeds"),
            "run": config.get("run"),
            "sscd": config.get("sscd"),
            "clustering": config.get("clustering"),
            "train_transform": (metrics or {}).get("train_transform"),
            "versions": config.get("versions"),
        }
    )
    body.append("<h2>Settings</h2>")
    body.append(settings_table(settings, skip=("inputs.files",)))
    work = result.get("work") or {}
    if work:
        per = work["per_image"]
        scheduler = (config.get("run") or {}).get("scheduler", "ddim")  # results before --scheduler: DDIM
        body.append(
            f"<p class='note'>Work: {work['unet_evaluations']:,} UNet evaluations "
            f"({work.get('images', result.get('num_images'))} images "
            f"x {per['steps']} {scheduler} steps x {per['terms']} models; {work['unet_evaluations_computed']:,} computed in "
            f"this run, {work['wall_s']:.1f} s wall, {work['cpu_s']:.1f} s CPU).</p>"
        )
    if result.get("adaptive"):
        body.append(adaptive_html(result["adaptive"]))
    timings = result.get("timings") or {}
    if timings:
        body.append("<p class='note'>Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + "</p>")
    body.append(f"<p class='note'>{LEGEND}</p>")
    return write_page(out / "report.html", _title(result), body)


def adaptive_html(adaptive: dict) -> str:
    """The adaptive-N rounds (`finextract.adaptive.RoundTracker.record`) as a heading, a line and a table."""
    why = "its N0 cliques stable" if adaptive["stable"] else "the cap reached before they were stable"
    rows = [
        (
            i + 1,
            r["images"],
            f"{r['threshold']:.2f}",
            r["clique_sizes"],
            r["extracted"],
            f"{r['overlap']:.2f}",
            "yes" if r["stable"] else "no",
        )
        for i, r in enumerate(adaptive["rounds"])
    ]
    return (
        "<h2>Adaptive N</h2>"
        f"<p>Stopped at {adaptive['stopped_at']} of at most {adaptive['cap']} images, {why} (rounds of "
        f"{adaptive['round_images']} images; stable: each clique shares at least {adaptive['overlap']:.0%} of its "
        f"members with one of the previous round's, {adaptive['stable_rounds']} round(s) in a row).</p>"
        + table(
            ("round", "images", "threshold", "clique sizes", "extracted", "overlap", "stable"),
            rows,
            numeric=(0, 1, 2, 5),
        )
    )
