"""Pipeline throughput: sync vs one-step-off vs fully async, and the paper's ablation, on one workload in one run.

Every setting starts the real actor processes through engine/coordinator/cluster.py (ZeroMQ + msgpack transport, the
coordinator's engine/coordinator/rollouts.py, real reward workers) with the simulated rollout backend
(engine/backends/sim.py, many RolloutWorker actors per process, cost-model time) and the simulated learner
(actors/sim_learner.py, the TrainBatch -> TrainResult protocol, cost-model time). ``--backend hf`` runs sync,
one_step_off and async with real transformers workers on a long-tail workload, calibrates the simulator on this box
and runs it on the same settings (bench/pipeline_hf.py; the learner stays simulated so that only the rollout side
differs). ``--scale 64,256,1024`` measures the coordinator at those worker counts (bench/pipeline_scale.py).

Settings (same prompts, same lengths):
  sync          generate a step's groups, then train on them (max_staleness 0)
  one_step_off  batch k+1 generates while batch k trains, weights change only between batches (staleness 1)
  async         continuous generation, weights swapped in flight (partial rollouts), max_staleness 2
  ablation (synchronous, cumulative): baseline (one post-processing thread, scores after the batch, FIFO)
     -> +detok_pool -> +reward_overlap -> +length_aware.  sync/one_step_off/async use every feature, so
     "sync" is the last ablation step, run once.

Measured over the steps after ``--warmup`` (the first epoch of the prompt pool, so length predictions exist):
trained tokens/s and samples/s, speed-up vs sync, rollout-worker idle fraction (time with nothing to decode),
learner idle fraction, and the generation-bound ideal (engine/backends/simulate.py ideal_seconds: the trained tokens'
decode work at a full batch on every worker) with the fraction of it achieved.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import time
from itertools import cycle
from pathlib import Path

import numpy as np

from configs.load import load, save
from configs.schema import RunConfig
from engine.backends import simulate
from engine.log import configure_logging
from engine.coordinator.counters import RolloutCounters
from transport import LoadWeights, run

MODES = {"sync": 0, "one_step_off": 1, "async": 2}  # mode -> train.max_staleness
ABLATION = {  # cumulative, synchronous
    "baseline": ["rollout.postprocess_workers=1", "rollout.reward_overlap=false", "rollout.schedule=fifo"],
    "+detok_pool": ["rollout.postprocess_workers={pool}", "rollout.reward_overlap=false", "rollout.schedule=fifo"],
    "+reward_overlap": ["rollout.postprocess_workers={pool}", "rollout.reward_overlap=true", "rollout.schedule=fifo"],
    "+length_aware": ["rollout.postprocess_workers={pool}", "rollout.reward_overlap=true",
                      "rollout.schedule=length_aware"],
}
FULL = ABLATION["+length_aware"]


def _prompts(cfg: RunConfig):
    """The prompt pool, shuffled once and repeated epoch after epoch (the same order in every setting)."""
    from engine.coordinator.rollouts import PromptItem

    ids = np.random.default_rng(cfg.sim.seed).permutation(cfg.sim.num_prompts)
    vocab = 98  # engine/data/tasks.py CharTokenizer
    for p in cycle(ids.tolist()):
        yield PromptItem(prompt_id=p, prompt_ids=simulate.prompt_tokens(p, cfg.sim, vocab), answer="",
                         source=simulate.source_of(p, cfg.sim))


async def _loop_lag(lags: list[tuple[float, float]], period: float = 0.02) -> None:
    """Record how late the coordinator's event loop wakes from a ``period`` sleep: (when, lateness). A coordinator
    starved of CPU falls behind the workers' chunks, which stretches simulated time (the figures are then bounded
    by this box, not by the pipeline)."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(period)
        now = time.monotonic()
        lags.append((now, now - last - period))
        last = now


