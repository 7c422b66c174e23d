"""Routes from an sglang server (tests/sglang_standin.py) for MoE models with dense layers: sglang sends
``num_hidden_layers`` rows per position (dense ones 0); the backend keeps the MoE layers, asks for the prompt's
routes once per group and for continuations only for the positions it lacks (``routed_experts_start_len``)."""

import numpy as np
import pytest
import torch

from engine.backends.sglang import SGLangBackend
from engine.modeling.model import save_weights
from engine.modeling.rows import Row
from tests.engine.test_adapters import build
from tests.engine.test_decode import _teacher_forced
from tests.sglang_standin import StandIn

pytestmark = pytest.mark.timeout(240)
PROMPT = [5, 9, 11, 3]


def _run(backend, standin, rows, *, load_at: int, weights: str):
    batch = backend.new_batch(capture_routes=True)
    batch.add(rows)
    loaded = False
    while batch.active:
        batch.step(1 if loaded else 0)
        progress = list(standin.progress.values())
        if not loaded and len(progress) == len(rows) and min(progress) >= load_at:
            backend.load(weights)  # mid-response: rows in flight are aborted and sent again with their prefix
            loaded = True
    return batch


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_routes_of_a_model_with_dense_layers_match_its_forward_across_a_weight_update(family, tmp_path):
    v0 = build(family)
    v0.save_pretrained(tmp_path / "init")
    v1 = build(family, seed=1)
    save_weights(v1, tmp_path / "weights" / "policy_v1.safetensors")
    standin = StandIn(str(tmp_path / "init"), token_delay_s=0.02)
    backend = SGLangBackend(str(tmp_path / "init"), url=standin.url, eos_id=-1, idle_timeout_s=30)
    try:
        assert backend.num_layers == 2 < v0.config.num_hidden_layers  # MoE layers only
        rows = [Row(key=k, prompt=PROMPT, max_new_tokens=10, temperature=1.0, want_prompt_routes=k == 0)
                for k in range(3)]
        _run(backend, standin, rows, load_at=3, weights=str(tmp_path / "weights" / "policy_v1.safetensors"))
    finally:
        backend.close()
        standin.close()
    starts = [b.get("routed_experts_start_len", 0) for b in standin.bodies]
    assert starts.count(0) == 1, starts  # the group's prompt routes are asked for once
    assert len(PROMPT) in starts  # the other samples' requests start at their first token
    assert any(s > len(PROMPT) for s in starts)  # continuations ask only for the positions they lack
    assert rows[0].prompt_routes is not None and rows[1].prompt_routes is None
    for r in rows:
        assert len(r.tokens) == 10 and r.versions[0] == 0 and r.versions[-1] == 1
        assert len(r.routes) == len(r.tokens) - 1 and r.routes[0].shape == (2, 2)
        routes = np.stack(r.routes)
        for version, model in ((0, v0), (1, v1)):
            logp, own, prompt_routes = _teacher_forced(model, PROMPT, r.tokens)
            sampled_by = np.array(r.versions) == version
            torch.testing.assert_close(logp[sampled_by], torch.tensor(r.logprobs)[sampled_by], rtol=0, atol=1e-4)
            fed_by = np.array(r.versions[1:]) == version  # token j was fed when token j + 1 was sampled
            np.testing.assert_array_equal(routes[fed_by], own[:-1][fed_by].astype(np.uint8))
            if version == 0 and r.prompt_routes is not None:
                np.testing.assert_array_equal(r.prompt_routes, prompt_routes.astype(np.uint8))
