"""The coordinator's side of the generative judge (reward.plugin=judge): whole groups out, judge margins back.

consumes: complete groups (engine/coordinator/loop.py, once every response is verified on its own), Judged (reward workers)
produces: JudgeRequest (one per group, round-robin over the live reward workers)

The judge needs a whole group (round-robin pairs, or every response against the same anchor), while responses are
verified one by one as they finish. So the coordinator, which already knows when a group is complete (top-ups
included), sends the group once; a reward worker judges it (engine/rewards/judge.py) and answers with one margin per
response. Those margins replace the rewards, and the ``judge_margin`` part tells engine/coordinator/batch.py to use the
tie-aware advantages. A request to a reward worker that dies is sent again to another one; an answer to an older
request (some responses regenerated since) is ignored.
"""

from __future__ import annotations

import numpy as np

from engine.coordinator.buffer import Group
from engine.rewards.judge import JUDGE_PART
from transport import Hub, JudgeRequest, Judged


class Judging:
    def __init__(self, hub: Hub, rewards: list[str]) -> None:
        self._hub, self._rewards = hub, rewards  # the live reward peers (the list scoring.py keeps)
        self._pending: dict[str, tuple[str | None, JudgeRequest]] = {}  # group_id -> (peer, request)
        self._num_sent = 0
        self.num_requests = 0  # JudgeRequests made (each one's request_id)
        self.num_requeued = 0  # sent again after their reward worker died

    @staticmethod
    def needs(g: Group) -> bool:
        """True when some response has no judge margin yet (new, topped up or regenerated)."""
        return not all(JUDGE_PART in s.reward_parts for s in g.ordered())

    async def request(self, g: Group) -> None:
        samples = g.ordered()
        lengths = [len(s.token_ids) for s in samples]
        self.num_requests += 1
        await self._send(JudgeRequest(
            group_id=g.group_id, prompt_ids=g.prompt_ids,
            token_ids=np.concatenate([s.token_ids for s in samples]).astype(np.int32),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
            sample_indices=[s.sample_index for s in samples], answer=g.answer,
            request_id=self.num_requests))

    async def _send(self, req: JudgeRequest) -> None:
        if not self._rewards:  # every reward worker is being restarted: requeue() sends it
            self._pending[req.group_id] = (None, req)
            return
        peer = self._rewards[self._num_sent % len(self._rewards)]
        self._num_sent += 1
        self._pending[req.group_id] = (peer, req)
        await self._hub.send(peer, req)

    def apply(self, g: Group, msg: Judged) -> bool:
        """Write the margins into the group's responses; False (nothing written) for an answer to an old request."""
        pending = self._pending.get(msg.group_id)
        if pending is None or pending[1].request_id != msg.request_id:
            return False
        del self._pending[msg.group_id]
        samples = g.ordered()
        assert [s.sample_index for s in samples] == msg.sample_indices, "a judged group changed under its request"
        for s, reward, valid in zip(samples, msg.rewards, msg.valid):
            s.reward, s.valid = reward, s.valid and valid
            s.reward_parts = {**s.reward_parts, **msg.parts, JUDGE_PART: reward}
        return True

    async def requeue(self, dead_peer: str | None) -> None:
        """Send again what a dead reward worker held (``None``: what waited for any reward worker)."""
        for peer, req in [v for v in self._pending.values() if v[0] == dead_peer]:
            self.num_requeued += dead_peer is not None
            await self._send(req)
