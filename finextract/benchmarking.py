"""Shared timing helpers for `finextract bench` and `bench/` (pytest-benchmark): one way to measure.

    pair = sd1_random_pair("dreambooth", device="cuda", dtype=torch.float16)   # no download
    row = measure_sampling(pair, method="finextract", backend="auto", batch_size=16, device="cuda", dtype="fp16")
    print(format_table([row]))

A row holds the median DDIM-step latency after warm-up (both UNet evaluations of the rule + the fused
guidance/DDIM update, exactly the sampler's path: CUDA graph replays on CUDA with the torch backend),
images/s for a 50-step image, peak memory (process RSS on a CPU, `torch.cuda.max_memory_allocated`
on a GPU) and, on a GPU, model FLOP utilisation from 0.89 TFLOP per image per SD 1.x UNet evaluation
at 512x512 (the SD 1.x UNet's count), scaled by the latent area.
"""

from __future__ import annotations

import copy
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch

from finextract.engine.ddim import pad_batch
from finextract.engine.pair import LoRALayer, ModelPair
from finextract.engine.sampler import Sampler, start_latents
from finextract.rules import rule_for
from finextract.zoo.configs import SD1_SCHEDULER_CONFIG
from finextract.zoo.models import tiny_components

logger = logging.getLogger(__name__)

#: DDIM steps per generated image (the paper's 50): images/s = batch / (STEPS_PER_IMAGE x step latency).
STEPS_PER_IMAGE = 50
#: SD 1.x UNet, one image, one evaluation, 64x64 latents (512x512 pixels).
TFLOP_PER_IMAGE_EVAL = 0.89
SD1_LATENT_AREA = 64 * 64
#: Dense fp16/bf16 matrix rate used for MFU (an H200, measured on dense bf16 products); override per GPU.
DEFAULT_PEAK_TFLOPS = float(os.environ.get("FINEXTRACT_PEAK_TFLOPS", "790"))
#: The SD 1.x UNet config: a performance-equivalent UNet with random weights (no download).
SD1_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work (no-op on a CPU), so wall-clock times cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], repeats: int, *, warmup: int = 2, device: str | torch.device = "cpu"
) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed calls (GPU work included).

    Raises:
        ValueError: repeats < 1 or warmup < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def reset_peak_memory(device: str | torch.device) -> None:
    """Reset the GPU peak-memory counter (a CPU's peak RSS cannot be reset: it is per process)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: str | torch.device) -> float:
    """Peak memory in MiB: `torch.cuda.max_memory_allocated` on a GPU, the process's peak RSS on a CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tflop_per_image_eval(latent_shape: tuple[int, int, int]) -> float:
    """TFLOP of one SD 1.x-architecture UNet evaluation of one image: 0.89 x (h x w) / (64 x 64)."""
    return TFLOP_PER_IMAGE_EVAL * latent_shape[1] * latent_shape[2] / SD1_LATENT_AREA


def model_flop_utilisation(
    step_s: float,
    image_evals_per_step: int,
    latent_shape: tuple[int, int, int],
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
) -> float:
    """Achieved UNet TFLOP/s over the GPU's dense matrix rate, in [0, 1] for a sane measurement.

    Args:
        step_s: seconds per DDIM step.
        image_evals_per_step: UNet image-evaluations per step (batch x the rule's terms).
        latent_shape: (C, h, w) of one latent.
        peak_tflops: the GPU's dense fp16/bf16 rate (H200: 790 measured).
    """
    return image_evals_per_step * tflop_per_image_eval(latent_shape) / step_s / peak_tflops


