"""ESPO's claim, measured: train a task with each loss for the same rollout budget and seeds.

Every run is a real ``everyprompt-train`` (all actor processes, DeepSpeed learner) from the same cached SFT
checkpoint; only ``learner.loss``, ``seed`` and, with ``--ab-denominator``, ``learner.decoupled`` change.
``--task`` picks the task and its SFT preset (bench/task_presets.py; arithmetic, the default, is the built-in
task as before). Reported per loss, over seeds: final held-out greedy accuracy (mean and std), steps until
held-out accuracy first rose 10 points over the SFT start, clip fractions (all tokens, and per entropy group for
espo), token entropy, KL to the behaviour policy (approx_kl), grad-norm spikes (steps over 5x the run's median
grad_norm), and mean / p99 response length.

``--denominator`` is the importance ratio's denominator: ``rollout`` (the log-prob the rollout worker sampled
with; learner.decoupled=false, the default) or ``recompute`` (the trainer's own old-policy pass with the
rollout's routes replayed, times a truncated behaviour -> proximal weight: learner.decoupled=true).
``--ab-denominator`` runs both arms, each with every loss and seed.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.task_presets import TASKS, task_help, task_overrides
from bench.training import run_report, summarise_seeds, train
from engine.algo.loss_registry import LOSS_NAMES

DENOMINATORS = {"rollout": "learner.decoupled=false", "recompute": "learner.decoupled=true"}


def _name(task: str, denominator: str, loss: str, seed: int) -> str:
    """The run's folder: ``<loss>-s<seed>`` as before for arithmetic / rollout, prefixed by another task and
    suffixed by the recompute arm."""
    prefix = "" if task == "arithmetic" else f"{task}-"
    suffix = "" if denominator == "rollout" else f"-{denominator}"
    return f"{prefix}{loss}-s{seed}{suffix}"


def _run(loss: str, seed: int, denominator: str, a: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    _, steps, evals = train(_name(a.task, denominator, loss, seed), [
        *task_overrides(a.task), f"learner.loss={loss}", f"seed={seed}", f"train.num_steps={a.steps}",
        f"train.eval_every={a.eval_every}", *a.overrides, DENOMINATORS[denominator]],
        out_dir=a.out_dir, sft_cache=a.sft_cache)
    return {"seed": seed, **run_report(steps, evals), "wall_s": time.monotonic() - t0}


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str]) -> dict:
    from bench.common import print_table

    p = argparse.ArgumentParser(prog="everyprompt-bench losses", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default="espo,gspo,grpo,cispo",
                   help=f"comma-separated, any of {','.join(LOSS_NAMES)} (engine/algo/loss_registry.py)")
    p.add_argument("--task", default="arithmetic", choices=TASKS, help=f"the task and its preset ({task_help()})")
    p.add_argument("--seeds", type=int, default=3, help="seeds per loss (0, 1, ...)")
    p.add_argument("--steps", type=int, default=100, help="RL steps per run (the rollout budget)")
    p.add_argument("--eval-every", type=int, default=10, help="greedy eval every this many steps")
    p.add_argument("--denominator", default="rollout", choices=sorted(DENOMINATORS),
                   help="importance-ratio denominator: rollout log-prob, or the trainer's recompute (decoupled)")
    p.add_argument("--ab-denominator", action="store_true", help="run both denominators (rollout, then recompute)")
    p.add_argument("--out-dir", default="runs/bench-losses", help="folder for the runs")
    p.add_argument("--sft-cache", default="runs/.sft_cache", help="the cold-start SFT cache shared by every run")
    p.add_argument("overrides", nargs="*", help="key=value passed to every run")
    a = p.parse_args(argv)
    unknown = sorted(set(a.losses.split(",")) - set(LOSS_NAMES))
    if unknown:
        p.error(f"--losses: {', '.join(unknown)} unknown; choose from {','.join(LOSS_NAMES)}")
    if any(ov.startswith("learner.decoupled=") for ov in a.overrides):
        p.error("pass --denominator recompute (or --ab-denominator), not learner.decoupled=")
    arms = ["rollout", "recompute"] if a.ab_denominator else [a.denominator]
    results: dict[str, dict[str, dict]] = {}
    for arm in arms:
        results[arm] = {}
        for loss in a.losses.split(","):
            results[arm][loss] = summarise_seeds([_run(loss, seed, arm, a) for seed in range(a.seeds)])
            print(f"{arm} {loss}: done", file=sys.stderr, flush=True)
    rows = []
    for arm, by_loss in results.items():
        for loss, r in by_loss.items():
            reached = r["steps_to_plus_10"]
            rows.append([loss, arm, _fmt(r["eval_accuracy_start"], ".3f"),
                         f"{r['eval_accuracy_end']:.3f} +- {r['eval_accuracy_end_std']:.3f}",
                         "-" if reached is None else f"{reached:.0f} ({r['seeds_reaching_plus_10']}/{a.seeds} seeds)",
                         _fmt(r["clip_fraction"]), _fmt(r["clip_frac_hi_ent"]), _fmt(r["clip_frac_lo_ent"]),
                         _fmt(r["entropy_end"]), _fmt(r["approx_kl"]), _fmt(r["grad_norm_spikes"], ".3g"),
                         f"{_fmt(r['mean_response_tokens'], '.1f')}/{_fmt(r['p99_response_tokens'], '.0f')}"])
    print_table(["loss", "denominator", "acc_start", "acc_end (mean +- std)", "steps_to_+10pt", "clip_frac",
                 "clip_hi_ent", "clip_lo_ent", "entropy_end", "approx_kl", "gn_spikes", "len mean/p99"], rows)
    return {"config": vars(a), "task": a.task, "denominator": arms[0], "results": results[arms[0]],
            "arms": results}
