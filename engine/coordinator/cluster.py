"""Start every actor process, connect it, route its messages, watch its health, and stop it.

``start_actors`` is the one place that knows the process map of DESIGN.md. Inside the ``async with`` block the
caller gets ``Actors``: rollouts (engine/coordinator/rollouts.py), the group buffer, and the learner handle. A
background pump routes every incoming frame: producer messages into the rollouts' inbox (taken by the ``produce``
loop the caller passes, engine/coordinator/loop.py::continuous_rollouts), learner results to the learner handle.
A dead or silent rollout or reward worker is restarted and the producer told (``WorkerLost``: its unfinished
work is re-queued); the learner dying or going silent aborts the block with ``LearnerFailed``
(engine/coordinator/recovery.py resumes the run from its newest checkpoint); an ErrorReport or too many worker
restarts abort it with ``ActorFailed`` naming the actor and the tail of its log. No exception group leaves this
module: the TaskGroup's failures come out as one exception (``_one_error``), an ``ActorFailed`` when an actor
failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from engine.coordinator.launch import is_elastic, learner_command, learner_env, write_join_info
from configs.schema import RunConfig, TransportConfig
from engine.coordinator.buffer import GroupBuffer
from engine.coordinator.inbox import WorkerJoined, WorkerLost
from engine.coordinator.procs import Child, python_module, respawn, spawn, stop_all
from engine.backends import simulate
from engine.backends.registry import worker_module
from engine.coordinator.rollouts import Rollouts
from engine.data.tokenizer import load_tokenizer
from engine.data.tasks import generation_limit
from transport import (CheckpointSaved, ErrorReport, FetchWeights, Hello, Hub, Judged, ResponseChunk, SaveCheckpoint,
                       Scored, Shutdown, TrainBatch, TrainResult, WeightsLoaded)
from transport import DropWeightGroup, WeightsSending, WeightsWanted  # rollout.weight_sync=distributed
from transport.curve import CurveKeys, server_keys

log = structlog.get_logger()


class ActorFailed(RuntimeError):
    """An actor died, went silent or reported an error; the run cannot continue."""


class LearnerFailed(ActorFailed):
    """The learner group (torchrun or one of its ranks) died or went silent: resume from a checkpoint."""


def _one_error(group: BaseExceptionGroup) -> BaseException:
    """The one exception a failed ``start_actors`` block raises for its TaskGroup's group of failures: a
    LearnerFailed when every failure is one (recovery.py resumes), else an ActorFailed naming every actor that
    failed, else the first failure itself (a bug: its own traceback); any other failure becomes a note on it."""
    leaves: list[BaseException] = []
    stack = [group]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack[:0] = list(e.exceptions)
        else:
            leaves.append(e)
    actors = [e for e in leaves if isinstance(e, ActorFailed)]
    if actors and all(isinstance(e, LearnerFailed) for e in leaves):
        return actors[0]
    if actors:
        one = actors[0] if len(actors) == 1 else ActorFailed("\n".join(str(e) for e in actors))
        others = [e for e in leaves if not isinstance(e, ActorFailed)]
    else:
        one, others = leaves[0], leaves[1:]
    for e in others:
        one.add_note(f"also failed: {type(e).__name__}: {e}")
    return one


@dataclass
class Faults:
    """Failures survived so far in this run, carried across learner restarts (engine/coordinator/recovery.py)."""

    actor_restarts: int = 0  # rollout/reward workers restarted (transport.max_actor_restarts per run)
    learner_restarts: int = 0
    frames_rejected: int = 0  # by hubs that are closed already
    # peers every hub of this run has forgotten -> last sequence number (transport Hub ``retired``): a Hello
    # replayed after a learner recovery, to the next hub on the same port, is refused as a replay
    retired_peers: collections.OrderedDict = field(default_factory=collections.OrderedDict)


class Learner:
    """Handle on learner rank 0 (the other ranks follow it over torch.distributed)."""

    def __init__(self, hub: Hub, peer: str) -> None:
        self._hub, self._peer = hub, peer
        self._pending: asyncio.Future | None = None
        self.weight_groups: dict[str, str] = {}  # weight_sync=distributed: group name -> the worker peer it serves

    async def train(self, batch: TrainBatch) -> TrainResult:
        return await self._call(batch)

    async def checkpoint(self, step: int, path: str) -> CheckpointSaved:
        return await self._call(SaveCheckpoint(step=step, path=path))

    async def _call(self, msg):
        self._pending = asyncio.get_running_loop().create_future()
        await self._hub.send(self._peer, msg)
        try:
            return await self._pending
        finally:
            self._pending = None

    async def forward_wanted(self, worker: str, msg: WeightsWanted | DropWeightGroup) -> None:
        """rollout.weight_sync=distributed: a worker's request (or drop) to rank 0; its group's answer goes back to
        ``worker`` (``sending_to``)."""
        if isinstance(msg, WeightsWanted):
            self.weight_groups[msg.group_name] = worker
        else:
            self.weight_groups.pop(msg.group_name, None)
        await self._hub.send(self._peer, msg)

    def sending_to(self, msg: WeightsSending) -> str | None:
        return self.weight_groups.get(msg.group_name)

    async def drop_groups(self, worker: str) -> None:
        """A lost worker: rank 0 drops its server's groups."""
        for name in [g for g, w in self.weight_groups.items() if w == worker]:
            await self.forward_wanted(worker, DropWeightGroup(group_name=name))

    def on_result(self, msg: TrainResult | CheckpointSaved) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_result(msg)
        else:
            log.warning("learner.unexpected_result", step=msg.step)


