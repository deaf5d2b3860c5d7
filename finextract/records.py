"""What every record of a run names: the library versions that change the answer."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import site
import sys
from pathlib import Path

from . import __version__


def library_versions() -> dict:
    """Versions of finextract, Python and every library that changes generated images or their scores.

    Returns:
        name -> version string for finextract, python, torch, diffusers, transformers, numpy, onnx,
        onnxruntime (the exported graphs and the default SSCD model run in it) and openvino (the CPU
        default backend compiles the same graphs).
    """
    import diffusers  # heavy: every library is imported only to read its version
    import numpy
    import onnx
    import onnxruntime
    import openvino
    import torch
    import transformers

    return {
        "finextract": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
    }


def canonical_name(name: str) -> str:
    """A distribution name as PEP 503 normalises it (`Open_CLIP.torch` -> `open-clip-torch`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """Every distribution installed in this environment's site-packages: canonical name -> version
    (importlib.metadata), the editable project itself included (as "finextract").

    Only the site folders count, not every `sys.path` entry: a Ray worker's path also holds Ray's own
    vendored packages, and a process started in a checkout its `*.egg-info`; neither is installed.
    """
    folders = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    versions = {}
    for dist in importlib.metadata.distributions(path=[f for f in folders if Path(f).is_dir()]):
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(canonical_name(name), dist.version)
    return dict(sorted(versions.items()))


def locked_versions(*locks: str | Path) -> dict[str, str]:
    """The exact versions pinned by pip requirement files (the `name==version` lines of `make lock`'s output).

    Args:
        locks: requirement files; lines that pin no `==` version (comments, hashes, options) are skipped.

    Returns:
        canonical name -> version, local version labels kept (`torch` -> "2.13.0+cpu").

    Raises:
        FileNotFoundError: a lock file does not exist.
    """
    versions = {}
    for lock in locks:
        for line in Path(lock).read_text().splitlines():
            match = _PIN.match(line)
            if match:
                versions[canonical_name(match["name"])] = match["version"]
    return versions


_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[^\s;\\]+)")


def version_differences(locked: dict[str, str], installed: dict[str, str] | None = None) -> dict[str, dict]:
    """Where an environment and a lock disagree.

    Args:
        locked: `locked_versions(...)`. installed: `installed_versions()` (default: this environment).

    Returns:
        name -> {"locked": version or None, "installed": version or None}, sorted by name, for each
        distribution whose installed version differs from its pin, that is pinned but missing, or that
        is installed but not pinned (the editable project itself among them); empty when they agree.
    """
    installed = installed_versions() if installed is None else installed
    return {
        name: {"locked": locked.get(name), "installed": installed.get(name)}
        for name in sorted(set(locked) | set(installed))
        if locked.get(name) != installed.get(name)
    }


if __name__ == "__main__":  # `python -m finextract.records LOCK...`: what this environment runs that the lock does not
    differences = version_differences(locked_versions(*sys.argv[1:]))
    print(f"{len(differences)} distribution(s) differ from {', '.join(sys.argv[1:])}:")
    for name, pair in differences.items():
        print(f"  {name}: locked {pair['locked'] or 'no'}, installed {pair['installed'] or 'no'}")
