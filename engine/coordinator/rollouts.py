"""The coordinator's view of generation: admission, streaming assembly of responses, scoring and evaluation.

consumes: ResponseChunk (rollout workers), Scored (reward workers), WeightsLoaded (rollout workers)
produces: GenerateRequest, ContinueRequest, CancelRequest, ScoreRequest, LoadWeights; complete groups into the
          GroupBuffer
waits for: capacity (pacing), so that no token waits longer than the staleness bound allows

Pacing is by version, not by count: groups are trained oldest first, ``groups_per_step`` at a time, so the k-th
admitted group trains at step k // groups_per_step + 1 or later. Admitting it only once the weights sent to the
workers have version >= that step - 1 - max_staleness (workers apply new weights before admitting the requests
queued behind them) bounds the staleness of every token without discarding samples in steady state.

Responses arrive in chunks and are assembled as they stream. That lets the coordinator act before they finish:
- when new weights go out, every unfinished or unscored sample already holding a token that no later step may
  train is cancelled at once and generated again (``stale_policy=regenerate``) or its group dropped (``drop``);
- a dead worker's partial responses continue on a live worker from the tokens already received
  (``ContinueRequest``): nothing generated is thrown away;
- a checkpoint captures partial responses with their tokens, log-probs, versions and routes (``state()``).
Groups found over the bound at training time (a slow worker) get the same policy. Every case is counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import structlog

from engine.coordinator.buffer import Group, GroupBuffer, Sample
from engine.coordinator.postprocess import ScorePath
from engine.algo.shaping import is_zero_variance
from engine.coordinator.schedule import Scheduler
from engine.coordinator.judging import Judging
from transport import (CancelRequest, ContinueRequest, GenerateRequest, Hub, Judged, LoadWeights, ResponseChunk,
                       ScoreRequest, Scored, WeightsLoaded)

log = structlog.get_logger()


@dataclass
class PromptItem:
    prompt_id: int
    prompt_ids: list[int]
    answer: str
    source: str = ""  # per-source zero-variance statistics (adaptive group size)
    pass_rate: float | None = None  # an offline estimate (everyprompt-filter-pool), when the pool has one


@dataclass
class Sampling:
    """The rollout stage of zero-variance elimination (engine/coordinator/rollouts.py): adaptive group size and top-ups,
    paid for from a budget of ``extra_sample_frac`` x the base samples (rollout.group_size per group)."""

    adaptive: bool = False  # raise N for prompts likely to come out zero-variance
    max_group_size: int = 16
    zv_target: float = 0.5  # raise N while the predicted zero-variance probability is above this
    top_up: int = 0  # extra samples for a group whose samples all agree in raw correctness (0 = off)
    extra_sample_frac: float = 0.25
    ema: float = 0.1  # weight of the newest group in the per-source zero-variance rate


def _chunk_routes(msg: ResponseChunk) -> np.ndarray | None:
    """The chunk's routes, or None when it has none (or ones that do not fit its tokens)."""
    routes = msg.routes
    if routes.ndim != 3 or routes.shape[1] == 0:
        return None
    if len(routes) not in (len(msg.token_ids), len(msg.token_ids) - 1 if msg.finish_reason else -1):
        log.warning("rollouts.bad_routes", group_id=msg.group_id, sample_index=msg.sample_index,
                    routes=list(routes.shape), tokens=len(msg.token_ids))
        return None
    return routes


