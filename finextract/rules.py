"""The methods FineXtract compares, as guidance rules with the paper's defaults (Eq. 6, Eq. 13, CFG, Direct).

Each method is a linear combination of at most two UNet noise predictions
(`finextract.engine.guidance.GuidanceRule`), which the engine fuses into one denoiser. Notation as in
the paper: `eps_base` is the pretrained UNet (theta), `eps_ft` the fine-tuned one (theta'), `c` the
caption, `""` the empty caption.
"""

from __future__ import annotations

from .engine.guidance import GuidanceRule, Term

__all__ = ["DEFAULTS", "KINDS", "METHODS", "GuidanceRule", "Term", "rule_for", "rule_params"]

METHODS = ("finextract", "finextract-uncond", "cfg", "direct")
KINDS = ("dreambooth", "lora")

# Paper defaults (Sec. 5.1): DreamBooth w=3, k=-0.02; LoRA w=5, k=0; CFG and unconditional w=3.
DEFAULTS = {
    ("finextract", "dreambooth"): {"w": 3.0, "k": -0.02},
    ("finextract", "lora"): {"w": 5.0, "k": 0.0},
    ("finextract-uncond", "dreambooth"): {"w": 3.0},
    ("finextract-uncond", "lora"): {"w": 3.0},
    ("cfg", "dreambooth"): {"w": 3.0},
    ("cfg", "lora"): {"w": 3.0},
    ("direct", "dreambooth"): {},
    ("direct", "lora"): {},
}


def rule_for(method: str, kind: str, w: float | None = None, k: float | None = None) -> GuidanceRule:
    """The guidance rule of `method` for a `kind` of fine-tune, with the paper's defaults.

    - "finextract" (caption known, paper Eq. 13):
      `eps = eps_ft(c) + (w-1)(eps_ft(c) - eps_base("")) + k eps_base("")`
      = `w * eps_ft(c) + (1 - w + k) * eps_base("")`.
    - "finextract-uncond" (paper Eq. 6, empty caption on both sides):
      `eps = eps_ft("") + (w-1)(eps_ft("") - eps_base(""))` = `w * eps_ft("") + (1 - w) * eps_base("")`.
    - "cfg" (classifier-free guidance on the fine-tune, the paper's baseline):
      `eps = eps_ft("") + w (eps_ft(c) - eps_ft(""))` = `w * eps_ft(c) + (1 - w) * eps_ft("")`.
    - "direct" (plain text-to-image on the fine-tune): `eps = eps_ft(c)`.

    Args:
        method: one of "finextract", "finextract-uncond", "cfg", "direct".
        kind: "dreambooth" (full fine-tune) or "lora"; selects the defaults.
        w: guidance scale; None = default (DreamBooth 3.0, LoRA 5.0 for "finextract"; 3.0 for
            "finextract-uncond" and "cfg"). "direct" has none and refuses one.
        k: Eq. 13's correction on `eps_base("")`; None = default (DreamBooth -0.02, LoRA 0.0).
            Only "finextract" takes it.

    Returns:
        A `GuidanceRule`; term order is fine-tuned term first.

    Raises:
        ValueError: unknown method or kind, or `w` / `k` given to a method that has none.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected 'dreambooth' or 'lora'")
    defaults = DEFAULTS[(method, kind)]
    if w is not None and "w" not in defaults:
        raise ValueError(f"method {method!r} has no guidance scale; drop --w")
    if k is not None and "k" not in defaults:
        raise ValueError(f"method {method!r} has no k (only 'finextract', Eq. 13, does); drop --k")
    w = float(defaults["w"] if w is None else w) if "w" in defaults else None
    k = float(defaults["k"] if k is None else k) if "k" in defaults else None

    if method == "finextract":
        terms = (Term("finetuned", "prompt", w), Term("base", "empty", 1.0 - w + k))
    elif method == "finextract-uncond":
        terms = (Term("finetuned", "empty", w), Term("base", "empty", 1.0 - w))
    elif method == "cfg":
        terms = (Term("finetuned", "prompt", w), Term("finetuned", "empty", 1.0 - w))
    else:
        terms = (Term("finetuned", "prompt", 1.0),)
    return GuidanceRule(method, terms)


def rule_params(method: str, kind: str, w: float | None = None, k: float | None = None) -> dict:
    """The resolved `w` / `k` of `rule_for(method, kind, w, k)` (defaults filled in), for reports."""
    rule_for(method, kind, w, k)  # validates
    defaults = DEFAULTS[(method, kind)]
    params = {}
    if "w" in defaults:
        params["w"] = float(defaults["w"] if w is None else w)
    if "k" in defaults:
        params["k"] = float(defaults["k"] if k is None else k)
    return params
