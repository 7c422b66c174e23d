"""Throughput options (rollout.schedule, post-processing pool, reward overlap, FP8, the sim backend) validate with
messages that name the key and the fix; their defaults keep the default run unchanged."""

import pytest

from configs.load import ConfigError, load

pytestmark = pytest.mark.timeout(30)


def test_defaults_keep_the_default_run():
    cfg = load([])
    r = cfg.rollout
    assert (r.backend, r.schedule, r.postprocess_workers, r.reward_overlap, r.quantization) == ("hf", "fifo", 0, True, "")
    assert cfg.sim.learner is False


@pytest.mark.parametrize("override, expected", [
    ("rollout.backend=vllm", "rollout.backend='vllm' is invalid"),
    ("rollout.schedule=lpt", "rollout.schedule='lpt' is invalid: choose fifo or length_aware"),
    ("rollout.postprocess_workers=-1", "rollout.postprocess_workers=-1 is invalid"),
    ("rollout.quantization=int4", "rollout.quantization='int4' is invalid: choose \"\" or fp8"),
    ("rollout.kv_cache_dtype=int8", "fp8_e5m2"),
    ("sim.time_scale=0", "sim.time_scale=0.0 is invalid"),
])
def test_bad_throughput_options_name_the_key_and_fix(override, expected):
    with pytest.raises(ConfigError) as err:
        load([override])
    assert expected in str(err.value)
