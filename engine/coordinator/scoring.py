"""Scoring and judging fan-out: finished responses to the reward workers, round-robin; rewards back into samples.

consumes: Scored (reward workers); finished responses (engine/coordinator/streams.py)
produces: ScoreRequest (through the post-processing path, engine/coordinator/postprocess.py); JudgeRequest for a
          complete group when reward.plugin=judge (engine/coordinator/judging.py)
waits for: a live reward worker (requests wait in ``_unsent`` while every one is being restarted)
"""

from __future__ import annotations

import structlog

from configs.schema import RolloutConfig
from engine.coordinator.buffer import Group
from engine.coordinator.counters import RolloutCounters
from engine.coordinator.inflight import InFlight, sample_key
from engine.coordinator.judging import Judging
from engine.coordinator.postprocess import ScorePath
from transport import Hub, Judged, ScoreRequest, Scored

log = structlog.get_logger()


class Scoring:
    def __init__(self, hub: Hub, rollout: RolloutConfig, rewards: list[str], inflight: InFlight,
                 counters: RolloutCounters, *, hold_limit: int, postprocess=None, judge: bool = False) -> None:
        self._hub, self._inflight, self._counters = hub, inflight, counters
        self.rewards = list(rewards)  # live reward workers (Judging shares this list)
        self._path = ScorePath(self.send, workers=rollout.postprocess_workers, overlap=rollout.reward_overlap,
                               work=postprocess, hold_limit=hold_limit)
        self.judging = Judging(hub, self.rewards) if judge else None  # reward.plugin=judge
        self._pending: dict[str, tuple[str, ScoreRequest]] = {}  # sample_key -> (reward peer, request)
        self._unsent: list[ScoreRequest] = []  # while no reward worker is alive
        self._num_sent = 0  # round-robin position over reward workers

    async def finished(self, req: ScoreRequest) -> None:
        """A response finished: post-process it, then score it (rollout.reward_overlap decides when)."""
        await self._path.finished(req, generating=self._inflight.num_generating)

    async def send(self, req: ScoreRequest) -> None:
        """Straight to the next reward worker."""
        if not self.rewards:
            self._unsent.append(req)
            return
        peer = self.rewards[self._num_sent % len(self.rewards)]
        self._num_sent += 1
        self._pending[req.sample_key] = (peer, req)
        await self._hub.send(peer, req)

    def answered(self, msg: Scored) -> Group | None:
        """Write the reward into its sample; the group when that completed it (None: more to come, or a score
        for a sample regenerated meanwhile, which is ignored)."""
        self._pending.pop(msg.sample_key, None)
        found = self._inflight.scored_sample(msg.sample_key)
        if found is None:
            log.info("rollouts.ignored_score", sample_key=msg.sample_key)
            return None
        group, sample = found
        sample.reward, sample.valid, sample.reward_parts = msg.reward, msg.valid, dict(msg.reward_parts)
        return group if group.complete else None

    def judged(self, msg: Judged) -> Group | None:
        """Write a complete group's judge margins (reward.plugin=judge); the group, now ready for the buffer
        (None: an answer to an older request, e.g. some responses were regenerated meanwhile)."""
        group = self._inflight.groups.get(msg.group_id)
        if group is None or not group.complete or self.judging is None or not self.judging.apply(group, msg):
            log.info("rollouts.ignored_judgement", group_id=msg.group_id)
            return None
        return group

    def forget(self, group_id: str, index: int) -> None:
        """The sample is regenerated or dropped: an answer to its request will be ignored."""
        self._pending.pop(sample_key(group_id, index), None)

    async def join(self, peer: str) -> None:
        self.rewards.append(peer)
        unsent, self._unsent = self._unsent, []
        for req in unsent:
            await self.send(req)
        if self.judging is not None:
            await self.judging.requeue(None)

    async def lose(self, peer: str) -> None:
        """A dead reward worker: send its unanswered requests to the others (or keep them for the next one)."""
        self.rewards.remove(peer)
        for _, req in [v for v in self._pending.values() if v[0] == peer]:
            self._counters.requeued_scores += 1
            await self.send(req)
        if self.judging is not None:
            await self.judging.requeue(peer)

    def close(self) -> None:
        self._path.close()
