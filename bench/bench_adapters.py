"""Adapters that are not low-rank (LoHa here): merged into a fine-tuned UNet copy, or kept as a delta branch?

    FINEXTRACT_THREADS=1 python -m pytest bench/bench_adapters.py -q --benchmark-enable \
        --benchmark-json=bench/results/adapters_pytest.json

One guided FineXtract step on the tiny zoo, batch `FINEXTRACT_BENCH_BATCH` (default 64), fp32, CPU,
for a LyCORIS LoHa file adapting every attention, feed-forward and convolution module:
- `merged`: what the loader does: the LoHa merged into a copy of the base UNet, a two-UNet pair;
  the sampler's own step (`finextract.benchmarking.build_step`) on torch and on onnxruntime, and
  the UNet work alone (the fine-tuned UNet and the base UNet, one batch each);
- `delta-branch`: the alternative, here only: the base UNet with each adapted module computing
  `base(x) + gate * dW x` (the full delta as a per-sample branch, as the LoRA pair's low-rank
  branch is gated), one forward on the 2B batch (the UNet work of one step);
- `low-rank`: a plain LoRA of the same modules (rank 4) as the loader runs it (one 2B forward with
  `GatedLoRA`s), for scale.
Each row's `extra_info` holds the median latency and images/s for a 50-step image. Also written:
the fidelity of every adapter type against its producer (max |ours - producer| over the largest
output value, the UNet's eps on fixed inputs), the table README's formats section quotes.
A summary goes to bench/results/adapters.json when timing is enabled.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/adapter_fixtures.py: the producers
from finextract.benchmarking import STEPS_PER_IMAGE, build_step, peak_memory_mib
from tests.adapter_fixtures import LYCORIS_CASES, write_lycoris, write_peft

CAPTION = "a photo of sks object"
BATCH = int(os.environ.get("FINEXTRACT_BENCH_BATCH", "64"))
ROUNDS = int(os.environ.get("FINEXTRACT_BENCH_STEPS", "10"))
RESULTS: dict[str, dict] = {}
FIDELITY: dict[str, dict] = {}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from finextract.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def base_models(zoo):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (
        UNet2DConditionModel.from_pretrained(str(zoo / "base/unet")).eval(),
        CLIPTextModel.from_pretrained(str(zoo / "base/text_encoder")).eval(),
    )


@pytest.fixture(scope="module")
def loha(zoo, base_models, tmp_path_factory):
    return write_lycoris(tmp_path_factory.mktemp("loha"), *base_models, "loha", {}, seed=0)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    timed = bool(RESULTS) and all(row.get("step_ms") is not None for row in RESULTS.values())
    if not timed and not FIDELITY:
        return  # timing disabled and no fidelity measured: nothing to record
    path = Path(__file__).with_name("results") / "adapters.json"
    report = json.loads(path.read_text()) if path.is_file() else {}  # a partial run keeps the other section
    report.update(
        machine={
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        models="tiny zoo (UNet 16x16x4 latents, ~1 M parameters), fp32, CPU; LyCORIS LoHa rank 4 on every "
        "attention / feed-forward / convolution module",
        images_per_s_note=f"batch / ({STEPS_PER_IMAGE} x median latency)",
    )
    if timed:
        report["results"] = list(RESULTS.values())
    if FIDELITY:
        report["fidelity"] = FIDELITY
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


class GatedDelta(nn.Module):
    """`base(x) + gate * dW x` for a Linear or Conv2d: a full weight delta as a per-sample branch."""

    def __init__(self, base: nn.Module, delta: torch.Tensor, gate) -> None:
        super().__init__()
        self.base, self.gate = base, gate
        self.register_buffer("delta", delta.to(base.weight.dtype))

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        if isinstance(self.base, nn.Conv2d):
            branch = F.conv2d(x, self.delta, None, self.base.stride, self.base.padding, self.base.dilation)
        else:
            branch = F.linear(x, self.delta)
        return out + self.gate.value.view(-1, *[1] * (branch.dim() - 1)) * branch


def _delta_branch_unet(base_unet, merged_unet, gate):
    """The base UNet with a `GatedDelta` (dW = merged - base) on every module the merge changed."""
    unet = copy.deepcopy(base_unet)
    merged = dict(merged_unet.named_modules())
    modules = dict(unet.named_modules())
    for name, module in list(modules.items()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        delta = merged[name].weight.detach() - module.weight.detach()
        if delta.abs().max() == 0:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else unet, child, GatedDelta(module, delta, gate))
    return unet


def _inputs(batch: int):
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 4, 16, 16, generator=generator),
        torch.tensor(500),
        torch.randn(batch, 77, 32, generator=generator),
    )


def _mib(tensors) -> float:
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2)


def _extra_weights_mib(way: str, pair, lora_pair) -> float:
    """Weights held besides the base UNet: the merged copy, the deltas, or the low-rank factors."""
    if way == "merged":
        return _mib(pair.finetuned_unet.parameters())
    if way == "delta-branch":
        merged = dict(pair.finetuned_unet.named_parameters())
        deltas = [merged[name] - p for name, p in pair.base_unet.named_parameters() if not torch.equal(merged[name], p)]
        return _mib(deltas)
    return _mib([t for layer in lora_pair.unet_lora.values() for t in (layer.down, layer.up)])


def _unet_work(way: str, pair, lora_pair):
    """A callable doing the UNet work of one guided step the `way` way."""
    from finextract.engine.lora import LoRAGate, gated, inject_lora

    x, t, context = _inputs(BATCH)
    x2, context2 = torch.cat([x, x]), torch.cat([context, context])
    gate_values = torch.cat([torch.zeros(BATCH), torch.ones(BATCH)])
    if way == "merged":
        return lambda: (pair.finetuned_unet(x, t, context).sample, pair.base_unet(x, t, context).sample)
    if way == "delta-branch":
        gate = LoRAGate()
        unet = _delta_branch_unet(pair.base_unet, pair.finetuned_unet, gate)
    else:  # low-rank
        unet = copy.deepcopy(lora_pair.base_unet)
        gate = inject_lora(unet, lora_pair.unet_lora)

    def run():
        with gated(gate, gate_values):
            return unet(x2, t, context2).sample

    return run


CASES = [
    ("merged", "step", "torch"),
    ("merged", "step", "onnxruntime"),
    ("merged", "unet", "torch"),
    ("delta-branch", "unet", "torch"),
    ("low-rank", "unet", "torch"),
]


@pytest.mark.parametrize("way, what, backend", CASES)
def test_adapter_step(benchmark, zoo, loha, tmp_path_factory, way, what, backend):
    from finextract.engine.loading import load_model_pair

    benchmark.group = f"adapters-{what}"
    pair = load_model_pair(zoo / "base", lora=loha.path)
    assert pair.finetuned_unet is not None  # the loader merges a LoHa
    lora_pair = load_model_pair(zoo / "base", lora=zoo / "lora")
    row = {
        "way": way,
        "measures": "sampler step" if what == "step" else "UNet work of one step",
        "backend": backend,
        "extra_weights_mib": _extra_weights_mib(way, pair, lora_pair),
    }
    if what == "step":
        options = {"cache_dir": tmp_path_factory.mktemp("onnx")} if backend == "onnxruntime" else None
        runner = build_step(
            pair, method="finextract", backend=backend, batch_size=BATCH, caption=CAPTION, backend_options=options
        )
        step = runner.step
    else:
        work = _unet_work(way, pair, lora_pair)

        def step():
            with torch.inference_mode():
                work()

    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    key = f"{way}-{what}-{backend}"
    if benchmark.disabled or benchmark.stats is None:
        RESULTS[key] = {**row, "step_ms": None}
        return
    median = benchmark.stats.stats.median
    row.update(
        batch=BATCH,
        step_ms=round(median * 1e3, 3),
        images_per_s=round(BATCH / (STEPS_PER_IMAGE * median), 4),
        peak_rss_mib=round(peak_memory_mib("cpu"), 1),
        threads=torch.get_num_threads(),
    )
    RESULTS[key] = row
    benchmark.extra_info.update(row)
    assert row["images_per_s"] > 0


def _relative_error(pair, reference_unet) -> float:
    from finextract.engine.lora import gated, inject_lora

    x, t, context = _inputs(2)
    with torch.no_grad():
        theirs = reference_unet(x, t, context).sample
        if pair.finetuned_unet is not None:
            ours = pair.finetuned_unet(x, t, context).sample
        else:
            unet = copy.deepcopy(pair.base_unet)
            gate = inject_lora(unet, pair.unet_lora)
            with gated(gate, torch.ones(2)):
                ours = unet(x, t, context).sample
    return float((ours - theirs).abs().max() / theirs.abs().max())


def _cloneofsimo(folder: Path, unet):
    """A cloneofsimo file (the zoo's writer of `lora_diffusion`'s layout) and its reference, W + up @ down."""
    from finextract.engine.pair import LoRALayer
    from finextract.zoo.writers import write_lora_cloneofsimo
    from tests.adapter_fixtures import Produced

    generator = torch.Generator().manual_seed(5)
    reference = copy.deepcopy(unet)
    modules = dict(reference.named_modules())
    paths = [n for n, m in reference.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    layers = []
    with torch.no_grad():
        for path in paths:
            weight = modules[path].weight
            layer = LoRALayer(
                down=0.1 * torch.randn(2, weight.shape[1], generator=generator),
                up=0.1 * torch.randn(weight.shape[0], 2, generator=generator),
                alpha=2.0,
            )
            weight += layer.up @ layer.down
            layers.append(layer)
    path = write_lora_cloneofsimo(folder / "cloneofsimo.safetensors", {"unet": (["Attention"], layers)})
    return Produced(path, reference.eval(), None)


def test_fidelity_against_producers(zoo, base_models, tmp_path_factory):
    """max |ours - producer| / max |producer| of the adapted UNet's eps, per type and producer."""
    from peft import LoraConfig, OFTConfig

    from finextract.engine.loading import load_model_pair

    folder = tmp_path_factory.mktemp("fidelity")
    produced = {
        f"LyCORIS {algo} {case}": write_lycoris(folder, *base_models, algo, options, seed=i, name=case)
        for i, (case, algo, options) in enumerate(LYCORIS_CASES)
    }
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]
    produced["PEFT DoRA"] = write_peft(
        folder / "dora", base_models[0], LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    )
    produced["PEFT OFT (OFTv2)"] = write_peft(
        folder / "oft", base_models[0], OFTConfig(r=0, oft_block_size=8, target_modules=targets)
    )
    produced["cloneofsimo (W + up @ down)"] = _cloneofsimo(folder, base_models[0])
    for name, item in produced.items():
        pair = load_model_pair(zoo / "base", lora=item.path)
        FIDELITY[name] = {
            "types": sorted(pair.sources["lora_counts"]["unet"]["types"]),
            "relative_max_error": _relative_error(pair, item.unet),
        }
        assert FIDELITY[name]["relative_max_error"] < 4e-5  # the bound tests/test_adapters.py derives
