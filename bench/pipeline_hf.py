"""``everyprompt-bench pipeline --backend hf``: sync, one-step-off and async on the real tiny model, with a long-tail
length workload, and the simulator calibrated on this box in the same run predicting the same settings.

One invocation:
1. builds the random-init tiny Qwen3-MoE with its EOS suppressed (bench/longtail.py), so that every response runs to
   its prompt's length limit: a per-prompt limit drawn from the simulator's heavy-tailed workload;
2. calibrates the simulator's decode costs on that model, with this run's shapes (bench/calibrate.py: batches up to
   ``--max-batch``, the prompt length, a context of ``--mean-len``, a group of ``--group-size`` joining a running
   batch), one torch thread as each worker runs;
3. runs sync, one_step_off and async with real transformers ``RolloutWorker`` processes (``rollout.backend=hf``,
   engine/modeling/decode.py's continuous batching) and the simulated learner (actors/sim_learner.py, which publishes
   the initial weights file as every version, so every worker really loads a file at each step);
4. runs the same three settings on the simulated backend with the calibrated costs, the same prompts and the very
   same response lengths (``sim.sample_sigma=0``), the same learner, at ``sim.time_scale=1``.

The JSON has ``async_speedup`` (hf async tokens/s / hf sync), ``fraction_of_ideal`` (hf async), and
``sim_predicted_speedup`` with ``sim_relative_error`` ((sim - hf) / hf), the measured length distribution, the
staleness bound per setting (``version_lag_max`` <= ``train.max_staleness``) and the samples discarded.
Cores: each hf worker runs ``rollout.threads_per_worker`` torch threads (1 by default, so ``--workers 2`` puts one
worker on each of 2 cores); the coordinator, the reward workers and the simulated learner (an asyncio sleep, no
compute) share the same cores. ``cores`` and the load average are in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

HF_DEFAULTS = dict(workers=2, groups_per_step=32, group_size=8, max_batch=16, max_new_tokens=200, mean_len=20.0,
                   chunk_tokens=8, time_scale=1.0, reward_workers=1, warmup=3, steps=6, pool_epochs_per_step=3,
                   settings="sync,one_step_off,async")
HF_SETTINGS = ("sync", "one_step_off", "async")


def hf_init(a: argparse.Namespace, model_cfg) -> str:
    """The random-init tiny model with EOS suppressed, saved as an HF folder and as ``policy_v0.safetensors`` (the
    file the simulated learner publishes as every version)."""
    from bench.longtail import eos_probability, suppress_eos
    from engine.data.tasks import CharTokenizer
    from engine.modeling.model import build_model, save_model, save_weights

    path = Path(a.out_dir) / "hf-init-noeos"
    if not (path / "policy_v0.safetensors").exists():
        tok = CharTokenizer()
        model = build_model(model_cfg, tok.vocab_size, seed=0).eval()
        suppress_eos(model, tok.eos_id)
        if eos_probability(model, tok.eos_id) > 1e-6:
            raise RuntimeError("bench/longtail.py suppress_eos left the EOS token samplable")
        save_model(model, path)
        save_weights(model, path / "policy_v0.safetensors")
    return str(path)


def calibrated(a: argparse.Namespace, init_dir: str, sim, threads: int) -> tuple[dict, list[str]]:
    """Fit the simulator's costs on this box with this run's shapes -> (the fit, its ``sim.*`` overrides)."""
    from bench.calibrate import calibrate

    batches = sorted({1, max(1, a.max_batch // 4), max(1, a.max_batch // 2), a.max_batch})
    fit = calibrate(batches=batches, prompt_len=sim.prompt_len, steps=a.calib_steps, model_dir=init_dir,
                    capture_routes=False, context=int(a.mean_len), group_size=a.group_size, threads=threads)
    return fit, [f"sim.{k}={fit[k]:.4g}" for k in ("decode_base_s", "decode_per_seq_s", "prefill_per_token_s")]


def run_hf(a: argparse.Namespace, run_setting) -> dict:
    """Calibrate, then every setting on hf and on sim; ``run_setting(a, name, mode)`` runs one setting."""
    from bench.common import print_table
    from configs.load import load

    base_cfg = load([*(o for o in a.overrides if o.split("=")[0].split(".")[0] in ("model", "sim", "rollout"))],
                    config_name="run")
    a.time_scale = 1.0  # the learner is simulated in both runs: its time must be wall time next to real decoding
    load_before = os.getloadavg()
    init_dir = hf_init(a, base_cfg.model)
    fit, cal = calibrated(a, init_dir, base_cfg.sim, base_cfg.rollout.threads_per_worker)
    print_table(["batch", "decode step s"], [[m["batch"], m["step_s"]] for m in fit["measured"]])
    print("calibrated: " + " ".join(cal))
    a.overrides = [*cal, "sim.sample_sigma=0", *a.overrides]  # the caller's overrides win
    settings = [s for s in a.settings.split(",") if s]
    unknown = [s for s in settings if s not in HF_SETTINGS]
    if unknown or "sync" not in settings:
        raise SystemExit(f"--backend hf runs {', '.join(HF_SETTINGS)} (sync included); not {', '.join(unknown)}")
    results = {}
    for backend in ("hf", "sim"):
        b = copy.copy(a)
        b.backend, b.out_dir = backend, str(Path(a.out_dir) / backend)
        b.hf_init_dir = init_dir
        results[backend] = {name: run_setting(b, name, name) for name in settings}
    return _report(a, results, fit, load_before, threads=base_cfg.rollout.threads_per_worker)


def _report(a: argparse.Namespace, results: dict, fit: dict, load_before, *, threads: int) -> dict:
    from bench.common import print_table

    hf, sim = results["hf"], results["sim"]
    for runs in results.values():
        for r in runs.values():
            r["speedup_vs_sync"] = r["tokens_per_s"] / runs["sync"]["tokens_per_s"]
    print_table(["backend", "setting", "tokens/s", "speedup", "rollout idle", "learner idle", "wall s", "of ideal",
                 "lag max", "bound", "regen", "discarded", "len mean", "len p99", "max/mean", "lag p99 ms"],
                [[bk, n, r["tokens_per_s"], r["speedup_vs_sync"], r["rollout_idle_frac"], r["learner_idle_frac"],
                  r["wall_s"], r["fraction_of_ideal"], r["version_lag_max"], r["max_staleness"],
                  r["regenerated_samples"], r["discarded_samples"], r["lengths"]["mean"], r["lengths"]["p99"],
                  r["lengths"]["max_over_mean"], r["coordinator_lag_ms_p99"]]
                 for bk, runs in results.items() for n, r in runs.items()])
    out = {"config": vars(a), "calibration": fit, "settings": results,
           "lengths": hf["sync"]["lengths"], "cores": os.cpu_count(),
           "core_split": {"rollout_workers": a.workers, "torch_threads_per_worker": threads,
                          "reward_workers": a.reward_workers, "coordinator_processes": 1,
                          "learner": "simulated (asyncio sleep, no compute)"},
           "load_avg_before": load_before[0], "load_avg_after": os.getloadavg()[0],
           "sync_learner_share": 1 - hf["sync"]["learner_idle_frac"],
           "version_lag_max": max(r["version_lag_max"] for r in hf.values()),
           "staleness_bound_held": all(r["version_lag_max"] <= r["max_staleness"] for r in hf.values()),
           "discarded_samples": sum(r["discarded_samples"] for r in hf.values()),
           "stopped_samples_hf": sum(r["stopped_samples"] for r in hf.values())}
    for mode in ("one_step_off", "async"):
        if mode in hf:
            out[f"{mode}_speedup"] = hf[mode]["speedup_vs_sync"]
            out[f"sim_predicted_{mode}_speedup"] = sim[mode]["speedup_vs_sync"]
    if "async" in hf:
        out["async_speedup"] = hf["async"]["speedup_vs_sync"]
        out["fraction_of_ideal"] = hf["async"]["fraction_of_ideal"]
        out["sim_predicted_speedup"] = sim["async"]["speedup_vs_sync"]
        out["sim_relative_error"] = (out["sim_predicted_speedup"] - out["async_speedup"]) / out["async_speedup"]
        out["sim_fraction_of_ideal"] = sim["async"]["fraction_of_ideal"]
        out["speedup_ceiling"] = 1 / hf["sync"]["fraction_of_ideal"]  # async cannot beat the generation ideal
    lengths = out["lengths"]
    print(f"lengths (hf sync, trained): mean {lengths['mean']:.1f}  p50 {lengths['p50']:.0f}  p99 {lengths['p99']:.0f}"
          f"  max {lengths['max']:.0f}  max/mean {lengths['max_over_mean']:.2f}")
    if "async" in hf:
        print(f"async_speedup {out['async_speedup']:.3f}  sim_predicted_speedup {out['sim_predicted_speedup']:.3f}  "
              f"relative error {out['sim_relative_error']:+.3f}  fraction_of_ideal {out['fraction_of_ideal']:.3f}  "
              f"staleness bound held: {out['staleness_bound_held']}  discarded: {out['discarded_samples']}")
    return out
