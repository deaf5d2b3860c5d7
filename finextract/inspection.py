"""`finextract inspect`: what a checkpoint, adapter file or folder is, from its headers and configs, and
what its trainer recorded (`finextract.engine.metadata`), without loading a model.

    report = inspect_checkpoint("lora/pytorch_lora_weights.safetensors")
    print(format_report(report))

The weights are read from safetensors headers (names and shapes) and configs; only kohya's per-module
`alpha` scalars are read as tensors. A pickle is never opened. Where the metadata contradicts the
weights (the family, the rank, the alpha, the module list) the report says so, and the weights win.
A family finextract does not run yet (FLUX.1, SD 3) is still named, from its keys.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

from finextract.engine.families import FAMILIES, adapter_evidence, checkpoint_evidence, get_family
from finextract.engine.formats import CheckpointFormatError, read_safetensors_header, sniff
from finextract.engine.metadata import read_metadata, training_record

logger = logging.getLogger(__name__)

# key patterns of diffusion transformers finextract does not run yet: (family name, label, pattern)
_DIT_KEYS = (
    ("flux", "FLUX.1", re.compile(r"(single_transformer_blocks|double_blocks|single_blocks)[._]")),
    ("sd3", "SD 3", re.compile(r"joint_blocks[._]")),
    ("dit", "a diffusion transformer (SD 3, FLUX.1, PixArt, ...)", re.compile(r"^(transformer\.|lora_transformer_)")),
)
# the diffusion transformers told from keys that finextract runs (adapters and single files)
_RUN_DITS = ("flux", "sd3")
_METADATA_DITS = (("flux", re.compile(r"flux", re.I)), ("sd3", re.compile(r"sd3|stable-diffusion-3", re.I)))
# ComfyUI's component prefixes in FLUX adapter keys -> component
_OTHER_COMPONENT_PREFIXES = (("diffusion_model.", "transformer"), ("text_encoders.clip_l.transformer.", "text_encoder"))
# what part of the network a module is, from its name (kohya's underscored or a dotted path)
_MODULE_KINDS = (
    ("cross-attention", r"attn2"),
    ("self-attention", r"attn1|self_attn"),
    ("joint attention", r"(^|[._])(img_|txt_)?attn[._]|qkv_lora|proj_lora\d"),  # FLUX.1 / SD 3 blocks
    ("feed-forward", r"(^|[._])ff[._]|mlp"),
    ("projection", r"proj_in|proj_out"),
    ("ResNet", r"resnets|conv_shortcut|time_emb_proj|conv[12]"),
    ("resampler", r"samplers"),
)


def inspect_checkpoint(path: str | Path, bases: str | Path | None = None) -> dict:
    """Everything `finextract inspect` reports, JSON-ready.

    Args:
        path: a fine-tune or adapter as `extract` takes it (file or folder), or any safetensors model file.
        bases: a folder of candidate bases (`engine.loading.parents.candidate_bases`) to rank as the
            parent (`rank_bases`, given the trainer metadata read here), or None.

    Returns:
        {"path", "kind" ("adapter" | "full" | "unknown"), "format", "family": {"name", "label", "told_by"}
        (name None when the weights do not tell), "runs" (whether finextract runs the family),
        "components": {component: {"modules", "keys", "types", "ranks", "alphas", "kinds"}} (adapters),
        "training": `TrainingRecord.to_dict()`, "contradictions": [str], "warnings": [str]}; with `bases`,
        also "bases": `rank_parent`'s dict.

    Raises:
        FileNotFoundError: `path` does not exist, or `bases` holds no candidate. (Malformed metadata never
            raises: it becomes a warning.)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    metadata = read_metadata(path)
    record = training_record(metadata)
    report = {"path": str(path), "kind": "unknown", "format": None, "family": _family(None, "", None)}
    report |= {"runs": False, "components": {}, "warnings": []}
    try:
        _weights(path, report)
    except (CheckpointFormatError, ValueError, OSError) as error:
        report["warnings"].append(f"the weights: {error}")
    report["training"] = record.to_dict()
    report["warnings"] += record.warnings
    report["contradictions"] = contradictions(report, record)
    if bases is not None:
        report["bases"] = rank_parent(path, bases, metadata, adapter=report["kind"] == "adapter")
    return report


