"""`finextract finetune`: DreamBooth or LoRA fine-tuning of a Stable Diffusion 1.x or SD3 pipeline folder."""

from __future__ import annotations

from .options import add_command, add_overwrite_option, options_of, positive_int


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "finetune",
        run,
        help="fine-tune a base model on a few images (DreamBooth: diffusers folder; LoRA: diffusers safetensors)",
        description="The standard recipe: noise-prediction MSE on VAE latents (SD3: rectified flow, the velocity "
        "regressed onto noise - latents at logit-normal sigmas), AdamW, constant learning rate. "
        "LoRA adapts the UNet attention projections (to_q, to_k, to_v, to_out.0) or, LoCon-style, every Linear and "
        "Conv2d of the UNet's blocks (SD3: both streams' attention projections, or every Linear of the "
        "transformer blocks), through peft. Unset options take the model's defaults: SD 1.x values for an "
        "SD-size UNet (DreamBooth 800 steps at lr 5e-6, batch 1; LoRA rank 64 on attention, 2000 steps at 1e-4), "
        "the trained zoo's recipe for a tiny one (DreamBooth 1200 steps at 1e-4, batch 5; LoCon rank 8, 1500 steps "
        "at 3e-3, batch 5). Warns when the loss has not fallen.",
    )
    parser.add_argument(
        "--base", required=True, help="diffusers Stable Diffusion 1.x or SD3 pipeline folder (safetensors)"
    )
    parser.add_argument("--images", required=True, help="folder of training images (png/jpg/webp/bmp)")
    parser.add_argument("--caption", required=True, help='the instance prompt, e.g. "a photo of sks dog"')
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--method", choices=("dreambooth", "lora"), default="dreambooth")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimiser steps (default: the model's)")
    parser.add_argument("--lr", type=float, default=None, help="constant AdamW learning rate (default: the model's)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per step (default: the model's)")
    parser.add_argument("--rank", type=positive_int, default=None, help="LoRA rank r; alpha = r (default: the model's)")
    parser.add_argument(
        "--lora-modules",
        choices=("attention", "locon"),
        default=None,
        help="LoRA: attention projections only, or locon: every Linear/Conv2d of the UNet blocks (default: the model's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="training side in pixels (default: the model's, UNet sample size x VAE factor)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="fp16/bf16: mixed-precision autocast on CUDA (fp32 master weights)",
    )
    parser.add_argument("--save-dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype of saved weights")
    parser.add_argument("--train-text-encoder", action="store_true", help="DreamBooth: also train the text encoder")
    add_overwrite_option(parser, "a fine-tune (the folder is replaced whole)")


def run(args) -> int:
    import logging

    from finextract.engine.config import set_threads
    from finextract.finetuning import finetune

    set_threads()
    out = finetune(
        args.base,
        args.images,
        args.caption,
        **options_of(args, "out", "method", "steps", "lr", "batch_size", "rank", "lora_modules", "seed"),
        **options_of(args, "resolution", "device", "dtype", "save_dtype", "train_text_encoder", "overwrite"),
    )
    logging.getLogger("finextract").info("fine-tuned model written to %s", out)
    return 0
