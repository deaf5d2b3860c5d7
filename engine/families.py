"""Model families: what differs between SD 1.x, SD 2.x, SDXL, AltDiffusion, SD3 and FLUX.1, in one table.

A family fixes the parts of a pipeline that are not in the denoiser's weights: which text encoders
and tokenizers it has, which denoiser (a UNet or a flow-matching transformer) and which conditioning
tensors it reads, and which diffusers pipeline defines its sampling (the oracle the tests compare
against). Everything else (sizes, prediction type, scheduler) is read from the model's own configs.

| family | pipeline | denoiser | text encoders | denoiser conditioning |
|---|---|---|---|---|
| `sd1` SD 1.x | `StableDiffusionPipeline` | `unet` | CLIP ViT-L (`CLIPTextModel`) | `encoder_hidden_states` |
| `sd2` SD 2.x (epsilon 512 px, v-prediction 768 px) | `StableDiffusionPipeline` | `unet` | OpenCLIP ViT-H (`CLIPTextModel`) | `encoder_hidden_states` |
| `sdxl` SDXL base 1.0 | `StableDiffusionXLPipeline` | `unet` | CLIP ViT-L + OpenCLIP bigG (`CLIPTextModelWithProjection`) | `encoder_hidden_states`, `text_embeds` (pooled), `time_ids` |
| `altdiffusion` AltDiffusion | `AltDiffusionPipeline` | `unet` | XLM-R (`RobertaSeriesModelWithTransformation`) | `encoder_hidden_states` |
| `sd3` SD3 / 3.5 | `StableDiffusion3Pipeline` | `transformer` (`SD3Transformer2DModel`) | CLIP ViT-L + OpenCLIP bigG (`CLIPTextModelWithProjection`) + T5 (`T5EncoderModel`, optional) | `encoder_hidden_states` (joint), `pooled_projections` |
| `flux` FLUX.1 dev / schnell | `FluxPipeline` | `transformer` (`FluxTransformer2DModel`) | CLIP ViT-L (`CLIPTextModel`) + T5 (`T5EncoderModel`) | `encoder_hidden_states` (T5), `pooled_projections` (CLIP), `guidance` (the distilled guidance) |

Detection reads configs (`detect_family`), single-file checkpoint keys (`checkpoint_evidence`) or
adapter keys and metadata (`adapter_evidence`); `check_family` refuses a fine-tune or adapter of
another family with a message naming both ("the LoRA is for SDXL (cross-attention 2048); the base is
SD 1.x (768)").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "ADDED_CONDITIONING_KEYS",
    "FAMILIES",
    "FLOW_CONDITIONING_KEYS",
    "Evidence",
    "Family",
    "FamilyMismatchError",
    "UnknownFamilyError",
    "adapter_evidence",
    "check_family",
    "checkpoint_evidence",
    "detect_family",
    "get_family",
]

#: SDXL's added conditioning, passed to the UNet as `added_cond_kwargs` (diffusers' names).
ADDED_CONDITIONING_KEYS = ("text_embeds", "time_ids")


class UnknownFamilyError(ValueError):
    """A model of no family finextract runs (an unknown name, a DiT, an inpainting UNet, a refiner...)."""


class FamilyMismatchError(ValueError):
    """A fine-tune or adapter of another family than its base."""


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the identifier ("sd1", "sd2", "sdxl", "altdiffusion", "sd3", "flux"), recorded in `result.json`.
        label: how messages name it ("SD 1.x").
        pipeline_class: the diffusers pipeline whose sampling the family follows.
        text_encoder_classes: (library, class) of each text encoder, in order (`text_encoder`,
            `text_encoder_2`, `text_encoder_3`), as a pipeline's `model_index.json` names them.
        tokenizer_classes: the transformers tokenizer class of each text encoder's tokenizer, in the same order.
        conditioning_keys: the denoiser inputs one guidance term's conditioning holds, in order.
        released_cross_attention_dim: the released models' UNet `cross_attention_dim`, or the transformer's
            `joint_attention_dim` (messages only: a tiny test model has its own).
        shares_unet_with: families whose released denoisers have the same architecture (an SD 1.x UNet
            LoRA fits AltDiffusion's UNet).
        denoiser: the pipeline component name of the denoiser: "unet" or "transformer".
        denoiser_class: its diffusers class ("UNet2DConditionModel", "SD3Transformer2DModel", ...).
        optional_text_encoders: text encoders the pipeline runs without (SD3's T5: zeros in its place).
        max_sequence_length: the T5 token count the pipeline encodes captions to by default (SD3 256,
            FLUX.1 512); 0 for families without T5.
        linspace_sigmas: the pipeline passes sigmas = linspace(1, 1 / steps, steps) to the flow scheduler
            (FluxPipeline) rather than letting it space its own timesteps (StableDiffusion3Pipeline).
    """

    name: str
    label: str
    pipeline_class: str
    text_encoder_classes: tuple[tuple[str, str], ...]
    tokenizer_classes: tuple[str, ...]
    conditioning_keys: tuple[str, ...]
    released_cross_attention_dim: int
    shares_unet_with: tuple[str, ...] = ()
    denoiser: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    optional_text_encoders: tuple[str, ...] = ()
    linspace_sigmas: bool = False
    max_sequence_length: int = 0

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """Pipeline component names of the text encoders: ("text_encoder",), (..., "text_encoder_2") or
        (..., "text_encoder_3")."""
        return ("text_encoder", "text_encoder_2", "text_encoder_3")[: len(self.text_encoder_classes)]

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """Pipeline component names of the tokenizers, one per text encoder."""
        return ("tokenizer", "tokenizer_2", "tokenizer_3")[: len(self.text_encoder_classes)]

    @property
    def flow_matching(self) -> bool:
        """True for the flow-matching transformer families (the denoiser predicts a velocity v)."""
        return self.denoiser == "transformer"

    def text_encoder_class(self, index: int = 0):
        """The class of text encoder `index` (imported on demand)."""
        library, name = self.text_encoder_classes[index]
        if library == "diffusers":  # AltDiffusion's encoder lives in diffusers (deprecated pipelines)
            # heavy: families.py is torch-free; the text-encoder classes load only when asked for
            from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
                RobertaSeriesModelWithTransformation,
            )

            return {"RobertaSeriesModelWithTransformation": RobertaSeriesModelWithTransformation}[name]
        import transformers

        return getattr(transformers, name)

    def tokenizer_class_object(self, index: int = 0):
        """The transformers class of tokenizer `index` (imported on demand)."""
        import transformers

        return getattr(transformers, self.tokenizer_classes[index])

    def denoiser_class_object(self):
        """The diffusers class of the denoiser (imported on demand)."""
        import diffusers

        return getattr(diffusers, self.denoiser_class)

    def pipeline(self):
        """The diffusers pipeline class of the family (the oracle its sampling follows)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def describe(self, cross_attention_dim: int | None) -> str:
        """ "SD 1.x (768)": the label and a UNet's cross-attention width (when known)."""
        return self.label if cross_attention_dim is None else f"{self.label} ({cross_attention_dim})"

    def compatible(self, other: Family) -> bool:
        return other.name == self.name or other.name in self.shares_unet_with


