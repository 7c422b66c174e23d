"""The reward plugin pool: real spawned processes; a plugin that raises, hangs or dies is a recorded failure and
the pool keeps serving."""

import asyncio

import pytest

from engine.rewards.plugins import PluginPool, resolve

pytestmark = pytest.mark.timeout(60)


def test_plugin_registry_resolves_builtins_and_module_paths():
    assert resolve("exact").__name__ == "exact" and resolve("code").__name__ == "python_tests"
    assert resolve("tests.plugin_fixtures:length").__name__ == "length"
    for bad in ("nope", "tests.plugin_fixtures:missing", "no_such_module:fn"):
        with pytest.raises(ValueError, match="reward plugin"):
            resolve(bad)


def test_plugin_failures_are_recorded_and_the_pool_keeps_serving():
    pool = PluginPool("tests.plugin_fixtures:misbehave", num_procs=2, timeout_s=1.0)

    async def scenario():
        return await asyncio.gather(*[pool.score(r, "ref") for r in ("ok", "raise", "hang", "crash", "ok", "ok")])

    try:
        ok, raised, hung, crashed, *after = asyncio.run(scenario())
        assert ok.valid and ok.score == 1.0
        assert not raised.valid and raised.parts == {"plugin_error": 1.0}
        assert not hung.valid and hung.parts == {"plugin_timeout": 1.0}
        assert not crashed.valid and crashed.parts == {"plugin_crash": 1.0}
        assert all(s.valid and s.score == 1.0 for s in after)  # replaced processes serve the rest
        assert pool.counts["replaced"] == 2 and pool.counts["calls"] == 6
        assert asyncio.run(pool.score("ok", "ref")).valid  # still serving from a fresh event loop
    finally:
        pool.close()
    assert all(not s.proc.is_alive() for s in pool._slots)


def test_plugin_pool_runs_calls_in_parallel_processes():
    pool = PluginPool("tests.plugin_fixtures:length", num_procs=2, timeout_s=10.0)

    async def scenario():
        return await asyncio.gather(*[pool.score("x" * n, "xxx") for n in range(6)])

    try:
        scores = asyncio.run(scenario())
        assert [s.score for s in scores] == [0, 0, 0, 1, 0, 0] and scores[4].parts == {"length": 4.0}
        assert len({s.proc.pid for s in pool._slots}) == 2
    finally:
        pool.close()
