"""The loss seam: one record of loss inputs, the base class of every registered loss, and ``build_loss``.

Shape letters: N = sequences, T = padded tokens (any alignment, as long as all [N, T] tensors share it).

Flow (actors/learner.py): the learner fills a ``LossInputs`` per shard, advantage transforms (engine/algo/transforms.py,
pure functions ``LossInputs -> (LossInputs, sums)``) rewrite it, and the loss reduces it to a scalar:

    loss = build_loss("espo", cfg.learner.espo, aggregation="auto", vocab_size=V, norm_len=L)
    batch = loss.batch_statistics(gathered) if loss.batch_fields else {}   # once per batch, all ranks gathered
    value, stats = loss(inputs, batch)                                     # per shard / mini-batch

Names and config sections live in engine/algo/loss_registry.py (torch-free).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from engine.algo.aggregation import token_adv
from engine.algo.loss_registry import LOSSES, resolve_aggregation


@dataclass(frozen=True)
class LossInputs:
    """Everything a policy loss reads, for one call (a whole batch, a shard or a micro-batch).

    logp_NT: float [N, T] log-prob of each sampled token under the learner's policy (requires grad).
    old_logp_NT: float [N, T] the same under the policy the ratio is taken against (behaviour, or proximal under
        decoupled PPO); no grad.
    adv: float [N] (one advantage per sequence, broadcast to its tokens) or [N, T] (per token, e.g. RL-ZVP).
    mask_NT: bool or {0,1} [N, T], 1 = a trained (generated) token; everything else has zero gradient.
    entropy_NT: float [N, T] detached old-policy full-vocabulary entropy of each position (ESPO, RL-ZVP).
    weight_NT: float [N, T] per-token importance weight multiplying the advantage (decoupled PPO's truncated
        behaviour -> proximal weight); None = 1.
    denom: the aggregation's normaliser when this call sees part of the batch (see aggregation.aggregate).
    """

    logp_NT: Tensor
    old_logp_NT: Tensor
    adv: Tensor
    mask_NT: Tensor
    entropy_NT: Tensor | None = None
    weight_NT: Tensor | None = None
    denom: float | Tensor | None = None

    def token_advantages(self) -> Tensor:
        """The advantage each loss uses: adv broadcast to [N, T] (or [N, 1]) times weight_NT when set."""
        adv_NT = token_adv(self.adv, self.logp_NT)
        return adv_NT if self.weight_NT is None else adv_NT * self.weight_NT


@dataclass(frozen=True)
class LossContext:
    """What a loss may need from the run beyond its own section: |V| (ESPO's adaptive clip) and the generation
    limit (the constant of the seq_mean_token_sum_norm aggregation)."""

    vocab_size: int
    norm_len: int


class PolicyLoss:
    """A registered loss: built from its config section, called on ``LossInputs`` -> (scalar loss, stats).

    stats: detached 0-dim tensors, averaged over the call's trained tokens (``ratio_max`` is a max), at least
    clip_frac, clip_frac_low, clip_frac_high, approx_kl, ratio_mean, ratio_max.

    Batch-global statistics hook: a loss that needs a statistic of the whole batch before it is split (ESPO's
    batch-scope entropy threshold) lists the ``LossInputs`` fields it needs in ``batch_fields``. The learner then
    gathers, once per batch, those fields' values at every trained token of every shard and rank (1-D tensors),
    passes them to ``batch_statistics`` and hands the result to every call as ``batch``.
    """

    batch_fields: tuple[str, ...] = ()

    def __init__(self, cfg, ctx: LossContext, aggregation: str) -> None:
        self.cfg, self.ctx, self.aggregation = cfg, ctx, aggregation

    def batch_statistics(self, gathered: Mapping[str, Tensor]) -> dict[str, Tensor]:
        del gathered
        return {}

    def reduction(self, x: LossInputs) -> dict:
        """The aggregation keywords every pure loss function takes."""
        return {"aggregation": self.aggregation, "denom": x.denom, "norm_len": self.ctx.norm_len}

    def __call__(self, x: LossInputs, batch: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


def loss_class(name: str) -> type[PolicyLoss]:
    """The class registered as ``name`` in engine/algo/loss_registry.py (imported now)."""
    if name not in LOSSES:
        raise ValueError(f"learner.loss={name!r} is invalid: choose {', '.join(LOSSES)}")
    module, _, attr = LOSSES[name].impl.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_loss(name: str, cfg, *, aggregation: str = "auto", vocab_size: int, norm_len: int) -> PolicyLoss:
    """The loss ``name`` with its config section ``cfg`` (e.g. cfg.learner.espo), ``learner.aggregation``
    resolved (auto -> the loss's default), |V| and the generation limit."""
    cls = loss_class(name)
    if not isinstance(cfg, LOSSES[name].config):
        raise TypeError(f"learner.loss={name} takes a {LOSSES[name].config.__name__}, got {type(cfg).__name__}")
    return cls(cfg, LossContext(vocab_size=vocab_size, norm_len=norm_len), resolve_aggregation(name, aggregation))
