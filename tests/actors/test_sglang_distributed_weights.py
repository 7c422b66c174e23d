"""rollout.weight_sync=distributed against two stand-in servers, each its own process: learner rank 0's sender
(actors/weight_sync.py) broadcasts over a real gloo group per server while each worker's backend drives the HTTP
session (engine/backends/sglang_sync.py), for several versions; the served weights are checked tensor by tensor.
A version the server refuses keeps the previous one; one refused in part is repaired from the disk file."""

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from actors.weight_sync import WeightSender
from bench.chaos_faults import free_port_pair
from engine.backends.sglang import SGLangBackend
from engine.backends.weights_file import WeightsRejected
from engine.modeling.model import save_weights
from tests.engine.test_adapters import build
from tests.sglang_standin import tensor_checksums
from transport.codec import decode, encode
from transport.messages import WeightsWanted

pytestmark = pytest.mark.timeout(300)
BUCKET_BYTES = 64 * 1024  # several buckets for the tiny model


def _get(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def _post(url: str, path: str, body: dict) -> None:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture
def servers(tmp_path):
    """Two stand-in servers as processes (``python -m tests.sglang_standin``) on the tiny model."""
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "init")
    procs, urls = [], []
    port = free_port_pair()
    for i in range(2):
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.sglang_standin", "--model-path",
                                       str(tmp_path / "init"), "--port", str(port + i)]))
        urls.append(f"http://127.0.0.1:{port + i}")
    try:
        yield model, str(tmp_path / "init"), urls
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


def _version(model, v: int) -> dict:
    """Weights of version ``v``: every tensor moved, so a tensor missed by the broadcast shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * v)
    return model.state_dict()


def _sync(sender: WeightSender, backend: SGLangBackend, state: dict, version: int, path: str = "",
          digest: str = "") -> None:
    """One transfer as the coordinator relays it: the worker's WeightsWanted, the learner's answer (through the
    codec), the broadcast in a thread while the backend receives."""
    name, world_size = backend.weight_group()
    reply, job = sender.answer(WeightsWanted(group_name=name, world_size=world_size, version=version), state, version)
    sending = decode(encode(reply))
    sent = []
    thread = threading.Thread(target=lambda: sent.append(job()))
    thread.start()
    try:
        backend.load_distributed(sending, path, digest)
    finally:
        thread.join(timeout=120)
    assert sent == [True]


def test_versions_broadcast_into_two_servers_and_a_refused_one_keeps_the_old(servers, tmp_path):
    model, init_dir, urls = servers
    backends = [SGLangBackend(init_dir, url=u, eos_id=-1, worker_id=i, start_timeout_s=120)
                for i, u in enumerate(urls)]
    sender = WeightSender(init_dir, master_address="127.0.0.1", timeout_s=60, bucket_bytes=BUCKET_BYTES)
    expected = {}
    for v in range(1, 4):
        state = _version(model, v)
        expected = tensor_checksums(sender.state(state))
        for b in backends:
            _sync(sender, b, state, v)
        for u in urls:
            assert _get(u, "/_checksums") == expected, f"version {v} at {u}"
    assert len(sender.groups) == 2  # one group per server, reused for every version
    buckets = len(sender.answer(WeightsWanted(group_name=backends[0].weight_group()[0], world_size=2, version=3),
                                model.state_dict(), 3)[0].ends)
    assert buckets >= 3

    # every bucket of version 4 refused by server 0 (received, not loaded): it keeps version 3
    _post(urls[0], "/_fault", {"update_failures": buckets})
    state = _version(model, 4)
    with pytest.raises(WeightsRejected) as refused:
        _sync(sender, backends[0], state, 4)
    assert refused.value.reason == "server_rejected"
    assert _get(urls[0], "/_checksums") == expected
    # the worker drops that group and asks on a new one: version 4 arrives whole
    old = backends[0].abandon_group()
    sender.drop(old)
    _sync(sender, backends[0], state, 4)
    assert backends[0].weight_group()[0] != old
    expected = tensor_checksums(sender.state(state))
    assert _get(urls[0], "/_checksums") == expected

    # one bucket of version 5 refused: the server holds a mix, repaired from version 5's file on disk
    state = _version(model, 5)
    path = tmp_path / "weights" / "policy_v5.safetensors"
    digest = save_weights(model, path)
    _post(urls[1], "/_fault", {"update_failures": 1})
    _sync(sender, backends[1], state, 5, str(path), digest)
    assert _get(urls[1], "/_checksums") == tensor_checksums(sender.state(state))
    for b in backends:
        b.close()


def test_a_second_session_and_an_update_outside_one_are_refused(servers):
    _, _, urls = servers
    deadline = time.monotonic() + 120
    while True:
        try:
            _get(urls[0], "/health")
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    outside = urllib.request.Request(urls[0] + "/update_weights_from_distributed", method="POST",
                                     data=json.dumps({"names": [], "dtypes": [], "shapes": []}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(outside, timeout=10)
    assert e.value.code == 400 and "between begin_weight_update" in json.loads(e.value.read())["message"]
    _post(urls[0], "/begin_weight_update", {"selector": "all"})
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(urls[0], "/begin_weight_update", {"selector": "all"})
    assert "already open" in json.loads(e.value.read())["message"]
    _post(urls[0], "/end_weight_update", {})


@pytest.mark.parametrize("overrides, key", [
    ({"rollout": {"weight_sync": "distributed"}}, "rollout.weight_sync"),  # backend hf
    ({"rollout": {"weight_sync": "distributed", "backend": "sglang", "sglang_url": "http://10.0.0.5:30000"}},
     "transport.host"),  # the server cannot reach a loopback learner
    ({"rollout": {"weight_sync": "distributed", "backend": "sglang"}, "learner": {"nnodes": "1:2"}},
     "rollout.weight_sync"),  # rank 0 may run on another machine
])
def test_distributed_sync_config_errors_name_the_key(overrides, key):
    from configs.schema import LearnerConfig, RolloutConfig, RunConfig

    with pytest.raises(ValueError) as e:
        RunConfig(rollout=RolloutConfig(**overrides["rollout"]), learner=LearnerConfig(**overrides.get("learner", {})))
    assert str(e.value).startswith(key) and "\n" not in str(e.value)
    RunConfig(rollout=RolloutConfig(weight_sync="distributed", backend="sglang"))  # launched servers: loopback is fine
