"""Group-relative advantages (pure math: torch only, no config, no logging).

Shape letters: N = groups (prompts), G = responses per group.
"""

from __future__ import annotations

import torch
from torch import Tensor

STD_CHOICES = ("population", "unbiased")  # learner.adv_std


def _valid_stats(r_NG: Tensor, valid_NG: Tensor, std: str) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, std, informative) [N, 1] of the valid members' rewards (r_NG already 0 where invalid).

    std "population" divides the squared deviations by n (``correction=0``), "unbiased" by n - 1 (Bessel's
    correction, torch.std's default, as verl's GRPO advantage): larger by sqrt(n / (n - 1)). A group with n < 2
    never divides by zero (its members get 0 anyway). informative: n >= 2 and the valid rewards not all equal
    (tested exactly with max == min: a float mean of equal values need not equal them).
    """
    if std not in STD_CHOICES:
        raise ValueError(f"std={std!r} is unknown; choose one of {STD_CHOICES}")
    w_NG = valid_NG.to(r_NG.dtype)
    n_N1 = w_NG.sum(-1, keepdim=True)
    mean_N1 = r_NG.sum(-1, keepdim=True) / n_N1.clamp(min=1)
    dof_N1 = (n_N1 - 1 if std == "unbiased" else n_N1).clamp(min=1)
    std_N1 = ((((r_NG - mean_N1) * w_NG) ** 2).sum(-1, keepdim=True) / dof_N1).sqrt()
    hi_N1 = r_NG.masked_fill(~valid_NG, float("-inf")).amax(-1, keepdim=True)
    lo_N1 = r_NG.masked_fill(~valid_NG, float("inf")).amin(-1, keepdim=True)
    return mean_N1, std_N1, (n_N1 >= 2) & (hi_N1 > lo_N1)


def group_advantages(rewards_NG: Tensor, valid_NG: Tensor | None = None, eps: float = 1e-6, *,
                     scale_by_std: bool = True, std: str = "population") -> Tensor:
    """ESPO Eq. 11 / GRPO advantage -> float [N, G].

    ``A_i = 1[i valid] * (R_i - mean_valid) / (std_valid + eps)``, per group; with ``scale_by_std=False``
    (Dr.GRPO, verl ``norm_adv_by_std_in_grpo=False``, TRL ``scale_rewards="none"``) ``A_i = 1[i valid] *
    (R_i - mean_valid)``: no division by the std, so low-variance (very easy or very hard) groups are not
    up-weighted.

    rewards_NG: float [N, G], the verifier reward of each response; entries where ``valid_NG`` is False are
        ignored entirely (they may hold anything, NaN included).
    valid_NG: bool [N, G], True = the verifier returned a valid score (the set G of Eq. 11); None = all valid.
    eps: added to the std, so a tiny spread cannot blow the advantage up.
    std: ``learner.adv_std``. "population" (default; ALGORITHMS.md A.8 writes std without saying which, so the
        first implementation's choice stays): divide by the number of valid members n. "unbiased" (verl, on
        which ESPO trained; TRL): divide by n - 1, so advantages are smaller by sqrt((n - 1) / n).

    mean and std are taken over the valid members of each group only. Invalid members get 0. A group with fewer
    than 2 valid members, or whose valid rewards are all equal (zero variance), gets 0 for every member.
    """
    if valid_NG is None:
        valid_NG = torch.ones_like(rewards_NG, dtype=torch.bool)
    valid_NG = valid_NG.to(torch.bool)
    rewards_NG = rewards_NG.to(torch.promote_types(rewards_NG.dtype, torch.float32))
    r_NG = rewards_NG.masked_fill(~valid_NG, 0.0)
    mean_N1, std_N1, informative_N1 = _valid_stats(r_NG, valid_NG, std)
    adv_NG = (r_NG - mean_N1) / (std_N1 + eps) if scale_by_std else r_NG - mean_N1
    return torch.where(valid_NG & informative_N1, adv_NG, torch.zeros_like(adv_NG))


def rl_zvp_advantages(
    rewards_NG: Tensor,
    valid_NG: Tensor | None,
    entropy_NGT: Tensor,
    mask_NGT: Tensor,
    *,
    alpha: float = 0.1,
    success_threshold: float = 0.5,
    shape_zero_variance: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Per-token advantages with RL-ZVP shaping of zero-variance groups (ALGORITHMS.md B.2.3) -> float [N, G, T].

    T = padded response tokens. rewards_NG / valid_NG / eps: as group_advantages.
    entropy_NGT: float [N, G, T] detached old-policy full-vocabulary entropy H_{i,t} of each response token.
    mask_NGT: bool/{0,1} [N, G, T], 1 = a trained response token; every other entry of the result is 0.
    alpha: alpha_zvp > 0 (CompassMax's value is unknown; 0.1 is a third-party RL-ZVP default).
    success_threshold: a zero-variance group is "all-correct" when its common reward is >= this, else
        "all-wrong" (0.5 separates {0, 1} and {-1, 1} binary rewards).
    shape_zero_variance: False = plain Eq. 11 advantages broadcast to the tokens (zero-variance groups get 0).

    Groups with reward variance among valid members: the Eq. 11 advantage of group_advantages, broadcast.
    Zero-variance groups (>= 1 valid member, all valid rewards exactly equal), valid members only:
        all-correct: A_{i,t} = +alpha * H_{i,t}
        all-wrong:   A_{i,t} = -alpha * (max_k H_{i,k} - H_{i,t}), the max over response i's own trained
                     tokens (so its most uncertain token gets 0 and confident tokens the largest penalty).
    Invalid members and groups with no valid member get 0.
    """
    adv_NG = group_advantages(rewards_NG, valid_NG, eps)
    m_NGT = mask_NGT.to(torch.bool)
    adv_NGT = torch.where(m_NGT, adv_NG[..., None].to(entropy_NGT.dtype), torch.zeros_like(entropy_NGT))
    if not shape_zero_variance:
        return adv_NGT
    valid_NG = torch.ones_like(rewards_NG, dtype=torch.bool) if valid_NG is None else valid_NG.to(torch.bool)
    hi_NG = rewards_NG.masked_fill(~valid_NG, float("-inf")).amax(-1, keepdim=True)
    lo_NG = rewards_NG.masked_fill(~valid_NG, float("inf")).amin(-1, keepdim=True)
    zero_var_N1 = valid_NG.any(-1, keepdim=True) & (hi_NG == lo_NG)
    sign_NG = torch.where(hi_NG >= success_threshold, 1, -1).expand_as(rewards_NG)
    zvp_NGT = zvp_token_advantages(entropy_NGT, m_NGT, sign_NG, alpha=alpha)
    shaped_NGT = (zero_var_N1 & valid_NG)[..., None] & m_NGT
    return torch.where(shaped_NGT, zvp_NGT, adv_NGT)


