"""Per-token versions from sglang itself (``rollout.sglang_pause_mode=retract``): requests stay inside the server
across weight updates and every token's version comes from ``meta_info.weight_versions``; abort-and-resend stays
the default. And tokens served from sglang's prefix cache still come back with their routes. All against the
stand-in (tests/sglang_standin.py) over HTTP on loopback: retract has never run against a real sglang server."""

import time

import numpy as np
import pytest
import torch

from configs.schema import RolloutConfig
from engine.backends.sglang import SGLangBackend
from engine.backends.sglang_wire import decode_weight_versions
from engine.modeling.model import save_weights
from tests.helpers import initial_and_perturbed_policy
from engine.modeling.rows import Row
from tests.engine.test_adapters import build
from tests.engine.test_decode import _teacher_forced
from tests.sglang_standin import StandIn

pytestmark = pytest.mark.timeout(240)
PROMPT = [5, 9, 11, 3]
VERSIONS = 3  # weight updates while the rows run


def test_weight_versions_segments_decode_to_per_token_versions():
    segs = [{"version": "default", "start": 0, "end": 2}, {"version": "3", "start": 2, "end": 5},
            {"version": "4", "start": 5, "end": 6}]
    assert decode_weight_versions(segs, 0, 6, 6) == [0, 0, 3, 3, 3, 4]  # "default": the weights it started with
    assert decode_weight_versions(segs, 1, 4, 6) == [0, 3, 3]
    assert decode_weight_versions(segs, 2, 2, 6) == []
    assert decode_weight_versions(segs[:1], 0, 2, 2, initial=7) == [7, 7]
    assert decode_weight_versions([], 0, 0, 0) == []
    bad = [([{"version": "1", "start": 0, "end": 3}, {"version": "2", "start": 2, "end": 5}], 5, "overlaps"),
           ([{"version": "1", "start": 0, "end": 2}, {"version": "2", "start": 3, "end": 5}], 5, "leaves a gap"),
           ([{"version": "1", "start": 1, "end": 3}], 3, "leaves a gap"),
           ([{"version": "1", "start": 0, "end": 0}, {"version": "1", "start": 0, "end": 2}], 2, "is empty"),
           ([{"version": "1", "start": 0, "end": 4}], 3, "ends past the 3 output tokens"),
           ([{"version": "1", "start": 0, "end": 2}], 3, "covers 2 of the 3 output tokens"),
           ([{"version": "1", "start": 0}], 1, "lacks an integer start/end"),
           ({"version": "1"}, 1, "is not a list"),
           ([], 2, "is not a list")]
    for segments, total, message in bad:
        with pytest.raises(ValueError, match=message):
            decode_weight_versions(segments, 0, total, total)
    with pytest.raises(ValueError, match=r"tokens \[2, 4\) are not within"):
        decode_weight_versions(segs[:1], 2, 4, 2)


def test_retract_needs_no_routes_and_names_the_fix():
    with pytest.raises(ValueError, match="rollout.sglang_pause_mode='retract' is invalid: .*rollout.return_routes"):
        RolloutConfig(backend="sglang", sglang_pause_mode="retract")
    assert RolloutConfig(backend="sglang", sglang_pause_mode="retract", return_routes=False).sglang_pause_mode
    assert RolloutConfig().sglang_pause_mode == "abort"  # the default: retract never ran on a real server


def _models(tmp_path):
    models = [build("qwen3_moe", seed=v) for v in range(VERSIONS + 1)]
    models[0].save_pretrained(tmp_path / "init")
    for v in range(1, VERSIONS + 1):
        save_weights(models[v], tmp_path / "weights" / f"policy_v{v}.safetensors")
    return models


