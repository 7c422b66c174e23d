"""Policy losses by name, torch-free: the one place that maps ``learner.loss`` to code and to its config section.

Each entry names the loss class (``"module:Class"``, imported on first use by ``engine.algo.loss_seam.build_loss``,
so this module and configs/schema.py import no torch), its config dataclass and its aggregations. configs/schema.py
checks ``learner.loss`` against ``LOSS_NAMES``, ``learner.aggregation`` against ``AGGREGATION_CHOICES``, and gives
LearnerConfig one nested section per entry, named after it: ``learner.<name>.<field>`` (e.g. learner.espo.alpha).

Adding a loss (e.g. Dr.GRPO, engine/algo/dr_grpo.py) = two files:
  1. engine/algo/<name>.py: a ``PolicyLoss`` subclass (engine/algo/loss_seam.py) whose ``__call__(inputs)`` is pure
     math over ``LossInputs``; reduce with ``engine.algo.aggregation.aggregate``;
  2. here: its config dataclass (``Literal`` for choices, checked by ``check_choices(self, "learner.<name>.")`` first in
     ``__post_init__``; other checks there too, naming ``learner.<name>.<field>``) and one ``"<name>": Loss(...)``
     line in ``LOSSES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from configs.choices import check_choices

# How the per-token losses of a batch become one scalar (engine/algo/aggregation.py implements each):
#   token_mean               (DAPO; verl "token-mean") sum over all trained tokens / their number
#   seq_mean_token_mean      (GRPO paper; verl "seq-mean-token-mean") mean over each sequence's tokens, then over
#                            the sequences
#   seq_mean_group_mean      (ESPO Eq. 5) mean within each entropy group, over the groups, over the sequences
#   seq_mean_token_sum_norm  (Dr.GRPO; verl "seq-mean-token-sum-norm", TRL loss_type="dr_grpo") each sequence's
#                            token sum / a constant (the generation limit), mean over the sequences
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_group_mean", "seq_mean_token_sum_norm")
AGGREGATION_CHOICES: tuple[str, ...] = ("auto", *AGGREGATIONS)  # auto = the loss's default_aggregation
TOKEN_LEVEL = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")  # no entropy groups needed
GSPO_FORMS: tuple[str, ...] = ("token", "sequence")  # learner.gspo.form (engine.algo.losses.gspo_loss)


def _positive(key: str, value: float, upper: float | None = None) -> None:
    if not (value > 0 and (upper is None or value <= upper)):
        span = "positive" if upper is None else f"in (0, {upper:g}]"
        raise ValueError(f"{key}={value!r} is invalid: it must be {span}")


def _dual_clip(key: str, value: float) -> None:
    if not (value == 0 or value > 1):
        raise ValueError(f"{key}={value!r} is invalid: it must be 0 (off) or > 1 (verl's clip_ratio_c is 3)")


@dataclass
class GRPOConfig:
    """GRPO/DAPO token-level PPO clip [1 - clip_eps_low, 1 + clip_eps_high] (ALGORITHMS.md A.2)."""

    clip_eps_low: float = 0.2  # token ratio clipped below at 1 - this (where A < 0)
    clip_eps_high: float = 0.28  # and above at 1 + this (where A > 0); DAPO's clip-higher
    dual_clip_c: float = 0.0  # verl's dual clip (clip_ratio_c, 3 there): where A < 0 the token loss is at most
    # c * |A| (no gradient beyond ratio c); 0 = off (engine/algo/clip.py)

    def __post_init__(self) -> None:
        _positive("learner.grpo.clip_eps_low", self.clip_eps_low, 1.0)
        _positive("learner.grpo.clip_eps_high", self.clip_eps_high)
        _dual_clip("learner.grpo.dual_clip_c", self.dual_clip_c)


@dataclass
class GSPOConfig:
    """GSPO sequence-level clip (the GSPO paper's 3e-4 / 4e-4), GSPO-token or sequence form."""

    clip_eps_low: float = 3e-4  # sequence ratio (geometric mean of token ratios) clipped below at 1 - this
    clip_eps_high: float = 4e-4  # and above at 1 + this
    form: Literal[GSPO_FORMS] = "token"  # token: GSPO-token (each token its own advantage); sequence: the paper's
    # one loss per sequence, min(s_i A_i, clip(s_i) A_i); equal for per-sequence advantages
    dual_clip_c: float = 0.0  # verl's dual clip (clip_ratio_c, 3 there): where A < 0 the token loss is at most
    # c * |A| (no gradient beyond ratio c); 0 = off (engine/algo/clip.py)

    def __post_init__(self) -> None:
        check_choices(self, "learner.gspo.")
        _positive("learner.gspo.clip_eps_low", self.clip_eps_low, 1.0)
        _positive("learner.gspo.clip_eps_high", self.clip_eps_high)
        _dual_clip("learner.gspo.dual_clip_c", self.dual_clip_c)


@dataclass
class CISPOConfig:
    """CISPO: upper bound of the clipped importance weight (no lower bound, as in the paper)."""

    clip_eps_high: float = 5.0  # the stop-gradient importance weight is clipped above at 1 + this, so the
    # weight cap is 6 by default (TRL's epsilon_high is the cap itself: its 5 is 4 here)

    def __post_init__(self) -> None:
        _positive("learner.cispo.clip_eps_high", self.clip_eps_high)


@dataclass
class ESPOConfig:
    """ESPO (ALGORITHMS.md A.5-A.7): eps_tau = alpha * mean entropy of the group / ln|V|; the top rho of each
    response's tokens (or of the batch's, entropy_scope=batch) by old-policy entropy form the high group."""

    alpha: float = 0.02  # clip scale: eps_tau = alpha * mean entropy of the group / ln|V| (spec A.6)
    rho: float = 0.2  # fraction of a response's trained tokens in the high-entropy group (spec A.5)
    ratio_mode: Literal["gspo_token", "literal"] = "gspo_token"  # spec A.7
    entropy_scope: Literal["sequence", "batch"] = "sequence"  # spec A.5; batch: one threshold over all ranks
    dual_clip_c: float = 0.0  # verl's dual clip (clip_ratio_c, 3 there): where A < 0 the token loss is at most
    # c * |A| (no gradient beyond ratio c); 0 = off, the spec's form (engine/algo/clip.py)

    def __post_init__(self) -> None:
        check_choices(self, "learner.espo.")
        _positive("learner.espo.alpha", self.alpha)
        _positive("learner.espo.rho", self.rho, 1.0)
        _dual_clip("learner.espo.dual_clip_c", self.dual_clip_c)


@dataclass
class DrGRPOConfig:
    """Dr.GRPO (arXiv 2503.20783): GRPO's token clip, each response's token sum divided by one constant (the
    generation limit, task.max_answer_tokens) instead of its own length."""

    clip_eps_low: float = 0.2  # token ratio clipped below at 1 - this, as grpo
    clip_eps_high: float = 0.28  # and above at 1 + this
    dual_clip_c: float = 0.0  # verl's dual clip (clip_ratio_c, 3 there): where A < 0 the token loss is at most
    # c * |A| (no gradient beyond ratio c); 0 = off (engine/algo/clip.py)

    def __post_init__(self) -> None:
        _positive("learner.dr_grpo.clip_eps_low", self.clip_eps_low, 1.0)
        _positive("learner.dr_grpo.clip_eps_high", self.clip_eps_high)
        _dual_clip("learner.dr_grpo.dual_clip_c", self.dual_clip_c)


@dataclass(frozen=True)
class Loss:
    impl: str  # "module:Class", a PolicyLoss subclass taking (config section, LossContext)
    config: type  # its config dataclass: the section learner.<name>
    default_aggregation: str  # what learner.aggregation=auto means for it
    aggregations: tuple[str, ...] = TOKEN_LEVEL  # the aggregations it supports
    adv_scale_by_std: bool = True  # group advantages divided by the group's std (False: Dr.GRPO's R - mean R)


LOSSES: dict[str, Loss] = {
    "espo": Loss("engine.algo.espo:ESPO", ESPOConfig, "seq_mean_group_mean", AGGREGATIONS),
    "gspo": Loss("engine.algo.losses:GSPO", GSPOConfig, "seq_mean_token_mean"),
    "grpo": Loss("engine.algo.losses:GRPO", GRPOConfig, "token_mean"),
    "cispo": Loss("engine.algo.losses:CISPO", CISPOConfig, "token_mean"),
    "dr_grpo": Loss("engine.algo.dr_grpo:DrGRPO", DrGRPOConfig, "seq_mean_token_sum_norm", adv_scale_by_std=False),
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def resolve_aggregation(loss: str, aggregation: str) -> str:
    """``learner.aggregation`` for ``learner.loss`` (auto -> the loss's default); ValueError if it cannot apply."""
    entry = LOSSES[loss]
    agg = entry.default_aggregation if aggregation == "auto" else aggregation
    if agg not in entry.aggregations:
        raise ValueError(f"learner.aggregation={aggregation!r} is invalid for learner.loss={loss}: choose auto or "
                         f"{', '.join(entry.aggregations)} (entropy groups exist only in espo)")
    return agg


def counts_tokens(aggregation: str) -> bool:
    """True when ``aggregation``'s normaliser counts trained tokens, False when it counts sequences."""
    return aggregation == "token_mean"
