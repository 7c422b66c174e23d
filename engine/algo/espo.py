"""ESPO: Entropy importance Sampling Policy Optimization (ALGORITHMS.md A.3-A.11; pure math, torch only).

Shape letters: N = sequences (responses), T = padded tokens; all [N, T] tensors share one alignment.
``espo_loss`` follows the calling convention of engine.algo.losses; ``ESPO`` is the class registered as
``learner.loss=espo`` (engine/algo/loss_registry.py), with the batch-global hook for entropy_scope=batch.
Masking and aggregation are engine.algo.aggregation's.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from engine.algo.aggregation import aggregate, group_mean, masked_inputs
from engine.algo.clip import ppo_clip
from engine.algo.loss_registry import AGGREGATIONS
from engine.algo.loss_seam import LossInputs, PolicyLoss
from engine.algo.loss_stats import clip_stats

RATIO_MODES = ("gspo_token", "literal")
QUANTILE_SCOPES = ("sequence", "batch")
CLIP_MODES = ("adaptive", "fixed")


def _top_count(n: Tensor, rho: float) -> Tensor:
    """ceil(rho * n), at least 1 and at most n (n = 0 gives 1; callers mask it). float64 with a 1e-9 slack,
    so rho * n that is an integer up to rounding (0.2 * 15 = 3.0000000000000004) is not rounded up."""
    k = torch.ceil(rho * n.to(torch.float64) - 1e-9).to(torch.long)
    return torch.minimum(k.clamp(min=1), n.to(torch.long).clamp(min=1))


def batch_entropy_threshold(entropy_NT: Tensor, mask_NT: Tensor, rho: float = 0.2) -> Tensor:
    """Entropy of the ceil(rho * n)-th highest trained token of the whole batch -> 0-dim tensor.

    For entropy_quantile_scope="batch" when the batch is split (data-parallel shards, micro-batches):
    compute it once over the whole (all-gathered) batch and pass it to every espo_loss call as
    ``entropy_threshold``. No trained token -> +inf (nothing is high).
    """
    on = mask_NT.to(torch.bool)
    flat = torch.where(on, entropy_NT, torch.full_like(entropy_NT, float("-inf"))).reshape(-1)
    n = on.sum()
    k = _top_count(n, rho)
    thr = torch.topk(flat, int(k), sorted=True).values[-1] if flat.numel() else flat.new_tensor(float("inf"))
    return torch.where(n > 0, thr, torch.full_like(thr, float("inf")))


def entropy_groups(entropy_NT: Tensor, mask_NT: Tensor, *, rho: float = 0.2, scope: str = "sequence",
                   threshold: float | Tensor | None = None) -> Tensor:
    """K = 2 entropy groups (A.5) -> bool [N, T], True = high-entropy group (the rest of the mask is low).

    "sequence": per response, the k = ceil(rho * n) highest-entropy trained tokens (n = its trained tokens,
    k >= 1) are high, plus every token tied with the k-th (ties go to the high group). So every response
    with a trained token has >= 1 high token, and rho = 1 puts all tokens in one group (K = 1).
    "batch": one threshold for the whole batch (``threshold`` if given, else batch_entropy_threshold of
    this call's tensors); a response may then have no high token, or only high tokens.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho={rho} must lie in (0, 1]")
    on = mask_NT.to(torch.bool)
    entropy_NT = entropy_NT.detach()
    if scope == "sequence":
        sorted_NT = torch.where(on, entropy_NT, torch.full_like(entropy_NT, float("-inf"))).sort(
            dim=-1, descending=True).values
        k_N = _top_count(on.sum(-1), rho)
        thr_N1 = sorted_NT.gather(-1, (k_N - 1)[:, None])
        return on & (entropy_NT >= thr_N1)
    if scope == "batch":
        thr = batch_entropy_threshold(entropy_NT, on, rho) if threshold is None else threshold
        return on & (entropy_NT >= torch.as_tensor(thr, dtype=entropy_NT.dtype))
    raise ValueError(f"entropy_quantile_scope={scope!r} is unknown; choose one of {QUANTILE_SCOPES}")


def _frac(x_NT: Tensor, g_NT: Tensor) -> Tensor:
    """Mean of x over all tokens of group g in the batch -> 0-dim; 0 when the group is empty."""
    return (x_NT * g_NT).sum() / g_NT.sum().clamp(min=1)


def espo_loss(logp_NT: Tensor, old_logp_NT: Tensor, adv: Tensor, mask_NT: Tensor, *,
              entropy_NT: Tensor | None = None, vocab_size: int | None = None, alpha: float = 0.02, rho: float = 0.2,
              ratio_mode: str = "gspo_token", entropy_quantile_scope: str = "sequence",
              entropy_threshold: float | Tensor | None = None, clip_mode: str = "adaptive",
              clip_eps_low: float = 3e-4, clip_eps_high: float = 4e-4, dual_clip_c: float = 0.0,
              aggregation: str = "seq_mean_group_mean", denom: float | Tensor | None = None,
              norm_len: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """ESPO surrogate (A.3, Eq. 5; pseudo-code A.11) -> (scalar loss, stats).

    logp_NT: float [N, T] current-policy log-prob of each sampled token (requires grad).
    old_logp_NT: float [N, T] behaviour-policy log-prob (no grad). adv: float [N] or [N, T] (e.g. RL-ZVP).
    mask_NT: bool/{0,1} [N, T], 1 = trained token. entropy_NT: float [N, T] old-policy full-vocabulary
    entropy (nats) of each position, detached; required.
    vocab_size: |V| of the policy, required by clip_mode="adaptive".

    1. Groups (A.5): high = entropy_groups(entropy_NT, mask_NT, rho, entropy_quantile_scope,
       entropy_threshold); low = the other trained tokens. rho = 1 gives a single group (K = 1).
    2. Group ratio (A.7, Eq. 10): s_g = exp(mean over the group's tokens of sg[logp - old_logp]) (log
       clamped to +-20). Token ratio (Eq. 9): "gspo_token" s_t = s_g * exp(logp - sg[logp]) (value s_g,
       gradient s_g dlogp_t); "literal" s_t = s_g * exp(logp - old_logp) (value and gradient carry the token
       ratio r_t too). The modes agree in value and gradient when logp == old_logp.
    3. Clip (A.6, Eq. 8): "adaptive" eps_g = alpha * mean entropy of the group / ln(vocab_size), symmetric
       [1 - eps_g, 1 + eps_g]; "fixed" [1 - clip_eps_low, 1 + clip_eps_high] for every token.
    4. Per token: loss_t = -min(s_t A_t, clip(s_t) A_t) (pessimistic PPO form); dual_clip_c > 1 also bounds it
       by -c A_t where A_t < 0 (verl's dual clip, engine.algo.clip.ppo_clip; 0 = off, the spec's form).
    5. Aggregation "seq_mean_group_mean" (Eq. 5): mean over each group's tokens, mean over the response's
       non-empty groups, mean over the responses with a trained token (denom: their number in the whole
       batch). The other aggregations of engine.algo.aggregation.aggregate are ablations (norm_len: theirs).
    Stats (detached): clip_frac_low/high/clip_frac, approx_kl (k3 of the per-token ratio), ratio_mean,
    ratio_max over trained tokens (as grpo_loss); per group g in {hi_ent, lo_ent}, averaged over that
    group's tokens in this call: clip_frac_upper_<g>, clip_frac_lower_<g>, eps_<g> (clip half-width),
    entropy_<g>, abs_log_ratio_<g> (|log s_g|); and hi_ent_token_frac (high tokens / trained tokens).
    """
    _check_args(entropy_NT, ratio_mode, clip_mode, aggregation, vocab_size)
    logp_NT, old_NT, adv_NT, m_NT = masked_inputs(logp_NT, old_logp_NT, adv, mask_NT)  # padding: NaN/inf ok
    on_NT, dtype = m_NT.to(torch.bool), logp_NT.dtype
    ent_NT = torch.where(on_NT, entropy_NT.detach().to(dtype), torch.zeros_like(logp_NT))

    hi_NT = entropy_groups(ent_NT, on_NT, rho=rho, scope=entropy_quantile_scope,
                           threshold=entropy_threshold).to(dtype)
    lo_NT = m_NT - hi_NT

    s_NT, log_sg_NT, tok_lr_NT = _group_ratios(logp_NT, old_NT, hi_NT, lo_NT, ratio_mode)
    if clip_mode == "adaptive":
        lower_NT, upper_NT = _adaptive_bounds(ent_NT, hi_NT, lo_NT, alpha / math.log(vocab_size))
    else:
        lower_NT = torch.full_like(logp_NT, 1.0 - clip_eps_low)
        upper_NT = torch.full_like(logp_NT, 1.0 + clip_eps_high)
    loss_NT, dual_NT = ppo_clip(s_NT, lower_NT, upper_NT, adv_NT, dual_clip_c)

    loss = aggregate(loss_NT, m_NT, aggregation, denom, high_NT=hi_NT, norm_len=norm_len)

    stats = _espo_stats(s_NT, lower_NT, upper_NT, adv_NT, tok_lr_NT, m_NT, hi_NT, ent_NT, log_sg_NT, dual_NT)
    return loss, stats


def _check_args(entropy_NT, ratio_mode: str, clip_mode: str, aggregation: str, vocab_size: int | None) -> None:
    if entropy_NT is None:
        raise ValueError("espo_loss needs entropy_NT: the old-policy token entropies [N, T]")
    if ratio_mode not in RATIO_MODES:
        raise ValueError(f"ratio_mode={ratio_mode!r} is unknown; choose one of {RATIO_MODES}")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode={clip_mode!r} is unknown; choose one of {CLIP_MODES}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is unknown; choose one of {AGGREGATIONS}")
    if clip_mode == "adaptive" and (vocab_size is None or vocab_size < 2):
        raise ValueError(f"clip_mode='adaptive' needs vocab_size >= 2, got {vocab_size!r}")


def _adaptive_bounds(ent_NT: Tensor, hi_NT: Tensor, lo_NT: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(1 - eps_g, 1 + eps_g) per token, eps_g = scale * mean entropy of the token's group (A.6, Eq. 8)."""
    eps_NT = scale * (group_mean(ent_NT, hi_NT)[:, None] * hi_NT + group_mean(ent_NT, lo_NT)[:, None] * lo_NT)
    return 1.0 - eps_NT, 1.0 + eps_NT


def _group_ratios(logp_NT: Tensor, old_NT: Tensor, hi_NT: Tensor, lo_NT: Tensor, ratio_mode: str
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(token ratio s_t (Eq. 9), log group ratio log s_g per token (Eq. 10), clamped token log-ratio)."""
    d_NT = (logp_NT - old_NT).detach()
    mlr_hi_N = group_mean(d_NT, hi_NT).clamp(-20.0, 20.0)
    mlr_lo_N = group_mean(d_NT, lo_NT).clamp(-20.0, 20.0)
    log_sg_NT = mlr_hi_N[:, None] * hi_NT + mlr_lo_N[:, None] * lo_NT
    if ratio_mode == "gspo_token":
        s_NT = torch.exp(log_sg_NT + (logp_NT - logp_NT.detach()))
    else:
        s_NT = torch.exp(log_sg_NT + (logp_NT - old_NT).clamp(-20.0, 20.0))
    return s_NT, log_sg_NT, d_NT.clamp(-20.0, 20.0)


@torch.no_grad()
def _espo_stats(s_NT: Tensor, lower_NT: Tensor, upper_NT: Tensor, adv_NT: Tensor, tok_lr_NT: Tensor, m_NT: Tensor,
                hi_NT: Tensor, ent_NT: Tensor, log_sg_NT: Tensor, dual_NT: Tensor | None) -> dict[str, Tensor]:
    """espo_loss's stats: clip_stats plus, per entropy group, clip fractions, eps, entropy and |log s_g|."""
    stats, dn_NT, up_NT = clip_stats(s_NT, lower_NT, upper_NT, adv_NT, tok_lr_NT, m_NT, dual_NT)
    half_NT = (upper_NT - lower_NT) / 2
    stats["hi_ent_token_frac"] = hi_NT.sum() / m_NT.sum().clamp(min=1)
    for name, g_NT in (("hi_ent", hi_NT), ("lo_ent", m_NT - hi_NT)):
        stats[f"clip_frac_upper_{name}"] = _frac(up_NT, g_NT)
        stats[f"clip_frac_lower_{name}"] = _frac(dn_NT, g_NT)
        stats[f"eps_{name}"] = _frac(half_NT, g_NT)
        stats[f"entropy_{name}"] = _frac(ent_NT, g_NT)
        stats[f"abs_log_ratio_{name}"] = _frac(log_sg_NT.abs(), g_NT)
    return stats


class ESPO(PolicyLoss):
    """learner.loss=espo: espo_loss with learner.espo.{alpha, rho, ratio_mode, entropy_scope} and |V|.

    entropy_scope=batch: the top-rho entropy threshold is a statistic of the whole batch, so ``batch_fields``
    asks the learner for every trained token's entropy (all shards, all ranks) and ``batch_statistics`` turns
    it into ``entropy_threshold``, passed to every call."""

    @property
    def batch_fields(self) -> tuple[str, ...]:
        return ("entropy_NT",) if self.cfg.entropy_scope == "batch" else ()

    def batch_statistics(self, gathered: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not self.batch_fields:
            return {}
        ent_1M = gathered["entropy_NT"][None]
        on_1M = torch.ones_like(ent_1M, dtype=torch.bool)
        return {"entropy_threshold": batch_entropy_threshold(ent_1M, on_1M, self.cfg.rho)}

    def __call__(self, x: LossInputs, batch: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return espo_loss(x.logp_NT, x.old_logp_NT, x.token_advantages(), x.mask_NT, entropy_NT=x.entropy_NT,
                         vocab_size=self.ctx.vocab_size, alpha=self.cfg.alpha, rho=self.cfg.rho,
                         ratio_mode=self.cfg.ratio_mode, entropy_quantile_scope=self.cfg.entropy_scope,
                         entropy_threshold=(batch or {}).get("entropy_threshold"), dual_clip_c=self.cfg.dual_clip_c,
                         **self.reduction(x))
