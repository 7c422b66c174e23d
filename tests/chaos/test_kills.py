"""Actors killed mid-run, hostile frames at the coordinator's socket, a corrupt checkpoint: on the real pipeline
(tiny preset, real processes, SIGKILL). Each run must finish, and the prompts trained must be exactly the
expected set: none lost, none twice. The fast test runs by default; the random-kill runs are marked slow."""

import os
import random
import signal
import time

import pytest

from bench.chaos_run import ChaosRun
from transport.hostile import KINDS, attack, replay_hello

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]
MAX_FRAME = 4 * 1024 * 1024
COORDINATOR_RSS_GROWTH_MB = 200  # allowed growth of the coordinator's RSS after the first steps


def _common() -> list[str]:
    return ["train.checkpoint_every=4", "transport.peer_timeout_s=8", f"transport.max_frame_bytes={MAX_FRAME}"]


def _assert_exact(run: ChaosRun) -> None:
    led = run.ledger()
    assert led["steps_ok"] and led["lost"] == 0 and led["duplicated"] == 0 and led["unexpected"] == 0, led
    assert run.orphans() == [] or _no_orphans_after(run)


def _no_orphans_after(run: ChaosRun, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while run.orphans() and time.monotonic() < deadline:
        time.sleep(0.2)
    return run.orphans() == []


def test_killed_learner_rank_and_reward_worker_with_hostile_frames_lose_no_prompt(tmp_path):
    run = ChaosRun(tmp_path, steps=40, overrides=_common())
    run.start()
    try:
        run.wait_steps(3)
        rss0 = run.coordinator_rss_mb()
        endpoint, sent = run.endpoint(), 0
        for kind in KINDS:  # every kind of bad frame at the coordinator's socket, mid-run
            if attack(endpoint, kind, count=5, max_frame_bytes=MAX_FRAME):
                sent += 5
        reward_pid, t_kill = run.kill("reward")
        run.wait_recovered("reward", reward_pid, t_kill)
        replay_hello(endpoint, role="reward", worker_id=0, pid=reward_pid)  # the dead worker's Hello, replayed
        sent += 1
        rank_pid, t_kill = run.kill("learner_rank")  # a rank dies, not the launcher: torchrun stops the group
        run.wait_recovered("learner_rank", rank_pid, t_kill)
        # and again to the hub that the recovery bound on the same port: still a replay, and no real reward
        # worker is taken for the dead one (the soak found the run stalled on that)
        replay_hello(run.endpoint(), role="reward", worker_id=0, pid=reward_pid)
        sent += 1
        rss_growth = run.coordinator_rss_mb() - rss0
        summary = run.finish()
    finally:
        run.stop()
    assert summary["steps"] == 40 and summary["learner_restarts"] == 1 and summary["actor_restarts"] >= 1
    assert summary["frames_rejected"] >= sent, (summary["frames_rejected"], sent)
    assert rss_growth < COORDINATOR_RSS_GROWTH_MB, f"coordinator RSS grew {rss_growth:.0f} MiB"
    assert "reason=replayed" in run.stderr() and "recovery.learner_restart" in run.stderr()
    _assert_exact(run)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_random_kills_of_every_actor_kind_lose_no_prompt(tmp_path, seed):
    rng = random.Random(seed)
    kinds = ["rollout", "reward", "learner_rank", "torchrun", "rollout", "learner_rank"]
    rng.shuffle(kinds)
    overrides = _common() + ["rollout.num_workers=2", "transport.max_actor_restarts=10",
                             "transport.max_learner_restarts=5"]
    run = ChaosRun(tmp_path, steps=300, overrides=overrides)
    run.start()
    try:
        events = run.random_kills(kinds, rng)  # each a random 0.3-2 s after the previous recovery
        summary = run.finish()
    finally:
        run.stop()
    assert len(events) == len(kinds), f"the run ended after {len(events)} of {len(kinds)} kills"
    assert summary["steps"] == 300
    assert summary["learner_restarts"] == sum(k in ("learner_rank", "torchrun") for k in kinds)
    _assert_exact(run)


@pytest.mark.slow
def test_a_killed_rank_of_two_learner_ranks_is_recovered(tmp_path):
    run = ChaosRun(tmp_path, steps=100, overrides=_common() + ["learner.num_ranks=2"])
    run.start()
    try:
        run.wait_steps(6)
        pid, t_kill = run.kill("learner_rank", which=-1)  # the newest rank process: rank 1, mid-collective
        run.wait_recovered("learner_rank", pid, t_kill)
        summary = run.finish()
    finally:
        run.stop()
    assert summary["steps"] == 100 and summary["learner_restarts"] == 1
    _assert_exact(run)


@pytest.mark.slow
def test_a_frozen_learner_keeps_the_coordinator_bounded_and_a_corrupt_checkpoint_falls_back(tmp_path):
    run = ChaosRun(tmp_path, steps=20, overrides=_common())
    run.start()
    try:
        run.wait_steps(10)
        rss0 = run.coordinator_rss_mb()
        pid, _ = run.kill("learner_rank", signal.SIGSTOP)  # a stalled consumer: nothing is trained for 5 s
        time.sleep(5)
        rss_growth = run.coordinator_rss_mb() - rss0
        os.kill(pid, signal.SIGCONT)
        summary = run.finish()
    finally:
        run.stop()
    assert summary["steps"] == 20 and rss_growth < COORDINATOR_RSS_GROWTH_MB
    bound = (1 + 2) * run.groups_per_step  # admission paces at max_staleness (1) + 2 steps of groups
    assert max(r["buffered_groups"] for r in run.step_rows()) <= bound
    newest = run.run_dir / "checkpoints" / "step_000020" / "arrays.npz"
    newest.write_bytes(newest.read_bytes()[:-7])  # a torn write
    resumed = ChaosRun(tmp_path, steps=28, overrides=_common())
    resumed.start("resume=true")
    try:
        summary = resumed.finish()
    finally:
        resumed.stop()
    assert summary["resumed_from_step"] == 16  # the previous checkpoint
    assert "checkpoint.corrupt" in resumed.stderr()
    _assert_exact(resumed)
