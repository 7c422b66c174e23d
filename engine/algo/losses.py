"""Policy-gradient losses (pure math: torch only, no config, no logging, no .item()).

Every loss in ``LOSSES`` follows one calling convention, so the learner can swap them by name:

    loss, stats = LOSSES[name](logp_NT, old_logp_NT, adv, mask_NT, *, entropy_NT=None, denom=None, **hyper)

Shape letters: N = sequences, T = padded tokens (any alignment, as long as all [N, T] tensors share it).
- logp_NT: float [N, T], log-prob of each sampled token under the learner's policy (requires grad).
- old_logp_NT: float [N, T], the same under the behaviour (sampling) policy; no grad.
- adv: float [N] (one advantage per sequence, broadcast to its tokens) or float [N, T] (per token).
- mask_NT: bool or {0,1} float [N, T], 1 = a trained (generated) token; everything else has zero gradient.
- entropy_NT: float [N, T], old-policy entropy of each position; only ESPO uses it (required there).
- denom: the normaliser of the aggregation, when this call sees only part of the batch (a data-parallel
  shard or a micro-batch): the total number of trained tokens ("token_mean") or of sequences with at least
  one trained token ("seq_mean_token_mean") in the whole batch. None = this call's own count.
- stats: detached scalar tensors, averaged over this call's trained tokens (ratio_max is a max).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from engine.algo.loss_stats import clip_stats

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


def _token_adv(adv: Tensor, logp_NT: Tensor) -> Tensor:
    """[N] or [N, T] advantages -> float [N, T] (or [N, 1], which broadcasts) in logp's dtype."""
    adv_NT = adv[:, None] if adv.dim() == 1 else adv
    if adv_NT.dim() != 2 or adv_NT.shape[0] != logp_NT.shape[0]:
        raise ValueError(f"advantages of shape {tuple(adv.shape)} do not fit logp of shape "
                         f"{tuple(logp_NT.shape)}: pass one per sequence [N] or one per token [N, T]")
    return adv_NT.to(logp_NT.dtype)


