"""Policy-gradient losses GRPO, GSPO, CISPO (pure math: torch only, no config, no logging, no .item()).

Each ``*_loss`` function is the math; each class registered in engine/algo/loss_registry.py (``GRPO``, ``GSPO``,
``CISPO``) maps its config section onto it and is called on a ``LossInputs`` record (engine/algo/loss_seam.py).
Every function shares one calling convention:

    loss, stats = grpo_loss(logp_NT, old_logp_NT, adv, mask_NT, *, aggregation=..., denom=None, norm_len=None, ...)

Shape letters: N = sequences, T = padded tokens (any alignment, as long as all [N, T] tensors share it).
- logp_NT: float [N, T], log-prob of each sampled token under the learner's policy (requires grad).
- old_logp_NT: float [N, T], the same under the behaviour (sampling) policy; no grad.
- adv: float [N] (one advantage per sequence, broadcast to its tokens) or float [N, T] (per token).
- mask_NT: bool or {0,1} float [N, T], 1 = a trained (generated) token; everything else has zero gradient.
- aggregation, denom, norm_len: as engine.algo.aggregation.aggregate (masking and aggregation live there).
- padded positions (mask 0) may hold NaN or +-inf in logp, old_logp and adv: engine.algo.aggregation.masked_inputs
  zeroes them (torch.where) before any arithmetic, so they never reach the loss or its gradient.
- dual_clip_c (the PPO-style losses grpo, gspo and espo): verl's dual clip, engine.algo.clip.ppo_clip; 0 = off.
- stats: detached scalar tensors, averaged over this call's trained tokens (ratio_max is a max).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from engine.algo.aggregation import aggregate, masked_inputs
from engine.algo.clip import ppo_clip
from engine.algo.loss_registry import GSPO_FORMS
from engine.algo.loss_seam import LossInputs, PolicyLoss
from engine.algo.loss_stats import clip_stats


def grpo_loss(logp_NT: Tensor, old_logp_NT: Tensor, adv: Tensor, mask_NT: Tensor, *, clip_eps_low: float = 0.2,
              clip_eps_high: float = 0.28, dual_clip_c: float = 0.0, aggregation: str = "token_mean",
              denom: float | Tensor | None = None, norm_len: float | None = None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level PPO-clip surrogate of GRPO/DAPO (ALGORITHMS.md A.2) -> (scalar loss, stats).

    Per token: r = exp(logp - old_logp) (log clamped to +-20, so exp() stays finite on wild off-policy tokens),
    loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A).
    At r = 1 the loss is -mean(A) over the aggregation, and its gradient is -A * dlogp.
    The clip removes the gradient only where it binds: r < 1 - eps_low with A < 0 ("low"), and
    r > 1 + eps_high with A > 0 ("high"); clip_frac_low/high count exactly those tokens.
    approx_kl is the k3 estimator of KL(old || new), mean over tokens of (r - 1) - log r.
    dual_clip_c > 1: where A < 0 the loss is also bounded by -c A (verl's dual clip; clip_frac_dual counts it).
    """
    logp_NT, old_NT, adv_NT, m_NT = masked_inputs(logp_NT, old_logp_NT, adv, mask_NT)
    log_ratio_NT = (logp_NT - old_NT).clamp(-20.0, 20.0)
    ratio_NT = torch.exp(log_ratio_NT)
    lower, upper = 1.0 - clip_eps_low, 1.0 + clip_eps_high
    loss_NT, dual_NT = ppo_clip(ratio_NT, lower, upper, adv_NT, dual_clip_c)
    loss = aggregate(loss_NT, m_NT, aggregation, denom, norm_len=norm_len)
    stats, _, _ = clip_stats(ratio_NT, lower, upper, adv_NT, log_ratio_NT, m_NT, dual_NT)
    return loss, stats


