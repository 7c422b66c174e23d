"""Detached clip statistics shared by every PPO-style loss (engine/algo/losses.py, engine/algo/espo.py). Pure math."""

from __future__ import annotations

import torch
from torch import Tensor


def clip_stats(ratio_NT: Tensor, lower, upper, adv_NT: Tensor, token_log_ratio_NT: Tensor,
               m_NT: Tensor, dual_NT: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """-> (stats averaged over trained tokens (ratio_max: max), low_NT, high_NT clipped-token indicators).

    lower/upper: the clip bounds (floats or [N, T]); a token counts as clipped "low" when ratio < lower and
    A < 0, "high" when ratio > upper and A > 0 (exactly where the pessimistic clip removes the gradient).
    approx_kl: k3 estimator of KL(old || new) from the per-token ratio, mean of (r - 1) - log r.
    dual_NT (engine.algo.clip.ppo_clip, when the dual clip is on): adds clip_frac_dual, the tokens it bounded.
    """
    with torch.no_grad():
        ratio_NT, lr_NT = ratio_NT.detach(), token_log_ratio_NT.detach()
        n = m_NT.sum().clamp(min=1)
        low_NT = ((ratio_NT < lower) & (adv_NT < 0)).to(m_NT.dtype) * m_NT
        high_NT = ((ratio_NT > upper) & (adv_NT > 0)).to(m_NT.dtype) * m_NT
        stats = {
            "clip_frac_low": low_NT.sum() / n,
            "clip_frac_high": high_NT.sum() / n,
            "clip_frac": (low_NT + high_NT).sum() / n,
            "approx_kl": ((torch.expm1(lr_NT) - lr_NT) * m_NT).sum() / n,
            "ratio_mean": (ratio_NT * m_NT).sum() / n,
            "ratio_max": torch.where(m_NT > 0, ratio_NT, torch.zeros_like(ratio_NT)).max(),
        }
        if dual_NT is not None:
            stats["clip_frac_dual"] = (dual_NT.detach() * m_NT).sum() / n
    return stats, low_NT, high_NT