SD1 = Family(
    "sd1",
    "SD 1.x",
    "StableDiffusionPipeline",
    (("transformers", "CLIPTextModel"),),
    ("CLIPTokenizer",),
    ("encoder_hidden_states",),
    768,
    ("altdiffusion",),
)
SD2 = Family(
    "sd2",
    "SD 2.x",
    "StableDiffusionPipeline",
    (("transformers", "CLIPTextModel"),),
    ("CLIPTokenizer",),
    ("encoder_hidden_states",),
    1024,
)
SDXL = Family(
    "sdxl",
    "SDXL",
    "StableDiffusionXLPipeline",
    (("transformers", "CLIPTextModel"), ("transformers", "CLIPTextModelWithProjection")),
    ("CLIPTokenizer", "CLIPTokenizer"),
    ("encoder_hidden_states", *ADDED_CONDITIONING_KEYS),
    2048,
)
ALTDIFFUSION = Family(
    "altdiffusion",
    "AltDiffusion",
    "AltDiffusionPipeline",
    (("diffusers", "RobertaSeriesModelWithTransformation"),),
    ("XLMRobertaTokenizer",),
    ("encoder_hidden_states",),
    768,
    ("sd1",),
)
#: the transformer inputs of a flow family's guidance term: the text tokens and the pooled text vector
FLOW_CONDITIONING_KEYS = ("encoder_hidden_states", "pooled_projections")
SD3 = Family(
    "sd3",
    "SD3",
    "StableDiffusion3Pipeline",
    (
        ("transformers", "CLIPTextModelWithProjection"),
        ("transformers", "CLIPTextModelWithProjection"),
        ("transformers", "T5EncoderModel"),
    ),
    ("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast"),
    FLOW_CONDITIONING_KEYS,
    4096,
    denoiser="transformer",
    denoiser_class="SD3Transformer2DModel",
    optional_text_encoders=("text_encoder_3",),
    max_sequence_length=256,
)
FLUX = Family(
    "flux",
    "FLUX.1",
    "FluxPipeline",
    (("transformers", "CLIPTextModel"), ("transformers", "T5EncoderModel")),
    ("CLIPTokenizer", "T5TokenizerFast"),
    (*FLOW_CONDITIONING_KEYS, "guidance"),  # FLUX.1-dev's distilled guidance: an input, the same for both terms
    4096,
    denoiser="transformer",
    denoiser_class="FluxTransformer2DModel",
    linspace_sigmas=True,
    max_sequence_length=512,
)
FAMILIES: dict[str, Family] = {family.name: family for family in (SD1, SD2, SDXL, ALTDIFFUSION, SD3, FLUX)}
_BY_RELEASED_DIM = {768: SD1, 1024: SD2, 2048: SDXL}
_SUPPORTED = ", ".join(f"{f.name} ({f.label})" for f in FAMILIES.values())


