"""`finextract env`: what a bug report needs: versions, backends, machine, cache.

    finextract env            # readable
    finextract env --json     # the same as one JSON object

Every probe runs on its own: a library that is missing reads "not installed", one that fails to
import or to answer reads "error: <type>: <message>", and the command still prints the rest.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from pathlib import Path

from .options import add_command

#: Libraries reported, in order: import name (their distributions differ for some, e.g. cupy-cuda12x).
LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "kernels",
    "peft",
    "numpy",
    "onnx",
    "onnxruntime",
    "openvino",
    "safetensors",
    "numba",
    "ray",
    "cupy",
    "tensorrt",
)
NOT_INSTALLED = "not installed"


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "env",
        run,
        help="versions, backends, machine and cache folder (paste it into a bug report)",
        description="Print finextract's, Python's and each library's version, the backends this machine offers "
        "(onnxruntime providers, OpenVINO devices, TensorRT, CUDA devices), the CPU and threads setting, and the "
        "cache folder with its size. A missing or broken library is reported, never fatal.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _error(error: BaseException) -> str:
    return f"error: {type(error).__name__}: {error}".strip()


def _import(name: str):
    """(module, None), or (None, NOT_INSTALLED / "error: ...")."""
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as error:
        if error.name == name or (error.name or "").startswith(name + "."):
            return None, NOT_INSTALLED
        return None, _error(error)
    except Exception as error:  # a broken install (missing shared library, version clash, ...)
        return None, _error(error)


def library_version(name: str) -> str:
    """The version of library `name` as it imports here (its `__version__`, else its distribution's
    metadata), or "not installed", or "error: <type>: <message>" when importing it fails."""
    module, problem = _import(name)
    if module is None:
        return problem
    version = getattr(module, "__version__", None)
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version(name)
        except Exception:
            version = "unknown (no __version__)"
    return str(version)


def _probe(function):
    """function() or {"error": ...}: one failing backend never hides the others."""
    try:
        return function()
    except Exception as error:
        return {"error": _error(error)}


def _onnxruntime() -> dict:
    module, problem = _import("onnxruntime")
    return {"available": False, "why": problem} if module is None else {"providers": module.get_available_providers()}


def _openvino() -> dict:
    module, problem = _import("openvino")
    return (
        {"available": False, "why": problem} if module is None else {"devices": list(module.Core().available_devices)}
    )


def _tensorrt() -> dict:
    module, problem = _import("tensorrt")
    return {"importable": False, "why": problem} if module is None else {"importable": True}


def _cuda() -> dict:
    torch, problem = _import("torch")
    if torch is None:
        return {"available": False, "why": f"torch {problem}"}
    if not torch.cuda.is_available():
        return {"available": False, "torch_cuda": torch.version.cuda, "devices": []}
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return {"available": True, "torch_cuda": torch.version.cuda, "devices": devices}


def _system() -> dict:
    from finextract.engine.config import THREADS_ENV, default_threads

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = _probe(default_threads)
    return {
        "os": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable,
        "threads": threads,
        "threads_env": os.environ.get(THREADS_ENV),
    }


def folder_size(folder: str | Path) -> tuple[int, int]:
    """(bytes, files) of every regular file below `folder` (links not followed); (0, 0) if absent."""
    total = files = 0
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                stat = os.lstat(path)
            except OSError:
                continue
            if not os.path.islink(path):
                total += stat.st_size
                files += 1
    return total, files


def _cache() -> dict:
    from finextract.engine.config import CACHE_ENV, default_cache_dir

    folder = default_cache_dir()
    size, files = folder_size(folder)
    return {
        "folder": str(folder),
        "from": f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "default",
        "exists": folder.is_dir(),
        "bytes": size,
        "files": files,
    }


def environment() -> dict:
    """What `finextract env` reports, as a JSON-ready dict.

    Returns:
        {"finextract": version, "python": {"version", "implementation", "executable"},
         "libraries": {name: version | "not installed" | "error: ..."} for each of `LIBRARIES`,
         "backends": {"onnxruntime": {"providers"}, "openvino": {"devices"}, "tensorrt": {"importable"},
                      "cuda": {"available", "torch_cuda", "devices": [{"index", "name", "capability",
                      "memory_gib"}]}} (a failed probe: {"error": ...}),
         "system": {"os", "machine", "processor", "cpu_cores", "usable_cores", "threads" (what runs
                    use: $FINEXTRACT_THREADS, else the usable cores), "threads_env"},
         "cache": {"folder", "from", "exists", "bytes", "files"}}. Never raises for a missing or
        broken library.
    """
    from finextract import __version__

    return {
        "finextract": __version__,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "libraries": {name: library_version(name) for name in LIBRARIES},
        "backends": {
            "onnxruntime": _probe(_onnxruntime),
            "openvino": _probe(_openvino),
            "tensorrt": _probe(_tensorrt),
            "cuda": _probe(_cuda),
        },
        "system": _probe(_system),
        "cache": _probe(_cache),
    }


def _bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def format_environment(env: dict) -> str:
    """`environment()` as aligned text lines."""
    lines = [
        f"finextract   {env['finextract']}",
        f"python       {env['python']['version']} ({env['python']['executable']})",
    ]
    lines.append("libraries:")
    lines += [f"  {name:<13}{version}" for name, version in env["libraries"].items()]
    lines.append("backends:")
    for name, value in env["backends"].items():
        if "error" in value:
            shown = value["error"]
        elif name == "onnxruntime":
            shown = ", ".join(value["providers"]) if "providers" in value else value["why"]
        elif name == "openvino":
            shown = ", ".join(value["devices"]) if "devices" in value else value["why"]
        elif name == "tensorrt":
            shown = "importable" if value["importable"] else value["why"]
        elif value.get("available"):
            shown = f"CUDA {value['torch_cuda']}: " + "; ".join(
                f"{d['index']}: {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)" for d in value["devices"]
            )
        else:
            shown = value.get("why") or "no CUDA device"
        lines.append(f"  {name:<13}{shown}")
    system = env["system"]
    if "error" in system:
        lines.append(f"system       {system['error']}")
    else:
        threads = system["threads"] if not isinstance(system["threads"], dict) else system["threads"]["error"]
        lines.append(f"system       {system['os']} ({system['machine']})")
        lines.append(
            f"cpu          {system['cpu_cores']} cores, {system['usable_cores']} usable; threads {threads}"
            + (f" (from $FINEXTRACT_THREADS={system['threads_env']})" if system["threads_env"] else "")
        )
    cache = env["cache"]
    if "error" in cache:
        lines.append(f"cache        {cache['error']}")
    else:
        state = f"{_bytes(cache['bytes'])} in {cache['files']} files" if cache["exists"] else "not created yet"
        lines.append(f"cache        {cache['folder']} ({cache['from']}): {state}")
    return "\n".join(lines)


def run(args) -> int:
    env = environment()
    print(json.dumps(env, indent=2) if args.json else format_environment(env))
    return 0
