"""The reward plugin pool: real spawned processes; a plugin that raises, hangs or dies is a recorded failure and
the pool keeps serving."""

import asyncio

import pytest

from engine.rewards.plugins import PluginPool, resolve

pytestmark = pytest.mark.timeout(60)


def test_plugin_registry_resolves_builtins_and_module_paths():
    assert resolve("exact").__name__ == "exact" and resolve("code").__name__ == "python_tests"
    assert resolve("choice").__name__ == "choice" and resolve("instruction").__name__ == "instructions"
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


def test_a_builtin_verifier_is_registered_by_its_decorator_alone():
    from engine.rewards import verifiers

    @verifiers.builtin("test_only_shout")
    def shout(response, reference, options):
        return verifiers.PluginScore(float(response == reference.upper()))

    try:
        assert resolve("test_only_shout") is shout and shout("HI", "hi", {}).score == 1.0
        with pytest.raises(ValueError, match="two built-in verifiers are named 'exact'"):
            verifiers.builtin("exact")(shout)
    finally:
        del verifiers.VERIFIERS["test_only_shout"]


def test_the_code_plugin_runs_under_the_sandbox_config_it_is_given():
    from configs.schema import SandboxConfig

    pool = PluginPool("code", {"sandbox": SandboxConfig(cpu_s=1, wall_s=2)}, num_procs=1, timeout_s=10.0)

    async def scenario():
        return (await pool.score("def f(x):\n    return x + 1", "assert f(1) == 2\nassert f(2) == 4"),
                await pool.score("import time\ntime.sleep(30)", "assert True"))

    try:
        fast, slow = asyncio.run(scenario())
        assert fast.score == 0.5 and fast.parts["tests_total"] == 2.0 and fast.valid
        assert slow.valid and slow.score == 0.0 and slow.parts["sandbox_timeout"] == 1.0  # wall_s=2, not the call's 10
    finally:
        pool.close()
