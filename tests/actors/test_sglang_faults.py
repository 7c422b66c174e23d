"""sglang server faults (docs/guides/reliability.md, "sglang server faults"), with the real backend code against
tests/sglang_standin.py over loopback HTTP: HTTP 503/500 on /generate are retried with backoff, a server killed or
hung mid-stream is found (a launched one is launched again and its rows continue from their tokens; a given one
makes the batch raise), a refused weight update keeps the previous version, a slow start is waited for within
``rollout.sglang_start_timeout_s``, and the judge retries a 503 and names a dead server."""

import contextlib
import time

import numpy as np
import pytest
import torch

from engine.backends.sglang import SGLangBackend, SglangJudgeBackend
from engine.backends.weights_file import WeightsRejected
from engine.modeling.model import save_weights
from engine.modeling.rows import Row
from tests.engine.test_adapters import build
from tests.sglang_standin import StandIn, fake_sglang_env

pytestmark = pytest.mark.timeout(120)
PROMPT = [5, 9, 11, 3]
IDLE_S = 0.5


def _expected(n: int, vocab: int = 64) -> list[int]:
    return [3 + (7 * j) % (vocab - 3) for j in range(n)]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sglang") / "init"
    build("qwen3_moe").save_pretrained(path)
    return str(path)


@contextlib.contextmanager
def _served(init_dir, *, standin_kw: dict | None = None, **backend_kw):
    """(stand-in, backend on it): a synthetic stand-in streaming incrementally and an SGLangBackend given its url;
    both closed after the block."""
    standin = StandIn(init_dir, **{"synthetic": True, "incremental": True, **(standin_kw or {})})
    backend = SGLangBackend(init_dir, url=standin.url, eos_id=-1, **{"idle_timeout_s": IDLE_S, **backend_kw})
    try:
        yield standin, backend
    finally:
        backend.close()
        standin.close()


def _run(batch, until, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not until():
        assert time.monotonic() < deadline, "condition not reached"
        batch.step(0)


@pytest.mark.parametrize("status", [503, 500])
def test_generate_answered_5xx_is_retried_with_backoff_and_nothing_is_lost(init_dir, status):
    rows = [Row(key=i, prompt=PROMPT, max_new_tokens=40, temperature=1.0) for i in range(2)]
    with _served(init_dir, standin_kw={"token_delay_s": 0.002}) as (standin, backend):
        batch = backend.new_batch(capture_routes=False)
        standin.fault(status=status, status_count=5)
        batch.add(rows)
        _run(batch, lambda: not batch.active)
    assert standin.failed_requests == 5 and batch.retries == 5
    assert all(r.tokens == _expected(40) and r.finish_reason == "length" for r in rows)


def test_a_server_failing_longer_than_the_retry_budget_raises_naming_the_key(init_dir):
    with _served(init_dir, retry_s=1.0) as (standin, backend):
        batch = backend.new_batch(capture_routes=False)
        standin.fault(status=503, status_count=10**6)
        batch.add([Row(key=0, prompt=PROMPT, max_new_tokens=10, temperature=1.0)])
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="rollout.sglang_retry_s"):
            _run(batch, lambda: False)
    assert time.monotonic() - t0 < 1.0 + 10.0


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_a_given_server_killed_or_hung_mid_stream_raises_and_keeps_what_streamed(init_dir, fault):
    row = Row(key=0, prompt=PROMPT, max_new_tokens=10_000, temperature=1.0)
    with _served(init_dir, standin_kw={"token_delay_s": 0.005}) as (standin, backend):
        batch = backend.new_batch(capture_routes=False)
        batch.add([row])
        standin.fault(**{f"{fault}_after_tokens": 25})
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="the server is lost"):
            _run(batch, lambda: False)
        found_after = time.monotonic() - t0
    assert found_after < IDLE_S + 10.0  # a dead one at once, a hung one after the idle timeout and the probe
    assert 20 <= len(row.tokens) <= 25 and row.tokens == _expected(len(row.tokens)) and not row.done


