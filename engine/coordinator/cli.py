"""``everyprompt-train``: the entry point. Parses the config, prepares runs/<name>/, runs engine.coordinator.loop.run.

Usage: everyprompt-train [--config-name NAME] [--config-dir DIR] [--cfg] [key=value ...]
--cfg (or --print-config) prints the resolved config as YAML (every key: defaults, preset, overrides) and exits.
Writes runs/<name>/{config.yaml, metrics.jsonl, report.png, logs/, policy/ (the trained policy as an HF folder)};
the last stdout line is a JSON summary. Every input is checked first (engine/coordinator/preflight.py).
Ctrl-C (SIGINT) or SIGTERM during RL checkpoints the last completed step (within train.interrupt_checkpoint_s),
stops every actor and exits 130 or 143; summary.json then has "status": "interrupted" and "checkpoint_step".
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import structlog

from configs.load import ConfigError, load_cli, save, to_yaml
from engine.log import configure_logging

log = structlog.get_logger()


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="everyprompt-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", default="run", help="YAML preset in configs/ (e.g. run, tiny)")
    p.add_argument("--config-dir", default=None, help="folder holding your own YAML presets")
    p.add_argument("--cfg", "--print-config", dest="print_config", action="store_true",
                   help="print the resolved config (every key, with the preset and overrides applied) as YAML and "
                        "exit without starting anything")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.num_steps=50 learner.num_ranks=2")
    return p.parse_args(argv)


def prepare_run_dir(out_dir: str, name: str, *, resume: bool = False) -> Path:
    """runs/<name>/ for a fresh run (earlier outputs of the same name are replaced; engine/coordinator/preflight.py
    has refused already unless there were no checkpoints or overwrite=true), or for resuming it from its latest
    checkpoint (its metrics and checkpoints are kept; engine/coordinator/loop.py trims what came after). Earlier
    logs are rotated into logs/attempt-N/."""
    run_dir = Path(out_dir) / name
    if resume:
        from engine.coordinator.checkpoint import latest

        if latest(run_dir) is None:
            raise ConfigError(f"resume=true but {run_dir}/checkpoints holds no complete checkpoint "
                              f"(train.checkpoint_every saves them); drop resume=true to start afresh")
    stale_files = ("report.png", "summary.json") + (() if resume else ("metrics.jsonl", "prompts.jsonl"))
    for stale in stale_files:
        (run_dir / stale).unlink(missing_ok=True)
    for stale in ("weights",) + (() if resume else ("checkpoints",)):
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    rotate_logs(run_dir / "logs")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def rotate_logs(logs: Path) -> Path | None:
    """Move an earlier attempt's logs into ``logs/attempt-N/`` (N = 1, 2, ...): kept for debugging, never deleted."""
    old = [p for p in logs.iterdir() if not p.name.startswith("attempt-")] if logs.is_dir() else []
    if not old:
        return None
    n = 1 + max((int(p.name[8:]) for p in logs.glob("attempt-*") if p.name[8:].isdigit()), default=0)
    dest = logs / f"attempt-{n}"
    dest.mkdir()
    for p in old:
        p.rename(dest / p.name)
    return dest


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    cfg = load_cli("everyprompt-train", args.overrides, config_name=args.config_name, config_dir=args.config_dir)
    if cfg is None:
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    configure_logging(role="coordinator", json_lines=cfg.log_json)
    from engine.coordinator.cluster import ActorFailed  # heavy imports (torch) only after the config is valid
    from engine.coordinator.loop import run
    from engine.coordinator.metrics import write_report
    from engine.coordinator.preflight import prepare
    from transport import run as run_async

    try:
        cfg = prepare(cfg)  # every input checked before runs/<name>/ is touched; replay and limits resolved
        run_dir = prepare_run_dir(cfg.out_dir, cfg.name, resume=cfg.resume)
    except ConfigError as e:
        print(f"everyprompt-train: config error: {e}", file=sys.stderr)
        return 2
    save(cfg, run_dir / "config.yaml")
    log.info("run.start", run_dir=str(run_dir))
    t0, code, summary = time.monotonic(), 0, None
    try:
        summary = run_async(run(cfg, run_dir))
        if summary.get("status") == "interrupted":  # Ctrl-C or SIGTERM during RL: checkpointed, actors stopped
            code = 128 + signal.Signals[summary["signal"]]
            log.warning("run.interrupted", **{k: summary[k] for k in ("signal", "checkpoint_step", "checkpoint",
                                                                      "save_abandoned") if k in summary},
                        detail="every actor was stopped; " + ("resume=true continues from the checkpoint"
                                                              if summary["checkpoint"] else "no checkpoint to resume"))
    except KeyboardInterrupt:  # before RL (SFT), or after it (export)
        log.warning("run.interrupted", detail="every actor was stopped; metrics.jsonl holds the finished steps")
        code = 130
    except ActorFailed as e:  # start_actors (engine/coordinator/cluster.py) raises one exception, never a group
        log.error("run.actor_failed", error=str(e))
        code = 1
    finally:
        if (run_dir / "metrics.jsonl").exists():
            write_report(run_dir / "metrics.jsonl", run_dir / "report.png", title=f"everyprompt: {cfg.name}")
    if summary is None:
        summary = {"status": "failed", "wall_s": time.monotonic() - t0}
        if code == 130:
            summary = {**summary, "status": "interrupted", "checkpoint_step": None}
    summary = {**summary, "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
