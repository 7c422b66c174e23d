"""engine/modeling/decode.py: rows joining a running batch, weights changing between decode steps, continuations.
The checks recompute everything teacher-forced with the weights each token was sampled with."""

import numpy as np
import pytest
import torch

from configs.schema import ModelConfig
from engine.modeling.decode import DecodeBatch, Row
from engine.modeling.model import build_model, stack_routes, token_logprobs
from engine.modeling.routing import moe_routers, route_hooks
from engine.data.tasks import CharTokenizer

pytestmark = pytest.mark.timeout(60)
TOK = CharTokenizer()
CFG = ModelConfig(num_layers=2, num_experts=8, top_k=2)
PROMPTS = [TOK.encode(s) for s in ("12+7=", "3+45=", "600+1=", "9+9=")]


def _model(seed: int):
    m = build_model(CFG, TOK.vocab_size, seed=seed)
    with torch.no_grad():
        for r in moe_routers(m):
            r.weight.normal_(0, 0.5)  # decisive routers, so version-0 and version-1 routes differ
    return m.eval()


def _teacher_forced(model, prompt, tokens):
    """(log-prob of each response token, own routes of each response position) in one full forward."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad(), route_hooks(model) as own:
        logp = token_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt):]
    routes = own.stacked(0).numpy()[len(prompt):]
    return logp, routes, own.stacked(0).numpy()[:len(prompt)]


def test_a_response_across_a_weight_update_has_the_right_versions_routes_and_logprobs():
    v0, v1 = _model(0), _model(1)
    live = _model(0)
    batch = DecodeBatch(live, eos_id=-1, pad_id=TOK.pad_id, capture_routes=True,
                        generator=torch.Generator().manual_seed(0))
    rows = [Row(key=i, prompt=p, max_new_tokens=12, temperature=1.0, want_prompt_routes=True)
            for i, p in enumerate(PROMPTS)]
    batch.add(rows)
    for _ in range(5):
        batch.step(0)
    live.load_state_dict(v1.state_dict())  # new weights between two decode steps ...
    batch.invalidate()  # ... and the KV cache recomputed under them
    while batch.active:
        batch.step(1)
    models = {0: v0, 1: v1}
    for r in rows:
        assert r.versions == [0] * 5 + [1] * 7 and r.finish_reason == "length"
        routes = stack_routes(r.routes, live)
        assert routes.shape == (11, 2, 2) and r.ready(True) == 12
        for version, model in models.items():
            logp, own, prompt_routes = _teacher_forced(model, r.prompt, r.tokens)
            sampled_by = np.array(r.versions) == version
            torch.testing.assert_close(logp[sampled_by], torch.tensor(r.logprobs)[sampled_by], rtol=0, atol=1e-5)
            # token j was fed (routed) at the step that sampled token j + 1, with that step's weights
            fed_by = np.array(r.versions[1:]) == version
            np.testing.assert_array_equal(routes[fed_by], own[:-1][fed_by].astype(np.uint8))
            if version == 0:
                np.testing.assert_array_equal(r.prompt_routes, prompt_routes.astype(np.uint8))
        routes_v0, routes_v1 = (_teacher_forced(m, r.prompt, r.tokens)[1] for m in (v0, v1))
        assert not np.array_equal(routes_v0, routes_v1)  # the check above could tell the versions apart


def test_keeping_the_kv_cache_still_records_the_version_boundary():
    live = _model(0)
    batch = DecodeBatch(live, eos_id=-1, pad_id=TOK.pad_id, generator=torch.Generator().manual_seed(0))
    row = Row(key=0, prompt=PROMPTS[0], max_new_tokens=8, temperature=1.0)
    batch.add([row])
    for _ in range(3):
        batch.step(0)
    live.load_state_dict(_model(1).state_dict())  # no invalidate(): old keys/values stay in the cache
    while batch.active:
        batch.step(1)
    assert row.versions == [0, 0, 0, 1, 1, 1, 1, 1] and len(row.logprobs) == 8


def test_rows_join_a_running_batch_and_continuations_resume_exactly():
    model = _model(0)
    alone = {}
    for i, p in enumerate(PROMPTS[:2]):  # greedy references, one row each
        b = DecodeBatch(model, eos_id=-1, pad_id=TOK.pad_id, capture_routes=True)
        alone[i] = Row(key=i, prompt=p, max_new_tokens=8, temperature=0.0)
        b.add([alone[i]])
        while b.active:
            b.step(0)
    batch = DecodeBatch(model, eos_id=-1, pad_id=TOK.pad_id, capture_routes=True)
    first = Row(key=0, prompt=PROMPTS[0], max_new_tokens=8, temperature=0.0)
    batch.add([first])
    for _ in range(3):
        batch.step(0)
    late = Row.continuing(1, PROMPTS[1], alone[1].tokens[:4], max_new_tokens=8, temperature=0.0)
    batch.add([late])  # joins mid-flight, resuming after a 4-token prefix generated "elsewhere"
    while batch.active:
        batch.step(0)
    assert first.tokens == alone[0].tokens
    assert late.tokens == alone[1].tokens and late.emitted == 4 and late.route_base == 4
    np.testing.assert_array_equal(stack_routes(late.routes, model), stack_routes(alone[1].routes, model)[4:])
    torch.testing.assert_close(torch.tensor(late.logprobs[4:]), torch.tensor(alone[1].logprobs[4:]),
                               rtol=0, atol=1e-5)
