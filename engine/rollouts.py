"""The coordinator's view of generation: admission, group assembly, scoring and evaluation.

consumes: Completion (rollout workers), Scored (reward workers), WeightsLoaded (rollout workers)
produces: GenerateRequest, ScoreRequest, LoadWeights; complete groups into the GroupBuffer
waits for: capacity (pacing), so that no group waits longer than the staleness bound allows

Pacing is by version, not by count: groups are trained in order of admission (oldest first), ``groups_per_step``
at a time, so the k-th admitted group trains at step k // groups_per_step + 1. Admitting it only once the weights
sent to the workers have version >= that step - 1 - max_policy_lag (workers apply weights before the requests
queued behind them) bounds the staleness of every token without discarding samples in steady state. Any group
that is discarded anyway (see GroupBuffer) is replaced. Every sample is scored as soon as it arrives.

Nothing is lost with an actor: when engine/cluster.py declares a rollout worker dead, each of its unfinished
groups is generated again, whole, on a live worker (a group lives on one worker); when a reward worker dies, its
unanswered score requests go to another one. Replies that the dead actor still had in flight are ignored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import structlog

from engine.buffer import Group, GroupBuffer, Sample
from transport import Completion, GenerateRequest, Hub, LoadWeights, ScoreRequest, Scored, WeightsLoaded

log = structlog.get_logger()


@dataclass
class PromptItem:
    prompt_id: int
    prompt_ids: list[int]
    answer: str


def _checked_routes(msg: Completion) -> np.ndarray | None:
    """The completion's response routes, or None when it has none (or ones that do not fit its tokens)."""
    routes = msg.routes
    if routes.ndim != 3 or routes.shape[1] == 0:
        return None
    if len(routes) != max(len(msg.token_ids) - 1, 0):
        log.warning("rollouts.bad_routes", group_id=msg.group_id, sample_index=msg.sample_index,
                    routes=list(routes.shape), tokens=len(msg.token_ids))
        return None
    return routes


