"""Re-check a finished extraction from its folder alone: `verify_run("run/")` (CLI `finextract verify run/`).

Three kinds of check, each a `Check` (one line of output):

1. **Inputs.** Every file named in `result.json`'s `evidence.inputs` (checkpoints, adapter, training
   images) is read again at its recorded path (or under a folder the caller names instead: moved
   copies) and its size and sha256 compared; every byte is re-read (the hash cache is not used).
   Files of the input that the record does not name fail too.
2. **Images.** The folder's `extracted/` must hold exactly the files the record names, each with its
   recorded sha256 (`extracted_sha256`, every file whatever K); K of them are
   regenerated from their seeds with the recorded settings (method, w, k, caption, steps, seed, device,
   dtypes, backend), each within its original batch (`_original_batch`: up to `batch_size` images per
   checked image), and compared pixel by pixel with the saved PNGs. On the same backend, device, dtypes,
   machine kind and versions they must be bit-identical; otherwise within `PIXEL_TOLERANCE` levels.
3. **Scores.** SSCD descriptors of the saved extracted PNGs and of the training images (with the
   recorded crop and resize) give AS, A-ESR0.6, A-ESR0.7 and each training image's best similarity
   again; they must agree with the record within `SIMILARITY_TOLERANCE` (A-ESR exactly, unless a
   similarity lies within the tolerance of its threshold).

Everything in result.json is data: its file names are used only inside the run folder or under the
input folders, never as code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from finextract.engine.config import BACKEND_NAMES, RunConfig, resolve_device
from finextract.engine.formats import file_sha256
from finextract.evaluation import read_training_images
from finextract.evidence import (
    MODEL_SUFFIXES,
    environment_record,
    machine_record,
    model_files,
    pixels_sha256,
)
from finextract.images import read_image
from finextract.metrics import extraction_metrics
from finextract.rules import rule_for
from finextract.sscd import embed_images, load_embedder
from finextract.store.folders import extracted_present

logger = logging.getLogger(__name__)

#: Largest |pixel difference| (uint8 levels) allowed between a regenerated image and the saved one when
#: bit-identity is not expected (another backend, device, machine kind or library versions). Derivation:
#: the same float32 computation in another order (another backend's kernels, another batch shape,
#: another CPU's SIMD width) differs by a few units of roundoff per operation (`tests/tolerances.py`);
#: through the DDIM loop this leaves the decoded float pixels far below one level apart, so rounding to
#: uint8 moves a pixel across at most one boundary. Measured on the trained zoo (DreamBooth and LoRA,
#: 50 DDIM steps, 8 images): torch at batch 1 vs 8, onnxruntime and openvino vs torch: max 1 level, in at
#: most 0.024% of the pixels. Not yet measured at SD 1.x size (a 512 px VAE decode) or in fp16 / bf16,
#: which can exceed it: pass a larger `tolerance` there and say why.
PIXEL_TOLERANCE = 1
#: Largest |difference| of a recomputed SSCD cosine similarity (and of AS, their mean). A cosine of
#: two 512-d float32 unit vectors summed in another order differs by at most 512 x 2^-24 ~ 3e-5
#: (Higham's summation bound); another CPU's int8 kernels (the default SSCD model is int8) change the
#: descriptors themselves a little more. 1e-3 is 30x the reordering bound and 100x below the 0.1 that
#: separates a copy (> 0.6) from a non-copy.
SIMILARITY_TOLERANCE = 1e-3
#: The `config` keys of result.json that verify reads (besides `models`).
RECORD_KEYS = ("run", "seeds", "method", "w", "k", "caption", "sscd")
#: Checks' kinds, in the order they are run and listed.
KINDS = ("folder", "input", "image", "score")


@dataclass(frozen=True)
class Check:
    """One verified fact. kind: one of `KINDS`; subject: the file or value; ok: it holds; detail: what
    was compared (and on failure, what differs)."""

    kind: str
    subject: str
    ok: bool
    detail: str

    def line(self) -> str:
        """One line of `finextract verify`'s output, "ok   KIND SUBJECT: DETAIL" or "FAIL ..."."""
        return f"{'ok  ' if self.ok else 'FAIL'} {self.kind} {self.subject}: {self.detail}"


