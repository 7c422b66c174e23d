"""Admission: how many new prompts may go out now, paced by policy version so no token breaks the staleness bound.

Groups are trained oldest first, ``train.groups_per_step`` at a time, so the k-th admitted group trains at step
k // groups_per_step + 1 or later. Admitting it only once the weights sent to the workers have version >= that
step - 1 - ``train.max_staleness`` (workers apply new weights before admitting the requests queued behind them)
bounds the staleness of every token without discarding samples in steady state.

waits for: ``wake`` (after new weights went out) or a dropped group (``dropped``). No I/O.
"""

from __future__ import annotations

import asyncio

from configs.schema import TrainConfig
from engine.coordinator.counters import RolloutCounters


class Admission:
    def __init__(self, train: TrainConfig, counters: RolloutCounters) -> None:
        self._train, self._counters = train, counters
        self.sent_version = 0  # newest weights sent to every worker
        self._freed = asyncio.Event()

    async def room(self, total_groups: int) -> int:
        """Wait until some group may be admitted; how many may go out now (0: ``total_groups`` admitted)."""
        c, t = self._counters, self._train
        while c.admitted_groups < total_groups:
            limit = min((self.sent_version + 1 + t.max_staleness) * t.groups_per_step, total_groups)
            if c.admitted_groups < limit:
                return limit - c.admitted_groups
            self._freed.clear()
            await self._freed.wait()
        return 0

    def admit(self) -> str:
        """Count one admitted prompt; returns its group id."""
        self._counters.prompts_taken += 1
        self._counters.admitted_groups += 1
        return f"g{self._counters.prompts_taken}"

    def weights_sent(self, version: int) -> None:
        self.sent_version = max(self.sent_version, version)

    def wake(self) -> None:
        """Capacity may have grown (new weights went out): look again."""
        self._freed.set()

    def dropped(self) -> None:
        """A group was dropped (train.stale_policy=drop): admission replaces it with a new prompt."""
        self._counters.admitted_groups -= 1
        self._freed.set()
