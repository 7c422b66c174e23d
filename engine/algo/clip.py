"""The pessimistic PPO-clip objective shared by every PPO-style loss (grpo, dr_grpo, gspo, espo), with verl's dual
clip. Pure math: torch only, no config, no .item().

Shape letters: N = sequences, T = padded tokens (or any shape, as long as the arguments broadcast).
"""

from __future__ import annotations

import torch
from torch import Tensor


def ppo_clip(ratio_NT: Tensor, lower, upper, adv_NT: Tensor, dual_clip_c: float = 0.0
             ) -> tuple[Tensor, Tensor | None]:
    """Per-token PPO-clip loss -> (loss_NT, dual_NT: float 1 where the dual clip binds, else 0; None when off).

    loss = max(-A r, -A clip(r, lower, upper)) (lower/upper: floats or tensors broadcasting with r).
    dual_clip_c > 1 (verl ``clip_ratio_c``, 3 there): for A < 0 the loss is also bounded above by -A c,
    loss = min(max(-A r, -A clip(r)), -A c), so a token whose ratio exceeds c (its probability grew c-fold
    while its advantage is negative) adds the constant c |A| and no gradient, instead of an unbounded -A r.
    0 = off (the plain PPO clip). A >= 0 is never affected.
    """
    loss_NT = torch.maximum(-adv_NT * ratio_NT, -adv_NT * torch.clamp(ratio_NT, lower, upper))
    if not dual_clip_c:
        return loss_NT, None
    bound_NT = -adv_NT * dual_clip_c
    dual_NT = (adv_NT < 0) & (bound_NT < loss_NT)
    return torch.where(dual_NT, bound_NT, loss_NT), dual_NT.detach().to(loss_NT.dtype)

