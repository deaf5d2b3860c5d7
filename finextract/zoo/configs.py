"""The tiny models' configs: UNet or transformer, VAE and text encoders per zoo family, their schedulers,
and the LoRA settings of the random zoo's adapters. Plain dicts (no torch)."""

# SD 1.x scheduler: scaled-linear betas 0.00085..0.012 over 1000 training steps (diffusers' config
# of runwayml/stable-diffusion-v1-5, DDIM flavour).
SD1_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

TINY_VAE_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    norm_num_groups=32,
)

TINY_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)


# SD 2.x: linear transformer projections and per-block head counts, an OpenCLIP-style (gelu) encoder
TINY_SD2_UNET_CONFIG = dict(
    TINY_UNET_CONFIG, cross_attention_dim=48, use_linear_projection=True, attention_head_dim=(2, 4)
)
TINY_SD2_TEXT_CONFIG = dict(
    TINY_TEXT_CONFIG, hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=48
)
# SDXL base: no attention in the first block, more transformer layers deeper, the text_time added
# embedding of 6 time ids x 8 + the pooled width 32 = 80, cross-attention 32 + 32 (both encoders)
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    cross_attention_dim=64,
    norm_num_groups=32,
)
TINY_SDXL_TEXT_CONFIG_2 = dict(TINY_TEXT_CONFIG, hidden_act="gelu", projection_dim=32)
TINY_XLMR_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=80,  # XLM-R's positions start after the padding index: 77 + 2 needed
    type_vocab_size=1,
    project_dim=32,
    has_pre_transformation=True,  # AltDiffusion's: penultimate states, layer norm, projection
    # XLM-R's init (std 0.02) makes a tiny random encoder whose captions barely move the images (CFG and
    # Direct 4 levels apart at 3 steps); at 0.3 they move them as the tiny CLIP encoders do (20 levels)
    initializer_range=0.3,
)
SD2_SCHEDULER_CONFIG = dict(SD1_SCHEDULER_CONFIG)
# SD 2.1-v with the zero-terminal-SNR recipe (Lin et al. 2024): trailing spacing, rescaled betas
SD2_V_SCHEDULER_CONFIG = dict(
    SD1_SCHEDULER_CONFIG, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True
)
SDXL_SCHEDULER_CONFIG = dict(SD1_SCHEDULER_CONFIG, timestep_spacing="leading")
#: zoo family -> (finextract family, scheduler config); "sd2-v" is SD 2.x with v-prediction
ZOO_FAMILIES = {
    "sd1": ("sd1", SD1_SCHEDULER_CONFIG),
    "sd2": ("sd2", SD2_SCHEDULER_CONFIG),
    "sd2-v": ("sd2", SD2_V_SCHEDULER_CONFIG),
    "sdxl": ("sdxl", SDXL_SCHEDULER_CONFIG),
    "altdiffusion": ("altdiffusion", SD1_SCHEDULER_CONFIG),
}


# --- flow-matching families (SD3, FLUX.1): tiny widths, the released architectures -------------------
# The 16-channel VAE of SD3 / FLUX.1 (no quant convs; latents are (z - shift_factor) * scaling_factor),
# at the tiny zoo's 2 blocks: 32 px images, 16 x 16 latents. Shift and scale: the released values.
TINY_FLOW_VAE_CONFIG = dict(TINY_VAE_CONFIG, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
SD3_VAE_FACTORS = dict(shift_factor=0.0609, scaling_factor=1.5305)  # stabilityai/stable-diffusion-3-medium
FLUX_VAE_FACTORS = dict(shift_factor=0.1159, scaling_factor=0.3611)  # black-forest-labs/FLUX.1-dev
# T5 v1.1 (the encoder SD3 and FLUX.1 use): gated GELU, relative attention, no tied embeddings. d_model 64
# is at least the two CLIP widths joined (32 + 32): SD3 zero-pads the CLIP states to T5's width.
TINY_T5_CONFIG = dict(
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    decoder_start_token_id=0,
)
T5_MAX_LENGTH = 512  # the released T5 tokenizers' model_max_length (FluxPipeline's max_sequence_length)
# SD3 medium's MMDiT at 2 layers: patch 2, 4 heads x 8 (inner 32), joint width = T5's, pooled = 32 + 32
TINY_SD3_TRANSFORMER_CONFIG = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=32,
    pooled_projection_dim=64,
    pos_embed_max_size=16,
)
# FLUX.1-dev at 1 double + 1 single block: 2 heads x 16, RoPE axes (4, 6, 6) summing to the head
# dim as (16, 56, 56) sum to 128; in_channels 64 = 16 latent channels x the 2 x 2 packing; pooled =
# CLIP's width; the distilled guidance embedding (schnell has none).
TINY_FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
TINY_FLUX_SCHNELL_TRANSFORMER_CONFIG = dict(TINY_FLUX_TRANSFORMER_CONFIG, guidance_embeds=False)
# The released scheduler configs (scheduler/scheduler_config.json of each model)
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL_SCHEDULER_CONFIG = dict(FLUX_SCHEDULER_CONFIG, shift=1.0, use_dynamic_shifting=False)
#: flow zoo family -> (finextract family, scheduler config, transformer config, VAE shift / scale)
FLOW_ZOO_FAMILIES = {
    "sd3": ("sd3", SD3_SCHEDULER_CONFIG, TINY_SD3_TRANSFORMER_CONFIG, SD3_VAE_FACTORS),
    "flux": ("flux", FLUX_SCHEDULER_CONFIG, TINY_FLUX_TRANSFORMER_CONFIG, FLUX_VAE_FACTORS),
    "flux-schnell": ("flux", FLUX_SCHNELL_SCHEDULER_CONFIG, TINY_FLUX_SCHNELL_TRANSFORMER_CONFIG, FLUX_VAE_FACTORS),
}


ZOO_CAPTION = "a photo of sks object"
LORA_RANK, LORA_ALPHA = 4, 8.0
# Per-module exceptions, so readers must honour each module's own rank and alpha:
LORA_RANK_PATTERN = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 2}
LORA_ALPHA_PATTERN = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 1.0,
    # the kohya file stores no alpha for this module; readers then assume alpha = rank
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v": float(LORA_RANK),
}
LORA_NO_ALPHA_MODULE = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"


#: kohya-ss metadata (`ss_base_model_version`, and `modelspec.architecture` of the model-spec
#: standard sd-scripts writes) per zoo family
KOHYA_METADATA = {
    "sd1": {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"},
    "sd2": {"ss_base_model_version": "sd_v2", "modelspec.architecture": "stable-diffusion-v2-512/lora"},
    "sd2-v": {"ss_base_model_version": "sd_v2", "modelspec.architecture": "stable-diffusion-v2-768-v/lora"},
    "sdxl": {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
}