class Supervisor:
    """Owns the actor processes: which peer each one is, and restarts of rollout and reward workers.

    A child that exited, or whose peer sent nothing for transport.peer_timeout_s, has failed. A failed rollout
    or reward worker is killed (its whole session) and started again, up to transport.max_actor_restarts
    times per run; the learner failing raises LearnerFailed (engine/coordinator/recovery.py rolls the run back to a checkpoint).
    """

    def __init__(self, hub: Hub, children: list[Child], *, max_restarts: int, faults: Faults | None = None) -> None:
        self._hub, self._max_restarts = hub, max_restarts
        self.children = {c.name: c for c in children}
        self.peer_of: dict[str, str] = {}  # child name -> peer id of its current process
        self.faults = faults or Faults()

    @property
    def num_restarts(self) -> int:
        return self.faults.actor_restarts

    def impostor(self, peer: str, msg: Hello) -> bool:
        """A Hello naming one of our children (``reward-0``) from a process that is not that child (a replayed or
        forged Hello): refused and its connection forgotten, so it takes no work and no real worker is replaced."""
        name = "learner" if msg.role == "learner" else f"{msg.role}-{msg.worker_id}"
        child = self.children.get(name)
        if child is None or name == "learner" or msg.pid == child.popen.pid:
            return False
        log.warning("actor.hello_refused", name=name, peer=peer, pid=msg.pid, child_pid=child.popen.pid,
                    why="a Hello for one of this run's children from another process (a worker started by hand "
                        "takes a --worker-id that no child of the run has)")
        self._hub.forget(peer)
        return True

    def joined(self, peer: str, msg: Hello) -> str | None:
        """Record ``peer`` as ``msg``'s actor; returns the peer id of a connection it replaces: the same process
        joining again (``everyprompt-rollout-worker --rejoin-s``) before its old connection timed out here. That
        one is forgotten, and the caller re-queues its work."""
        name = "learner" if msg.role == "learner" else f"{msg.role}-{msg.worker_id}"
        old = self.peer_of.get(name)
        stale = old if old not in (None, peer) and getattr(self._hub.peers.get(old), "pid", None) == msg.pid else None
        if stale is not None:
            self._hub.forget(stale)
        self.peer_of[name] = peer
        log.info("actor.joined", name=name, pid=msg.pid, **({"replaces": stale} if stale else {}))
        return stale

    def standalone(self) -> set[str]:
        """Peer ids of workers that joined on their own (not our children)."""
        return {p for n, p in self.peer_of.items() if n not in self.children}

    def failures(self) -> list[tuple[str, str]]:
        """(child name, why) for every child that exited or went silent."""
        silent = set(self._hub.dead_peers())
        out = [(n, f"exited with code {c.exited()}") for n, c in self.children.items() if c.exited() is not None]
        out += [(n, f"sent nothing for transport.peer_timeout_s={self._hub.peer_timeout_s}s")
                for n, p in self.peer_of.items() if p in silent and all(n != m for m, _ in out)]
        return out

    async def restart(self, name: str, why: str) -> list[str]:
        """Start ``name`` again; returns the peer ids of the failed process (none if it never said Hello; several
        for a process that hosts many workers, such as the simulator's ``sim-workers-<i>``), whose work the caller
        re-queues. A worker that joined on its own (everyprompt-rollout-worker started by hand) is not ours to
        restart: it is only dropped."""
        if name not in self.children:
            log.warning("actor.lost", name=name, why=why)
            old_peer = self.peer_of.pop(name)
            self._hub.forget(old_peer)
            return [old_peer]
        child = self.children[name]
        if name == "learner":
            raise LearnerFailed(f"learner {why}; see {child.log_path}. Last lines:\n{child.log_tail()}")
        if self.num_restarts >= self._max_restarts:
            raise ActorFailed(f"{name} {why} (restarts used: {self.num_restarts} of transport.max_actor_restarts="
                              f"{self._max_restarts}); see {child.log_path}. Last lines:\n{child.log_tail()}")
        log.warning("actor.restarting", name=name, why=why, log=str(child.log_path))
        hosted = [n for n, p in self.peer_of.items()  # the workers this process hosted, by their own names
                  if n != name and getattr(self._hub.peers.get(p), "pid", None) == child.popen.pid]
        self.children[name] = await asyncio.to_thread(respawn, child)
        self.faults.actor_restarts += 1
        old_peers = [p for n in [name, *hosted] if (p := self.peer_of.pop(n, None)) is not None]
        for p in old_peers:
            self._hub.forget(p)
        return old_peers


