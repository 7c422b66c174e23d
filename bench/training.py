"""Run ``everyprompt-train`` as a subprocess for a bench, read back what it wrote, and reduce a run to the
figures the training benches (losses, zve) report."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from engine.coordinator.metrics import read_metrics

SPIKE_FACTOR = 5.0  # a grad-norm spike: a step whose grad_norm exceeds this many times the run's median
PLUS = 0.10  # steps_to_plus10: the first eval at least this far above the SFT start


def train(name: str, overrides: list[str], *, out_dir: str, sft_cache: str, config_name: str = "run",
          ) -> tuple[dict, list[dict], list[dict]]:
    """One real run (every actor process) -> (summary, per-step rows, eval rows). Raises with the log tail.

    ``overwrite=true``: a bench run replaces an earlier run of the same name (its logs are kept in
    ``logs/attempt-N/``), so a bench can be run again into the same folder."""
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", config_name, f"name={name}",
            f"out_dir={out_dir}", "progress=false", "overwrite=true",
            f"sft.cache_dir={sft_cache}", *overrides]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {out_dir}/{name}/logs. "
                           f"stderr tail:\n{proc.stderr[-2000:]}")
    rows = read_metrics(Path(out_dir) / name / "metrics.jsonl")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, [r for r in rows if "step" in r], [r for r in rows if r.get("event") == "eval"]


def _mean(steps: list[dict], key: str) -> float | None:
    """Mean of ``key`` over the steps that report it as a finite number (None when none does)."""
    vals = [float(r[key]) for r in steps if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return statistics.fmean(vals) if vals else None


def _group_clip(steps: list[dict], group: str) -> float | None:
    """ESPO's clip fraction of one entropy group (``hi_ent`` / ``lo_ent``): upper + lower, mean over steps.
    None for a loss without entropy groups (only ``espo`` logs ``clip_frac_upper_<group>``)."""
    up, lo = _mean(steps, f"clip_frac_upper_{group}"), _mean(steps, f"clip_frac_lower_{group}")
    return None if up is None or lo is None else up + lo


def grad_spikes(steps: list[dict], factor: float = SPIKE_FACTOR) -> tuple[int, float | None]:
    """(steps whose grad_norm > factor x the run's median grad_norm, max grad_norm / median). Steps with no
    gradient (grad_norm 0: every group zero-variance) are left out of both; (0, None) when no step has one."""
    norms = [float(r["grad_norm"]) for r in steps if isinstance(r.get("grad_norm"), (int, float))
             and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0]
    if not norms:
        return 0, None
    median = statistics.median(norms)
    return sum(n > factor * median for n in norms), max(norms) / median


def steps_to_plus(evals: list[dict], plus: float = PLUS) -> int | None:
    """The policy version of the first eval at least ``plus`` above the first (the SFT start); None if none."""
    start = evals[0]["accuracy"]
    return next((r["version"] for r in evals if r["accuracy"] >= start + plus - 1e-12), None)


def run_report(steps: list[dict], evals: list[dict]) -> dict:
    """One run's figures: held-out accuracy (start, end, steps to +10 points), clip fractions (all tokens and per
    ESPO entropy group), entropy (mean, and over the last 10% of steps), KL to the behaviour policy (approx_kl),
    grad-norm spikes, and response lengths (mean of the per-step mean and p99)."""
    tail = steps[-max(1, len(steps) // 10):]
    spikes, spike_ratio = grad_spikes(steps)
    return {"eval_accuracy_start": evals[0]["accuracy"], "eval_accuracy_end": evals[-1]["accuracy"],
            "steps_to_plus_10": steps_to_plus(evals),
            "clip_fraction": _mean(steps, "clip_frac"),
            "clip_frac_hi_ent": _group_clip(steps, "hi_ent"), "clip_frac_lo_ent": _group_clip(steps, "lo_ent"),
            "hi_ent_token_frac": _mean(steps, "hi_ent_token_frac"),
            "entropy_mean": _mean(steps, "entropy"), "entropy_end": _mean(tail, "entropy"),
            "approx_kl": _mean(steps, "approx_kl"),
            "behavior_proximal_abs_diff": _mean(steps, "behavior_proximal_abs_diff"),
            "is_truncated_frac": _mean(steps, "is_truncated_frac"),  # recompute arm (decoupled) only
            "grad_norm_spikes": spikes, "grad_norm_max_over_median": spike_ratio,
            "mean_response_tokens": _mean(steps, "mean_response_tokens"),
            "p99_response_tokens": _mean(steps, "p99_response_tokens")}


_AVERAGED = ("clip_fraction", "clip_frac_hi_ent", "clip_frac_lo_ent", "hi_ent_token_frac", "entropy_mean",
             "entropy_end", "approx_kl", "behavior_proximal_abs_diff", "is_truncated_frac", "grad_norm_spikes",
             "grad_norm_max_over_median", "mean_response_tokens", "p99_response_tokens")


def summarise_seeds(runs: list[dict]) -> dict:
    """Seeds of one setting -> means (and the std of the end accuracy) of ``run_report``'s figures, the old
    keys (``eval_accuracy_end``, ``eval_accuracy_end_std``, ``steps_to_plus_10``, ...) and the issue-19 names
    (``acc_end_mean``, ``acc_end_std``, ``steps_to_plus10``), plus every seed's own report in ``per_seed``."""
    ends = [r["eval_accuracy_end"] for r in runs]
    reached = [r["steps_to_plus_10"] for r in runs if r["steps_to_plus_10"] is not None]
    out = {"eval_accuracy_end": statistics.fmean(ends), "eval_accuracy_end_std": statistics.pstdev(ends),
           "eval_accuracy_start": statistics.fmean(r["eval_accuracy_start"] for r in runs),
           "steps_to_plus_10": statistics.fmean(reached) if reached else None,
           "seeds_reaching_plus_10": len(reached)}
    for key in _AVERAGED:
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.fmean(vals) if vals else None
    out.update(acc_end_mean=out["eval_accuracy_end"], acc_end_std=out["eval_accuracy_end_std"],
               steps_to_plus10=out["steps_to_plus_10"], seeds=len(runs), per_seed=runs)
    return out
