"""Guidance rules as data: which UNet, which caption, which coefficient.

Every method FineXtract compares is a linear combination of at most two UNet noise predictions,

    eps = coef_a * eps_A(x_t, t) + coef_b * eps_B(x_t, t),

so a rule is a tuple of `Term`s and every backend fuses every rule the same way (one batched call,
then `finextract.kernels.guidance_ddim.guided_ddim_step`). Notation as in the paper: `eps_base` is
the pretrained UNet (theta), `eps_ft` the fine-tuned one (theta'), `c` the caption, `""` empty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

ModelName = Literal["base", "finetuned"]
CaptionKind = Literal["prompt", "empty"]

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


@dataclass(frozen=True)
class Term:
    """One UNet evaluation of a rule, `coef * eps_<model>(x_t, t, <caption>)`.

    Attributes:
        model: "base" (pretrained theta) or "finetuned" (theta').
        caption: "prompt" (the caption c) or "empty" (the empty caption "").
        coef: the term's coefficient in the linear combination (float, any sign).
    """

    model: ModelName
    caption: CaptionKind
    coef: float

    def __post_init__(self) -> None:
        if self.model not in ("base", "finetuned"):
            raise ValueError(f"Term.model={self.model!r}: expected 'base' or 'finetuned'")
        if self.caption not in ("prompt", "empty"):
            raise ValueError(f"Term.caption={self.caption!r}: expected 'prompt' or 'empty'")

    @property
    def key(self) -> tuple[str, str]:
        """(model, caption): the text embedding this term needs (see `encode_text`)."""
        return (self.model, self.caption)


@dataclass(frozen=True)
class GuidanceRule:
    """A noise-prediction rule `eps = sum(term.coef * eps_term)` over one or two `Term`s.

    Attributes:
        name: the method name ("finextract", "finextract-uncond", "cfg", "direct" or custom).
        terms: one or two terms, each naming a distinct (model, caption) evaluation.
    """

    name: str
    terms: tuple[Term, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.terms) <= 2:
            raise ValueError(f"rule {self.name!r} has {len(self.terms)} terms; a rule needs 1 or 2")
        if len({term.key for term in self.terms}) != len(self.terms):
            raise ValueError(f"rule {self.name!r} evaluates the same (model, caption) twice; merge the terms")

    @property
    def coefs(self) -> tuple[float, float]:
        """(coef_a, coef_b), with coef_b = 0.0 for a one-term rule."""
        return (self.terms[0].coef, self.terms[1].coef if len(self.terms) == 2 else 0.0)

    def to_dict(self) -> dict:
        """JSON-ready form (for manifests and results)."""
        return {"name": self.name, "terms": [asdict(term) for term in self.terms]}


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
