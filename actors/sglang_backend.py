"""sglang's wire format for generation with log-probs and routed experts (the GPU backend's request/response).

Requests go to sglang's native ``/generate`` endpoint (``GenerateReqInput``) with token ids in, token ids out:

    {"input_ids": [[...], ...], "sampling_params": {"temperature": T, "max_new_tokens": N,
     "stop_token_ids": [eos]}, "return_logprob": true, "return_routed_experts": true}

``return_routed_experts`` needs a server started with ``--enable-return-routed-experts``. Each response item has
``output_ids``, ``meta_info.output_token_logprobs`` (``[logprob, token_id, text]`` per generated token; by default
sglang reports them under the temperature-scaled distribution it sampled from, which is what the learner's
ratios need) and ``meta_info.routed_experts``: base64 of int32 ``[prompt_len + completion_len - 1, layers, k]``
(positions ``[routed_experts_start_len, seqlen - 1)``; start 0 here). ``parse_generate_response`` turns that into the
same ``Generated`` records as the transformers backend: prompt routes [P, layers, k] and response routes [T - 1,
layers, k] in the narrowest dtype (uint8 for <= 256 experts).

Nothing here imports sglang: these functions only build and read its documented JSON.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from engine.model import Generated
from engine.routing import route_dtype


def generate_payload(prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_id: int,
                     return_routes: bool) -> dict:
    """The ``/generate`` body for a batch of token-id prompts (one sample each; repeat a prompt for a group)."""
    return {"input_ids": [list(map(int, p)) for p in prompts],
            "sampling_params": {"temperature": float(temperature), "max_new_tokens": int(max_new_tokens),
                                "stop_token_ids": [int(eos_id)], "skip_special_tokens": False},
            "return_logprob": True, "return_routed_experts": bool(return_routes)}


def decode_routed_experts(payload: str, *, prompt_len: int, completion_len: int, num_layers: int, top_k: int,
                          num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """sglang's base64 int32 ``routed_experts`` -> (prompt routes [P, layers, k], response routes [T - 1, layers,
    k]) in ``route_dtype(num_experts)``. Raises ValueError naming what does not fit."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError(f"routed_experts is not base64: {e}") from None
    per_row = num_layers * top_k * 4
    rows = prompt_len + completion_len - 1
    if len(raw) != rows * per_row:
        raise ValueError(f"routed_experts holds {len(raw)} bytes; {prompt_len} prompt + {completion_len} generated "
                         f"tokens x {num_layers} layers x top-{top_k} need {rows * per_row} (int32, seqlen - 1 rows). "
                         f"Was the server started with --enable-return-routed-experts for this model?")
    ids = np.frombuffer(raw, dtype="<i4").reshape(rows, num_layers, top_k)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"routed_experts names expert ids in [{int(ids.min())}, {int(ids.max())}]; the model has "
                         f"{num_experts} routed experts")
    ids = ids.astype(route_dtype(num_experts))
    return ids[:prompt_len], ids[prompt_len:]


def parse_generate_response(items: list[dict] | dict, prompts: list[list[int]], *, num_layers: int, top_k: int,
                            num_experts: int, return_routes: bool) -> list[Generated]:
    """``/generate`` response items (one per prompt, in order) -> ``Generated`` per prompt."""
    items = [items] if isinstance(items, dict) else items
    if len(items) != len(prompts):
        raise ValueError(f"sglang returned {len(items)} results for {len(prompts)} prompts")
    out = []
    for i, (item, prompt) in enumerate(zip(items, prompts)):
        meta = item.get("meta_info") or {}
        token_ids = [int(t) for t in item.get("output_ids", [])]
        logprob_rows = meta.get("output_token_logprobs")
        if logprob_rows is None:
            raise ValueError(f"result {i} has no meta_info.output_token_logprobs: send return_logprob=true")
        if [int(r[1]) for r in logprob_rows] != token_ids:
            raise ValueError(f"result {i}: output_token_logprobs token ids do not match output_ids")
        logprobs = [float(r[0]) for r in logprob_rows]
        prompt_routes = routes = None
        if return_routes:
            if "routed_experts" not in meta:
                raise ValueError(f"result {i} has no meta_info.routed_experts: start sglang with "
                                 f"--enable-return-routed-experts and send return_routed_experts=true")
            prompt_routes, routes = decode_routed_experts(
                meta["routed_experts"], prompt_len=len(prompt), completion_len=len(token_ids),
                num_layers=num_layers, top_k=top_k, num_experts=num_experts)
        out.append(Generated(token_ids, logprobs, prompt_routes, routes))
    return out
