"""Fleet audits: rows per minute and base loads, and what keeping the base loaded saves at SD 1.x size.

    FINEXTRACT_THREADS=2 python -m pytest bench/bench_fleet.py -q --benchmark-enable \
        --benchmark-json=bench/results/fleet_pytest.json      # summary: bench/results/fleet.json

1. Six tiny LoRAs on one base (the random tiny zoo's base; six LoRA files from seeds 0-5; N0 = 2,
   N = 16, 10 DDIM steps, torch backend), in one run, each way `ROUNDS` times into fresh folders:
   - `sequential`: what users do today, one `Extractor(base, lora=...)` per checkpoint (the base is
     loaded for every row), 2 threads;
   - `audit_local`: `finextract.audit(executor="local")`, 2 threads (the base loaded once);
   - `audit_ray`: `finextract.audit` on a local Ray instance, 2 workers of 1 thread each (the base
     loaded once per worker); the Ray instance is started once, outside the timing (as a cluster
     that is up already; its start time is recorded), and each audit starts its worker processes.
2. At SD 1.x size (`bench_load.write_models`: the SD 1.x UNet, 3.4 GB of safetensors, a rank-4 LoRA
   on every attention projection): `load_base` (what a worker pays once per base), `load_model_pair`
   from disk (what each row pays without reuse), `load_model_pair` on the loaded base (with reuse: the
   LoRA read and `copy_sharing_weights` of the base UNet), that copy alone, and a full `copy.deepcopy`
   of the UNet (the alternative it replaced); from the medians, the time base reuse saves for 100 LoRA
   rows on one worker. Every load after the warm-up reads the files from the page cache.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import MODELS, write_models

ROUNDS = int(os.environ.get("FINEXTRACT_BENCH_ROUNDS", "3"))
NUM_LORAS = 6
ROW = {"n0": 2, "num_images": 16, "steps": 10}
CAPTION = "a photo of sks dog"
RESULTS: dict = {"fleet": {}, "sd1": {}}  # this run's measurements, merged into bench/results/fleet.json


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@pytest.fixture(scope="module", autouse=True)
def _summary():
    before = _load_average()
    yield
    after = _load_average()
    sd1 = RESULTS["sd1"]
    if {"load_base", "pair_from_disk", "pair_from_loaded_base"} <= set(sd1):
        per_row_saved = sd1["pair_from_disk"]["median_s"] - sd1["pair_from_loaded_base"]["median_s"]
        sd1["saved_per_row_s"] = round(per_row_saved, 2)
        sd1["saved_for_100_lora_rows_one_worker_s"] = round(100 * per_row_saved - sd1["load_base"]["median_s"], 1)
    path = Path(__file__).with_name("results") / "fleet.json"
    report = json.loads(path.read_text()) if path.is_file() else {}  # a run of one part keeps the other's
    for part in ("fleet", "sd1"):
        if RESULTS[part]:
            report[part] = {**RESULTS[part], "load_average_before_after": [before, after], "rounds": ROUNDS}
    if not any(RESULTS.values()):
        return
    path.parent.mkdir(exist_ok=True)
    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    report["what"] = __doc__.split("\n\n", 2)[2].strip()
    path.write_text(json.dumps(report, indent=2))


def _record(benchmark, table: dict, name: str, **extra) -> None:
    if benchmark.disabled or benchmark.stats is None:
        return
    stats = benchmark.stats.stats
    table[name] = {
        "median_s": round(stats.median, 3),
        "min_s": round(stats.min, 3),
        "max_s": round(stats.max, 3),
        "rounds": stats.rounds,
        **extra,
    }


# --- 1. six tiny LoRAs on one base ---


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The random tiny zoo's base, six LoRA files and their manifest."""
    from finextract.zoo.build import build_zoo
    from finextract.zoo.models import tiny_components, zoo_lora
    from finextract.zoo.writers import write_lora_diffusers

    folder = tmp_path_factory.mktemp("fleet")
    zoo = build_zoo(folder / "zoo")
    base = tiny_components(0, tokenizer_folder=folder / "tokenizer")
    lines = ["id,base,lora,caption,n0,num_images,steps"]
    for i in range(NUM_LORAS):
        unet_layers, text_layers = zoo_lora(base["unet"], base["text_encoder"], seed=i)
        write_lora_diffusers(folder / f"lora{i}", unet_layers, text_layers)
        lora = folder / f"lora{i}" / "pytorch_lora_weights.safetensors"
        lines.append(f"lora{i},{zoo / 'base'},{lora},{CAPTION},{ROW['n0']},{ROW['num_images']},{ROW['steps']}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = time.perf_counter()
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False)
    RESULTS["fleet"]["ray_start_s"] = round(time.perf_counter() - started, 2)
    yield ray
    ray.shutdown()


