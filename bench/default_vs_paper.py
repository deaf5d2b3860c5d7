"""The default preset against `--preset paper`, seed by seed, from committed runs (nothing is generated
here): the tables of docs/results.md#time-to-evidence.

The default (`PRESETS["default"]`) spends a tenth of the paper's UNet evaluations; the paper's is DDIM 50 at
N = 50 x N0, the "size" selection and w = 3 (DreamBooth) / 5 (LoRA). Inputs, in bench/results/:

- time_to_evidence_budget.json: the ways of spending the tenth (DPM-Solver++ 2M at 20 / 15 / 12 steps, N up
  to 20 x N0, "modes", w = 3), every prefix N scored: the committed zoo's four cells (seeds 0 / 1000 / 2000,
  object cells also 3000-9000) and the held-out pair (seeds 0-9000);
- selection_loco.json: the committed zoo's four cells, seeds 0 / 1000 / 2000 (`bench/adaptive_stop.py --loco`):
  the paper's runs, and the former default's (DPM-Solver++ 2M 25, N = 10 x N0) at the paper's w;
- selection_more_seeds.json: its object cells, seeds 3000-9000 (`--constants`);
- selection_heldout.json: the held-out DreamBooth and LoRA (`finextract zoo heldout`);
- selection_lora_w{2,3,4}.json (and `_heldout`): the LoRAs' former-default runs at that w.

    python bench/default_vs_paper.py   # the markdown tables: the default against the paper, the settings
                                       # compared (seeds 0-2000, then all), size against modes, a LoRA's w
    python bench/default_vs_paper.py --plot docs/time_to_evidence_default.png   # and the settings' picture
"""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path

from finextract.spec import PRESETS

RESULTS = Path(__file__).resolve().parent / "results"
MODES = "modes 2/0.5"
PAPER_W = PRESETS["paper"]["finextract_w"]["lora"]  # the paper's (Sec. 5.1): 5
N0 = 5
BUDGET_FILE = "time_to_evidence_budget.json"


@functools.cache  # each table reads the same files again
def runs(name: str) -> list[dict]:
    """The replayed runs of one file (missing: [])."""
    path = RESULTS / name
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def scores(files, setting: tuple, rule: str, kinds=("dreambooth", "lora")) -> dict:
    """cell -> {seed: (AS, A-ESR0.6)} of `rule` at `setting` (scheduler, steps, N) in `files`, for the cells
    of those kinds."""
    found: dict = {}
    for name in files:
        for run in runs(name):
            if tuple(run["setting"]) == setting and run["cell"].split(":")[1] in kinds:
                row = run["by_N"][str(setting[2])][rule]
                found.setdefault(run["cell"], {})[run["seed"]] = (row["AS"], row["A-ESR0.6"])
    return found


def budget_scores(setting: tuple) -> dict:
    """cell -> {seed: (AS, A-ESR0.6)} of the `BUDGET_FILE` runs at `setting` (scheduler, steps, N): the
    prefix N of a run of that scheduler and steps, scored with the run's own rule ("modes")."""
    found: dict = {}
    for run in runs(BUDGET_FILE):
        for row in run["prefix_scores"]:
            if (run["scheduler"], run["steps"], row["N"]) == setting:
                found.setdefault(run["cell"], {})[run["seed"]] = (row["AS"], row["A-ESR0.6"])
    return found


BASE_FILES = ("selection_loco.json", "selection_more_seeds.json", "selection_heldout.json")
PAPER = ("ddim", 50, 250)
_DEFAULT = PRESETS["default"]
DEFAULT = (_DEFAULT["scheduler"], _DEFAULT["steps"], _DEFAULT["images_per_n0"] * N0)
#: the default before the budget was split into more images: DPM-Solver++ 2M 25 at N = 10 x N0
FORMER = ("dpmpp-2m", 25, 50)
#: the settings compared (scheduler, steps, N): the former default, three cheaper ones that also meet the goal on
#: the committed cells' seeds 0 / 1000 / 2000, and the three ways of spending the whole tenth on more images
SPLITS = (
    FORMER,
    ("dpmpp-2m", 12, 60),
    ("dpmpp-2m", 15, 60),
    ("dpmpp-2m", 12, 80),
    ("dpmpp-2m", 20, 60),
    ("dpmpp-2m", 15, 80),
    ("dpmpp-2m", 12, 100),
)
GROUPS = {"0, 1000, 2000": (0, 1000, 2000), "3000-9000": tuple(range(3000, 10000, 1000))}
GROUPS["all 10"] = GROUPS["0, 1000, 2000"] + GROUPS["3000-9000"]
CELLS = ("object:dreambooth", "object:lora", "style:dreambooth", "style:lora", "heldout:dreambooth", "heldout:lora")