def rank_parent(path: Path, bases: str | Path, metadata: dict, *, adapter: bool) -> dict:
    """The candidate bases of the folder `bases` ranked as `path`'s parent (`parents.rank_bases`, on the
    safetensors metadata keys of `metadata`, `read_metadata`'s dict), and the one an extraction with
    `--base bases` would choose (`parents.decided_base`).

    Returns:
        {"folder": str, "ranking": [`BaseCandidate.to_dict()`] best first, "chosen": path or None,
        "undecided": why nothing is chosen (no candidate fits, a tie) or None}.

    Raises:
        FileNotFoundError: `bases` does not exist or holds no candidate.
    """
    from finextract.engine.loading.parents import decided_base, rank_bases
    from finextract.engine.metadata import header_keys

    bases = Path(bases)
    if not bases.is_dir():
        raise FileNotFoundError(f"--bases {bases}: not a folder (give a folder of candidate bases)")
    ranked = rank_bases(path, bases, metadata=header_keys(metadata), adapter=adapter)
    result = {"folder": str(bases), "ranking": [c.to_dict() for c in ranked], "chosen": None, "undecided": None}
    try:
        result["chosen"] = str(decided_base(ranked, bases, path))
    except ValueError as error:
        result["undecided"] = str(error)
    return result


def _family(name: str | None, told_by: str, label: str | None = None) -> dict:
    if name in FAMILIES:
        label = FAMILIES[name].label
    return {"name": name, "label": label, "told_by": told_by}


def _dit(shapes: dict) -> dict | None:
    for name, label, pattern in _DIT_KEYS:
        key = next((k for k in sorted(shapes) if pattern.search(k.split(":", 1)[-1])), None)
        if key is not None:
            return _family(name, f"key {key!r}", label)
    return None


def _weights(path: Path, report: dict) -> None:
    """Fill in kind, format, family, runs and components from headers and configs."""
    from finextract.engine.loading import detect_finetuned_format, folder_family
    from finextract.engine.loading.checks import adapter_headers
    from finextract.engine.lora_formats import detect_lora_format

    if path.is_file() and sniff(path) in ("pickle", "pickle-zip"):
        report["format"] = "pickle"
        report["warnings"].append("a pickle: not opened here (its keys are known only once unpickled)")
        return
    lora = detect_lora_format(path)
    if lora is None and path.is_file() and _dit(_shapes(path)):  # a DiT checkpoint: named, not summarised
        report["kind"], report["format"], report["family"] = "full", "single file", _dit(_shapes(path))
        report["runs"] = report["family"]["name"] in _RUN_DITS
        report["components"] = {"transformer": {"modules": "all", "kinds": {"full fine-tune": 1}}}
        return
    if lora is not None:
        shapes, metadata = adapter_headers(path)
        report["kind"], report["format"] = "adapter", lora
        dit = _dit(shapes)
        if dit is not None and dit["name"] == "dit":  # diffusers' `transformer.` keys: SD3's with a second CLIP's
            evidence = adapter_evidence(shapes, {})
            dit = _family(evidence.family.name, evidence.reason) if evidence.family else dit
        if dit is not None:
            # Stability AI's SD3 names (kohya-ss, ComfyUI): diffusers' SD3 LoRA loader has no converter for them
            runs = dit["name"] in _RUN_DITS and not (dit["name"] == "sd3" and "joint_blocks" in dit["told_by"])
            report["family"], report["runs"] = dit, runs
        else:
            evidence = adapter_evidence(shapes, {})  # the weights alone: metadata is compared, not believed
            report["family"] = _family(evidence.family.name if evidence.family else None, evidence.reason)
            report["runs"] = True
            if evidence.family is None and evidence.cross_attention_dim:
                report["family"]["told_by"] = (
                    f"cross-attention width {evidence.cross_attention_dim}, no released family's"
                )
        report["components"] = adapter_summary(path, shapes, report["format"], metadata)
        return
    fmt = detect_finetuned_format(path)
    report["kind"], report["format"], report["runs"] = "full", fmt, True
    if fmt in ("pipeline", "unet_folder"):
        family, _ = folder_family(path, str(path))
        report["family"] = _family(family.name, "its configs")
        parts = [p for p in ("unet", "text_encoder", "text_encoder_2") if (path / p).is_dir()] or ["unet"]
        report["components"] = {part: {"modules": "all", "kinds": {"full fine-tune": 1}} for part in parts}
    else:
        evidence = checkpoint_evidence(_shapes(path))
        report["family"] = _family(evidence.family.name if evidence.family else None, evidence.reason)
        report["components"] = {"unet": {"modules": "all", "kinds": {"full fine-tune": 1}}}


