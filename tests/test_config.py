"""The run configuration (resolved once, then read) and the layering it lets the code keep."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from finextract.engine.config import IMAGE_SETTINGS, RunConfig, run_config

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_fills_auto_and_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("FINEXTRACT_THREADS", "3")
    monkeypatch.setenv("FINEXTRACT_CACHE", str(tmp_path))
    config = RunConfig.resolve(device="cpu")
    assert config.backend == "openvino"  # "auto" on a CPU
    assert (config.threads, config.cache_dir, config.dtype, config.vae_dtype) == (3, str(tmp_path), "fp32", "fp32")
    assert (config.batch_size, config.steps, config.seed, config.cuda_graphs) == (16, 50, 0, True)
    assert config.scheduler == "ddim" and "scheduler" in config.image_settings()  # it changes the images
    assert RunConfig.resolve(device="cpu", backend="torch", dtype="float32").dtype == "fp32"
    record = config.to_dict()
    assert set(record) == {
        "device",
        "dtype",
        "vae_dtype",
        "backend",
        "threads",
        "batch_size",
        "steps",
        "scheduler",
        "seed",
        "cache_dir",
        "cuda_graphs",
    }
    assert set(config.image_settings()) == set(IMAGE_SETTINGS) <= set(record)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(dtype="fp16"), "--dtype fp16 needs a CUDA device"),
        (dict(vae_dtype="bf16"), "--vae-dtype bf16 needs a CUDA device"),
        (dict(dtype="int8"), "--dtype 'int8'"),
        (dict(backend="jax"), "--backend 'jax'"),
        (dict(backend="tensorrt"), "tensorrt needs a CUDA device"),
        (dict(batch_size=0), "--batch-size 0"),
        (dict(steps=0), "the paper uses 50"),
        (dict(scheduler="heun"), "--scheduler 'heun': expected one of ddim, dpmpp-2m, unipc, euler"),
        (dict(seed="1"), "--seed"),
        (dict(threads=0), "threads=0"),
        (dict(device="tpu"), "--device 'tpu'"),
    ],
)
def test_resolve_names_the_bad_setting(options, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.resolve(**{"device": "cpu", **options})


def test_field_defaults_are_resolves_and_the_options_and_fleet_take_them():
    """One source of run settings: RunConfig's field defaults equal resolve()'s keyword defaults, and
    the argparse options and the fleet's row settings read them from there."""
    import argparse
    import inspect

    from finextract.commands.options import add_runtime_options, add_sampling_options
    from finextract.fleet import RUN_DEFAULTS
    from finextract.fleet.manifest import Row
    from finextract.fleet.worker import FleetSettings, row_key

    defaults = RunConfig.defaults()
    keywords = {name: parameter.default for name, parameter in inspect.signature(RunConfig.resolve).parameters.items()}
    assert defaults == keywords and defaults["device"] == "auto" and defaults["threads"] is None
    assert RunConfig() == RunConfig(**defaults) and defaults == RUN_DEFAULTS
    parser = argparse.ArgumentParser()
    add_sampling_options(parser)
    add_runtime_options(parser)
    args = vars(parser.parse_args(["--caption", "c", "--n0", "1"]))
    # --steps is the procedure preset's (None: `run_config_from` fills it in; tests/test_spec.py)
    from finextract.spec import RUN_PRESET_SETTINGS

    assert all(args[name] is None for name in RUN_PRESET_SETTINGS)
    assert {name: args[name] for name in defaults if name in args and name not in RUN_PRESET_SETTINGS} == {
        name: value for name, value in defaults.items() if name in args and name not in RUN_PRESET_SETTINGS
    }
    assert {"device", "dtype", "backend", "threads", "batch_size", "steps", "seed", "cuda_graphs"} <= set(args)
    choices = {action.dest: action.choices for action in parser._actions}
    assert choices["backend"] == ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
    assert choices["dtype"] == ("fp32", "fp16", "bf16")
    # the fleet's key holds exactly the settings that change the images, as the generation manifest does
    row = Row(line=2, id="a", base="b", finetuned=None, lora="l", caption="c", n0=1)
    assert set(row_key(row, FleetSettings(out="o", run_options=RUN_DEFAULTS))["run"]) == set(IMAGE_SETTINGS)


def test_replace_validates_again_and_run_config_is_the_one_entry():
    config = RunConfig.resolve(device="cpu", backend="torch", threads=1)
    assert config.replace(steps=10).steps == 10 and config.replace(steps=10).backend == "torch"
    with pytest.raises(ValueError, match="--steps 0"):
        config.replace(steps=0)
    with pytest.raises(ValueError, match="unknown run setting"):
        config.replace(guidance=3)
    assert run_config(config) is config
    assert run_config(None, device="cpu", backend="torch", threads=1) == config
    assert run_config(config, seed=4).seed == 4
    with pytest.raises(AttributeError):
        config.steps = 3  # frozen


def _imports(path: Path) -> list[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = {"engine": "finextract.engine", "kernels": "finextract.kernels"}[path.relative_to(ROOT).parts[0]]
    if len(path.relative_to(ROOT).parts) > 2:  # a sub-package such as engine/backends
        package += "." + ".".join(path.relative_to(ROOT).parts[1:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module)
    return names


def test_engine_and_kernels_import_nothing_from_the_method_layer():
    """Layers, bottom up: kernels <- engine <- finextract's method modules; never the other way."""
    # finextract.toplevel: standard library only, the guard both folders' __init__ run when found under
    # their own top-level names (it keeps them from shadowing installed packages)
    allowed = {
        "engine": ("finextract.engine", "finextract.kernels", "finextract.toplevel"),
        "kernels": ("finextract.kernels", "finextract.toplevel"),
    }
    offenders = []
    for layer, prefixes in allowed.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            for name in _imports(path):
                if name.startswith("finextract") and not name.startswith(prefixes):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_import_finextract_is_cheap():
    code = "import sys, finextract, finextract.engine.config; print(sorted(m for m in ('torch', 'cupy', 'diffusers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