def test_a_launched_server_that_dies_mid_stream_is_launched_again_and_its_rows_continue(init_dir, tmp_path,
                                                                                       monkeypatch):
    """The backend launches ``python -m sglang.launch_server`` (the stand-in in its own process); it dies
    mid-stream (os._exit), is launched again on the same port, loaded with the weights it served, and both rows
    finish with exactly the tokens and versions an unbroken server gives."""
    import urllib.request

    for key, value in fake_sglang_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    weights = tmp_path / "weights"
    save_weights(build("qwen3_moe"), weights / "policy_v1.safetensors")
    backend = SGLangBackend(init_dir, port=_free_port(), eos_id=-1, idle_timeout_s=IDLE_S, start_timeout_s=60,
                            health_interval_s=0.2)
    rows = [Row(key=i, prompt=PROMPT, max_new_tokens=400, temperature=1.0) for i in range(2)]
    try:
        backend.load(str(weights / "policy_v1.safetensors"))
        first = backend._proc
        batch = backend.new_batch(capture_routes=False)
        batch.add(rows)
        _run(batch, lambda: min(len(r.tokens) for r in rows) >= 10)
        urllib.request.urlopen(urllib.request.Request(backend.client.url + "/_fault", method="POST",
                                                      data=b'{"die_after_tokens": 30}'), timeout=10).read()
        _run(batch, lambda: backend.relaunches == 1, deadline_s=90)
        kept = [len(r.tokens) for r in rows]  # what streamed before the death: the next requests' prefixes
        _run(batch, lambda: not batch.active, deadline_s=60)
    finally:
        backend.close()
    assert first.poll() == 1 and backend.relaunches == 1  # it died with the fault's exit code, and came back
    assert backend._proc is not first and 10 <= min(kept) and sum(kept) < 20 + 30 + 2
    for r, k in zip(rows, kept):  # synthetic tokens count from each request's start: a lost or repeated one shows
        assert r.tokens == _expected(k) + _expected(400 - k) and r.finish_reason == "length"
        assert r.versions == [0] * 400


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_weight_update_the_server_refuses_keeps_the_previous_weights(init_dir, tmp_path):
    model = build("qwen3_moe")
    for v in (1, 2):
        with torch.no_grad():
            model.lm_head.weight.fill_(v / 100)
        save_weights(model, tmp_path / f"policy_v{v}.safetensors")
    standin = StandIn(init_dir)
    backend = SGLangBackend(init_dir, url=standin.url, eos_id=-1)
    try:
        before = standin.model.lm_head.weight.clone()
        standin.fault(update_failures=1)
        with pytest.raises(WeightsRejected, match="server_rejected") as refused:
            backend.load(str(tmp_path / "policy_v1.safetensors"))
        assert refused.value.reason == "server_rejected"
        assert torch.equal(standin.model.lm_head.weight, before) and standin.weight_version == "0"
        assert standin.running.is_set()  # generation continued after the refused update
        assert not backend.model_dir(str(tmp_path / "policy_v1.safetensors")).exists()
        backend.load(str(tmp_path / "policy_v2.safetensors"))  # the next version loads
        assert standin.weight_version == "2"
    finally:
        backend.close()
        standin.close()


def test_a_request_that_reaches_the_server_after_the_pause_does_not_stall_the_weight_update(init_dir, tmp_path):
    """A request sent from the pool just before ``/pause_generation`` is held by the server until
    ``/continue_generation`` (sglang holds new requests on its pause condition): the update must not wait for it
    forever; it is closed after the grace, and its row is sent again and finishes under the new version."""
    save_weights(build("qwen3_moe"), tmp_path / "policy_v1.safetensors")
    with _served(init_dir) as (standin, backend):
        batch = backend.new_batch(capture_routes=False)
        row = Row(key=0, prompt=PROMPT, max_new_tokens=40, temperature=1.0)
        backend.client.post("/pause_generation", {"mode": "abort"})  # the request below is held, whenever it lands
        batch.add([row])
        batch.step(0)
        t0 = time.monotonic()
        backend.load(str(tmp_path / "policy_v1.safetensors"))
        load_s = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while not row.done:
            assert time.monotonic() < deadline, "the row did not finish after the update"
            batch.step(1)
        assert standin.weight_version == "1" and batch.held_closed == 1 and load_s < 30
        assert row.tokens == _expected(40) and row.versions == [1] * 40 and row.finish_reason == "length"


def test_a_slow_start_is_waited_for_within_the_start_timeout(init_dir):
    standin = StandIn(init_dir, synthetic=True, incremental=True)
    try:
        standin.fault(start_delay_s=1.0)
        t0 = time.monotonic()
        backend = SGLangBackend(init_dir, url=standin.url, eos_id=-1, start_timeout_s=30, health_interval_s=0.1)
        assert 1.0 <= time.monotonic() - t0 < 10.0
        backend.close()
        standin.fault(start_delay_s=30.0)
        with pytest.raises(TimeoutError, match="rollout.sglang_start_timeout_s"):
            SGLangBackend(init_dir, url=standin.url, eos_id=-1, start_timeout_s=0.5, health_interval_s=0.1)
    finally:
        standin.close()