def _shapes(path: Path) -> dict:
    if not path.is_file() or sniff(path) != "safetensors":
        return {}
    header, _ = read_safetensors_header(path)
    return {key: tuple(info["shape"]) for key, info in header.items()}


def adapter_summary(path: Path, shapes: dict, fmt: str, metadata: dict) -> dict:
    """Per component: adapted modules, keys, adapter types, ranks, alphas and module kinds, from the
    header's names and shapes (kohya's `alpha` scalars read from the file).

    Returns:
        {component: {"modules": int, "keys": int, "types": {type: modules}, "ranks": {rank: modules},
        "alphas": {alpha: modules}, "alpha_source": "tensors" | "config" | "assumed (alpha = rank)",
        "kinds": {kind: modules}, "module_names": [name]}}; "unparsed" lists keys of no known suffix.
    """
    import torch

    from finextract.engine.adapters import AdapterError, adapter_type
    from finextract.engine.lora_flux import KOHYA_FLUX_KEY, XLABS_KEY
    from finextract.engine.lora_layouts import CLONEOFSIMO_KEY, KOHYA_PREFIXES, PEFT_SUFFIXES, split_dotted

    groups: dict[tuple[str, str], dict] = {}
    unparsed = []
    for key, shape in shapes.items():
        if XLABS_KEY.match(key):  # XLabs: `<BFL block>.processor.<lora>.down.weight` / `.up.weight`
            name, direction, _ = key.rsplit(".", 2)
            component, suffix = "transformer", f"lora_{direction}.weight"
        elif fmt == "kohya" or key.startswith(tuple(KOHYA_PREFIXES)):
            name, _, suffix = key.partition(".")
            prefix = next((p for p in KOHYA_PREFIXES if name.startswith(p)), None)
            component = KOHYA_PREFIXES[prefix] if prefix else name.split("_", 2)[1] if name.count("_") > 1 else "?"
            component = "transformer" if KOHYA_FLUX_KEY.match(name) else component  # kohya's FLUX: BFL's names
            suffix = PEFT_SUFFIXES.get(suffix, suffix)
        elif CLONEOFSIMO_KEY.fullmatch(key):
            component, index, direction = key.split(":")
            name, suffix = f"{component}:{index}", f"lora_{direction}.weight"
        else:
            first, _, rest = key.partition(".")
            component = first if first in ("unet", "text_encoder", "text_encoder_2", "transformer") else ""
            rest = (rest if component else key).removeprefix("base_model.model.")
            for prefix, named in _OTHER_COMPONENT_PREFIXES:  # ComfyUI's FLUX names
                if not component and rest.startswith(prefix):
                    component, rest = named, rest.removeprefix(prefix)
            if not component and rest.startswith(("double_blocks.", "single_blocks.")):
                component = "transformer"  # BFL's FLUX names (fal's PEFT files)
            if not component:  # a PEFT adapter at the top of its folder, or old attention-processor names
                component = "text_encoder" if rest.startswith(("text_model.", "encoder.")) else "unet"
            split = split_dotted(rest)
            if split is None:
                unparsed.append(key)
                continue
            name, suffix = split
        groups.setdefault((component, name), {})[suffix] = shape
    alphas = _kohya_alphas(path, [k for k in shapes if k.endswith(".alpha")]) if path.is_file() else {}
    config_alpha = _config_alpha(path, metadata)
    summary: dict = {}
    for (component, name), tensors in groups.items():
        entry = summary.setdefault(component, {"modules": 0, "keys": 0, "types": Counter(), "ranks": Counter()})
        entry.setdefault("alphas", Counter())
        entry.setdefault("kinds", Counter())
        entry.setdefault("module_names", [])
        entry["keys"] += len(tensors)
        try:
            kind = adapter_type({s: torch.empty(tuple(v), device="meta") for s, v in tensors.items()})
        except AdapterError:
            unparsed.extend(f"{name}.{s}" for s in tensors)
            continue
        entry["modules"] += 1
        entry["types"][kind.type] += 1
        rank = _rank(kind.type, tensors)
        entry["ranks"][rank] += 1
        alpha_key = next((k for k in (f"{name}.alpha", f"{component}.{name}.alpha") if k in alphas), None)
        if alpha_key is None and alphas and not name.startswith(("lora_", "lycoris_")):  # under a file prefix
            alpha_key = next((k for k in alphas if k.endswith(f".{name}.alpha")), None)
        if alpha_key is not None:
            entry["alphas"][alphas[alpha_key]] += 1
            entry["alpha_source"] = "tensors"
        elif config_alpha is not None and kind.uses_alpha:
            entry["alphas"][config_alpha.get(component, rank)] += 1
            entry.setdefault("alpha_source", "config")
        elif kind.uses_alpha and isinstance(rank, int):
            entry["alphas"][float(rank)] += 1
            entry.setdefault("alpha_source", "the format's (scale 1)" if fmt == "xlabs" else "assumed (alpha = rank)")
        entry["kinds"][_module_kind(name)] += 1
        entry["module_names"].append(name)
    for entry in summary.values():
        for counted in ("types", "ranks", "alphas", "kinds"):
            entry[counted] = {str(k): v for k, v in sorted(entry[counted].items(), key=lambda kv: str(kv[0]))}
        entry["module_names"].sort()
    if unparsed:
        summary["unparsed"] = {"keys": len(unparsed), "examples": sorted(unparsed)[:5]}
    return summary


