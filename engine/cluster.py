"""Start every actor process, connect it, route its messages, watch its health, and stop it.

``start_actors`` is the one place that knows the process map of DESIGN.md. Inside the ``async with`` block the
caller gets ``Actors``: rollouts (engine/rollouts.py), the group buffer, and the learner handle. A background
pump routes every incoming frame; a dead or silent actor, or an ErrorReport, aborts the block with
``ActorFailed`` naming the actor and the tail of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from engine.launch import learner_command, learner_env
from configs.schema import RunConfig
from engine.buffer import GroupBuffer
from engine.procs import Child, python_module, spawn, stop_all
from engine.rollouts import Rollouts
from transport import (Completion, ErrorReport, Hello, Hub, Scored, Shutdown, TrainBatch, TrainResult,
                       WeightsLoaded)

log = structlog.get_logger()


class ActorFailed(RuntimeError):
    """An actor died, went silent or reported an error; the run cannot continue."""


class Learner:
    """Handle on learner rank 0 (the other ranks follow it over torch.distributed)."""

    def __init__(self, hub: Hub, peer: str) -> None:
        self._hub, self._peer = hub, peer
        self._pending: asyncio.Future | None = None

    async def train(self, batch: TrainBatch) -> TrainResult:
        self._pending = asyncio.get_running_loop().create_future()
        await self._hub.send(self._peer, batch)
        try:
            return await self._pending
        finally:
            self._pending = None

    def on_result(self, msg: TrainResult) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_result(msg)
        else:
            log.warning("learner.unexpected_result", step=msg.step)


@dataclass
class Actors:
    rollouts: Rollouts
    buffer: GroupBuffer
    learner: Learner


def _spawn_all(cfg: RunConfig, run_dir: Path, endpoint: str, init_dir: str) -> list[Child]:
    config_path, logs = str(run_dir / "config.yaml"), run_dir / "logs"
    common = ["--endpoint", endpoint, "--config", config_path]
    children = []
    for i in range(cfg.rollout.num_workers):
        children.append(spawn(f"rollout-{i}", python_module("actors.rollout_worker", *common, "--worker-id", str(i),
                                                               "--init", init_dir), log_dir=logs,
                              env={"OMP_NUM_THREADS": str(cfg.rollout.threads_per_worker)}))
    for i in range(cfg.reward.num_workers):
        children.append(spawn(f"reward-{i}", python_module("actors.reward_worker", *common, "--worker-id", str(i)),
                              log_dir=logs, env={"OMP_NUM_THREADS": "1"}))
    argv = learner_command(cfg, config_path=config_path, endpoint=endpoint, init_dir=init_dir,
                           weights_dir=str(run_dir / "weights"), master_port=cfg.learner.master_port)
    children.append(spawn("learner", argv, log_dir=logs, env=learner_env(cfg)))
    return children


def _check_children(children: list[Child]) -> None:
    for c in children:
        if (code := c.exited()) is not None:
            raise ActorFailed(f"{c.name} exited with code {code}; see {c.log_path}. Last lines:\n{c.log_tail()}")


async def _wait_for_hellos(hub: Hub, cfg: RunConfig, children: list[Child]) -> dict[str, list[str]]:
    want = {"rollout": cfg.rollout.num_workers, "reward": cfg.reward.num_workers, "learner": 1}
    joined: dict[str, list[tuple[int, str]]] = {role: [] for role in want}
    deadline = time.monotonic() + cfg.transport.start_timeout_s
    while any(len(joined[r]) < n for r, n in want.items()):
        _check_children(children)
        if time.monotonic() > deadline:
            missing = {r: n - len(joined[r]) for r, n in want.items() if len(joined[r]) < n}
            raise ActorFailed(f"actors {missing} did not connect within transport.start_timeout_s="
                              f"{cfg.transport.start_timeout_s}; see the logs in {children[0].log_path.parent}")
        try:
            peer, msg = await hub.recv(timeout=0.5)
        except TimeoutError:
            continue
        if isinstance(msg, Hello) and msg.role in joined:
            joined[msg.role].append((msg.worker_id, peer))
            log.info("actor.joined", role=msg.role, worker_id=msg.worker_id, pid=msg.pid)
        elif isinstance(msg, ErrorReport):
            raise ActorFailed(f"{msg.where} failed while starting:\n{msg.error}")
    return {role: [p for _, p in sorted(peers)] for role, peers in joined.items()}


async def _pump(hub: Hub, a: Actors, children: list[Child]) -> None:
    """Route every incoming message; raise ActorFailed on a dead actor. Runs for the whole block."""
    while True:
        try:
            peer, msg = await hub.recv(timeout=1.0)
        except TimeoutError:
            peer, msg = None, None
        match msg:
            case Completion():
                await a.rollouts.on_completion(msg)
            case Scored():
                a.rollouts.on_scored(msg)
            case WeightsLoaded():
                a.rollouts.on_weights_loaded(peer, msg)
            case TrainResult():
                a.learner.on_result(msg)
            case ErrorReport():
                raise ActorFailed(f"{msg.where} reported an error:\n{msg.error}")
            case None | Hello():
                pass
            case _:
                log.warning("coordinator.unexpected_message", type=type(msg).__name__, peer=peer)
        _check_children(children)
        if dead := hub.dead_peers():
            raise ActorFailed(f"actors {[hub.peers[p].role for p in dead]} sent nothing for "
                              f"transport.peer_timeout_s={hub.peer_timeout_s}; see {children[0].log_path.parent}")


@contextlib.asynccontextmanager
async def start_actors(cfg: RunConfig, run_dir: Path, init_dir: str):
    """Every process up and connected; on exit (normal, error or Ctrl-C) every process stopped."""
    hub = Hub(host=cfg.transport.host, heartbeat_s=cfg.transport.heartbeat_s,
              peer_timeout_s=cfg.transport.peer_timeout_s, max_frame_bytes=cfg.transport.max_frame_bytes)
    await hub.start()
    children: list[Child] = []
    try:
        children = _spawn_all(cfg, run_dir, hub.endpoint, init_dir)
        peers = await _wait_for_hellos(hub, cfg, children)
        buffer = GroupBuffer(on_discard=lambda: rollouts.capacity_freed())
        rollouts = Rollouts(hub, workers=peers["rollout"], rewards=peers["reward"], buffer=buffer,
                            group_size=cfg.rollout.group_size, temperature=cfg.rollout.temperature,
                            max_new_tokens=cfg.task.max_answer_tokens,
                            groups_per_step=cfg.train.groups_per_step, max_policy_lag=cfg.train.max_policy_lag)
        actors = Actors(rollouts=rollouts, buffer=buffer, learner=Learner(hub, peers["learner"][0]))
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(_pump(hub, actors, children), name="coordinator.pump")
            yield actors
            pump.cancel()
        await rollouts.stop()
    finally:
        for peer in list(hub.peers):
            with contextlib.suppress(Exception):
                await hub.send(peer, Shutdown(reason="run finished"))
        await asyncio.to_thread(stop_all, children)
        await hub.close()
