"""Choices: the one config-wide mechanism for keys with a fixed set of values (torch-free, imports nothing).

A key with a fixed set of values is annotated ``name: Literal["a", "b"] = "a"`` and its class's ``__post_init__``
starts with a choices check (``configs.schema.check_choices(self)``, or ``check_choices(self, prefix)`` here for a
section that lives outside the schema, such as a loss's in engine/algo/loss_registry.py); no per-key
``x in (...)`` checks. The one generic check raises the house's one-line error, e.g. ``rollout.schedule='x' is
invalid: choose fifo or length_aware``. OmegaConf 2.3 rejects ``Literal`` annotations, so configs/load.py hands it a
mirror of the classes with each Literal mapped to the type of its values (``str`` or ``int``) and builds the real
dataclasses from the composed values.
"""

from __future__ import annotations

import functools
import typing
from typing import Literal


@functools.cache
def field_types(cls: type) -> dict[str, object]:
    """The resolved annotation of every field of the config dataclass ``cls``."""
    return typing.get_type_hints(cls)


def literal_choices(annotation) -> tuple | None:
    """The allowed values of a ``Literal[...]`` annotation (also inside ``Optional``), else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def format_choices(choices: tuple) -> str:
    """``('a', 'b', 'c')`` -> ``a, b or c`` (an empty string reads ``""``)."""
    names = [f'"{c}"' if c == "" else str(c) for c in choices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_choices(cfg, prefix: str) -> None:
    """Raise the one-line ``ValueError`` for the first ``Literal`` field of the dataclass ``cfg`` holding a value
    outside its choices; ``prefix`` is where ``cfg`` sits in the run config (e.g. ``learner.espo.``)."""
    for name, annotation in field_types(type(cfg)).items():
        choices, value = literal_choices(annotation), getattr(cfg, name)
        if choices is None or value in choices or (value is None and type(None) in typing.get_args(annotation)):
            continue
        raise ValueError(f"{prefix}{name}={value!r} is invalid: choose {format_choices(choices)}")


def require(cond: bool, key: str, value, fix: str) -> None:
    """The one-line error of every config check: ``key=value is invalid: fix``."""
    if not cond:
        raise ValueError(f"{key}={value!r} is invalid: {fix}")
