"""The staleness bound on samples still in flight: cancel them at once, then regenerate them or drop their group.

When new weights go out (version v), every later step trains with weights >= v and accepts no token older than
v - ``train.max_staleness``: an unfinished or unscored sample already holding one is doomed, so it is cancelled at
once and generated again from its prompt (``train.stale_policy=regenerate``) or its group dropped (``drop``;
admission replaces it with a new prompt). Groups found over the bound at training time (a slow worker, the
GroupBuffer's ``StaleHandler``) get the same policy. Every case is counted.
produces: CancelRequest, ContinueRequest (through engine/coordinator/dispatch.py)
"""

from __future__ import annotations

import structlog

from configs.schema import TrainConfig
from engine.coordinator.admission import Admission
from engine.coordinator.buffer import Group, Sample
from engine.coordinator.counters import RolloutCounters
from engine.coordinator.dispatch import Dispatcher
from engine.coordinator.evals import Evaluations
from engine.coordinator.inflight import InFlight
from engine.coordinator.scoring import Scoring

log = structlog.get_logger()


class Staleness:
    def __init__(self, train: TrainConfig, inflight: InFlight, dispatch: Dispatcher, scoring: Scoring,
                 admission: Admission, evals: Evaluations, counters: RolloutCounters) -> None:
        self._policy, self._max_staleness = train.stale_policy, train.max_staleness
        self._inflight, self._dispatch, self._scoring = inflight, dispatch, scoring
        self._admission, self._evals, self._counters = admission, evals, counters

    async def over_bound(self, groups: list[Group], min_version: int) -> None:
        """Groups that hold a token older than ``min_version``: regenerate their stale samples, or drop them."""
        for g in groups:
            self._inflight.groups[g.group_id] = g  # back in flight (regenerate) or about to be forgotten (drop)
            await self._handle(g, [s for s in g.samples.values() if s.min_version < min_version])

    async def cancel_doomed(self) -> None:
        """After new weights went out: act on doomed in-flight samples now, not when they finish."""
        floor = self._admission.sent_version - self._max_staleness
        for g in [g for gid, g in self._inflight.groups.items() if gid not in self._evals]:
            doomed = [s for s in g.samples.values() if s.length and s.min_version < floor]
            if doomed:
                await self._handle(g, doomed)

    async def _handle(self, g: Group, stale: list[Sample]) -> None:
        c = self._counters
        c.samples_over_bound += len(stale)
        c.cancelled_samples += await self._dispatch.cancel([(g.group_id, s.sample_index) for s in stale])
        if self._policy == "drop":
            for i in range(g.num_samples):
                self._dispatch.disown((g.group_id, i))
                self._scoring.forget(g.group_id, i)
            del self._inflight.groups[g.group_id]
            c.discarded_samples += g.num_samples
            self._admission.dropped()
            log.warning("rollouts.dropped_stale_group", group_id=g.group_id, prompt_id=g.prompt_id)
            return
        for s in stale:  # regenerate from the prompt under the newest weights
            self._scoring.forget(g.group_id, s.sample_index)
            s.reset()
            c.regenerated_samples += 1
        await self._dispatch.samples(g, [s.sample_index for s in stale])