@dataclass
class Verification:
    """What `verify_run` found.

    Attributes:
        run: the run folder. checks: every `Check`, in `KINDS` order.
        case: how regenerated images were compared: "bit-identical" (same backend, device, dtypes,
            machine kind and versions) or "tolerance" (max |difference| <= `tolerance` levels),
            or "skipped" (no image regenerated). reasons: why not bit-identical (empty for that case).
        tolerance: the pixel tolerance that applied (0 for bit-identical).
    """

    run: Path
    checks: list[Check] = field(default_factory=list)
    case: str = "skipped"
    reasons: list[str] = field(default_factory=list)
    tolerance: int = 0

    @property
    def ok(self) -> bool:
        """True when every check holds."""
        return all(check.ok for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def add(self, kind: str, subject: str, ok: bool, detail: str) -> None:
        """Append a `Check`."""
        self.checks.append(Check(kind, subject, bool(ok), detail))

    def case_line(self) -> str:
        """One sentence saying which comparison applied to the regenerated images, and why."""
        if self.case == "bit-identical":
            return "images: bit-identical required (same backend, device, dtypes, machine kind and versions)"
        if self.case == "tolerance":
            return (
                f"images: max |pixel difference| <= {self.tolerance} level(s) of 255 required, not bit-identity, "
                f"because {'; '.join(self.reasons)}"
            )
        return "images: none regenerated"


def verify_run(
    run: str | Path,
    *,
    base: str | Path | None = None,
    finetuned: str | Path | None = None,
    lora: str | Path | None = None,
    train: str | Path | None = None,
    base_config: str | Path | None = None,
    images: int | None = None,
    sscd: str | Path | None = None,
    tolerance: int | None = None,
    allow_pickle: bool = False,
) -> Verification:
    """Re-check an `extract` run folder: input hashes, K regenerated images, and the scores.

    Args:
        run: the folder `Extractor.extract(out=...)` / `finextract extract --out` wrote.
        base, finetuned, lora, train, base_config: where those inputs are now, when they moved (a file
            or folder of the same kind as recorded); None = their recorded paths.
        images: K, how many extracted images to regenerate (in rank order; 0: none); None = all N0.
        sscd: the SSCD model file when the run did not use the default model (its sha256 must match).
        tolerance: max |pixel difference| in uint8 levels when bit-identity is not expected (default
            `PIXEL_TOLERANCE`); >= 0.
        allow_pickle: allow loading pickled checkpoints (only if the run was made with them and you trust them).

    Returns:
        `Verification`: `.ok` is True when everything holds; `.failures` names each file and what differs.

    Raises:
        FileNotFoundError: `run` has no result.json. ValueError: result.json is not an extract run's
            record with evidence (written by an older finextract, or by `cluster`), or images / tolerance
            < 0.
    """
    run = Path(run)
    record = _read_record(run)
    if images is not None and images < 0:
        raise ValueError(f"images={images}: must be >= 0 (--images K; 0 regenerates none)")
    if tolerance is not None and tolerance < 0:
        raise ValueError(f"tolerance={tolerance}: must be >= 0 pixel levels (--tolerance)")
    overrides = {"base": base, "finetuned": finetuned, "lora": lora, "train": train, "base_config": base_config}
    verification = Verification(run=run)
    files = _check_folder(run, record, verification)
    locations = {}
    for entry in record["evidence"]["inputs"]:
        given = overrides.get(entry["role"]) or entry.get("path")
        where = Path(given) if given else None  # None: training images passed as arrays, no --train
        locations[entry["role"]] = where
        if entry["role"] == "train":
            _check_train(entry, where, verification)
        else:
            _check_model_input(entry, where, verification)
    count = len(files) if images is None else min(images, len(files))
    if count:
        _check_images(record, files[:count], locations, verification, tolerance, allow_pickle)
    _check_scores(record, files, locations.get("train"), sscd, verification)
    return verification


def _read_record(run: Path) -> dict:
    path = run / "result.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no result.json; give the folder `finextract extract --out` wrote")
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); the record is damaged") from None
    if not isinstance(record, dict) or "evidence" not in record or "models" not in record.get("config", {}):
        raise ValueError(
            f"{path}: no evidence block (written by `cluster`, or by a finextract before `verify` existed); "
            "only an extract run can be verified: re-run the extraction with this version"
        )
    config, evidence = record["config"], record["evidence"]
    missing = [f"config.{key}" for key in RECORD_KEYS if key not in config]
    missing += [f"evidence.{key}" for key in ("inputs", "environment") if key not in evidence]
    if missing or not isinstance(config.get("seeds"), list):
        raise ValueError(f"{path}: the record lacks {', '.join(missing) or 'its seed list'}; it is damaged")
    seeds = len(config["seeds"])
    if not all(isinstance(i, int) and 0 <= i < seeds for i in record.get("extracted") or []):
        raise ValueError(f"{path}: extracted indices {record.get('extracted')} are not all in 0..{seeds - 1}")
    return record


