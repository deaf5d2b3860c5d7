"""Fleet audits: every checkpoint of a manifest extracted into one folder, on Ray or in this process.

    summary = audit("manifest.csv", "audit/")          # local Ray: ray.init() on this machine
    summary = audit("manifest.csv", "audit/", executor="local")
    summary["rows"][0]["AS"], summary["audit"]["base_loads"]

OUT/<id>/ holds each row's usual extract output (extracted/, generation/, result.json, report.html)
and OUT/<id>/audit.json, written last; OUT/summary.json, summary.csv and index.html sum them up and are
rewritten as rows finish. A rerun skips the rows that are complete with the same configuration, and a
row that was cut off resumes from its finished generation chunks.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from finextract.engine.config import RunConfig
from finextract.evidence import command_record, environment_record, jsonable
from finextract.metrics import format_score
from finextract.spec import preset_run_options
from finextract.store.folders import prepare

from .executors import EXECUTORS, run_local, run_ray
from .manifest import FIELDS, ManifestError, Row, RowError, read_manifest
from .summary import counts, entry_from_result, failed_entry, is_complete, row_entry, write_summary
from .worker import TOKEN_FILE, FleetSettings, read_row_record, row_key

__all__ = ["EXECUTORS", "FIELDS", "ManifestError", "Row", "RowError", "audit", "read_manifest"]

logger = logging.getLogger("finextract.audit")

#: `RunConfig.resolve`'s keywords with its defaults: a row's run settings, unresolved (each worker resolves them).
RUN_DEFAULTS = RunConfig.defaults()


def audit(
    manifest: str | Path,
    out: str | Path,
    *,
    executor: str = "ray",
    ray_address: str | None = None,
    workers: int | None = None,
    retries: int = 2,
    embedder: str = "default",
    sscd_preset: str | None = None,
    allow_pickle: bool = False,
    save_generated: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    ray_init_options: dict | None = None,
    **run_options,
) -> dict:
    """Extract every checkpoint of a manifest into OUT/<id>/ and sum them up in OUT/summary.*, index.html.

    Args:
        manifest: CSV or JSON file, one row per checkpoint (see `finextract.fleet.manifest.read_manifest`):
            id, base, finetuned or lora, caption (empty: Eq. 6), n0; optional train, method, w, k,
            num_images, steps, seed; base "auto" with bases, a folder of candidate bases.
        out: the output folder (created; on a cluster, a path every node sees: a shared filesystem).
        executor: "ray" (default: a local Ray instance, or the cluster at `ray_address`) or "local"
            (the rows one after another in this process; same outputs).
        ray_address: None (start Ray here), "auto" or "HOST:PORT" (join a running cluster).
        workers: Ray workers (default: one per GPU, or the CPUs / threads). retries: how often Ray
            retries a row whose worker process died (the retry reuses the row's finished chunks).
        embedder, sscd_preset: the SSCD model ("default" or a TorchScript / ONNX file) and preprocessing.
        allow_pickle: allow pickled checkpoints (only for files you trust).
        save_generated: also write all N generated images of each row.
        overwrite: a row folder holding a run with other settings is replaced (its chunks
            included) instead of failing the row (`Extractor.extract(overwrite=)`, `--overwrite`).
        progress: one progress bar over the rows (done / failed / running).
        ray_init_options: more `ray.init` keywords when Ray is started here (num_cpus=, object_store_memory=, ...).
        **run_options: `RunConfig.resolve` settings for every row (device=, dtype=, backend=, threads=,
            batch_size=, steps=, seed=, cache_dir=, cuda_graphs=); a row's steps / seed override them.
            On CPUs each row uses `threads` cores (default `FINEXTRACT_THREADS`, else all).

    Returns:
        The summary, as written to OUT/summary.json: {"format", "audit": {manifest, out, executor,
        workers, run settings, counts per status, base_loads (bases this run loaded), seconds, ...},
        "rows": one entry per manifest row in manifest order (status done / skipped / failed /
        interrupted / pending (running only in the files written while the audit runs), AS, A-ESR0.6, A-ESR0.7, threshold, largest_clique, clique_sizes,
        timings, base_loaded, chunks_resumed, worker, report, extracted, error, inputs (each input file's
        path, size and sha256: `finextract.evidence`))}; the audit's "command" (command line and this
        call) and "environment" (Python, machine, versions) are recorded too.

    Raises:
        ManifestError: the manifest cannot be parsed (names the line). FileNotFoundError: no manifest.
        ValueError: unknown executor or run setting, `out` is not a writable folder, or the settings
            are unusable on the workers (e.g. fp16 without CUDA); raised before any row runs.
        RuntimeError: `executor="ray"` without Ray installed.
        KeyboardInterrupt: after writing the summary (finished rows done, the running ones
            "interrupted", the rest "pending"); rerun the same call to continue.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    unknown = sorted(set(run_options) - set(RUN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run setting(s) {', '.join(unknown)}; expected {', '.join(RUN_DEFAULTS)}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries={retries!r}: must be an integer >= 0")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers {workers!r}: must be an integer >= 1")
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    entries_in = read_manifest(manifest)  # ManifestError before anything starts
    out = prepare(out, "audit").path.resolve()
    out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    (out / TOKEN_FILE).write_text(token)
    settings = FleetSettings(
        out=str(out),
        # the default preset's steps and scheduler where not given, as `finextract audit` and `extract` take them
        run_options={**RUN_DEFAULTS, **preset_run_options(None), **run_options},
        embedder=str(embedder),
        sscd_preset=sscd_preset,
        allow_pickle=allow_pickle,
        save_generated=save_generated,
        overwrite=overwrite,
        token=token,
    )

    entries, jobs, position = [], [], {}
    for entry_in in entries_in:
        if isinstance(entry_in, RowError):
            entries.append(failed_entry(entry_in, entry_in.error))
            continue
        key = json.loads(json.dumps(row_key(entry_in, settings)))
        folder = out / entry_in.id
        record = read_row_record(folder)
        if record is not None and record.get("key") == key and is_complete(folder):
            earlier = {**record.get("run", {}), "base_loaded": False, "base_load_seconds": None, "chunks_resumed": None}
            entries.append(entry_from_result(entry_in, folder, status="skipped", run=earlier))
            continue
        position[entry_in.id] = len(entries)
        entries.append(row_entry(entry_in, "pending"))
        jobs.append((entry_in, key))
    audit_info = {
        "manifest": str(Path(manifest).resolve()),
        "out": str(out),
        "executor": executor,
        "started": started.isoformat(timespec="seconds"),
        "run": settings.run_options,
        "sscd": {"model": settings.embedder, "sscd_preset": sscd_preset},
        "rows": len(entries),
        "to_run": len(jobs),
        "command": command_record(
            {
                "function": "finextract.audit",
                "arguments": jsonable(
                    {"manifest": manifest, "out": out, "executor": executor, "ray_address": ray_address}
                    | {"workers": workers, "retries": retries, "embedder": embedder, "sscd_preset": sscd_preset}
                    | {"allow_pickle": allow_pickle, "save_generated": save_generated, **run_options}
                ),
            }
        ),
        "environment": environment_record(),
    }
    for entry in entries:
        if entry["status"] == "failed":
            logger.warning("row %s (line %d) cannot run: %s", entry["id"], entry["line"], entry["error"])
        elif entry["status"] == "skipped":
            logger.info("row %s: complete from an earlier run with the same configuration, skipped", entry["id"])

    bar = _Bar(len(entries), initial=entries, enabled=progress)

    def finish(final: dict | None = None) -> dict:
        audit_info.update(final or {})
        audit_info.update(
            counts=counts(entries),
            base_loads=sum(1 for e in entries if e.get("base_loaded")),
            seconds=round(time.perf_counter() - clock, 3),
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        write_summary(out, audit_info, entries)
        return {"format": "finextract-audit/1", "audit": audit_info, "rows": entries}

    def on_start(row: Row) -> None:
        entries[position[row.id]]["status"] = "running"
        bar.update(entries)
        logger.info("row %s (line %d): started", row.id, row.line)

    def on_done(entry: dict) -> None:
        entries[position[entry["id"]]] = entry
        _log_done(entry)
        bar.update(entries, advance=1)
        write_summary(out, {**audit_info, "counts": counts(entries)}, entries)

    write_summary(out, {**audit_info, "counts": counts(entries)}, entries)
    try:
        with bar:
            if not jobs:
                final = {"executor": executor, "workers": 0}
            elif executor == "local":
                final = run_local(settings, jobs, on_start, on_done)
            else:
                final = run_ray(
                    settings,
                    jobs,
                    on_start,
                    on_done,
                    address=ray_address,
                    workers=workers,
                    retries=retries,
                    init_options=ray_init_options,
                )
    except KeyboardInterrupt:
        for entry in entries:
            if entry["status"] == "running":
                entry["status"] = "interrupted"
        summary = finish({"interrupted": True})
        done = summary["audit"]["counts"]
        logger.warning(
            "interrupted: %d row(s) done, %d interrupted (their finished chunks are kept), %d pending; "
            "rerun the same command to continue",
            done["done"] + done["skipped"],
            done["interrupted"],
            done["pending"],
        )
        raise
    summary = finish(final)
    tally = summary["audit"]["counts"]
    logger.info(
        "audit: %d done, %d skipped, %d failed; %d base load(s); %s",
        tally["done"],
        tally["skipped"],
        tally["failed"],
        summary["audit"]["base_loads"],
        out / "index.html",
    )
    return summary


def _log_done(entry: dict) -> None:
    if entry["status"] == "failed":
        logger.warning("row %s (line %d) failed: %s", entry["id"], entry["line"], entry["error"])
        return
    metrics = f"AS {format_score(entry['AS'])}, " if entry.get("AS") is not None else ""
    logger.info(
        "row %s: done in %.1f s: %slargest clique %s, threshold %.2f%s%s",
        entry["id"],
        entry.get("seconds") or 0.0,
        metrics,
        entry.get("largest_clique"),
        entry.get("threshold") or 0.0,
        ", base loaded" if entry.get("base_loaded") else "",
        f", {entry['chunks_resumed']} chunk(s) resumed" if entry.get("chunks_resumed") else "",
    )


class _Bar:
    """One tqdm bar over the rows: finished / total, with done, failed and running counts."""

    def __init__(self, total: int, *, initial: list[dict], enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        self.initial = sum(1 for e in initial if e["status"] in ("done", "skipped", "failed"))
        self.entries = initial

    def __enter__(self):
        if self.enabled:
            self.redirect = logging_redirect_tqdm()
            self.redirect.__enter__()
            self.bar = tqdm(total=self.total, initial=self.initial, unit="row", desc="audit")
            self.update(self.entries)
        return self

    def update(self, entries: list[dict], advance: int = 0) -> None:
        if self.bar is None:
            return
        tally = counts(entries)
        self.bar.set_postfix_str(
            f"done {tally['done'] + tally['skipped']}, failed {tally['failed']}, running {tally['running']}",
            refresh=False,
        )
        self.bar.update(advance)
        self.bar.refresh()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
            self.redirect.__exit__(*exc)
        return False