def zvp_token_advantages(entropy_NT: Tensor, mask_NT: Tensor, sign_N: Tensor, *, alpha: float) -> Tensor:
    """RL-ZVP's token advantages of responses from zero-variance groups -> float [..., T] (0 off the mask).

    sign_N: +1 (the group is all-correct): A_t = +alpha * H_t; -1 (all-wrong): A_t = -alpha * (max_k H_k - H_t),
    the max over the response's own trained tokens; 0: A_t = 0. Leading dims of entropy_NT match sign_N."""
    m_NT = mask_NT.to(torch.bool)
    h_NT = torch.where(m_NT, entropy_NT.detach(), torch.zeros_like(entropy_NT))
    hmax_N1 = torch.where(m_NT, h_NT, torch.full_like(h_NT, float("-inf"))).amax(-1, keepdim=True)
    hmax_N1 = torch.where(torch.isfinite(hmax_N1), hmax_N1, torch.zeros_like(hmax_N1))
    sign_N1 = sign_N[..., None]
    zvp_NT = torch.where(sign_N1 > 0, alpha * h_NT, -alpha * (hmax_N1 - h_NT))
    return torch.where(m_NT & (sign_N1 != 0), zvp_NT, torch.zeros_like(h_NT))


def pairwise_rewards(verdicts_NGG: Tensor, judged_NGG: Tensor, *, tie_margin: float = 0.0,
                     group_tie_frac: float = 0.0) -> tuple[Tensor, Tensor]:
    """Round-robin reward from pairwise verdicts (ALGORITHMS.md B.5 (i)) -> (rewards_NG float, valid_NG bool).

    verdicts_NGG: float [N, G, G], v(i, j) in [-1, 1]: +1 response i Better than j, 0 Tie, -1 Worse (fractions
        when both orders were judged and disagree). Read only where judged_NGG; v(j, i) = -v(i, j) expected.
    judged_NGG: bool [N, G, G], True where the pair (i, j) has a parsed verdict (symmetric).
    r_i = mean over the judged pairs of i of v(i, j); a response with no judged pair is invalid (reward 0).
    With every pair judged this is the spec's r_i = 1/(G-1) sum_{j != i} v(i, j).

    Robustness to judge errors (both 0 = off, the plain construction). One wrong verdict moves a response's net
    verdict count ``m_i = sum_j v(i, j)`` by 1 (Tie <-> Better/Worse) or 2 (Better <-> Worse), and so gives a true
    tie a non-zero reward:
    tie_margin: dead zone, in net verdicts. A response with ``|m_i| <= tie_margin`` is treated as tied: reward
        exactly 0 (it stays valid). 1 = a single Tie/Better confusion cannot give a response an advantage; a
        response with ``|m_i| > tie_margin`` keeps its reward unchanged. When every response of a group is inside
        the dead zone the group is zero-variance.
    group_tie_frac: group-level tie test. A group whose fraction of non-Tie verdicts (v != 0) among its judged
        pairs is <= this is treated as all-tie: every reward 0 (zero-variance, RL-ZVP). Set it a few times the
        judge's error rate on tied pairs and well below 2/G, the non-Tie fraction of the least mixed group (one
        response differs from the rest).
    """
    j_NGG = judged_NGG.to(torch.bool)
    v_NGG = torch.where(j_NGG, verdicts_NGG.to(torch.float32), torch.zeros((), dtype=torch.float32))
    n_NG = j_NGG.sum(-1)
    m_NG = v_NGG.sum(-1)
    tied_NG = m_NG.abs() <= tie_margin + 1e-6 if tie_margin > 0 else torch.zeros_like(m_NG, dtype=torch.bool)
    if group_tie_frac > 0:
        pairs_N1 = j_NGG.sum((-2, -1)).unsqueeze(-1)
        non_tie_N1 = (j_NGG & (v_NGG != 0)).sum((-2, -1)).unsqueeze(-1)
        tied_NG = tied_NG | ((pairs_N1 > 0) & (non_tie_N1 <= group_tie_frac * pairs_N1))
    rewards_NG = torch.where(tied_NG, torch.zeros((), dtype=torch.float32), m_NG / n_NG.clamp(min=1))
    return rewards_NG, n_NG > 0