def former_scores() -> dict:
    """The former default's runs (modes, w = 3): a DreamBooth's are the time-to-evidence runs (the paper's
    w is 3 too), a LoRA's the `--w 3` runs."""
    found = scores(BASE_FILES, FORMER, MODES, kinds=("dreambooth",))
    for cell, seeds in scores(("selection_lora_w3.json", "selection_lora_w3_heldout.json"), FORMER, MODES).items():
        found.setdefault(cell, {}).update(seeds)
    return found


@functools.cache  # the tables and the plot ask for the same settings again
def setting_scores(setting: tuple) -> dict:
    return former_scores() if setting == FORMER else budget_scores(setting)


def compare(paper: dict, ours: dict, seeds) -> tuple | None:
    """(the paper's and our mean (AS, A-ESR0.6), the mean and the worst per-seed AS difference, the paper's
    seed spread (max - min)) over `seeds`; None unless both ran every seed."""
    if not all(s in ours and s in paper for s in seeds):
        return None
    theirs, mine = [paper[s] for s in seeds], [ours[s] for s in seeds]
    diffs = [a[0] - b[0] for a, b in zip(mine, theirs)]
    spread = max(t[0] for t in theirs) - min(t[0] for t in theirs)
    return theirs, mine, statistics.fmean(diffs), min(diffs), spread