def random_flow_transformer(config: dict, *, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A FLUX.1 or SD3 transformer (`_class_name` in `config`, e.g. `finextract.flops.FLUX1_DEV_TRANSFORMER_CONFIG`)
    with random weights, allocated once on `device` in `dtype`: built on the meta device, then filled (a
    FLUX.1-dev-size model, 11.9 B parameters, never exists in float32: 24 GB in bf16). Matrices N(0, 0.02),
    norm scales 1, biases 0, so activations stay in range through 57 blocks. Eval mode, no gradients."""
    from finextract.flops import _meta_transformer

    model = _meta_transformer(config).to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                parameter.zero_()
            else:  # RMSNorm / LayerNorm scales
                parameter.fill_(1.0)
        for buffer in model.buffers():
            buffer.zero_()
    return model.eval().requires_grad_(False)


def flux_forward_inputs(
    config: dict, latent_hw: tuple[int, int], batch: int, *, text_tokens: int = 512, device="cpu", dtype=torch.float32
) -> dict:
    """Random keyword inputs of one `FluxTransformer2DModel` forward as `FluxPipeline` calls it: (B, h/2 x w/2, 64)
    packed latents, (B, text_tokens, 4096) T5 states, (B, 768) pooled CLIP, timestep and distilled guidance
    (B,), image and text RoPE ids (tokens, 3)."""
    h, w = latent_hw
    tokens = (h // 2) * (w // 2)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return dict(
        hidden_states=randn(batch, tokens, config["in_channels"]),
        encoder_hidden_states=randn(batch, text_tokens, config["joint_attention_dim"]),
        pooled_projections=randn(batch, config["pooled_projection_dim"]),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((batch,), 3.5, device=device, dtype=dtype) if config.get("guidance_embeds") else None,
        img_ids=ids.reshape(tokens, 3).to(device=device, dtype=dtype),
        txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        return_dict=False,
    )


def sd1_random_pair(
    kind: str = "dreambooth",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer_folder=None,
):
    """A `ModelPair` with randomly initialised SD 1.x-size UNets, built from config (no download).

    The UNets have the SD 1.x config (859.5 M parameters; `SD1_UNET_CONFIG`), built directly on
    `device` (random init of that size on a CPU takes minutes). The text encoder is a one-layer CLIP
    of width 768 (its cost is once per run) and the VAE the tiny one: only the UNet steps are timed.

    Args:
        kind: "dreambooth" (two UNets: the fine-tune a copy of the base) or "lora" (the base UNet plus
            random rank-4 adapters on every attention projection).
        device, dtype: where and in which precision to build the UNets.
        seed: weight seed.

    Returns:
        `finextract.engine.pair.ModelPair`.

    Raises:
        ValueError: an unknown kind.
    """
    from diffusers import UNet2DConditionModel  # heavy: diffusers and transformers, only for the tiny benchmark pair
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in ("dreambooth", "lora"):
        raise ValueError(f"kind={kind!r}: expected 'dreambooth' or 'lora'")
    tiny = tiny_components(seed, tokenizer_folder=tokenizer_folder)
    tokenizer = tiny["tokenizer"]
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD1_UNET_CONFIG)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=768,
                intermediate_size=768,
                num_hidden_layers=1,
                num_attention_heads=12,
                max_position_embeddings=77,
                projection_dim=768,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    unet = unet.to(dtype=dtype).eval().requires_grad_(False)
    text_encoder = text_encoder.eval().requires_grad_(False)
    finetuned, lora = None, None
    if kind == "dreambooth":
        finetuned = copy.deepcopy(unet)  # same cost as a real fine-tune's second UNet
    else:
        generator = torch.Generator().manual_seed(seed + 1)
        lora = {}
        for name, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
                lora[name] = LoRALayer(
                    down=torch.randn(4, module.in_features, generator=generator) * 0.01,
                    up=torch.randn(module.out_features, 4, generator=generator) * 0.01,
                    alpha=4.0,
                )
    return ModelPair(
        kind=kind,
        base_unet=unet,
        finetuned_unet=finetuned,
        unet_lora=lora,
        base_text_encoder=text_encoder,
        finetuned_text_encoder=text_encoder,
        base_tokenizer=tokenizer,
        vae=tiny["vae"].to(device),
        scheduler_config=dict(SD1_SCHEDULER_CONFIG),
    )


class StepRunner:
    """The sampler's DDIM step for one configuration, ready to be timed: `runner.step()` advances one step.

    The step is exactly what `finextract.generation` runs: `Sampler.loop(batch).step(i)`, the one DDIM
    loop (a CUDA graph replay on CUDA with a capturable backend, the backend's step eagerly otherwise).
    Steps cycle through the 50-step schedule. Built by `build_step`.

    Attributes:
        sampler: the `finextract.engine.sampler.Sampler`. rule: its guidance rule. mode: "graph" | "eager".
        setup_s: seconds to build the sampler (and the export / capture).
    """

    def __init__(self, sampler, rule, batch_size: int):
        self.sampler, self.rule, self.batch_size = sampler, rule, batch_size
        self.index = 0
        self.loop = sampler.loop(batch_size)
        x_T = start_latents(range(batch_size), sampler.latent_shape).to(sampler.config.torch_device)
        self.loop.start(pad_batch(x_T, max(sampler.config.batch_size, batch_size)) if self.loop.use_graph else x_T)
        self.mode = self.loop.mode

    def step(self) -> None:
        """One DDIM step on the batch (no host synchronisation on CUDA)."""
        index, self.index = self.index % STEPS_PER_IMAGE, self.index + 1
        self.loop.step(index)


def build_step(
    pair,
    config,
    *,
    method: str = "finextract",
    caption: str = "a photo of sks dog",
    backend_options: dict | None = None,
) -> StepRunner:
    """A `StepRunner` for one configuration (sampler built, backend exported, graph captured).

    Args:
        pair: a `ModelPair` placed where `config` says (`pair.place(config)`).
        config: the `RunConfig` (backend, batch size, device, dtype, cuda_graphs); steps are set to 50.
        method: guidance rule ("finextract", "finextract-uncond", "cfg", "direct"), paper defaults.
        backend_options: extra backend arguments.

    Raises:
        ValueError: invalid arguments (see `Sampler`).
    """
    config = config.replace(steps=STEPS_PER_IMAGE)
    rule = rule_for(method, pair.kind)
    started = time.perf_counter()
    sampler = Sampler(pair, rule, caption, config, backend_options=backend_options)
    runner = StepRunner(sampler, rule, config.batch_size)
    runner.setup_s = time.perf_counter() - started
    return runner


def step_figures(runner: StepRunner, times: list[float], *, peak_tflops: float = DEFAULT_PEAK_TFLOPS) -> dict:
    """The row of figures for a runner's timed steps (`times`, seconds): see `measure_sampling`."""
    sampler = runner.sampler
    config = sampler.config
    step_s = statistics.median(times)
    row = {
        "backend": config.backend,
        "method": runner.rule.name,
        "kind": sampler.pair.kind,
        "batch": runner.batch_size,
        "device": config.device,
        "dtype": config.dtype,
        "mode": runner.mode,
        "forwards_per_step": sampler.backend.forwards_per_step,
        "step_ms": round(step_s * 1e3, 3),
        "step_ms_min": round(min(times) * 1e3, 3),
        "images_per_s": round(runner.batch_size / (STEPS_PER_IMAGE * step_s), 4),
        "setup_s": round(getattr(runner, "setup_s", 0.0), 2),
        "peak_mem_mib": round(peak_memory_mib(config.device), 1),
        "peak_mem_kind": "cuda max_memory_allocated" if config.is_cuda else "process peak RSS",
    }
    if config.is_cuda:
        evaluations = runner.batch_size * len(runner.rule.terms)
        row["mfu"] = round(model_flop_utilisation(step_s, evaluations, sampler.latent_shape, peak_tflops), 4)
    return row


def measure_sampling(
    pair,
    config,
    *,
    method: str = "finextract",
    steps: int = 10,
    warmup: int = 2,
    caption: str = "a photo of sks dog",
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    backend_options: dict | None = None,
) -> dict:
    """Time the sampler's DDIM step for one configuration; the figures of one bench row.

    Args:
        pair, config, method, caption, backend_options: see `build_step`.
        steps: timed steps, after `warmup` untimed ones.
        peak_tflops: the GPU's dense rate for MFU.

    Returns:
        dict: backend, method, kind, batch, device, dtype, mode ("graph" | "eager"),
        forwards_per_step, step_ms (median), step_ms_min, images_per_s (batch / (50 x step)),
        setup_s, peak_mem_mib with peak_mem_kind, and on CUDA mfu.

    Raises:
        ValueError: invalid arguments (see `Sampler`).
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    reset_peak_memory(config.device)
    runner = build_step(pair, config, method=method, caption=caption, backend_options=backend_options)
    times = time_calls(runner.step, steps, warmup=warmup, device=config.device)
    return step_figures(runner, times, peak_tflops=peak_tflops)


COLUMNS = (
    ("backend", "{:<12}"),
    ("method", "{:<18}"),
    ("kind", "{:<11}"),
    ("batch", "{:>6}"),
    ("mode", "{:>6}"),
    ("step_ms", "{:>10.2f}"),
    ("images_per_s", "{:>18.3f}"),
    ("peak_mem_mib", "{:>10.0f}"),
    ("mfu", "{:>6.3f}"),
)


def format_table(rows: list[dict]) -> str:
    """A plain-text table of `measure_sampling` rows (MFU only where measured).

    img/s is for a whole 50-step DDIM image: batch / (50 x median step latency).
    """
    header = ["backend", "method", "kind", "batch", "mode", "step ms", "img/s (50 steps)", "peak MiB", "MFU"]
    widths = [12, 18, 11, 6, 6, 10, 18, 10, 6]
    lines = ["".join(f"{h:<{w}}" if i < 3 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths)))]
    for row in rows:
        cells = []
        for (key, spec), width in zip(COLUMNS, widths):
            value = row.get(key)
            cells.append(spec.format(value) if value is not None else f"{'-':>{width}}")
        lines.append("".join(cells))
    return "\n".join(lines)