def _rank(kind: str, tensors: dict) -> int | str:
    """The rank r of one module's adapter from its shapes ("full" for full-rank deltas)."""
    first = {  # the tensor whose first dimension is r, per type (engine.adapters' layouts)
        "lora": "lora_down.weight",
        "loha": "hada_w1_b",
        "glora": "a2.weight",
    }
    if kind in first and first[kind] in tensors:
        return int(tensors[first[kind]][0])
    if kind == "lokr":
        for name in ("lokr_w2_b", "lokr_w1_b"):
            if name in tensors:
                return int(tensors[name][0])
        return "full"
    if kind in ("oft", "boft", "oftv2"):
        blocks = tensors.get("oft_blocks") or tensors.get("oft_R.weight")
        return f"blocks {tuple(blocks)}" if blocks is not None else "?"
    return "full"


def _kohya_alphas(path: Path, keys: list[str]) -> dict[str, float]:
    """kohya / LyCORIS `alpha` scalars (the only tensors inspect reads)."""
    if not keys:
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: round(float(handle.get_tensor(key).float().reshape(-1)[0]), 6) for key in keys}


def _config_alpha(path: Path, metadata: dict) -> dict | None:
    """lora_alpha per component: diffusers' `lora_adapter_metadata` ("<component>.lora_alpha"), or a PEFT
    folder's `adapter_config.json` files (the top one adapts the UNet)."""
    import json

    found = {}
    raw = metadata.get("lora_adapter_metadata")
    try:
        packed = json.loads(raw) if isinstance(raw, str) else {}
    except ValueError:
        packed = {}
    if isinstance(packed, dict):
        found = {k.split(".", 1)[0]: v for k, v in packed.items() if k.endswith(".lora_alpha")}
    for sub in ("", "unet", "text_encoder", "text_encoder_2") if path.is_dir() else ():
        config = path / sub / "adapter_config.json" if sub else path / "adapter_config.json"
        try:
            alpha = json.loads(config.read_text()).get("lora_alpha") if config.is_file() else None
        except (ValueError, AttributeError):
            alpha = None
        if alpha is not None:
            found[sub or "unet"] = alpha
    found = {k: float(v) for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return found or None


def _module_kind(name: str) -> str:
    for kind, pattern in _MODULE_KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


# --- metadata against the weights -----------------------------------------------------------------


def _metadata_family(record) -> tuple[str | None, str]:
    for key in ("architecture", "version"):
        entry = record.parent.get(key)
        if entry is None:
            continue
        for name, pattern in _METADATA_DITS:
            if pattern.search(str(entry.value)):
                return name, f"{entry.source}={entry.value!r}"
        evidence = adapter_evidence({}, {"ss_base_model_version": str(entry.value)})
        if evidence.family is None:
            try:
                evidence = type(evidence)(get_family(str(entry.value)), None)
            except ValueError:
                continue
        return evidence.family.name, f"{entry.source}={entry.value!r}"
    return None, ""


def contradictions(report: dict, record) -> list[str]:
    """Where the metadata (`TrainingRecord`) says otherwise than the weights (`report`): family, rank,
    alpha, module list. Each in words, ending with what is believed: the weights."""
    found = []
    meta_family, told = _metadata_family(record)
    weights_family = report["family"]["name"]
    if meta_family and weights_family and meta_family != weights_family:
        compatible = meta_family in FAMILIES and weights_family in FAMILIES
        if not (compatible and get_family(meta_family).compatible(get_family(weights_family))):
            label = FAMILIES[meta_family].label if meta_family in FAMILIES else meta_family
            found.append(
                f"family: the metadata {told} says {label}; the weights are {report['family']['label']} "
                f"({report['family']['told_by']}): the weights win"
            )
    adapters = {c: e for c, e in report["components"].items() if isinstance(e, dict) and "ranks" in e}
    ranks = {r for e in adapters.values() for r in e["ranks"]}
    dim = record.settings.get("network_dim")
    if dim is not None and ranks and str(dim.value) not in ranks:
        found.append(
            f"rank: the metadata {dim.source}={dim.value} but the weights' ranks are {sorted(ranks)}: the weights win"
        )
    alphas = {a for e in adapters.values() if e.get("alpha_source") == "tensors" for a in e["alphas"]}
    alpha = record.settings.get("network_alpha")
    if alpha is not None and alphas and all(abs(float(a) - float(alpha.value)) > 1e-3 for a in alphas):
        found.append(
            f"alpha: the metadata {alpha.source}={alpha.value} but the weights' alphas are {sorted(alphas)}: the weights win"
        )
    targets = record.settings.get("target_modules")
    # diffusers' metadata lists each component's targets: compare them with that component's modules only
    named = re.search(r"\[(\w+)\.target_modules\]$", targets.source) if targets is not None else None
    names = [
        n
        for c, e in adapters.items()
        if named is None or c == named.group(1)
        for n in e["module_names"]
        if ":" not in n
    ]
    if targets is not None and names and report["format"] in ("diffusers", "peft"):
        missing, extra = _module_mismatch(targets.value, names)
        if missing or extra:
            found.append(
                f"modules: the metadata {targets.source} names {len(missing)} module(s) the weights do not adapt "
                f"{missing[:3]} and the weights adapt {len(extra)} it does not name {extra[:3]}: the weights win"
            )
    return found


def _module_mismatch(targets, names: list[str]) -> tuple[list[str], list[str]]:
    """(targets matching no adapted module, adapted modules no target matches), PEFT's matching rule:
    a regex string must match the whole path; a list entry the path or its ending after a dot."""
    if isinstance(targets, str):
        try:
            return [], [n for n in names if not re.fullmatch(targets, n)]
        except re.error:
            return [targets], []
    if not isinstance(targets, list):
        return [], []
    targets = [str(t) for t in targets]

    def hit(name, target):
        return name == target or name.endswith("." + target)

    return [t for t in targets if not any(hit(n, t) for n in names)], [
        n for n in names if not any(hit(n, t) for t in targets)
    ]


# --- the text report ------------------------------------------------------------------------------


def _value(entry: dict | None) -> str:
    return "-" if not entry else f"{entry['value']}  [{entry['source']}]"


def format_report(report: dict) -> str:
    """`inspect_checkpoint`'s report as readable text (what `finextract inspect` prints)."""
    family = report["family"]
    label = family["label"] or "not told by the weights"
    lines = [
        f"{report['path']}",
        f"  kind: {report['kind']} ({report['format']})",
        f"  family: {label}" + (f" ({family['told_by']})" if family["told_by"] else ""),
    ]
    if not report["runs"] and report["kind"] != "unknown":
        lines.append("  finextract does not run this family yet: inspected only")
    for component, entry in report["components"].items():
        if component == "unparsed":
            lines.append(f"  unparsed keys: {entry['keys']}, e.g. {entry['examples']}")
            continue
        if entry.get("modules") == "all":
            lines.append(f"  {component}: every weight (a full fine-tune)")
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in entry["kinds"].items())
        lines.append(f"  {component}: {entry['modules']} modules ({kinds}), {entry['keys']} tensors")
        lines.append(
            f"    types {entry['types']}, ranks {entry['ranks']}, alphas {entry['alphas']}"
            + (f" ({entry['alpha_source']})" if entry.get("alpha_source") else "")
        )
    training = report["training"]
    lines.append("  training (from the metadata; [the key each value came from]):")
    if not training["producers"]:
        lines.append("    no trainer metadata")
    else:
        lines.append(f"    producers: {', '.join(training['producers'])}")
        lines.append(f"    N0 (distinct training images): {_value(training['n0'])}")
        lines.append(f"    caption: {_value(training['caption'])}")
        for candidate in training["caption_candidates"][1:6]:
            lines.append(f"      also: {candidate['caption']!r} ({candidate['why']}) [{candidate['source']}]")
        if training["tags"]:
            top = ", ".join(f"{t['tag']} ({t['count']})" for t in training["tags"][:10])
            more = len(training["tags"]) - 10
            lines.append(f"    tags: {top}" + (f", ... {more} more" if more > 0 else ""))
        for name, entry in training["parent"].items():
            lines.append(f"    parent {name}: {_value(entry)}")
        for name, entry in training["settings"].items():
            if name != "target_modules":
                lines.append(f"    {name}: {_value(entry)}")
    if training["unknown"]:
        lines.append(f"  other metadata keys ({len(training['unknown'])}, raw):")
        lines += [f"    {key}: {value}" for key, value in sorted(training["unknown"].items())[:30]]
    if "bases" in report:
        lines += _bases_lines(report["bases"])
    for contradiction in report["contradictions"]:
        lines.append(f"  CONTRADICTION {contradiction}")
    for warning in report["warnings"]:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def _bases_lines(bases: dict) -> list[str]:
    lines = [f"  candidate bases in {bases['folder']} (the likeliest parent first):"]
    for rank, candidate in enumerate(bases["ranking"], 1):
        told = [f"named by {candidate['match']}"] if candidate["match"] else []
        if candidate["distance"] is not None:
            told.append(f"{candidate.get('denoiser', 'UNet')} distance {candidate['distance']:.4f}")
        if not candidate["compatible"]:
            told.insert(0, "INCOMPATIBLE")
        lines.append(f"    {rank}. {Path(candidate['path']).name}: {', '.join(told) or 'nothing tells it apart'}")
        lines += [f"       {note}" for note in candidate["notes"]]
    if bases["chosen"]:
        lines.append(f"    parent: {bases['chosen']} (what --base {bases['folder']} chooses)")
    else:
        lines.append(f"    no parent chosen: {bases['undecided']}")
    return lines