def default_table() -> str:
    """One row per cell and seed group: the paper's and the default's mean AS, the mean and the worst
    per-seed difference, the paper's seed spread (max - min) over those seeds, mean A-ESR0.6."""
    paper, default = scores(BASE_FILES, PAPER, "size"), setting_scores(DEFAULT)
    lines = [
        "| cell | seeds | the paper's AS | the default's AS | difference: mean, worst seed | the paper's spread "
        "| A-ESR0.6: the paper's, the default's |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in CELLS:
        for label, seeds in GROUPS.items():
            found = compare(paper.get(cell, {}), default.get(cell, {}), seeds)
            if found is None:
                continue
            theirs, ours, mean, worst, spread = found
            lines.append(
                f"| {cell} | {label} | {_mean(theirs, 0):.3f} | {_mean(ours, 0):.3f} | {mean:+.3f}, {worst:+.3f} "
                f"| {spread:.3f} | {_mean(theirs, 1):.2f}, {_mean(ours, 1):.2f} |"
            )
    return "\n".join(lines)


def splits_table(group: str = "all 10") -> str:
    """One row per setting of `SPLITS`, one column per cell over the seeds of `GROUPS[group]` (the style
    cells: 0 / 1000 / 2000 only): the mean and the worst per-seed AS difference to the paper's; the last
    row is the paper's seed spread (max - min) over those seeds."""
    paper = scores(BASE_FILES, PAPER, "size")
    seeds_of = {cell: GROUPS[group if cell.split(":")[0] != "style" else "0, 1000, 2000"] for cell in CELLS}
    lines = [
        "| DPM-Solver++ 2M steps x N | UNet evaluations | " + " | ".join(CELLS) + " |",
        "|---" * (len(CELLS) + 2) + "|",
    ]
    spreads = {}
    for setting in SPLITS:
        values = []
        for cell in CELLS:
            found = compare(paper.get(cell, {}), setting_scores(setting).get(cell, {}), seeds_of[cell])
            values.append("-" if found is None else f"{found[2]:+.3f}, {found[3]:+.3f}")
            if found is not None:
                spreads[cell] = found[4]
        name = f"{setting[1]} x {setting[2]}" + {DEFAULT: " (the default)", FORMER: " (the former default)"}.get(
            setting, ""
        )
        lines.append(f"| {name} | {setting[1] * setting[2] * 2:,} | " + " | ".join(values) + " |")
    lines.append(
        "| the paper's seed spread | 25,000 | "
        + " | ".join(f"{spreads[c]:.3f}" if c in spreads else "-" for c in CELLS)
        + " |"
    )
    return "\n".join(lines)


def plot(path: Path) -> Path:
    """The mean AS difference to the paper's (over every seed of a cell, as `splits_table("all 10")`) against
    UNet evaluations: one panel per cell, one line per step count over N = 50, 60, 80, 100; the paper's
    mean at 0, the goal's -0.01 dashed, the tenth of the paper's work dotted; the former default black,
    the default starred."""
    from finextract.report import new_figure, save_plot

    paper = scores(BASE_FILES, PAPER, "size")
    seeds_of = {cell: GROUPS["all 10" if cell.split(":")[0] != "style" else "0, 1000, 2000"] for cell in CELLS}
    steps_counts = sorted({run["steps"] for run in runs(BUDGET_FILE)})
    sizes = sorted({row["N"] for run in runs(BUDGET_FILE) for row in run["prefix_scores"]})
    fig = new_figure(11.0, 6.0)
    axes = fig.subplots(2, 3).ravel()

    def difference(setting, cell):
        found = compare(paper.get(cell, {}), setting_scores(setting).get(cell, {}), seeds_of[cell])
        return None if found is None else found[2]

    for ax, cell in zip(axes, CELLS):
        for steps in steps_counts:
            points = [(steps * n * 2, difference(("dpmpp-2m", steps, n), cell)) for n in sizes]
            points = [(x, y) for x, y in points if y is not None]
            ax.plot(*zip(*points), marker="o", label=f"DPM-Solver++ 2M {steps}, N = {sizes[0]}-{sizes[-1]}")
        for setting, style in ((FORMER, dict(color="black", marker="s")), (DEFAULT, dict(color="red", marker="*"))):
            y = difference(setting, cell)
            if y is not None:
                name = "the former default" if setting == FORMER else "the default"
                ax.scatter([setting[1] * setting[2] * 2], [y], s=120, zorder=3, label=name, **style)
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.axhline(-0.01, color="grey", linewidth=1, linestyle="--")
        ax.axvline(PAPER[1] * PAPER[2] * 2 / 10, color="grey", linewidth=1, linestyle=":")
        ax.set_title(f"{cell.replace(':', ' ')} ({len(seeds_of[cell])} seeds)")
        ax.grid(alpha=0.3)
    for ax in axes[3:]:
        ax.set_xlabel("UNet evaluations per extraction (N0 = 5)")
    for ax in axes[::3]:
        ax.set_ylabel("AS - the paper's AS (mean)")
    axes[0].legend(fontsize=7)
    return save_plot(fig, path)


def _mean(pairs, index: int) -> float:
    return statistics.fmean(p[index] for p in pairs)


def selection_table() -> str:
    """`size` against `modes` on the same images (the paper's w), at the former default's setting and at the
    paper's, per cell and seed set: mean AS (and A-ESR0.6 at the former default's setting)."""
    lines = [
        "| cell | seeds | former default setting: `size` -> `modes` AS | A-ESR0.6 | paper setting: `size` -> `modes` AS |",
        "|---|---|---|---|---|",
    ]
    at = {setting: {rule: scores(BASE_FILES, setting, rule) for rule in ("size", MODES)} for setting in (FORMER, PAPER)}
    for cell in at[FORMER]["size"]:
        for label, seeds in GROUPS.items():
            pick = {
                (setting, rule): [
                    at[setting][rule].get(cell, {})[s] for s in seeds if s in at[setting][rule].get(cell, {})
                ]
                for setting in (FORMER, PAPER)
                for rule in ("size", MODES)
            }
            if any(len(v) != len(seeds) for (setting, _), v in pick.items() if setting == FORMER):
                continue
            size, modes = pick[FORMER, "size"], pick[FORMER, MODES]
            paper = (
                f"{_mean(pick[PAPER, 'size'], 0):.3f} -> {_mean(pick[PAPER, MODES], 0):.3f}"
                if len(pick[PAPER, "size"]) == len(seeds)
                else "-"
            )
            lines.append(
                f"| {cell} | {label} | {_mean(size, 0):.3f} -> {_mean(modes, 0):.3f} "
                f"({_mean(modes, 0) - _mean(size, 0):+.3f}) | {_mean(size, 1):.2f} -> {_mean(modes, 1):.2f} | {paper} |"
            )
    return "\n".join(lines)


def w_table() -> str:
    """A LoRA's former default procedure ("modes") at each w: mean AS per cell and seed group ("-": not run)."""
    by_w = {
        w: scores((f"selection_lora_w{w}.json", f"selection_lora_w{w}_heldout.json"), FORMER, MODES) for w in (2, 3, 4)
    }
    by_w[PAPER_W] = scores(BASE_FILES, FORMER, MODES, kinds=("lora",))  # the time-to-evidence runs: the paper's w
    columns = [
        ("object:lora", GROUPS["0, 1000, 2000"]),
        ("style:lora", GROUPS["0, 1000, 2000"]),
        ("object:lora", GROUPS["3000-9000"]),
        ("heldout:lora", GROUPS["all 10"]),
    ]
    head = " | ".join(f"{cell}, seeds {min(seeds)}-{max(seeds)}" for cell, seeds in columns)
    lines = [f"| w | {head} |", "|---" * (len(columns) + 1) + "|"]
    for w, cells in by_w.items():
        values = []
        for cell, seeds in columns:
            found = [cells[cell][s] for s in seeds if s in cells.get(cell, {})]
            values.append(f"{_mean(found, 0):.3f}" if len(found) == len(seeds) else "-")
        lines.append(f"| {w:g}{' (the paper)' if w == PAPER_W else ''} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", type=Path, default=None, help="also draw the settings' AS difference to this PNG")
    args = parser.parse_args()
    if args.plot:
        print(f"plot: {plot(args.plot)}")
    print(default_table())
    print()
    print(splits_table("0, 1000, 2000"))
    print()
    print(splits_table("all 10"))
    print()
    print(selection_table())
    print()
    print(w_table())


if __name__ == "__main__":
    main()
