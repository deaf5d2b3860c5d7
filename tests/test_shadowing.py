"""No top-level folder of the repository shadows an installed package, from wherever Python starts.

`python -m pytest`, a subprocess or a Ray worker started at the repository root has the root on
`sys.path`, where `engine/` and `kernels/` (installed as `finextract.engine` / `finextract.kernels`)
would otherwise be found as the top-level `engine` and `kernels`. transformers >= 5.25 imports the
`kernels` distribution whenever diffusers loads a model, so a shadowing folder breaks every load.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# our own packages under their own names: the distribution (finextract) and the test helpers (tests)
OWN = {"finextract", "tests"}


def _top_level_names() -> set[str]:
    """Names the repository root offers to `import`: its folders and .py files."""
    names = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier()}
    return names | {p.stem for p in ROOT.glob("*.py")}


def _import_from_root(name: str) -> dict:
    """Import `name` in a fresh interpreter whose working directory (first on sys.path) is the root."""
    code = textwrap.dedent(
        f"""
        import json, sys
        try:
            import {name} as module
        except ModuleNotFoundError as error:
            print(json.dumps({{"missing": error.name}}))
        else:
            locations = [getattr(module, "__file__", None) or "", *getattr(module, "__path__", [])]
            print(json.dumps({{"locations": [str(p) for p in locations if p]}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _inside_repository(location: str) -> bool:
    """A repository file, not one installed in an environment that lives in the checkout (.venv, .venv-latest)."""
    path = Path(location).resolve()
    return path.is_relative_to(ROOT) and not path.is_relative_to(Path(sys.prefix).resolve())


def test_installed_names_win_over_the_repository_root():
    installed = set(importlib.metadata.packages_distributions()) - {"finextract"}
    collisions = sorted((_top_level_names() & installed) - OWN)
    shadowed = {}
    for name in collisions:
        found = _import_from_root(name)
        inside = [p for p in found.get("locations", []) if _inside_repository(p)]
        if inside or "missing" in found:
            shadowed[name] = found
    assert shadowed == {}, f"repository folders shadow installed packages: {shadowed}"


@pytest.mark.parametrize("name", sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in OWN))
def test_no_repository_package_imports_under_its_own_name(name):
    # engine/ and kernels/ import as finextract.engine / finextract.kernels only; any other folder that
    # becomes a package must not be importable as itself from the root either (a folder without
    # __init__.py is at most a namespace portion, which never wins over an installed package)
    found = _import_from_root(name)
    inside = [p for p in found.get("locations", []) if _inside_repository(p)]
    assert inside == [], f"`import {name}` from the repository root found the repository's own {inside}"


def test_our_own_names_collide_with_no_installed_package():
    installed = importlib.metadata.packages_distributions()
    assert {name: installed[name] for name in OWN if set(installed.get(name, ["finextract"])) != {"finextract"}} == {}


@pytest.mark.parametrize("installed", [True, False])
def test_a_guarded_folder_hands_over_to_the_installed_package_or_is_missing(tmp_path, installed):
    """`defer_to_installed` on a stand-in: a checkout folder `pkg/` and, maybe, an installed `pkg`."""
    checkout, site = tmp_path / "checkout", tmp_path / "site"
    (checkout / "pkg").mkdir(parents=True)
    (checkout / "pkg" / "__init__.py").write_text(
        "from finextract.toplevel import defer_to_installed\ndefer_to_installed(__name__, __path__[0])\n"
    )
    (checkout / "pkg" / "own.py").write_text("WHERE = 'checkout'\n")
    if installed:
        (site / "pkg").mkdir(parents=True)
        (site / "pkg" / "__init__.py").write_text("WHERE = 'installed'\n")
    code = (
        f"import sys; sys.path.append({str(site)!r})\n"
        "try:\n    import pkg\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
        "else:\n    print(pkg.WHERE, sys.modules['pkg'] is pkg)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == (["installed", "True"] if installed else ["missing", "pkg"])
