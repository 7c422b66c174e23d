"""The sglang rollout backend: a real rollout-worker process driving a server that speaks sglang's documented HTTP
API (tests/sglang_standin.py: the tiny Qwen3-MoE behind /generate, /pause_generation, /update_weights_from_disk,
/continue_generation), with a weight update landing mid-response."""

import asyncio
import time

import numpy as np
import pytest
import torch

from engine.backends.sglang import hub_layout, write_model_dir
from engine.modeling.model import load_model, save_weights
from tests.helpers import initial_and_perturbed_policy
from tests.actors.test_workers import _setup, actor_process
from tests.engine.test_decode import _teacher_forced
from tests.sglang_standin import StandIn
from transport import GenerateRequest, LoadWeights, ResponseChunk, WeightsLoaded, run

pytestmark = pytest.mark.timeout(240)


def test_learner_weights_become_a_folder_sglang_loads(tmp_path):
    """The learner's safetensors file (fused experts) -> save_pretrained layout (one tensor per expert)."""
    _, _, model = _setup(tmp_path)
    save_weights(model, tmp_path / "policy_v3.safetensors")
    folder = write_model_dir(str(tmp_path / "policy_v3.safetensors"), str(tmp_path / "init"), str(tmp_path / "v3"))
    reloaded = load_model(folder)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    fused = {"m.layers.0.mlp.experts.gate_up_proj": np.zeros((2, 6, 3)),
             "m.layers.0.mlp.experts.down_proj": np.zeros((2, 3, 3))}
    names = hub_layout(fused, {"model_type": "qwen3_moe"}).keys()
    assert sorted(names) == sorted(f"m.layers.0.mlp.experts.{e}.{p}_proj.weight"
                                   for e in range(2) for p in ("gate", "up", "down"))
    names = hub_layout(fused, {"model_type": "mixtral"}).keys()  # the family's own checkpoint names
    assert sorted(names) == sorted(f"m.layers.0.block_sparse_moe.experts.{e}.w{i}.weight"
                                   for e in range(2) for i in (1, 2, 3))


def test_worker_on_sglang_streams_and_continues_responses_across_a_weight_update(tmp_path):
    _setup(tmp_path)  # the initial policy, for the server
    standin = StandIn(str(tmp_path / "init"), token_delay_s=0.03)
    cfg, task, _ = _setup(tmp_path, "rollout.backend=sglang", f"rollout.sglang_url={standin.url}",
                          "rollout.chunk_tokens=2")
    v0, v1 = initial_and_perturbed_policy(tmp_path)
    prompt = np.asarray(task.prompt_ids(task.eval_set[0]), dtype=np.int32)
    n = 6

    async def scenario():
        try:
            async with actor_process(tmp_path, "actors.rollout_worker", "--init", str(tmp_path / "init"),
                                     role="rollout") as (hub, child, peer):
                await hub.send(peer, GenerateRequest(group_id="g0", prompt_id=7, prompt_ids=prompt, num_samples=n,
                                                     max_new_tokens=16, temperature=1.0, return_routes=True))
                deadline = time.monotonic() + 60
                while standin.calls.count("/generate") < n and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.15)  # a few tokens into every response
                await hub.send(peer, LoadWeights(version=1,
                                                 path=str(tmp_path / "weights" / "policy_v1.safetensors")))
                chunks, loaded = [], None
                while sum(bool(c.finish_reason) for c in chunks) < n:
                    assert child.exited() is None, child.log_tail()
                    _, msg = await hub.recv(timeout=60)
                    if isinstance(msg, WeightsLoaded):
                        loaded = msg
                    elif isinstance(msg, ResponseChunk):
                        chunks.append(msg)
            return chunks, loaded
        finally:
            standin.close()

    chunks, loaded = run(scenario())
    assert loaded is not None and loaded.version == 1
    assert standin.calls.index("/pause_generation") < standin.calls.index("/update_weights_from_disk") \
        < standin.calls.index("/continue_generation")
    responses: dict[int, dict] = {}
    for c in chunks:  # in order, no gap, routes riding with their tokens
        r = responses.setdefault(c.sample_index, {"tokens": [], "logp": [], "versions": [], "routes": []})
        assert c.offset == len(r["tokens"])
        assert len(c.routes) == len(c.token_ids) - bool(c.finish_reason) and c.routes.dtype == np.uint8
        r["tokens"] += c.token_ids.tolist()
        r["logp"] += c.behavior_logprobs.tolist()
        r["versions"] += c.token_versions.tolist()
        r["routes"] += list(c.routes)
        if len(c.prompt_routes):
            r["prompt_routes"] = c.prompt_routes
    spanning = [r for r in responses.values() if r["versions"][0] == 0 and r["versions"][-1] == 1]
    assert spanning, "no response spans the weight update"
    for r in responses.values():
        assert r["versions"] == sorted(r["versions"])
        routes = np.stack(r["routes"]) if r["routes"] else np.zeros((0, cfg.model.num_layers, cfg.model.top_k))
        for version, m in ((0, v0), (1, v1)):
            logp, own, prompt_routes = _teacher_forced(m, prompt.tolist(), r["tokens"])
            sampled_by = np.array(r["versions"]) == version
            torch.testing.assert_close(logp[sampled_by], torch.tensor(r["logp"])[sampled_by], rtol=0, atol=1e-4)
            fed_by = np.array(r["versions"][1:]) == version  # token j was fed when token j + 1 was sampled
            np.testing.assert_array_equal(routes[fed_by], own[:-1][fed_by].astype(np.uint8))
            if version == 0 and "prompt_routes" in r:
                np.testing.assert_array_equal(r["prompt_routes"], prompt_routes.astype(np.uint8))
