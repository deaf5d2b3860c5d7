"""The audit's summary: one entry per manifest row, written as OUT/summary.json, summary.csv and index.html.

An entry holds the row's status ("done": computed in this run; "skipped": complete from an earlier run
with the same configuration; "failed": with its error; "running": on a worker now (in the files written
while the audit runs); "interrupted": stopped by Ctrl-C, its finished chunks kept; "pending": not
started), the metrics (AS / A-ESR0.6 / A-ESR0.7 when `train` is known),
the threshold and clique sizes, timings, whether this run loaded a base for it, links to its files, and
its inputs' evidence (`inputs`: each checkpoint file's and training image's path, size and sha256, from
its result.json; the row's environment and command are there too).
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import Counter
from pathlib import Path

from finextract.engine.formats import atomic_write
from finextract.metrics import format_score
from finextract.report import LEGEND, image, page
from finextract.store.files import write_json

from .manifest import FIELDS, Row, RowError

SUMMARY_FORMAT = "finextract-audit/1"
STATUSES = ("done", "skipped", "failed", "running", "interrupted", "pending")
#: summary.csv columns (summary.json has every field, timings per stage included).
CSV_COLUMNS = (
    "id", "line", "status", "kind", "method", "caption", "n0", "num_images", "AS", "A-ESR0.6", "A-ESR0.7",
    "threshold", "largest_clique", "clique_sizes", "num_degenerate", "seconds", "base_load_seconds",
    "generate_seconds", "embed_seconds", "cluster_seconds", "base_loaded", "chunks_resumed", "worker",
    "base", "finetuned", "lora", "train", "report", "error",
)  # fmt: skip


def row_entry(row: Row | RowError, status: str) -> dict:
    """The entry of a row before it has a result: its manifest fields and `status`."""
    if isinstance(row, RowError):
        entry = {"id": row.id, "line": row.line, "status": status}
        entry.update({name: None for name in FIELDS if name != "id"})
    else:
        entry = {"id": row.id, "line": row.line, "status": status, **row.fields()}
    entry.update(
        kind=None,
        error=None,
        **{"AS": None, "A-ESR0.6": None, "A-ESR0.7": None},
        threshold=None,
        largest_clique=None,
        clique_sizes=None,
        num_degenerate=None,
        report=None,
        extracted=[],
        timings={},
        inputs=None,
        seconds=None,
        base_loaded=False,
        base_load_seconds=None,
        chunks_resumed=None,
        worker=None,
    )
    return entry


def failed_entry(row: Row | RowError, error: str, run: dict | None = None) -> dict:
    """A "failed" entry with its error (and what the attempt measured, `run`)."""
    entry = row_entry(row, "failed")
    entry.update(run or {}, error=error)
    return entry


def entry_from_result(row: Row, folder: Path, *, status: str, run: dict) -> dict:
    """The entry of a finished row, read from its `result.json` (so a skipped row reads as a computed one).

    Args:
        row: the manifest row. folder: OUT/<id>/. status: "done" or "skipped".
        run: worker, base_loaded, base_load_seconds, chunks_resumed and seconds of the attempt.

    Raises:
        OSError / ValueError: result.json is missing or not JSON.
    """
    record = json.loads((folder / "result.json").read_text())
    config = record.get("config") or {}
    metrics = record.get("metrics") or {}
    sizes = record.get("clique_sizes") or [len(c) for c in record.get("cliques", [])]
    timings = dict(record.get("timings") or {})
    entry = row_entry(row, status)
    entry.update(
        kind=(config.get("models") or {}).get("kind"),
        method=record.get("method", row.method),
        n0=record.get("n0"),
        num_images=record.get("num_images"),
        steps=(config.get("run") or {}).get("steps"),
        seed=(config.get("run") or {}).get("seed"),
        w=config.get("w"),
        k=config.get("k"),
        **{name: metrics.get(name) for name in ("AS", "A-ESR0.6", "A-ESR0.7")},
        threshold=record.get("threshold"),
        largest_clique=max(sizes) if sizes else None,  # "modes" lists its groups in pick order, not by size
        clique_sizes=sizes,
        num_degenerate=record.get("num_degenerate"),
        report=f"{row.id}/report.html",
        extracted=[f"{row.id}/{name}" for name in record.get("extracted_files", [])],
        timings=timings,
        inputs=(record.get("evidence") or {}).get("inputs"),
    )
    entry.update(run)
    return entry


def is_complete(folder: Path) -> bool:
    """result.json parses, and its extracted images and report.html exist (written in that order last)."""
    try:
        record = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return False
    files = record.get("extracted_files") if isinstance(record, dict) else None
    return bool(files) and all((folder / f).is_file() for f in files) and (folder / "report.html").is_file()


def common_failure(entries: list[dict]) -> tuple[int, str] | None:
    """When every row failed: how many rows share the most common error, and that error; else None.

    An audit in which every row failed points at the environment or the shared settings (a library that
    does not import, a missing SSCD model), not at the checkpoints: the command names that cause once
    and exits non-zero.
    """
    if not entries or any(e["status"] != "failed" for e in entries):
        return None
    ((error, count),) = Counter(str(e.get("error")) for e in entries).most_common(1)
    return count, error


def counts(entries: list[dict]) -> dict:
    """Entries per status, every status listed."""
    return {status: sum(1 for e in entries if e["status"] == status) for status in STATUSES}


def write_summary(out: Path, audit: dict, entries: list[dict]) -> None:
    """Write OUT/summary.json, OUT/summary.csv and OUT/index.html (each atomically: readers never see half).

    Args:
        out: the audit's output folder.
        audit: what describes the whole run (manifest, executor, workers, settings, counts, base loads, times).
        entries: one entry per manifest row, in manifest order.
    """
    write_json(out / "summary.json", {"format": SUMMARY_FORMAT, "audit": audit, "rows": entries}, indent=1)
    atomic_write(out / "summary.csv", summary_csv(entries))
    atomic_write(out / "index.html", index_html(out, audit, entries))


def summary_csv(entries: list[dict]) -> str:
    """One CSV line per entry with `CSV_COLUMNS` (clique sizes space-separated, seconds per stage)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        timings = entry.get("timings") or {}
        row = {
            **entry,
            "clique_sizes": " ".join(map(str, entry.get("clique_sizes") or [])),
            **{f"{stage}_seconds": timings.get(stage) for stage in ("generate", "embed", "cluster")},
        }
        writer.writerow({name: _csv_value(row.get(name)) for name in CSV_COLUMNS})
    return buffer.getvalue()


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else value