def _masked_logps(logp_NT: Tensor, old_logp_NT: Tensor, mask_NT: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Zero logp/old_logp off the mask (padding may hold -inf or garbage) -> (logp_NT, old_logp_NT, m_NT float).

    torch.where (not a product) keeps the gradient of masked positions an exact 0, never NaN.
    """
    on_NT = mask_NT.to(torch.bool)
    logp_NT = torch.where(on_NT, logp_NT, torch.zeros_like(logp_NT))
    old_NT = torch.where(on_NT, old_logp_NT.to(logp_NT.dtype), torch.zeros_like(logp_NT))
    return logp_NT, old_NT, on_NT.to(logp_NT.dtype)


def gspo_loss(
    logp_NT: Tensor,
    old_logp_NT: Tensor,
    adv: Tensor,
    mask_NT: Tensor,
    *,
    clip_eps_low: float = 3e-4,
    clip_eps_high: float = 4e-4,
    aggregation: str = "seq_mean_token_mean",
    entropy_NT: Tensor | None = None,
    denom: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token surrogate (ALGORITHMS.md A.2) -> (scalar loss, stats).

    s_i = exp(mean over trained tokens of (logp - old_logp)), the geometric mean of the token ratios
    (its log is clamped to +-20). Token ratio s_{i,t} = sg[s_i] * exp(logp - sg[logp]): its value is s_i for
    every token of sequence i, its gradient is s_i * dlogp_t. Per token:
    loss = -min(s_{i,t} A, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A), so a clip that binds removes the
    gradient of the whole sequence (when A is per sequence). With per-sequence A and seq_mean_token_mean,
    loss and gradient equal those of sequence-level GSPO; per-token A [N, T] is the GSPO-token extension.
    Default clip (3e-4, 4e-4) and aggregation (mean over tokens, then over sequences) follow the GSPO paper.
    Stats as grpo_loss; ratio_* describe s_i (per token), approx_kl the per-token ratio.
    entropy_NT is accepted for interface parity and ignored.
    """
    del entropy_NT
    adv_NT = _token_adv(adv, logp_NT)
    logp_NT, old_NT, m_NT = _masked_logps(logp_NT, old_logp_NT, mask_NT)
    d_NT = (logp_NT - old_NT).detach()
    log_s_N = ((d_NT * m_NT).sum(-1) / m_NT.sum(-1).clamp(min=1)).clamp(-20.0, 20.0)
    s_NT = torch.exp(log_s_N[:, None] + (logp_NT - logp_NT.detach()))
    lower, upper = 1.0 - clip_eps_low, 1.0 + clip_eps_high
    loss_NT = torch.maximum(-adv_NT * s_NT, -adv_NT * s_NT.clamp(lower, upper))
    loss = aggregate(loss_NT, m_NT, aggregation, denom)
    stats, _, _ = clip_stats(s_NT, lower, upper, adv_NT, d_NT.clamp(-20.0, 20.0), m_NT)
    return loss, stats


def cispo_loss(
    logp_NT: Tensor,
    old_logp_NT: Tensor,
    adv: Tensor,
    mask_NT: Tensor,
    *,
    clip_eps_low: float = 1.0,
    clip_eps_high: float = 5.0,
    aggregation: str = "token_mean",
    entropy_NT: Tensor | None = None,
    denom: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clipped, stop-gradient IS weight -> (scalar loss, stats).

    w_t = sg[clip(r_t, 1 - eps_low, 1 + eps_high)], r_t = exp(logp - old_logp) (log clamped to +-20).
    Per token: loss = -A * w_t * exp(logp - sg[logp]). Its gradient is the CISPO gradient
    -A * w_t * dlogp_t for EVERY token (no token is dropped, unlike PPO-clip); the exp(logp - sg[logp])
    factor (value 1) only makes the loss value read -A * w_t (so on-policy it equals GRPO's -mean(A))
    instead of the uninformative -A * w_t * logp. Defaults: eps_low = 1 (no lower bound, as in the
    paper, which tuned only eps_high) and eps_high = 5; token_mean aggregation (the paper's 1 / sum|o_i|).
    clip_frac_low/high count tokens whose weight was clipped (r < 1 - eps_low / r > 1 + eps_high) whatever
    the sign of A, since CISPO clips the weight, not the objective. entropy_NT is accepted and ignored.
    """
    del entropy_NT
    adv_NT = _token_adv(adv, logp_NT)
    logp_NT, old_NT, m_NT = _masked_logps(logp_NT, old_logp_NT, mask_NT)
    lr_NT = (logp_NT - old_NT).detach().clamp(-20.0, 20.0)
    r_NT = torch.exp(lr_NT)
    w_NT = r_NT.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss_NT = -adv_NT * w_NT * torch.exp(logp_NT - logp_NT.detach())
    loss = aggregate(loss_NT, m_NT, aggregation, denom)
    stats, _, _ = clip_stats(r_NT, 1.0 - clip_eps_low, 1.0 + clip_eps_high, adv_NT, lr_NT, m_NT)
    with torch.no_grad():  # CISPO clips the weight whatever the sign of A: count both sides for every token
        n = m_NT.sum().clamp(min=1)
        stats["clip_frac_low"] = ((r_NT < 1.0 - clip_eps_low).to(m_NT.dtype) * m_NT).sum() / n
        stats["clip_frac_high"] = ((r_NT > 1.0 + clip_eps_high).to(m_NT.dtype) * m_NT).sum() / n
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
    return loss, stats


# engine.algo.espo imports nothing from this module, so importing it here (after aggregate) cannot cycle
from engine.algo.espo import espo_loss

LOSSES: dict[str, PolicyLoss] = {"grpo": grpo_loss, "gspo": gspo_loss, "cispo": cispo_loss, "espo": espo_loss}
