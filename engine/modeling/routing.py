"""MoE routes: record the experts every router picks, and replay recorded experts (Router Replay, spec B.4).

A route is the top-k expert ids one MoE layer chose for one token position. A sequence's routes are an array
``[positions, layers, k]`` of ``route_dtype(num_experts)`` (uint8 for <= 256 experts). Position p holds the
routing of the hidden state of token p, i.e. the routing used to predict token p + 1. The last token of a
sequence is never fed to the model during generation, so a sequence of S tokens has S - 1 routed positions
(sglang's ``routed_experts`` has the same ``seqlen - 1`` rows).

Both recording and replay are forward hooks on the model's routers, found and read through the model family's
adapter (engine/modeling/adapters.py: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3, GPT-OSS). transformers'
routers take flattened ``[batch * seq, hidden]`` input and return logits, gate weights and expert ids (positions
declared by the adapter); DeepSpeed AutoEP's ``TokenChoiceTopKRouter`` in an expert-parallel learner returns
``(weights, expert_ids, counts)``. Replay recomputes the router's raw logits from its weight and input (adapter
``router_logits``; the logits a router returns are not trusted: older transformers returned probabilities there)
and the gate weights of the forced experts with the family's scoring function (adapter ``gate_weights``), so the
router still receives gradient and the expert set equals the recorded one. Positions without a recorded route keep
the router's own choice. Dense layers have no router and no route.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from engine.modeling.adapters import MoEAdapter, adapter_for, is_ep_router


def route_dtype(num_experts: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every expert id."""
    if num_experts <= 1 << 8:
        return np.dtype(np.uint8)
    if num_experts <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _adapter(model: nn.Module, adapter: MoEAdapter | None) -> MoEAdapter:
    found = adapter or adapter_for(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no MoE router: router replay needs an MoE model "
                         f"(pass learner.router_replay=off)")
    return found


def moe_routers(model: nn.Module, adapter: MoEAdapter | None = None) -> list[nn.Module]:
    """The MoE routers of ``model`` in layer order, found by its family's adapter (engine/modeling/adapters.py)."""
    return _adapter(model, adapter).routers(model)


def route_shape(model: nn.Module, adapter: MoEAdapter | None = None) -> tuple[int, int, int]:
    """(num MoE layers, top_k, num_experts) of ``model``."""
    adapter = _adapter(model, adapter)
    routers = adapter.routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE router: router replay needs an MoE model")
    return len(routers), adapter.top_k, adapter.num_experts


@dataclass
class RouteLog:
    """What the routers chose during the forwards run inside ``route_hooks``: ``calls[layer]`` holds one
    ``[rows, k]`` int64 tensor per forward (the router's own choice, before any replay)."""

    calls: list[list[torch.Tensor]] = field(default_factory=list)

    def stacked(self, call: int) -> torch.Tensor:
        """``[rows, layers, k]`` of one forward."""
        return torch.stack([layer[call] for layer in self.calls], dim=1)


@contextmanager
def route_hooks(model: nn.Module, *, forced_NTLK: torch.Tensor | None = None,
                routed_N: torch.Tensor | None = None, record: bool = True,
                adapter: MoEAdapter | None = None) -> Iterator[RouteLog]:
    """Record every router's choice; with ``forced_NTLK`` also replay those experts.

    ``forced_NTLK`` (integer, [N, T, layers, k]) applies to forwards over ``[N, T]`` inputs; ``routed_N`` gives
    how many leading positions of each sequence have a recorded route (default: all). Forwards of any other
    shape are not replayed (and a forced route outside [0, num_experts) raises). ``adapter`` defaults to the
    model's own (``adapter_for(model)``); pass it to hook a bare router module. A dense model (no adapter, no
    MoE layers) records nothing (``calls`` is empty) unless routes are forced, which raises.
    """
    if adapter is None and forced_NTLK is None and adapter_for(model) is None:
        yield RouteLog(calls=[])
        return
    adapter = _adapter(model, adapter)
    routers = adapter.routers(model)
    log = RouteLog(calls=[[] for _ in routers])
    forced_rows, valid_rows = None, None
    if forced_NTLK is not None:
        n, t, layers, k = forced_NTLK.shape
        if layers != len(routers) or k != adapter.top_k:
            raise ValueError(f"routes have {layers} layers x top-{k}; the model has {len(routers)} MoE layers x "
                             f"top-{adapter.top_k} (routes recorded with a different model?)")
        forced_rows = forced_NTLK.reshape(n * t, layers, k).long()
        if forced_rows.numel() and int(forced_rows.max()) >= adapter.num_experts:
            raise ValueError(f"a route names expert {int(forced_rows.max())}; the model has "
                             f"{adapter.num_experts} experts")
        if routed_N is not None:
            valid_rows = (torch.arange(t, device=routed_N.device)[None, :] < routed_N.reshape(n, 1)).reshape(n * t)

    def make_hook(layer: int):
        def hook(module, inputs, output):
            ep = is_ep_router(module)
            ids = output[1] if ep else adapter.read(output)[2]
            if record:
                log.calls[layer].append(ids.detach())
            if forced_rows is None or ids.shape[0] != forced_rows.shape[0]:
                return None
            forced = forced_rows[:, layer].to(ids.device)
            if valid_rows is not None:
                forced = torch.where(valid_rows.to(ids.device)[:, None], forced, ids)
            if ep:
                return _replayed_ep(module, inputs[0], output, forced)
            return _replayed_hf(adapter, module, inputs[0], output, forced)

        return hook

    handles = [r.register_forward_hook(make_hook(i)) for i, r in enumerate(routers)]
    try:
        yield log
    finally:
        for h in handles:
            h.remove()