_SORT_SCRIPT = """<script>
function sortRows(key) {
  const body = document.getElementById('rows');
  const value = (row) => row.dataset[key] === '' ? -Infinity : Number(row.dataset[key]);
  const rows = Array.from(body.rows);
  rows.sort((a, b) => key === 'line' ? value(a) - value(b) : (value(b) - value(a)) || (a.dataset.line - b.dataset.line));
  rows.forEach((row) => body.appendChild(row));
  document.querySelectorAll('button[data-key]').forEach((b) => b.disabled = b.dataset.key === key);
}
</script>"""
_STYLE = (
    " .failed,.interrupted{color:#b00} .skipped{color:#555} td.images{text-align:left;max-width:60em}"
    " td.error{color:#b00;text-align:left;max-width:40em} button{margin-right:0.5em}"
)


def index_html(out: Path, audit: dict, entries: list[dict]) -> str:
    """The audit's page: every checkpoint's extracted images, sortable by AS and by largest clique.

    Each row links to its report.html; failed rows show their error. The rows come sorted by AS (when
    any row has it, else by largest clique), and buttons re-sort them in the browser.
    """
    key = "as" if any(e.get("AS") is not None for e in entries) else "clique"
    field = {"as": "AS", "clique": "largest_clique"}[key]
    ordered = sorted(entries, key=lambda e: (e.get(field) is None, -(e.get(field) or 0), e["line"]))
    rows = []
    for e in ordered:
        name = html.escape(str(e["id"] or f"line {e['line']}"))
        title = f'<a href="{html.escape(e["report"])}">{name}</a>' if e.get("report") else name
        checkpoint = e.get("finetuned") or e.get("lora")
        details = [e.get("kind"), e.get("method"), f"“{e['caption']}”" if e.get("caption") else None]
        described = html.escape(", ".join(str(d) for d in details if d))
        if checkpoint:
            described += f"<br><small><code>{html.escape(Path(checkpoint).name)}</code></small>"
        if e["status"] in ("done", "skipped") and e.get("extracted"):
            images = "".join(
                f'<a href="{html.escape(e["report"])}">{image(out / path, out=out, side=72)}</a>'
                for path in e["extracted"]
            )
            cell = f'<td class="images">{images}</td>'
        else:
            cell = f'<td class="error">{html.escape(e.get("error") or "")}</td>'
        metrics = "".join(f"<td>{_number(e.get(name))}</td>" for name in ("AS", "A-ESR0.6", "A-ESR0.7"))
        sizes = " ".join(map(str, e.get("clique_sizes") or []))
        rows.append(
            f'<tr data-line="{e["line"]}" data-as="{_data(e.get("AS"))}" data-clique="{_data(e.get("largest_clique"))}">'
            f"<td>{title}<br><small>{described}</small></td>"
            f'<td class="{e["status"]}">{e["status"]}</td>{metrics}'
            f"<td>{_number(e.get('largest_clique'))}</td><td><small>{sizes}</small></td>"
            f"<td>{_number(e.get('threshold'))}</td>{cell}</tr>"
        )
    tally = ", ".join(f"{n} {status}" for status, n in counts(entries).items() if n)
    facts = [
        f"{len(entries)} checkpoint(s): {tally}",
        f"manifest <code>{html.escape(str(audit.get('manifest')))}</code>, executor {html.escape(str(audit.get('executor')))}"
        + (f", {audit['workers']} worker(s)" if audit.get("workers") else ""),
        f"base loads in this run: {audit.get('base_loads', 0)}",
    ]
    buttons = (
        f'<p>Sort by: <button data-key="as" onclick="sortRows(\'as\')"{" disabled" if key == "as" else ""}>AS</button>'
        f'<button data-key="clique" onclick="sortRows(\'clique\')"{" disabled" if key == "clique" else ""}>largest clique</button>'
        '<button data-key="line" onclick="sortRows(\'line\')">manifest order</button></p>'
    )
    body = (
        "<h1>finextract audit</h1>"
        f"<ul>{''.join(f'<li>{fact}</li>' for fact in facts)}</ul>{buttons}"
        '<table border="1"><thead><tr><th>checkpoint</th><th>status</th><th>AS</th><th>A-ESR0.6</th><th>A-ESR0.7</th>'
        "<th>largest clique</th><th>clique sizes</th><th>threshold</th><th>extracted images (each links to the report)</th>"
        f'</tr></thead><tbody id="rows">{"".join(rows)}</tbody></table><p><small>{LEGEND}</small></p>{_SORT_SCRIPT}'
    )
    return page("finextract audit", body, style=_STYLE)


def _number(value) -> str:
    if value is None:
        return ""

    return format_score(value) if isinstance(value, float) else str(value)


def _data(value) -> str:
    return "" if value is None else str(value)
