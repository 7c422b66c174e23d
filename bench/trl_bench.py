"""everyprompt against TRL's GRPOTrainer, side by side: the same model from the same weights, the same task.

For every setting of ``--completions`` (completions per optimizer step; 16, 128 and 512 by default), one TRL run
(bench/trl_side.py, in its own process) and one everyprompt run (a real ``everyprompt-train``: every actor
process, the DeepSpeed learner) are made one after the other, TRL first, and the whole sequence is repeated
``--rounds`` times (TRL, ours, TRL, ours, ...), so slow phases of a shared machine hit both sides alike.

Held equal on both sides: the cold-start SFT checkpoint both start from (the run's own SFT cache; TRL gets it as
a local HF folder with a tokenizer of the very same ids), the prompts and their token ids (the run's prompt
stream, in order), the reward (the run's verifier and shaping), G (``--group-size``), max new tokens
(``task.max_answer_tokens``), temperature, learning rate (``--lr``, constant, AdamW), the clip range (the
``learner.grpo`` one; TRL's default token-mean "dapo" loss matches ``learner.loss=grpo``, the default
``--loss``), the group std (unbiased), and the CPU threads in total (``--threads``, all the cores this process
may use by default: TRL's one process runs ``torch.set_num_threads(threads)``; everyprompt runs one rollout
worker with 1 thread and the learner with ``threads - 1``; the coordinator and reward worker are Python
processes that compute no tensors). Held-out accuracy is measured the same way on both sides: greedy, on the
task's eval set, scored with the verifier through engine/evaluation.py, every ``--eval-every`` steps.

Each run trains for ``--budget-s`` seconds of training time (held-out evals and process start-up excluded on
both sides) or ``--steps`` optimizer steps, whichever comes first. Reported per setting and side: trained
(completion) tokens per second, steps, held-out accuracy start -> end, and the training seconds to reach
``--gain`` (0.2) over the start; for everyprompt also the learner's share of the step and the rollout workers'
idle share. The JSON has ``ratio_e2e_tokens_per_s`` (everyprompt / TRL per setting, and ``best_vs_best``: our
best setting's tokens/s over TRL's best) and ``ratio_time_to_gain`` (TRL seconds / everyprompt seconds to +gain;
null, with the reason in ``time_to_gain_reasons``, when a side never got there).

TRL is an optional extra (``pip install 'everyprompt[trl]'``), imported only by the TRL side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

INSTALL = "pip install 'everyprompt[trl]'"


def trl_missing() -> str | None:
    """None when TRL imports, else the one-line error naming the extra."""
    try:
        importlib.import_module("trl")
    except ImportError as e:
        return f"everyprompt-bench trl: TRL is not installed ({e}); install it with: {INSTALL}"
    return None


def _common(a: argparse.Namespace, per_step: int) -> list[str]:
    """The overrides both sides build their config, task and reward from."""
    return ["sft.max_time_s=1800",  # the step cap or the target ends SFT, not a loaded box's clock (not in the key)
            f"rollout.group_size={a.group_size}", f"train.groups_per_step={per_step // a.group_size}",
            f"learner.lr={a.lr}", f"learner.loss={a.loss}", "learner.adv_std=unbiased",
            f"sft.cache_dir={a.sft_cache}", *a.overrides]


def eval_every(a: argparse.Namespace, per_step: int) -> int:
    """``--eval-every`` steps, or (0) about one eval per ``--eval-completions`` completions."""
    return a.eval_every or max(1, round(a.eval_completions / per_step))


def sft_start(a: argparse.Namespace) -> str:
    """The SFT checkpoint both sides start from: the run's own cached one (trained here on a cache miss)."""
    from configs.load import load
    from engine.coordinator.preflight import resolve_answer_limit
    from engine.data.tasks import load_task
    from engine.modeling.sft import initial_policy

    cfg = load(_common(a, a.group_size))
    task = load_task(cfg)
    cfg = resolve_answer_limit(cfg, task.max_answer_tokens)  # as everyprompt-train does: the same SFT cache key
    init_dir, stats = initial_policy(cfg, task, progress=False)
    if stats.get("reached_target") is False:
        print(f"everyprompt-bench trl: warning: the SFT start {init_dir} stopped at dev accuracy "
              f"{stats.get('dev_accuracy', 0):.3f}, below sft.target_accuracy={cfg.sft.target_accuracy}",
              file=sys.stderr)
    return init_dir


