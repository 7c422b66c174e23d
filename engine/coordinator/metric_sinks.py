"""Live metrics backends (``logging.backends``): TensorBoard and W&B mirrors of metrics.jsonl.

metrics.jsonl keeps its flat keys (tests, benches and report.png read them); each record it gets is also sent to
the live backends under a grouped name, as verl users expect (docs/guides/metrics.md has the table):

    rollout/   what was generated and how it was scored: reward, accuracy, response_len, zero-variance rates,
               version lag, staleness_hist/<k>, gen_tokens_per_s, the rollout counters, samples_by_worker/<peer>
    train/     what the learner did: loss, approx_kl, entropy*, clip_frac*, ratio_*, grad_norm, lr, logprob_gap_*,
               routing_mismatch_frac, tokens, version, train_tokens_per_s
    eval/      the greedy evals (``{"event": "eval"}`` records, at step = their policy version)
    timing/    every other key ending in ``_s`` (step_s, learner_wait_s, train_s, publish_s, elapsed_s, eval_s)
    system/    the processes and the wire: actor/learner restarts, frames_rejected, inbox_peak, buffer*, gen_idle_frac
    misc/      any key not listed here

Dicts and lists are flattened (``samples_by_worker/rollout-0``, ``staleness_hist/1``); strings and nulls are
skipped. TensorBoard and wandb are imported only when asked for (engine/coordinator/preflight.py checks that they
are installed before anything starts).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from configs.logging_section import LoggingConfig
from engine.coordinator.counters import RolloutCounters

_ROLLOUT = {"reward", "accuracy", "response_len", "mean_response_tokens", "p99_response_tokens", "num_samples",
            "group_size_mean", "valid_frac", "routed_frac", "partial_sample_frac", "wasted_sample_frac", "zero_variance_rate", "version_lag_mean", "version_lag_max",
            "staleness_hist", "gen_tokens_per_s", "route_bytes_per_token", "plugin_failure_frac",
            "samples_by_worker", *(f.name for f in dataclasses.fields(RolloutCounters))}
_TRAIN = {"version", "loss", "approx_kl", "grad_norm", "lr", "tokens", "sequences", "hi_ent_token_frac",
          "routing_mismatch_frac", "behavior_proximal_abs_diff", "train_tokens_per_s"}
_SYSTEM = {"buffered_groups", "actor_restarts", "learner_restarts", "frames_rejected", "inbox_peak", "gen_idle_frac",
           "gen_paused_frac"}
_PREFIXES = (("rollout", ("zv_rate_", "judge_")), ("system", ("buffer_",)),
             ("train", ("clip_frac", "entropy", "eps_", "ratio_", "logprob_gap_", "abs_log_ratio_")))
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> the package it needs
EXTRAS = {"tensorboard": 'pip install -e ".[tensorboard]"', "wandb": 'pip install -e ".[wandb]"'}


def live_name(key: str) -> str:
    """The grouped name of a per-step metrics.jsonl key, e.g. ``loss`` -> ``train/loss``."""
    for group, names in (("rollout", _ROLLOUT), ("train", _TRAIN), ("system", _SYSTEM)):
        if key in names:
            return f"{group}/{key}"
    for group, prefixes in _PREFIXES:
        if key.startswith(prefixes):
            return f"{group}/{key}"
    return f"timing/{key}" if key.endswith("_s") and not key.endswith("_per_s") else f"misc/{key}"


def _flat(name: str, value) -> dict[str, float]:
    if isinstance(value, dict):
        return {k: v for sub, item in value.items() for k, v in _flat(f"{name}/{sub}", item).items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat(f"{name}/{i}", item).items()}
    if isinstance(value, (bool, int, float)):
        return {name: float(value)}
    return {}  # strings, nulls


def grouped(record: dict) -> tuple[int, dict[str, float]] | None:
    """(step, {grouped name: value}) of a metrics.jsonl record; None for a record that is neither a step nor an
    event (e.g. a prompts.jsonl line)."""
    if "event" in record:  # e.g. {"event": "eval", "version": 3, "accuracy": ...}: at the step of its version
        event, step = str(record["event"]), int(record.get("version", record.get("step", 0)))
        names = {k: f"timing/{k}" if k.endswith("_s") else f"{event}/{k}"
                 for k in record if k not in ("event", "version", "step")}
    elif "step" in record:
        step, names = int(record["step"]), {k: live_name(k) for k in record if k != "step"}
    else:
        return None
    return step, {k: v for key, name in names.items() for k, v in _flat(name, record[key]).items()}


def installed(backend: str) -> bool:
    """Whether the package ``backend`` needs can be imported (without importing it)."""
    return importlib.util.find_spec(MODULES[backend]) is not None


def resolve_backends(cfg: LoggingConfig) -> list[str]:
    """``logging.backends``, or when unset its default: jsonl, plus tensorboard when it is installed."""
    if cfg.backends is not None:
        return list(cfg.backends)
    return ["jsonl"] + (["tensorboard"] if installed("tensorboard") else [])


class TensorBoardSink:
    """Event files in ``log_dir`` (runs/<name>/tensorboard/), flushed after every record."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One W&B run per attempt, in runs/<name>/wandb/; offline unless ``logging.wandb_mode=online``."""

    def __init__(self, run_dir: Path, cfg) -> None:
        import wandb

        self._run = wandb.init(project=cfg.logging.wandb_project, name=cfg.name, dir=str(run_dir),
                               mode=cfg.logging.wandb_mode, config=dataclasses.asdict(cfg))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


def open_sinks(cfg, run_dir: Path) -> list:
    """The live backends ``cfg.logging.backends`` asks for (jsonl is MetricsWriter's own file)."""
    backends = resolve_backends(cfg.logging)
    sinks: list = []
    if "tensorboard" in backends:
        sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
    if "wandb" in backends:
        sinks.append(WandbSink(Path(run_dir), cfg))
    return sinks
