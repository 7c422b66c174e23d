"""Reward plugins of the built-in reasoning tasks (engine/data/reasoning.py): the final answer only.

A run with ``task.name=scratchpad``, ``countdown`` or ``sorting`` uses these in place of the default ``exact``
(configs/schema.py ``REASONING_VERIFIERS``); the checks themselves are engine/data/reasoning_check.py, which the
task's own ``Task.score`` (SFT dev accuracy) uses too. Each is ``fn(response, reference, options) -> PluginScore``.
"""

from __future__ import annotations

from engine.data.reasoning_check import check_countdown, check_final
from engine.rewards.verifiers import PluginScore


def _plugin(check):
    def verify(response: str, reference: str, options: dict) -> PluginScore:
        score, valid = check(response, reference)
        return PluginScore(score, valid=valid)
    verify.__doc__ = f"``{check.__name__}`` as a reward plugin."
    return verify


scratchpad = _plugin(check_final)  # the final sum
sorting = _plugin(check_final)  # the final sorted list
countdown = _plugin(check_countdown)  # the final expression: safe, each number at most once, equal to the target