def gain_time(evals: list[dict], gain: float) -> tuple[float | None, str | None]:
    """(training seconds of the first eval at least ``gain`` over the first, None) or (None, why not)."""
    if not evals:
        return None, "no held-out eval"
    start = evals[0]["accuracy"]
    hit = next((e for e in evals if e["accuracy"] >= start + gain - 1e-12), None)
    if hit is None:
        best = max(e["accuracy"] for e in evals)
        return None, (f"never reached +{gain:g} over {start:.3f} (best {best:.3f} in {len(evals)} evals, "
                      f"{evals[-1]['train_s']:.0f} s)")
    return hit["train_s"], None


def _summary(side: str, steps: list[dict], evals: list[dict], startup_s: float | None, a, **extra) -> dict:
    train_s = steps[-1]["train_s"] if steps else 0.0
    tokens = sum(r["tokens"] for r in steps)
    t_gain, why = gain_time(evals, a.gain)
    return {"side": side, "steps": len(steps), "tokens": tokens, "train_s": train_s,
            "tokens_per_s": tokens / train_s if train_s > 0 else None, "startup_s": startup_s,
            "acc_start": evals[0]["accuracy"] if evals else None, "acc_end": evals[-1]["accuracy"] if evals else None,
            "time_to_gain_s": t_gain, "time_to_gain_reason": why, "evals": evals, **extra}


def run_trl(a, per_step: int, sft_dir: str, round_: int) -> dict:
    work = Path(a.out_dir) / f"trl-c{per_step}-r{round_}"
    work.mkdir(parents=True, exist_ok=True)
    spec = {"overrides": _common(a, per_step), "sft_dir": sft_dir, "work_dir": str(work), "threads": a.threads,
            "completions_per_step": per_step, "steps": a.steps, "budget_s": a.budget_s,
            "eval_every": eval_every(a, per_step)}
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    with open(work / "trl.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "bench.trl_side", str(work / "spec.json"),
                               str(work / "result.json")], stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (work / "trl.log").read_text()[-2000:]
        raise RuntimeError(f"the TRL run failed (exit {proc.returncode}); log {work / 'trl.log'}:\n{tail}")
    r = json.loads((work / "result.json").read_text())
    return _summary("trl", r["steps"], r["evals"], r["startup_s"], a, wall_s=time.monotonic() - t0,
                    threads=r["threads"], trl_version=r["trl_version"])


