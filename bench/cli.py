"""``everyprompt-bench``: measurements, never assertions. Each bench prints a human table and, as the last
stdout line, one JSON object (config, hardware, metrics).

  everyprompt-bench codec       encode/decode throughput of rollout-sized frames through transport/codec.py
  everyprompt-bench generate    rollout tokens/s of the transformers backend by batch size and thread count
  everyprompt-bench losses      ESPO vs GSPO vs GRPO vs CISPO (--task: arithmetic or a reasoning task), same budget and seeds
  everyprompt-bench router-replay  rollout-vs-trainer log-prob gap of an MoE in bf16, replay off vs R3
  everyprompt-bench zve         zero-variance elimination stage by stage at an equal rollout budget
  everyprompt-bench chaos       kills, hostile frames, codec fuzz, a stalled consumer, corrupt checkpoints
  everyprompt-bench soak        a long run (simulated workers) under kills and hostile frames: RSS/fd slopes, loop lag
  everyprompt-bench reward-inversion  advantage sign inversions: noisy scalar reward vs the tie-aware judge
  everyprompt-bench pipeline    sync vs one-step-off vs async, and the throughput ablation (simulated backend)
  everyprompt-bench trl         TRL's GRPOTrainer vs everyprompt side by side, same model and task (extra: trl)
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys

from bench.common import hardware

BENCHES = {  # name -> "module:function"; a bench is imported only when it runs (a new bench: one line here)
    "codec": "bench.codec_bench:main", "generate": "bench.generate_bench:main", "losses": "bench.loss_bench:main",
    "router-replay": "bench.router_replay_bench:main", "zve": "bench.zve_bench:main",
    "pipeline": "bench.pipeline_bench:main", "reward-inversion": "bench.reward_inversion_bench:main",
    "trl": "bench.trl_bench:main",
    "chaos": "bench.chaos_bench:main", "soak": "bench.soak_bench:main"}


def resolve(name: str):
    """The ``main(argv) -> dict`` of the bench called ``name``."""
    module, _, attr = BENCHES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _exit_on_sigterm(signum, _frame) -> None:
    """SIGTERM (a scheduler, ``kill``, a timeout) unwinds the bench like Ctrl-C does: its ``finally`` blocks stop
    the runs it started, which live in sessions of their own and would not get the signal."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    p = argparse.ArgumentParser(prog="everyprompt-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", nargs="?", choices=sorted(BENCHES), help="the bench to run (see the list above)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the bench (see its --help)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)  # optional bench: a stray --flag is named, not hidden
    if a.bench is None:
        p.error(f"name a bench: {', '.join(sorted(BENCHES))}")
    result = resolve(a.bench)(a.args)
    print(json.dumps({"bench": a.bench, "hardware": hardware(), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
