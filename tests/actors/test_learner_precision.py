"""The learner's precision and process groups, on one gloo rank in this process (DeepSpeed on CPU supports bf16):
learner.precision=bf16 runs the module in bf16 with fp32 master weights in the optimizer, gives fp32 log-probs,
entropies and loss, and publishes weights in model.dtype; auto follows model.dtype; the host-side collectives have
their own gloo group; learner.dist_backend=nccl without CUDA is a one-line config error."""

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from actors.learner_parts import compute_dtype, deepspeed_config, resolve_backend, resolve_precision
from configs.schema import LearnerConfig
from engine.modeling.model import build_model, save_model, token_logprobs
import test_learner_step
from test_learner_step import VOCAB, _batch, _cfg

one_rank = test_learner_step.one_rank  # the one-rank gloo fixture, shared


def _forget_deepspeed_groups() -> None:
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if isinstance(value, dist.ProcessGroup):
            setattr(groups, name, None)
        elif isinstance(value, dict) and any(isinstance(v, dist.ProcessGroup) for v in value.values()):
            value.clear()


@pytest.fixture(scope="module")
def fresh_rank(one_rank):
    """``one_rank``, without the process groups DeepSpeed caches per process (deepspeed.utils.groups): those of
    another module's group, destroyed at that module's end, would be used again. Forgotten before and after."""
    _forget_deepspeed_groups()
    yield
    _forget_deepspeed_groups()


def _learner(tmp_path, cfg):
    from actors.learner import LearnerRank

    init = tmp_path / "init"
    save_model(build_model(cfg.model, VOCAB, seed=0), init)
    return LearnerRank(cfg, str(init), str(tmp_path / "weights"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
def test_bf16_trains_a_bf16_module_on_fp32_masters_and_publishes_model_dtype(tmp_path, fresh_rank, model_dtype):
    from deepspeed.utils import safe_get_full_fp32_param

    cfg = _cfg(precision="bf16", zero_stage=1, gap_probe_seqs=4, gap_probe_every=1)
    cfg.model.dtype = model_dtype
    learner = _learner(tmp_path, cfg)
    assert learner.engine.bfloat16_enabled()
    assert {p.dtype for p in learner.engine.module.parameters()} == {torch.bfloat16}
    assert learner.probe_model.dtype == torch.bfloat16  # the probe recomputes as the learner does
    reference = build_model(cfg.model, VOCAB, seed=0)  # fp32: the rollout's view of version 0
    sh = learner._shards(_batch(reference, 1))[0]
    x = learner._loss_inputs(sh, type("Acc", (), {"add_sums": lambda *_: None})())
    assert x.logp_NT.dtype == torch.float32 and x.logp_NT.requires_grad  # fp32 log-probs of a bf16 forward
    with torch.no_grad():
        want = token_logprobs(reference, sh.ids_NL, sh.attn_NL)
    gap = (x.logp_NT.detach() - want)[sh.mask_NL].abs()
    assert 0 < float(gap.max()) < 0.1  # bf16 is really on, and close to fp32
    for step in (1, 2):
        stats = learner.step(_batch(reference, step))
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
        assert stats["entropy"] > 0 and stats["grad_norm"] > 0
    # fp32 masters: Adam's updates that a bf16 copy cannot hold are kept
    moved = 0
    for p in learner.engine.module.parameters():
        master = safe_get_full_fp32_param(p)
        assert master.dtype == torch.float32
        torch.testing.assert_close(master.to(torch.bfloat16), p.detach(), rtol=0, atol=0)
        moved += int(not torch.equal(master, p.detach().float()))
    assert moved > 0
    path, _ = learner.publish()
    published = load_file(path)
    assert {t.dtype for t in published.values()} == {getattr(torch, model_dtype)}
    module = learner.engine.module.state_dict()
    for name, value in published.items():  # exactly the weights the learner computes with, in model.dtype
        torch.testing.assert_close(value, module[name].to(value.dtype), rtol=0, atol=0, msg=name)


@pytest.mark.timeout(300)
def test_fp32_with_a_bfloat16_model_trains_fp32_and_publishes_bf16(tmp_path, fresh_rank):
    cfg = _cfg(precision="fp32", gap_probe_seqs=0)
    cfg.model.dtype = "bfloat16"
    learner = _learner(tmp_path, cfg)
    assert not learner.engine.bfloat16_enabled()
    assert {p.dtype for p in learner.engine.module.parameters()} == {torch.float32}
    learner.step(_batch(build_model(cfg.model, VOCAB, seed=0), 1))
    assert {t.dtype for t in load_file(learner.publish()[0]).values()} == {torch.bfloat16}


@pytest.mark.timeout(300)
def test_the_host_side_collectives_have_their_own_gloo_group(tmp_path, fresh_rank):
    learner = _learner(tmp_path, _cfg(gap_probe_seqs=0))
    assert learner.cpu_group is not None and learner.cpu_group != dist.group.WORLD
    assert dist.get_backend(learner.cpu_group) == "gloo"
    assert dist.get_backend() == resolve_backend(LearnerConfig()) == ("nccl" if torch.cuda.is_available() else "gloo")


def test_precision_auto_follows_the_model_dtype_and_sets_deepspeeds_bf16_section():
    cfg = _cfg()
    assert cfg.learner.precision == "auto" and resolve_precision(cfg) == "fp32"
    cfg.model.dtype = "bfloat16"
    assert resolve_precision(cfg) == "bf16" and compute_dtype("bf16") == torch.bfloat16
    cfg.learner.precision = "fp32"
    assert resolve_precision(cfg) == "fp32"
    bf16 = deepspeed_config(cfg.learner, precision="bf16")
    assert bf16["bf16"] == {"enabled": True} and bf16["communication_data_type"] == "fp32"
    fp32 = deepspeed_config(cfg.learner, precision="fp32", load_universal=True)
    assert fp32["bf16"] == {"enabled": False} and fp32["checkpoint"] == {"load_universal": True}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_nccl_without_cuda_is_a_one_line_config_error():
    with pytest.raises(ValueError, match=r"^learner\.dist_backend='nccl' is invalid: NCCL needs CUDA.*"
                                         r"learner\.dist_backend=gloo") as e:
        LearnerConfig(dist_backend="nccl")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="precision"):
        LearnerConfig(precision="fp16")
