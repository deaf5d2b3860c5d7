"""Cost of the evidence records at SD 1.x size: sha256 of a 3.4 GB checkpoint, first time and cached.

    FINEXTRACT_THREADS=1 python -m pytest bench/bench_hash.py -q --benchmark-enable \
        --benchmark-json=bench/results/hash_pytest.json
    python bench/bench_hash.py                 # writes bench/results/hash.json
    python bench/bench_hash.py --gb 1.7        # a smaller file (e.g. the SD 1.x UNet in fp16)

The file is `SIZE` bytes (the SD 1.x UNet in fp32: 859.5 M parameters x 4 B), written once to a
temporary folder (`$FINEXTRACT_BENCH_MODELS`, default under the system temporary directory) and
removed at the end. Three timings, each of `finextract.evidence.HashCache.sha256`:

- "first, evicted": the file's pages dropped from the page cache first (`posix_fadvise DONTNEED` on
  this file only), so the bytes come from the disk: a run whose checkpoint is not in memory.
- "first, page cache": the bytes in memory: what a run costs, since the checkpoint was just loaded
  (the records are written after the models load).
- "cached": a later run, the digest read from `hashes.json` by (real path, size, mtime_ns); also with
  a full cache file (`CACHE_ENTRIES` = 4096 entries, ~0.5 MB of JSON parsed per lookup).

SHA-256 throughput is the CPU's (one core); hashlib uses OpenSSL's (SHA-NI where the CPU has it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finextract.evidence import HashCache, machine_record  # noqa: E402

#: Bytes of the SD 1.x UNet's weights in fp32 (859.5 M parameters).
SIZE = 859_520_964 * 4
BLOCK = 64 << 20


def write_file(path: Path, size: int) -> Path:
    """`size` bytes of pseudo-random data (one 64 MiB random block, repeated; SHA-256 does not care)."""
    if path.is_file() and path.stat().st_size == size:
        return path
    block = os.urandom(BLOCK)
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            count = min(BLOCK, size - written)
            handle.write(block[:count])
            written += count
    return path


def evict(path: Path) -> None:
    """Drop `path`'s pages from the page cache (Linux; a no-op where posix_fadvise is missing)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure(path: Path, cache_dir: Path, lookups: int = 200) -> dict:
    size = path.stat().st_size
    rows = {}
    for name, drop in (("first_evicted", True), ("first_page_cache", False)):
        (cache_dir / "hashes.json").unlink(missing_ok=True)
        if drop:
            evict(path)
        else:
            with open(path, "rb") as handle:  # make sure every page is in memory
                while handle.readinto(bytearray(BLOCK)):
                    pass
        started = time.perf_counter()
        cache = HashCache(cache_dir)
        cache.sha256(path)
        cache.save()
        seconds = time.perf_counter() - started
        rows[name] = {"seconds": round(seconds, 3), "GB_per_s": round(size / seconds / 1e9, 3)}
    times = []
    for _ in range(lookups):  # each a new run: read hashes.json, stat the file
        started = time.perf_counter()
        HashCache(cache_dir).sha256(path)
        times.append(time.perf_counter() - started)
    rows["cached"] = {"median_ms": round(statistics.median(times) * 1e3, 4), "max_ms": round(max(times) * 1e3, 4)}
    # a full cache (CACHE_ENTRIES files hashed before): the JSON file is parsed on each lookup
    entries = json.loads((cache_dir / "hashes.json").read_text())
    fake = {f"/models/m{i:05d}/unet.safetensors": {"size": i, "mtime_ns": i, "sha256": "0" * 64} for i in range(4095)}
    entries["files"] = {**fake, **entries["files"]}
    (cache_dir / "hashes.json").write_text(json.dumps(entries))
    times = []
    for _ in range(max(lookups // 10, 5)):
        started = time.perf_counter()
        HashCache(cache_dir).sha256(path)
        times.append(time.perf_counter() - started)
    rows["cached_full_cache"] = {"entries": 4096, "median_ms": round(statistics.median(times) * 1e3, 3)}
    return {"bytes": size, **rows}


def _folder() -> Path:
    folder = Path(os.environ.get("FINEXTRACT_BENCH_MODELS") or Path(tempfile.gettempdir()) / "finextract-bench-hash")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_hash_sd1_unet(benchmark, tmp_path):
    """pytest-benchmark: the cached lookup (many rounds); the first hash once, in extra_info."""
    path = write_file(_folder() / "unet_fp32.bin", SIZE)
    try:
        cache = HashCache(tmp_path)
        started = time.perf_counter()
        digest, size = cache.sha256(path)
        first = time.perf_counter() - started
        cache.save()
        benchmark.extra_info.update(bytes=size, first_seconds=first, first_GB_per_s=size / first / 1e9)
        assert benchmark(lambda: HashCache(tmp_path).sha256(path)) == (digest, size)
    finally:
        path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=SIZE / 1e9, help="file size in GB (default: SD 1.x UNet, fp32)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "hash.json"))
    args = parser.parse_args()
    folder = _folder()
    path = folder / "unet_fp32.bin"
    started = time.perf_counter()
    write_file(path, int(args.gb * 1e9))
    write_seconds = time.perf_counter() - started
    try:
        result = measure(path, folder)
    finally:
        path.unlink(missing_ok=True)
        (folder / "hashes.json").unlink(missing_ok=True)
    result.update(
        command="python bench/bench_hash.py" + (f" --gb {args.gb}" if args.gb != SIZE / 1e9 else ""),
        write_seconds=round(write_seconds, 2),
        machine={**machine_record(), "cores": os.cpu_count(), "python": platform.python_version()},
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
