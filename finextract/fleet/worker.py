"""One audit worker: runs manifest rows with `Extractor`, keeping the loaded base between rows.

The same class runs in-process (`executor="local"`) and as a Ray actor (`executor="ray"`), so both
write the same folders. A worker keeps one `LoadedBase` (the last base it loaded) and one SSCD
embedder; a row with the same base pairs its checkpoint with the loaded base instead of reading the
base again (a LoRA pair hooks its adapters on its own copy of the base UNet's modules, which shares
the weight tensors: `finextract.engine.loading.copy_sharing_weights`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from finextract import __version__
from finextract.engine.config import IMAGE_SETTINGS, RunConfig
from finextract.engine.loading.parents import BaseCandidate, choice_sources
from finextract.extract import Extractor
from finextract.sscd import load_embedder
from finextract.store.chunks import finished_count
from finextract.store.files import write_json

from .manifest import Row
from .summary import entry_from_result, failed_entry

logger = logging.getLogger(__name__)

#: The row record written last into OUT/<id>/: its presence with a matching key means the row is complete.
ROW_RECORD = "audit.json"
ROW_FORMAT = "finextract-audit-row/1"
#: Written into OUT by the driver at every start; a worker that reads another token sees another folder.
TOKEN_FILE = ".audit-token"


@dataclass(frozen=True)
class FleetSettings:
    """What every worker of one audit shares.

    Attributes:
        out: the audit's output folder (absolute; on a cluster, the same path on every node).
        run_options: `RunConfig.resolve` keywords (device, dtype, backend, threads, batch_size, steps,
            seed, ...); each worker resolves them on its own machine ("auto" finds its GPU).
        embedder, sscd_preset: the SSCD model ("default" or a file) and its preprocessing preset.
        allow_pickle: allow pickled checkpoints. save_generated: also write all N images per row.
        overwrite: replace a row folder's run made with other settings (`Extractor.extract(overwrite=)`).
        token: the content of OUT/.audit-token for this run (see `TOKEN_FILE`).
    """

    out: str
    run_options: dict = field(default_factory=dict)
    embedder: str = "default"
    sscd_preset: str | None = None
    allow_pickle: bool = False
    save_generated: bool = False
    overwrite: bool = False
    token: str = ""


def row_key(row: Row, settings: FleetSettings) -> dict:
    """Everything that decides a row's output: its fields, the run settings that change images
    (`finextract.engine.config.IMAGE_SETTINGS`, with the row's steps / seed in place of the audit's), the SSCD model, and each input's file sizes and
    modification times (a checkpoint replaced in place runs again; its generation chunks are reused only
    if its weights hash the same)."""
    given = {**RunConfig.defaults(), **settings.run_options}
    run = {name: given[name] for name in IMAGE_SETTINGS}
    for name in ("steps", "seed"):
        if getattr(row, name) is not None:
            run[name] = getattr(row, name)
    inputs = {name: _file_stats(getattr(row, name)) for name in ("base", "finetuned", "lora", "train")}
    return {
        "row": row.fields(),
        "run": run,
        # "preset" names the SSCD preset in this key as in audits made before --sscd-preset: they resume
        "sscd": {"model": settings.embedder, "preset": settings.sscd_preset},
        "inputs": inputs,
        "save_generated": settings.save_generated,
        "finextract": __version__,
    }


def _file_stats(path: str | None) -> list | None:
    """[[relative name, size, mtime_ns], ...] of a file or of every file below a folder; None if absent."""
    if path is None or not Path(path).exists():
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    stats = []
    for file in files:
        info = file.stat()
        stats.append([file.relative_to(root).as_posix() if file != root else file.name, info.st_size, info.st_mtime_ns])
    return stats


def read_row_record(folder: Path) -> dict | None:
    """OUT/<id>/audit.json, or None when it is missing or unreadable."""
    try:
        record = json.loads((folder / ROW_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == ROW_FORMAT else None


class RowRunner:
    """Runs rows one at a time; keeps the last loaded base and the SSCD embedder for the next row.

    Args:
        settings: the audit's `FleetSettings`.

    A row's own failure (a checkpoint that does not load, out of memory, too few usable images) is
    returned as a "failed" entry with its error: it never raises. `describe()` raises when the run
    settings or the SSCD model are unusable here, before any row starts.
    """

    def __init__(self, settings: FleetSettings):
        self.settings = settings
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.base = None  # the LoadedBase of the last row
        self.embedder = None
        self.config, self.config_error = None, None
        try:
            self.config = RunConfig.resolve(**settings.run_options)
        except ValueError as error:
            self.config_error = error

    def describe(self) -> dict:
        """Check the run settings and load the SSCD model; return this worker's resolved settings.

        Raises:
            ValueError / FileNotFoundError / RuntimeError: invalid settings on this machine (e.g. fp16
                without CUDA), or an SSCD model that does not load.
        """
        if self.config_error is not None:
            raise self.config_error
        self._embedder()
        return {"worker": self.worker, "config": self.config.to_dict()}

    def _embedder(self):
        if self.embedder is None:
            self.embedder = load_embedder(
                self.settings.embedder,
                sscd_preset=self.settings.sscd_preset,
                device=self.config.device,
                threads=self.config.threads,
            )
        return self.embedder

    def _base_for(self, row: Row) -> tuple[object, float | None]:
        """The LoadedBase of `row.base` (loaded now, or kept from an earlier row) and the seconds a load took."""
        if self.base is not None and self.base.spec == row.base:
            return self.base, None
        # heavy: torch and diffusers load in the workers only; the fleet driver imports this module torch-free
        from finextract.engine.loading import load_base

        self.base = None  # free the previous base before loading the next
        gc.collect()
        started = time.perf_counter()
        self.base = load_base(
            row.base, allow_pickle=self.settings.allow_pickle, device=self.config.device, dtype=self.config.dtype
        )
        return self.base, time.perf_counter() - started

    def run(self, row: Row, key: dict) -> dict:
        """Extract one row into OUT/<row.id>/ and return its summary entry (status "done" or "failed").

        An interrupted earlier attempt resumes from its finished generation chunks. KeyboardInterrupt
        propagates (what is finished stays on disk).
        """
        started = time.perf_counter()
        folder = Path(self.settings.out) / row.id
        attempt = {
            "worker": self.worker,
            "base_loaded": False,
            "base_load_seconds": None,
            "chunks_resumed": finished_count(folder / "generation"),
            "seconds": None,
        }
        extractor = None
        try:
            self.describe()
            self._check_out_folder()
            _, base_seconds = self._base_for(row)
            attempt.update(base_loaded=base_seconds is not None, base_load_seconds=base_seconds)

            extractor = Extractor(
                self.base,
                row.finetuned,
                lora=row.lora,
                config=self.config,
                embedder=self._embedder(),
                allow_pickle=self.settings.allow_pickle,
            )
            if row.bases is not None:  # `base: auto` chose it when the manifest was read: result.json says so
                ranking = [BaseCandidate.from_dict(candidate) for candidate in row.base_ranking]
                extractor.pair.sources.update(choice_sources(row.bases, ranking))
            extractor.extract(
                spec=row.spec,
                out=folder,
                save_generated=self.settings.save_generated,
                overwrite=self.settings.overwrite,
                progress=False,
                **{name: getattr(row, name) for name in ("steps", "seed") if getattr(row, name) is not None},
            )
            attempt["seconds"] = time.perf_counter() - started
            _write_json(folder / ROW_RECORD, {"format": ROW_FORMAT, "key": key, "run": attempt})
            return entry_from_result(row, folder, status="done", run=attempt)
        except Exception as error:  # the row's own failure: recorded, and the audit goes on
            logger.debug("row %s failed", row.id, exc_info=True)
            attempt["seconds"] = time.perf_counter() - started
            return failed_entry(row, _error_text(error), run=attempt)
        finally:
            del extractor
            gc.collect()
            if self.config is not None and self.config.is_cuda:
                import torch

                torch.cuda.empty_cache()

    def _check_out_folder(self) -> None:
        """The driver's output folder must be this worker's too (one filesystem, same path)."""
        token_file = Path(self.settings.out) / TOKEN_FILE
        try:
            token = token_file.read_text().strip()
        except OSError:
            token = None
        if token != self.settings.token:
            raise RuntimeError(
                f"--out {self.settings.out} is not the audit's output folder on {socket.gethostname()} "
                f"({token_file} {'is missing' if token is None else 'belongs to another run'}): on a cluster, put "
                "--out and the models on a filesystem every node mounts at the same path (e.g. NFS)"
            )


def _error_text(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if isinstance(error, (ValueError, FileNotFoundError)) else f"{type(error).__name__}: {text}"


def _write_json(path: Path, value: dict) -> None:
    write_json(path, value, indent=1, default=str)
