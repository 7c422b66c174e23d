"""Reward plugins that misbehave on purpose (``reward.plugin=tests.plugin_fixtures:<name>``), for the pool tests."""

import os
import time

from engine.rewards.verifiers import PluginScore


def length(response: str, reference: str, options: dict) -> PluginScore:
    """Behaves: 1.0 when the response is as long as the reference."""
    return PluginScore(float(len(response) == len(reference)), {"length": float(len(response))})


def misbehave(response: str, reference: str, options: dict) -> PluginScore:
    """Raises, hangs or kills its own process, as the response asks; otherwise scores 1."""
    if response == "raise":
        raise ValueError("this plugin raises on purpose")
    if response == "hang":
        time.sleep(3600)
    if response == "crash":
        os._exit(13)
    return PluginScore(1.0)
