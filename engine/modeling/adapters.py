"""Model adapters: what router replay, expert parallelism and the sglang backend need to know about one MoE family.

An adapter is a class registered by HF ``config.model_type``. It declares where the routers are (their class name;
DeepSpeed AutoEP's ``TokenChoiceTopKRouter`` replaces them in an expert-parallel learner), where the router output
keeps its logits, weights and expert ids, the scoring function, whether the top-k weights are renormalised, which
decoder layers are dense, ``num_experts`` / ``top_k`` from the config, and the names expert parallelism (AutoEP
preset, state-dict renames) and sglang's checkpoint layout use. engine/modeling/routing.py, expert_parallel.py and
the sglang backend's ``moe_shape`` read models only through ``adapter_for``.

Scoring functions (``scoring``), each recomputed by ``gate_weights`` for forced experts from the router's raw
logits (``router_logits``: recomputed from the router's weight, never read from its output, which older transformers
releases filled with softmaxed probabilities):
- ``softmax``: softmax over all experts, gathered at the chosen ids; renormalised over the top-k when ``renorm``
  says so (``"config"``: the config's ``norm_topk_prob``; ``"always"``: Mixtral).
- ``sigmoid``: sigmoid per expert, gathered; an ``e_score_correction_bias`` and group-limited top-k (``n_group`` /
  ``topk_group``) act on selection only, so replay does not need them; renormalised per ``norm_topk_prob``, then
  times ``routed_scaling_factor`` (DeepSeek-V3).
- ``topk_softmax``: softmax over the chosen experts' logits (router bias included in the logits; GPT-OSS).

Adding a family: one adapter class below and one ``_register`` line.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` of a ``config.json`` dict or a transformers config object (None counts as missing)."""
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if value is None else value


