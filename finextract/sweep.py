"""Sensitivity sweeps: AS and A-ESR against one extraction setting (the paper's Sec. 5.3 and Fig. 4).

`run_sweep(extractor, caption, param="w", values=[1, 2, 3, 5, 7], methods=["finextract", "cfg"], ...)`
runs one `Extractor.extract` per (method, value) into `out/<method>-<param>_<value>/`, a normal extract
output folder; a folder whose `result.json` matches the point's settings is read instead of rerun, and
an unfinished one resumes from its generation chunks, so an interrupted sweep continues where it
stopped. It writes `out/sweep.json` after every point, then `out/sweep.png` (AS and A-ESR0.6 against
the parameter, one line per method) and `out/report.html`.

Parameters, named as `Extractor.extract`'s arguments: `w` (guidance scale; FineXtract and CFG), `k`
(Eq. 13's correction; FineXtract only), `num_images` (N, images generated; N0 fixed) and `n0` (N0, images
extracted; N = 50 x N0 unless fixed); the paper's names `N` and `N0` are accepted too. N0 here is the
number extracted from one fine-tune, scored against its whole training set; the paper's Fig. 4a also
changes the training set's size, which takes one fine-tune per value.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from finextract.engine.config import run_config
from finextract.evaluation import read_training_images, train_transform
from finextract.images import read_images
from finextract.metrics import format_score
from finextract.report import esc, image, new_figure, save_plot, settings_table, table, write_page
from finextract.rules import METHODS, rule_params
from finextract.spec import DEFAULT_PRESET, PRESETS, ExtractionSpec
from finextract.store.files import write_json
from finextract.store.folders import prepare

logger = logging.getLogger(__name__)

PARAMS = ("w", "k", "num_images", "n0")
#: the paper's names of the swept settings, accepted as aliases
PARAM_ALIASES = {"N": "num_images", "N0": "n0"}
METRICS = ("AS", "A-ESR0.6", "A-ESR0.7")
PARAM_NAMES = {
    "w": "guidance scale w",
    "k": "correction k",
    "num_images": "N (images generated)",
    "n0": "N0 (images extracted)",
}
PARAM_SYMBOLS = {"w": "w", "k": "k", "num_images": "N", "n0": "N0"}
METHOD_NAMES = {"finextract": "FineXtract", "finextract-uncond": "FineXtract (Eq. 6)", "cfg": "CFG", "direct": "Direct"}
SWEEP_FORMAT = "finextract-sweep/1"
#: `run_sweep`'s spec_options: the `ExtractionSpec` settings a sweep holds fixed besides N0, N, w, k
SPEC_OPTIONS = ("adaptive", "round_images", "stable_rounds", "selection", "on_budget")


def point_folder(out: str | Path, method: str, param: str, value) -> Path:
    """The extract output folder of one sweep point: `out/<method>-<param>_<value>` (e.g. `cfg-w_3`)."""
    return Path(out) / f"{method}-{param}_{value:g}"


def check_sweep(param: str, values, methods) -> tuple[str, list, list[str]]:
    """Validate a sweep's parameter, values and methods; returns (param, values, methods), the
    parameter by its canonical name (`PARAMS`; "N" -> "num_images", "N0" -> "n0").

    Raises:
        ValueError: an unknown parameter or method, no values, repeated values, non-integer or < 1
            values of num_images / n0, `k` with a method other than finextract, `w` with direct.
    """
    param = PARAM_ALIASES.get(param, param)
    if param not in PARAMS:
        raise ValueError(f"--param {param!r}: expected one of {', '.join(PARAMS)} (or N, N0)")
    methods = list(methods)
    if not methods:
        raise ValueError("--methods: give at least one method")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"--methods {method!r}: expected some of {','.join(METHODS)}")
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"--values: give at least one value of {param}")
    if len(set(values)) != len(values):
        raise ValueError(f"--values {values}: each value once")
    if param in ("num_images", "n0"):
        if any(v != int(v) or v < 1 for v in values):
            raise ValueError(f"--values {values}: {param} takes integers >= 1")
        values = [int(v) for v in values]
    if param == "k" and methods != ["finextract"]:
        raise ValueError(
            f"--param k: only finextract has k (Eq. 13); drop {', '.join(m for m in methods if m != 'finextract')} from --methods"
        )
    if param == "w" and "direct" in methods:
        raise ValueError("--param w: direct has no guidance scale; drop it from --methods")
    return param, values, methods


def _finished(folder: Path, expected: dict, overwrite: bool = False) -> dict | None:
    """The `result.json` of a finished point that matches `expected`, None when the folder has none
    (or, with `overwrite`, holds another run, to be replaced).

    Raises:
        ValueError: it holds another run and not `overwrite` (the message names the differing settings).
    """
    path = folder / "result.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    config = record.get("config", {})
    found = {
        "method": record.get("method"),
        "caption": config.get("caption"),
        "n0": record.get("n0"),
        "num_images": record.get("num_images"),
        "w": config.get("w"),
        "k": config.get("k"),
        "steps": config.get("run", {}).get("steps"),
        "scheduler": config.get("run", {}).get("scheduler", "ddim"),  # runs before --scheduler: DDIM
        "seed": config.get("run", {}).get("seed"),
        "models": {key: config.get("models", {}).get(key) for key in ("base", "finetuned", "lora")},
        "train_transform": (record.get("metrics") or {}).get("train_transform"),
        "train_files": sorted({m["train_file"] for m in (record.get("metrics") or {}).get("best_match", [])}),
        "selection": config.get("clustering", {}).get("selection", "size"),
        "on_budget": config.get("clustering", {}).get("on_budget", "skip"),
        "adaptive": bool(record.get("adaptive")),
    }
    differences = [f"{key}: {found[key]!r} -> {value!r}" for key, value in expected.items() if found.get(key) != value]
    if differences and overwrite:
        return None
    if differences:
        raise ValueError(
            f"{folder} holds another run ({'; '.join(differences)}); pass --overwrite (overwrite=True) to replace it, "
            "or sweep into another --out"
        )
    return record


def run_sweep(
    extractor,
    caption: str,
    *,
    param: str,
    values,
    methods=("finextract", "cfg"),
    out: str | Path,
    train,
    n0: int,
    num_images: int | None = None,
    w: float | None = None,
    k: float | None = None,
    train_as_is: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    spec_options: dict | None = None,
    **run_options,
) -> dict:
    """Run (or resume) a sweep of one setting and write sweep.json, sweep.png and report.html into `out`.

    Args:
        extractor: a loaded `finextract.extract.Extractor`; every point is one `extractor.extract`.
        caption: the training caption.
        param: "w", "k", "num_images" or "n0" (or "N", "N0"). values: the values to try (N, N0:
            integers >= 1).
        methods: guidance rules to compare (k: finextract only).
        out: the sweep folder (a `RunFolder` the CLI checked is not checked again); point (method,
            value) goes to `point_folder(out, method, param, value)`.
        train: the real training images (a folder, arrays, or `read_images`' pair); AS needs them.
        n0, num_images, w, k: the settings held fixed (None: the default preset's N = 20 x N0 and w per fine-tune
            kind for FineXtract, the paper's w / k per method and fine-tune kind otherwise).
        train_as_is: score against the training images without the centre crop and resize.
        progress: show progress bars.
        overwrite: replace a point folder holding a run with other settings instead of refusing it.
        spec_options: `ExtractionSpec.resolve` keywords held fixed at every point, of `SPEC_OPTIONS`
            (adaptive, round_images, stable_rounds, selection, on_budget); None: the defaults.
        **run_options: per-extraction run settings (steps=, seed=, batch_size=, backend=, ...).

    Returns:
        The sweep.json dict: {"format", "param", "values", "methods", "settings", "points": one per
        (method, value) {"method", "value", "folder", "AS", "A-ESR0.6", "A-ESR0.7", "generated": AS and
        A-ESR against all generated images, "threshold", "clique_sizes", "seconds", "reused"},
        "complete", "plot"}.

    Raises:
        ValueError: as `check_sweep`; `out` holding another command's output; a point folder holding
            another run (without `overwrite`); from `Extractor.extract`.
        FileNotFoundError: `train` is not a folder.
    """
    param, values, methods = check_sweep(param, values, methods)
    spec_options = dict(spec_options or {})
    if set(spec_options) - set(SPEC_OPTIONS):
        raise ValueError(
            f"spec_options {sorted(set(spec_options) - set(SPEC_OPTIONS))}: expected some of {SPEC_OPTIONS}"
        )
    if spec_options.get("adaptive") and param == "num_images":
        raise ValueError("--adaptive decides N itself: sweep w, k or n0 with it, or drop --adaptive to sweep N")
    out = prepare(out, "sweep").path
    if train is None:
        raise ValueError("a sweep scores AS / A-ESR: give the training images (--train)")
    if isinstance(train, (str, Path)):
        train = read_images(train)
    resolution = None if train_as_is else extractor.resolution
    train_files = sorted(p.name for p in read_training_images(train, resolution)[1])
    fixed = {"n0": n0, "num_images": num_images, "w": w, "k": k}
    points = [
        (
            method,
            value,
            ExtractionSpec.resolve(
                caption,
                **{**fixed, param: value},
                method=method,
                train=train,
                train_as_is=train_as_is,
                **spec_options,
            ),
        )
        for method in methods
        for value in values
    ]  # every point checked before the first one runs
    config = run_config(extractor.config, **run_options)
    summary = {
        "format": SWEEP_FORMAT,
        "param": param,
        "values": values,
        "methods": methods,
        "settings": {
            "caption": caption,
            "n0": n0,
            "num_images": num_images,
            "w": w,
            "k": k,
            **spec_options,
            "selection": points[0][2].selection,  # resolved: the preset's unless given (the same at every point)
            "models": extractor.models,
            "train_transform": train_transform(resolution),
            "steps": config.steps,
            "scheduler": config.scheduler,
            "seed": config.seed,
            "backend": config.backend,
            "device": config.device,
        },
        "points": [],
        "complete": False,
    }
    out.mkdir(parents=True, exist_ok=True)
    for number, (method, value, spec) in enumerate(points):
        folder = point_folder(out, method, param, value)
        started = time.perf_counter()
        params = rule_params(method, extractor.pair.kind, spec.guidance_w(extractor.pair.kind), spec.k)
        expected = {
            "method": method,
            "caption": caption,
            "n0": spec.n0,
            "num_images": spec.num_images,
            "w": params.get("w"),
            "k": params.get("k"),
            "steps": config.steps,
            "scheduler": config.scheduler,
            "seed": config.seed,
            "models": {key: extractor.models[key] for key in ("base", "finetuned", "lora")},
            "train_transform": train_transform(resolution),
            "train_files": train_files,
            "selection": spec.selection,
            "on_budget": spec.on_budget,
            "adaptive": spec.adaptive,
        }
        record = _finished(folder, expected, overwrite)
        reused = record is not None
        if reused:
            logger.info("sweep point %s %s=%g: reusing %s", method, param, value, folder)
            metrics, threshold, sizes = record["metrics"], record["threshold"], record["clique_sizes"]
        else:
            label = f"[{number + 1}/{len(points)}] {method} {param}={value:g}"
            result = extractor.extract(
                spec=spec,
                out=folder,
                progress=progress,
                label=label,
                overwrite=overwrite,
                **run_options,
            )
            metrics, threshold, sizes = result.metrics, result.threshold, [len(c) for c in result.cliques]
        point = {"method": method, "value": value, "folder": folder.name}
        point.update({name: metrics[name] for name in METRICS})
        if "generated" in metrics:
            point["generated"] = {name: metrics["generated"][name] for name in METRICS}
        point.update(
            threshold=threshold,
            clique_sizes=sizes,
            seconds=round(time.perf_counter() - started, 1),
            reused=reused,
        )
        summary["points"].append(point)
        write_json(out / "sweep.json", summary, newline=True)  # after every point: an interrupted sweep keeps them
    summary["complete"] = True
    summary["plot"] = "sweep.png"

    save_plot(sweep_plot(summary), out / "sweep.png")
    write_json(out / "sweep.json", summary, newline=True)
    write_sweep_report(out, summary)
    return summary


def _series(summary: dict, method: str, metric: str, of: str | None = None) -> tuple[list, list]:
    """(values, metric) of one method's points, sorted by value; `of="generated"`: the metric against
    all generated images (points without it are left out)."""
    points = sorted((p for p in summary["points"] if p["method"] == method), key=lambda p: p["value"])
    if of is not None:
        points = [p for p in points if of in p]
        return [p["value"] for p in points], [p[of][metric] for p in points]
    return [p["value"] for p in points], [p[metric] for p in points]


def sweep_plot(summary: dict):
    """AS (left) and A-ESR0.6 (right) against the swept parameter, one line per method; dashed: the AS
    of the best of all N generated images per training image (an upper bound on the extracted AS).

    Args:
        summary: `run_sweep`'s dict (or sweep.json).

    Returns:
        A matplotlib `Figure` (log-scaled x for N and N0 spanning a factor of 10 or more).
    """
    param, settings = summary["param"], summary["settings"]
    fig = new_figure(9.0, 3.4)
    axes = fig.subplots(1, 2)
    values = summary["values"]
    for ax, metric in zip(axes, ("AS", "A-ESR0.6")):
        for method in summary["methods"]:
            x, y = _series(summary, method, metric)
            (line,) = ax.plot(x, y, marker="o", label=METHOD_NAMES.get(method, method))
            x, y = _series(summary, method, metric, of="generated")
            if metric == "AS" and len(y) == len(x) and x:
                # the best of all N generated images per training image: what a perfect pick reaches
                ax.plot(x, y, linestyle="--", color=line.get_color(), alpha=0.6, label="  best of all N")
        ax.set_xlabel(PARAM_NAMES[param])
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if param in ("num_images", "n0") and max(values) >= 10 * min(values):
            ax.set_xscale("log")
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
        if metric == "A-ESR0.6":
            ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=8)
    kind = settings.get("models", {}).get("kind", "")
    # w and k left unset take the paper's per-method defaults (FineXtract DreamBooth: w 3, k -0.02)
    fixed = [
        f"{key} = {settings[key]:g}" if settings.get(key) is not None else f"{key}: paper default"
        for key in ("w", "k")
        if key != param
    ]
    if param != "n0":
        fixed.append(f"N0 = {settings['n0']}")
    if param != "num_images":
        fixed.append(f"N = {settings['num_images'] or str(PRESETS[DEFAULT_PRESET]['images_per_n0']) + ' x N0'}")
    fixed.append(f"{settings['steps']} {settings.get('scheduler', 'ddim')} steps, seed {settings['seed']}")
    fig.suptitle(f"{kind}: AS and A-ESR0.6 against {PARAM_SYMBOLS[param]} ({', '.join(fixed)})", fontsize=10)
    return fig


def write_sweep_report(out: str | Path, summary: dict) -> Path:
    """`out/report.html`: the sweep's plot, a table of every point (linking its own report) and the settings."""
    out = Path(out)
    param = summary["param"]
    title = f"finextract sweep: {PARAM_SYMBOLS[param]} \u2014 {', '.join(METHOD_NAMES.get(m, m) for m in summary['methods'])}"
    rows = []
    for p in sorted(summary["points"], key=lambda p: (p["method"], p["value"])):
        generated = p.get("generated", {})
        rows.append(
            [
                esc(METHOD_NAMES.get(p["method"], p["method"])),
                f"{p['value']:g}",
                format_score(p["AS"]),
                format_score(p["A-ESR0.6"]),
                format_score(p["A-ESR0.7"]),
                format_score(generated["AS"]) if generated else "",
                f"{p['threshold']:.2f}",
                esc(p["clique_sizes"]),
                f"<a href='{esc(p['folder'])}/report.html'>{esc(p['folder'])}</a>",
            ]
        )
    body = [f"<h1>{esc(title)}</h1>"]
    if (out / "sweep.png").is_file():
        body.append(image(out / "sweep.png", out=out, side=900, alt="sweep plot"))
    body.append(
        table(
            (
                "method",
                param,
                "AS",
                "A-ESR0.6",
                "A-ESR0.7",
                "AS, all generated",
                "threshold",
                "clique sizes",
                "run",
            ),
            rows,
            numeric=(1, 2, 3, 4, 5, 6),
        )
    )
    body.append(
        "<p class='note'>One extraction per point (one seed set). AS, all generated: the best image among "
        "every generated one per training image, what a perfect pick could reach.</p>"
    )
    body.append("<h2>Settings</h2>" + settings_table(summary["settings"]))
    return write_page(out / "report.html", title, body)
