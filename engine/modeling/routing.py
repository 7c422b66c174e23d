"""MoE routes: record the experts every router picks, and replay recorded experts (Router Replay, spec B.4).

A route is the top-k expert ids one MoE layer chose for one token position. A sequence's routes are an array
``[positions, layers, k]`` of ``route_dtype(num_experts)`` (uint8 for <= 256 experts). Position p holds the
routing of the hidden state of token p, i.e. the routing used to predict token p + 1. The last token of a
sequence is never fed to the model during generation, so a sequence of S tokens has S - 1 routed positions
(sglang's ``routed_experts`` has the same ``seqlen - 1`` rows).

Both recording and replay are forward hooks on the model's routers (every module whose class name ends in
``TopKRouter``: Qwen3-MoE, Qwen2-MoE, Mixtral and Qwen3.5-MoE in transformers share the layout: forward returns
``(router_logits, routing_weights, expert_ids)`` over flattened ``[batch * seq, hidden]`` input; DeepSpeed
AutoEP's ``TokenChoiceTopKRouter`` in an expert-parallel learner returns ``(weights, expert_ids, counts)``). Replay keeps the
router's own logits and recomputes the gate weights restricted to the forced experts (softmax over all experts,
gathered at the forced ids, renormalised when ``norm_topk_prob``), so the router still receives gradient and the
expert set equals the recorded one. Positions without a recorded route keep the router's own choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

REPLAY_MODES = ("off", "R2", "R3")


def route_dtype(num_experts: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every expert id."""
    if num_experts <= 1 << 8:
        return np.dtype(np.uint8)
    if num_experts <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The MoE routers of ``model`` in layer order (transformers' ``*TopKRouter`` modules)."""
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    for r in routers:
        if not all(hasattr(r, a) for a in ("top_k", "num_experts")):
            raise TypeError(f"{type(r).__name__} lacks top_k/num_experts: not a supported MoE router")
    return routers


def route_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num MoE layers, top_k, num_experts) of ``model``."""
    routers = moe_routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE router: router replay needs an MoE model")
    return len(routers), int(routers[0].top_k), int(routers[0].num_experts)


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
                routed_N: torch.Tensor | None = None, record: bool = True) -> Iterator[RouteLog]:
    """Record every router's choice; with ``forced_NTLK`` also replay those experts.

    ``forced_NTLK`` (integer, [N, T, layers, k]) applies to forwards over ``[N, T]`` inputs; ``routed_N`` gives
    how many leading positions of each sequence have a recorded route (default: all). Forwards of any other
    shape are not replayed (and a forced route outside [0, num_experts) raises).
    """
    routers = moe_routers(model)
    log = RouteLog(calls=[[] for _ in routers])
    forced_rows, valid_rows = None, None
    if forced_NTLK is not None:
        n, t, layers, k = forced_NTLK.shape
        if layers != len(routers) or k != routers[0].top_k:
            raise ValueError(f"routes have {layers} layers x top-{k}; the model has {len(routers)} MoE layers x "
                             f"top-{routers[0].top_k} (routes recorded with a different model?)")
        forced_rows = forced_NTLK.reshape(n * t, layers, k).long()
        if forced_rows.numel() and int(forced_rows.max()) >= routers[0].num_experts:
            raise ValueError(f"a route names expert {int(forced_rows.max())}; the model has "
                             f"{routers[0].num_experts} experts")
        if routed_N is not None:
            valid_rows = (torch.arange(t)[None, :] < routed_N.reshape(n, 1)).reshape(n * t)

    def make_hook(layer: int):
        def hook(module, inputs, output):
            ep = _is_ep_router(module)
            ids = output[1] if ep else output[2]
            if record:
                log.calls[layer].append(ids.detach())
            if forced_rows is None or ids.shape[0] != forced_rows.shape[0]:
                return None
            forced = forced_rows[:, layer].to(ids.device)
            if valid_rows is not None:
                forced = torch.where(valid_rows.to(ids.device)[:, None], forced, ids)
            return _replayed_ep(module, inputs[0], output, forced) if ep else _replayed_hf(module, output, forced)

        return hook

    handles = [r.register_forward_hook(make_hook(i)) for i, r in enumerate(routers)]
    try:
        yield log
    finally:
        for h in handles:
            h.remove()


def _is_ep_router(module: nn.Module) -> bool:
    """DeepSpeed AutoEP's ``TokenChoiceTopKRouter`` (expert-parallel learners): forward(x [T, H]) returns
    ``(gate weights, expert_ids, tokens_per_expert)`` and has no logits in its output."""
    return hasattr(module, "route_norm") and hasattr(module, "score_func")


def _replayed_hf(module: nn.Module, output: tuple, forced: torch.Tensor) -> tuple:
    """transformers' router output with ``forced`` experts and gate weights from the router's own logits."""
    logits, weights, _ = output
    gate = torch.softmax(logits, dim=-1, dtype=torch.float).gather(-1, forced)
    if getattr(module, "norm_topk_prob", False):
        gate = gate / gate.sum(dim=-1, keepdim=True)
    return logits, gate.to(weights.dtype), forced


def _replayed_ep(module: nn.Module, x: torch.Tensor, output: tuple, forced: torch.Tensor) -> tuple:
    """The same for DeepSpeed's EP router: its scores are recomputed from ``module.gate(x)`` (one small matmul),
    gathered at ``forced``, normalised and scaled as the router itself does; expert token counts follow."""
    if module.score_func != "softmax":
        raise NotImplementedError(f"router replay supports softmax routers, not score_func={module.score_func!r}")
    weights = output[0]
    gate = torch.softmax(module.gate(x).float(), dim=-1).gather(1, forced)
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