@dataclass
class Actors:
    rollouts: Rollouts
    buffer: GroupBuffer  # rollouts.buffer
    learner: Learner
    supervisor: Supervisor
    hub: Hub | None = None

    def counters(self) -> dict[str, int]:
        faults, load = self.supervisor.faults, self.hub.load() if self.hub else {}
        return {"buffered_groups": len(self.buffer), "actor_restarts": faults.actor_restarts,
                "learner_restarts": faults.learner_restarts, **load,
                "frames_rejected": faults.frames_rejected + load.get("frames_rejected", 0),
                **self.buffer.last_take, **self.rollouts.counters.metrics()}


def _curve(tc: TransportConfig) -> CurveKeys | None:
    return server_keys(tc.curve_keys_dir) if tc.curve_keys_dir else None


def _postprocess_work(cfg: RunConfig):
    """What the post-processing pool does to a finished response: detokenize it (sim: the cost model's time)."""
    if cfg.rollout.backend == "sim":
        return simulate.detokenize_work(cfg.sim)
    tokenizer = load_tokenizer(cfg.model)
    return lambda token_ids: tokenizer.decode(token_ids.tolist())


def _spawn_all(cfg: RunConfig, run_dir: Path, endpoint: str, init_dir: str, resume: str | None,
               rdzv_endpoint: str = "") -> list[Child]:
    config_path, logs = str(run_dir / "config.yaml"), run_dir / "logs"
    common = ["--endpoint", endpoint, "--config", config_path]
    children = []
    worker = worker_module(cfg.rollout.backend)  # which process runs this backend's workers (the backend registry)
    if cfg.rollout.backend == "sim":  # many simulated workers per process (engine/backends/sim.py)
        per = cfg.sim.workers_per_process
        for first in range(0, cfg.rollout.num_workers, per):
            count = min(per, cfg.rollout.num_workers - first)
            children.append(spawn(f"sim-workers-{first}", python_module(
                worker, *common, "--worker-id", str(first), "--count", str(count)), log_dir=logs))
    for i in range(cfg.rollout.num_workers if cfg.rollout.backend != "sim" else 0):
        children.append(spawn(f"rollout-{i}", python_module(worker, *common, "--worker-id", str(i),
                                                               "--init", init_dir), log_dir=logs,
                              env={"OMP_NUM_THREADS": str(cfg.rollout.threads_per_worker)}))
    for i in range(cfg.reward.num_workers):
        children.append(spawn(f"reward-{i}", python_module("actors.reward_worker", *common, "--worker-id", str(i),
                                                             "--init", init_dir),  # the default judge model
                              log_dir=logs, env={"OMP_NUM_THREADS": "1"}))
    if cfg.sim.learner:  # the simulated learner (benchmarks): same protocol, cost-model time
        children.append(spawn("learner", python_module("actors.sim_learner", *common, "--weights-dir",
                                                       str(run_dir / "weights")), log_dir=logs))
        return children
    argv = learner_command(cfg, config_path=config_path, endpoint=endpoint, init_dir=init_dir,
                           weights_dir=str(run_dir / "weights"), master_port=cfg.learner.master_port, resume=resume,
                           run_dir=str(run_dir), rdzv_endpoint=rdzv_endpoint)
    children.append(spawn("learner", argv, log_dir=logs, env=learner_env(cfg)))
    write_join_info(run_dir, cfg, endpoint=endpoint, learner_argv=argv if rdzv_endpoint else None, init_dir=init_dir)
    return children


