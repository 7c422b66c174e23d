"""Rollout and judge backends by name: the one place that maps ``rollout.backend`` and ``reward.judge.backend`` to
code. The rollout worker (actors/rollout_worker.py), the reward worker's judge and the cluster (which process to
launch per worker) choose a backend only here; configs/schema.py checks ``rollout.backend`` against
``ROLLOUT_BACKENDS``.

Entries are ``"module:function"`` strings resolved on first use, so this module imports nothing heavy and choosing
``sim`` never imports torch, nor ``sglang`` the transformers decode loop.

Adding a backend (e.g. vLLM) = one new file plus one line here:
  1. engine/backends/<name>.py with ``build(cfg, init_dir, worker_id) -> RolloutBackend`` (the protocol in
     engine/backends/base.py; fill rows through ``Row.extend``) and, if it can serve the generative judge,
     ``build_judge(cfg, init_dir, char_tokenizer) -> JudgeBackend``;
  2. ``"<name>": Backend("engine.backends.<name>:build", judge="engine.backends.<name>:build_judge"),`` in
     ``BACKENDS`` below. ``rollout.backend=<name>`` (and ``reward.judge.backend=<name>``) then select it.
Backend-specific options go in the backend's own config section (as ``sim.*`` does).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Backend:
    rollout: str  # "module:function": build(cfg, init_dir, worker_id) -> RolloutBackend
    judge: str = ""  # "module:function": build_judge(cfg, init_dir, char_tokenizer) -> JudgeBackend; "" = none
    worker_module: str = "actors.rollout_worker"  # what the cluster launches (python -m) for this backend's workers


BACKENDS: dict[str, Backend] = {
    "hf": Backend("engine.backends.hf:build", judge="engine.backends.hf:build_judge"),
    "sglang": Backend("engine.backends.sglang:build", judge="engine.backends.sglang:build_judge"),
    "sim": Backend("engine.backends.sim:build", worker_module="engine.backends.sim"),  # many workers per process
}

ROLLOUT_BACKENDS: tuple[str, ...] = tuple(BACKENDS)
JUDGE_BACKENDS: tuple[str, ...] = tuple(name for name, b in BACKENDS.items() if b.judge)


def _entry(name: str, key: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"{key}={name!r} is invalid: choose one of {', '.join(BACKENDS)} "
                         f"(engine/backends/registry.py)")
    return BACKENDS[name]


def resolve(target: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function (imports the module)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def worker_module(name: str) -> str:
    """The module the cluster runs (``python -m``) for workers of rollout backend ``name``."""
    return _entry(name, "rollout.backend").worker_module


def build_rollout(cfg, init_dir: str | None, worker_id: int):
    """The ``RolloutBackend`` of rollout worker ``worker_id`` for ``cfg.rollout.backend``."""
    return resolve(_entry(cfg.rollout.backend, "rollout.backend").rollout)(cfg, init_dir, worker_id)


def build_judge(cfg, init_dir: str | None, char_tokenizer):
    """The ``JudgeBackend`` a reward worker uses for ``reward.plugin=judge`` (``cfg.reward.judge.backend``)."""
    name = cfg.reward.judge.backend
    target = _entry(name, "reward.judge.backend").judge
    if not target:
        raise ValueError(f"reward.judge.backend={name!r} is invalid: it cannot serve a judge; choose one of "
                         f"{', '.join(JUDGE_BACKENDS)}")
    return resolve(target)(cfg, init_dir, char_tokenizer)