def tie_aware_advantages(rewards_NG: Tensor, valid_NG: Tensor | None = None, eps: float = 1e-6, *,
                         std: str = "population") -> Tensor:
    """Advantages of tie-aware judge rewards (ALGORITHMS.md B.5) -> float [N, G].

    rewards_NG: float [N, G], signed margins with a natural zero (round-robin or anchor rewards: 0 = tied on
        balance, or tied with the anchor). valid_NG: bool [N, G] (the set G of Eq. 11); None = all valid.
    std: population or unbiased, as group_advantages.
    ``A_i = 1[i valid] * r_i / (std_valid + eps)``. Unlike Eq. 11 the group mean is *not* subtracted: the margin
    is already relative, and centring would give a true tie (r_i = 0) a non-zero advantage whenever the rest of
    the group is unbalanced. So a response judged tied gets exactly 0, and responses judged tied with each other
    against the same peers get exactly equal advantages.
    A group whose valid rewards are all equal (every verdict Tie, or all equal against the anchor) is
    zero-variance: every member gets 0, and it falls through to the zero-variance handling (RL-ZVP, B.2.3).
    Invalid members (no parsed verdict) get 0.
    """
    if valid_NG is None:
        valid_NG = torch.ones_like(rewards_NG, dtype=torch.bool)
    valid_NG = valid_NG.to(torch.bool)
    r_NG = rewards_NG.to(torch.promote_types(rewards_NG.dtype, torch.float32)).masked_fill(~valid_NG, 0.0)
    _, std_N1, informative_N1 = _valid_stats(r_NG, valid_NG, std)
    adv_NG = r_NG / (std_N1 + eps)
    return torch.where(valid_NG & informative_N1, adv_NG, torch.zeros_like(adv_NG))
