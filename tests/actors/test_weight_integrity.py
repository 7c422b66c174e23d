"""Weight integrity: every published version carries the sha256 of its file, and a rollout worker serves only bytes
that match it. A real RolloutWorker with the real transformers backend runs in this process, connected over
loopback ZeroMQ to a Hub playing the coordinator; the weights files are real, and so are their faults."""

import asyncio
import contextlib
import os
import threading

import numpy as np
import pytest
import structlog
import torch

from actors.rollout_worker import RolloutWorker
from engine.backends.hf import HFBackend
from engine.backends.weights_file import WeightsRejected, digest_bytes, digest_file
from engine.modeling.model import save_weights
from tests.actors.test_workers import _setup
from transport import GenerateRequest, Hello, Hub, LoadWeights, Peer, ResponseChunk, Shutdown, WeightsLoaded, run

pytestmark = pytest.mark.timeout(180)


class Events:
    """Every structlog event of this process (any thread), which a test can wait for."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: list[dict] = []

    def __call__(self, _logger, _method, event_dict):
        with self._cond:
            self.items.append(dict(event_dict))
            self._cond.notify_all()
        raise structlog.DropEvent

    def named(self, event: str) -> list[dict]:
        with self._cond:
            return [e for e in self.items if e["event"] == event]

    def wait(self, event: str, count: int = 1, timeout: float = 60.0) -> list[dict]:
        with self._cond:
            assert self._cond.wait_for(lambda: len([e for e in self.items if e["event"] == event]) >= count,
                                       timeout), f"no {count} x {event} within {timeout}s: {self.items}"
        return self.named(event)


@contextlib.contextmanager
def logged():
    old = structlog.get_config()
    events = Events()
    structlog.configure(processors=[events])
    try:
        yield events
    finally:
        structlog.configure(**old)


def _bump(model, v: int):
    """Version ``v`` of the policy: visibly different weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * v)
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _replace(path, data: bytes) -> None:
    """Put ``data`` in place at ``path`` the way the learner does (temp file, rename)."""
    tmp = f"{path}.incoming"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def hosted_worker(tmp_path, task, **kw):
    """(hub, peer, worker, backend): a RolloutWorker on the hf backend, served in this event loop."""
    hub = Hub(heartbeat_s=0.5, peer_timeout_s=30.0)
    await hub.start()
    backend = HFBackend(str(tmp_path / "init"), seed=0, eos_id=task.tokenizer.eos_id, pad_id=task.tokenizer.pad_id)
    worker = RolloutWorker(Peer(hub.endpoint, hello=Hello(role="rollout", worker_id=0, pid=os.getpid()),
                                heartbeat_s=0.5, peer_timeout_s=30.0),
                           backend, worker_id=0, max_batch_samples=8, chunk_tokens=2, **kw)
    serving = asyncio.create_task(worker.serve())
    try:
        peer, hello = await hub.recv(timeout=30)
        assert isinstance(hello, Hello)
        yield hub, peer, worker, backend
        await hub.send(peer, Shutdown(reason="test"))
        await asyncio.wait_for(serving, 30)
    finally:
        serving.cancel()
        await hub.close()


async def _until_loaded(hub: Hub, chunks: list[ResponseChunk] | None = None) -> WeightsLoaded:
    while True:
        _, msg = await hub.recv(timeout=60)
        if isinstance(msg, WeightsLoaded):
            return msg
        assert isinstance(msg, ResponseChunk)
        if chunks is not None:
            chunks.append(msg)


async def _generate(hub: Hub, peer: str, prompt, *, group: str, n: int = 4, tokens: int = 12,
                    chunks: list[ResponseChunk] | None = None) -> list[ResponseChunk]:
    """Every chunk of ``n`` responses to ``prompt`` (plus the ones already in ``chunks``)."""
    await hub.send(peer, GenerateRequest(group_id=group, prompt_id=1, prompt_ids=prompt, num_samples=n,
                                         max_new_tokens=tokens, temperature=1.0))
    chunks = [] if chunks is None else chunks
    while sum(bool(c.finish_reason) for c in chunks if c.group_id == group) < n:
        _, msg = await hub.recv(timeout=60)
        if isinstance(msg, ResponseChunk):
            chunks.append(msg)
    return [c for c in chunks if c.group_id == group]


