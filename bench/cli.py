"""``everyprompt-bench``: measurements, never assertions. Each bench prints a human table and, as the last
stdout line, one JSON object (config, hardware, metrics).

  everyprompt-bench codec       encode/decode throughput of rollout-sized frames through transport/codec.py
  everyprompt-bench generate    rollout tokens/s of the transformers backend by batch size and thread count
  everyprompt-bench losses      ESPO vs GSPO vs GRPO vs CISPO on the built-in task, same budget and seeds
  everyprompt-bench router-replay  rollout-vs-trainer log-prob gap of an MoE in bf16, replay off vs R3
  everyprompt-bench zve         zero-variance elimination stage by stage at an equal rollout budget
  everyprompt-bench chaos       kills, hostile frames, codec fuzz, a stalled consumer, corrupt checkpoints
  everyprompt-bench reward-inversion  advantage sign inversions: noisy scalar reward vs the tie-aware judge
  everyprompt-bench pipeline    sync vs one-step-off vs async, and the throughput ablation (simulated backend)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from bench import chaos_bench, codec_bench, generate_bench, loss_bench, pipeline_bench, router_replay_bench, zve_bench
from bench import reward_inversion_bench

BENCHES = {"codec": codec_bench.main, "generate": generate_bench.main, "losses": loss_bench.main,
           "router-replay": router_replay_bench.main, "zve": zve_bench.main, "pipeline": pipeline_bench.main,
           "reward-inversion": reward_inversion_bench.main, "chaos": chaos_bench.main}


def hardware() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="everyprompt-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=sorted(BENCHES))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the bench (see its --help)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    result = BENCHES[a.bench](a.args)
    print(json.dumps({"bench": a.bench, "hardware": hardware(), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
