"""The extraction spec: what one extraction asks for (caption, N0, N, method, w, k, training images,
SSCD preset, procedure preset), validated once (`ExtractionSpec.resolve`), then only read.

    spec = ExtractionSpec.resolve("a photo of sks", 5)     # N = 50 x N0 = 250, method finextract
    Extractor(base, finetuned).extract(spec=spec, out="run")

A procedure preset (`PRESETS`, `--preset`) is a named bundle of the settings that trade work for evidence
(N per N0, DDIM steps, ...). Options given explicitly override it; `preset_record` says which did. It
leaves the SSCD descriptor alone (`--sscd-preset`), so AS stays comparable between presets.

The CLI, `Extractor.extract`, the sweep, the demo and the fleet manifest build one; `RunConfig`
(`finextract.engine.config`) holds where and how it runs. Importing this module loads no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from finextract.clustering.n0 import MIN_IMAGES
from finextract.clustering.selection import ON_BUDGET, SELECTIONS
from finextract.rules import DEFAULTS, KINDS, METHODS, rule_for
from finextract.sscd import SSCD_PRESETS

#: The paper generates N = 50 x N0 images.
IMAGES_PER_N0 = 50
#: Procedure presets, name -> settings: "images_per_n0" (N = that x N0 when --num-images is not given),
#: "finextract_w" (FineXtract's w per kind of fine-tune when --w is not given; the other methods keep
#: theirs), and `RUN_PRESET_SETTINGS`, fields of `finextract.engine.config.RunConfig`. Every preset names every
#: setting. A new setting (a scheduler, adaptive N, a selection rule) is one more key in each entry: a
#: `RunConfig` field also goes into `RUN_PRESET_SETTINGS`; a spec field gets its default from
#: `preset_settings` in `ExtractionSpec.resolve`, as num_images does.
PRESETS = {
    # the paper's procedure exactly: N = 50 x N0, DDIM 50 steps, every image generated (no early stop),
    # the N0 largest cliques at the first threshold that yields N0
    "paper": {
        "images_per_n0": IMAGES_PER_N0,
        "steps": 50,
        "scheduler": "ddim",
        "selection": "size",
        "finextract_w": {kind: DEFAULTS["finextract", kind]["w"] for kind in KINDS},  # DreamBooth 3, LoRA 5
    },
    # what runs when no --preset is given: at most a tenth of the paper's UNet evaluations, spent on more
    # images at fewer steps (N = 20 x N0, DPM-Solver++ 2M in 12 steps: with "modes", doubling N gained more
    # AS than doubling the steps), the "modes" selection and w = 3 for a LoRA too (a multistep solver is
    # less stable at the paper's w = 5); chosen by the time-to-evidence measurement on the committed zoo
    # and checked on held-out fine-tunes (docs/results.md#time-to-evidence)
    "default": {
        "images_per_n0": 20,
        "steps": 12,
        "scheduler": "dpmpp-2m",
        "selection": "modes",
        "finextract_w": {"dreambooth": 3.0, "lora": 3.0},
    },
}
#: The preset used when none is named (`--preset` left out, `preset=None`).
DEFAULT_PRESET = "default"
#: The preset settings that are `RunConfig` fields (the others are the spec's).
RUN_PRESET_SETTINGS = ("steps", "scheduler")
#: `caption` / `n0` value asking for it to be recovered / estimated from the fine-tune.
AUTO = "auto"
#: Adaptive N: images per round, per N0 (`finextract.adaptive`), and the stable rounds that stop it.
ROUND_PER_N0 = 10
STABLE_ROUNDS = 2
#: N generated when N0 is estimated and N is not given: the paper's 50 x N0 for N0 up to 10.
AUTO_NUM_IMAGES = 500
#: Methods whose guidance reads the training caption (every one but Eq. 6); the terms are the same
#: for both kinds of fine-tune, only the defaults of w and k differ.
CAPTION_METHODS = tuple(m for m in METHODS if any(t.caption == "prompt" for t in rule_for(m, KINDS[0]).terms))


def default_num_images(n0: int | str, preset: str | None = None) -> int:
    """N when it is not given: the preset's images per N0 (the default preset: 20, the paper's: 50) x N0, or
    `AUTO_NUM_IMAGES` for n0="auto". Raises ValueError: an unknown preset."""
    return AUTO_NUM_IMAGES if n0 == AUTO else preset_settings(preset)["images_per_n0"] * n0


def preset_settings(preset: str | None) -> dict:
    """The settings of procedure preset `preset` (None = `DEFAULT_PRESET`), a copy of its `PRESETS` entry.

    Raises:
        ValueError: an unknown name (the message lists the presets).
    """
    name = DEFAULT_PRESET if preset is None else preset
    if name not in PRESETS:
        raise ValueError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def preset_guidance_w(preset: str | None, method: str, kind: str, w: float | None = None) -> float | None:
    """The w a `method` guides with for a `kind` ("dreambooth" / "lora") of fine-tune: `w` when given,
    else for FineXtract (Eq. 13) the preset's `finextract_w[kind]`, else None (the method's own default,
    `finextract.rules.DEFAULTS`; Direct has none).

    Raises:
        ValueError: an unknown preset. KeyError: an unknown kind.
    """
    if w is not None or method != "finextract":
        return w
    return float(preset_settings(preset)["finextract_w"][kind])


def preset_run_options(preset: str | None, **given) -> dict:
    """`RunConfig.resolve` keywords: `given` (those not None win: an explicit option overrides the preset)
    with the preset's `RUN_PRESET_SETTINGS` filled in where missing.

    Raises:
        ValueError: an unknown preset.
    """
    settings = preset_settings(preset)
    given = {name: value for name, value in given.items() if value is not None}
    return {**{name: settings[name] for name in RUN_PRESET_SETTINGS}, **given}


def preset_record(spec: ExtractionSpec, config, kind: str | None = None) -> dict:
    """result.json's record of the procedure preset: {"name": spec.preset, "overrides": {setting: the value
    used} for each preset setting an explicit option changed} ("num_images" for "images_per_n0", "w" for
    "finextract_w" when the fine-tune's `kind` is given; {} when the run is the preset exactly).
    `config`: the run's `RunConfig`."""
    overrides = {}
    for name, value in preset_settings(spec.preset).items():
        if name == "images_per_n0":
            if spec.num_images != default_num_images(spec.n0, spec.preset):
                overrides["num_images"] = spec.num_images
        elif name == "finextract_w":
            if kind is not None and spec.method == "finextract" and spec.w is not None and spec.w != value[kind]:
                overrides["w"] = spec.w
        elif name in RUN_PRESET_SETTINGS:
            if getattr(config, name) != value:
                overrides[name] = getattr(config, name)
        elif getattr(spec, name) != value:
            overrides[name] = getattr(spec, name)
    return {"name": spec.preset, "overrides": overrides}


@dataclass(frozen=True)
class ExtractionSpec:
    """What one extraction asks for, validated (`ExtractionSpec.resolve`).

    Attributes:
        caption: the training caption c; "auto" reads it from the fine-tune's trainer metadata, else
            recovers it from the fine-tune's weights; None or ""
            when it is unknown (then only "finextract-uncond", Eq. 6, applies).
        n0: N0 >= 1, or "auto": from the fine-tune's trainer metadata, else estimated from the generated images.
        num_images: N, resolved (default the preset's: 20 x N0, `--preset paper` 50 x N0;
            `AUTO_NUM_IMAGES` with n0="auto").
        method: "finextract" | "finextract-uncond" | "cfg" | "direct" (resolved).
        w, k: guidance scale and Eq. 13 correction, as given (None: w = the preset's for FineXtract,
            `guidance_w`, the paper's default for the other methods; k = the paper's default per kind).
        train: the real training images for AS / A-ESR (a folder, a list of uint8 (H, W, 3) arrays, or
            the (images, paths) pair `finextract.images.read_images` returns), or None; not read here.
        train_as_is: compare them as they are, without the centre crop and resize to the model's side.
        sscd_preset: SSCD preprocessing preset ("sscd" / "paper"), None = "sscd" (used where SSCD loads).
        preset: the procedure preset's name (`PRESETS`; resolved: `DEFAULT_PRESET` when none was named).
            Its spec settings are resolved here; its `RUN_PRESET_SETTINGS` (steps) apply to the run's
            `RunConfig` (`preset_run_options`; `Extractor.extract` applies a named one).
        use_metadata: with caption / n0 "auto", read them from the fine-tune's trainer metadata first
            (`finextract.inspection.metadata_first`); False recovers / estimates them regardless.
        adaptive: generate in rounds and stop once the N0 extracted cliques are stable
            (`finextract.adaptive`); `num_images` is then the cap (not given: the paper's 50 x N0). round_images: images per round
            (resolved: 10 x N0 when adaptive, None otherwise). stable_rounds: consecutive stable rounds
            that stop it.
        selection: which N0 cliques are extracted (`finextract.clustering.selection`): "size" (the paper's),
            "density", "merged" or "modes" (resolved: the preset's, "modes" by default).
        on_budget: a threshold whose peel runs out of work budget is "skip"ped (the paper's) or its
            approximate peel is "keep"t (`finextract.clustering.fallback`).
        num_images_given: N was given (--num-images); False when it is `default_num_images`', which
            `with_n0` rescales once an "auto" N0 is read from the trainer metadata.
    """

    caption: str | None
    n0: int | str
    num_images: int
    method: str
    w: float | None = None
    k: float | None = None
    train: object = field(default=None, compare=False, repr=False)
    train_as_is: bool = False
    sscd_preset: str | None = None
    preset: str = DEFAULT_PRESET
    use_metadata: bool = True
    adaptive: bool = False
    round_images: int | None = None
    stable_rounds: int = STABLE_ROUNDS
    selection: str = PRESETS[DEFAULT_PRESET]["selection"]
    on_budget: str = "skip"
    num_images_given: bool = True

    def guidance_w(self, kind: str) -> float | None:
        """The w this extraction guides with for a `kind` of fine-tune (`preset_guidance_w`)."""
        return preset_guidance_w(self.preset, self.method, kind, self.w)

    def with_n0(self, n0: int) -> ExtractionSpec:
        """This spec once N0 = `n0` is known before generating (from the trainer metadata): n0 set, and N
        the preset's `default_num_images(n0, preset)` (default 20 x N0, paper 50 x N0) unless N was given.
        (N0 estimated from the generated images comes too late to change N: those keep `AUTO_NUM_IMAGES`.)

        Raises:
            ValueError: n0 not an integer >= 1, or above a given N (as `resolve`).
        """
        unresolved = replace(self, n0=n0, num_images=self.num_images if self.num_images_given else None)
        return ExtractionSpec.from_attributes(unresolved)  # resolved, checked again

    @classmethod
    def resolve(
        cls,
        caption: str | None,
        n0: int | str,
        *,
        num_images: int | None = None,
        method: str | None = None,
        w: float | None = None,
        k: float | None = None,
        train=None,
        train_as_is: bool = False,
        sscd_preset: str | None = None,
        preset: str | None = None,
        use_metadata: bool = True,
        adaptive: bool = False,
        round_images: int | None = None,
        stable_rounds: int = STABLE_ROUNDS,
        selection: str | None = None,
        on_budget: str = "skip",
    ) -> ExtractionSpec:
        """Fill in the defaults (the preset's N and selection; the method by the caption) and validate every setting.

        Args:
            as the attributes; num_images None = `default_num_images(n0, preset)` (a given one overrides
            the preset's); method None = "finextract", or "finextract-uncond" without a caption;
            preset None = `DEFAULT_PRESET`; selection None = the preset's.

        Returns:
            A frozen `ExtractionSpec`.

        Raises:
            ValueError: the message names the CLI option and the fix: n0 not an integer >= 1 or "auto";
                num_images < 1, below N0, or below `finextract.clustering.n0.MIN_IMAGES` with n0="auto";
                an unknown method, SSCD preset or procedure preset; a method that needs a caption without one; w / k not
                finite numbers, or given to a method that has none; adaptive with n0 "auto", round_images
                without adaptive or below 1, stable_rounds below 1; an unknown selection or on_budget.
        """
        if n0 != AUTO and (isinstance(n0, bool) or not isinstance(n0, int) or n0 < 1):
            raise ValueError(f"--n0 {n0!r}: must be an integer >= 1, or 'auto' to estimate it")
        if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int)):
            raise ValueError(f"--num-images {num_images!r}: must be an integer >= 1")
        preset = DEFAULT_PRESET if preset is None else preset
        num_images_given = num_images is not None
        num_images = default_num_images(n0, preset) if num_images is None else num_images  # checks preset
        if adaptive and not num_images_given and n0 != AUTO:  # the rounds decide N, up to the paper's 50 x N0
            num_images = max(num_images, IMAGES_PER_N0 * n0)
        if n0 == AUTO:
            if num_images < MIN_IMAGES:
                raise ValueError(
                    f"--num-images {num_images}: estimating N0 needs at least {MIN_IMAGES} images (--n0 auto); "
                    f"give --num-images {MIN_IMAGES} or more, or --n0 N"
                )
        elif num_images < n0:
            raise ValueError(
                f"--num-images {num_images} is below --n0 {n0}: generate at least N0 images (the paper: 50 x N0)"
            )
        method = method or ("finextract" if caption else "finextract-uncond")
        if method not in METHODS:
            raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
        if not caption and method in CAPTION_METHODS:
            raise ValueError(
                f"method {method!r} needs the training caption: give --caption TEXT (caption=...), --caption auto "
                "to recover it from the weights, or use --method finextract-uncond (Eq. 6)"
            )
        for name, value in (("w", w), ("k", k)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise ValueError(f"--{name} {value!r}: must be a finite number (or leave it out for the paper's)")
        rule_for(method, KINDS[0], w, k)  # w / k given to a method without them ("drop --k")
        if sscd_preset is not None and sscd_preset not in SSCD_PRESETS:
            raise ValueError(f"--sscd-preset {sscd_preset!r}: expected one of {', '.join(SSCD_PRESETS)}")
        round_images = _rounds(n0, num_images, adaptive, round_images, stable_rounds)
        selection = preset_settings(preset)["selection"] if selection is None else selection
        if selection not in SELECTIONS:
            raise ValueError(f"--selection {selection!r}: expected one of {', '.join(SELECTIONS)}")
        if on_budget not in ON_BUDGET:
            raise ValueError(f"--on-budget {on_budget!r}: expected one of {', '.join(ON_BUDGET)}")
        return cls(
            caption=caption,
            n0=n0,
            num_images=num_images,
            method=method,
            w=w,
            k=k,
            train=train,
            train_as_is=bool(train_as_is),
            sscd_preset=sscd_preset,
            preset=preset,
            use_metadata=bool(use_metadata),
            adaptive=bool(adaptive),
            round_images=round_images,
            stable_rounds=stable_rounds,
            selection=selection,
            on_budget=on_budget,
            num_images_given=num_images_given,
        )

    @classmethod
    def from_attributes(cls, source) -> ExtractionSpec:
        """`resolve` of an object's attributes of the same names (parsed command-line options, a manifest
        `finextract.fleet.manifest.Row`); those it lacks keep `resolve`'s defaults.

        Raises:
            ValueError: as `resolve`.
        """
        optional = ("num_images", "method", "w", "k", "train", "train_as_is", "sscd_preset", "preset", "use_metadata")
        optional += ("adaptive", "round_images", "stable_rounds", "selection", "on_budget")
        return cls.resolve(
            source.caption, source.n0, **{name: getattr(source, name) for name in optional if hasattr(source, name)}
        )


def _rounds(n0, num_images: int, adaptive: bool, round_images, stable_rounds) -> int | None:
    """The resolved images per round (None without adaptive); see `ExtractionSpec.resolve`'s errors."""
    for name, value in (("--round-images", round_images), ("--stable-rounds", stable_rounds)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} {value!r}: must be an integer >= 1")
    if not adaptive:
        if round_images is not None:
            raise ValueError(f"--round-images {round_images}: rounds apply only with --adaptive; add it or drop this")
        return None
    if n0 == AUTO:
        raise ValueError("--adaptive needs a given --n0 (its stopping rule compares N0 cliques); drop --n0 auto")
    return ROUND_PER_N0 * n0 if round_images is None else round_images
