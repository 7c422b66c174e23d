"""The long-tail length workload of ``everyprompt-bench pipeline --backend hf``, on the real tiny model.

What makes the lengths long-tailed: each prompt gets a length limit drawn once from the simulator's workload
(engine/backends/simulate.py ``sample_length`` with ``sim.sample_sigma=0``: a log-normal per prompt, spread
``sim.prompt_sigma``, times its source's factor 0.5x-2x, clipped at ``task.max_answer_tokens``), and the model's
EOS is suppressed, so every response runs exactly to its prompt's limit and ends with "length". The simulator draws
the very same lengths for the same prompts (``sample_sigma=0``: every sample of a prompt has the prompt's length), so
the hf run and the simulator run decode the same token counts.

- ``suppress_eos``: a weight edit of the random-init tiny Qwen3-MoE that makes the EOS logit hugely negative for
  every input (one residual dimension is held constant: written by no layer, read by none but ``lm_head``'s EOS row).
  Shapes and compute per token are unchanged: the workers decode exactly as much as with the unedited model.
- ``limit_lengths``: the coordinator's requests carry each prompt's limit (``GenerateRequest.max_new_tokens`` and
  ``ContinueRequest.max_new_tokens``, which the rollout worker honours per row). It wraps the coordinator hub's
  ``send`` on that one instance; nothing else in the coordinator changes.
"""

from __future__ import annotations

import dataclasses

import torch

from configs.schema import SimConfig
from engine.backends import simulate
from transport import ContinueRequest, GenerateRequest


def prompt_limit(prompt_id: int, max_new_tokens: int, sim: SimConfig) -> int:
    """Prompt ``prompt_id``'s response length: the simulator's length for it (the same for all its samples)."""
    return simulate.sample_length(prompt_id, "", 0, max_new_tokens, dataclasses.replace(sim, sample_sigma=0.0))


def limit_lengths(hub, sim: SimConfig) -> None:
    """Make every generate/continue request that ``hub`` sends carry its prompt's length limit."""
    send = hub.send

    async def send_limited(peer_id: str, msg) -> None:
        if isinstance(msg, (GenerateRequest, ContinueRequest)):
            msg = dataclasses.replace(msg, max_new_tokens=prompt_limit(msg.prompt_id, msg.max_new_tokens, sim))
        await send(peer_id, msg)

    hub.send = send_limited


@torch.no_grad()
def suppress_eos(model, eos_id: int, *, dim: int = 0, level: float = 1.0, margin: float = 1e3) -> None:
    """Edit a Qwen3-MoE so that it never samples ``eos_id``: residual dimension ``dim`` is ``level`` for every
    token (embedding column), no attention or expert output writes it (rows zeroed), no projection, router or
    other logit reads it (columns zeroed), and the EOS logit is ``-margin`` x that (positive, normalised) value."""
    inner = model.model
    inner.embed_tokens.weight[:, dim] = level
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.o_proj.weight[dim, :] = 0  # writes to the residual stream: [out, in]
        mlp.experts.down_proj[:, dim, :] = 0  # [experts, hidden out, intermediate in]
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate):
            proj.weight[:, dim] = 0  # reads of the residual stream
        mlp.experts.gate_up_proj[:, :, dim] = 0  # [experts, 2 x intermediate out, hidden in]
    head = model.lm_head.weight
    head[:, dim] = 0
    head[eos_id, :] = 0
    head[eos_id, dim] = -margin


def eos_probability(model, eos_id: int, *, rows: int = 8, steps: int = 64, seed: int = 0) -> float:
    """The largest EOS probability the model gives over ``rows`` sampled responses of ``steps`` tokens (a check of
    ``suppress_eos``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (rows, 8), generator=g)
    worst = 0.0
    with torch.no_grad():
        for _ in range(steps):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), -1)
            worst = max(worst, float(probs[:, eos_id].max()))
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return worst
