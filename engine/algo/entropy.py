"""Chunked token log-probs and full-vocabulary entropy from final hidden states (pure math, torch only).

Shape letters: N = sequences, L = positions, H = hidden size, V = vocabulary size, C = tokens in one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def logprobs_and_entropy(
    hidden_NLH: Tensor,
    lm_head_weight_VH: Tensor,
    targets_NL: Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Old-policy pass: log-prob of each target and entropy of each position -> (logp_NL, entropy_NL).

    hidden_NLH: [N, L, H] final hidden states (after the last norm); position l predicts targets_NL[n, l].
    lm_head_weight_VH: [V, H] output projection (logits = hidden @ W.T, no bias).
    targets_NL: long [N, L] token ids in [0, V).
    temperature: logits are divided by it, so logp and entropy are those of the sampling distribution.
    chunk_tokens: C, how many of the flattened N * L positions are projected at once.

    logp_NL = log softmax(logits / temperature)[target]; entropy_NL = -sum_v p_v log p_v over the full
    vocabulary (ALGORITHMS.md A.4, Eq. 6), in nats. Both are float32 (float64 if the inputs are float64).
    Logits that are -inf (a banned token) contribute 0 to the entropy.

    Runs under torch.no_grad(): the outputs carry no gradient. This is the behaviour-policy pass that
    produces old_logp and the ESPO/RL-ZVP entropies, neither of which is differentiated; the learner's
    differentiable logp must come from its own pass.

    Memory: the [N, L, V] logits never exist. Each chunk holds its [C, V] logits in the weight's dtype,
    their float32 copy (log-probs, in place), one [C, V] float32 temporary for the probabilities (and one
    inside logsumexp), so the peak extra memory is about C * V * (3 * 4 + itemsize(W)) bytes, i.e. roughly
    3-4 * C * V floats; no tensor larger than C * V elements is created. Outputs: 2 * N * L floats.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    N, L, H = hidden_NLH.shape
    out_dtype = torch.promote_types(hidden_NLH.dtype, torch.float32)
    hidden_MH = hidden_NLH.reshape(N * L, H)
    targets_M = targets_NL.reshape(N * L)
    logp_M = torch.empty(N * L, dtype=out_dtype, device=hidden_NLH.device)
    entropy_M = torch.empty(N * L, dtype=out_dtype, device=hidden_NLH.device)
    for lo in range(0, N * L, chunk_tokens):
        hi = min(lo + chunk_tokens, N * L)
        logits_CV = F.linear(hidden_MH[lo:hi], lm_head_weight_VH).to(out_dtype)
        if temperature != 1.0:
            logits_CV.div_(temperature)
        lse_C = torch.logsumexp(logits_CV, dim=-1)
        logits_CV.sub_(lse_C[:, None])  # now log-probs, in place
        logits_CV.clamp_(min=torch.finfo(out_dtype).min)  # -inf -> finite, so p * log p = 0 * finite = 0
        logp_M[lo:hi] = logits_CV.gather(-1, targets_M[lo:hi, None]).squeeze(-1)
        p_CV = logits_CV.exp()
        entropy_M[lo:hi] = -(p_CV.mul_(logits_CV)).sum(-1)
        del logits_CV, p_CV
    return logp_M.reshape(N, L), entropy_M.reshape(N, L)


@torch.no_grad()
def entropy_of_logits(logits_NLV: Tensor, *, chunk_tokens: int = 1024) -> Tensor:
    """Full-vocabulary entropy (nats) of softmax(logits_NLV) at each position -> entropy_NL, without gradient.

    For logits that already exist (the learner's update forward, already divided by the temperature): the fused
    old-policy pass takes the entropy from them instead of running a second forward. Same formula and clamp as
    ``logprobs_and_entropy``, over chunks of ``chunk_tokens`` positions, so the extra memory is about 2 * C * V
    floats."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    N, L, V = logits_NLV.shape
    logits_MV = logits_NLV.detach().reshape(N * L, V)
    out_dtype = torch.promote_types(logits_MV.dtype, torch.float32)
    entropy_M = torch.empty(N * L, dtype=out_dtype, device=logits_MV.device)
    for lo in range(0, N * L, chunk_tokens):
        logp_CV = torch.log_softmax(logits_MV[lo:lo + chunk_tokens].to(out_dtype), dim=-1)
        logp_CV.clamp_(min=torch.finfo(out_dtype).min)  # -inf -> finite, so p * log p = 0 * finite = 0
        entropy_M[lo:lo + chunk_tokens] = -(logp_CV.exp().mul_(logp_CV)).sum(-1)
    return entropy_M.reshape(N, L)