async def _wait_for_hellos(hub: Hub, cfg: RunConfig, sup: Supervisor) -> dict[str, list[str]]:
    """Every actor connected; a child that dies while starting fails the run (its log says why)."""
    want = {"rollout": cfg.rollout.num_workers, "reward": cfg.reward.num_workers, "learner": 1}
    joined: dict[str, list[tuple[int, str]]] = {role: [] for role in want}
    deadline = time.monotonic() + cfg.transport.start_timeout_s
    while any(len(joined[r]) < n for r, n in want.items()):
        for name, c in sup.children.items():
            if c.exited() is not None:
                failed = LearnerFailed if name == "learner" else ActorFailed  # a learner start is retried
                raise failed(f"{name} exited with code {c.exited()} while starting; see {c.log_path}. "
                             f"Last lines:\n{c.log_tail()}")
        if time.monotonic() > deadline:
            missing = {r: n - len(joined[r]) for r, n in want.items() if len(joined[r]) < n}
            raise ActorFailed(f"actors {missing} did not connect within transport.start_timeout_s="
                              f"{cfg.transport.start_timeout_s}; see the logs in {cfg.out_dir}/{cfg.name}/logs")
        try:
            peer, msg = await hub.recv(timeout=0.5)
        except TimeoutError:
            continue
        if isinstance(msg, Hello) and msg.role in joined and not sup.impostor(peer, msg):
            joined[msg.role].append((msg.worker_id, peer))
            sup.joined(peer, msg)
        elif isinstance(msg, ErrorReport):
            raise ActorFailed(f"{msg.where} failed while starting:\n{msg.error}")
    return {role: [p for _, p in sorted(peers)] for role, peers in joined.items()}


async def _pump(hub: Hub, a: Actors) -> None:
    """Route every incoming message and restart failed workers. Runs for the whole block."""
    inbox = a.rollouts.inbox  # the producer's messages, in arrival order (loop.py::continuous_rollouts)
    while True:
        try:
            peer, msg = await hub.recv(timeout=1.0)
        except TimeoutError:
            peer, msg = None, None
        match msg:
            case ResponseChunk() | Scored() | Judged() | WeightsLoaded() | FetchWeights():
                inbox.put(peer, msg)
            case TrainResult() | CheckpointSaved():
                a.learner.on_result(msg)
            case WeightsWanted() | DropWeightGroup():  # rollout.weight_sync=distributed (engine/backends/sglang_sync.py)
                await a.learner.forward_wanted(peer, msg)
            case WeightsSending():
                if (worker := a.learner.sending_to(msg)) is not None:
                    await hub.send(worker, msg)
            case Hello(role="learner"):  # torchrun restarted the group (elastic: a rank died, a node came or left)
                raise LearnerFailed(f"the learner group restarted (worker {msg.worker_id}, pid {msg.pid}): "
                                    "resuming the run from its newest checkpoint")
            case Hello() if a.supervisor.impostor(peer, msg):
                pass
            case Hello():  # a restarted worker, or one started by hand (everyprompt-rollout-worker)
                role = "rollout" if msg.role == "rollout" else "reward"
                if (stale := a.supervisor.joined(peer, msg)) is not None:
                    inbox.put(stale, WorkerLost(role=role))
                    await a.learner.drop_groups(stale)
                inbox.put(peer, WorkerJoined(role=role))
            case ErrorReport():
                raise ActorFailed(f"{msg.where} reported an error:\n{msg.error}")
            case None:
                pass
            case _:
                log.warning("coordinator.unexpected_message", type=type(msg).__name__, peer=peer)
        for name, why in a.supervisor.failures():
            for old_peer in await a.supervisor.restart(name, why):
                inbox.put(old_peer, WorkerLost(role="reward" if name.startswith("reward") else "rollout"))
                await a.learner.drop_groups(old_peer)


