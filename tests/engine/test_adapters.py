"""Router replay through the model adapters on six MoE families (tiny random-init models, fp32, no downloads).

For each family: generate with route capture (engine/modeling/model.generate, the project's capture path), then
recompute teacher-forced with the recorded routes forced: the log-probs equal the behaviour log-probs to fp32
noise. A second check perturbs one router so it picks an expert no recorded route uses: without replay the
routes (and log-probs) change, with replay they do not (the perturbed expert is outside every forced set, and
the gate weights of a renormalised family depend only on the chosen experts' logits). Also: each family's
checkpoint layout (what sglang loads) reads back through transformers, and the config.json view (the sglang
backend's ``moe_shape``, ``routed_experts`` layer selection) agrees with the model's routers.
"""

import numpy as np
import pytest
import torch
import transformers as tf

from engine.modeling.adapters import ADAPTERS, adapter_for, effective_replay
from engine.modeling.model import generate, token_logprobs
from engine.modeling.routing import mismatch_NT, moe_routers, pack_routes, route_hooks, route_shape
from tests.byo_models import MOE_FAMILIES

pytestmark = pytest.mark.timeout(120)
PAD, EOS, VOCAB = 0, 2, 64
_ATTN = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1,
             tie_word_embeddings=False)
FAMILIES = MOE_FAMILIES  # family -> (config class, its MoE keys, MoE layer count): tests/byo_models.py
PROMPTS = [[5, 9, 11, 3], [7, 7, 20], [30, 31, 32, 33, 34], [12, 40]]


def build(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cls, moe, _ = FAMILIES[family]
    cls = getattr(tf, cls)
    config = cls(**{**_ATTN, **moe, **overrides})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # sharper routers (and selection biases), so routes matter and differ per token
        for r in moe_routers(model):
            r.weight.normal_(0, 0.5)
            for name in ("bias", "e_score_correction_bias"):
                if getattr(r, name, None) is not None:
                    getattr(r, name).normal_(0, 0.2)
    return model


def rollout(model, prompts=PROMPTS, max_new_tokens=6):
    outs = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=1.0, eos_id=EOS, pad_id=PAD,
                    generator=torch.Generator().manual_seed(1), capture_routes=True)
    seqs = [p + o.token_ids for p, o in zip(prompts, outs)]
    length = max(map(len, seqs))
    ids, mask = torch.full((len(seqs), length), PAD), torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    routes, routed = pack_routes([(o.prompt_routes, o.routes) for o in outs], length)
    behaviour = torch.tensor([lp for o in outs for lp in o.logprobs])
    return ids, mask, torch.from_numpy(routes.astype(np.int64)), torch.from_numpy(routed), behaviour, outs


def response_logps(model, ids, mask, outs, **hooks):
    with torch.no_grad(), route_hooks(model, **hooks) as own:
        logp = token_logprobs(model, ids, mask)
    picked = torch.cat([logp[i, len(p):len(p) + len(o.token_ids)] for i, (p, o) in enumerate(zip(PROMPTS, outs))])
    return picked, own


def own_mismatch(own, routes, routed) -> float:
    on = torch.arange(routes.shape[1])[None] < routed[:, None]
    return float(mismatch_NT(own.stacked(0).reshape(routes.shape), routes)[on].float().mean())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replay_reproduces_generation_logprobs(family):
    model = build(family)
    assert route_shape(model)[0] == FAMILIES[family][2]  # dense layers have no router
    ids, mask, routes, routed, behaviour, outs = rollout(model)
    replayed, own = response_logps(model, ids, mask, outs, forced_NTLK=routes, routed_N=routed)
    gap = float((replayed - behaviour).abs().max())
    print(f"{family}: max |logprob gap| under replay = {gap:.2e}")
    assert gap <= 1e-5
    assert own_mismatch(own, routes, routed) == 0.0  # the recompute's own choice agrees with what was recorded


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replay_holds_routes_a_perturbed_router_would_change(family):
    overrides = {ADAPTERS[family].experts_keys[0]: 16}  # 16 experts and short rows: some expert goes unused
    if family in ("qwen2_moe", "olmoe"):
        overrides["norm_topk_prob"] = True
    model = build(family, **overrides)
    ids, mask, routes, routed, behaviour, outs = rollout(model, PROMPTS[:2], max_new_tokens=4)
    on = torch.arange(routes.shape[1])[None] < routed[:, None]
    layer, routers = 0, moe_routers(model)
    used = routes[on][:, layer].reshape(-1).tolist()
    unused = [e for e in range(routers[layer].num_experts) if e not in used]
    assert unused, "every expert was used: the check needs one the recorded routes never chose"
    busiest = max(set(used), key=used.count)
    with torch.no_grad():  # the unused expert now outbids the busiest one wherever that one's logit is positive
        routers[layer].weight[unused[0]] = 3 * routers[layer].weight[busiest]
        for name in ("bias", "e_score_correction_bias"):  # and the top selection bias, where there is one
            if getattr(routers[layer], name, None) is not None:
                bias = getattr(routers[layer], name)
                bias[unused[0]] = bias.max() + 1
    drifted, own = response_logps(model, ids, mask, outs)
    assert own_mismatch(own, routes, routed) > 0.1 and float((drifted - behaviour).abs().max()) > 1e-3
    replayed, _ = response_logps(model, ids, mask, outs, forced_NTLK=routes, routed_N=routed)
    assert float((replayed - behaviour).abs().max()) <= 1e-5


def test_registry_dense_models_and_unknown_families():
    assert set(FAMILIES) <= set(ADAPTERS)
    dense = tf.LlamaConfig(**{**_ATTN, "num_hidden_layers": 1, "intermediate_size": 16})
    assert adapter_for(dense) is None
    warned = []
    assert effective_replay(dense, "R3", warn=warned.append) == "off"
    assert effective_replay(dense, "R3", warn=warned.append) == "off"
    assert len(warned) == 1 and "dense" in warned[0]
    assert effective_replay(tf.Qwen3Config(**_ATTN), "off") == "off"
    unknown = {"model_type": "jamba", "num_experts": 16, "num_hidden_layers": 4}
    with pytest.raises(ValueError, match="'jamba' has MoE layers .*learner.router_replay=off"):
        effective_replay(unknown, "R3")
    assert effective_replay(unknown, "off") == "off"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hub_layout_is_what_transformers_loads_from_a_checkpoint(family, tmp_path):
    """The adapter's checkpoint names (what sglang reads) load back through transformers' own converters."""
    from safetensors.torch import save_file

    model = build(family)
    state = adapter_for(model).hub_layout({k: v.contiguous() for k, v in model.state_dict().items()})
    assert family in ("gpt_oss",) or not any(k.endswith("gate_up_proj") for k in state)
    model.config.save_pretrained(tmp_path)
    save_file({k: v.clone() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_json_view_matches_the_model(family, tmp_path):
    """What the sglang backend reads from config.json (moe_shape, routed_experts' layer selection) agrees with the
    routers of the loaded model."""
    import json

    from engine.backends.sglang import moe_shape

    model = build(family)
    model.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert moe_shape(config) == route_shape(model)
    adapter = adapter_for(config)
    sparse = adapter.sparse_layers()
    rows = np.zeros((5, model.config.num_hidden_layers, adapter.top_k), dtype=np.int32)  # dense layers stay 0
    rows[:, sparse] = 1 + np.arange(len(sparse))[None, :, None]
    assert adapter.routed_layers(rows).shape == (5, route_shape(model)[0], adapter.top_k)
    assert (adapter.routed_layers(rows) > 0).all()
