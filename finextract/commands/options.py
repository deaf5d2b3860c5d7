"""Command-line options shared by the commands (one definition, one help text); run settings default to `RunConfig`'s."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from finextract.engine.config import BACKEND_NAMES, DTYPE_CHOICES, SCHEDULER_NAMES, RunConfig
from finextract.rules import METHODS  # plain data: importing it loads no torch
from finextract.spec import AUTO, AUTO_NUM_IMAGES, DEFAULT_PRESET, PRESETS, preset_run_options
from finextract.sscd import SSCD_PRESETS

#: The run settings' defaults, unresolved ("auto", None): every option below takes its default from here.
RUN_DEFAULTS = RunConfig.defaults()
#: N as the help shows it when --num-images is not given: the default preset's and the paper's.
DEFAULT_N = f"{PRESETS[DEFAULT_PRESET]['images_per_n0']} x N0"
PAPER_N = f"{PRESETS['paper']['images_per_n0']} x N0"


def add_command(subparsers, name: str, run, **parser_options) -> argparse.ArgumentParser:
    """Add subcommand `name` (`parser_options`: add_parser's help, description, formatter_class) and make
    it call `run(args) -> int`; returns its parser for the options."""
    parser = subparsers.add_parser(name, **parser_options)
    parser.set_defaults(func=run)
    return parser


def positive_int(text: str) -> int:
    """argparse `type=` for counts (--n0, --num-images, --batch-size, --steps): an integer >= 1.

    One helper, so every command words the error the same way ("argument --n0: 0: must be an integer >= 1").
    """
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse `type=` for counts where 0 means none (verify's --images, --tolerance): an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= {minimum}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value}: must be an integer >= {minimum}")
    return value


def n0_or_auto(text: str) -> int | str:
    """argparse `type=` for --n0: "auto" (estimate N0 from the generated images) or an integer >= 1."""
    return AUTO if text == AUTO else positive_int(text)


def read_image_folder(flag: str, folder: str, want: str | None = None):
    """`finextract.images.read_images(folder)` with its errors prefixed by the option that named the
    folder ("--train: image folder x does not exist ..."). With `want` ("extracted" / "generated"),
    an output folder of `generate` or `extract` is looked into (`finextract.images.image_folder`) and
    the folder actually read is logged. Raises FileNotFoundError / ValueError."""
    from finextract.images import image_folder, read_images

    try:
        found = image_folder(folder, want) if want else Path(folder)
        if found != Path(folder):
            logging.getLogger("finextract").info("%s %s: reading the %s images in %s", flag, folder, want, found)
        return read_images(found)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"{flag}: {error}") from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--base, --base-config, --finetuned | --lora, --allow-pickle, --prediction-type."""
    parser.add_argument(
        "--base",
        required=True,
        help="pretrained model: diffusers folder, single-file checkpoint or a locally cached hub id; or a folder of "
        "candidate bases, of which the fine-tune's parent is chosen (trainer metadata, then UNet weight distance)",
    )
    parser.add_argument(
        "--base-config",
        default=None,
        metavar="DIR",
        help="for a single-file --base: a local diffusers pipeline folder of the same architecture "
        "supplying its configs (nothing is downloaded)",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--finetuned", help="full fine-tune (DreamBooth): pipeline folder, unet/ folder or file")
    model.add_argument(
        "--lora",
        help="adapter checkpoint: LoRA/LoCon/DoRA, LoHa, LoKr, OFT/OFTv2/BOFT, GLoRA or full diff (kohya/LyCORIS, "
        "diffusers, PEFT or cloneofsimo layout), or a textual-inversion embedding file",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="allow pickle checkpoints (.ckpt/.bin): only for files you trust"
    )
    add_prediction_type_option(parser)


def extractor_from(args: argparse.Namespace, config):
    """The `finextract.extract.Extractor` that `add_model_options`' and the SSCD options name, on `config`."""
    from finextract.extract import Extractor  # torch and diffusers

    return Extractor(
        args.base,
        args.finetuned,
        lora=args.lora,
        config=config,
        embedder=args.sscd,
        sscd_preset=args.sscd_preset,
        allow_pickle=args.allow_pickle,
        base_config=args.base_config,
        prediction_type=args.prediction_type,
        distilled_guidance=getattr(args, "distilled_guidance", None),
    )


def model_pair_from(args: argparse.Namespace, **placement):
    """`finextract.engine.loading.load_model_pair` of the models `add_model_options`' options name;
    `placement`: its `device` / `dtype` keywords (default: CPU, float32)."""
    from finextract.engine.loading import load_model_pair  # torch and diffusers

    return load_model_pair(
        args.base,
        args.finetuned,
        lora=args.lora,
        allow_pickle=args.allow_pickle,
        base_config=args.base_config,
        prediction_type=args.prediction_type,
        distilled_guidance=getattr(args, "distilled_guidance", None),
        **placement,
    )


def options_of(args: argparse.Namespace, *names: str) -> dict:
    """The parsed options `names` as keywords, for a function whose parameters are named like the options."""
    return {name: getattr(args, name) for name in names}


def add_prediction_type_option(parser: argparse.ArgumentParser) -> None:
    """--prediction-type: the deliberate override of what the models' scheduler configs say."""
    parser.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "sample"),
        default=None,
        help="sample base and fine-tune as this parameterisation, overriding their scheduler configs (and v_pred "
        "markers); needed when they disagree (e.g. an SD 2.x 768-v fine-tune over an epsilon base) and you know "
        "which is right (default: read from the models, which must agree)",
    )
    parser.add_argument(
        "--distilled-guidance",
        type=float,
        default=None,
        metavar="G",
        help="FLUX.1-dev only: the distilled guidance input of both guidance terms (default: FluxPipeline's 3.5); "
        "recorded in result.json",
    )


