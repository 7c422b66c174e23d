"""Group-relative advantages (pure math: torch only, no config, no logging).

Shape letters: N = groups (prompts), G = responses per group.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards_NG: Tensor, valid_NG: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """ESPO Eq. 11 / GRPO advantage -> float [N, G].

    ``A_i = 1[i valid] * (R_i - mean_valid) / (std_valid + eps)``, per group.

    rewards_NG: float [N, G], the verifier reward of each response; entries where ``valid_NG`` is False are
        ignored entirely (they may hold anything, NaN included).
    valid_NG: bool [N, G], True = the verifier returned a valid score (the set G of Eq. 11); None = all valid.
    eps: added to the std, so a tiny spread cannot blow the advantage up.

    mean and std are taken over the valid members of each group only; the std is the *population* std
    (divide by the number of valid members, ``correction=0``), not the unbiased one.
    Invalid members get 0. A group with fewer than 2 valid members, or whose valid rewards are all equal
    (zero variance, tested exactly with max == min), gets 0 for every member.
    """
    if valid_NG is None:
        valid_NG = torch.ones_like(rewards_NG, dtype=torch.bool)
    valid_NG = valid_NG.to(torch.bool)
    rewards_NG = rewards_NG.to(torch.promote_types(rewards_NG.dtype, torch.float32))
    r_NG = rewards_NG.masked_fill(~valid_NG, 0.0)
    w_NG = valid_NG.to(r_NG.dtype)
    n_N1 = w_NG.sum(-1, keepdim=True)
    mean_N1 = r_NG.sum(-1, keepdim=True) / n_N1.clamp(min=1)
    var_N1 = (((r_NG - mean_N1) * w_NG) ** 2).sum(-1, keepdim=True) / n_N1.clamp(min=1)
    std_N1 = var_N1.sqrt()
    # Exact zero-variance test: a float mean of equal values need not equal them, so (R - mean) may be ~1e-17.
    hi_N1 = rewards_NG.masked_fill(~valid_NG, float("-inf")).amax(-1, keepdim=True)
    lo_N1 = rewards_NG.masked_fill(~valid_NG, float("inf")).amin(-1, keepdim=True)
    informative_N1 = (n_N1 >= 2) & (hi_N1 > lo_N1)
    adv_NG = (r_NG - mean_N1) / (std_N1 + eps)
    return torch.where(valid_NG & informative_N1, adv_NG, torch.zeros_like(adv_NG))