# --- --caption auto / --n0 auto -------------------------------------------------------------------


def metadata_first(path, caption, n0, num_images: int | None):
    """`--caption auto` and `--n0 auto` from the fine-tune's trainer metadata, where it records them.

    Args:
        path: the fine-tune or adapter (file or folder); None, or one that is not a local path, gives nothing.
        caption: the spec's caption ("auto" asks for it). n0: the spec's N0 ("auto" asks for it).
        num_images: N as given, which a recorded N0 must not exceed; None when N is not given (it then
            follows N0: `ExtractionSpec.with_n0`).

    Returns:
        (caption, caption_record or None, n0, n0_record or None): an "auto" replaced by the metadata's
        value, with its record {"source": "metadata", "key", "file", ...}; left as "auto" (records None)
        when the metadata does not give it, for the estimates to take over.

    Raises:
        ValueError: the metadata's N0 exceeds N (the message names the key and the fix).
    """
    from finextract.spec import AUTO

    if path is None or AUTO not in (caption, n0) or not Path(path).exists():
        return caption, None, n0, None
    path = Path(path)
    record = training_record(read_metadata(path))
    for warning in record.warnings:
        logger.warning("%s: trainer metadata: %s", path, warning)
    caption_record = n0_record = None
    if caption == AUTO and record.caption is not None:
        caption = record.caption.value
        caption_record = {"source": "metadata", "key": record.caption.source, "file": str(path), "caption": caption}
        caption_record["candidates"] = record.caption_candidates
        logger.info("--caption auto: %r from the trainer metadata (%s)", caption, record.caption.source)
    if n0 == AUTO and record.n0 is not None and record.n0.value >= 1:
        if num_images is not None and record.n0.value > num_images:
            raise ValueError(
                f"--n0 auto: the metadata of {path} records N0 = {record.n0.value} ({record.n0.source}), more than "
                f"--num-images {num_images}: generate at least N0 images (the paper: 50 x N0), or give --n0"
            )
        n0 = record.n0.value
        n0_record = {"source": "metadata", "key": record.n0.source, "file": str(path), "n0": n0}
        logger.info("--n0 auto: N0 = %d from the trainer metadata (%s)", n0, record.n0.source)
    return caption, caption_record, n0, n0_record
