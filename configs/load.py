"""Compose a run configuration from the schema, a YAML preset and ``key=value`` overrides.

This is the only place that turns hydra/omegaconf objects into typed ``RunConfig`` dataclasses. Every problem
(an unknown key, a value of the wrong type, an inconsistent setting) becomes a ``ConfigError`` whose message
names the key and how to fix it, raised before any process starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.schema import RunConfig

ConfigStore.instance().store(name="run_schema", node=RunConfig)


RENAMED = {"train.max_policy_lag": "train.max_staleness"}  # old key -> new key


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
        return OmegaConf.to_object(dcfg)
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
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


def load_resolved(path: str | Path) -> RunConfig:
    """Read a config.yaml written by ``save`` (how actor processes receive the run's configuration)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"{path}: {_explain(e) if isinstance(e, OmegaConfBaseException) else e}") from None
