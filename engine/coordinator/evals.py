"""Greedy evaluation through the same workers and verifiers as training: one future per eval group.

An eval group (one greedy sample of a fixed prompt) travels the producer's path like any other group, but is not
counted, not topped up, judged or cancelled as stale, and ends in its future instead of the buffer. The scores come
from engine/evaluation.py, the same functions ``everyprompt-eval`` uses on a saved policy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from engine.coordinator.buffer import Group
from engine.evaluation import correctness, score_eval


class Evaluations:
    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future] = {}  # group_id -> its eval's result

    def __contains__(self, group_id: str) -> bool:
        return group_id in self._futures

    async def run(self, items: list, *, tag: str, submit: Callable[[str, object], Awaitable[None]]) -> dict:
        """Greedy accuracy on ``items`` (PromptItems); ``submit(group_id, item)`` sends one greedy group."""
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        futures = []
        for i, item in enumerate(items):
            group_id = f"eval-{tag}-{i}"
            self._futures[group_id] = fut = loop.create_future()
            futures.append(fut)
            await submit(group_id, item)
        groups = await asyncio.gather(*futures)
        scores = score_eval([correctness(g.samples[0].reward, g.samples[0].reward_parts) for g in groups])
        return {**scores, "eval_s": time.monotonic() - t0}

    def resolve(self, group: Group) -> bool:
        """Hand a complete eval group to its eval; False when it is not an eval group."""
        fut = self._futures.pop(group.group_id, None)
        if fut is None:
            return False
        fut.set_result(group)
        return True
