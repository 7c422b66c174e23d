"""Expert parallelism for the learner: DeepSpeed AutoEP on the transformers MoE model, and back to HF weights.

With ``learner.expert_parallel=E`` (> 1) DeepSpeed's AutoEP replaces every MoE block (the family's AutoEP preset
is declared by its adapter, engine/modeling/adapters.py) by an
``AutoEPMoELayer``: a ``TokenChoiceTopKRouter`` (``router.gate``, the HF ``mlp.gate``) and ``GroupedExperts``
holding ``num_experts / E`` experts per rank (``w1`` gate, ``w3`` up: [E_local, I, H]; ``w2`` down:
[E_local, H, I]); tokens reach their experts by all-to-all inside each group of E ranks. Attention, norms,
embeddings and routers stay replicated (data-parallel). Router replay hooks the AutoEP router
(engine/modeling/routing.py), so R3/R2 work unchanged.

Rollout workers and the gap probe use plain HF weights. ``hf_state_dict`` all-gathers the expert shards over
the expert-parallel group and renames them (``gate_up_proj = cat(w1, w3)``, ``down_proj = w2``,
``mlp.gate.* = router.gate.*`` and ``router.e_score_correction_bias``, plus the adapter's ``ep_renames`` such as
Qwen2-MoE's ``shared_experts`` -> ``shared_expert``). It is a collective: every rank of the group must call it.

transformers 5.24 and DeepSpeed 0.19.8 disagree on one registry call (``_CanRecordRegistry.get`` takes a default);
``patch_transformers`` applies the one-line workaround measured in shared/spec/DEPENDENCIES.md §2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.modeling.adapters import MoEAdapter, adapter_for, model_type_of

_EXPERT = ".mlp.experts."  # AutoEP's names (GroupedExperts w1/w2/w3, the router and its alias)
_ROUTER, _HF_ROUTER, _ALIAS = ".mlp.router.", ".mlp.gate.", ".mlp.gate.gate."


def _ep_adapter(model_or_config) -> MoEAdapter:
    adapter = adapter_for(model_or_config)
    if adapter is None or adapter.ep_preset is None:
        model_type = model_type_of(model_or_config)
        raise ValueError(f"learner.expert_parallel > 1: DeepSpeed AutoEP has no preset for model_type "
                         f"{model_type!r} (dense, or an MoE family it cannot shard): pass learner.expert_parallel=1")
    return adapter


def autoep_config(ep_size: int, model_type: str) -> dict:
    """The ``expert_parallel`` section of the DeepSpeed config (the preset named by the family's adapter)."""
    preset = _ep_adapter({"model_type": model_type}).ep_preset
    return {"enabled": True, "autoep_size": ep_size, "preset_model": preset}


def patch_transformers() -> None:
    """AutoEP calls ``_CanRecordRegistry.get(key, default)`` with a module class; transformers 5.24 takes one
    argument keyed by string. Idempotent."""
    from transformers.utils import output_capturing as oc

    if getattr(oc._CanRecordRegistry.get, "_everyprompt_patch", False):
        return

    def get(self, key, default=None):
        if isinstance(key, str):
            return dict.get(self, key, default)
        return dict.get(self, str(key.__class__)) or {}

    get._everyprompt_patch = True
    oc._CanRecordRegistry.get = get


def _ep_group(module: nn.Module):
    for m in module.modules():
        if getattr(m, "_is_autoep_layer", False):
            return m.ep_group, m.ep_size
    raise ValueError("no AutoEP layer in this model: was it initialised with learner.expert_parallel > 1?")


@torch.no_grad()
def hf_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full transformers state dict of an AutoEP model (a collective over its expert-parallel group)."""
    group, ep_size = _ep_group(module)
    renames = _ep_adapter(module).ep_renames
    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        if _ALIAS in name:  # mlp.gate is mlp.router: the same tensor under a second name
            continue
        if _EXPERT in name:
            parts = [torch.empty_like(value) for _ in range(ep_size)]
            dist.all_gather(parts, value.contiguous(), group=group)
            out[name] = torch.cat(parts, 0)
        else:
            hf = name.replace(_ROUTER + "gate.", _HF_ROUTER).replace(_ROUTER, _HF_ROUTER)
            for ep_part, hf_part in renames:
                hf = hf.replace(ep_part, hf_part)
            out[hf] = value.detach().clone()
    for name in [n for n in out if n.endswith(_EXPERT + "w1")]:
        prefix = name[: -len("w1")]
        out[prefix + "gate_up_proj"] = torch.cat([out.pop(prefix + "w1"), out.pop(prefix + "w3")], dim=1)
        out[prefix + "down_proj"] = out.pop(prefix + "w2")
    return out


@torch.no_grad()
def replica_check(module: nn.Module) -> dict[str, float]:
    """A collective over all ranks: ``replica_drift``, the largest difference between ranks of a per-tensor
    checksum of the replicated (non-expert) parameters, 0 when data parallelism keeps them identical; with
    AutoEP also ``expert_shards_distinct``, 1 when every rank holds expert weights different from rank 0's."""
    shared, experts = [], []
    for name, p in module.named_parameters():
        x = p.detach().double()
        (experts if _EXPERT in name else shared).append(torch.stack([x.sum(), x.square().sum()]))
    out = {}
    for key, sums in (("replica_drift", shared), ("expert_shards_distinct", experts)):
        if not sums:
            continue
        local = torch.cat(sums)
        every = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(every, local)
        diffs = [float((r - every[0]).abs().max()) for r in every[1:]]
        out[key] = max(diffs, default=0.0) if key == "replica_drift" else float(all(d > 0 for d in diffs))
    return out
