"""finextract: extract the fine-tuning images of a personalized diffusion model.

FineXtract (Wu, Zhang & Wu, "Leveraging Model Guidance to Extract Training Data from Personalized
Diffusion Models", ICML 2025, PMLR 267:68060-68077): guide generation from the pretrained model's noise prediction
towards the fine-tuned model's, generate N = 50 x N0 images, embed them with SSCD and return the
N0 largest cliques of the similarity graph.

`import finextract` is cheap: the public names below are resolved on first use, so no torch,
diffusers or GPU library is imported until it is needed.
"""

from __future__ import annotations

import importlib
import os

# OpenMP threads that spin while waiting collapse when a neighbour process holds a core: measured
# here, a tiny UNet forward at 2 threads took 2.8 s with a busy neighbour and 0.09 s with passive
# waiting (1 thread: 0.08 s). Must be set before torch loads its OpenMP runtime; a user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> module that defines it (one place for each concept)
_EXPORTS = {
    "load_model_pair": "finextract.engine.loading",
    "ModelPair": "finextract.engine.pair",
    "build_zoo": "finextract.zoo.build",
    "RunConfig": "finextract.engine.config",
    "ExtractionSpec": "finextract.spec",
    "GuidanceRule": "finextract.engine.guidance",
    "Term": "finextract.engine.guidance",
    "GuidedDenoiser": "finextract.engine.denoiser",
    "Sampler": "finextract.engine.sampler",
    "generate": "finextract.generation",
    "GenerationResult": "finextract.generation",
    "rule_for": "finextract.rules",
    "cluster_descriptors": "finextract.clustering",
    "ClusteringResult": "finextract.clustering",
    "extraction_metrics": "finextract.metrics",
    "load_embedder": "finextract.sscd",
    "Extractor": "finextract.extract",
    "audit": "finextract.fleet",
    "run_sweep": "finextract.sweep",
    "finetune": "finextract.finetuning",
    "build_trained_zoo": "finextract.zoo.trained",
    "default_zoo_folder": "finextract.zoo.trained",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'finextract' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
