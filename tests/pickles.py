"""Pickle checkpoints as old trainers wrote them, built without their libraries (tests of `--allow-pickle`)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch

MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


def save_lightning_checkpoint(path: Path, tensors: dict, *, zipped: bool = True) -> None:
    """An original-SD-era `.ckpt`: `tensors` under "state_dict" beside PyTorch Lightning's training state
    (the `ModelCheckpoint` class as a dict key, as in the SD 1.x releases, one instance, numpy scalars).

    Written with stand-in `pytorch_lightning` modules in `sys.modules`, removed again before returning
    (Lightning is not installed here), so that reading it cannot import the class.
    """
    module, name = MODEL_CHECKPOINT.rsplit(".", 1)
    parts = module.split(".")
    added = [".".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    assert not any(package in sys.modules for package in added), "Lightning is imported: the test would not test"
    try:
        for package in added:
            sys.modules[package] = types.ModuleType(package)
        model_checkpoint = type(name, (), {"__module__": module})
        setattr(sys.modules[module], name, model_checkpoint)
        callback = model_checkpoint()
        callback.__dict__.update(monitor=None, best_model_score=torch.tensor(0.25), dirpath="/fsx/sd/ckpts")
        checkpoint = {
            "epoch": 6,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": tensors,
            "callbacks": {model_checkpoint: {"monitor": None, "best_k_models": {}, "step": np.int64(470000)}},
            "loops": {"callback": callback},
        }
        torch.save(checkpoint, path, _use_new_zipfile_serialization=zipped)
    finally:
        for package in added:
            sys.modules.pop(package, None)
