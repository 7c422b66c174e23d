"""Compose a run configuration from the schema, a YAML preset and ``key=value`` overrides.

This is the only place that turns hydra/omegaconf objects into typed ``RunConfig`` dataclasses. Every problem
(an unknown key, a value of the wrong type, an inconsistent setting) becomes a ``ConfigError`` whose message
names the key and how to fix it, raised before any process starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import typing
from pathlib import Path
from typing import Optional

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.schema import RunConfig, field_types, literal_choices


@functools.cache
def omega_schema(cls: type) -> type:
    """A mirror of the config dataclass ``cls`` that OmegaConf 2.3 accepts: each ``Literal[...]`` annotation becomes
    the type of its values and nested configs become their mirrors; defaults are the same, no validation (the real
    classes validate when ``_build`` makes them)."""
    specs = []
    for f in dataclasses.fields(cls):
        kind = field_types(cls)[f.name]
        choices = literal_choices(kind)
        if choices is not None:
            kind = Optional[type(choices[0])] if type(None) in typing.get_args(kind) else type(choices[0])
        if dataclasses.is_dataclass(kind):
            specs.append((f.name, omega_schema(kind), dataclasses.field(default_factory=omega_schema(kind))))
        elif f.default_factory is not dataclasses.MISSING:
            specs.append((f.name, kind, dataclasses.field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, kind, dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass(cls.__name__, specs)


def _build(cls: type, values: dict):
    """The real ``cls`` from plain composed values, nested configs first (each ``__post_init__`` validates)."""
    kinds = field_types(cls)
    return cls(**{name: _build(kinds[name], v) if dataclasses.is_dataclass(kinds[name]) else v
                  for name, v in values.items()})


def _to_config(node) -> RunConfig:
    return _build(RunConfig, OmegaConf.to_container(node, resolve=True, throw_on_missing=True))


def check_verifiers(cfg: RunConfig) -> None:
    """``reward.plugin`` and ``reward.judge.verifier`` name a built-in verifier (the ``@builtin`` registry of
    engine/rewards/verifiers.py, torch-free), ``judge`` (reward.plugin only) or a ``package.module:function``."""
    from engine.rewards.verifiers import VERIFIERS

    for key, name in (("reward.plugin", cfg.reward.plugin), ("reward.judge.verifier", cfg.reward.judge.verifier)):
        if name in VERIFIERS or ":" in name or (key == "reward.plugin" and name == "judge"):
            continue
        judge = ", judge" if key == "reward.plugin" else ""
        raise ValueError(f"{key}={name!r} is invalid: choose {', '.join(VERIFIERS)}{judge}, or give your own "
                         f"function as {key}=package.module:function")


ConfigStore.instance().store(name="run_schema", node=omega_schema(RunConfig))


RENAMED = {  # old key -> new key
    "train.max_policy_lag": "train.max_staleness",
    "learner.clip_eps_low": "learner.grpo.clip_eps_low",  # each loss's options moved to its section learner.<loss>
    "learner.clip_eps_high": "learner.grpo.clip_eps_high",
    "learner.gspo_clip_eps_low": "learner.gspo.clip_eps_low",
    "learner.gspo_clip_eps_high": "learner.gspo.clip_eps_high",
    "learner.cispo_clip_eps_high": "learner.cispo.clip_eps_high",
    "learner.espo_alpha": "learner.espo.alpha",
    "learner.espo_rho": "learner.espo.rho",
    "learner.espo_ratio_mode": "learner.espo.ratio_mode",
    "learner.espo_entropy_scope": "learner.espo.entropy_scope",
}


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says what to change."""


def _schema_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys.extend(_schema_keys(f.default_factory, full + "."))
    return keys


def _explain(err: BaseException) -> str:
    """Turn an omegaconf/hydra error chain into one actionable sentence."""
    cause = err
    while cause.__cause__ is not None and isinstance(cause, HydraException):
        cause = cause.__cause__
    full_key = getattr(cause, "full_key", None) or ""
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if "not in" in text and full_key:
        if full_key in RENAMED:
            return f"config key '{full_key}' was renamed: use {RENAMED[full_key]}"
        close = difflib.get_close_matches(full_key, _schema_keys(), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "see configs/schema.py for the valid keys"
        return f"unknown config key '{full_key}': {hint}"
    if full_key:
        return f"bad value for '{full_key}': {text}"
    return text


def load(overrides: list[str] | None = None, *, config_name: str = "run", config_dir: str | None = None
         ) -> RunConfig:
    """Compose ``config_name`` (a YAML in configs/, or in ``config_dir``) with ``overrides`` into a RunConfig."""
    overrides = list(overrides or [])
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value (e.g. train.num_steps=50)")
    try:
        init = (initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None)
                if config_dir else initialize_config_module(config_module="configs", version_base=None))
        with init:
            dcfg = compose(config_name=config_name, overrides=overrides)
        cfg = _to_config(dcfg)
        check_verifiers(cfg)
        return cfg
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e)) from None
    except ValueError as e:  # raised by a schema __post_init__; already names the key and the fix
        raise ConfigError(str(e)) from None


def load_cli(prog: str, overrides: list[str], *, config_name: str = "run", config_dir: str | None = None
             ) -> RunConfig | None:
    """``load`` for a command-line entry point: a config error is printed as ``prog: config error: ...`` on
    stderr and gives None (the caller exits with status 2)."""
    try:
        return load(overrides, config_name=config_name, config_dir=config_dir)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return None


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))


def save(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


def load_resolved(path: str | Path) -> RunConfig:
    """Read a config.yaml written by ``save`` (how actor processes receive the run's configuration)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(omega_schema(RunConfig)), OmegaConf.load(path))
        return _to_config(merged)
    except (OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"{path}: {_explain(e) if isinstance(e, OmegaConfBaseException) else e}") from None
