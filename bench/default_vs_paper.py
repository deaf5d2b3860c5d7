"""The default preset against `--preset paper`, seed by seed, from the replays `bench/adaptive_stop.py --constants`
and `--loco` wrote (nothing is generated here): the tables of docs/results.md#time-to-evidence.

The default is DPM-Solver++ 2M in 25 steps at N = 10 x N0, the "modes" selection and FineXtract's w = 3
for both kinds; the paper's is DDIM 50 at N = 50 x N0, the "size" selection and w = 3 (DreamBooth) / 5
(LoRA). A DreamBooth's default runs are the time-to-evidence runs (the paper's w); a LoRA's are the
`--w 3` runs. Inputs, in bench/results/:

- selection_loco.json: the committed zoo's four cells, seeds 0 / 1000 / 2000 (`--loco`);
- selection_more_seeds.json: its object cells, seeds 3000-9000;
- selection_heldout.json: the held-out DreamBooth and LoRA (`finextract zoo heldout`);
- selection_lora_w{2,3,4}.json (and `_heldout`): the LoRAs' default runs at that w.

    python bench/default_vs_paper.py   # the markdown tables: the default against the paper, size against modes, w
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


BASE_FILES = ("selection_loco.json", "selection_more_seeds.json", "selection_heldout.json")
DEFAULT, PAPER = ("dpmpp-2m", 25, 50), ("ddim", 50, 250)
GROUPS = {"0, 1000, 2000": (0, 1000, 2000), "3000-9000": tuple(range(3000, 10000, 1000))}
GROUPS["all 10"] = GROUPS["0, 1000, 2000"] + GROUPS["3000-9000"]


def default_table() -> str:
    """One row per cell and seed group: the paper's and the default's mean AS, the mean and the worst
    per-seed difference, the paper's seed spread (max - min) over those seeds, mean A-ESR0.6."""
    paper = scores(BASE_FILES, PAPER, "size")
    default = scores(BASE_FILES, DEFAULT, MODES, kinds=("dreambooth",))
    for cell, seeds in scores(("selection_lora_w3.json", "selection_lora_w3_heldout.json"), DEFAULT, MODES).items():
        default.setdefault(cell, {}).update(seeds)
    lines = [
        "| cell | seeds | the paper's AS | the default's AS | difference: mean, worst seed | the paper's spread "
        "| A-ESR0.6: the paper's, the default's |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in paper:
        for label, seeds in GROUPS.items():
            common = [s for s in seeds if s in default.get(cell, {}) and s in paper[cell]]
            if len(common) != len(seeds):
                continue
            ours, theirs = [default[cell][s] for s in common], [paper[cell][s] for s in common]
            diffs = [a[0] - b[0] for a, b in zip(ours, theirs)]
            lines.append(
                f"| {cell} | {label} | {_mean(theirs, 0):.3f} | {_mean(ours, 0):.3f} | {statistics.fmean(diffs):+.3f}, "
                f"{min(diffs):+.3f} | {max(t[0] for t in theirs) - min(t[0] for t in theirs):.3f} | "
                f"{_mean(theirs, 1):.2f}, {_mean(ours, 1):.2f} |"
            )
    return "\n".join(lines)


def _mean(pairs, index: int) -> float:
    return statistics.fmean(p[index] for p in pairs)


def selection_table() -> str:
    """`size` against `modes` on the same images (the paper's w), at the default's setting and at the
    paper's, per cell and seed set: mean AS (and A-ESR0.6 at the default's setting)."""
    lines = [
        "| cell | seeds | default setting: `size` -> `modes` AS | A-ESR0.6 | paper setting: `size` -> `modes` AS |",
        "|---|---|---|---|---|",
    ]
    at = {
        setting: {rule: scores(BASE_FILES, setting, rule) for rule in ("size", MODES)} for setting in (DEFAULT, PAPER)
    }
    for cell in at[DEFAULT]["size"]:
        for label, seeds in GROUPS.items():
            pick = {
                (setting, rule): [
                    at[setting][rule].get(cell, {})[s] for s in seeds if s in at[setting][rule].get(cell, {})
                ]
                for setting in (DEFAULT, PAPER)
                for rule in ("size", MODES)
            }
            if any(len(v) != len(seeds) for (setting, _), v in pick.items() if setting == DEFAULT):
                continue
            size, modes = pick[DEFAULT, "size"], pick[DEFAULT, MODES]
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
    """A LoRA's default procedure ("modes") at each w: mean AS per cell and seed group ("-": not run)."""
    by_w = {
        w: scores((f"selection_lora_w{w}.json", f"selection_lora_w{w}_heldout.json"), DEFAULT, MODES) for w in (2, 3, 4)
    }
    by_w[PAPER_W] = scores(BASE_FILES, DEFAULT, MODES, kinds=("lora",))  # the time-to-evidence runs: the paper's w
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
    print(default_table())
    print()
    print(selection_table())
    print()
    print(w_table())


if __name__ == "__main__":
    main()
