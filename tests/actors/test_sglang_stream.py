"""Streamed requests on an sglang server (tests/sglang_standin.py speaking sglang's server-sent events): a long
response streams to completion with no limit on its total time, tokens join their row as they arrive, and a
server that goes silent mid-stream is found within ``rollout.sglang_idle_timeout_s``."""

import sys
import time

import numpy as np
import pytest

from engine.backends.sglang import SGLangBackend, check_sglang_python
from engine.modeling.rows import Row
from tests.engine.test_adapters import build
from tests.sglang_standin import StandIn, synthetic_route

pytestmark = pytest.mark.timeout(240)
PROMPT = [5, 9, 11, 3]
IDLE_S = 0.5


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sglang") / "init"
    build("qwen3_moe").save_pretrained(path)  # layer 1 dense
    return str(path)


@pytest.mark.parametrize("incremental", [False, True], ids=["cumulative", "incremental"])
@pytest.mark.parametrize("routes", [False, True], ids=["tokens", "routes"])
def test_a_long_response_streams_to_completion_past_the_idle_timeout(init_dir, incremental, routes):
    n = 3000 if incremental else 1200  # sglang's default items repeat every token so far: keep that one shorter
    standin = StandIn(init_dir, token_delay_s=0.001, incremental=incremental, synthetic=True)
    backend = SGLangBackend(init_dir, url=standin.url, eos_id=-1, idle_timeout_s=IDLE_S)
    row = Row(key=0, prompt=PROMPT, max_new_tokens=n, temperature=1.0, want_prompt_routes=True)
    try:
        batch = backend.new_batch(capture_routes=routes)
        batch.add([row])
        t0, seen = time.monotonic(), set()
        while batch.active:
            batch.step(0)
            seen.add(len(row.tokens))
        took = time.monotonic() - t0
    finally:
        backend.close()
        standin.close()
    assert took > 3 * IDLE_S  # far longer than the idle timeout: only silence counts, not total time
    assert row.finish_reason == "length" and len(row.tokens) == n
    assert row.tokens == [3 + (7 * j) % 61 for j in range(n)]
    np.testing.assert_allclose(row.logprobs, [-1 - j / 1000 for j in range(n)])
    if not routes:
        assert len(seen) > 20  # tokens joined the row as they arrived, long before it finished
        return
    assert len(seen) == 2  # with routes, tokens join once their routes arrive (sglang sends them at finish)
    p = np.arange(len(PROMPT) + n - 1)[:, None, None]
    expected = synthetic_route(p, np.arange(2)[None, :, None], np.arange(2)[None, None, :], 8)
    np.testing.assert_array_equal(np.concatenate([row.prompt_routes, np.stack(row.routes)]), expected)


def test_a_server_silent_mid_stream_is_lost_within_the_idle_timeout_and_keeps_what_streamed(init_dir):
    standin = StandIn(init_dir, token_delay_s=0.01, synthetic=True, incremental=True)
    backend = SGLangBackend(init_dir, url=standin.url, eos_id=-1, idle_timeout_s=IDLE_S)
    row = Row(key=0, prompt=PROMPT, max_new_tokens=10_000, temperature=1.0)
    try:
        batch = backend.new_batch(capture_routes=False)
        batch.add([row])
        while len(row.tokens) < 30:
            batch.step(0)
        standin.silence()
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="rollout.sglang_idle_timeout_s"):
            while True:
                batch.step(0)
        lost_after = time.monotonic() - t0
        streamed = standin.progress[standin.bodies[0]["rid"]]
    finally:
        backend.close()
        standin.close()
    assert IDLE_S <= lost_after < IDLE_S + 2.0
    assert row.tokens == [3 + (7 * j) % 61 for j in range(streamed)]  # all it streamed is kept
    assert not row.done