def get_family(name: str | Family) -> Family:
    """The family called `name` ("sd1", "sd2", "sdxl", "altdiffusion", "sd3", "flux"; a `Family` passes through).

    Raises:
        UnknownFamilyError: any other name (the message lists the families).
    """
    if isinstance(name, Family):
        return name
    key = str(name).lower().replace(" ", "").replace("-", "").replace(".x", "").replace("_", "").replace(".", "")
    aliases = {"sd1": "sd1", "sd15": "sd1", "sd14": "sd1", "sd2": "sd2", "sd21": "sd2", "sdxl": "sdxl"}
    aliases.update(altdiffusion="altdiffusion", alt="altdiffusion", sd3="sd3", sd35="sd3", flux="flux", flux1="flux")
    if key not in aliases:
        raise UnknownFamilyError(f"unknown model family {name!r}: finextract runs {_SUPPORTED}")
    return FAMILIES[aliases[key]]


# --- from configs ---------------------------------------------------------------------------------

_OTHER_PIPELINES = {  # pipeline classes of families finextract does not run, in plain words
    "PixArtAlphaPipeline": "PixArt (a DiT)",
    "PixArtSigmaPipeline": "PixArt (a DiT)",
    "KandinskyV22Pipeline": "Kandinsky 2.2",
    "StableDiffusionUpscalePipeline": "an SD x4 upscaler",
    "StableDiffusionInpaintPipeline": "an SD inpainting model",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting model",
    "StableCascadeDecoderPipeline": "Stable Cascade",
}


def _flow_family(pipeline_class: str | None, transformer_config: dict | None, where: str) -> Family | None:
    """SD3 / FLUX.1 from the pipeline class or the transformer's class; None for neither. A transformer
    of the family's class with other input channels (an inpainting / control variant) is refused: FLUX.1
    takes 64 (its packed latents); an SD3 transformer takes what it outputs (16 for the released
    models; the trained tiny flow pair's 4, on SD 1.x's VAE), a variant more."""
    by_pipeline = {family.pipeline_class: family for family in (SD3, FLUX)}
    by_denoiser = {family.denoiser_class: family for family in (SD3, FLUX)}
    family = by_pipeline.get(pipeline_class) or by_denoiser.get((transformer_config or {}).get("_class_name"))
    if family is None or transformer_config is None:
        return family
    # FLUX packs 2 x 2 x 16 latent values per token; SD3's velocity has its input's shape
    expected = 64 if family is FLUX else transformer_config.get("out_channels") or 16
    if transformer_config.get("in_channels") != expected:
        raise UnknownFamilyError(
            f"{where}: its {family.denoiser_class} takes {transformer_config.get('in_channels')} input channels, "
            f"not {family.label}'s text-to-image {expected} (an inpainting, depth or control variant?); finextract "
            f"runs {_SUPPORTED}"
        )
    return family