async def _drive(cfg: RunConfig, run_dir: Path, mode: str, warmup: int, init_dir: str) -> dict:
    """The coordinator's loop for one setting (engine/coordinator/loop.py's _train_step, minus evals and checkpoints)."""
    from engine.coordinator.batch import pack_batch  # the coordinator (and torch) only once a setting runs
    from engine.coordinator.cluster import start_actors
    from engine.coordinator.loop import admit_prompts, continuous_rollouts

    gps, S, steps = cfg.train.groups_per_step, cfg.train.max_staleness, cfg.train.num_steps
    lags: list[tuple[float, float]] = []
    lag_task = asyncio.create_task(_loop_lag(lags))
    async with start_actors(cfg, run_dir, init_dir, produce=continuous_rollouts) as a:
        if cfg.rollout.backend == "hf":  # the long-tail workload: each prompt's length limit (bench/longtail.py)
            from bench.longtail import limit_lengths

            limit_lengths(a.hub, cfg.sim)
        frames = _count_frames(a.hub)
        a.rollouts.start(admit_prompts(a.rollouts, _prompts(cfg), total_groups=(steps + S + 1) * gps))
        version, pending, rows = 0, None, []
        for step in range(1, steps + 1):
            groups = await a.buffer.take(gps, min_version=version - S)
            if pending is not None:  # one-step-off: the previous weights go out only once this batch is in
                await a.rollouts.load_weights(pending)
            batch = pack_batch(groups, step=step, pad_id=0)
            t_train = time.monotonic()
            result = await a.learner.train(batch)
            done = time.monotonic()
            new = LoadWeights(version=result.version, path=result.weights_path)
            if mode == "one_step_off":
                pending = new
            else:
                await a.rollouts.load_weights(new)  # no waiting: workers swap it in between decode steps
            samples = [s for g in groups for s in g.ordered()]
            rows.append({"end": done, "train_s": done - t_train, "samples": len(samples),
                         "tokens": sum(s.length for s in samples), "groups": len(groups),
                         "lengths": [s.length for s in samples],
                         "stopped": sum(s.finish_reason == "stop" for s in samples),
                         "max_staleness": max(version - s.min_version for s in samples),
                         "clocks": a.rollouts.workers.clocks(), "cpu_s": time.process_time(),
                         "frames": dict(frames), "box": _box_cpu()})
            version = result.version
        counts = a.rollouts.counters
    lag_task.cancel()
    return _summarize(cfg, rows, warmup, counts, lags)


def _count_frames(hub) -> dict[str, int]:
    """Count the frames the coordinator's hub hands out (received) and queues (sent), on that one instance
    (heartbeats are handled inside the hub and not counted)."""
    counts = {"recv": 0, "sent": 0}
    recv, send = hub.recv, hub.send

    async def counted_recv(timeout=None):
        item = await recv(timeout=timeout)
        counts["recv"] += 1
        return item

    async def counted_send(peer_id, msg):
        counts["sent"] += 1
        await send(peer_id, msg)

    hub.recv, hub.send = counted_recv, counted_send
    return counts