def add_sampling_options(parser: argparse.ArgumentParser, *, n0_required: bool = True) -> None:
    """--preset, --caption, --n0, --ignore-metadata, --num-images, --method, --w, --k, --steps, --batch-size, --seed.

    `n0_required=False` (generate): N0 only sets the default N (the preset's N x N0), so --num-images may replace it.
    """
    parser.add_argument(
        "--caption",
        required=True,
        help="the training caption c, or 'auto': read from the fine-tune's trainer metadata (kohya ss_*, modelspec, "
        "finetune.json), else recovered from its cross-attention weights (needs a fine-tune or LoRA that changes "
        "attn2.to_k / attn2.to_v)",
    )
    parser.add_argument(
        "--n0",
        type=n0_or_auto if n0_required else positive_int,
        required=n0_required,
        help="N0, the number of training images"
        + (
            ", or 'auto': read from the fine-tune's trainer metadata, else estimated from the generated images "
            f"(N defaults to {AUTO_NUM_IMAGES}, the paper's 50 x N0 for N0 up to 10, whatever the preset; "
            "with N0 from the metadata, the preset's N)"
            if n0_required
            else " (sets the default N; or give --num-images)"
        ),
    )
    parser.add_argument(
        "--ignore-metadata",
        dest="use_metadata",
        action="store_false",
        help="with --caption auto / --n0 auto: leave the trainer metadata unread; recover and estimate instead",
    )
    parser.add_argument(
        "--num-images",
        type=positive_int,
        default=None,
        help=f"N images to generate (default the preset's: {DEFAULT_N}; paper: {PAPER_N})",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="finextract",
        help="guidance rule: finextract (Eq. 13), finextract-uncond (Eq. 6), cfg, direct",
    )
    parser.add_argument(
        "--w",
        type=float,
        default=None,
        help="guidance scale (default for finextract: the preset's, 3 for both kinds; --preset paper: DreamBooth 3, "
        "LoRA 5; 3 for cfg/uncond)",
    )
    parser.add_argument("--k", type=float, default=None, help="Eq. 13 correction k (default: DreamBooth -0.02, LoRA 0)")
    add_preset_option(parser)
    add_step_options(parser, preset=True)


def add_preset_option(parser: argparse.ArgumentParser) -> None:
    """--preset: the procedure preset (`finextract.spec.PRESETS`), whose settings the explicit options override."""
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help=f"procedure preset: paper (the paper's procedure: N = {PAPER_N}, 50 DDIM steps, no early stop, the "
        f"paper's selection, size, and w: DreamBooth 3, LoRA 5) or {DEFAULT_PRESET} (the default: N = {DEFAULT_N}, "
        f"{PRESETS[DEFAULT_PRESET]['steps']} DPM-Solver++ 2M steps, at most a tenth of the paper's UNet evaluations, "
        f"selection {PRESETS[DEFAULT_PRESET]['selection']}, w = 3 for both kinds). "
        "Options given explicitly (--num-images, --steps, --scheduler, --selection, --w) override the preset's; "
        "result.json records which did",
    )


def add_step_options(parser: argparse.ArgumentParser, note: str = "", *, preset: bool = False) -> None:
    """--steps, --scheduler, --batch-size, --seed, defaulting to `RunConfig`'s; `note` ends the --steps and
    --seed help. `preset`: as `add_sampler_options`."""
    add_sampler_options(parser, note, preset=preset)
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=RUN_DEFAULTS["batch_size"],
        help=f"images per batch (default {RUN_DEFAULTS['batch_size']})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=RUN_DEFAULTS["seed"],
        help=f"image i starts from seed + i (default {RUN_DEFAULTS['seed']}{note})",
    )