def gspo_loss(logp_NT: Tensor, old_logp_NT: Tensor, adv: Tensor, mask_NT: Tensor, *, clip_eps_low: float = 3e-4,
              clip_eps_high: float = 4e-4, form: str = "token", dual_clip_c: float = 0.0,
              aggregation: str = "seq_mean_token_mean", denom: float | Tensor | None = None,
              norm_len: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO surrogate (ALGORITHMS.md A.2), GSPO-token or sequence form -> (scalar loss, stats).

    s_i = exp(mean over trained tokens of (logp - old_logp)), the geometric mean of the token ratios
    (its log is clamped to +-20).
    form="token" (GSPO-token): token ratio s_{i,t} = sg[s_i] * exp(logp - sg[logp]): its value is s_i for
    every token of sequence i, its gradient is s_i * dlogp_t. Per token:
    loss = -min(s_{i,t} A_t, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A_t), so a clip that binds removes the
    gradient of the whole sequence (when A is per sequence).
    form="sequence" (the GSPO paper's Eq. 5-7): one loss per sequence, -min(s_i A_i, clip(s_i) A_i), with the
    gradient through s_i itself (s_i * mean_t dlogp_t) and A_i the mean of the sequence's token advantages (its
    advantage when A is per sequence); that loss stands at each of its tokens for the aggregation.
    With per-sequence A and seq_mean_token_mean the two forms have equal loss and gradient; they differ for
    per-token A [N, T] (RL-ZVP, decoupled PPO weights), where "token" weighs each token by its own advantage.
    Default clip (3e-4, 4e-4) and aggregation (mean over tokens, then over sequences) follow the GSPO paper.
    Stats as grpo_loss; ratio_* describe s_i (per token), approx_kl the per-token ratio.
    """
    if form not in GSPO_FORMS:
        raise ValueError(f"form={form!r} is unknown; choose one of {GSPO_FORMS}")
    logp_NT, old_NT, adv_NT, m_NT = masked_inputs(logp_NT, old_logp_NT, adv, mask_NT)
    d_NT = logp_NT - old_NT
    n_N = m_NT.sum(-1).clamp(min=1)
    if form == "sequence":
        s_NT = torch.exp(((d_NT * m_NT).sum(-1) / n_N).clamp(-20.0, 20.0))[:, None].expand_as(logp_NT)
        adv_NT = (adv_NT.sum(-1) / n_N)[:, None].expand_as(logp_NT)
    else:
        log_s_N = ((d_NT.detach() * m_NT).sum(-1) / n_N).clamp(-20.0, 20.0)
        s_NT = torch.exp(log_s_N[:, None] + (logp_NT - logp_NT.detach()))
    lower, upper = 1.0 - clip_eps_low, 1.0 + clip_eps_high
    loss_NT, dual_NT = ppo_clip(s_NT, lower, upper, adv_NT, dual_clip_c)
    loss = aggregate(loss_NT, m_NT, aggregation, denom, norm_len=norm_len)
    stats, _, _ = clip_stats(s_NT, lower, upper, adv_NT, d_NT.clamp(-20.0, 20.0), m_NT, dual_NT)
    return loss, stats


def cispo_loss(logp_NT: Tensor, old_logp_NT: Tensor, adv: Tensor, mask_NT: Tensor, *, clip_eps_low: float = 1.0,
               clip_eps_high: float = 5.0, aggregation: str = "token_mean",
               denom: float | Tensor | None = None, norm_len: float | None = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clipped, stop-gradient IS weight -> (scalar loss, stats).

    w_t = sg[clip(r_t, 1 - eps_low, 1 + eps_high)], r_t = exp(logp - old_logp) (log clamped to +-20).
    Per token: loss = -A * w_t * exp(logp - sg[logp]). Its gradient is the CISPO gradient
    -A * w_t * dlogp_t for EVERY token (no token is dropped, unlike PPO-clip); the exp(logp - sg[logp])
    factor (value 1) only makes the loss value read -A * w_t (so on-policy it equals GRPO's -mean(A))
    instead of the uninformative -A * w_t * logp. Defaults: eps_low = 1 (no lower bound, as in the
    paper, which tuned only eps_high) and eps_high = 5, i.e. a weight cap of 1 + 5 = 6 (TRL's ``epsilon_high``
    is the cap itself: its 5 is eps_high = 4 here); token_mean aggregation (the paper's 1 / sum|o_i|).
    clip_frac_low/high count tokens whose weight was clipped (r < 1 - eps_low / r > 1 + eps_high) whatever
    the sign of A, since CISPO clips the weight, not the objective.
    """
    logp_NT, old_NT, adv_NT, m_NT = masked_inputs(logp_NT, old_logp_NT, adv, mask_NT)
    lr_NT = (logp_NT - old_NT).detach().clamp(-20.0, 20.0)
    r_NT = torch.exp(lr_NT)
    w_NT = r_NT.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss_NT = -adv_NT * w_NT * torch.exp(logp_NT - logp_NT.detach())
    loss = aggregate(loss_NT, m_NT, aggregation, denom, norm_len=norm_len)
    stats, _, _ = clip_stats(r_NT, 1.0 - clip_eps_low, 1.0 + clip_eps_high, adv_NT, lr_NT, m_NT)
    with torch.no_grad():  # CISPO clips the weight whatever the sign of A: count both sides for every token
        n = m_NT.sum().clamp(min=1)
        stats["clip_frac_low"] = ((r_NT < 1.0 - clip_eps_low).to(m_NT.dtype) * m_NT).sum() / n
        stats["clip_frac_high"] = ((r_NT > 1.0 + clip_eps_high).to(m_NT.dtype) * m_NT).sum() / n
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
    return loss, stats


class GRPO(PolicyLoss):
    """learner.loss=grpo: grpo_loss with learner.grpo.clip_eps_low/high and dual_clip_c."""

    def __call__(self, x: LossInputs, batch: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return grpo_loss(x.logp_NT, x.old_logp_NT, x.token_advantages(), x.mask_NT, clip_eps_low=self.cfg.clip_eps_low,
                         clip_eps_high=self.cfg.clip_eps_high, dual_clip_c=self.cfg.dual_clip_c, **self.reduction(x))


class GSPO(PolicyLoss):
    """learner.loss=gspo: gspo_loss with learner.gspo.clip_eps_low/high, form and dual_clip_c."""

    def __call__(self, x: LossInputs, batch: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return gspo_loss(x.logp_NT, x.old_logp_NT, x.token_advantages(), x.mask_NT, clip_eps_low=self.cfg.clip_eps_low,
                         clip_eps_high=self.cfg.clip_eps_high, form=self.cfg.form, dual_clip_c=self.cfg.dual_clip_c,
                         **self.reduction(x))


class CISPO(PolicyLoss):
    """learner.loss=cispo: cispo_loss with learner.cispo.clip_eps_high (no lower bound)."""

    def __call__(self, x: LossInputs, batch: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return cispo_loss(x.logp_NT, x.old_logp_NT, x.token_advantages(), x.mask_NT,
                          clip_eps_high=self.cfg.clip_eps_high, **self.reduction(x))