def _plain_name(name: str) -> bool:
    """A relative POSIX path with no '..' or absolute part: safe to join under a folder."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name


def _check_folder(run: Path, record: dict, verification: Verification) -> list[tuple[int, Path]]:
    """extracted/ holds exactly the recorded files; returns [(generated index, path)] in rank order."""
    names = record.get("extracted_files") or []
    indices = record.get("extracted") or []
    named = {n for n in names if isinstance(n, str)}
    present = extracted_present(run)
    for extra in sorted(present - named):
        verification.add("folder", extra, False, "not named by result.json (another run's image? a mixed folder)")
    files = []
    for name, index in zip(names, indices):
        if not (isinstance(name, str) and _plain_name(name) and name.startswith("extracted/")):
            verification.add("folder", repr(name)[:80], False, "not a file name inside extracted/")
        elif name not in present:
            verification.add("folder", name, False, "named by result.json but missing")
        else:
            files.append((int(index), run / name))
            _check_saved_file(name, run / name, record.get("extracted_sha256"), verification)
    if len(names) != len(indices) or len(names) != record.get("n0", len(names)):
        verification.add(
            "folder", "result.json", False, f"{len(names)} files for {len(indices)} indices, N0 {record.get('n0')}"
        )
    elif len(files) == len(names) and not (present - named):
        verification.add("folder", "extracted/", True, f"exactly the {len(names)} recorded images")
    return files


def _check_saved_file(name: str, path: Path, recorded: dict | None, verification: Verification) -> None:
    """A saved extracted PNG against its sha256 in the record (every file, whatever `--images K`
    regenerates). A record from before `extracted_sha256` existed only gets the regeneration check."""
    if not isinstance(recorded, dict):
        return
    if name not in recorded:
        verification.add("folder", name, False, "no sha256 for it in result.json")
    elif file_sha256(path) != recorded[name]:
        verification.add("folder", name, False, "sha256 differs from result.json: the file changed after the run")


def _check_model_input(entry: dict, where: Path | None, verification: Verification) -> None:
    role = entry["role"]
    if where is None or not entry.get("files"):
        verification.add("input", role, False, f"no path or files recorded; pass --{role.replace('_', '-')}")
        return
    if entry["kind"] == "file":
        recorded = entry["files"][0]
        _compare_file(role, where, recorded, verification)
        return
    if not where.is_dir():
        verification.add("input", f"{role} {where}", False, "recorded as a folder: no folder there")
        return
    names = set()
    for recorded in entry["files"]:
        names.add(recorded["name"])
        if not _plain_name(recorded["name"]):
            verification.add("input", f"{role} {recorded['name']!r}", False, "not a relative file name")
            continue
        _compare_file(role, where / recorded["name"], recorded, verification)

    for extra in model_files(where):
        name = extra.relative_to(where).as_posix()
        if name not in names and extra.name.lower().endswith(MODEL_SUFFIXES):
            verification.add("input", f"{role} {extra}", False, "not in the record (a file added to the input)")


def _compare_file(role: str, path: Path, recorded: dict, verification: Verification) -> None:
    if not path.is_file():
        verification.add("input", f"{role} {path}", False, "missing")
        return
    size, digest = path.stat().st_size, file_sha256(path)
    if size != recorded["size"] or digest != recorded["sha256"]:
        verification.add(
            "input",
            f"{role} {path}",
            False,
            f"changed: sha256 {digest[:16]}... size {size} B, recorded {recorded['sha256'][:16]}... {recorded['size']} B",
        )
    else:
        verification.add("input", f"{role} {path}", True, f"sha256 and size ({size} B) match")


def _check_train(entry: dict, where: Path | None, verification: Verification) -> None:
    if where is None:
        verification.add("input", "train", True, "passed as arrays, not files: give --train to re-check them")
        return
    if not where.is_dir():
        verification.add("input", f"train {where}", False, "no such folder; pass --train with the moved copy")
        return
    recorded_names = set()
    for recorded in entry["files"]:
        name = recorded["name"]
        recorded_names.add(name)
        path = where / name
        if not _plain_name(name) or "/" in name:
            verification.add("input", f"train {name!r}", False, "not a plain file name")
        elif recorded.get("sha256") is not None:
            _compare_file("train", path, recorded, verification)
        elif not path.is_file():
            verification.add("input", f"train {path}", False, "missing")
        else:
            same = pixels_sha256(read_image(path)) == recorded["pixels_sha256"]
            verification.add("input", f"train {path}", same, "pixels match" if same else "pixels changed")
    for extra in sorted(p for p in where.iterdir() if p.is_file() and not p.name.startswith(".")):
        if extra.name not in recorded_names:
            try:
                read_image(extra)
            except ValueError:
                continue  # not an image: read_images skips it too
            verification.add("input", f"train {extra}", False, "an image the record does not name (it would be scored)")


def _comparison_case(record: dict, run_config) -> list[str]:
    """Why bit-identity is not expected: what differs between the recorded run and this one."""
    reasons = []
    recorded = record["config"]["run"]
    for name in ("backend", "device", "dtype", "vae_dtype"):
        if recorded.get(name) != getattr(run_config, name):
            reasons.append(f"{name} {recorded.get(name)} -> {getattr(run_config, name)}")
    environment = record["evidence"]["environment"]
    machine = machine_record()
    for name in sorted(set(environment.get("machine", {})) | set(machine)):
        if environment.get("machine", {}).get(name) != machine.get(name):
            reasons.append(f"machine {name} {environment.get('machine', {}).get(name)} -> {machine.get(name)}")
    now = environment_record()
    if environment.get("python") != now["python"]:
        reasons.append(f"python {environment.get('python')} -> {now['python']}")
    if ("lock" in environment) != ("lock" in now):
        reasons.append("versions recorded against a lock file on one side only")
    elif "lock" in environment:
        if [f["sha256"] for f in environment["lock"]["files"]] != [f["sha256"] for f in now["lock"]["files"]]:
            reasons.append("other lock files")
        if environment["lock"]["differs"] != now["lock"]["differs"]:
            reasons.append("other versions (differences from the lock)")
    else:
        old, new = environment.get("distributions", {}), now["distributions"]
        changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
        if changed:
            shown = ", ".join(f"{n} {old.get(n)} -> {new.get(n)}" for n in changed[:4])
            reasons.append(f"versions differ ({shown}{', ...' if len(changed) > 4 else ''})")
    return reasons


def _run_config(record: dict):
    """The recorded RunConfig, on this machine: its device when available, else the CPU in fp32."""
    recorded = dict(record["config"]["run"])
    recorded.pop("threads", None)  # this machine's own (threads do not change the images)
    recorded.pop("cache_dir", None)  # the default cache here
    if recorded["device"].startswith("cuda") and not resolve_device("auto").startswith("cuda"):
        backend = recorded["backend"] if recorded["backend"] in ("onnxruntime",) else "torch"
        recorded.update(device="cpu", dtype="fp32", vae_dtype="fp32", backend=backend)
    if recorded.get("backend") not in BACKEND_NAMES:
        raise ValueError(f"result.json: unknown backend {recorded.get('backend')!r}")
    return RunConfig.resolve(**recorded)


def _check_images(record, files, locations, verification, tolerance, allow_pickle) -> None:
    """Regenerate `files`' images from their seeds and compare them with the saved PNGs."""
    # heavy: torch and diffusers, only when images are regenerated
    from finextract.engine.loading import load_model_pair
    from finextract.engine.sampler import Sampler

    config = record["config"]
    models = config["models"]
    try:
        run_config = _run_config(record)
        run_config.apply_threads()
        sources = config.get("manifest", {}).get("sources", {})
        said = sources.get("prediction_type") or {}
        override = said.get("used") if said.get("override") else None
        lora = "lora" in locations
        pair = load_model_pair(
            locations["base"],
            None if lora else locations["finetuned"],
            lora=locations["lora"] if lora else None,
            allow_pickle=allow_pickle,
            device=run_config.device,
            dtype=run_config.dtype,
            base_config=locations.get("base_config"),
            prediction_type=override,
        ).place(run_config)
        if pair.kind != models["kind"]:
            raise ValueError(f"the inputs load as a {pair.kind} pair, recorded {models['kind']}")
        caption = config.get("caption") or ""
        sampler = Sampler(pair, rule_for(config["method"], pair.kind, config["w"], config["k"]), caption, run_config)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        verification.add("image", "regeneration", False, f"cannot load the recorded models: {error}")
        return
    reasons = _comparison_case(record, run_config)
    verification.case = "tolerance" if reasons else "bit-identical"
    verification.reasons = reasons
    verification.tolerance = (PIXEL_TOLERANCE if tolerance is None else tolerance) if reasons else 0
    seeds = config["seeds"]
    wanted = {}
    for index, path in files:  # each image's original batch, regenerated once for all its images
        wanted.setdefault(_original_batch(index, config.get("manifest") or {}, run_config.batch_size), []).append(
            (index, path)
        )
    for (start, stop), batch in sorted(wanted.items()):
        regenerated = sampler(seeds[start:stop]).cpu().numpy()
        for index, path in batch:
            image = regenerated[index - start]
            saved = read_image(path)
            subject = f"{path.parent.name}/{path.name}"
            if saved.shape != image.shape:
                verification.add("image", subject, False, f"shape {saved.shape}, regenerated {image.shape}")
                continue
            difference = np.abs(saved.astype(np.int16) - image.astype(np.int16))
            worst, share = int(difference.max()), float((difference > 0).mean())
            seed = f"seed {seeds[index]} (image {index})"
            if worst == 0:
                verification.add("image", subject, True, f"bit-identical to its regeneration from {seed}")
            elif worst <= verification.tolerance:
                verification.add(
                    "image",
                    subject,
                    True,
                    f"within tolerance: max |difference| {worst}, {share:.3%} of pixels ({seed})",
                )
            else:
                verification.add(
                    "image",
                    subject,
                    False,
                    f"differs from its regeneration from {seed}: max |difference| {worst} levels "
                    f"(allowed {verification.tolerance}), {share:.2%} of pixels",
                )


