"""Route capture during generation and Router Replay in a teacher-forced forward (the tiny Qwen3-MoE, fp32)."""

import numpy as np
import pytest
import torch

from configs.schema import ModelConfig
from engine.modeling.adapters import adapter_for
from engine.modeling.model import build_model, generate, token_logprobs
from engine.modeling.routing import mismatch_NT, moe_routers, pack_routes, route_dtype, route_hooks, route_shape
from engine.data.tasks import CharTokenizer

pytestmark = pytest.mark.timeout(60)
TOK = CharTokenizer()
CFG = ModelConfig(num_layers=3, num_experts=8, top_k=2)


@pytest.fixture(scope="module")
def model():
    m = build_model(CFG, TOK.vocab_size, seed=3)
    with torch.no_grad():  # sharper routers, so a wrong expert set visibly changes the output
        for r in moe_routers(m):
            r.weight.normal_(0, 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def rollout(model):
    prompts = [TOK.encode(s) for s in ["12+7=", "3+45=", "600+1=", "9+9="]] * 3
    outs = generate(model, prompts, max_new_tokens=7, temperature=1.0, eos_id=TOK.eos_id, pad_id=TOK.pad_id,
                    generator=torch.Generator().manual_seed(0), capture_routes=True)
    return prompts, outs


def _teacher_forced(prompts, outs):
    seqs = [p + o.token_ids for p, o in zip(prompts, outs)]
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), TOK.pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    routes, routed = pack_routes([(o.prompt_routes, o.routes) for o in outs], length)
    return ids, mask, torch.from_numpy(routes.astype(np.int64)), torch.from_numpy(routed)


def _response_logps(logp, prompts, outs):
    return torch.cat([logp[i, len(p):len(p) + len(o.token_ids)] for i, (p, o) in enumerate(zip(prompts, outs))])


def test_routes_are_compact_and_cover_every_fed_token(model, rollout):
    prompts, outs = rollout
    layers, k, experts = route_shape(model)
    assert (layers, k, experts) == (3, 2, 8)
    assert route_dtype(256) == np.uint8 and route_dtype(257) == np.uint16
    for p, o in zip(prompts, outs):
        assert o.prompt_routes.dtype == np.uint8 and o.prompt_routes.shape == (len(p), layers, k)
        assert o.routes.shape == (len(o.token_ids) - 1, layers, k)  # the last token is never fed
        assert int(o.routes.max(initial=0)) < experts
        assert all(len(set(row)) == k for row in o.prompt_routes.reshape(-1, k).tolist())  # k distinct experts
    # the same prompt (in the same batch) routes identically: one copy per group is enough on the wire
    np.testing.assert_array_equal(outs[0].prompt_routes, outs[4].prompt_routes)


def test_replaying_generation_routes_reproduces_generation_logprobs(model, rollout):
    prompts, outs = rollout
    ids, mask, routes, routed = _teacher_forced(prompts, outs)
    behaviour = torch.tensor([lp for o in outs for lp in o.logprobs])
    with torch.no_grad(), route_hooks(model, forced_NTLK=routes, routed_N=routed) as own:
        replayed = _response_logps(token_logprobs(model, ids, mask), prompts, outs)
    torch.testing.assert_close(replayed, behaviour, rtol=0, atol=1e-5)
    # and the trainer's own choice (before replay) agrees with what was recorded on every routed position
    own_NTLK = own.stacked(0).reshape(routes.shape)
    on = torch.arange(ids.shape[1])[None] < routed[:, None]
    assert not bool(mismatch_NT(own_NTLK, routes)[on].any())

    # different routes -> different log-probs: replay really decides the experts
    other = (routes + 1 + torch.randint(0, 7, routes.shape[:-1] + (1,))) % 8
    other[..., 1] = (other[..., 0] + 1 + torch.randint(0, 7, other.shape[:-1])) % 8  # keep k ids distinct
    with torch.no_grad(), route_hooks(model, forced_NTLK=other, routed_N=routed):
        wrong = _response_logps(token_logprobs(model, ids, mask), prompts, outs)
    assert float((wrong - behaviour).abs().mean()) > 1e-2


def test_router_gets_gradient_and_experts_use_the_forced_set(model, rollout):
    prompts, outs = rollout
    ids, mask, routes, routed = _teacher_forced(prompts, outs)
    flipped = routes.flip(-1)  # same sets in another order, and one layer replaced outright
    flipped[:, :, 0] = (flipped[:, :, 0] + 3) % 8
    seen = []
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    hooks = [e.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone())) for e in experts]
    try:
        model.zero_grad(set_to_none=True)
        with route_hooks(model, forced_NTLK=flipped, routed_N=routed):
            logp = token_logprobs(model, ids, mask)
        logp[mask.bool()].sum().backward()
    finally:
        for h in hooks:
            h.remove()
    n, t = ids.shape
    on = (torch.arange(t)[None] < routed[:, None]).reshape(-1)
    for layer, used in enumerate(seen):
        assert torch.equal(used.reshape(n * t, -1)[on], flipped[:, :, layer].reshape(n * t, -1)[on])
    for r in moe_routers(model):
        assert r.weight.grad is not None and float(r.weight.grad.norm()) > 0
    model.zero_grad(set_to_none=True)