def test_a_queued_request_that_is_silent_while_the_server_is_healthy_waits(init_dir):
    standin = StandIn(init_dir, token_delay_s=0.005, synthetic=True, incremental=True)
    backend = SGLangBackend(init_dir, url=standin.url, eos_id=-1, idle_timeout_s=IDLE_S)
    row = Row(key=0, prompt=PROMPT, max_new_tokens=50, temperature=1.0)
    try:
        standin.running.clear()  # holds new requests, as sglang does while paused or full
        batch = backend.new_batch(capture_routes=False)
        batch.add([row])
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * IDLE_S:
            batch.step(0)
        standin.running.set()
        while batch.active:
            batch.step(0)
    finally:
        backend.close()
        standin.close()
    assert len(row.tokens) == 50


def test_the_server_interpreter_must_import_sglang():
    with pytest.raises(RuntimeError, match=r"rollout.sglang_python='no-such-python' cannot import sglang"):
        check_sglang_python("no-such-python")
    with pytest.raises(RuntimeError, match="rollout.sglang_python"):  # this environment has no sglang
        check_sglang_python(sys.executable)


def test_a_worker_forwards_streamed_tokens_and_a_lost_server_loses_only_the_unforwarded_tail(tmp_path):
    """A real rollout-worker process on the stand-in without routes: chunks reach the coordinator (the hub here)
    while the response runs; when the server goes silent the worker exits naming the idle timeout, and what the
    coordinator received is an exact prefix of the response (it continues elsewhere from there)."""
    from tests.actors.test_workers import _setup
    from engine.coordinator.procs import python_module, spawn, stop_all
    from transport import GenerateRequest, Hello, Hub, ResponseChunk, run

    _setup(tmp_path)
    standin = StandIn(str(tmp_path / "init"), token_delay_s=0.005, synthetic=True, incremental=True)
    _setup(tmp_path, "rollout.backend=sglang", f"rollout.sglang_url={standin.url}", "rollout.chunk_tokens=8",
           "rollout.return_routes=false", "learner.router_replay=off", f"rollout.sglang_idle_timeout_s={IDLE_S}")
    vocab = standin.model.config.vocab_size

    async def scenario():
        hub = Hub(heartbeat_s=0.5, peer_timeout_s=30.0)
        await hub.start()
        child = spawn("rollout-0", python_module("actors.rollout_worker", "--endpoint", hub.endpoint, "--config",
                                                 str(tmp_path / "config.yaml"), "--init", str(tmp_path / "init")),
                      log_dir=tmp_path / "logs")
        try:
            peer, msg = await hub.recv(timeout=60)
            assert isinstance(msg, Hello)
            await hub.send(peer, GenerateRequest(group_id="g0", prompt_id=0, prompt_ids=np.asarray(PROMPT, np.int32),
                                                 num_samples=1, max_new_tokens=100_000, temperature=1.0))
            chunks = []
            while len(chunks) < 20:  # the response is far from done: 100k tokens
                _, msg = await hub.recv(timeout=60)
                if isinstance(msg, ResponseChunk):
                    chunks.append(msg)
            standin.silence()
            t0 = time.monotonic()
            while child.exited() is None and time.monotonic() - t0 < 30:
                try:
                    _, msg = await hub.recv(timeout=0.2)
                    if isinstance(msg, ResponseChunk):
                        chunks.append(msg)
                except TimeoutError:
                    pass
            return chunks, child.exited(), time.monotonic() - t0, child.log_tail(40)
        finally:
            stop_all([child], grace_s=0.0)
            await hub.close()
            standin.close()

    chunks, code, lost_after, log = run(scenario())
    assert code not in (None, 0) and "rollout.sglang_idle_timeout_s" in log, log
    assert lost_after < IDLE_S + 10  # found within the idle timeout (plus the probe and the process exit)
    tokens = [t for c in chunks for t in c.token_ids.tolist()]
    assert [c.offset for c in chunks] == list(range(0, len(tokens), 8)) and not any(c.finish_reason for c in chunks)
    assert tokens == [3 + (7 * j) % (vocab - 3) for j in range(len(tokens))]
    streamed = max(standin.progress.values())
    assert streamed - len(tokens) < 8 + 50  # lost: at most the tail not forwarded yet (a chunk, one poll's tokens)
