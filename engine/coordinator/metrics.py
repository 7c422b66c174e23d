"""Run outputs: one JSON object per step in metrics.jsonl (flushed per line, so it stays readable after
Ctrl-C or a crash) and report.png with the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", buffering=1)  # line-buffered: every record is complete on disk

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean, sort_keys=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def truncate_jsonl(path: Path, *, last_step: int) -> None:
    """Keep the records of steps <= last_step (and eval events of versions <= last_step): what a run resumed
    from the checkpoint of step ``last_step`` has already done. A missing file is left missing."""
    if not Path(path).exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", r.get("version", 0)) <= last_step]
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    """Read metrics.jsonl, skipping a torn last line (a run killed mid-write)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


_PANELS = [
    ("reward", "mean reward"),
    ("accuracy", "train accuracy"),
    ("eval_accuracy", "held-out greedy accuracy"),
    ("clip_frac", "clip fraction"),
    ("zero_variance_rate", "zero-variance group rate"),
    ("version_lag_mean", "policy version lag (mean)"),
    ("gen_tokens_per_s", "generated tokens/s"),
    ("step_s", "step time (s)"),
]


def write_report(metrics_path: Path, png_path: Path, *, title: str = "") -> None:
    """Plot the per-step curves of a run into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = read_metrics(metrics_path)
    rows = [r for r in all_rows if "step" in r]
    evals = [{"step": r["version"], "eval_accuracy": r["accuracy"]} for r in all_rows if r.get("event") == "eval"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, label) in zip(axes.flat, _PANELS):
        pts = [(r["step"], r[key]) for r in (evals if key == "eval_accuracy" else rows) if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3)
        if key == "eval_accuracy":
            for x, y in pts:
                ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
