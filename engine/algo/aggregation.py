"""Masking and aggregation shared by every policy loss (pure math: torch only, no config, no .item()).

Shape letters: N = sequences, T = padded tokens. The aggregation names are those of engine/algo/loss_registry.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.algo.loss_registry import AGGREGATIONS


def token_adv(adv: Tensor, logp_NT: Tensor) -> Tensor:
    """[N] or [N, T] advantages -> float [N, T] (or [N, 1], which broadcasts) in logp's dtype."""
    adv_NT = adv[:, None] if adv.dim() == 1 else adv
    if adv_NT.dim() != 2 or adv_NT.shape[0] != logp_NT.shape[0]:
        raise ValueError(f"advantages of shape {tuple(adv.shape)} do not fit logp of shape "
                         f"{tuple(logp_NT.shape)}: pass one per sequence [N] or one per token [N, T]")
    return adv_NT.to(logp_NT.dtype)


def masked_inputs(logp_NT: Tensor, old_logp_NT: Tensor, adv: Tensor, mask_NT: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero logp, old_logp and the advantages off the mask -> (logp_NT, old_logp_NT, adv_NT [N, T], m_NT float).

    adv: [N] or [N, T] (as token_adv). Padding may hold NaN, +-inf or garbage in any of them: torch.where (not a
    product) runs before any arithmetic, so a padded position adds exactly 0 to the loss and its gradient is an
    exact 0, never NaN.
    """
    on_NT = mask_NT.to(torch.bool)
    zero_NT = torch.zeros_like(logp_NT)
    logp_NT = torch.where(on_NT, logp_NT, zero_NT)
    old_NT = torch.where(on_NT, old_logp_NT.to(logp_NT.dtype), zero_NT)
    adv_NT = torch.where(on_NT, token_adv(adv, logp_NT), zero_NT)
    return logp_NT, old_NT, adv_NT, on_NT.to(logp_NT.dtype)


def group_mean(x_NT: Tensor, g_NT: Tensor) -> Tensor:
    """Mean of x over the tokens of group g (float 0/1 [N, T]) per sequence -> [N]; 0 for an empty group."""
    return (x_NT * g_NT).sum(-1) / g_NT.sum(-1).clamp(min=1)


def aggregate(loss_NT: Tensor, mask_NT: Tensor, aggregation: str, denom: float | Tensor | None = None, *,
              high_NT: Tensor | None = None, norm_len: float | None = None) -> Tensor:
    """Reduce per-token losses to a scalar.

    "token_mean" (DAPO): sum over all trained tokens of the batch / their number; long responses weigh more.
    "seq_mean_token_mean" (GRPO paper): mean over each sequence's trained tokens, then mean over the sequences
    that have any; every response weighs the same.
    "seq_mean_group_mean" (ESPO Eq. 5): high_NT (bool/float [N, T]) splits each sequence's trained tokens into a
    high group and the rest; mean within each non-empty group, mean over the sequence's groups, then over the
    sequences that have a trained token.
    "seq_mean_token_sum_norm" (Dr.GRPO): each sequence's token sum / norm_len (one constant for every sequence,
    the generation limit), mean over the sequences that have a trained token. verl and TRL divide by all
    sequences; a sequence without a trained token adds 0 to the sum either way.
    denom: when this call sees only part of the batch (a data-parallel shard or a micro-batch), the whole batch's
    number of trained tokens (token_mean) or of sequences with a trained token (the others); None = this call's.
    """
    m_NT = mask_NT.to(loss_NT.dtype)
    loss_NT = torch.where(m_NT > 0, loss_NT, torch.zeros_like(loss_NT))  # padding never reaches the sum
    if aggregation == "token_mean":
        total = (loss_NT * m_NT).sum()
        return total / (m_NT.sum().clamp(min=1) if denom is None else denom)
    n_N = m_NT.sum(-1)
    if aggregation == "seq_mean_token_mean":
        seq_N = (loss_NT * m_NT).sum(-1) / n_N.clamp(min=1)
    elif aggregation == "seq_mean_token_sum_norm":
        if norm_len is None or norm_len <= 0:
            raise ValueError(f"aggregation=seq_mean_token_sum_norm needs norm_len > 0 (the generation limit), "
                             f"got {norm_len!r}")
        seq_N = (loss_NT * m_NT).sum(-1) / norm_len
    elif aggregation == "seq_mean_group_mean":
        if high_NT is None:
            raise ValueError("aggregation=seq_mean_group_mean needs entropy groups (high_NT): only espo has them")
        hi_NT = high_NT.to(loss_NT.dtype) * m_NT
        lo_NT = m_NT - hi_NT
        has_hi_N, has_lo_N = (hi_NT.sum(-1) > 0).to(loss_NT.dtype), (lo_NT.sum(-1) > 0).to(loss_NT.dtype)
        k_N = has_hi_N + has_lo_N
        seq_N = (group_mean(loss_NT, hi_NT) * has_hi_N + group_mean(loss_NT, lo_NT) * has_lo_N) / k_N.clamp(min=1)
    else:
        raise ValueError(f"aggregation={aggregation!r} is unknown; choose one of {AGGREGATIONS}")
    has_N = (n_N > 0).to(loss_NT.dtype)
    return (seq_N * has_N).sum() / (has_N.sum().clamp(min=1) if denom is None else denom)