class Rollouts:
    def __init__(self, hub: Hub, *, workers: list[str], rewards: list[str], buffer: GroupBuffer,
                 group_size: int, temperature: float, max_new_tokens: int, groups_per_step: int,
                 max_staleness: int, stale_policy: str = "regenerate", return_routes: bool = False,
                 sampling: Sampling = Sampling(), scheduler: Scheduler | None = None,
                 postprocess_workers: int = 0, reward_overlap: bool = True, postprocess=None) -> None:
        self._hub, self._workers, self._rewards, self._buffer = hub, workers, rewards, buffer
        self._group_size, self._temperature, self._max_new_tokens = group_size, temperature, max_new_tokens
        self._groups_per_step, self._max_staleness = groups_per_step, max_staleness
        self._stale_policy, self._return_routes = stale_policy, return_routes
        self._sampling = sampling
        self.source_zv: dict[str, float] = {}  # per-source EMA of the raw zero-variance rate
        self._topped_up: set[str] = set()
        self.sent_version = 0  # newest weights sent to every worker
        self._inflight: dict[str, Group] = {}  # group_id -> group being generated or scored
        self._owner: dict[tuple[str, int], str] = {}  # (group_id, sample_index) -> worker generating it
        self._sched = scheduler or Scheduler()  # which worker (engine/coordinator/schedule.py); its load tracks _owner
        for w in workers:
            self._sched.add_worker(w)
        self._load_of: dict[tuple[str, int], float] = {}  # (group_id, sample_index) -> what it adds to the load
        self._score_path = ScorePath(self._score, workers=postprocess_workers, overlap=reward_overlap,
                                     work=postprocess, hold_limit=groups_per_step * group_size)
        self._eval_results: dict[str, asyncio.Future] = {}
        self.judging: Judging | None = None  # reward.plugin=judge: complete groups are judged first (cluster.py)
        self._scoring: dict[str, tuple[str, ScoreRequest]] = {}  # sample_key -> (reward peer, request)
        self._unsent_scores: list[ScoreRequest] = []  # while no reward worker is alive
        self._num_scored = 0  # round-robin position over reward workers
        self._unassigned: list[tuple] = []  # requests waiting for a live worker
        self._latest_weights: LoadWeights | None = None
        self._capacity_freed = asyncio.Event()
        self.worker_versions: dict[str, int] = {w: 0 for w in workers}
        self.worker_time: dict[str, tuple[float, float]] = {}  # peer -> (idle, paused) fractions, last interval
        self._worker_clock: dict[str, tuple[float, float, float]] = {}  # peer -> (when, idle_s, paused_s) reported
        self._versions_changed = asyncio.Event()
        self.counts = {"generated_tokens": 0, "generated_samples": 0, "prompts_taken": 0, "admitted_groups": 0,
                       "samples_over_bound": 0, "regenerated_samples": 0, "discarded_samples": 0,
                       "continued_samples": 0, "requeued_scores": 0, "cancelled_samples": 0, "base_samples": 0,
                       "adaptive_extra_samples": 0, "top_up_samples": 0}
        self._admit_task: asyncio.Task | None = None

    @property
    def num_generated_tokens(self) -> int:
        return self.counts["generated_tokens"]

    # ---- RL groups ---------------------------------------------------------------------------------------

    def start(self, prompts: Iterator[PromptItem], *, total_groups: int) -> None:
        """Keep generating groups in the background, paced by capacity, until ``total_groups`` are admitted."""
        self._admit_task = asyncio.create_task(self._admit(prompts, total_groups), name="rollouts.admit")

    async def _admit(self, prompts: Iterator[PromptItem], total_groups: int) -> None:
        while self.counts["admitted_groups"] < total_groups:
            limit = min((self.sent_version + 1 + self._max_staleness) * self._groups_per_step, total_groups)
            if self.counts["admitted_groups"] >= limit:
                self._capacity_freed.clear()  # set by load_weights() and by drops
                await self._capacity_freed.wait()
                continue
            group_ids = []  # everything admissible now goes out together, in the scheduler's order
            while self.counts["admitted_groups"] < limit:
                item = next(prompts)
                self.counts["prompts_taken"] += 1
                self.counts["admitted_groups"] += 1
                group_ids.append(f"g{self.counts['prompts_taken']}")
                self._new_group(group_ids[-1], item, self._group_size_for(item), self._temperature)
            groups = [self._inflight[gid] for gid in group_ids]
            for i in self._sched.order([(g.prompt_id, g.source, g.num_samples) for g in groups]):
                await self._dispatch(("group", group_ids[i]))

    def capacity_freed(self) -> None:
        self._capacity_freed.set()

    def _extra_budget(self) -> int:
        c = self.counts
        spent = c["adaptive_extra_samples"] + c["top_up_samples"]
        return int(self._sampling.extra_sample_frac * c["base_samples"]) - spent

    def _group_size_for(self, item: PromptItem) -> int:
        """rollout.group_size, raised (within the extra-sample budget) for a prompt likely to come out
        zero-variance: by its offline pass rate p (P(all N agree) = p^N + (1-p)^N), else by its source's rate."""
        base, sp = self._group_size, self._sampling
        self.counts["base_samples"] += base
        if not sp.adaptive:
            return base
        if item.pass_rate is not None:
            p = item.pass_rate
            sizes = [n for n in range(base, sp.max_group_size + 1) if p ** n + (1 - p) ** n <= sp.zv_target]
            want = sizes[0] if sizes else sp.max_group_size
        else:
            want = sp.max_group_size if self.source_zv.get(item.source, 0.0) > sp.zv_target else base
        extra = max(min(want - base, self._extra_budget()), 0)
        self.counts["adaptive_extra_samples"] += extra
        return base + extra

    async def _submit(self, group_id: str, item: PromptItem, num_samples: int, temperature: float) -> None:
        self._new_group(group_id, item, num_samples, temperature)
        await self._dispatch(("group", group_id))

    def _new_group(self, group_id: str, item: PromptItem, num_samples: int, temperature: float) -> None:
        self._inflight[group_id] = Group(group_id=group_id, prompt_id=item.prompt_id,
                                         prompt_ids=np.asarray(item.prompt_ids, dtype=np.int32), answer=item.answer,
                                         num_samples=num_samples, temperature=temperature, source=item.source)

    async def _dispatch(self, job: tuple) -> None:
        """Send a whole group (``("group", id)``) or one sample's remainder (``("sample", id, index)``) to the
        least-loaded live worker (a group stays on one worker: its prompt is prefilled once)."""
        if not self._workers:  # every worker is being restarted: add_worker() hands it out
            self._unassigned.append(job)
            return
        worker = self._sched.pick(self._workers)
        g = self._inflight[job[1]]
        routes = self._return_routes and g.temperature > 0  # not for greedy evals
        if job[0] == "group":
            for i in range(g.num_samples):
                self._own((g.group_id, i), worker, g)
            await self._hub.send(worker, GenerateRequest(
                group_id=g.group_id, prompt_id=g.prompt_id, prompt_ids=g.prompt_ids, num_samples=g.num_samples,
                max_new_tokens=self._max_new_tokens, temperature=g.temperature, return_routes=routes))
            return
        s = g.samples[job[2]].flush()
        self._own((g.group_id, s.sample_index), worker, g)
        await self._hub.send(worker, ContinueRequest(
            group_id=g.group_id, sample_index=s.sample_index, prompt_id=g.prompt_id, prompt_ids=g.prompt_ids,
            prefix=s.token_ids, max_new_tokens=self._max_new_tokens, temperature=g.temperature,
            return_routes=routes, send_prompt_routes=routes and g.prompt_routes is None))

    def _own(self, key: tuple[str, int], worker: str, g: Group) -> None:
        self._owner[key] = worker
        self._load_of[key] = cost = self._sched.cost(g.prompt_id, g.source, 1)
        self._sched.load[worker] = self._sched.load.get(worker, 0.0) + cost

    def _disown(self, key: tuple[str, int]) -> None:
        worker = self._owner.pop(key, None)
        cost = self._load_of.pop(key, 0.0)
        if worker in self._sched.load:
            self._sched.load[worker] -= cost

    async def on_chunk(self, peer: str, msg: ResponseChunk) -> None:
        key = (msg.group_id, msg.sample_index)
        group = self._inflight.get(msg.group_id)
        if group is None or self._owner.get(key) != peer:  # e.g. from a worker declared dead, or cancelled
            log.info("rollouts.ignored_chunk", group_id=msg.group_id, sample_index=msg.sample_index, peer=peer)
            return
        sample = group.samples[msg.sample_index]
        if msg.offset != sample.length:
            log.warning("rollouts.chunk_out_of_order", group_id=msg.group_id, sample_index=msg.sample_index,
                        offset=msg.offset, have=sample.length)
            return
        sample.append(msg.token_ids, msg.behavior_logprobs, msg.token_versions,
                      _chunk_routes(msg) if self._return_routes and group.temperature > 0 else None)
        if msg.prompt_routes.size and group.prompt_routes is None:
            group.prompt_routes = msg.prompt_routes
        self.counts["generated_tokens"] += len(msg.token_ids)
        if not msg.finish_reason:
            return
        self._disown(key)
        sample.finish_reason = msg.finish_reason
        sample.flush()
        self.counts["generated_samples"] += msg.group_id not in self._eval_results  # RL samples (the budget)
        await self._score_path.finished(ScoreRequest(sample_key=f"{msg.group_id}/{msg.sample_index}",
                                                     token_ids=sample.token_ids, answer=group.answer),
                                        generating=len(self._owner))

    async def _score(self, req: ScoreRequest) -> None:
        if not self._rewards:
            self._unsent_scores.append(req)
            return
        peer = self._rewards[self._num_scored % len(self._rewards)]
        self._num_scored += 1
        self._scoring[req.sample_key] = (peer, req)
        await self._hub.send(peer, req)

    async def on_scored(self, msg: Scored) -> None:
        self._scoring.pop(msg.sample_key, None)
        group_id, _, index = msg.sample_key.rpartition("/")
        group = self._inflight.get(group_id)
        sample = group.samples.get(int(index)) if group is not None and index.isdigit() else None
        if sample is None or not sample.finished or sample.reward is not None:  # e.g. regenerated meanwhile
            log.info("rollouts.ignored_score", sample_key=msg.sample_key)
            return
        sample.reward, sample.valid, sample.reward_parts = msg.reward, msg.valid, dict(msg.reward_parts)
        if not group.complete:
            return
        if group_id not in self._eval_results:
            self._sched.predictor.observe(group.prompt_id, group.source, [s.length for s in group.samples.values()])
            if await self._after_group(group):
                return  # topped up: more samples to come
            if self.judging is not None and self.judging.needs(group):
                await self.judging.request(group)  # its rewards come back as Judged (on_judged)
                return
        del self._inflight[group_id]
        if group_id in self._eval_results:
            self._eval_results.pop(group_id).set_result(group)
        else:
            self._buffer.put(group)

    async def on_judged(self, msg: Judged) -> None:
        """The judge margins of a complete group (reward.plugin=judge): it goes to the buffer."""
        group = self._inflight.get(msg.group_id)
        if group is None or not group.complete or not self.judging.apply(group, msg):  # e.g. regenerated meanwhile
            log.info("rollouts.ignored_judgement", group_id=msg.group_id)
            return
        del self._inflight[msg.group_id]
        self._buffer.put(group)

    async def _after_group(self, g: Group) -> bool:
        """A group just completed: update its source's zero-variance rate; top it up if its samples all agree in
        raw correctness (never the shaped reward) and the budget allows. True = topped up."""
        correct = [s.reward_parts.get("correct", s.reward) for s in g.ordered() if s.valid]
        sp = self._sampling
        if g.group_id not in self._topped_up:
            zv = float(is_zero_variance(correct[:g.initial_samples]))
            old = self.source_zv.get(g.source)
            self.source_zv[g.source] = zv if old is None else (1 - sp.ema) * old + sp.ema * zv
        if (not sp.top_up or g.group_id in self._topped_up or not is_zero_variance(correct)
                or self._extra_budget() < sp.top_up):
            return False
        self._topped_up.add(g.group_id)
        self.counts["top_up_samples"] += sp.top_up
        for i in g.add_samples(sp.top_up):
            await self._dispatch(("sample", g.group_id, i))
        return True

    # ---- the staleness bound -----------------------------------------------------------------------------

    async def over_bound(self, groups: list[Group], min_version: int) -> None:
        """Groups that hold a token older than ``min_version``: regenerate their stale samples, or drop them."""
        for g in groups:
            self._inflight[g.group_id] = g  # back in flight (regenerate) or about to be forgotten (drop)
            await self._handle_stale(g, [s for s in g.samples.values() if s.min_version < min_version])

    async def _handle_stale(self, g: Group, stale: list[Sample]) -> None:
        self.counts["samples_over_bound"] += len(stale)
        mine = [(g.group_id, s.sample_index) for s in stale if (g.group_id, s.sample_index) in self._owner]
        if mine:  # still being generated: stop spending decode steps on it
            for worker in {self._owner[k] for k in mine}:
                keys = [f"{gid}/{i}" for gid, i in mine if self._owner[(gid, i)] == worker]
                await self._hub.send(worker, CancelRequest(sample_keys=keys))
            for k in mine:
                self._disown(k)
            self.counts["cancelled_samples"] += len(mine)
        if self._stale_policy == "drop":
            for i in range(g.num_samples):
                self._disown((g.group_id, i))
                self._scoring.pop(f"{g.group_id}/{i}", None)
            del self._inflight[g.group_id]
            self.counts["discarded_samples"] += g.num_samples
            self.counts["admitted_groups"] -= 1  # admission replaces it with a new prompt
            self.capacity_freed()
            log.warning("rollouts.dropped_stale_group", group_id=g.group_id, prompt_id=g.prompt_id)
            return
        for s in stale:  # regenerate from the prompt under the newest weights
            self._scoring.pop(f"{g.group_id}/{s.sample_index}", None)
            s.reset()
            self.counts["regenerated_samples"] += 1
            await self._dispatch(("sample", g.group_id, s.sample_index))

    async def _cancel_doomed(self) -> None:
        """After version v went out, every later step trains with weights >= v and accepts no token older than
        v - max_staleness. In-flight samples already holding one are doomed: act now, not when they finish."""
        floor = self.sent_version - self._max_staleness
        for g in [g for gid, g in self._inflight.items() if gid not in self._eval_results]:
            doomed = [s for s in g.samples.values() if s.length and s.min_version < floor]
            if doomed:
                await self._handle_stale(g, doomed)

    # ---- weights -----------------------------------------------------------------------------------------

    async def load_weights(self, msg: LoadWeights) -> None:
        """Send new weights to every worker; each swaps them in between two decode steps (no waiting here)."""
        for w in self._workers:
            await self._hub.send(w, msg)
        self._latest_weights = msg
        self.sent_version = max(self.sent_version, msg.version)
        await self._cancel_doomed()
        self.capacity_freed()

    def on_weights_loaded(self, peer: str, msg: WeightsLoaded) -> None:
        self.worker_versions[peer] = max(self.worker_versions.get(peer, 0), msg.version)
        now, last = time.monotonic(), self._worker_clock.get(peer)
        if last is not None and now > last[0]:  # fractions over the interval since this worker's last report
            span = now - last[0]
            self.worker_time[peer] = (min((msg.idle_s - last[1]) / span, 1.0),
                                      min((msg.paused_s - last[2]) / span, 1.0))
        self._worker_clock[peer] = (now, msg.idle_s, msg.paused_s)
        self._versions_changed.set()

    def worker_idle(self) -> dict[str, float]:
        """Mean over rollout workers of the fraction of time they had nothing to decode (waiting for work or
        weights) and were paused loading weights, over each one's last interval between weight updates."""
        fracs = list(self.worker_time.values())
        if not fracs:
            return {}
        return {"gen_idle_frac": float(np.mean([f[0] for f in fracs])),
                "gen_paused_frac": float(np.mean([f[1] for f in fracs]))}

    def worker_clocks(self) -> dict[str, tuple[float, float, float]]:
        """peer -> (when, idle_s, paused_s) of each rollout worker's newest report (cumulative totals)."""
        return dict(self._worker_clock)

    async def wait_weights(self, version: int) -> None:
        while not self.worker_versions or min(self.worker_versions.values()) < version:
            self._versions_changed.clear()
            await self._versions_changed.wait()

    # ---- membership: actors restarted by engine/coordinator/cluster.py ------------------------------------------------

    async def add_worker(self, peer: str) -> None:
        """A (re)started rollout worker: bring it to the newest weights, then give it work."""
        self._workers.append(peer)
        self._sched.add_worker(peer)
        self.worker_versions[peer] = 0
        if self._latest_weights is not None:
            await self._hub.send(peer, self._latest_weights)
        unassigned, self._unassigned = self._unassigned, []
        for job in unassigned:
            await self._dispatch(job)

    async def remove_worker(self, peer: str) -> None:
        """A dead rollout worker: each of its unfinished responses continues on a live worker from the tokens
        already received (an empty prefix for one that had not started)."""
        self._workers.remove(peer)
        self._sched.remove_worker(peer)
        self.worker_versions.pop(peer, None)
        self.worker_time.pop(peer, None)
        self._worker_clock.pop(peer, None)
        self._versions_changed.set()
        for key in [k for k, w in self._owner.items() if w == peer]:
            self._disown(key)
            self.counts["continued_samples"] += 1
            await self._dispatch(("sample", *key))

    async def add_reward(self, peer: str) -> None:
        self._rewards.append(peer)
        unsent, self._unsent_scores = self._unsent_scores, []
        for req in unsent:
            await self._score(req)
        if self.judging is not None:
            await self.judging.requeue(None)

    async def remove_reward(self, peer: str) -> None:
        """A dead reward worker: send its unanswered requests to the others (or keep them for the next one)."""
        self._rewards.remove(peer)
        for _, req in [v for v in self._scoring.values() if v[0] == peer]:
            self.counts["requeued_scores"] += 1
            await self._score(req)
        if self.judging is not None:
            await self.judging.requeue(peer)

    def counters(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if k not in ("generated_tokens", "prompts_taken")}

    # ---- checkpoint --------------------------------------------------------------------------------------

    def state(self) -> dict:
        """Everything needed to continue without losing or repeating a prompt: in-flight groups with their
        partial responses, the buffer, the prompt-stream frontier and the counters."""
        return {"inflight": [g for gid, g in self._inflight.items() if gid not in self._eval_results],
                "buffer": self._buffer.groups(), "counts": dict(self.counts), "sent_version": self.sent_version}

    async def restore(self, state: dict) -> None:
        """Continue a checkpointed run: buffered groups go back to the buffer, partial responses continue where
        they stopped, finished but unscored responses are scored again."""
        self.counts.update(state["counts"])
        self.sent_version = state["sent_version"]
        for g in state["buffer"]:
            self._buffer.put(g)
        for g in state["inflight"]:
            self._inflight[g.group_id] = g
            for s in g.ordered():
                if not s.finished:
                    self.counts["continued_samples"] += 1
                    await self._dispatch(("sample", g.group_id, s.sample_index))
                elif s.reward is None:
                    await self._score(ScoreRequest(sample_key=f"{g.group_id}/{s.sample_index}",
                                                   token_ids=s.token_ids, answer=g.answer))
            if g.complete and self.judging is not None and self.judging.needs(g):
                await self.judging.request(g)
            elif g.complete:
                del self._inflight[g.group_id]
                self._buffer.put(g)

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
        self._score_path.close()
        if self._admit_task is not None:
            self._admit_task.cancel()
            await asyncio.gather(self._admit_task, return_exceptions=True)
