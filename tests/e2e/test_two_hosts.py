"""Two hosts, really: two network namespaces joined by a veth link stand in for two machines.

Namespace A holds the coordinator and the first torchrun agent of an elastic learner (``learner.nnodes=1:2``);
namespace B holds a stand-alone rollout worker and the second learner agent, both started with the commands of
``runs/<name>/join.json``. Every connection crosses the veth link between the two addresses this test assigns
(10.213.0.1 and 10.213.0.2, inside its own namespaces only), with CURVE on and each "machine" using its own client
key pair. Mid-run the link goes down for twice ``transport.peer_timeout_s``, then comes back: the coordinator
drops the silent worker and re-queues its work, the worker loses the coordinator and joins again
(``--rejoin-s``), and the run finishes with every prompt id trained exactly once and no process left behind.

Needs root and ``ip netns`` (iproute2); skipped with the reason otherwise.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import processes_mentioning

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[2]
ADDR_A, ADDR_B = "10.213.0.1", "10.213.0.2"  # assigned by this test to its own veth pair, nowhere else
PORT, RDZV_PORT = 5555, 29400  # free by construction: nothing else listens inside fresh namespaces
HEARTBEAT_S, PEER_TIMEOUT_S = 0.5, 5.0
STEPS, GROUPS = 80, 8  # tiny preset: 8 groups per step. Enough steps that many are left after node B's agent
# joins (the one-node group trains while B's agent starts; both scale with the machine's speed)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def two_hosts():
    """Namespaces A and B with a veth link between them (A: ADDR_A on dev_a, B: ADDR_B on dev_b), loopback up in
    each; removed afterwards, with every process still inside them killed first (all of them started by us)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs the ip command (iproute2) to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, dev_a, dev_b = f"ep2h-{tag}-a", f"ep2h-{tag}-b", f"ep{tag}a", f"ep{tag}b"
    made: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            r = _ip("netns", "add", ns, check=False)
            if r.returncode != 0:
                pytest.skip(f"cannot create a network namespace: ip netns add: {r.stderr.strip()}")
            made.append(ns)
        r = _ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b, check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {r.stderr.strip()}")
        for ns, dev, addr in ((ns_a, dev_a, ADDR_A), (ns_b, dev_b, ADDR_B)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        yield {"a": ns_a, "b": ns_b, "dev_a": dev_a, "dev_b": dev_b}
    finally:
        for ns in made:
            for _ in range(50):
                pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
                if not pids:
                    break
                for pid in pids:  # only what this test started in its own namespace
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            _ip("netns", "delete", ns, check=False)  # the veth pair goes with its namespaces


def _popen(ns: str, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **env}, cwd=REPO, start_new_session=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _steps(run: Path) -> list[int]:
    ledger = run / "prompts.jsonl"
    return [json.loads(line)["step"] for line in _read(ledger).splitlines() if line.strip()]


def _wait(predicate, procs: dict[str, subprocess.Popen], timeout: float, what: str, logs: dict[str, Path]) -> None:
    """Poll ``predicate`` until it holds; fail, with the logs' tails, if a process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = {name: p.returncode for name, p in procs.items() if p.poll() is not None}
        assert not ended, f"{ended} ended while waiting for {what}\n{_tails(logs)}"
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{_tails(logs)}")


def _joins(coordinator_log: Path) -> list[str]:
    return [line for line in _read(coordinator_log).splitlines() if "actor.joined" in line and "rollout-100" in line]


def _tails(logs: dict[str, Path], n: int = 25) -> str:
    return "\n".join(f"--- {name}: {path}\n" + "\n".join(_read(path).splitlines()[-n:]) for name, path in logs.items())


def test_coordinator_and_a_remote_node_over_a_real_link_survive_a_partition(tmp_path, two_hosts):
    keys, run = tmp_path / "keys", tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "transport.keys", str(keys), "--client", "client", "--client", "nodeB"],
                   check=True, cwd=REPO, capture_output=True, timeout=60)
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    logs = {"coordinator": tmp_path / "coordinator.log", "worker_b": tmp_path / "worker_b.log",
            "agent_b": tmp_path / "agent_b.log"}
    procs: dict[str, subprocess.Popen] = {}
    coord = _popen(two_hosts["a"], [
        sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}", "progress=false",
        f"sft.cache_dir={tmp_path / 'sft_cache'}", "sft.max_steps=5", "sft.eval_every=5",
        f"transport.host={ADDR_A}", f"transport.port={PORT}",
        f"transport.curve_keys_dir={keys}", f"transport.heartbeat_s={HEARTBEAT_S}",
        f"transport.peer_timeout_s={PEER_TIMEOUT_S}", "learner.nnodes=1:2", f"learner.rdzv_port={RDZV_PORT}",
        "learner.threads_per_rank=1", "learner.max_restarts=6", "rollout.num_workers=0",
        "rollout.threads_per_worker=1", f"train.num_steps={STEPS}", "train.checkpoint_every=5",
        "train.eval_every=0", "logging.backends=[jsonl]"],
        logs["coordinator"], {**threads, "GLOO_SOCKET_IFNAME": two_hosts["dev_a"]})
    procs["coordinator"] = coord
    try:
        _wait(lambda: (run / "join.json").exists(), procs, 240, "join.json (SFT done, actors starting)", logs)
        join = json.loads((run / "join.json").read_text())
        # The commands another machine runs must name the coordinator's real address, never loopback.
        assert join["endpoint"] == f"tcp://{ADDR_A}:{PORT}", join
        assert f"--rdzv-endpoint={ADDR_A}:{RDZV_PORT}" in join["learner_agent"], join
        assert "127.0.0.1" not in json.dumps(join), join
        # Node B, with its own key pair, runs what join.json says: first a stand-alone rollout worker (the only
        # one: the run moves once it joins), then, once the one-node learner has trained, the second agent.
        worker_cmd = [sys.executable, "-m", "actors.rollout_worker", *join["rollout_worker"][1:],
                      "--curve-client", "nodeB"]
        procs["worker_b"] = _popen(two_hosts["b"], worker_cmd, logs["worker_b"], threads)
        _wait(lambda: len(_steps(run)) >= 1, procs, 240, "a first step with the remote worker", logs)
        agent_cmd = [sys.executable, *join["learner_agent"][1:], "--curve-client", "nodeB"]
        procs["agent_b"] = _popen(two_hosts["b"], agent_cmd, logs["agent_b"], {
            **threads, "GLOO_SOCKET_IFNAME": two_hosts["dev_b"], "PET_LOCAL_ADDR": ADDR_B,
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "DS_ACCELERATOR": "cpu"})

        # The group grows to both hosts: a learner recovery, which every actor goes through, the worker included.
        learner_log = run / "logs" / "learner.log"
        _wait(lambda: "world=2" in _read(learner_log), procs, 240, "a learner group spanning both hosts", logs)
        n = len(_steps(run))
        _wait(lambda: len(_steps(run)) >= n + 2, procs, 240, "two steps on both hosts", logs)

        # The partition: longer than the heartbeat timeout on both sides, then the link comes back.
        steps_before = max(_steps(run))
        assert steps_before <= STEPS - 10, f"too few steps left for the partition: {steps_before} of {STEPS} done"
        joins_before = len(_joins(logs["coordinator"]))
        _ip("-n", two_hosts["b"], "link", "set", two_hosts["dev_b"], "down")
        time.sleep(2 * PEER_TIMEOUT_S + 1)  # deliberate: a partition outlasting transport.peer_timeout_s
        _ip("-n", two_hosts["b"], "link", "set", two_hosts["dev_b"], "up")
        _wait(lambda: len(_joins(logs["coordinator"])) > joins_before, procs, 120, "the worker to join again", logs)
        _wait(lambda: max(_steps(run), default=0) > steps_before, procs, 240, "steps after the partition", logs)

        coord.wait(timeout=300)
        for name in ("worker_b", "agent_b"):
            procs[name].wait(timeout=120)  # told to stop with the run (a Shutdown; the rendezvous closes)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)

    err = _read(logs["coordinator"])
    assert coord.returncode == 0, _tails(logs)
    assert procs["worker_b"].returncode == 0 and procs["agent_b"].returncode == 0, _tails(logs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["learner_restarts"] >= 1, summary  # >= 1: node B joining

    # Nothing lost, nothing twice: every step once, every prompt id once.
    ledger = [json.loads(line) for line in _read(run / "prompts.jsonl").splitlines()]
    ids = [p for row in ledger for p in row["prompt_ids"]]
    assert [row["step"] for row in ledger] == list(range(1, STEPS + 1))
    assert len(ids) == STEPS * GROUPS and len(set(ids)) == len(ids)

    # The partition was seen from both ends, and the worker came back each time: the coordinator dropped
    # rollout-100 as silent, the worker joined again on a new connection (after the recovery's new hub too), and
    # it generated every RL sample of the run.
    worker = _read(logs["worker_b"])
    assert "coordinator_lost" in worker and "rollout.rejoining" in worker, worker[-3000:]
    assert any("actor.lost" in line and "rollout-100" in line for line in err.splitlines()), err[-3000:]
    joins = _joins(logs["coordinator"])
    assert len(joins) >= 3, joins  # the first time, after the recovery, after the partition
    assert set(summary["samples_by_worker"]) == {"rollout-100"}, summary["samples_by_worker"]

    # No process left behind, inside the namespaces or out.
    assert processes_mentioning(str(tmp_path)) == []
    for ns in (two_hosts["a"], two_hosts["b"]):
        assert _ip("netns", "pids", ns).stdout.split() == [], ns
