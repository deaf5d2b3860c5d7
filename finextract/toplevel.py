"""Keep the repository's top-level `engine/` and `kernels/` folders from shadowing installed packages.

In a checkout those folders sit beside `finextract/` and install as `finextract.engine` and
`finextract.kernels` (pyproject's `package-dir`). Whenever the repository root is on `sys.path`
(`python -m ...` or pytest started there, a subprocess or a Ray worker started there), Python also
finds them as top-level `engine` and `kernels`, which would shadow the distributions of those names
(transformers >= 5.25 runs `from kernels import CUDAProperties`). Each folder's `__init__.py` calls
`defer_to_installed` when it is imported under its top-level name.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def defer_to_installed(name: str, folder: str) -> None:
    """Replace the module being imported as top-level `name` by what else on `sys.path` provides it.

    Call it from the `__init__.py` of `folder` while that module executes: the import statement then
    returns the installed package (CPython's import returns `sys.modules[name]` after execution).

    Args:
        name: the top-level name being imported ("kernels", "engine").
        folder: the folder of the `__init__.py` that is executing (the one to skip).

    Raises:
        ModuleNotFoundError: nothing else on `sys.path` provides `name`: the same error as if the
            folder were not there.
    """
    ours = os.path.realpath(folder)
    others = [entry for entry in sys.path if os.path.realpath(os.path.join(entry or os.getcwd(), name)) != ours]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