def _truncated(good: bytes, other: bytes) -> bytes:
    return good[: len(good) // 2]


def _flipped(good: bytes, other: bytes) -> bytes:
    data = bytearray(good)
    data[len(data) - 100] ^= 0x01  # one bit of one weight: still a valid safetensors file
    return bytes(data)


def _other_version(good: bytes, other: bytes) -> bytes:
    return other  # a whole, valid file of version 1 under version 2's name


@pytest.mark.parametrize("fault", [_truncated, _flipped, _other_version], ids=["truncated", "flipped_byte",
                                                                              "other_version"])
def test_a_bad_file_is_refused_and_the_previous_version_kept(tmp_path, fault):
    cfg, task, model = _setup(tmp_path)
    prompt = np.asarray(task.prompt_ids(task.eval_set[0]), dtype=np.int32)
    w = tmp_path / "weights"
    d1 = save_weights(_bump(model, 1), w / "policy_v1.safetensors")
    v1 = _state(model)
    d2 = save_weights(_bump(model, 2), w / "policy_v2.safetensors")
    v2 = _state(model)
    good1, good2 = (w / "policy_v1.safetensors").read_bytes(), (w / "policy_v2.safetensors").read_bytes()
    assert d1 == digest_bytes(good1) and d2 == digest_bytes(good2) == digest_file(w / "policy_v2.safetensors")
    _replace(w / "policy_v2.safetensors", fault(good2, good1))

    async def scenario():
        async with hosted_worker(tmp_path, task, load_attempts=2, load_backoff_s=0.05, reask_s=3600) as (
                hub, peer, worker, backend):
            await hub.send(peer, LoadWeights(version=1, path=str(w / "policy_v1.safetensors"), digest=d1))
            assert (await _until_loaded(hub)).version == 1 and _same(backend.model, v1)
            # a long batch is decoding under version 1 when the bad version 2 arrives
            chunks: list[ResponseChunk] = []
            await hub.send(peer, GenerateRequest(group_id="long", prompt_id=1, prompt_ids=prompt, num_samples=8,
                                                 max_new_tokens=40, temperature=1.0))
            chunks.append(await _chunk(hub))
            with logged() as events:
                await hub.send(peer, LoadWeights(version=2, path=str(w / "policy_v2.safetensors"), digest=d2))
                loaded = await _until_loaded(hub, chunks)
                assert loaded.version == 1  # it reports the version it still serves
                assert worker.version == 1 and _same(backend.model, v1)  # untouched: no mix of two versions
                refused = events.named("weights.load_refused")
                assert len(refused) == 1 and refused[0]["version"] == 2 and refused[0]["serving"] == 1
                mismatches = events.named("weights.digest_mismatch")
                assert refused[0]["reason"] == "digest_mismatch" and len(mismatches) == 2  # read again once
                assert all(m["path"] == str(w / "policy_v2.safetensors") and m["expected"] == d2
                           and m["got"] == digest_bytes(fault(good2, good1)) for m in mismatches)
                await _generate(hub, peer, prompt, group="after", chunks=chunks)
            versions = [v for c in chunks for v in c.token_versions.tolist()]
            assert versions and set(versions) == {1}  # every token before and after the refusal: version 1
            assert {c.group_id for c in chunks} == {"long", "after"}
            # the right bytes, sent again: accepted, and every later token is version 2
            _replace(w / "policy_v2.safetensors", good2)
            await hub.send(peer, LoadWeights(version=2, path=str(w / "policy_v2.safetensors"), digest=d2))
            assert (await _until_loaded(hub)).version == 2 and _same(backend.model, v2)
            after = await _generate(hub, peer, prompt, group="v2")
            assert {v for c in after for v in c.token_versions.tolist()} == {2}

    run(scenario())


async def _chunk(hub: Hub) -> ResponseChunk:
    _, msg = await hub.recv(timeout=60)
    assert isinstance(msg, ResponseChunk)
    return msg


def test_the_right_bytes_appearing_during_the_wait_are_taken(tmp_path):
    """The first read finds a torn file; the right bytes are renamed into place while the worker waits, and the
    worker takes them as soon as the file changes (long backoff: ending early is what makes this test quick)."""
    cfg, task, model = _setup(tmp_path)
    w = tmp_path / "weights"
    d1 = save_weights(_bump(model, 1), w / "policy_v1.safetensors")
    v1 = _state(model)
    good = (w / "policy_v1.safetensors").read_bytes()
    _replace(w / "policy_v1.safetensors", good[:1000])

    async def scenario():
        with logged() as events:
            def fix() -> None:  # the writer finishing late
                events.wait("weights.digest_mismatch")
                _replace(w / "policy_v1.safetensors", good)

            fixer = threading.Thread(target=fix)
            fixer.start()
            async with hosted_worker(tmp_path, task, load_attempts=3, load_backoff_s=60.0) as (
                    hub, peer, worker, backend):
                await hub.send(peer, LoadWeights(version=1, path=str(w / "policy_v1.safetensors"), digest=d1))
                loaded = await _until_loaded(hub)
                assert loaded.version == 1 and worker.version == 1 and _same(backend.model, v1)
                assert loaded.load_s < 60.0  # it did not sit out the backoff
            fixer.join()
            assert len(events.named("weights.digest_mismatch")) == 1 and not events.named("weights.load_refused")

    run(scenario())


def test_refused_weights_are_asked_for_again_until_they_load(tmp_path):
    """After every attempt failed, the worker keeps serving its version and tries the same file again later (a
    version that is never superseded, e.g. the last one, still arrives once its file is right)."""
    cfg, task, model = _setup(tmp_path)
    w = tmp_path / "weights"
    d1 = save_weights(_bump(model, 1), w / "policy_v1.safetensors")
    v1 = _state(model)
    good = (w / "policy_v1.safetensors").read_bytes()
    (w / "policy_v1.safetensors").unlink()  # not there yet

    async def scenario():
        with logged() as events:
            async with hosted_worker(tmp_path, task, load_attempts=1, reask_s=0.2) as (hub, peer, worker, backend):
                await hub.send(peer, LoadWeights(version=1, path=str(w / "policy_v1.safetensors"), digest=d1))
                assert (await _until_loaded(hub)).version == 0
                assert events.named("weights.load_refused")[0]["reason"] == "unreadable"
                _replace(w / "policy_v1.safetensors", good)
                while (await _until_loaded(hub)).version != 1:  # refused again while it was missing
                    pass
                assert worker.version == 1 and _same(backend.model, v1)

    run(scenario())


def test_sglang_backend_checks_the_digest_before_writing_the_servers_folder(tmp_path):
    from engine.backends.sglang import SGLangBackend
    from tests.engine.test_adapters import build
    from tests.sglang_standin import StandIn

    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "init")
    path = str(tmp_path / "weights" / "policy_v1.safetensors")
    with torch.no_grad():
        model.lm_head.weight.fill_(0.5)
    digest = save_weights(model, path)
    good = open(path, "rb").read()
    _replace(path, _flipped(good, good))
    standin = StandIn(str(tmp_path / "init"))
    backend = SGLangBackend(str(tmp_path / "init"), url=standin.url, eos_id=-1)
    try:
        with logged() as events, pytest.raises(WeightsRejected) as refused:
            backend.load(path, digest)
        assert refused.value.reason == "digest_mismatch" and events.named("weights.digest_mismatch")
        assert not backend.model_dir(path).exists() and standin.weight_version == "0"  # nothing written or loaded
        _replace(path, good)
        backend.load(path, digest)
        assert standin.weight_version == "1"
        assert torch.equal(standin.model.lm_head.weight, torch.full_like(standin.model.lm_head.weight, 0.5))
    finally:
        backend.close()
        standin.close()
