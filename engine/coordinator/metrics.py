"""Run outputs: one JSON object per step in metrics.jsonl (flushed per line, so it stays readable after
Ctrl-C or a crash), mirrored to the live backends of ``logging.backends``, and report.png with the curves."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from engine.coordinator.metric_sinks import grouped


class MetricsWriter:
    """Appends records to ``path``; each one also goes to the live ``sinks`` (engine/coordinator/metric_sinks.py:
    TensorBoard, W&B) under its grouped names."""

    def __init__(self, path: Path, sinks: Sequence = ()) -> None:
        self.path = path
        self._f = open(path, "a", buffering=1)  # line-buffered: every record is complete on disk
        self._sinks = list(sinks)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean, sort_keys=False) + "\n")
        self._f.flush()
        if self._sinks and (live := grouped(clean)) is not None:
            for sink in self._sinks:
                sink.write(*live)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        for sink in self._sinks:
            sink.close()
        self._sinks = []


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


_PANELS = [  # (title, the per-step keys drawn in it); "eval_accuracy" is the eval events' accuracy
    ("mean reward", ("reward",)),
    ("train accuracy", ("accuracy",)),
    ("held-out greedy accuracy", ("eval_accuracy",)),
    ("entropy (mean over response tokens)", ("entropy",)),
    ("KL to the behaviour policy (k3, approx_kl)", ("approx_kl",)),
    ("response length (tokens)", ("response_len",)),
    ("staleness (policy versions per token)", ("version_lag_mean", "version_lag_max")),
    ("clip fraction", ("clip_frac",)),
    ("zero-variance group rate", ("zero_variance_rate",)),
    ("grad norm", ("grad_norm",)),
    ("generated tokens/s", ("gen_tokens_per_s",)),
    ("step time (s)", ("step_s",)),
]


def report_panels(rows: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """The panels of report.png for these per-step rows: reward and train accuracy share one panel, "reward =
    train accuracy", when their series are identical (exact-match rewards)."""
    pairs = [(r.get("reward"), r.get("accuracy")) for r in rows]
    if pairs and all(a == b for a, b in pairs):
        return [("reward = train accuracy", ("reward",))] + [p for p in _PANELS if p[1] not in (("reward",),
                                                                                                  ("accuracy",))]
    return list(_PANELS)


def _series(rows: list[dict], evals: list[dict], key: str) -> list[tuple[int, float]]:
    source = evals if key == "eval_accuracy" else rows
    return [(r["step"], r[key]) for r in source if r.get(key) is not None]


def _draw(ax, title: str, keys: tuple[str, ...], rows: list[dict], evals: list[dict]) -> None:
    from matplotlib.ticker import MaxNLocator

    for key in keys:
        pts = _series(rows, evals, key)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
        if key == "eval_accuracy":
            for x, y in pts:
                ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center")
    if len(keys) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.ticklabel_format(axis="y", useOffset=False)  # e.g. entropy 4.5368, not +4.536 and 0.0008
    ax.grid(alpha=0.3)


def write_report(metrics_path: Path, png_path: Path, *, title: str = "") -> None:
    """Plot the per-step curves of a run into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = read_metrics(metrics_path)
    rows = [r for r in all_rows if "step" in r]
    evals = [{"step": r["version"], "eval_accuracy": r["accuracy"]} for r in all_rows if r.get("event") == "eval"]
    panels = report_panels(rows)
    fig, axes = plt.subplots(3, 4, figsize=(16, 10))
    for ax, (label, keys) in zip(axes.flat, panels):
        _draw(ax, label, keys, rows, evals)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
