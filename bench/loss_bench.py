"""ESPO's claim, measured: train the built-in task with each loss for the same rollout budget and seeds.

Every run is a real ``everyprompt-train`` (all actor processes, DeepSpeed learner) from the same cached SFT
checkpoint; only ``learner.loss`` and ``seed`` change. Reported per loss, over seeds: final held-out greedy
accuracy (mean and std), steps until held-out accuracy first rose 10 points, mean clip fraction over all steps,
and the mean token entropy of the policy over the last 10% of steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.training import train
from engine.algo.loss_registry import LOSS_NAMES


def _run(loss: str, seed: int, a: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    _, steps, evals = train(f"{loss}-s{seed}", [f"learner.loss={loss}", f"seed={seed}", f"train.num_steps={a.steps}",
                                                f"train.eval_every={a.eval_every}", *a.overrides],
                            out_dir=a.out_dir, sft_cache=a.sft_cache)
    start = evals[0]["accuracy"]
    plus10 = next((r["version"] for r in evals if r["accuracy"] >= start + 0.10), None)
    tail = steps[-max(1, len(steps) // 10):]
    return {"seed": seed, "eval_accuracy_start": start, "eval_accuracy_end": evals[-1]["accuracy"],
            "steps_to_plus_10": plus10, "clip_fraction": statistics.fmean(r["clip_frac"] for r in steps),
            "entropy_end": statistics.fmean(r.get("entropy", float("nan")) for r in tail),
            "wall_s": time.monotonic() - t0}


def _summarise(runs: list[dict]) -> dict:
    ends = [r["eval_accuracy_end"] for r in runs]
    reached = [r["steps_to_plus_10"] for r in runs if r["steps_to_plus_10"] is not None]
    return {"eval_accuracy_end": statistics.fmean(ends), "eval_accuracy_end_std": statistics.pstdev(ends),
            "eval_accuracy_start": statistics.fmean(r["eval_accuracy_start"] for r in runs),
            "steps_to_plus_10": statistics.fmean(reached) if reached else None,
            "seeds_reaching_plus_10": len(reached),
            "clip_fraction": statistics.fmean(r["clip_fraction"] for r in runs),
            "entropy_end": statistics.fmean(r["entropy_end"] for r in runs), "per_seed": runs}


def main(argv: list[str]) -> dict:
    from bench.common import print_table

    p = argparse.ArgumentParser(prog="everyprompt-bench losses", description=__doc__)
    p.add_argument("--losses", default="espo,gspo,grpo,cispo",
                   help=f"comma-separated, any of {','.join(LOSS_NAMES)} (engine/algo/loss_registry.py)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per loss (0, 1, ...)")
    p.add_argument("--steps", type=int, default=100, help="RL steps per run (the rollout budget)")
    p.add_argument("--eval-every", type=int, default=10, help="greedy eval every this many steps")
    p.add_argument("--out-dir", default="runs/bench-losses", help="folder for the runs")
    p.add_argument("--sft-cache", default="runs/.sft_cache", help="the cold-start SFT cache shared by every run")
    p.add_argument("overrides", nargs="*", help="key=value passed to every run")
    a = p.parse_args(argv)
    unknown = sorted(set(a.losses.split(",")) - set(LOSS_NAMES))
    if unknown:
        p.error(f"--losses: {', '.join(unknown)} unknown; choose from {','.join(LOSS_NAMES)}")
    results = {}
    for loss in a.losses.split(","):
        results[loss] = _summarise([_run(loss, seed, a) for seed in range(a.seeds)])
        print(f"{loss}: done", file=sys.stderr, flush=True)
    rows = []
    for loss, r in results.items():
        reached = r["steps_to_plus_10"]
        end = f"{r['eval_accuracy_end']:.3f} +- {r['eval_accuracy_end_std']:.3f}"
        rows.append([loss, r["eval_accuracy_start"], end,
                     "-" if reached is None else f"{reached:.0f} ({r['seeds_reaching_plus_10']}/{a.seeds} seeds)",
                     r["clip_fraction"], r["entropy_end"]])
    print_table(["loss", "acc_start", "acc_end (mean +- std)", "steps_to_+10pt", "clip_frac", "entropy_end"], rows)
    return {"config": vars(a), "results": results}
