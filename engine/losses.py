"""Policy-gradient losses (pure math: torch only, no config, no logging, no .item()).

Every loss in ``LOSSES`` follows one calling convention, so the learner can swap them by name:

    loss, stats = LOSSES[name](logp_NT, old_logp_NT, adv, mask_NT, *, entropy_NT=None, denom=None, **hyper)

Shape letters: N = sequences, T = padded tokens (any alignment, as long as all [N, T] tensors share it).
- logp_NT: float [N, T], log-prob of each sampled token under the learner's policy (requires grad).
- old_logp_NT: float [N, T], the same under the behaviour (sampling) policy; no grad.
- adv: float [N] (one advantage per sequence, broadcast to its tokens) or float [N, T] (per token).
- mask_NT: bool or {0,1} float [N, T], 1 = a trained (generated) token; everything else has zero gradient.
- entropy_NT: float [N, T], policy entropy of each position; GRPO ignores it, ESPO will need it.
- denom: the normaliser of the aggregation, when this call sees only part of the batch (a data-parallel
  shard or a micro-batch): the total number of trained tokens ("token_mean") or of sequences with at least
  one trained token ("seq_mean_token_mean") in the whole batch. None = this call's own count.
- stats: detached scalar tensors, averaged over this call's trained tokens (ratio_max is a max).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


class PolicyLoss(Protocol):
    def __call__(
        self,
        logp_NT: Tensor,
        old_logp_NT: Tensor,
        adv: Tensor,
        mask_NT: Tensor,
        *,
        entropy_NT: Tensor | None = None,
        denom: float | Tensor | None = None,
        **hyper,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


def aggregate(loss_NT: Tensor, mask_NT: Tensor, aggregation: str,
              denom: float | Tensor | None = None) -> Tensor:
    """Reduce per-token losses to a scalar.

    "token_mean" (DAPO): sum over all trained tokens of the batch / their number; long responses weigh more.
    "seq_mean_token_mean" (GRPO paper): mean over each sequence's trained tokens, then mean over the sequences
    that have any; every response weighs the same.
    """
    m_NT = mask_NT.to(loss_NT.dtype)
    if aggregation == "token_mean":
        total = (loss_NT * m_NT).sum()
        return total / (m_NT.sum().clamp(min=1) if denom is None else denom)
    if aggregation == "seq_mean_token_mean":
        n_N = m_NT.sum(-1)
        seq_N = (loss_NT * m_NT).sum(-1) / n_N.clamp(min=1)
        has_N = (n_N > 0).to(loss_NT.dtype)
        return (seq_N * has_N).sum() / (has_N.sum().clamp(min=1) if denom is None else denom)
    raise ValueError(f"aggregation={aggregation!r} is unknown; choose one of {AGGREGATIONS}")


def grpo_loss(
    logp_NT: Tensor,
    old_logp_NT: Tensor,
    adv: Tensor,
    mask_NT: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    aggregation: str = "token_mean",
    entropy_NT: Tensor | None = None,
    denom: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level PPO-clip surrogate of GRPO/DAPO (ALGORITHMS.md A.2) -> (scalar loss, stats).

    Per token: r = exp(logp - old_logp), loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A).
    At r = 1 the loss is -mean(A) over the aggregation, and its gradient is -A * dlogp.
    The clip removes the gradient only where it binds: r < 1 - eps_low with A < 0 ("low"), and
    r > 1 + eps_high with A > 0 ("high"); clip_frac_low/high count exactly those tokens.
    approx_kl is the k3 estimator of KL(old || new), mean over tokens of (r - 1) - log r.
    entropy_NT is accepted for interface parity with ESPO and ignored.
    """
    del entropy_NT
    adv_NT = adv[:, None] if adv.dim() == 1 else adv
    if adv_NT.shape[0] != logp_NT.shape[0] or adv_NT.dim() != 2:
        raise ValueError(f"advantages of shape {tuple(adv.shape)} do not fit logp of shape "
                         f"{tuple(logp_NT.shape)}: pass one per sequence [N] or one per token [N, T]")
    adv_NT = adv_NT.to(logp_NT.dtype)
    log_ratio_NT = (logp_NT - old_logp_NT).clamp(-20.0, 20.0)  # exp() stays finite on wild off-policy tokens
    ratio_NT = torch.exp(log_ratio_NT)
    unclipped_NT = -adv_NT * ratio_NT
    clipped_NT = -adv_NT * ratio_NT.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss_NT = torch.maximum(unclipped_NT, clipped_NT)
    loss = aggregate(loss_NT, mask_NT, aggregation, denom)

    with torch.no_grad():
        m_NT = mask_NT.to(logp_NT.dtype)
        n = m_NT.sum().clamp(min=1)
        ratio_NT, log_ratio_NT = ratio_NT.detach(), log_ratio_NT.detach()
        low_NT = ((ratio_NT < 1.0 - clip_eps_low) & (adv_NT < 0)).to(m_NT.dtype) * m_NT
        high_NT = ((ratio_NT > 1.0 + clip_eps_high) & (adv_NT > 0)).to(m_NT.dtype) * m_NT
        stats = {
            "clip_frac_low": low_NT.sum() / n,
            "clip_frac_high": high_NT.sum() / n,
            "clip_frac": (low_NT + high_NT).sum() / n,
            "approx_kl": (((ratio_NT - 1.0) - log_ratio_NT) * m_NT).sum() / n,
            "ratio_mean": (ratio_NT * m_NT).sum() / n,
            "ratio_max": torch.where(m_NT > 0, ratio_NT, torch.zeros_like(ratio_NT)).max(),
        }
    return loss, stats


LOSSES: dict[str, PolicyLoss] = {"grpo": grpo_loss}
