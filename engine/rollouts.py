"""The coordinator's view of generation: admission, group assembly, scoring and evaluation.

consumes: Completion (rollout workers), Scored (reward workers), WeightsLoaded (rollout workers)
produces: GenerateRequest, ScoreRequest, LoadWeights; complete groups into the GroupBuffer
waits for: capacity (pacing), so that no group waits longer than the staleness bound allows

Pacing is by version, not by count: groups are trained in order of admission (oldest first), ``groups_per_step``
at a time, so the k-th admitted group trains at step k // groups_per_step + 1. Admitting it only once the weights
sent to the workers have version >= that step - 1 - max_policy_lag (workers apply weights before the requests
queued behind them) bounds the staleness of every token without discarding samples in steady state. Any group
that is discarded anyway (see GroupBuffer) is replaced. Every sample is scored as soon as it arrives.
"""

from __future__ import annotations

import asyncio
import itertools
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


class Rollouts:
    def __init__(self, hub: Hub, *, workers: list[str], rewards: list[str], buffer: GroupBuffer,
                 group_size: int, temperature: float, max_new_tokens: int, groups_per_step: int,
                 max_policy_lag: int) -> None:
        self._hub, self._workers, self._rewards, self._buffer = hub, workers, rewards, buffer
        self._group_size, self._temperature, self._max_new_tokens = group_size, temperature, max_new_tokens
        self._groups_per_step, self._max_policy_lag = groups_per_step, max_policy_lag
        self.sent_version = 0  # newest weights sent to every worker
        self._inflight: dict[str, Group] = {}  # group_id -> group being generated or scored
        self._assigned: dict[str, str] = {}  # group_id -> worker peer id
        self._eval_results: dict[str, asyncio.Future] = {}
        self._reward_rr = itertools.cycle(rewards)
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
        worker = min(self._workers, key=self._outstanding_samples)  # least-loaded; a group stays on one worker
        prompt = np.asarray(item.prompt_ids, dtype=np.int32)
        self._inflight[group_id] = Group(group_id=group_id, prompt_id=item.prompt_id, prompt_ids=prompt,
                                         answer=item.answer, num_samples=num_samples)
        self._assigned[group_id] = worker
        await self._hub.send(worker, GenerateRequest(
            group_id=group_id, prompt_id=item.prompt_id, prompt_ids=prompt, num_samples=num_samples,
            max_new_tokens=self._max_new_tokens, temperature=temperature))

    def _outstanding_samples(self, worker: str) -> int:
        return sum(g.num_samples - len(g.samples) for gid, g in self._inflight.items()
                   if self._assigned.get(gid) == worker)

    async def on_completion(self, msg: Completion) -> None:
        group = self._inflight.get(msg.group_id)
        if group is None or msg.sample_index in group.samples:
            log.warning("rollouts.unexpected_completion", group_id=msg.group_id, sample_index=msg.sample_index)
            return
        group.samples[msg.sample_index] = Sample(
            sample_index=msg.sample_index, token_ids=msg.token_ids, behavior_logprobs=msg.behavior_logprobs,
            token_versions=msg.token_versions, finish_reason=msg.finish_reason)
        self.num_generated_tokens += len(msg.token_ids)
        self.num_generated_samples += 1
        await self._hub.send(next(self._reward_rr), ScoreRequest(
            sample_key=f"{msg.group_id}/{msg.sample_index}", token_ids=msg.token_ids, answer=group.answer))

    def on_scored(self, msg: Scored) -> None:
        group_id, _, index = msg.sample_key.rpartition("/")
        group = self._inflight.get(group_id)
        sample = group.samples.get(int(index)) if group is not None else None
        if sample is None or sample.reward is not None:
            log.warning("rollouts.unexpected_score", sample_key=msg.sample_key)
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
        self.sent_version = max(self.sent_version, msg.version)
        self.capacity_freed()

    def on_weights_loaded(self, peer: str, msg: WeightsLoaded) -> None:
        self.worker_versions[peer] = max(self.worker_versions.get(peer, 0), msg.version)
        self._versions_changed.set()

    async def wait_weights(self, version: int) -> None:
        while min(self.worker_versions.values()) < version:
            self._versions_changed.clear()
            await self._versions_changed.wait()

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