def test_bad_routes_are_refused(model):
    with pytest.raises(ValueError, match="MoE layers"):
        with route_hooks(model, forced_NTLK=torch.zeros((2, 5, 2, 2), dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="names expert 9"):
        with route_hooks(model, forced_NTLK=torch.full((2, 5, 3, 2), 9)):
            pass
    with pytest.raises(ValueError, match="no MoE router"):
        route_shape(torch.nn.Linear(2, 2))


def test_pack_routes_aligns_prompt_and_response():
    p = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
    r = np.full((2, 2, 2), 7, dtype=np.uint8)
    routes, routed = pack_routes([(p, r), None], 8)
    assert routes.shape == (2, 8, 2, 2) and routed.tolist() == [5, 0]
    np.testing.assert_array_equal(routes[0, :3], p)
    np.testing.assert_array_equal(routes[0, 3:5], r)
    assert pack_routes([None], 4)[0].shape == (1, 0, 0, 0)


def test_replay_on_deepspeed_autoep_router_matches_the_hf_router():
    """The expert-parallel learner's router (DeepSpeed AutoEP's TokenChoiceTopKRouter, loaded with the HF gate
    weights) replays forced experts with the same gate weights as the HF router, and its gate gets gradient."""
    from deepspeed.moe.ep_router import TokenChoiceTopKRouter

    built = build_model(CFG, TOK.vocab_size, seed=5)
    hf, adapter = moe_routers(built)[0], adapter_for(built)
    ep = TokenChoiceTopKRouter(dim=hf.weight.shape[1], num_experts=8, num_expert_groups=None,
                               num_limited_groups=None, top_k=2, score_func="softmax", route_norm=True,
                               route_scale=1.0, gate_bias=False)
    with torch.no_grad():
        ep.gate.weight.copy_(hf.weight)
    x = torch.randn(6, hf.weight.shape[1])
    forced = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 7], [3, 0]])
    with route_hooks(hf, forced_NTLK=forced.reshape(2, 3, 1, 2), adapter=adapter) as hf_log:
        _, hf_gate, hf_ids = hf(x)
    with route_hooks(ep, forced_NTLK=forced.reshape(2, 3, 1, 2), adapter=adapter) as ep_log:
        ep_gate, ep_ids, counts = ep(x)
    assert torch.equal(ep_ids, forced) and torch.equal(hf_ids, forced)
    torch.testing.assert_close(ep_gate, hf_gate)
    assert counts.tolist() == torch.bincount(forced.reshape(-1), minlength=8).tolist()
    assert torch.equal(ep_log.stacked(0)[:, 0], hf_log.stacked(0)[:, 0])  # both record the router's own choice
    (ep_gate * torch.arange(2.0)).sum().backward()  # route_norm: a plain sum would have zero gradient
    assert ep.gate.weight.grad is not None and ep.gate.weight.grad.abs().sum() > 0


def test_replay_recomputes_raw_logits_from_the_router_weight():
    """transformers releases before the router-logits fix returned softmaxed probabilities in the router's logits
    slot; replay then took a softmax of a softmax. The logits are now recomputed from the gate's weight: equal to
    its linear output, and the replayed gate weights are the same whatever the router returns there."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as Router

    class Qwen3MoeTopKRouter(Router):  # the pre-fix behaviour, under the name the adapter looks for
        def forward(self, hidden_states):
            logits, scores, ids = super().forward(hidden_states)
            return torch.softmax(logits, dim=-1, dtype=torch.float), scores, ids

    built = build_model(CFG, TOK.vocab_size, seed=7)
    hf, adapter = moe_routers(built)[0], adapter_for(built)
    old = Qwen3MoeTopKRouter(built.config)
    with torch.no_grad():
        hf.weight.normal_(0, 0.5)
        old.weight.copy_(hf.weight)
    x = torch.randn(2, 3, hf.weight.shape[1])
    torch.testing.assert_close(adapter.router_logits(hf, x), x.reshape(6, -1) @ hf.weight.T)
    torch.testing.assert_close(adapter.router_logits(hf, x), hf(x)[0])  # the installed transformers: raw logits
    forced = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 7], [3, 0]]).reshape(2, 3, 1, 2)
    gates = []
    for router in (hf, old):
        with route_hooks(router, forced_NTLK=forced, adapter=adapter):
            _, gate, ids = router(x)
        assert torch.equal(ids, forced.reshape(6, 2))
        gates.append(gate)
        (gate * torch.arange(2.0)).sum().backward()
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    want = torch.softmax(x.reshape(6, -1) @ hf.weight.T, dim=-1).gather(-1, forced.reshape(6, 2))
    torch.testing.assert_close(gates[0], want / want.sum(-1, keepdim=True) if adapter.normalises() else want)
    torch.testing.assert_close(gates[1], gates[0])
    torch.testing.assert_close(hf.weight.grad, old.weight.grad)