def detect_family(
    unet_config: dict | None,
    text_encoder_config: dict | None = None,
    *,
    text_encoder_2_config: dict | None = None,
    pipeline_class: str | None = None,
    requires_aesthetics_score: bool = False,
    transformer_config: dict | None = None,
    where: str = "the model",
) -> Family:
    """The family of a model from its configs (no weights read).

    Args:
        unet_config: the UNet's `config.json` (None: the pipeline has no UNet).
        transformer_config: a flow pipeline's `transformer/config.json` (SD3, FLUX.1), when there is one.
        text_encoder_config: the (first) text encoder's config, when there is one.
        text_encoder_2_config: the second text encoder's config (SDXL), when there is one.
        pipeline_class: `model_index.json`'s `_class_name`, when there is one.
        requires_aesthetics_score: `model_index.json`'s entry (SDXL refiners set it).
        where: how to name the model in messages.

    Rules, in order: `StableDiffusion3Pipeline` or an `SD3Transformer2DModel` is SD3, `FluxPipeline` or a
    `FluxTransformer2DModel` is FLUX.1; a pipeline class of another family, or a UNet that is not a 4-channel
    text-to-image UNet, is refused; `addition_embed_type == "text_time"` with six time ids is SDXL
    base (five, with an aesthetic score, is the refiner: refused); an XLM-R (`xlm-roberta`) text encoder
    or `AltDiffusionPipeline` is AltDiffusion; otherwise CLIP: cross-attention 1024, or linear
    transformer projections (SD 2.x's `use_linear_projection`), is SD 2.x, else SD 1.x.

    Raises:
        UnknownFamilyError: naming what was found and the families finextract runs.
    """
    flow = _flow_family(pipeline_class, transformer_config, where)
    if flow is not None:
        return flow
    if pipeline_class in _OTHER_PIPELINES:
        raise UnknownFamilyError(
            f"{where} is a {pipeline_class} ({_OTHER_PIPELINES[pipeline_class]}), not a family finextract runs "
            f"({_SUPPORTED}); use a text-to-image checkpoint of one of those"
        )
    if unet_config is None:
        raise UnknownFamilyError(
            f"{where} has no UNet and no SD3 / FLUX.1 transformer (another transformer-based pipeline?): finextract "
            f"runs {_SUPPORTED}"
        )
    channels = (unet_config.get("in_channels"), unet_config.get("out_channels"))
    if channels != (4, 4):
        what = {9: "an inpainting UNet", 7: "an x4-upscaler UNet", 8: "an image-variation / depth UNet"}
        raise UnknownFamilyError(
            f"{where}: its UNet has {channels[0]} input and {channels[1]} output channels "
            f"({what.get(channels[0], 'not a text-to-image UNet')}); finextract runs the 4-channel text-to-image "
            f"UNets of {_SUPPORTED}"
        )
    addition = unet_config.get("addition_embed_type")
    if addition == "text_time":
        ids = _time_id_count(unet_config, text_encoder_2_config)
        if requires_aesthetics_score or ids == 5:
            raise UnknownFamilyError(
                f"{where} is an SDXL refiner (one text encoder, an aesthetic score in its time ids): finextract runs "
                "the SDXL base architecture; use the base model and its fine-tunes"
            )
        return SDXL
    if addition is not None or unet_config.get("class_embed_type") is not None:
        raise UnknownFamilyError(
            f"{where}: its UNet has addition_embed_type {addition!r} / class_embed_type "
            f"{unet_config.get('class_embed_type')!r}, which no family finextract runs has ({_SUPPORTED})"
        )
    text = text_encoder_config or {}
    if (
        pipeline_class == "AltDiffusionPipeline"
        or text.get("model_type") in ("xlm-roberta", "roberta")
        or "RobertaSeriesModelWithTransformation" in (text.get("architectures") or ())
    ):
        return ALTDIFFUSION
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        return SD2
    return SD1


def _time_id_count(unet_config: dict, text_encoder_2_config: dict | None) -> int | None:
    """How many time ids an SDXL-style UNet's added embedding takes (6 base, 5 refiner), or None."""
    total = unet_config.get("projection_class_embeddings_input_dim")
    per_id = unet_config.get("addition_time_embed_dim")
    pooled = (text_encoder_2_config or {}).get("projection_dim")
    if not (total and per_id and pooled) or (total - pooled) % per_id:
        return None
    return (total - pooled) // per_id


