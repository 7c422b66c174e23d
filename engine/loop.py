"""The whole RL run, top to bottom. Start reading here.

Stage 1 is a cached cold-start SFT. Stage 2 is asynchronous RL: rollout workers keep generating groups
(paced so that no token is older than ``train.max_policy_lag`` versions when it is trained), reward workers score
each sample as soon as it arrives, and the learner trains on whatever complete groups are ready. New weights go
back to the workers without anyone waiting for them: generation of the next batch overlaps the current step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from configs.schema import RunConfig
from engine.batch import batch_stats, pack_batch
from engine.cluster import Actors, start_actors
from engine.metrics import MetricsWriter
from engine.rollouts import PromptItem
from engine.sft import ensure_sft_checkpoint
from engine.tasks import Task, build_task
from transport import LoadWeights


async def run(cfg: RunConfig, run_dir: Path) -> dict:
    """Cold-start SFT, greedy eval, async RL for ``train.num_steps`` steps, greedy eval. Returns the summary."""
    t_start, task = time.monotonic(), build_task(cfg.task)
    init_dir, sft = ensure_sft_checkpoint(cfg, task, progress=cfg.progress)  # stage 1 (cached across runs)
    torch.set_num_threads(1)  # the actor processes own the cores from here on
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    eval_items = [_item(task, i, ex) for i, ex in enumerate(task.eval_set)]
    async with start_actors(cfg, run_dir, init_dir) as a:  # every process up and connected, weights v0
        eval_start = await _evaluate(a, eval_items, 0, metrics)
        a.rollouts.start(_prompt_stream(task, cfg.seed), total_groups=cfg.train.num_steps * cfg.train.groups_per_step)
        version, t_rl = 0, time.monotonic()
        for step in tqdm(range(1, cfg.train.num_steps + 1), desc="rl", disable=not cfg.progress, unit="step"):
            t0, tokens0 = time.monotonic(), a.rollouts.num_generated_tokens
            groups = await a.buffer.take(cfg.train.groups_per_step, min_version=version - cfg.train.max_policy_lag)
            t_wait = time.monotonic() - t0
            batch = pack_batch(groups, step=step, pad_id=task.tokenizer.pad_id)
            stats = batch_stats(groups, batch, learner_version=version)
            result = await a.learner.train(batch)  # fwd/bwd/optimizer step on every learner rank
            version = result.version
            await a.rollouts.load_weights(LoadWeights(version=version, path=result.weights_path))  # no waiting
            step_s = time.monotonic() - t0
            metrics.write({"step": step, "version": version, **stats, **result.stats, "step_s": step_s,
                           "learner_wait_s": t_wait, "elapsed_s": time.monotonic() - t_start,
                           "gen_tokens_per_s": (a.rollouts.num_generated_tokens - tokens0) / step_s,
                           "train_tokens_per_s": result.stats.get("tokens", 0.0) / step_s,
                           **a.counters()})
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.num_steps:
                await _evaluate(a, eval_items, version, metrics)
        rl_s = time.monotonic() - t_rl
        eval_end = await _evaluate(a, eval_items, version, metrics)
    metrics.close()
    return {"steps": cfg.train.num_steps, "eval_accuracy_start": eval_start["accuracy"],
            "eval_accuracy_end": eval_end["accuracy"], "sft_cached": sft["cached"], "sft_s": sft["seconds"],
            "rl_s": rl_s, "wall_s": time.monotonic() - t_start}


async def _evaluate(a: Actors, items: list[PromptItem], version: int, metrics: MetricsWriter) -> dict:
    """Greedy accuracy of policy ``version`` (once every worker has loaded it), logged as an eval event."""
    await a.rollouts.wait_weights(version)
    result = await a.rollouts.evaluate(items, tag=f"v{version}")
    metrics.write({"event": "eval", "version": version, **result})
    return result


def _item(task: Task, prompt_id: int, ex) -> PromptItem:
    return PromptItem(prompt_id=prompt_id, prompt_ids=task.prompt_ids(ex), answer=ex.answer)


def _prompt_stream(task: Task, seed: int) -> Iterator[PromptItem]:
    """Endless training prompts, disjoint from the eval and dev sets."""
    rng, prompt_id = random.Random(seed), 1_000_000
    while True:
        for ex in task.sample_train(rng, 256):
            yield _item(task, prompt_id, ex)
            prompt_id += 1
