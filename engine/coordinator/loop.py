"""The whole RL run, top to bottom. Start reading here.

Stage 1 is a cached cold-start SFT. Stage 2 is asynchronous RL: rollout workers decode continuously and stream
every response in chunks, taking new weights between decode steps, so a response may span several policy
versions; admission is paced so that no token is more than ``train.max_staleness`` versions old when it is
trained; reward workers score each response as soon as it finishes; the learner trains on whatever complete
groups are ready. Every ``train.checkpoint_every`` steps the whole asynchronous state is saved, and
``resume=true`` continues from there without skipping or repeating a prompt. A learner that dies mid-run is
handled the same way, without a human: the run rolls back to the newest checkpoint and continues
(engine/coordinator/recovery.py). Ctrl-C or SIGTERM checkpoints the last completed step, then stops every actor
(``Interrupts``, same file; ``_save_on_interrupt`` here).

Stage 2 has two halves, both here: the trainer (``_rl``, ``_train_step``: take groups, train, send weights) and
the producer (``continuous_rollouts``, ``admit_prompts``: prompt -> dispatch/generate -> chunks -> score ->
top-up/judge -> buffer), which drives the parts wired in engine/coordinator/rollouts.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from itertools import islice
from pathlib import Path

import structlog
import torch
from tqdm import tqdm

from configs.schema import RunConfig
from engine.algo.loss_registry import LOSSES
from engine.coordinator import checkpoint
from engine.coordinator.batch import RunStats, batch_stats, pack_batch
from engine.coordinator.buffer import Group
from engine.coordinator.cluster import Actors, Faults, start_actors
from engine.coordinator.launch import Rendezvous, is_elastic
from engine.coordinator.metrics import MetricsWriter, truncate_jsonl
from engine.coordinator.metric_sinks import open_sinks
from engine.coordinator.recovery import Interrupts, SaveAborted, restart_on_learner_failure
from engine.coordinator.inbox import WorkerJoined, WorkerLost
from engine.coordinator.rollouts import PromptItem, Rollouts
from engine.modeling.model import export_policy, newest_weights
from engine.modeling.sft import initial_policy
from engine.data.tasks import Task, load_task
from transport import FetchWeights, Judged, LoadWeights, ResponseChunk, Scored, WeightsLoaded

log = structlog.get_logger()


async def run(cfg: RunConfig, run_dir: Path) -> dict:
    """Cold-start SFT, greedy eval, async RL up to step ``train.num_steps``, greedy eval. Returns the summary."""
    t_start, task = time.monotonic(), load_task(cfg)
    init_dir, sft = initial_policy(cfg, task, progress=cfg.progress)  # stage 1 (cached; skipped for init_from)
    torch.set_num_threads(1)  # the actor processes own the cores from here on
    ckpt = checkpoint.latest(run_dir) if cfg.resume else None
    rdzv = Rendezvous(cfg) if is_elastic(cfg) else None  # the elastic learners' store: outlives every restart
    interrupts = Interrupts(cfg.train.interrupt_checkpoint_s)  # Ctrl-C, SIGTERM: checkpoint, then stop
    interrupts.install()
    try:
        summary = await restart_on_learner_failure(  # a dead learner: resume from the newest checkpoint, in process
            cfg, run_dir, ckpt, lambda ckpt, faults: _rl(cfg, run_dir, task, init_dir, ckpt, faults, t_start,
                                                         rdzv.endpoint if rdzv else "", interrupts))
    except (asyncio.CancelledError, SaveAborted):
        if interrupts.signum is None:
            raise
        asyncio.current_task().uncancel()  # stopped at once (a second signal, nothing to save, time ran out)
        summary = _interrupted(interrupts, checkpoint.latest(run_dir))
    finally:
        interrupts.uninstall()
    if interrupts.signum is not None:  # no final eval, no export: cli.py exits 128 + the signal
        return {**summary, "wall_s": time.monotonic() - t_start}
    policy = export_policy(init_dir, newest_weights(run_dir / "weights", summary.pop("policy_version")),
                           task.tokenizer, run_dir / "policy", cfg.model.dtype)  # an HF folder: the run's output
    return {**summary, "sft_cached": sft["cached"], "sft_s": sft["seconds"], "policy_dir": str(policy),
            "wall_s": time.monotonic() - t_start}


async def _rl(cfg: RunConfig, run_dir: Path, task: Task, init_dir: str, ckpt: checkpoint.Checkpoint | None,
              faults: Faults, t_start: float, rdzv_endpoint: str, interrupts: Interrupts) -> dict:
    """Stage 2 from checkpoint ``ckpt`` (None: from the start); whatever the files hold after it is dropped.
    After a Ctrl-C or SIGTERM (``interrupts.requested``): the checkpoint of the last completed step, no final eval."""
    interrupts.saving = False  # until the actors are up and restored
    state = checkpoint.load_coordinator(ckpt) if ckpt else None
    first = ckpt.step + 1 if ckpt else 1
    for name in ("metrics.jsonl", "prompts.jsonl"):  # forget what happened after the checkpoint
        truncate_jsonl(run_dir / name, last_step=first - 1 if ckpt else -1)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", sinks=open_sinks(cfg, run_dir))  # + logging.backends
    ledger = MetricsWriter(run_dir / "prompts.jsonl")
    totals = RunStats.from_dict(state["totals"] if state else {})
    eval_items = [_item(task, i, ex) for i, ex in enumerate(task.eval_set)]
    try:
        async with start_actors(cfg, run_dir, init_dir, produce=continuous_rollouts,
                                resume_learner=ckpt and str(ckpt.learner_dir), faults=faults,
                                rdzv_endpoint=rdzv_endpoint) as a:
            version = await _restore(a, ckpt, state) if ckpt else 0
            eval_start = state["eval_start"] if state else await _evaluate(a, eval_items, 0, metrics)
            prompts = islice(_prompt_stream(task, cfg), a.rollouts.counters.prompts_taken, None)
            a.rollouts.start(admit_prompts(a.rollouts, prompts,
                                           total_groups=cfg.train.num_steps * cfg.train.groups_per_step))
            t_rl, step = time.monotonic(), first - 1
            interrupts.saving = True
            for step in progress_steps(cfg, first):
                trained = await _train_step(a, cfg, task, step, version, metrics, ledger, totals, t_start,
                                            stop=interrupts.requested)
                if trained is None:  # interrupted while waiting for its batch: this step never happened
                    step -= 1
                    break
                version = trained
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.num_steps:
                    await _unless(interrupts.requested, _evaluate(a, eval_items, version, metrics), cancel=False)
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    await _checkpoint(a, run_dir, step, version, totals, eval_start, interrupts)
                if interrupts.requested.is_set():
                    break
                if cfg.train.sample_budget and a.rollouts.counters.generated_samples >= cfg.train.sample_budget:
                    break  # the rollout budget is spent
            interrupts.saving = False
            if interrupts.requested.is_set():
                saved = await _save_on_interrupt(a, run_dir, step, version, totals, eval_start, interrupts)
                return {**_interrupted(interrupts, saved), "steps": step, "resumed_from_step": ckpt.step if ckpt else 0,
                        "policy_version": version}
            rl_s = time.monotonic() - t_rl
            eval_end = await _evaluate(a, eval_items, version, metrics)
    finally:
        metrics.close()
        ledger.close()
    return {"steps": step, "resumed_from_step": ckpt.step if ckpt else 0,
            "generated_samples": a.rollouts.counters.generated_samples,
            "samples_by_worker": dict(a.rollouts.counters.samples_by_worker),
            "eval_accuracy_start": eval_start["accuracy"], "eval_accuracy_end": eval_end["accuracy"],
            **totals.summary(a.rollouts.counters), "rl_s": rl_s, "policy_version": version}


# ---- the producer: prompt -> dispatch/generate -> chunks -> score -> top-up/judge -> buffer -----------------------

async def continuous_rollouts(p: Rollouts) -> None:
    """The producer half of the run, next to the trainer half (``_rl`` above, ``_train_step`` below). Runs for
    the whole start_actors block.
    consumes: the inbox (every worker message, in arrival order)   produces: complete groups into the buffer
    waits for: the next message. Prompts come in through ``admit_prompts``; the parts are engine/coordinator/*.py."""
    while True:
        peer, msg = await p.inbox.get()
        await on_message(p, peer, msg)


async def admit_prompts(p: Rollouts, prompts: Iterator[PromptItem], *, total_groups: int) -> None:
    """prompt -> dispatch/generate: as many new groups as the staleness bound allows now (admission.py), each
    sized by the zero-variance sampler and sent whole to one worker (dispatch.py); then wait for new weights."""
    while n := await p.admission.room(total_groups):
        await p.dispatch.groups([p.admit(next(prompts)) for _ in range(n)])


async def on_message(p: Rollouts, peer: str, msg: object) -> None:
    """One step of the producer, for one message from ``peer``."""
    match msg:
        case ResponseChunk():  # chunks -> samples (streams.py); a finished response goes to be scored
            if (finished := p.streams.append(peer, msg)) is not None:
                await p.scoring.finished(finished)
        case Scored():  # score -> the sample's reward; a group now complete goes on
            if (group := p.scoring.answered(msg)) is not None:
                await _complete(p, group)
        case Judged():  # judge margins -> buffer
            if (group := p.scoring.judged(msg)) is not None:
                p.deliver(group)
        case WeightsLoaded():
            p.workers.loaded(peer, msg)
        case FetchWeights() if p.workers.relay is not None:  # rollout.weight_sync=relay: one chunk back (relay.py)
            await p.workers.relay.serve(peer, msg)
        case WorkerJoined(role="rollout"):  # brought to the newest weights, then given the work that waited
            await p.workers.join(peer)
            await p.dispatch.join(peer)
        case WorkerLost(role="rollout"):  # its unfinished responses continue elsewhere from their tokens
            p.workers.leave(peer)
            samples, tokens = await p.dispatch.lose(peer)
            p.counters.continued_samples += samples
            p.counters.continued_prefix_tokens += tokens
        case WorkerJoined():
            await p.scoring.join(peer)
        case WorkerLost():
            await p.scoring.lose(peer)


async def _complete(p: Rollouts, g: Group) -> None:
    """top-up/judge -> buffer: an RL group whose samples all agree in raw correctness gets more samples
    (zero_variance.py); with reward.plugin=judge it is judged first (its margins come back as Judged)."""
    if g.group_id not in p.evals:
        p.dispatch.scheduler.predictor.observe(g.prompt_id, g.source, [s.length for s in g.samples.values()])
        if n := p.sampler.after_group(g):
            await p.dispatch.samples(g, g.add_samples(n))
            return
        if p.scoring.judging is not None and p.scoring.judging.needs(g):
            await p.scoring.judging.request(g)
            return
    p.deliver(g)  # to the buffer (or to its eval)


async def _train_step(a: Actors, cfg: RunConfig, task: Task, step: int, version: int, metrics: MetricsWriter,
                      ledger: MetricsWriter, totals: RunStats, t_start: float,
                      stop: asyncio.Event | None = None) -> int | None:
    """Take the oldest ready groups (none over the staleness bound), train one batch, send the new weights.
    ``stop`` set while waiting for the groups: None, nothing taken; once they are taken, the step finishes."""
    t0, tokens0 = time.monotonic(), a.rollouts.counters.generated_tokens
    groups = await _unless(stop, a.buffer.take(cfg.train.groups_per_step,
                                               min_version=version - cfg.train.max_staleness))
    if groups is None:
        return None
    t_wait = time.monotonic() - t0
    batch = pack_batch(groups, step=step, pad_id=task.tokenizer.pad_id,
                       scale_by_std=LOSSES[cfg.learner.loss].adv_scale_by_std, adv_std=cfg.learner.adv_std)
    stats = batch_stats(groups, batch, learner_version=version, rl_zvp=cfg.learner.rl_zvp_alpha > 0)
    totals.add(groups, stats)
    result = await a.learner.train(batch)  # fwd/bwd/optimizer step on every learner rank
    await a.rollouts.load_weights(LoadWeights(version=result.version, path=result.weights_path,
                                              digest=result.weights_digest))  # no waiting
    step_s = time.monotonic() - t0
    ledger.write({"step": step, "prompt_ids": [g.prompt_id for g in groups]})
    metrics.write({"step": step, "version": result.version, **stats, **result.stats, "step_s": step_s,
                   "learner_wait_s": t_wait, "elapsed_s": time.monotonic() - t_start,
                   "gen_tokens_per_s": (a.rollouts.counters.generated_tokens - tokens0) / step_s,
                   "train_tokens_per_s": result.stats.get("tokens", 0.0) / step_s,
                   **a.rollouts.workers.idle(), **a.counters()})
    return result.version


async def _checkpoint(a: Actors, run_dir: Path, step: int, version: int, totals: RunStats, eval_start: dict,
                      interrupts: Interrupts) -> Path | None:
    """The checkpoint of ``step`` (its folder), or None when a disk fault stopped it: the staging folder is
    removed, ``checkpoint.write_failed`` names the path and the cause, the previous checkpoint stays the newest,
    and the run goes on (a full disk may have room again by the next ``train.checkpoint_every`` step)."""
    path = checkpoint.staging_dir(run_dir, step)  # renamed to checkpoints/step_N once complete and fsynced
    saved = await a.learner.checkpoint(step, str(path / "learner"))  # every rank: model, optimizer, RNG
    try:
        if not saved.path:  # a learner rank's disk fault (its log has checkpoint.write_failed with the cause)
            raise checkpoint.learner_fault(path / "learner", run_dir / "logs")
        with interrupts.abortable():  # a second Ctrl-C while an interrupt's save writes: SaveAborted, staging left
            checkpoint.save_coordinator(path, step=step, version=version, rollouts_state=a.rollouts.state(),
                                        extra={"totals": totals.to_dict(), "eval_start": eval_start},
                                        policy_file=str(run_dir / "weights" / f"policy_v{version}.safetensors"))
    except OSError as e:
        checkpoint.discard_staging(path)
        newest = checkpoint.latest(run_dir)
        log.error("checkpoint.write_failed", step=step, path=e.filename or str(path), error=e.strerror,
                  kept=str(newest.path) if newest else None,
                  detail="this checkpoint is dropped, the previous one is kept; the run goes on and the next "
                         "train.checkpoint_every step tries again")
        return None
    return checkpoint.checkpoint_dir(run_dir, step)


async def _save_on_interrupt(a: Actors, run_dir: Path, step: int, version: int, totals: RunStats,
                             eval_start: dict, interrupts: Interrupts) -> checkpoint.Checkpoint | None:
    """Ctrl-C or SIGTERM: the checkpoint of the last completed step ``step``, the one ``train.checkpoint_every``
    would write there (buffer, in-flight responses, frontier; an eval under way is left out, as in any
    checkpoint), unless that step has one already. Returns the newest checkpoint. A disk fault while saving it
    (``checkpoint.write_failed``) leaves the previous checkpoint the newest: the run still exits 130/143, and
    the summary's ``save_abandoned`` says the write failed."""
    t0, done = time.monotonic(), checkpoint.checkpoint_dir(run_dir, step)
    if step > 0 and not (done / "meta.json").is_file():
        done = await _checkpoint(a, run_dir, step, version, totals, eval_start, interrupts)
        if done is None:
            interrupts.aborted = "the checkpoint could not be written (checkpoint.write_failed)"
        else:
            log.info("run.interrupt_checkpoint", step=step, path=str(done), save_s=round(time.monotonic() - t0, 2))
    interrupts.saved()
    return checkpoint.Checkpoint(path=done, step=step, meta={}) if step > 0 and done and done.is_dir() else \
        checkpoint.latest(run_dir)


def _interrupted(interrupts: Interrupts, saved: checkpoint.Checkpoint | None) -> dict:
    """The summary of a run stopped by a signal: which, and the checkpoint ``resume=true`` continues from."""
    return {"status": "interrupted", "signal": interrupts.name, "checkpoint_step": saved.step if saved else None,
            "checkpoint": str(saved.path) if saved else None,
            **({"save_abandoned": interrupts.aborted} if interrupts.aborted else {})}


async def _unless(stop: asyncio.Event | None, work: Awaitable, *, cancel: bool = True):
    """``work``'s result, or None when ``stop`` is set first: ``work`` is then cancelled, or with ``cancel=False``
    left running (an eval: its groups still come back; no checkpoint holds them)."""
    if stop is None:
        return await work
    job, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((job, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if cancel and not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
    return job.result() if job.done() and not job.cancelled() else None


async def _restore(a: Actors, ckpt: checkpoint.Checkpoint, state: dict) -> int:
    """Workers take the checkpoint's weights; partial responses and buffered groups continue."""
    version = int(ckpt.meta["version"])
    await a.rollouts.load_weights(LoadWeights(version=version, path=str(ckpt.policy_path), digest=ckpt.policy_digest))
    await a.rollouts.restore(state)
    return version


async def _evaluate(a: Actors, items: list[PromptItem], version: int, metrics: MetricsWriter) -> dict:
    """Greedy accuracy of policy ``version`` (once every worker has loaded it), logged as an eval event."""
    await a.rollouts.workers.wait_weights(version)
    result = await a.rollouts.evaluate(items, tag=f"v{version}")
    metrics.write({"event": "eval", "version": version, **result})
    return result


def progress_steps(cfg: RunConfig, first: int) -> tqdm:
    """Steps ``first`` .. ``train.num_steps`` under the "rl" bar, which counts from the step a resumed run
    continues after (``first - 1`` of ``train.num_steps`` done), not from 0."""
    return tqdm(range(first, cfg.train.num_steps + 1), desc="rl", disable=not cfg.progress, unit="step",
                initial=first - 1, total=cfg.train.num_steps)


def _item(task: Task, prompt_id: int, ex) -> PromptItem:
    return PromptItem(prompt_id=prompt_id, prompt_ids=task.prompt_ids(ex), answer=ex.answer)


def _prompt_stream(task: Task, cfg: RunConfig) -> Iterator[PromptItem]:
    """Endless training prompts (the task's distribution, or task.train_pool), disjoint from eval and dev."""
    for prompt_id, ex, pass_rate in task.train_stream(cfg.seed, cfg.task.train_pool):
        yield PromptItem(prompt_id=prompt_id, prompt_ids=task.prompt_ids(ex), answer=ex.answer, source=ex.source,
                         pass_rate=pass_rate)
