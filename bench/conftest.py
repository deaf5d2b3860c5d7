"""Benchmarks: pytest-benchmark, results as JSON under bench/results/ (see the Makefile's `bench`).

Thread counts are set deliberately (FINEXTRACT_THREADS, default 2) so that figures do not depend on
torch's default threading, which a busy neighbour process can make 100x slower on a small machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("FINEXTRACT_THREADS", "2")


def pytest_configure(config):
    from finextract.engine.config import set_threads

    set_threads()