def test_the_judge_retries_a_503_and_names_a_dead_server(init_dir):
    standin = StandIn(init_dir)
    judge = SglangJudgeBackend(standin.url, timeout_s=30)
    standin.fault(status=503, status_count=2)
    assert judge.generate(["a", "b"], max_new_tokens=2, temperature=1.0) == ["Verdict: Tie"] * 2
    assert judge.retries == 2 and standin.failed_requests == 2
    standin.close()
    with pytest.raises(ConnectionError, match=r"reward.judge.url=http://127.0.0.1:\d+"):
        judge.generate(["a"], max_new_tokens=2, temperature=1.0)


def test_a_worker_whose_server_refuses_an_update_reports_the_version_it_serves_and_takes_the_next(tmp_path):
    """A real rollout-worker process: the server refuses v1 on every attempt (rolls back, 400): the worker answers
    WeightsLoaded(version=0) and keeps generating under v0; v2 then loads and later tokens carry version 2."""
    from tests.actors.test_workers import _setup, actor_process
    from transport import GenerateRequest, LoadWeights, ResponseChunk, WeightsLoaded, run

    _, _, model = _setup(tmp_path)
    standin = StandIn(str(tmp_path / "init"), token_delay_s=0.005, synthetic=True, incremental=True)
    _setup(tmp_path, "rollout.backend=sglang", f"rollout.sglang_url={standin.url}", "rollout.chunk_tokens=4",
           "rollout.return_routes=false", "learner.router_replay=off")
    for v in (1, 2):
        save_weights(model, tmp_path / "weights" / f"policy_v{v}.safetensors")

    async def scenario():
        async with actor_process(tmp_path, "actors.rollout_worker", "--init", str(tmp_path / "init"),
                                 role="rollout") as (hub, child, peer):
            await hub.send(peer, GenerateRequest(group_id="g0", prompt_id=0, prompt_ids=np.asarray(PROMPT, np.int32),
                                                 num_samples=1, max_new_tokens=100_000, temperature=1.0))
            standin.fault(update_failures=4)  # the worker's load_attempts
            await hub.send(peer, LoadWeights(version=1, path=str(tmp_path / "weights" / "policy_v1.safetensors")))
            chunks, loaded = [], []
            deadline = time.monotonic() + 60
            while not (loaded and loaded[-1].version == 2 and chunks and chunks[-1].token_versions[-1] == 2):
                assert time.monotonic() < deadline and child.exited() is None, child.log_tail()
                _, msg = await hub.recv(timeout=30)
                if isinstance(msg, WeightsLoaded):
                    loaded.append(msg)
                    if msg.version == 0:
                        await hub.send(peer, LoadWeights(version=2, path=str(tmp_path / "weights" /
                                                                             "policy_v2.safetensors")))
                elif isinstance(msg, ResponseChunk):
                    chunks.append(msg)
            return chunks, [m.version for m in loaded], child.log_tail(80)

    try:
        chunks, loaded, log = run(scenario())
    finally:
        standin.close()
    assert loaded == [0, 2] and "weights.load_refused" in log and "server_rejected" in log
    versions = [v for c in chunks for v in c.token_versions.tolist()]
    assert versions == sorted(versions) and set(versions) == {0, 2}  # never 1: the server kept v0
    assert standin.weight_version == "2"


def test_fp8_rollout_on_a_server_that_refuses_online_updates_is_a_start_up_error(init_dir):
    """rollout.quantization=fp8: sglang's FP8 path may refuse online weight updates (Hopper FP8 BF16 weight
    caches); the backend loads the served weights once before any work and a refusal names the key and the fix."""
    standin = StandIn(init_dir, synthetic=True, incremental=True)
    try:
        standin.fault(update_failures=1)
        with pytest.raises(RuntimeError, match=r"rollout.quantization=fp8: .* refused an online weight update.*"
                                               r"Pass rollout.quantization=''"):
            SGLangBackend(init_dir, url=standin.url, eos_id=-1, quantization="fp8")
        backend = SGLangBackend(init_dir, url=standin.url, eos_id=-1, quantization="fp8")  # updates work: it starts
        backend.close()
        assert standin.faults.update_failures == 0
    finally:
        standin.close()