class Rollouts:
    def __init__(self, hub: Hub, *, workers: list[str], rewards: list[str], buffer: GroupBuffer,
                 group_size: int, temperature: float, max_new_tokens: int, groups_per_step: int,
                 max_policy_lag: int, return_routes: bool = False) -> None:
        self._hub, self._workers, self._rewards, self._buffer = hub, workers, rewards, buffer
        self._group_size, self._temperature, self._max_new_tokens = group_size, temperature, max_new_tokens
        self._groups_per_step, self._max_policy_lag = groups_per_step, max_policy_lag
        self._return_routes = return_routes
        self.sent_version = 0  # newest weights sent to every worker
        self._inflight: dict[str, Group] = {}  # group_id -> group being generated or scored
        self._assigned: dict[str, str] = {}  # group_id -> worker peer id
        self._eval_results: dict[str, asyncio.Future] = {}
        self._scoring: dict[str, tuple[str, ScoreRequest]] = {}  # sample_key -> (reward peer, request)
        self._unsent_scores: list[ScoreRequest] = []  # while no reward worker is alive
        self._num_scored = 0  # round-robin position over reward workers
        self._unassigned: list[str] = []  # groups waiting for a live worker
        self._latest_weights: LoadWeights | None = None
        self.num_requeued_groups = 0
        self.num_requeued_scores = 0
        self._capacity_freed = asyncio.Event()
        self.worker_versions: dict[str, int] = {w: 0 for w in workers}
        self._versions_changed = asyncio.Event()
        self.num_generated_tokens = 0
        self.num_generated_samples = 0
        self.num_submitted_groups = 0
        self._admit_task: asyncio.Task | None = None

    # ---- RL groups ---------------------------------------------------------------------------------------

    def start(self, prompts: Iterator[PromptItem], *, total_groups: int) -> None:
        """Keep generating groups in the background, paced by capacity, until ``total_groups`` are admitted."""
        self._admit_task = asyncio.create_task(self._admit(prompts, total_groups), name="rollouts.admit")

    async def _admit(self, prompts: Iterator[PromptItem], total_groups: int) -> None:
        while (admitted := self.num_submitted_groups - self._buffer.num_discarded_stale) < total_groups:
            if admitted >= (self.sent_version + 1 + self._max_policy_lag) * self._groups_per_step:
                self._capacity_freed.clear()  # set by load_weights() and by discards
                await self._capacity_freed.wait()
                continue
            item = next(prompts)
            group_id = f"g{self.num_submitted_groups}"
            await self._submit(group_id, item, self._group_size, self._temperature)
            self.num_submitted_groups += 1

    def capacity_freed(self) -> None:
        self._capacity_freed.set()

    async def _submit(self, group_id: str, item: PromptItem, num_samples: int, temperature: float) -> None:
        self._inflight[group_id] = Group(group_id=group_id, prompt_id=item.prompt_id,
                                         prompt_ids=np.asarray(item.prompt_ids, dtype=np.int32), answer=item.answer,
                                         num_samples=num_samples, temperature=temperature)
        if self._workers:
            await self._send_group(group_id)
        else:  # every worker is being restarted: add_worker() hands it out (never wait here: see cluster._pump)
            self._unassigned.append(group_id)

    async def _send_group(self, group_id: str) -> None:
        g = self._inflight[group_id]
        worker = min(self._workers, key=self._outstanding_samples)  # least-loaded; a group stays on one worker
        self._assigned[group_id] = worker
        await self._hub.send(worker, GenerateRequest(
            group_id=group_id, prompt_id=g.prompt_id, prompt_ids=g.prompt_ids, num_samples=g.num_samples,
            max_new_tokens=self._max_new_tokens, temperature=g.temperature,
            return_routes=self._return_routes and g.temperature > 0))  # not for greedy evals

    def _outstanding_samples(self, worker: str) -> int:
        return sum(g.num_samples - len(g.samples) for gid, g in self._inflight.items()
                   if self._assigned.get(gid) == worker)

    async def on_completion(self, msg: Completion) -> None:
        group = self._inflight.get(msg.group_id)
        if group is None or msg.sample_index in group.samples:
            log.info("rollouts.ignored_completion", group_id=msg.group_id, sample_index=msg.sample_index)
            return
        group.samples[msg.sample_index] = Sample(
            sample_index=msg.sample_index, token_ids=msg.token_ids, behavior_logprobs=msg.behavior_logprobs,
            token_versions=msg.token_versions, finish_reason=msg.finish_reason,
            routes=_checked_routes(msg))
        if msg.prompt_routes.size and group.prompt_routes is None:
            group.prompt_routes = msg.prompt_routes
        self.num_generated_tokens += len(msg.token_ids)
        self.num_generated_samples += 1
        await self._score(ScoreRequest(sample_key=f"{msg.group_id}/{msg.sample_index}", token_ids=msg.token_ids,
                                       answer=group.answer))

    async def _score(self, req: ScoreRequest) -> None:
        if not self._rewards:
            self._unsent_scores.append(req)
            return
        peer = self._rewards[self._num_scored % len(self._rewards)]
        self._num_scored += 1
        self._scoring[req.sample_key] = (peer, req)
        await self._hub.send(peer, req)

    def on_scored(self, msg: Scored) -> None:
        self._scoring.pop(msg.sample_key, None)
        group_id, _, index = msg.sample_key.rpartition("/")
        group = self._inflight.get(group_id)
        sample = group.samples.get(int(index)) if group is not None else None
        if sample is None or sample.reward is not None:  # e.g. a group re-queued after its worker died
            log.info("rollouts.ignored_score", sample_key=msg.sample_key)
            return
        sample.reward, sample.valid, sample.reward_parts = msg.reward, msg.valid, dict(msg.reward_parts)
        if not group.complete:
            return
        del self._inflight[group_id]
        self._assigned.pop(group_id, None)
        if group_id in self._eval_results:
            self._eval_results.pop(group_id).set_result(group)
        else:
            self._buffer.put(group)

    # ---- weights -----------------------------------------------------------------------------------------

    async def load_weights(self, msg: LoadWeights) -> None:
        """Send new weights to every worker; each applies them before its next batch (no waiting here)."""
        for w in self._workers:
            await self._hub.send(w, msg)
        self._latest_weights = msg
        self.sent_version = max(self.sent_version, msg.version)
        self.capacity_freed()

    def on_weights_loaded(self, peer: str, msg: WeightsLoaded) -> None:
        self.worker_versions[peer] = max(self.worker_versions.get(peer, 0), msg.version)
        self._versions_changed.set()

    async def wait_weights(self, version: int) -> None:
        while not self.worker_versions or min(self.worker_versions.values()) < version:
            self._versions_changed.clear()
            await self._versions_changed.wait()

    # ---- membership: actors restarted by engine/cluster.py ------------------------------------------------

    async def add_worker(self, peer: str) -> None:
        """A (re)started rollout worker: bring it to the newest weights, then give it work."""
        self._workers.append(peer)
        self.worker_versions[peer] = 0
        if self._latest_weights is not None:
            await self._hub.send(peer, self._latest_weights)
        unassigned, self._unassigned = self._unassigned, []
        for group_id in unassigned:
            await self._send_group(group_id)

    async def remove_worker(self, peer: str) -> None:
        """A dead rollout worker: generate each of its unfinished groups again, whole, on a live worker."""
        self._workers.remove(peer)
        self.worker_versions.pop(peer, None)
        self._versions_changed.set()
        for group_id in [g for g, w in self._assigned.items() if w == peer]:
            group = self._inflight.pop(group_id)
            del self._assigned[group_id]
            for key in [k for k in self._scoring if k.rpartition("/")[0] == group_id]:
                del self._scoring[key]
            new_id = f"{group_id}.r{self.num_requeued_groups}"
            if group_id in self._eval_results:
                self._eval_results[new_id] = self._eval_results.pop(group_id)
            self.num_requeued_groups += 1
            item = PromptItem(prompt_id=group.prompt_id, prompt_ids=group.prompt_ids.tolist(), answer=group.answer)
            await self._submit(new_id, item, group.num_samples, group.temperature)

    async def add_reward(self, peer: str) -> None:
        self._rewards.append(peer)
        unsent, self._unsent_scores = self._unsent_scores, []
        for req in unsent:
            await self._score(req)

    async def remove_reward(self, peer: str) -> None:
        """A dead reward worker: send its unanswered requests to the others (or keep them for the next one)."""
        self._rewards.remove(peer)
        for _, req in [v for v in self._scoring.values() if v[0] == peer]:
            self.num_requeued_scores += 1
            await self._score(req)

    def counters(self) -> dict[str, int]:
        return {"requeued_groups": self.num_requeued_groups, "requeued_scores": self.num_requeued_scores}

    # ---- evaluation --------------------------------------------------------------------------------------

    async def evaluate(self, items: list[PromptItem], *, tag: str) -> dict[str, float]:
        """Greedy accuracy on fixed prompts, through the same workers and verifiers as training."""
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        futures = []
        for i, item in enumerate(items):
            group_id = f"eval-{tag}-{i}"
            self._eval_results[group_id] = fut = loop.create_future()
            futures.append(fut)
            await self._submit(group_id, item, 1, 0.0)
        groups = await asyncio.gather(*futures)
        correct = [g.samples[0].reward_parts.get("correct", g.samples[0].reward) for g in groups]
        return {"accuracy": float(np.mean(correct)), "eval_s": time.monotonic() - t0, "num_prompts": len(items)}

    async def stop(self) -> None:
        if self._admit_task is not None:
            self._admit_task.cancel()
            await asyncio.gather(self._admit_task, return_exceptions=True)
