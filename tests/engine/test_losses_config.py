"""Each registered loss owns its config section (learner.<loss>.*), its class and its aggregations: one registry."""

import dataclasses
import subprocess
import sys

import pytest

from configs.load import ConfigError, RENAMED, load
from configs.schema import LearnerConfig
from engine.algo.loss_registry import AGGREGATIONS, LOSS_NAMES, LOSSES

pytestmark = pytest.mark.timeout(120)


def test_every_registered_loss_has_a_section_a_class_and_its_default_aggregation():
    from engine.algo.loss_seam import PolicyLoss, loss_class

    sections = {f.name: f for f in dataclasses.fields(LearnerConfig)}
    for name, entry in LOSSES.items():
        assert isinstance(getattr(LearnerConfig(), name), entry.config), name
        assert sections[name].default_factory is entry.config
        assert issubclass(loss_class(name), PolicyLoss)
        assert entry.default_aggregation in entry.aggregations and set(entry.aggregations) <= set(AGGREGATIONS)
    assert LOSS_NAMES == ("espo", "gspo", "grpo", "cispo", "dr_grpo")


def test_sections_are_set_from_the_command_line_and_checked():
    cfg = load(["learner.loss=gspo", "learner.gspo.clip_eps_low=1e-3", "learner.espo.entropy_scope=batch"])
    assert cfg.learner.gspo.clip_eps_low == 1e-3 and cfg.learner.espo.entropy_scope == "batch"
    for override, message in (("learner.espo.ratio_mode=seq", "learner.espo.ratio_mode='seq' is invalid"),
                              ("learner.espo.rho=1.5", "learner.espo.rho=1.5 is invalid"),
                              ("learner.loss=ppo", "choose espo, gspo, grpo, cispo or dr_grpo"),
                              ("learner.router_replay=R1", "choose off, R2 or R3")):
        with pytest.raises(ConfigError, match=message):
            load([override])
    with pytest.raises(ConfigError, match="entropy groups exist only in espo"):
        load(["learner.loss=grpo", "learner.aggregation=seq_mean_group_mean"])
    assert load(["learner.loss=cispo", "learner.aggregation=seq_mean_token_sum_norm"]).learner.loss == "cispo"


@pytest.mark.parametrize("old", ["learner.clip_eps_low", "learner.gspo_clip_eps_high", "learner.cispo_clip_eps_high",
                                 "learner.espo_alpha", "learner.espo_rho", "learner.espo_ratio_mode",
                                 "learner.espo_entropy_scope"])
def test_old_flat_loss_keys_say_where_they_went(old):
    new = RENAMED[old]
    with pytest.raises(ConfigError, match=f"'{old}' was renamed: use {new}"):
        load([f"{old}=0.1"])
    section, key = new.split(".")[1:]
    assert hasattr(getattr(LearnerConfig(), section), key)


def test_configs_and_the_registry_import_without_torch():
    code = ("import sys, configs.load, engine.algo.loss_registry, engine.modeling.replay_mode; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=100)
