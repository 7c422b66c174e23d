"""Choices are ``Literal`` annotations checked by one generic check; the configuration reference lists every key."""

import dataclasses
import subprocess
import sys

import pytest

from configs.load import ConfigError, load, omega_schema
from configs.reference import markdown, sections
from configs.schema import RunConfig, field_types, literal_choices

pytestmark = pytest.mark.timeout(60)

CHOICE_FIELDS = [(prefix, cls, name, choices) for prefix, cls in sections()
                 for name, kind in field_types(cls).items() if (choices := literal_choices(kind)) is not None]


def _leaf_keys(cls=RunConfig, prefix=""):
    for f in dataclasses.fields(cls):
        kind = field_types(cls)[f.name]
        yield from _leaf_keys(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else [prefix + f.name]


def test_the_schema_declares_its_choices():
    keys = {prefix + name for prefix, _, name, _ in CHOICE_FIELDS}
    assert {"task.name", "rollout.schedule", "rollout.kv_on_update", "reward.sandbox.network",
            "reward.judge.construction", "train.buffer_order", "sim.prefill_on_add"} <= keys


@pytest.mark.parametrize("prefix, cls, name, choices", CHOICE_FIELDS,
                         ids=[p + n for p, _, n, _ in CHOICE_FIELDS])
def test_every_choice_rejects_an_unknown_value_naming_key_and_choices(prefix, cls, name, choices):
    with pytest.raises(ValueError) as err:
        cls(**{name: "no_such_choice" if isinstance(choices[0], str) else -99})
    message = str(err.value)
    assert message.startswith(f"{prefix}{name}=") and "is invalid: choose " in message and "\n" not in message
    assert all((str(c) if c != "" else '""') in message for c in choices)


def test_every_choice_is_accepted_through_the_command_line():
    for prefix, cls, name, choices in CHOICE_FIELDS:
        for choice in choices:
            if not (isinstance(choice, str) and choice):
                continue
            try:
                assert getattr(_section(load([f"{prefix}{name}={choice}"]), prefix), name) == choice
            except ConfigError as e:  # a valid choice may still need a companion key (task.name=jsonl)
                assert f"{prefix}{name}={choice!r} is invalid: choose" not in str(e)


def _section(cfg, prefix):
    for part in prefix.rstrip(".").split("."):
        cfg = getattr(cfg, part) if part else cfg
    return cfg


def test_a_bad_choice_on_the_command_line_is_one_line():
    with pytest.raises(ConfigError) as err:
        load(["rollout.schedule=bogus"])
    assert str(err.value) == "rollout.schedule='bogus' is invalid: choose fifo or length_aware"


def test_omegaconf_sees_plain_types_and_the_real_classes_come_back():
    assert field_types(field_types(omega_schema(RunConfig))["rollout"])["schedule"] is str
    cfg = load(["train.buffer_order=variance"])
    assert type(cfg) is RunConfig and type(cfg.reward.sandbox).__module__ == "configs.reward_section"
    assert cfg.train.buffer_order == "variance"


def test_reference_lists_every_leaf_key_with_default_and_choices():
    text = markdown()
    keys = list(_leaf_keys())
    assert len(keys) > 100
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, missing
    row = next(line for line in text.splitlines() if line.startswith("| `rollout.schedule` |"))
    assert "`fifo`" in row and "fifo, length_aware" in row and "fewest predicted tokens" in row
    row = next(line for line in text.splitlines() if line.startswith("| `rollout.num_workers` |"))
    assert "join.json" in row  # the comment beside the field


def test_reference_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "configs.reference"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("# Configuration reference") and "## reward.judge" in out.stdout


def test_the_configuration_page_is_the_generated_reference():
    """docs/configuration.md cannot drift: below its hand-written paragraph it is configs.reference's output."""
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "configs.reference"], capture_output=True, text=True, check=True)
    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    marker = "Generated from configs/schema.py"
    assert page[page.index(marker):] == out.stdout[out.stdout.index(marker):], \
        "docs/configuration.md is stale: rerun python -m configs.reference and paste its output below the header"


def test_configs_import_without_torch():
    code = ("import sys; import configs.load, configs.reference; configs.load.load(['reward.plugin=choice']); "
            "assert 'torch' not in sys.modules, 'configs/ imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
