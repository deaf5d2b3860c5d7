"""Where the rows run: one after another in this process ("local"), or on Ray actors ("ray").

Both hand each row to a `RowRunner` and report through the same two callbacks, `on_start(row)` and
`on_done(entry)`, so the audit's outputs do not depend on the executor. On Ray, each worker is an
actor holding one GPU (or `threads` CPUs, with torch and onnxruntime set to that many threads); an
idle worker takes the next row with the base it holds, else a row of a base no other worker holds.
A worker process that dies in the middle of a row is restarted by Ray and the row retried
(`max_restarts=-1`, `max_task_retries=retries`); the retry resumes from the row's finished chunks.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import replace

from finextract.cli import quiet_libraries
from finextract.engine.config import default_threads

from .manifest import Row
from .summary import failed_entry
from .worker import FleetSettings, RowRunner

logger = logging.getLogger(__name__)

EXECUTORS = ("ray", "local")


def by_base(jobs: list[tuple[Row, dict]]) -> OrderedDict:
    """Jobs grouped by base, bases in order of first appearance, rows in manifest order within each."""
    groups: OrderedDict = OrderedDict()
    for row, key in jobs:
        groups.setdefault(row.base, deque()).append((row, key))
    return groups


def run_local(settings: FleetSettings, jobs: list[tuple[Row, dict]], on_start: Callable, on_done: Callable) -> dict:
    """Run the jobs in this process, one base after another (each base loaded once).

    Returns:
        {"executor": "local", "workers": 1, "worker_settings": [the resolved settings]}.

    Raises:
        ValueError / FileNotFoundError / RuntimeError: unusable run settings or SSCD model (before any row).
        KeyboardInterrupt: passed on; finished rows and chunks stay on disk.
    """
    runner = RowRunner(settings)
    described = runner.describe()
    for group in by_base(jobs).values():
        for row, key in group:
            on_start(row)
            on_done(runner.run(row, key))
    return {"executor": "local", "workers": 1, "worker_settings": [described]}


class _RayRowRunner(RowRunner):
    """A RowRunner in a Ray worker process: quiets the libraries' progress bars and notices first, as
    `finextract.cli.main` does for a command (the process is ours; its stderr is forwarded to the driver)."""

    def __init__(self, settings: FleetSettings):
        quiet_libraries()
        super().__init__(settings)


def plan_workers(resources: dict, run_options: dict, workers: int | None, rows: int) -> tuple[int, dict, int]:
    """How many Ray workers to start, what each requests, and its thread count.

    A row takes one GPU where the cluster has GPUs (and the device is not "cpu"), else `threads` CPUs
    (default: `FINEXTRACT_THREADS`, else this machine's cores); on GPUs the threads default to the
    cluster's CPUs per GPU. `workers` defaults to as many as the cluster holds, and never exceeds `rows`.

    Returns:
        (workers, Ray actor resource options, threads).

    Raises:
        ValueError: more workers than the cluster can hold, or a cluster without CPUs.
    """
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    device = str(run_options.get("device") or "auto")
    threads = run_options.get("threads")
    if gpus >= 1 and device != "cpu":
        threads = threads or max(1, int(cpus // gpus))
        options, capacity, unit = {"num_gpus": 1, "num_cpus": min(threads, cpus)}, int(gpus), "1 GPU"
    else:
        if cpus < 1:
            raise ValueError(
                "the Ray cluster has no CPUs to run rows on; start its nodes with CPUs (ray start --num-cpus N)"
            )
        threads = threads or default_threads()
        if threads > cpus:
            logger.warning("%d threads per row but the Ray cluster has %d CPUs: using %d", threads, cpus, int(cpus))
            threads = int(cpus)
        options, capacity, unit = {"num_cpus": threads}, max(1, int(cpus // threads)), f"{threads} CPUs"
    if workers is not None and workers > capacity:
        raise ValueError(
            f"--workers {workers}: the Ray cluster holds {capacity} worker(s) of {unit} each "
            f"({cpus:g} CPUs, {gpus:g} GPUs); use --workers {capacity} or fewer, or lower --threads"
        )
    return max(1, min(workers or capacity, rows)), options, threads


def run_ray(
    settings: FleetSettings,
    jobs: list[tuple[Row, dict]],
    on_start: Callable,
    on_done: Callable,
    *,
    address: str | None = None,
    workers: int | None = None,
    retries: int = 2,
    init_options: dict | None = None,
) -> dict:
    """Run the jobs on Ray actors: a local Ray instance by default, or the cluster at `address`.

    Args:
        address: None starts Ray on this machine (`ray.init()`; as Ray does, it joins a cluster that
            `RAY_ADDRESS` or a `ray start` on this machine names); "auto" or "HOST:PORT" joins a running
            cluster. Ignored when this process called `ray.init` already (that cluster is used, and left running).
        workers: number of actors (default: as many as the cluster's GPUs, or its CPUs / threads).
        retries: Ray's `max_task_retries`: how often a row whose worker process died is retried.
        init_options: more `ray.init` keywords (e.g. num_cpus=2, object_store_memory=...) for a local start.

    Returns:
        {"executor": "ray", "ray_address": the cluster's address, "workers": n, "worker_resources": ...,
        "worker_settings": [each worker's resolved settings]}.

    Raises:
        RuntimeError: Ray is not installed.
        ValueError / FileNotFoundError: unusable run settings or SSCD model on the workers (before any row).
        KeyboardInterrupt: passed on after the workers are stopped; finished rows and chunks stay on disk.
    """
    try:
        import ray  # optional: ray, the [fleet] extra
    except ImportError:
        raise RuntimeError(
            "--executor ray needs Ray: pip install 'finextract[fleet]' (or run the rows here with --executor local)"
        ) from None

    started_here = not ray.is_initialized()
    if started_here:
        options = {"include_dashboard": False, **(init_options or {})}
        if address:
            options["address"] = address
        ray.init(**options)
    actors = []
    try:
        count, resources, threads = plan_workers(ray.cluster_resources(), settings.run_options, workers, len(jobs))
        settings = replace(settings, run_options={**settings.run_options, "threads": threads})
        runner_class = ray.remote(_RayRowRunner).options(max_restarts=-1, max_task_retries=retries, **resources)
        actors = [runner_class.remote(settings) for _ in range(count)]
        logger.info("audit: %d Ray worker(s), each with %s", count, ", ".join(f"{k}={v}" for k, v in resources.items()))
        try:
            described = ray.get([actor.describe.remote() for actor in actors])
        except ray.exceptions.RayTaskError as error:  # the settings are unusable: stop before any row
            cause = getattr(error, "cause", None)
            raise (cause if isinstance(cause, Exception) else error) from None
        except ray.exceptions.RayError as error:  # a worker process could not start at all
            raise RuntimeError(
                f"the Ray workers did not start ({type(error).__name__}: {error}); every node needs finextract "
                "installed in the Python that Ray runs"
            ) from None
        queue = by_base(jobs)
        holds: dict[int, str] = {}
        in_flight = {}

        def submit(index: int) -> None:
            base = _next_base(queue, holds, index)
            if base is None:
                return
            row, key = queue[base].popleft()
            holds[index] = base
            on_start(row)
            in_flight[actors[index].run.remote(row, key)] = (index, row)

        for index in range(count):
            submit(index)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            index, row = in_flight.pop(ready[0])
            try:
                entry = ray.get(ready[0])
            except ray.exceptions.RayError as error:  # the worker process died on every attempt
                entry = failed_entry(
                    row, f"the worker died on this row {retries + 1} time(s): {type(error).__name__}: {error}"
                )
            on_done(entry)
            submit(index)
        return {
            "executor": "ray",
            "ray_address": ray.get_runtime_context().gcs_address,
            "workers": count,
            "worker_resources": resources,
            "worker_settings": described,
        }
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()


def _next_base(queue: OrderedDict, holds: dict[int, str], index: int) -> str | None:
    """The base worker `index` runs next: the one it holds while rows of it remain, else the base with the
    most remaining rows that no other worker holds, else the one with the most remaining rows."""
    remaining = [base for base, rows in queue.items() if rows]
    if not remaining:
        return None
    if holds.get(index) in remaining:
        return holds[index]
    others = {base for worker, base in holds.items() if worker != index}
    free = [base for base in remaining if base not in others]
    return max(free or remaining, key=lambda base: len(queue[base]))