class MoEAdapter:
    """Qwen3-MoE, the reference family; the others override what differs."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen3_moe",)
    router_class: ClassVar[str] = "Qwen3MoeTopKRouter"
    experts_keys: ClassVar[tuple[str, ...]] = ("num_experts", "num_local_experts")  # the first one present
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    output_at: ClassVar[tuple[int, int, int]] = (0, 1, 2)  # router forward output: (logits, weights, ids)
    scoring: ClassVar[Literal["softmax", "sigmoid", "topk_softmax"]] = "softmax"
    renorm: ClassVar[Literal["config", "always", "never"]] = "config"
    ep_preset: ClassVar[str | None] = "qwen3_moe"  # DeepSpeed AutoEP preset_model; None: AutoEP cannot shard it
    ep_renames: ClassVar[tuple[tuple[str, str], ...]] = ()  # AutoEP state-dict name part -> HF name part
    hub_block: ClassVar[str] = ".mlp."  # the MoE block's name in checkpoints (sglang reads this layout)
    hub_experts: ClassVar[tuple[str, str, str] | None] = ("gate_proj", "up_proj", "down_proj")  # None: fused

    def __init__(self, config: Any) -> None:
        self.config = config
        self.model_type = str(cfg_get(config, "model_type", "?"))

    @property
    def num_experts(self) -> int:
        found = [cfg_get(self.config, k) for k in self.experts_keys if cfg_get(self.config, k) is not None]
        if not found:
            raise ValueError(f"{self.model_type} config has none of {', '.join(self.experts_keys)}: not an MoE "
                             f"config")
        return int(found[0])

    @property
    def top_k(self) -> int:
        return int(cfg_get(self.config, self.top_k_key))

    @property
    def num_layers(self) -> int:
        return int(cfg_get(self.config, "num_hidden_layers"))

    def sparse_layers(self) -> list[int]:
        """Indices of the decoder layers that have experts (the others are dense and have no router)."""
        dense = set(cfg_get(self.config, "mlp_only_layers", []))
        step = int(cfg_get(self.config, "decoder_sparse_step", 1))
        return [i for i in range(self.num_layers) if i not in dense and (i + 1) % step == 0]

    def normalises(self) -> bool:
        if self.renorm == "config":
            return bool(cfg_get(self.config, "norm_topk_prob", False))
        return self.renorm == "always"

    def is_router(self, module: nn.Module) -> bool:
        return type(module).__name__ == self.router_class or is_ep_router(module)

    def routers(self, model: nn.Module) -> list[nn.Module]:
        """The routers of ``model`` in layer order, one per sparse layer (checked against the config)."""
        found = [m for m in model.modules() if self.is_router(m)]
        if found and hasattr(model, "config") and len(found) != len(self.sparse_layers()):
            raise ValueError(f"{self.model_type}: the model has {len(found)} routers, its config declares "
                             f"{len(self.sparse_layers())} MoE layers (engine/modeling/adapters.py sparse_layers)")
        return found

    def read(self, output: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [rows, E], gate weights [rows, k], expert ids [rows, k]) of one router forward output."""
        at_logits, at_weights, at_ids = self.output_at
        return output[at_logits], output[at_weights], output[at_ids]

    def router_logits(self, router: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The raw router logits [rows, E] of input ``x`` ([..., H], flattened as the router does):
        ``x @ router.weight.T`` (+ ``router.bias`` where the router has one: GPT-OSS), recomputed rather than read
        from the router's output."""
        x = x.reshape(-1, router.weight.shape[-1])
        return torch.nn.functional.linear(x, router.weight, getattr(router, "bias", None))

    def replaced(self, output: tuple, weights: torch.Tensor, ids: torch.Tensor) -> tuple:
        """``output`` with its gate weights and expert ids replaced, other fields kept."""
        out = list(output)
        out[self.output_at[1]], out[self.output_at[2]] = weights, ids
        return tuple(out)

    def gate_weights(self, logits: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """The gate weights this family's router gives experts ``forced`` [rows, k] (float32 except topk_softmax,
        which keeps the logits' dtype as the router does)."""
        if self.scoring == "topk_softmax":
            return torch.softmax(logits.gather(-1, forced), dim=-1, dtype=logits.dtype)
        if self.scoring == "softmax":
            gate = torch.softmax(logits, dim=-1, dtype=torch.float).gather(-1, forced)
            return gate / gate.sum(dim=-1, keepdim=True) if self.normalises() else gate
        gate = logits.float().sigmoid().gather(-1, forced)
        if self.normalises():
            gate = gate / (gate.sum(dim=-1, keepdim=True) + 1e-20)
        return gate * float(cfg_get(self.config, "routed_scaling_factor", 1.0))

    def hub_layout(self, state: dict) -> dict:
        """transformers-5 in-memory names (experts fused: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I])
        -> this family's checkpoint layout, the one sglang loads (``experts.{e}.<gate>|<up>|<down>.weight`` under
        ``hub_block``). Works on numpy arrays and tensors; a fused family keeps its names."""
        if self.hub_experts is None:
            return dict(state)
        gate, up, down = self.hub_experts
        out = {}
        for name, value in state.items():
            name = name.replace(".mlp.", self.hub_block)
            stem, _, leaf = name.rpartition(".experts.")
            if leaf not in ("gate_up_proj", "down_proj"):
                out[name] = value
                continue
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                parts = ((gate, value[e, :inter]), (up, value[e, inter:])) if leaf == "gate_up_proj" else \
                    ((down, value[e]),)
                out.update({f"{stem}.experts.{e}.{part}.weight": w for part, w in parts})
        return out

    def routed_layers(self, ids_RLK):
        """sglang's ``routed_experts`` rows ``[rows, num_hidden_layers, k]`` (dense layers zero) -> the MoE
        layers' ``[rows, MoE layers, k]``, the layout router replay uses."""
        return ids_RLK[:, self.sparse_layers()]


def is_ep_router(module: nn.Module) -> bool:
    """DeepSpeed AutoEP's ``TokenChoiceTopKRouter`` (expert-parallel learners): forward(x [T, H]) returns
    ``(gate weights, expert_ids, tokens_per_expert)`` and has no logits in its output."""
    return hasattr(module, "route_norm") and hasattr(module, "score_func")


class Qwen2MoeAdapter(MoEAdapter):
    """Qwen2-MoE: Qwen3's router plus a shared expert with a sigmoid ``shared_expert_gate`` (not routed)."""

    model_types = ("qwen2_moe",)
    router_class = "Qwen2MoeTopKRouter"
    ep_renames = ((".mlp.shared_experts.", ".mlp.shared_expert."),
                  (".mlp.shared_experts_gate.", ".mlp.shared_expert_gate."))


class OlmoeAdapter(MoEAdapter):
    """OLMoE: Qwen3's router (``norm_topk_prob``, off by default), every layer sparse, no AutoEP preset."""

    model_types = ("olmoe",)
    router_class = "OlmoeTopKRouter"
    ep_preset = None

    def sparse_layers(self) -> list[int]:
        return list(range(self.num_layers))


class MixtralAdapter(OlmoeAdapter):
    """Mixtral: always renormalises the top-k (no ``norm_topk_prob``); checkpoints name the block
    ``block_sparse_moe`` and the experts ``w1`` (gate), ``w3`` (up), ``w2`` (down)."""

    model_types = ("mixtral",)
    router_class = "MixtralTopKRouter"
    renorm = "always"
    ep_preset = "mixtral"
    hub_block = ".block_sparse_moe."
    hub_experts = ("w1", "w3", "w2")


class DeepseekV3Adapter(MoEAdapter):
    """DeepSeek-V3: sigmoid scores, bias-corrected group-limited selection, ``routed_scaling_factor``, the first
    ``first_k_dense_replace`` layers dense."""

    model_types = ("deepseek_v3",)
    router_class = "DeepseekV3TopkRouter"
    experts_keys = ("n_routed_experts",)
    scoring = "sigmoid"
    ep_preset = "deepseek_v3"

    def sparse_layers(self) -> list[int]:
        return list(range(int(cfg_get(self.config, "first_k_dense_replace", 0)), self.num_layers))

    def router_logits(self, router: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """As the base class, in float32 as DeepseekV3TopkRouter computes them."""
        x = x.reshape(-1, router.weight.shape[-1])
        return torch.nn.functional.linear(x.float(), router.weight.float())


class GptOssAdapter(OlmoeAdapter):
    """GPT-OSS: top-k over the biased logits, softmax over the top-k; experts stored fused in checkpoints too."""

    model_types = ("gpt_oss",)
    router_class = "GptOssTopKRouter"
    scoring = "topk_softmax"
    hub_experts = None


ADAPTERS: dict[str, type[MoEAdapter]] = {}


def _register(cls: type[MoEAdapter]) -> None:
    for name in cls.model_types:
        ADAPTERS[name] = cls


for _cls in (MoEAdapter, Qwen2MoeAdapter, MixtralAdapter, OlmoeAdapter, DeepseekV3Adapter, GptOssAdapter):
    _register(_cls)

_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _config_of(model_or_config: Any) -> Any:
    return model_or_config if isinstance(model_or_config, dict) else getattr(model_or_config, "config",
                                                                             model_or_config)


def model_type_of(model_or_config: Any) -> str:
    """HF ``model_type`` of a model, its config or a ``config.json`` dict ("" when it has none)."""
    return str(cfg_get(_config_of(model_or_config), "model_type", ""))


def has_moe_layers(model_or_config: Any) -> bool:
    """Whether a model (or its config) has routed experts, adapter or not."""
    config = _config_of(model_or_config)
    if any(int(cfg_get(config, k, 0) or 0) > 0 for k in _MOE_KEYS):
        return True
    return isinstance(model_or_config, nn.Module) and any(
        type(m).__name__.endswith(("TopKRouter", "TopkRouter", "SparseMoeBlock")) for m in model_or_config.modules())


def adapter_for(model_or_config: Any) -> MoEAdapter | None:
    """The adapter of a model (or its config / ``config.json`` dict); None for a dense model. An MoE model of a
    family without an adapter raises a one-line error naming its ``model_type`` and the fix."""
    config, model_type = _config_of(model_or_config), model_type_of(model_or_config)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type](config)
    if has_moe_layers(model_or_config):
        raise ValueError(f"model_type {model_type!r} has MoE layers but no router-replay adapter (known: "
                         f"{', '.join(sorted(ADAPTERS))}): pass learner.router_replay=off, or add an adapter in "
                         f"engine/modeling/adapters.py")
    return None


_WARNED: set[str] = set()


def effective_replay(model_or_config: Any, requested: str, *, warn=None) -> str:
    """The router-replay mode a run uses: ``requested``, or "off" (with one warning per model type and process)
    for a dense model. An MoE model without an adapter raises unless replay is off."""
    if requested == "off":
        return "off"
    adapter = adapter_for(model_or_config)
    if adapter is not None and adapter.sparse_layers():
        return requested
    model_type = model_type_of(model_or_config) or "?"
    if model_type not in _WARNED:
        _WARNED.add(model_type)
        message = f"{model_type} is a dense model (no MoE routers): router replay {requested} -> off"
        if warn is None:
            import structlog

            structlog.get_logger().warning("router_replay.off", model_type=model_type, detail=message)
        else:
            warn(message)
    return "off"