def add_sampler_options(parser: argparse.ArgumentParser, note: str = "", *, preset: bool = False) -> None:
    """--steps and --scheduler, the procedure preset's run settings (`finextract.spec.RUN_PRESET_SETTINGS`).

    `preset=True` (the command has --preset): both default to None, filled in from the preset by
    `run_config_from`; otherwise to the default preset's values. `note` ends the --steps help.
    """
    defaults, paper = preset_run_options(None), preset_run_options("paper")

    def default_of(name: str):  # (argparse default, the default as the help shows it)
        shown = f"the --preset's: {defaults[name]}; --preset paper: {paper[name]}"
        return (None, shown) if preset else (defaults[name], defaults[name])

    steps, shown = default_of("steps")
    parser.add_argument("--steps", type=positive_int, default=steps, help=f"sampler steps (default {shown}{note})")
    scheduler, shown = default_of("scheduler")
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULER_NAMES,
        default=scheduler,
        help="sampler: ddim (eta = 0, the paper's), dpmpp-2m (DPM-Solver++ 2M) or unipc (UniPC bh2) for DDPM "
        "models; euler (flow matching's Euler step, the pipelines' own) for SD3 / FLUX.1; with the model's own "
        f"scheduler config (default {shown})",
    )


def add_sscd_options(parser: argparse.ArgumentParser) -> None:
    """--sscd, --sscd-preset: the SSCD model and its preprocessing."""
    parser.add_argument("--sscd", default="default", help="SSCD model: 'default' or a TorchScript/ONNX file")
    parser.add_argument(
        "--sscd-preset",
        choices=tuple(SSCD_PRESETS),
        default=None,
        help="SSCD preprocessing: sscd (short edge 288, ImageNet mean/std; the default) or paper (the released "
        "code's resize 256, crop 224, mean/std 0.5); not the procedure --preset",
    )


def add_overwrite_option(parser: argparse.ArgumentParser, what: str) -> None:
    """--overwrite: replace a run of the same kind with other settings in --out (never another command's)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} in --out made with other settings (default: refuse it; a re-run with the same "
        "settings resumes and replaces the outputs either way). Another command's output is always refused",
    )


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --backend, --threads, --cuda-graphs (with --steps, --batch-size and --seed from
    `add_sampling_options`, the fields of `finextract.engine.config.RunConfig`)."""
    add_device_option(parser)
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=RUN_DEFAULTS["dtype"],
        help=f"UNet precision; fp16/bf16 need CUDA (default {RUN_DEFAULTS['dtype']})",
    )
    add_backend_option(parser)
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=RUN_DEFAULTS["threads"],
        help="torch / onnxruntime threads (SSCD's too), openvino streams (default $FINEXTRACT_THREADS, else all cores)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=RUN_DEFAULTS["cuda_graphs"],
        help="on CUDA, replay each DDIM step as a CUDA graph when the backend allows it (default on)",
    )


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """--device (default `RunConfig`'s: auto)."""
    parser.add_argument(
        "--device", default=RUN_DEFAULTS["device"], help=f"cpu, cuda, cuda:N or auto (default {RUN_DEFAULTS['device']})"
    )


def add_backend_option(parser: argparse.ArgumentParser) -> None:
    """--backend (default `RunConfig`'s: auto)."""
    parser.add_argument(
        "--backend",
        choices=("auto", *BACKEND_NAMES),
        default=RUN_DEFAULTS["backend"],
        help="auto (default: openvino on a CPU, compiling the ONNX export cached in $FINEXTRACT_CACHE or "
        "~/.cache/finextract; torch on CUDA), torch, onnxruntime, openvino or tensorrt",
    )


def run_config_from(args):
    """The `RunConfig` of a command's parsed options, resolved and validated once (before any model loads);
    a setting the command has no option for keeps `RunConfig`'s default, and a procedure preset setting
    (steps) left out takes --preset's (`finextract.spec.preset_run_options`).

    Raises:
        ValueError: an invalid combination (e.g. --dtype fp16 on a CPU), naming the option.
    """
    given = {name: getattr(args, name, default) for name, default in RUN_DEFAULTS.items()}
    # --preset's run settings (steps) where the option was not given (None); explicit ones override it
    return RunConfig.resolve(**{**given, **preset_run_options(getattr(args, "preset", None), **given)})