def _replayed_hf(adapter: MoEAdapter, module: nn.Module, x: torch.Tensor, output: tuple,
                 forced: torch.Tensor) -> tuple:
    """transformers' router output with ``forced`` experts and the family's gate weights (engine/modeling/adapters.py
    ``gate_weights``) from the router's raw logits, recomputed from its weight (``adapter.router_logits``: one
    small matmul, through which the router gets its gradient). The logits slot of ``output`` is not read:
    transformers releases before the router-logits fix put softmaxed probabilities there, and the gate weights
    would then be a softmax of a softmax."""
    _, weights, _ = adapter.read(output)
    logits = adapter.router_logits(module, x)
    return adapter.replaced(output, adapter.gate_weights(logits, forced).to(weights.dtype), forced)


def _replayed_ep(module: nn.Module, x: torch.Tensor, output: tuple, forced: torch.Tensor) -> tuple:
    """The same for DeepSpeed's EP router: its scores are recomputed from ``module.gate(x)`` (one small matmul)
    with its own ``score_func`` (softmax or sigmoid; a correction bias only selects), gathered at ``forced``,
    normalised and scaled as the router itself does; expert token counts follow."""
    if module.score_func not in ("softmax", "sigmoid"):
        raise NotImplementedError(f"router replay supports softmax/sigmoid routers, not {module.score_func!r}")
    weights, logits = output[0], module.gate(x).float()
    scores = torch.softmax(logits, dim=-1) if module.score_func == "softmax" else torch.sigmoid(logits)
    gate = scores.gather(1, forced)
    if module.route_norm:
        gate = gate / (gate.sum(dim=-1, keepdim=True) + 1e-20)
    gate = gate * module.route_scale
    counts = torch.bincount(forced.reshape(-1), minlength=module.num_experts).to(output[2].dtype)
    return gate.to(weights.dtype), forced, counts


def mismatch_NT(own_NTLK: torch.Tensor, recorded_NTLK: torch.Tensor) -> torch.Tensor:
    """True where the two routings pick a different expert *set* in at least one layer (order is ignored)."""
    own = own_NTLK.long().sort(dim=-1).values
    rec = recorded_NTLK.long().sort(dim=-1).values
    return (own != rec).any(dim=-1).any(dim=-1)


def pack_routes(rows: list[tuple[np.ndarray, np.ndarray] | None], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence (prompt routes [P, layers, k], response routes [T - 1, layers, k]) -> ``routes`` [N, length,
    layers, k] (left-aligned, prompt then response) and ``routed`` int32 [N], the routed positions of each row.

    A row given as None has no routes (routed = 0). All rows None -> arrays with zero-size trailing dims."""
    present = [r for r in rows if r is not None]
    if not present:
        return np.zeros((len(rows), 0, 0, 0), dtype=np.uint8), np.zeros(len(rows), dtype=np.int32)
    shape_lk, dtype = present[0][0].shape[1:], present[0][0].dtype
    routes = np.zeros((len(rows), length) + shape_lk, dtype=dtype)
    routed = np.zeros(len(rows), dtype=np.int32)
    for i, r in enumerate(rows):
        if r is None:
            continue
        prompt, response = r
        if prompt.shape[1:] != shape_lk or response.shape[1:] != shape_lk:
            raise ValueError(f"row {i}: routes of shape {prompt.shape[1:]}/{response.shape[1:]}, others {shape_lk}")
        n = len(prompt) + len(response)
        routes[i, :len(prompt)], routes[i, len(prompt):n] = prompt, response
        routed[i] = n
    return routes, routed