@contextlib.asynccontextmanager
async def start_actors(cfg: RunConfig, run_dir: Path, init_dir: str, *, produce: Callable[[Rollouts], Awaitable[None]],
                       resume_learner: str | None = None, faults: Faults | None = None, rdzv_endpoint: str = ""):
    """Every process up and connected, ``produce(rollouts)`` (the producer loop) running next to the pump; on exit
    (normal, error or Ctrl-C) every process stopped. With ``resume_learner`` the learner continues from that
    checkpoint directory. ``faults`` counts across calls. Raises one exception, never a group (``_one_error``)."""
    faults = faults if faults is not None else Faults()
    hub = Hub(host=cfg.transport.host, port=cfg.transport.port, heartbeat_s=cfg.transport.heartbeat_s,
              peer_timeout_s=cfg.transport.peer_timeout_s, max_frame_bytes=cfg.transport.max_frame_bytes,
              hwm=cfg.transport.hwm, curve=_curve(cfg.transport), insecure=cfg.transport.insecure,
              retired=faults.retired_peers)
    await hub.start()
    children: list[Child] = []
    sup: Supervisor | None = None
    rollouts: Rollouts | None = None
    failing = recovering = False  # recovering: a LearnerFailed, so recovery.py starts the actors again
    try:
        children = _spawn_all(cfg, run_dir, hub.endpoint, init_dir, resume_learner, rdzv_endpoint)
        sup = Supervisor(hub, children, max_restarts=cfg.transport.max_actor_restarts, faults=faults)
        peers = await _wait_for_hellos(hub, cfg, sup)
        rollouts = Rollouts(hub, rollout=cfg.rollout, train=cfg.train, max_new_tokens=generation_limit(cfg.task),
                            workers=peers["rollout"], rewards=peers["reward"], postprocess=_postprocess_work(cfg),
                            judge=cfg.reward.plugin == "judge")
        actors = Actors(rollouts=rollouts, buffer=rollouts.buffer, learner=Learner(hub, peers["learner"][0]),
                        supervisor=sup, hub=hub)
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(_pump(hub, actors), name="coordinator.pump")
            producer = tg.create_task(produce(rollouts), name="coordinator.producer")
            yield actors
            pump.cancel()
            producer.cancel()
    except BaseExceptionGroup as group:  # from the TaskGroup: one exception goes to the caller
        failing = True
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # Ctrl-C (or SIGTERM) wins over what it made the actors do:
            log.warning("actors.failed_while_cancelled", error=str(_one_error(group)))  # 3.11's TaskGroup would
            raise asyncio.CancelledError from None  # raise their errors and drop the cancellation
        error = _one_error(group)
        recovering = isinstance(error, LearnerFailed)
        raise error from None
    except BaseException as error:
        failing, recovering = True, isinstance(error, LearnerFailed)
        raise
    finally:
        if rollouts is not None:  # its background admission on every way out (done, failed, Ctrl-C)
            await rollouts.stop()
        # An elastic learner that exits cleanly closes its rendezvous for good (torchrun's "job done"), and the
        # agents on other nodes could never rejoin: on the way to a recovery it is stopped by a signal instead.
        keep_rdzv = failing and is_elastic(cfg) and sup is not None and "learner" in sup.children
        if keep_rdzv:
            await asyncio.to_thread(stop_all, [sup.children["learner"]], grace_s=0.0)
        # Workers started by hand are not told to stop on the way to a recovery: they lose this hub and join the
        # next one on the same transport.port (everyprompt-rollout-worker --rejoin-s).
        keep = sup.standalone() if recovering and sup is not None else set()
        for peer in [p for p in hub.peers if p not in keep]:
            with contextlib.suppress(Exception):
                await hub.send(peer, Shutdown(reason="run finished"))
        await asyncio.to_thread(stop_all, list(sup.children.values()) if sup else children)
        faults.frames_rejected += sum(hub.rejected.values())
        await hub.close()
