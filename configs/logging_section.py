"""The ``logging`` section of the run config (configs/schema.py imports it): where the metrics go live.

metrics.jsonl is always written (report.png, resume and the benches read it); the live backends mirror every
record under grouped names (engine/coordinator/metric_sinks.py, docs/guides/metrics.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from configs.choices import check_choices, format_choices

BACKENDS = ("jsonl", "tensorboard", "wandb")


@dataclass
class LoggingConfig:
    """Metrics backends (docs/guides/metrics.md). ``jsonl`` is runs/<name>/metrics.jsonl, always on;
    ``tensorboard`` writes event files to runs/<name>/tensorboard/; ``wandb`` logs to Weights & Biases (opt-in,
    offline unless logging.wandb_mode=online). The live backends name metrics rollout/..., train/..., eval/...,
    timing/..., system/...; a backend asked for but not installed stops the run before it starts."""

    backends: Optional[list[str]] = None  # e.g. [jsonl,tensorboard,wandb]; null = jsonl, plus tensorboard when
    # the tensorboard package is installed (pip install -e ".[tensorboard]"), resolved before the run starts
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: runs/<name>/wandb/, upload later with
    # `wandb sync`; online needs a login (wandb login or WANDB_API_KEY)
    wandb_project: str = "everyprompt"  # the W&B project; the run is named after `name`

    def __post_init__(self) -> None:
        check_choices(self, "logging.")
        if self.backends is None:
            return
        for i, name in enumerate(self.backends):
            if name not in BACKENDS:
                raise ValueError(f"logging.backends[{i}]={name!r} is invalid: choose {format_choices(BACKENDS)}")
        if "jsonl" not in self.backends:
            raise ValueError(f"logging.backends={list(self.backends)!r} is invalid: metrics.jsonl is always written "
                             f"(report.png and resume read it); add jsonl, e.g. "
                             f"logging.backends=[{','.join(['jsonl', *self.backends])}]")