def _wait(cond, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("mode", ["retract", "abort"])
def test_rows_across_several_weight_updates_get_the_version_that_sampled_each_token(mode, tmp_path):
    """Three updates land while three rows run. retract: one /generate request per row, nothing aborted or sent
    again, and every token carries the version the server sampled it with (checked against each version's
    teacher-forced log-probs); abort: the same exact versions, by aborting and re-sending."""
    models = _models(tmp_path)
    standin = StandIn(str(tmp_path / "init"), token_delay_s=0.04)
    backend = SGLangBackend(str(tmp_path / "init"), url=standin.url, eos_id=-1, idle_timeout_s=30, pause_mode=mode)
    n = 36
    rows = [Row(key=k, prompt=PROMPT, max_new_tokens=n, temperature=1.0) for k in range(3)]
    loaded_at: list[list[int]] = []
    try:
        batch = backend.new_batch(capture_routes=False)
        batch.add(rows)
        version = 0
        while batch.active:
            batch.step(version)
            if version < VERSIONS and min(len(r.tokens) for r in rows) >= 4 * (version + 1):
                loaded_at.append([len(r.tokens) for r in rows])
                version += 1
                backend.load(str(tmp_path / "weights" / f"policy_v{version}.safetensors"))
        assert standin.weight_version == str(VERSIONS)
    finally:
        backend.close()
        standin.close()
    assert len(loaded_at) == VERSIONS and max(max(at) for at in loaded_at) < n  # every update mid-response
    generate = len(standin.bodies)
    if mode == "retract":
        assert generate == len(rows) and "/abort_request" not in standin.calls  # nothing aborted or re-sent
        assert batch.discarded_partial_tokens == 0 and batch.held_closed == 0
    else:
        assert generate >= len(rows) * (VERSIONS + 1)  # every update aborted each row and it was sent again
    for r in rows:
        assert len(r.tokens) == n and r.finish_reason == "length"
        assert r.versions == sorted(r.versions) and set(r.versions) == set(range(VERSIONS + 1)), r.versions
        for v, model in enumerate(models):
            logp, _, _ = _teacher_forced(model, PROMPT, r.tokens)
            sampled_by = np.array(r.versions) == v
            torch.testing.assert_close(logp[sampled_by], torch.tensor(r.logprobs)[sampled_by], rtol=0, atol=1e-4)


def test_retract_without_weight_versions_in_the_answer_fails_naming_the_fix(tmp_path):
    _models(tmp_path)
    standin = StandIn(str(tmp_path / "init"), token_delay_s=0.01)
    standin.report_weight_versions = False  # an sglang that does not track per-token versions
    backend = SGLangBackend(str(tmp_path / "init"), url=standin.url, eos_id=-1, pause_mode="retract")
    try:
        with pytest.raises(ValueError, match="rollout.sglang_pause_mode=retract.*no meta_info.weight_versions.*"
                                             "rollout.sglang_pause_mode=abort"):
            batch = backend.new_batch(capture_routes=False)
            batch.add([Row(key=0, prompt=PROMPT, max_new_tokens=8, temperature=1.0)])
            while batch.active:
                batch.step(0)
        with pytest.raises(ValueError, match="rollout.return_routes=false"):  # retract cannot keep exact routes
            backend.new_batch(capture_routes=True)
    finally:
        backend.close()
        standin.close()


def test_a_worker_with_retract_streams_chunks_with_the_servers_per_token_versions(tmp_path):
    """A real rollout-worker process (rollout.sglang_pause_mode=retract): the chunks it forwards while responses
    run carry per-token versions, the update does not abort or re-send anything, and each token's version is the
    one whose weights give its log-prob."""
    from tests.actors.test_workers import _setup, actor_process
    from transport import GenerateRequest, LoadWeights, ResponseChunk, WeightsLoaded, run

    _setup(tmp_path)
    standin = StandIn(str(tmp_path / "init"), token_delay_s=0.03)
    _, task, _ = _setup(tmp_path, "rollout.backend=sglang", f"rollout.sglang_url={standin.url}",
                        "rollout.chunk_tokens=2", "rollout.return_routes=false", "learner.router_replay=off",
                        "rollout.sglang_pause_mode=retract")
    v0, v1 = initial_and_perturbed_policy(tmp_path)
    prompt = np.asarray(task.prompt_ids(task.eval_set[0]), dtype=np.int32)
    n = 4

    async def scenario():
        try:
            async with actor_process(tmp_path, "actors.rollout_worker", "--init", str(tmp_path / "init"),
                                     role="rollout") as (hub, child, peer):
                await hub.send(peer, GenerateRequest(group_id="g0", prompt_id=7, prompt_ids=prompt, num_samples=n,
                                                     max_new_tokens=24, temperature=1.0, return_routes=False))
                chunks, loaded = [], None
                while len({c.sample_index for c in chunks}) < n:  # every response has streamed a chunk
                    _, msg = await hub.recv(timeout=60)
                    if isinstance(msg, ResponseChunk):
                        chunks.append(msg)
                await hub.send(peer, LoadWeights(version=1,
                                                 path=str(tmp_path / "weights" / "policy_v1.safetensors")))
                while sum(bool(c.finish_reason) for c in chunks) < n:
                    assert child.exited() is None, child.log_tail()
                    _, msg = await hub.recv(timeout=60)
                    if isinstance(msg, WeightsLoaded):
                        loaded = msg
                    elif isinstance(msg, ResponseChunk):
                        chunks.append(msg)
                while loaded is None:
                    _, msg = await hub.recv(timeout=60)
                    loaded = msg if isinstance(msg, WeightsLoaded) else None
            return chunks, loaded
        finally:
            standin.close()

    chunks, loaded = run(scenario())
    assert loaded is not None and loaded.version == 1
    assert standin.calls.count("/generate") == n and "/abort_request" not in standin.calls  # none re-sent
    responses: dict[int, dict] = {}
    for c in chunks:
        r = responses.setdefault(c.sample_index, {"tokens": [], "logp": [], "versions": []})
        assert c.offset == len(r["tokens"]) and len(c.token_versions) == len(c.token_ids)
        r["tokens"] += c.token_ids.tolist()
        r["logp"] += c.behavior_logprobs.tolist()
        r["versions"] += c.token_versions.tolist()
    assert any(r["versions"][0] == 0 and r["versions"][-1] == 1 for r in responses.values()), \
        "no response spans the weight update"
    for r in responses.values():
        assert r["versions"] == sorted(r["versions"])
        for version, m in ((0, v0), (1, v1)):
            logp, _, _ = _teacher_forced(m, prompt.tolist(), r["tokens"])
            sampled_by = np.array(r["versions"]) == version
            torch.testing.assert_close(logp[sampled_by], torch.tensor(r["logp"])[sampled_by], rtol=0, atol=1e-4)


def test_positions_served_from_the_prefix_cache_come_back_with_their_routes(tmp_path):
    """sglang's routed-experts capturer keeps routes per KV-cache slot, so positions a request takes from the radix
    cache come back with the routes recorded when they were computed. A continuation of a finished row (its prompt
    plus its tokens, as a re-sent row looks) hits the cache for all but its last input position and still gets
    routes for every position, equal to its own forward's."""
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "init")
    standin = StandIn(str(tmp_path / "init"), token_delay_s=0.0)
    backend = SGLangBackend(str(tmp_path / "init"), url=standin.url, eos_id=-1, idle_timeout_s=30)
    first = Row(key=0, prompt=PROMPT, max_new_tokens=6, temperature=1.0, want_prompt_routes=True)
    try:
        batch = backend.new_batch(capture_routes=True)
        batch.add([first])
        while batch.active:
            batch.step(0)
        second = Row(key=1, prompt=PROMPT + first.tokens, max_new_tokens=6, temperature=1.0, want_prompt_routes=True)
        batch.add([second])
        while batch.active:
            batch.step(0)
    finally:
        backend.close()
        standin.close()
    rid = standin.bodies[-1]["rid"]
    assert standin.cached_tokens[rid] == len(second.prompt) - 1  # all but the last input position from the cache
    assert standin.bodies[-1].get("routed_experts_start_len", 0) == 0  # and their routes were asked for
    _, own, prompt_routes = _teacher_forced(model, second.prompt, second.tokens)
    np.testing.assert_array_equal(second.prompt_routes, prompt_routes.astype(np.uint8))
    np.testing.assert_array_equal(np.stack(second.routes), own[:-1].astype(np.uint8))