# --- evidence from tensor names -------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """What a checkpoint's or adapter's tensors say about its family.

    Attributes:
        family: the family the tensors or metadata name, or None when they do not tell.
        cross_attention_dim: the UNet's cross-attention width read from a tensor shape, or None.
        reason: how it was told ("conditioner.embedders.1.* tensors", "lora_te2_* keys", ...).
        prediction_type: "v_prediction" when a `v_pred` marker tensor is present, else None.
        zero_terminal_snr: True when a `ztsnr` marker tensor is present.
    """

    family: Family | None
    cross_attention_dim: int | None
    reason: str = ""
    prediction_type: str | None = None
    zero_terminal_snr: bool = False

    def describe(self) -> str:
        """ "SDXL (cross-attention 2048)" / "a model with cross-attention 48" / "another family"."""
        if self.family is not None:
            dim = f" (cross-attention {self.cross_attention_dim})" if self.cross_attention_dim else ""
            return f"{self.family.label}{dim}"
        if self.cross_attention_dim is not None:
            return f"a model with cross-attention {self.cross_attention_dim}"
        return "another family"


def _attn2_width(shapes: dict[str, tuple], pattern: str) -> int | None:
    """The input width of the first cross-attention key projection (`attn2.to_k`) matched by `pattern`."""
    for key in sorted(shapes):
        if re.search(pattern, key) and len(shapes[key]) == 2:
            return int(shapes[key][1])
    return None


_FLUX_CHECKPOINT_KEY = re.compile(r"(model\.diffusion_model\.)?double_blocks\.0\.img_attn\.norm\.key_norm\.scale")


def checkpoint_evidence(shapes: dict[str, tuple]) -> Evidence:
    """The family of an original-layout (LDM / SGM) single-file checkpoint from its tensor names and shapes.

    BFL's FLUX.1 transformer (`double_blocks.0.img_attn.norm.key_norm.scale`, bare or under
    `model.diffusion_model.`) is FLUX.1;
    `conditioner.embedders.1.*` (a second, OpenCLIP bigG text encoder) or `label_emb` in the UNet is
    SDXL; `cond_stage_model.model.*` (OpenCLIP) is SD 2.x; `cond_stage_model.transformer.*` (CLIP)
    is SD 1.x; `cond_stage_model.roberta.*` is AltDiffusion; a UNet alone is told by its
    cross-attention width where that is a released one; `model.diffusion_model.joint_blocks.*` (the MMDiT
    of Stability AI's files) is SD3. The marker tensors `v_pred` and `ztsnr`
    (written by trainers of v-prediction and zero-terminal-SNR models) set `prediction_type` and
    `zero_terminal_snr`.
    """
    keys = list(shapes)
    flux = next((key for key in keys if _FLUX_CHECKPOINT_KEY.fullmatch(key)), None)
    if flux is not None:  # BFL's transformer names (diffusers' `CHECKPOINT_KEY_NAMES["flux"]`)
        return Evidence(FLUX, None, f"BFL's FLUX.1 transformer names ({flux!r})")
    # the original layout's UNet, or a UNet state dict in diffusers' names
    width = _attn2_width(shapes, r"^(model\.diffusion_model\.|unet\.)?.*attn2\.to_k\.weight$")
    markers = dict(
        prediction_type="v_prediction" if "v_pred" in shapes else None,
        zero_terminal_snr="ztsnr" in shapes,
    )

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has("model.diffusion_model.joint_blocks."):
        return Evidence(SD3, None, "MMDiT joint_blocks (SD3) tensors", **markers)
    if has("conditioner.embedders.1.") or has("model.diffusion_model.label_emb."):
        why = (
            "conditioner.embedders.1.* tensors" if has("conditioner.embedders.1.") else "a label_emb (added) embedding"
        )
        return Evidence(SDXL, width, why, **markers)
    if has("cond_stage_model.model."):
        return Evidence(SD2, width, "an OpenCLIP text encoder (cond_stage_model.model.*)", **markers)
    if has("cond_stage_model.roberta.") or has("cond_stage_model.transformation."):
        return Evidence(ALTDIFFUSION, width, "an XLM-R text encoder (cond_stage_model.roberta.*)", **markers)
    if has("cond_stage_model.transformer."):
        return Evidence(SD1, width, "a CLIP text encoder (cond_stage_model.transformer.*)", **markers)
    family = _BY_RELEASED_DIM.get(width) if width is not None else None
    return Evidence(family, width, f"cross-attention width {width}" if family else "", **markers)


_LORA_ARCHITECTURES = (  # kohya / modelspec metadata values -> family
    (re.compile(r"flux", re.I), FLUX),
    (re.compile(r"sd3|stable-diffusion-(v)?3", re.I), SD3),
    (re.compile(r"xl", re.I), SDXL),
    (re.compile(r"(^|[^a-z])v2|sd_?2|stable-diffusion-v2", re.I), SD2),
    (re.compile(r"(^|[^a-z])v1|sd_?1|stable-diffusion-v1", re.I), SD1),
)


# FLUX.1's blocks in an adapter key: BFL's names (kohya's underscored, XLabs', ComfyUI's dotted) or diffusers'
_FLUX_ADAPTER_KEY = re.compile(
    r"(^lora_unet_|^lora_transformer_|^|\.)(double_blocks|single_blocks|single_transformer_blocks)[._]\d"
)

# SD3's blocks under Stability AI's names (kohya's `lora_unet_joint_blocks_`, ComfyUI's `diffusion_model.joint_blocks.`)
_SD3_ADAPTER_KEY = re.compile(r"(^lora_unet_|^|\.)joint_blocks[._]\d")


def adapter_evidence(shapes: dict[str, tuple], metadata: dict | None = None) -> Evidence:
    """The family of an adapter file from its metadata, component prefixes and LoRA shapes.

    In order: kohya's `ss_base_model_version` / the `modelspec.architecture` metadata entry; FLUX.1's
    module names (BFL's `double_blocks` / `single_blocks`, as kohya, XLabs and ComfyUI write them, or
    diffusers' `single_transformer_blocks`) mean FLUX.1; Stability AI's `joint_blocks` mean SD3, as do
    diffusers' `transformer.` keys beside `text_encoder_2.` ones (other `transformer.` keys: no family told);
    keys for a second text encoder (`lora_te2_`, `text_encoder_2.`) mean SDXL. The cross-attention width is the input width of a cross-attention
    `to_k` LoRA down projection (`lora_down` / `lora_A`).
    """
    metadata = metadata or {}
    width = _attn2_width(shapes, r"attn2[._](processor[._])?to_k.*(lora_down|lora_A|lora\.down)")
    for field in ("modelspec.architecture", "ss_base_model_version"):
        value = str(metadata.get(field) or "")
        for pattern, family in _LORA_ARCHITECTURES:
            if value and pattern.search(value):
                return Evidence(family, width, f"its metadata {field}={value!r}")
    flux = next((key for key in sorted(shapes) if _FLUX_ADAPTER_KEY.search(key)), None)
    if flux is not None:
        return Evidence(FLUX, None, f"FLUX.1 module names ({flux!r})")
    sai = next((key for key in sorted(shapes) if _SD3_ADAPTER_KEY.search(key)), None)
    if sai is not None:
        return Evidence(SD3, None, f"SD3's MMDiT module names ({sai!r})")
    if any(key.startswith("transformer.") for key in shapes):  # diffusers' keys of a diffusion transformer
        if any(key.startswith("text_encoder_2.") for key in shapes):  # FLUX.1's second encoder (T5) takes none
            return Evidence(SD3, None, "transformer keys with a second CLIP text encoder's (text_encoder_2.)")
        return Evidence(None, None, "")
    if any(key.startswith(("lora_te2_", "text_encoder_2.")) for key in shapes):
        return Evidence(SDXL, width, "keys for a second text encoder (lora_te2_ / text_encoder_2.)")
    family = _BY_RELEASED_DIM.get(width) if width is not None else None
    return Evidence(family, width, f"cross-attention width {width}" if family else "")


def check_family(
    base: Family, base_cross_attention_dim: int, other: Evidence, what: str, fix: str, *, relation: str = "is for"
) -> None:
    """Refuse `other` (a fine-tune or adapter) when its evidence says another family than the base's.

    Args:
        base: the base model's family.
        base_cross_attention_dim: the base UNet's `cross_attention_dim`.
        other: the evidence of the fine-tune or adapter.
        what: how to name it ("the LoRA", "the fine-tuned checkpoint x.safetensors").
        fix: what to do instead, appended to the message.
        relation: "is for" (an adapter) or "is" (a checkpoint).

    Raises:
        FamilyMismatchError: "the LoRA is for SDXL (cross-attention 2048); the base is SD 1.x (768): <fix>".
    """
    wrong_family = other.family is not None and not base.compatible(other.family)
    wrong_width = other.cross_attention_dim is not None and other.cross_attention_dim != base_cross_attention_dim
    if not (wrong_family or wrong_width):
        return
    told = f", told by {other.reason}" if other.reason else ""
    raise FamilyMismatchError(
        f"{what} {relation} {other.describe()}{told}; the base is {base.describe(base_cross_attention_dim)}: {fix}"
    )
