"""The producer's parts, wired once: the coordinator's view of generation, scoring and evaluation.

engine/coordinator/loop.py::continuous_rollouts drives them (prompt -> dispatch/generate -> chunks -> score ->
top-up/judge -> buffer); each part has one job and its own module:

    admission.py      how many new prompts may go out now (paced by policy version: the staleness bound)
    zero_variance.py  adaptive group size and top-ups (pure)
    dispatch.py       which worker generates what; cancel; continue a lost worker's responses elsewhere
    workers.py        rollout worker membership, weights broadcast, versions and idle time
    relay.py          weights to workers over the transport, in chunks (rollout.weight_sync=relay)
    streams.py        chunks assembled into samples
    scoring.py        finished responses to reward workers; rewards back; the judge (judging.py)
    staleness.py      cancel, regenerate or drop samples over the staleness bound
    inflight.py       plain in-flight state;  evals.py  eval futures;  counters.py  the counters
    inbox.py          the producer's inbox, filled by the pump (engine/coordinator/cluster.py)

Responses arrive in chunks and are assembled as they stream, so the coordinator acts before they finish: doomed
samples are cancelled when new weights go out (staleness.py); a dead worker's partial responses continue on a live
worker from the tokens already received (dispatch.py); a checkpoint captures partial responses with their tokens,
log-probs, versions and routes (``state()``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass

from configs.schema import RolloutConfig, TrainConfig
from engine.coordinator.admission import Admission
from engine.coordinator.buffer import Group, GroupBuffer
from engine.coordinator.counters import RolloutCounters
from engine.coordinator.dispatch import Dispatcher
from engine.coordinator.evals import Evaluations
from engine.coordinator.inbox import Inbox
from engine.coordinator.inflight import InFlight, sample_key
from engine.coordinator.relay import WeightRelay
from engine.coordinator.schedule import LengthPredictor, Scheduler
from engine.coordinator.scoring import Scoring
from engine.coordinator.staleness import Staleness
from engine.coordinator.streams import Streams
from engine.coordinator.workers import RolloutWorkers
from engine.coordinator.zero_variance import ZeroVarianceSampler
from transport import Hub, LoadWeights, ScoreRequest


@dataclass
class PromptItem:
    prompt_id: int
    prompt_ids: list[int]
    answer: str
    source: str = ""  # per-source zero-variance statistics (adaptive group size)
    pass_rate: float | None = None  # an offline estimate (everyprompt-filter-pool), when the pool has one


def default_scheduler(rollout: RolloutConfig, max_new_tokens: int) -> Scheduler:
    return Scheduler(rollout.schedule, LengthPredictor(ema=rollout.length_ema, default=float(max_new_tokens)))


class Rollouts:
    """consumes: the inbox (ResponseChunk, Scored, Judged, WeightsLoaded, membership), LoadWeights (the trainer)
    produces: requests to rollout and reward workers; complete groups into ``buffer``
    waits for: capacity (admission), so that no token waits longer than the staleness bound allows"""

    def __init__(self, hub: Hub, *, rollout: RolloutConfig, train: TrainConfig, max_new_tokens: int,
                 workers: list[str], rewards: list[str], scheduler: Scheduler | None = None, postprocess=None,
                 judge: bool = False) -> None:
        self._temperature = rollout.temperature
        self.counters = RolloutCounters()
        self.inbox, self.inflight, self.evals = Inbox(), InFlight(), Evaluations()
        self.admission = Admission(train, self.counters)
        self.sampler = ZeroVarianceSampler(rollout, self.counters)
        self.workers = RolloutWorkers(hub, workers, relay=WeightRelay(hub, chunk_bytes=rollout.relay_chunk_bytes)
                                      if rollout.weight_sync == "relay" else None)
        self.dispatch = Dispatcher(hub, rollout, self.workers, self.inflight,
                                   scheduler or default_scheduler(rollout, max_new_tokens),
                                   max_new_tokens=max_new_tokens)
        self.streams = Streams(rollout, self.inflight, self.dispatch, self.evals, self.counters)
        self.scoring = Scoring(hub, rollout, rewards, self.inflight, self.counters, postprocess=postprocess,
                               hold_limit=train.groups_per_step * rollout.group_size, judge=judge)
        self.staleness = Staleness(train, self.inflight, self.dispatch, self.scoring, self.admission, self.evals,
                                   self.counters)
        self.buffer = GroupBuffer(self.staleness, order=train.buffer_order,
                                  staleness_weight=train.buffer_staleness_weight)
        self._tasks: list[asyncio.Task] = []

    def start(self, admitting: Coroutine) -> None:
        """Run ``admitting`` (loop.py::admit_prompts) in the background until stop()."""
        self._tasks.append(asyncio.create_task(admitting, name="rollouts.admit"))

    def admit(self, item: PromptItem) -> Group:
        """A new RL group for ``item``: counted, sized (adaptive N), in flight; not sent yet."""
        group_id = self.admission.admit()
        return self.inflight.add(group_id, prompt_id=item.prompt_id, prompt_ids=item.prompt_ids, answer=item.answer,
                                 num_samples=self.sampler.group_size(item.source, item.pass_rate),
                                 temperature=self._temperature, source=item.source)

    def deliver(self, g: Group) -> None:
        """A finished group leaves flight: to its eval, or to the buffer."""
        del self.inflight.groups[g.group_id]
        if not self.evals.resolve(g):
            self.buffer.put(g)

    async def load_weights(self, msg: LoadWeights) -> None:
        """Send new weights to every worker (no waiting); cancel what they make doomed; admit more."""
        await self.workers.broadcast(msg)
        self.admission.weights_sent(msg.version)
        await self.staleness.cancel_doomed()
        self.admission.wake()

    async def evaluate(self, items: list[PromptItem], *, tag: str) -> dict[str, float]:
        """Greedy accuracy on fixed prompts, through the same workers and verifiers as training."""
        return await self.evals.run(items, tag=tag, submit=self._submit_eval)

    async def _submit_eval(self, group_id: str, item: PromptItem) -> None:
        await self.dispatch.group(self.inflight.add(group_id, prompt_id=item.prompt_id, prompt_ids=item.prompt_ids,
                                                    answer=item.answer, num_samples=1, temperature=0.0,
                                                    source=item.source))

    def state(self) -> dict:
        """Everything needed to continue without losing or repeating a prompt: in-flight groups with their
        partial responses, the buffer, the prompt-stream frontier and the counters."""
        return {"inflight": [g for gid, g in self.inflight.groups.items() if gid not in self.evals],
                "buffer": self.buffer.groups(), "counts": self.counters.to_dict(),
                "sent_version": self.admission.sent_version}

    async def restore(self, state: dict) -> None:
        """Continue a checkpointed run: buffered groups go back to the buffer, partial responses continue where
        they stopped, finished but unscored responses are scored again."""
        self.counters.restore(state["counts"])
        self.admission.sent_version = state["sent_version"]
        for g in state["buffer"]:
            self.buffer.put(g)
        judging = self.scoring.judging
        for g in state["inflight"]:
            self.inflight.groups[g.group_id] = g
            for s in g.ordered():
                if not s.finished:
                    self.counters.continued_samples += 1
                    await self.dispatch.samples(g, [s.sample_index])
                elif s.reward is None:
                    await self.scoring.send(ScoreRequest(sample_key=sample_key(g.group_id, s.sample_index),
                                                         token_ids=s.token_ids, answer=g.answer))
            if g.complete and judging is not None and judging.needs(g):
                await judging.request(g)
            elif g.complete:
                self.deliver(g)

    async def stop(self) -> None:
        self.scoring.close()
        if self.workers.relay is not None:
            self.workers.relay.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
