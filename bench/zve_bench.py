"""Zero-variance elimination, stage by stage, at an equal rollout budget (ALGORITHMS.md B.2).

One prompt pool is drawn from the built-in task's training distribution and filtered once with
``everyprompt-filter-pool`` (the cheap policy is the cold-start SFT checkpoint, k samples per prompt). Then real
training runs (every actor process) from the same SFT checkpoint add one stage at a time:

  none          the unfiltered pool, fixed group size, 0/1 reward, zero-variance groups get zero advantage
  +offline      the filtered pool (prompts the cheap policy always solves removed)
  +rollout      adaptive group size from the pool's pass rates, and top-ups of groups that agree (raw correctness)
  +reward       graded partial credit, soft overlong and n-gram repetition penalties
  +actor        RL-ZVP token advantages for the groups still zero-variance
  +buffer       the variance-aware replay buffer (all stages)

Every run stops once it has generated ``--budget`` rollout samples. Reported per setting, averaged over steps:
the zero-variance rate after each stage (raw correctness of the first G samples, after top-ups, of the shaped
reward, and with no gradient at all), the wasted-rollout fraction (samples that contributed no gradient), the extra
samples spent, and the final held-out greedy accuracy; over ``--seeds`` seeds (means, and the std of the end
accuracy), with the training figures of the losses bench (clip fractions, entropy, approx_kl, grad-norm spikes,
response lengths). ``--task`` picks the task and its SFT preset (bench/task_presets.py), for the pool, its filter
and every run; arithmetic, the default, is the built-in task as before.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench.task_presets import TASKS, task_help, task_overrides
from bench.training import run_report, summarise_seeds, train

STAGES = {
    "none": [],
    "+offline": [],  # the filtered pool (chosen below)
    "+rollout": ["rollout.adaptive_group_size=true", "rollout.top_up=8"],
    "+reward": ["reward.graded=true", "reward.overlong_coef=0.5", "reward.repetition_coef=0.5"],
    "+actor": ["learner.rl_zvp_alpha=0.1"],
    "+buffer": ["train.buffer_order=variance"],
}


def _filter(a: argparse.Namespace) -> tuple[str, str, dict]:
    """(unfiltered pool, filtered pool, filter stats). Pass rates are estimated once: the filtered run resumes
    from the unfiltered run's progress file."""
    root = Path(a.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tag = "" if a.task == "arithmetic" else f"-{a.task}"  # one pool (and progress file) per task
    unfiltered, filtered = root / f"pool-unfiltered{tag}.jsonl", root / f"pool{tag}.jsonl"
    stats = {}
    for out, flags in ((unfiltered, ["--keep-all"]), (filtered, [])):
        if out == filtered:
            shutil.copyfile(unfiltered.with_name(unfiltered.name + ".progress.jsonl"),
                            filtered.with_name(filtered.name + ".progress.jsonl"))
        proc = subprocess.run([sys.executable, "-m", "engine.data.pool", "--out", str(out), "--pool-size",
                               str(a.pool_size), "-k", str(a.k), "--config-name", a.config_name,
                               *flags, f"sft.cache_dir={a.sft_cache}", *task_overrides(a.task), *a.overrides],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"everyprompt-filter-pool failed:\n{proc.stderr[-2000:]}")
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
    return str(unfiltered), str(filtered), stats


def _stage_run(name: str, seed: int, pool: str, extra: list[str], a: argparse.Namespace) -> dict:
    """One stage, one seed -> its zero-variance figures and run_report's."""
    task = "" if a.task == "arithmetic" else f"-{a.task}"
    run = f"zve{name.replace('+', '-')}{task}" + (f"-s{seed}" if seed else "")  # seed 0: the earlier names
    summary, steps, evals = train(run, [
        *task_overrides(a.task), f"seed={seed}", f"task.train_pool={pool}", f"train.sample_budget={a.budget}",
        "train.num_steps=100000", "train.eval_every=0", "train.checkpoint_every=0", *extra, *a.overrides],
        out_dir=a.out_dir, sft_cache=a.sft_cache, config_name=a.config_name)
    mean = {k: statistics.fmean(r[k] for r in steps) for k in ZV_KEYS}
    return {"seed": seed, **run_report(steps, evals), **mean, "steps": summary["steps"],
            "generated_samples": summary["generated_samples"],
            "extra_samples": steps[-1]["top_up_samples"] + steps[-1]["adaptive_extra_samples"]}


ZV_KEYS = ("zv_rate_first", "zv_rate_raw", "zv_rate_shaped", "zv_rate_final", "wasted_sample_frac", "group_size_mean")


def _stage(runs: list[dict]) -> dict:
    """Seeds of one stage -> summarise_seeds plus the means of the zero-variance figures and sample counts."""
    out = summarise_seeds(runs)
    for k in (*ZV_KEYS, "steps", "generated_samples", "extra_samples"):
        out[k] = statistics.fmean(r[k] for r in runs)
    return out


def main(argv: list[str]) -> dict:
    from bench.common import print_table

    p = argparse.ArgumentParser(prog="everyprompt-bench zve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=40960, help="rollout samples per run (80 steps of 64 x 8)")
    p.add_argument("--pool-size", type=int, default=20000, help="prompts in the pool before the offline filter")
    p.add_argument("-k", type=int, default=8, help="samples per prompt for the offline pass rates")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated, cumulative: each adds to the one before")
    p.add_argument("--task", default="arithmetic", choices=TASKS, help=f"the task and its preset ({task_help()})")
    p.add_argument("--seeds", type=int, default=3, help="seeds per stage (0, 1, ...; 1 = the earlier single run)")
    p.add_argument("--config-name", default="run", help="the preset of every run (tiny for a smoke test)")
    p.add_argument("--out-dir", default="runs/bench-zve", help="folder for the pools and the runs")
    p.add_argument("--sft-cache", default="runs/.sft_cache", help="the cold-start SFT cache shared by every run")
    p.add_argument("overrides", nargs="*", help="key=value passed to every run")
    a = p.parse_args(argv)
    unknown = sorted(set(a.stages.split(",")) - set(STAGES))
    if unknown:
        p.error(f"--stages: {', '.join(unknown)} unknown; choose from {','.join(STAGES)}")
    unfiltered, filtered, pool_stats = _filter(a)
    results, extra = {}, []
    for name in a.stages.split(","):
        extra = extra + STAGES[name]
        pool = unfiltered if name == "none" else filtered
        results[name] = _stage([_stage_run(name, seed, pool, extra, a) for seed in range(a.seeds)])
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"offline filter: {pool_stats['pool']} prompts, {pool_stats['dropped_solved']} always solved by the "
          f"cold-start policy dropped, {pool_stats['kept']} kept")
    print_table(["setting", "zv_first", "zv_raw", "zv_shaped", "zv_final", "wasted", "N mean", "steps",
                 "samples", "acc start->end (+- std)", "gn_spikes", "len mean/p99"],
                [[n, r["zv_rate_first"], r["zv_rate_raw"], r["zv_rate_shaped"], r["zv_rate_final"],
                  r["wasted_sample_frac"], r["group_size_mean"], r["steps"], r["generated_samples"],
                  f"{r['eval_accuracy_start']:.3f}->{r['eval_accuracy_end']:.3f} +- {r['eval_accuracy_end_std']:.3f}",
                  r["grad_norm_spikes"], f"{r['mean_response_tokens']:.1f}/{r['p99_response_tokens']:.0f}"]
                 for n, r in results.items()])
    base, last = results[next(iter(results))], results[list(results)[-1]]
    (Path(a.out_dir) / f"results{'' if a.task == 'arithmetic' else '-' + a.task}.json").write_text(
        json.dumps(results, indent=2))
    return {"config": vars(a), "task": a.task, "pool": pool_stats, "settings": results,
            "zero_variance_rate": {n: r["zv_rate_shaped"] for n, r in results.items()},
            "wasted_rollout_frac": {n: r["wasted_sample_frac"] for n, r in results.items()},
            "eval_accuracy_end": {n: r["eval_accuracy_end"] for n, r in results.items()},
            "acc_end_mean": {n: r["acc_end_mean"] for n, r in results.items()},
            "acc_end_std": {n: r["acc_end_std"] for n, r in results.items()},
            "zv_rate_relative_reduction": 1 - last["zv_rate_shaped"] / max(base["zv_rate_shaped"], 1e-9)}
