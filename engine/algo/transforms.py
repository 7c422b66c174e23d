"""Advantage transforms on the loss record (pure math: torch only, no config, no .item()).

Each transform is ``f(inputs: LossInputs, ...) -> (LossInputs, sums)``: a new record (the input is frozen) and its
diagnostics as ``{name: (total, weight)}`` pairs of 0-dim tensors, whose ratio total / weight is the statistic
(the learner sums both over shards and ranks). They compose in the learner's order: RL-ZVP rewrites the
advantages, then decoupled PPO re-targets the ratio. The group normalisation of rewards into advantages runs on
the coordinator (engine/algo/advantages.py::group_advantages, before the batch is sent).

Shape letters: N = sequences, T = padded tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from engine.algo.advantages import zvp_token_advantages
from engine.algo.loss_seam import LossInputs

Sums = dict[str, tuple[Tensor, Tensor]]


def rl_zvp(x: LossInputs, zvp_sign_N: Tensor, *, alpha: float) -> tuple[LossInputs, Sums]:
    """RL-ZVP (ALGORITHMS.md B.2.3): responses of zero-variance groups (zvp_sign_N = +1 all-correct, -1 all-wrong)
    get entropy-shaped token advantages (engine.algo.advantages.zvp_token_advantages of x.entropy_NT); the others
    keep their advantage, broadcast to [N, T] (0 off the mask). Needs x.entropy_NT and per-sequence x.adv [N].

    sums: rl_zvp_token_frac (shaped trained tokens / trained tokens), rl_zvp_abs_adv (mean |A| over shaped ones).
    """
    if x.entropy_NT is None or x.adv.dim() != 1:
        raise ValueError("rl_zvp needs the old-policy entropy_NT and one advantage per sequence [N]")
    mask_NT = x.mask_NT.to(torch.bool)
    zvp_NT = zvp_token_advantages(x.entropy_NT, mask_NT, zvp_sign_N, alpha=alpha)
    shaped_N = zvp_sign_N != 0
    tokens = (mask_NT & shaped_N[:, None]).sum().double()
    sums = {"rl_zvp_token_frac": (tokens, mask_NT.sum().double()), "rl_zvp_abs_adv": (zvp_NT.abs().sum(), tokens)}
    return replace(x, adv=torch.where(shaped_N[:, None], zvp_NT, x.adv[:, None] * mask_NT)), sums


def decoupled_weights(x: LossInputs, prox_logp_NT: Tensor, *, cap: float) -> tuple[LossInputs, Sums]:
    """Decoupled PPO (AReaL): the ratio is taken against the proximal policy prox_logp_NT (the learner before this
    batch's updates) instead of the behaviour policy x.old_logp_NT, and the advantage is multiplied by the
    truncated importance weight w = min(pi_prox / pi_behav, cap) (0 off the mask).

    sums: is_weight_mean (mean w over trained tokens), is_truncated_frac (tokens whose weight was capped).
    """
    mask_NT = x.mask_NT.to(torch.bool)
    log_w_NT = torch.where(mask_NT, prox_logp_NT - x.old_logp_NT, torch.zeros_like(prox_logp_NT))  # padding: NaN ok
    ratio_NT = log_w_NT.exp()
    w_NT = torch.where(mask_NT, ratio_NT.clamp(max=cap), torch.zeros_like(ratio_NT))
    tokens = mask_NT.sum().double()
    sums = {"is_weight_mean": (w_NT.sum(), tokens), "is_truncated_frac": (((ratio_NT > cap) & mask_NT).sum(), tokens)}
    weight_NT = w_NT if x.weight_NT is None else x.weight_NT * w_NT
    return replace(x, old_logp_NT=prox_logp_NT, weight_NT=weight_NT), sums