def _box_cpu() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat ((0, 0) where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _idle_frac(start: dict, end: dict) -> float:
    """Mean over workers of (time with nothing to decode) / (wall time), between two clock snapshots."""
    fracs = [(end[w][1] - start[w][1]) / (end[w][0] - start[w][0]) for w in end if w in start and end[w][0] > start[w][0]]
    return float(np.mean(fracs)) if fracs else float("nan")


def length_stats(lengths: list[int]) -> dict:
    """Mean, p50, p99, max and max/mean of response lengths (tokens)."""
    x = np.asarray(lengths, dtype=float)
    if not len(x):
        return {"n": 0}
    mean = float(x.mean())
    return {"n": int(len(x)), "mean": mean, "min": float(x.min()), "p50": float(np.percentile(x, 50)),
            "p99": float(np.percentile(x, 99)), "max": float(x.max()), "max_over_mean": float(x.max() / mean)}


def _summarize(cfg: RunConfig, rows: list[dict], warmup: int, counts: RolloutCounters,
               lags: list[tuple[float, float]]) -> dict:
    first, window = rows[warmup - 1], rows[warmup:]
    lag_ms = np.array([lag for t, lag in lags if first["end"] <= t <= window[-1]["end"]] or [0.0]) * 1000
    wall = window[-1]["end"] - first["end"]
    # worker clocks arrive with WeightsLoaded, one step late: idle is measured from the first window step on
    tokens, samples = sum(r["tokens"] for r in window), sum(r["samples"] for r in window)
    ideal = simulate.ideal_seconds(decode_tokens=tokens, prefill_tokens=sum(r["groups"] for r in window)
                                   * cfg.sim.prompt_len, num_workers=cfg.rollout.num_workers,
                                   max_batch=cfg.rollout.max_batch_samples, sim=cfg.sim) * cfg.sim.time_scale
    idle = _idle_frac(window[0]["clocks"], window[-1]["clocks"])
    frames = sum(window[-1]["frames"].values()) - sum(first["frames"].values())
    box = [e - s for e, s in zip(window[-1]["box"], first["box"])]
    return {"tokens_per_s": tokens / wall, "samples_per_s": samples / wall, "wall_s": wall,
            "steps": len(window), "trained_tokens": tokens,
            "rollout_idle_frac": idle, "rollout_idle_worker_s_per_ktoken":
                idle * wall * cfg.rollout.num_workers / (tokens / 1000),
            "learner_idle_frac": 1 - sum(r["train_s"] for r in window) / wall,
            "ideal_s": ideal, "fraction_of_ideal": ideal / wall,
            "max_token_staleness": max(r["max_staleness"] for r in window),
            "coordinator_lag_ms_mean": float(lag_ms.mean()), "coordinator_lag_ms_p99": float(np.percentile(lag_ms, 99)),
            "coordinator_cpu_frac": (window[-1]["cpu_s"] - first["cpu_s"]) / wall,
            "frames_per_s": frames / wall, "coordinator_cpu_us_per_frame":
                1e6 * (window[-1]["cpu_s"] - first["cpu_s"]) / max(frames, 1),
            "box_cpu_frac": (box[1] and box[0] / box[1]), "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "lengths": length_stats([n for r in window for n in r["lengths"]]),
            "stopped_samples": sum(r["stopped"] for r in window),
            "version_lag_max": max(r["max_staleness"] for r in window), "max_staleness": cfg.train.max_staleness,
            "samples_over_bound": counts.samples_over_bound, "regenerated_samples": counts.regenerated_samples,
            "discarded_samples": counts.discarded_samples, "cancelled_samples": counts.cancelled_samples}


def _overrides(a: argparse.Namespace) -> list[str]:
    return [f"rollout.backend={a.backend}", f"rollout.num_workers={a.workers}", f"rollout.group_size={a.group_size}",
            f"rollout.max_batch_samples={a.max_batch}", f"rollout.chunk_tokens={a.chunk_tokens}",
            "rollout.return_routes=false", "learner.router_replay=off", "rollout.kv_on_update=keep",
            f"task.max_answer_tokens={a.max_new_tokens}", f"train.groups_per_step={a.groups_per_step}",
            f"train.num_steps={a.warmup + a.steps}", f"reward.num_workers={a.reward_workers}",
            "sim.learner=true", f"sim.time_scale={a.time_scale}", f"sim.mean_len={a.mean_len}",
            f"sim.num_prompts={a.pool_epochs_per_step * a.groups_per_step}", "transport.peer_timeout_s=120",
            f"sim.train_per_token_s={_train_per_token_s(a):.4g}", "progress=false", *a.overrides]


def _train_per_token_s(a: argparse.Namespace) -> float:
    """Simulated learner speed: a step takes ``--learner-frac`` of the time the rollout workers need to generate
    it at full capacity (so training is not the bottleneck of a well-fed async pipeline)."""
    sim = load([f"sim.mean_len={a.mean_len}", *(o for o in a.overrides if o.startswith("sim."))]).sim  # calibrated
    per_gen_token = simulate.step_seconds(a.max_batch, sim) / (a.max_batch * a.workers)
    mean_len = min(a.mean_len, a.max_new_tokens)
    return a.learner_frac * per_gen_token * mean_len / (mean_len + sim.prompt_len)


def _run_setting(a: argparse.Namespace, name: str, mode: str, extra: list[str]) -> dict:
    ov = [*_overrides(a), f"train.max_staleness={MODES[mode]}", *(x.format(pool=a.pool) for x in extra)]
    cfg = load(ov, config_name="run")
    init_dir = ""
    if a.backend == "hf":  # real workers load every version the simulated learner publishes: the initial weights
        from bench.pipeline_hf import hf_init

        init_dir = getattr(a, "hf_init_dir", "") or hf_init(a, cfg.model)
        cfg = load([*ov, f"sim.weights_file={Path(init_dir).resolve() / 'policy_v0.safetensors'}"], config_name="run")
    run_dir = Path(a.out_dir) / name.replace("+", "plus-")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    save(cfg, run_dir / "config.yaml")
    t0 = time.monotonic()
    result = run(_drive(cfg, run_dir, mode, a.warmup, init_dir))
    print(f"{a.backend} {name} ({a.workers} workers): {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    return {"mode": mode, **result}


def _full_setting(a: argparse.Namespace, name: str, mode: str) -> dict:
    return _run_setting(a, name, mode, FULL)


def main(argv: list[str]) -> dict:
    from bench.common import print_table

    p = argparse.ArgumentParser(prog="everyprompt-bench pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("sim", "hf"), default="sim",
                   help="rollout backend (the learner stays simulated); hf: sync, one_step_off and async on the real "
                        "tiny model with a long-tail workload, then the calibrated simulator on the same settings "
                        "(bench/pipeline_hf.py; its own defaults)")
    p.add_argument("--workers", type=int, default=64, help="rollout workers")
    p.add_argument("--groups-per-step", type=int, default=320, help="groups trained per step")
    p.add_argument("--group-size", type=int, default=8, help="responses per group")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together by one worker")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generation limit per response")
    p.add_argument("--mean-len", type=float, default=64.0, help="mean simulated response length (sim.mean_len)")
    p.add_argument("--chunk-tokens", type=int, default=64, help="tokens per streamed chunk (rollout.chunk_tokens)")
    p.add_argument("--time-scale", type=float, default=6.0,
                   help="wall seconds per simulated second (larger: slower and more faithful on a busy CPU; watch "
                        "coordinator lag in the JSON)")
    p.add_argument("--learner-frac", type=float, default=0.8,
                   help="simulated learner: step time / the step's generation time at full capacity")
    p.add_argument("--reward-workers", type=int, default=2, help="reward worker processes")
    p.add_argument("--pool", type=int, default=8, help="post-processing threads once the pool is on")
    p.add_argument("--warmup", type=int, default=3, help="steps before the measurement window")
    p.add_argument("--steps", type=int, default=6, help="measured steps per setting")
    p.add_argument("--pool-epochs-per-step", type=int, default=2, help="prompt pool = this x groups per step")
    p.add_argument("--settings", default="baseline,+detok_pool,+reward_overlap,+length_aware,one_step_off,async",
                   help="comma-separated settings to run (see above)")
    p.add_argument("--calibrate", action="store_true", help="only fit sim.* decode costs to the hf backend")
    p.add_argument("--calib-steps", type=int, default=24, help="--backend hf: decode steps timed per batch size")
    p.add_argument("--scale", default="", help="comma-separated rollout-worker counts (e.g. 64,256,1024): the "
                   "coordinator at scale, one async sim setting per size (bench/pipeline_scale.py)")
    p.add_argument("--scale-groups-per-worker", type=float, default=1.0, help="--scale: groups per step per worker")
    p.add_argument("--scale-processes", type=int, default=8, help="--scale: processes hosting the simulated workers")
    p.add_argument("--scale-efficiency", type=float, default=0.8,
                   help="--scale: saturated once tokens/s per worker falls under this fraction of the smallest size's")
    p.add_argument("--scale-busy", type=float, default=0.9, help="--scale: a CPU share (of one core for the "
                   "coordinator, of the machine) that counts as busy when naming what bounds a saturated size")
    p.add_argument("--out-dir", default="runs/bench-pipeline", help="folder for the runs")
    p.add_argument("overrides", nargs="*", help="key=value passed to every setting (e.g. sim.decode_base_s=...)")
    a = p.parse_args(argv)
    if a.backend == "hf" and not a.calibrate:  # the real-backend defaults (bench/pipeline_hf.py); flags still win
        from bench.pipeline_hf import HF_DEFAULTS

        p.set_defaults(**HF_DEFAULTS)
        a = p.parse_args(argv)
    configure_logging(role="bench", level=logging.WARNING)  # stdout is the table and the JSON line
    if a.scale:
        from bench.pipeline_scale import run_scale

        return run_scale(a, _full_setting)
    if a.backend == "hf" and not a.calibrate:
        from bench.pipeline_hf import run_hf

        return run_hf(a, _full_setting)
    if a.calibrate:
        from bench.calibrate import calibrate

        fit = calibrate()
        print_table(["batch", "step_s"], [[m["batch"], m["step_s"]] for m in fit["measured"]])
        print(" ".join(f"sim.{k}={v:.3g}" for k, v in fit.items() if k != "measured"))
        return {"calibration": fit}
    results = {}
    for name in a.settings.split(","):
        if name in ABLATION:
            results[name] = _run_setting(a, name, "sync", ABLATION[name])
        else:
            results[name] = _run_setting(a, name, name, FULL)
    if "+length_aware" in results:
        results["sync"] = results["+length_aware"]
    return _report(a, results)


def _report(a: argparse.Namespace, results: dict) -> dict:
    from bench.common import print_table

    base = results.get("sync") or next(iter(results.values()))
    for r in results.values():
        r["speedup_vs_sync"] = r["tokens_per_s"] / base["tokens_per_s"]
    order = [n for n in ("baseline", "+detok_pool", "+reward_overlap", "+length_aware", "sync", "one_step_off",
                         "async") if n in results]
    print_table(["setting", "mode", "tokens/s", "samples/s", "speedup", "rollout idle", "learner idle",
                 "ideal s", "wall s", "of ideal", "max stale", "regen", "discarded", "lag p99 ms"],
                [[n, r["mode"], r["tokens_per_s"], r["samples_per_s"], r["speedup_vs_sync"], r["rollout_idle_frac"],
                  r["learner_idle_frac"], r["ideal_s"], r["wall_s"], r["fraction_of_ideal"],
                  r["max_token_staleness"], r["regenerated_samples"], r["discarded_samples"],
                  r["coordinator_lag_ms_p99"]] for n, r in
                 ((n, results[n]) for n in order)])
    out = {"config": vars(a), "settings": results}
    if "async" in results:
        out["async_speedup"] = results["async"]["tokens_per_s"] / base["tokens_per_s"]
        out["fraction_of_ideal"] = results["async"]["fraction_of_ideal"]
    if "+length_aware" in results and "+reward_overlap" in results:
        before, after = results["+reward_overlap"], results["+length_aware"]
        key = "rollout_idle_worker_s_per_ktoken"  # idle time at equal work
        out["length_aware_idle_reduction"] = 1 - after[key] / before[key]
    if "baseline" in results:
        out["ablation_speedup"] = {n: results[n]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
                                   for n in ABLATION if n in results}
    return out
