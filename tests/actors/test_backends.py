"""The rollout-backend seam: the registry names and resolves every backend lazily, each backend meets the declared
protocol (engine/backends/base.py), and rows grow only through ``Row.extend``."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from configs.schema import RolloutConfig, SimConfig
from engine.backends.base import JudgeBackend, RolloutBackend, RolloutBatch
from engine.backends.registry import BACKENDS, JUDGE_BACKENDS, ROLLOUT_BACKENDS, resolve
from engine.modeling.rows import Row


def test_every_registry_entry_resolves_and_the_schema_takes_exactly_its_names():
    for name, entry in BACKENDS.items():
        assert callable(resolve(entry.rollout)), name
        assert not entry.judge or callable(resolve(entry.judge)), name
        assert importlib.util.find_spec(entry.worker_module) is not None, name
        assert RolloutConfig(backend=name, num_workers=1).backend == name
    assert set(JUDGE_BACKENDS) == {"hf", "sglang"} and set(ROLLOUT_BACKENDS) == {"hf", "sglang", "sim"}
    with pytest.raises(ValueError, match=r"rollout.backend='vllm' is invalid: choose hf, sglang or sim"):
        RolloutConfig(backend="vllm")  # the names come from the registry (a Literal of ROLLOUT_BACKENDS)


def test_choosing_sim_through_the_registry_imports_neither_torch_nor_transformers():
    code = ("import sys; from configs.load import load; from engine.backends.registry import build_rollout; "
            "b = build_rollout(load(['rollout.backend=sim'], config_name='tiny'), None, 0); "
            "print(type(b).__name__, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["SimBackend", "False", "False"]


def test_each_backend_meets_the_declared_protocol(tmp_path):
    from engine.backends.hf import HFBackend, HFJudgeBackend
    from engine.backends.sglang import SGLangBackend, SGLangBatch, SglangJudgeBackend
    from engine.backends.sim import SimBackend
    from tests.actors.test_workers import _setup

    sim = SimBackend(SimConfig(), eos_id=2, vocab_size=98)
    assert isinstance(sim, RolloutBackend) and isinstance(sim.new_batch(capture_routes=False), RolloutBatch)
    _setup(tmp_path)
    hf = HFBackend(str(tmp_path / "init"), seed=0, eos_id=2, pad_id=0)
    assert isinstance(hf, RolloutBackend) and isinstance(hf.new_batch(capture_routes=True), RolloutBatch)
    assert isinstance(SGLangBatch(None, capture_routes=True), RolloutBatch)  # the backend itself needs a server
    assert all(callable(getattr(SGLangBackend, m, None)) for m in ("new_batch", "run_decode", "load_async",
                                                                   "stack_routes"))
    assert isinstance(SglangJudgeBackend("http://127.0.0.1:1", timeout_s=1.0), JudgeBackend)
    assert callable(HFJudgeBackend.generate)


def test_row_extend_keeps_new_routes_prompt_routes_and_finishes_at_the_limit():
    route = [np.full((2, 1), p, dtype=np.uint8) for p in range(10)]  # the route of position p is p
    r = Row(key=0, prompt=[5, 6, 7], max_new_tokens=4, temperature=1.0, want_prompt_routes=True)
    r.extend([11], [-0.5], 3, routes=np.stack(route[:3]))  # a prefill: positions 0..2, then one sampled token
    assert r.tokens == [11] and r.versions == [3] and r.routes == [] and r.ready(True) == 0
    assert r.prompt_routes[:, 0, 0].tolist() == [0, 1, 2]
    r.extend([12], [-0.25], 4, routes=np.stack(route[3:4]), routes_from=3)  # token 0 fed: its route
    assert [int(x[0, 0]) for x in r.routes] == [3] and r.versions == [3, 4] and r.ready(True) == 1
    r.extend([13, 14], [-1.0, -1.0], 4, routes=np.stack(route[:6]))  # a server's whole-sequence routes
    assert [int(x[0, 0]) for x in r.routes] == [3, 4, 5] and r.prompt_routes[:, 0, 0].tolist() == [0, 1, 2]
    assert r.finish_reason == "length" and r.ready(True) == 4  # at max_new_tokens; all ready once done
    s = Row(key=1, prompt=[5], max_new_tokens=8, temperature=0.0)
    s.extend([2], [0.0], 0, finish="stop")
    assert s.done and s.finish_reason == "stop"
    assert Row.continuing(2, [5], [9, 9], max_new_tokens=2, temperature=1.0).finish_reason == "length"
