"""The package installs, imports cheaply, and its CLI lists its commands."""

import subprocess
import sys


def test_import_is_light():
    # `import finextract` must not pull in torch or any GPU library (STYLE: no heavy imports).
    code = "import sys, finextract, finextract.engine, finextract.kernels; print(sorted(m for m in ('torch','cupy','tensorrt','onnxruntime','diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lora_gate_zero_is_base_one_is_merged(tiny_base):
    import copy

    import torch

    from finextract.engine.lora import gated, inject_lora, merge_lora
    from tests.conftest import random_unet_lora

    unet = copy.deepcopy(tiny_base["unet"])
    layers = random_unet_lora(unet, seed=3)
    merged = merge_lora(copy.deepcopy(unet), layers)
    gate = inject_lora(unet, layers)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = tiny_base["unet"](x, 10, text).sample
        merged_out = merged(x, 10, text).sample
        with gated(gate, torch.tensor([0.0, 1.0])):
            mixed = unet(x, 10, text).sample
    assert torch.allclose(mixed[0], base_out[0], atol=1e-5)
    assert torch.allclose(mixed[1], merged_out[1], atol=1e-4)
    assert not torch.allclose(base_out[1], merged_out[1], atol=1e-3)  # the adapters do change the output


def test_cli_lists_every_command():
    from finextract.cli import COMMANDS, build_parser

    help_text = build_parser().format_help()
    missing = [name for name in COMMANDS if name not in help_text]
    assert missing == []


def test_cli_methods_are_the_rules_methods():
    # the CLI keeps its own copy so that parsing imports no torch; it must not drift
    from finextract.commands.options import METHODS as cli_methods
    from finextract.rules import METHODS

    assert tuple(cli_methods) == tuple(METHODS)


def test_every_zoo_weights_folder_is_a_listed_package():
    """Setuptools ships package data only from listed packages (it warns and may drop the others)."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    packages = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = [p for p in (root / "finextract" / "zoo_weights").rglob("*") if p.is_dir()]
    expected = {"finextract.zoo_weights"} | {
        ".".join(p.relative_to(root).parts) for p in folders if not p.name.startswith((".", "__"))
    }
    assert expected <= packages, sorted(expected - packages)


def test_public_names_stay_what_they_export_after_every_module_loads():
    """A submodule named like an export (`finextract.generate` once was both) replaces the export on
    the package when it is imported; each public name must be its object, whatever was imported."""
    code = (
        "import importlib, pkgutil, finextract\n"
        "for m in pkgutil.walk_packages(finextract.__path__, 'finextract.'):\n"
        "    if '.commands' not in m.name: importlib.import_module(m.name)\n"
        "bad = [n for n, mod in finextract._EXPORTS.items()\n"
        "       if getattr(finextract, n) is not getattr(importlib.import_module(mod), n)]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