def _original_batch(index: int, manifest: dict, batch_size: int) -> tuple[int, int]:
    """[start, stop) of the batch image `index` was generated in: `generate` runs each chunk of the
    manifest in batches of `batch_size` from the chunk's start. Regenerating that whole batch, not the
    image alone, keeps every matrix product's shape: on a CPU the batch size changes the blocking of
    torch's matrix products and so the last bits (measured: 1 level in 0.03% of pixels on the trained
    zoo's DreamBooth, batch 8 vs 1)."""
    for chunk in manifest.get("chunks") or []:
        if chunk["start"] <= index < chunk["stop"]:
            start = chunk["start"] + (index - chunk["start"]) // batch_size * batch_size
            return start, min(start + batch_size, chunk["stop"])
    start = index // batch_size * batch_size
    return start, start + batch_size


def _check_scores(record, files, train_folder, sscd, verification) -> None:
    """Recompute AS / A-ESR and the best similarities from the saved PNGs and the training images."""
    metrics = record.get("metrics")
    if not metrics:
        verification.add("score", "metrics", True, "none recorded (no training images): nothing to re-score")
        return
    if train_folder is None or not train_folder.is_dir():  # (its input check names the missing folder)
        verification.add("score", "metrics", False, "the training images are not there to re-score; pass --train")
        return
    if len(files) != len(record.get("extracted_files", [])):
        verification.add("score", "metrics", False, "not re-scored: extracted/ differs from the record")
        return
    info = record["config"]["sscd"]
    try:
        # "preset": the key's name in result.json files written before --sscd-preset
        embedder = load_embedder(sscd or "default", sscd_preset=info.get("sscd_preset", info.get("preset")))
    except (OSError, ValueError, RuntimeError) as error:
        verification.add("score", "SSCD model", False, f"cannot load it: {error}")
        return
    if embedder.info["sha256"] != info.get("sha256"):
        verification.add(
            "score",
            "SSCD model",
            False,
            f"{embedder.info['model']} has sha256 {embedder.info['sha256'][:16]}..., the run used "
            f"{str(info.get('sha256'))[:16]}... ({info.get('model')}): pass that model with --sscd FILE",
        )
        return
    transform = metrics.get("train_transform", {})
    resolution = transform.get("resolution") if transform.get("name") == "center_crop_resize" else None
    train_images, train_paths, _ = read_training_images(train_folder, resolution)
    extracted = [read_image(path) for _, path in files]
    now = extraction_metrics(
        embed_images(embedder, train_images, "training"), embed_images(embedder, extracted, "extracted")
    )
    by_name = {m.get("train_file"): m for m in metrics.get("best_match", [])}
    worst = 0.0
    for match in now["best_match"]:
        name = train_paths[match["train"]].name
        old = by_name.get(name)
        if old is None:
            verification.add("score", f"train {name}", False, "no best match recorded for this training image")
            continue
        gap = abs(match["similarity"] - old["similarity"])
        worst = max(worst, gap)
        if gap > SIMILARITY_TOLERANCE:
            verification.add(
                "score",
                f"train {name}",
                False,
                f"best similarity {match['similarity']:.4f}, recorded {old['similarity']:.4f} "
                f"(|difference| {gap:.2g} > {SIMILARITY_TOLERANCE})",
            )
    if len(now["best_match"]) != len(by_name):
        verification.add(
            "score", "metrics", False, f"{len(now['best_match'])} training images, recorded {len(by_name)}"
        )
    gap = abs(now["AS"] - metrics["AS"])
    verification.add(
        "score",
        "AS",
        gap <= SIMILARITY_TOLERANCE,
        f"{now['AS']:.4f}, recorded {metrics['AS']:.4f} (|difference| {gap:.2g}, allowed {SIMILARITY_TOLERANCE})",
    )
    similarities = [m["similarity"] for m in now["best_match"]]
    for tau in (0.6, 0.7):
        name = f"A-ESR{tau}"
        borderline = any(abs(s - tau) <= SIMILARITY_TOLERANCE for s in similarities)
        same = now[name] == metrics[name]
        verification.add(
            "score",
            name,
            same or borderline,
            f"{now[name]:.3f}, recorded {metrics[name]:.3f}"
            + (" (a similarity lies within the tolerance of the threshold)" if borderline and not same else ""),
        )
    if worst <= SIMILARITY_TOLERANCE:
        verification.add(
            "score", "best matches", True, f"{len(similarities)} best similarities agree (max |difference| {worst:.2g})"
        )
