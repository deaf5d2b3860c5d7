"""A guidance rule as data: which UNet, which conditioning, which coefficient.

Every method FineXtract compares is a linear combination of at most two UNet outputs,

    model_output = coef_a * output_A(x_t, t) + coef_b * output_B(x_t, t),

so a rule is a tuple of `Term`s, and the engine fuses every rule the same way: one
`finextract.engine.denoiser.GuidedDenoiser` per (pair, rule). Which rule a method uses, with the paper's
defaults, is the method's business (`finextract.rules.rule_for`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

ModelName = Literal["base", "finetuned"]
CaptionKind = Literal["prompt", "empty"]


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
