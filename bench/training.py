"""Run ``everyprompt-train`` as a subprocess for a bench and read back what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.coordinator.metrics import read_metrics


def train(name: str, overrides: list[str], *, out_dir: str, sft_cache: str, config_name: str = "run",
          ) -> tuple[dict, list[dict], list[dict]]:
    """One real run (every actor process) -> (summary, per-step rows, eval rows). Raises with the log tail."""
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", config_name, f"name={name}",
            f"out_dir={out_dir}", "progress=false",
            f"sft.cache_dir={sft_cache}", *overrides]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {out_dir}/{name}/logs. "
                           f"stderr tail:\n{proc.stderr[-2000:]}")
    rows = read_metrics(Path(out_dir) / name / "metrics.jsonl")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, [r for r in rows if "step" in r], [r for r in rows if r.get("event") == "eval"]