def _fresh(tmp_path: Path):
    rounds = iter(range(10**6))
    return lambda: tmp_path / f"round{next(rounds)}"


@pytest.mark.parametrize("way", ["sequential", "audit_local", "audit_ray"])
def test_six_loras_on_one_base(benchmark, fleet, tmp_path, way, request):
    from finextract import audit
    from finextract.extract import Extractor
    from finextract.fleet import read_manifest

    benchmark.group = "fleet-6-loras"
    rows = read_manifest(fleet / "manifest.csv")
    run = {"backend": "torch", "device": "cpu", "batch_size": 16}
    folder = _fresh(tmp_path)
    loads = {}

    if way == "sequential":

        def once():
            out = folder()
            for row in rows:  # one Extractor per checkpoint: the base is read from disk every time
                extractor = Extractor(row.base, lora=row.lora, threads=2, **run)
                extractor.extract(
                    row.caption, row.n0, num_images=row.num_images, steps=row.steps, out=out / row.id, progress=False
                )
            loads["base_loads"] = len(rows)

    else:
        options = {"executor": "local", "threads": 2} if way == "audit_local" else {"workers": 2, "threads": 1}
        if way == "audit_ray":
            request.getfixturevalue("ray_cluster")

        def once():
            summary = audit(fleet / "manifest.csv", folder(), progress=False, **options, **run)
            assert summary["audit"]["counts"]["done"] == len(rows), summary["rows"]
            loads["base_loads"] = summary["audit"]["base_loads"]

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    if benchmark.disabled or benchmark.stats is None:
        return
    _record(
        benchmark,
        RESULTS["fleet"],
        way,
        rows=len(rows),
        rows_per_minute=round(60 * len(rows) / benchmark.stats.stats.median, 2),
        base_loads=loads["base_loads"],
        threads="2 workers x 1 thread" if way == "audit_ray" else "1 process x 2 threads",
    )


# --- 2. SD 1.x size: one base load, and a LoRA pair with and without the loaded base ---


@pytest.fixture(scope="module")
def sd1():
    return write_models(MODELS)


@pytest.fixture(scope="module")
def sd1_base(sd1):
    from finextract.engine.loading import load_base

    loaded = load_base(sd1 / "base")
    yield loaded
    del loaded
    gc.collect()


@pytest.mark.parametrize(
    "what", ["load_base", "pair_from_disk", "pair_from_loaded_base", "copy_sharing_weights", "deepcopy_unet"]
)
def test_sd1_base_reuse(benchmark, sd1, what, request):
    from finextract.engine.loading import copy_sharing_weights, load_base, load_model_pair

    benchmark.group = "sd1-base-reuse"
    lora = sd1 / "lora" / "pytorch_lora_weights.safetensors"
    loaded = None if what in ("load_base", "pair_from_disk") else request.getfixturevalue("sd1_base")
    work = {
        "load_base": lambda: load_base(sd1 / "base"),
        "pair_from_disk": lambda: load_model_pair(sd1 / "base", lora=lora),
        "pair_from_loaded_base": lambda: load_model_pair(loaded, lora=lora),
        "copy_sharing_weights": lambda: copy_sharing_weights(loaded.parts["unet"]),
        "deepcopy_unet": lambda: copy.deepcopy(loaded.parts["unet"]),
    }[what]

    kept = []

    def free():  # before each round, outside the timing: at most one extra SD UNet in memory
        kept.clear()
        gc.collect()

    work()  # warm-up: imports and the page cache (every later load reads the files from memory)
    started = time.perf_counter()
    benchmark.pedantic(lambda: kept.append(work()), setup=free, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    free()
    _record(benchmark, RESULTS["sd1"], what, wall_s=round(time.perf_counter() - started, 1))