def run_ours(a, per_step: int, round_: int) -> dict:
    """One real everyprompt-train run; stopped with SIGINT (no checkpoint) once ``--budget-s`` of training
    time (the sum of step_s: evals excluded) has passed."""
    from engine.coordinator.metrics import read_metrics

    name = f"ours-c{per_step}-r{round_}"
    run_dir = Path(a.out_dir) / name
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # this bench's own earlier run: never read stale rows
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "run", f"name={name}",
            f"out_dir={a.out_dir}", "progress=false", "overwrite=true", "train.checkpoint_every=0",
            "train.interrupt_checkpoint_s=0", f"train.num_steps={a.steps}",
            f"train.eval_every={eval_every(a, per_step)}", "rollout.num_workers=1", "rollout.threads_per_worker=1",
            f"learner.threads_per_rank={a.threads - 1}", *_common(a, per_step)]
    t0 = time.monotonic()
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out_dir) / f"{name}.stderr", "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        stopped = False
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
                if (a.budget_s and not stopped
                        and sum(r.get("step_s", 0.0) for r in rows if "step" in r) >= a.budget_s):
                    proc.send_signal(signal.SIGINT)  # train.interrupt_checkpoint_s=0: stop at once, save nothing
                    stopped = True
            out = proc.stdout.read()
        finally:
            if proc.poll() is None:  # this bench was interrupted: the run stops its own actor processes
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
    if proc.returncode not in (0, 130) or (proc.returncode == 130 and not stopped):
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {a.out_dir}/{name}.stderr and "
                           f"{run_dir}/logs")
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps, evals, clock, version_s = [], [], 0.0, {0: 0.0}
    for r in rows:
        if "step" in r:
            clock += r["step_s"]
            version_s[r["version"]] = clock
            steps.append({"step": r["step"], "train_s": clock, "tokens": r.get("tokens", 0.0),
                          "learner_s": r.get("train_s"), "step_s": r["step_s"], "idle": r.get("gen_idle_frac")})
        elif r.get("event") == "eval" and r["version"] in version_s:
            evals.append({"step": r["version"], "accuracy": r["accuracy"], "train_s": version_s[r["version"]]})
    summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    first = steps[0]["step_s"] if steps else None
    learner = [s["learner_s"] / s["step_s"] for s in steps[1:] if s["learner_s"] is not None and s["step_s"] > 0]
    idle = [s["idle"] for s in steps[1:] if s["idle"] is not None]
    startup = (summary.get("wall_s", time.monotonic() - t0) - steps[-1]["train_s"]) if steps else None
    return _summary("ours", steps, evals, None, a, wall_s=time.monotonic() - t0, startup_incl_evals_s=startup,
                    first_step_s=first, learner_share=statistics.fmean(learner) if learner else None,
                    rollout_idle=statistics.fmean(idle) if idle else None,
                    stopped_by_budget=stopped, exit=proc.returncode)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _mean(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def compare(results: dict[int, dict[str, list[dict]]]) -> dict:
    """Per setting and best vs best: tokens/s ours / TRL, and seconds to +gain TRL / ours (null + reason)."""
    tps, ttg, reasons, per = {}, {}, {}, {}
    for c, sides in results.items():
        per[c] = {side: {"tokens_per_s": (sum(r["tokens"] for r in runs) / sum(r["train_s"] for r in runs)
                                          if sum(r["train_s"] for r in runs) > 0 else None),
                         "time_to_gain_s": _mean(runs, "time_to_gain_s"),
                         "reason": "; ".join(r["time_to_gain_reason"] for r in runs if r["time_to_gain_reason"])}
                  for side, runs in sides.items()}
        tps[str(c)] = _ratio(per[c]["ours"]["tokens_per_s"], per[c]["trl"]["tokens_per_s"])
        ttg[str(c)] = _ratio(per[c]["trl"]["time_to_gain_s"], per[c]["ours"]["time_to_gain_s"])
        if ttg[str(c)] is None:
            reasons[str(c)] = "; ".join(f"{side}: {p['reason']}" for side, p in per[c].items() if p["reason"])
    best = {side: max((p[side]["tokens_per_s"] or 0.0 for p in per.values()), default=0.0) for side in ("ours", "trl")}
    tps["best_vs_best"] = _ratio(best["ours"], best["trl"])
    fastest = {side: min((p[side]["time_to_gain_s"] for p in per.values() if p[side]["time_to_gain_s"] is not None),
                         default=None) for side in ("ours", "trl")}
    ttg["best_vs_best"] = _ratio(fastest["trl"], fastest["ours"])
    if ttg["best_vs_best"] is None:
        reasons["best_vs_best"] = "; ".join(f"{side} never reached the gain at any setting"
                                            for side, t in fastest.items() if t is None)
    return {"ratio_e2e_tokens_per_s": tps, "ratio_time_to_gain": ttg, "time_to_gain_reasons": reasons,
            "best_tokens_per_s": best, "best_time_to_gain_s": fastest}


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str]) -> dict:
    from bench.common import print_table

    p = argparse.ArgumentParser(prog="everyprompt-bench trl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--completions", default="16,128,512", help="completions per optimizer step, comma-separated "
                   "(each a multiple of --group-size)")
    p.add_argument("--group-size", type=int, default=8, help="G, completions per prompt (both sides)")
    p.add_argument("--budget-s", type=float, default=60.0, help="training seconds per run (evals and start-up "
                   "excluded; 0 = no limit, --steps decides)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run at most")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (TRL, ours) per setting")
    p.add_argument("--eval-every", type=int, default=0, help="held-out greedy eval every this many steps "
                   "(0 = about one eval per --eval-completions completions)")
    p.add_argument("--eval-completions", type=int, default=2048, help="see --eval-every")
    p.add_argument("--gain", type=float, default=0.2, help="held-out accuracy gain the time-to-gain is taken at")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (both sides; constant)")
    p.add_argument("--loss", default="grpo", help="everyprompt's learner.loss (grpo = TRL's token-mean loss)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPU threads in total on each side (at least 2: everyprompt's worker + learner)")
    p.add_argument("--out-dir", default="runs/bench-trl", help="folder for the runs")
    p.add_argument("--sft-cache", default="runs/.sft_cache", help="the cold-start SFT cache both sides start from")
    p.add_argument("overrides", nargs="*", help="key=value passed to both sides (task.*, rollout.temperature, ...)")
    a = p.parse_args(argv)
    settings = [int(c) for c in a.completions.split(",")]
    if any(c % a.group_size for c in settings):
        p.error(f"--completions: each setting must be a multiple of --group-size={a.group_size}")
    if a.threads < 2:
        p.error("--threads must be at least 2 (everyprompt's rollout worker and learner, one thread each)")
    if missing := trl_missing():
        print(missing, file=sys.stderr)
        raise SystemExit(2)
    sft_dir = sft_start(a)
    results: dict[int, dict[str, list[dict]]] = {c: {"trl": [], "ours": []} for c in settings}
    load: list[float] = []
    for round_ in range(a.rounds):
        for c in settings:
            for side in ("trl", "ours"):
                load.append(os.getloadavg()[0])
                r = run_trl(a, c, sft_dir, round_) if side == "trl" else run_ours(a, c, round_)
                r["load_before"] = load[-1]
                results[c][side].append(r)
                print(f"round {round_} c={c} {side}: {_fmt(r['tokens_per_s'], '.0f')} tok/s, "
                      f"{r['steps']} steps, acc {_fmt(r['acc_start'], '.3f')} -> {_fmt(r['acc_end'], '.3f')}",
                      file=sys.stderr, flush=True)
    out = compare(results)
    rows = []
    for c in settings:
        for side in ("trl", "ours"):
            for r in results[c][side]:
                rows.append([c, side, r["steps"], _fmt(r["tokens_per_s"], ".0f"), _fmt(r["train_s"], ".1f"),
                             f"{_fmt(r['acc_start'], '.3f')} -> {_fmt(r['acc_end'], '.3f')}",
                             _fmt(r["time_to_gain_s"], ".1f"), _fmt(r.get("learner_share"), ".2f"),
                             _fmt(r.get("rollout_idle"), ".2f"), _fmt(r["load_before"], ".1f")])
    print_table(["completions", "side", "steps", "trained tok/s", "train s", "held-out acc",
                 f"s to +{a.gain:g}", "learner share", "rollout idle", "load"], rows)
    print(f"ratio tok/s ours/TRL: {json.dumps(out['ratio_e2e_tokens_per_s'])}")
    print(f"ratio s to +{a.gain:g} TRL/ours: {json.dumps(out['ratio_time_to_gain'])}")
    return {"config": vars(a), "sft_dir": sft_dir, **out, "load_average": load,
            "settings": {str(c): sides for c, sides in results.items()}}
