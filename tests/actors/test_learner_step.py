"""The learner step's shortcuts, in this process on one gloo rank: the first mini-batch's update forward doubling
as its old-policy pass gives the loss and gradient of the two-pass step; the gap probe runs every k versions and
other steps omit its keys; the learner's thread count follows the documented rule."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from configs.load import save
from configs.schema import ModelConfig, RunConfig
from engine.algo.entropy import entropy_of_logits, logprobs_and_entropy
from engine.coordinator.launch import learner_env, learner_threads
from engine.modeling.model import build_model, save_model, token_logprobs
from engine.modeling.routing import route_hooks
from transport.messages import TrainBatch

VOCAB = 24


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo group for LearnerRank (DeepSpeed joins it), torn down after the module."""
    mp = pytest.MonkeyPatch()
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + np.random.default_rng().integers(1, 900)),
                     RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu").items():
        mp.setenv(k, v)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    mp.undo()


def _cfg(**learner) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                            num_experts=4, top_k=2, moe_intermediate_size=32)
    cfg.learner.lr, cfg.learner.zero_stage = 1e-2, 0  # stage 0: the gradients stay on the parameters
    for k, v in learner.items():
        setattr(cfg.learner, k, v)
    return cfg


def _batch(model, step: int, num_seqs: int = 8, prompt_len: int = 4, max_resp: int = 6) -> TrainBatch:
    """Sequences sampled (as far as the learner can tell) by ``model``: its log-probs and routes."""
    rng = np.random.default_rng(step)
    resp = rng.integers(1, max_resp + 1, size=num_seqs).astype(np.int32)
    length = prompt_len + max_resp
    ids = rng.integers(3, VOCAB, size=(num_seqs, length)).astype(np.int32)
    in_resp = (np.arange(length) >= prompt_len) & (np.arange(length) < prompt_len + resp[:, None])
    ids[np.arange(length) >= prompt_len + resp[:, None]] = 0
    ids_t = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad(), route_hooks(model) as own:
        logp = token_logprobs(model, ids_t, (ids_t != 0).long())
    routes = own.stacked(0).reshape(num_seqs, length, 2, 2).numpy().astype(np.uint8)
    return TrainBatch(step=step, input_ids=ids, prompt_lens=np.full(num_seqs, prompt_len, np.int32),
                      response_lens=resp, behavior_logprobs=np.where(in_resp, logp.numpy() - 0.05, 0.0)
                      .astype(np.float32),
                      token_versions=np.where(in_resp, step - 1, -1).astype(np.int32),
                      advantages=rng.standard_normal(num_seqs).astype(np.float32), routes=routes,
                      routed_lens=(prompt_len + resp - 1).astype(np.int32))


def _learner(tmp_path, cfg: RunConfig, *, fuse: bool):
    from actors.learner import LearnerRank

    init = tmp_path / "init"
    if not init.exists():
        save_model(build_model(cfg.model, VOCAB, seed=0), init)
    learner = LearnerRank(cfg, str(init), str(tmp_path / "weights"))
    learner.fuse_first_pass = fuse
    grads, step = [], learner.engine.step

    def recording_step():  # every optimizer step's gradient, before the step
        grads.append({n: p.grad.detach().clone() for n, p in learner.engine.module.named_parameters()
                      if p.grad is not None})
        step()

    learner.engine.step = recording_step
    return learner, grads


@pytest.mark.timeout(300)
@pytest.mark.parametrize("replay, minibatches, decoupled, loss", [("R3", 1, False, "espo"), ("R2", 1, True, "espo"),
                                                                  ("off", 2, True, "grpo"), ("R3", 2, False, "gspo")])
def test_the_fused_first_pass_gives_the_two_pass_loss_and_gradient(tmp_path, one_rank, replay, minibatches,
                                                                   decoupled, loss):
    cfg = _cfg(router_replay=replay, num_minibatches=minibatches, decoupled=decoupled, loss=loss,
               gap_probe_seqs=0)
    runs = [_learner(tmp_path, cfg, fuse=fuse) for fuse in (False, True)]
    model = build_model(cfg.model, VOCAB, seed=0)
    for step in (1, 2):  # step 2 starts from weights the two runs reached separately
        stats = [learner.step(_batch(model, step)) for learner, _ in runs]
        for key in ("loss", "entropy", "grad_norm", "approx_kl", "behavior_proximal_abs_diff", "tokens"):
            assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-5, abs=1e-6), (key, stats)
    (_, two_pass), (_, fused) = runs
    assert len(two_pass) == len(fused) == 2 * minibatches
    for g0, g1 in zip(two_pass, fused):
        assert g0.keys() == g1.keys()
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    p0, p1 = (dict(learner.engine.module.named_parameters()) for learner, _ in runs)
    for name in p0:
        torch.testing.assert_close(p1[name], p0[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.timeout(300)
def test_the_gap_probe_runs_every_k_versions_and_other_steps_omit_it(tmp_path, one_rank):
    cfg = _cfg(gap_probe_every=2, gap_probe_seqs=4)
    learner, _ = _learner(tmp_path, cfg, fuse=True)
    model = build_model(cfg.model, VOCAB, seed=0)
    probed = []
    for step in (1, 2, 3, 4):
        batch = _batch(model, step)
        stats = learner.step(batch)
        probed.append("logprob_gap_mean" in stats)
        assert ("routing_mismatch_frac" in stats) == probed[-1] and ("logprob_gap_tokens" in stats) == probed[-1]
        if probed[-1]:
            assert np.isfinite(stats["logprob_gap_mean"]) and stats["logprob_gap_tokens"] > 0
    assert probed == [True, False, True, False]  # versions 0 and 2


def test_the_entropy_of_existing_logits_is_the_old_pass_entropy():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 5, 8), torch.randn(11, 8)
    targets = torch.randint(0, 11, (3, 5))
    _, want = logprobs_and_entropy(hidden, weight, targets, chunk_tokens=4)
    logits = hidden @ weight.T
    torch.testing.assert_close(entropy_of_logits(logits, chunk_tokens=4), want, rtol=1e-5, atol=1e-6)
    banned = torch.cat([logits, torch.full((3, 5, 1), float("-inf"))], -1)  # a banned token adds nothing
    torch.testing.assert_close(entropy_of_logits(banned, chunk_tokens=7), want, rtol=1e-5, atol=1e-6)


def test_the_learner_threads_split_the_cores():
    cfg = RunConfig()
    cfg.learner.num_ranks, cfg.rollout.num_workers, cfg.rollout.threads_per_worker = 2, 2, 1
    assert learner_threads(cfg, cores=16) == 7  # (16 - 2 worker threads) // 2 ranks
    assert learner_threads(cfg, cores=2) == 1  # never 0
    cfg.rollout.backend = "sim"  # its workers compute nothing on these cores
    assert learner_threads(cfg, cores=16) == 8
    cfg.learner.threads_per_rank = 3  # an explicit value wins
    assert learner_threads(cfg, cores=16) == 3 and learner_env(cfg)["OMP_NUM_THREADS"] == "3"


def test_a_learner_step_config_round_trips(tmp_path):
    cfg = _cfg(gap_probe_every=5, threads_per_rank=2)
    save(cfg, tmp_path / "c.yaml")
    from configs.load import load_resolved

    back = load_resolved(tmp_path / "c.yaml")
    assert back.learner.gap_probe_every == 5 and back.learner.threads_per_rank == 2
    with pytest.raises(Exception, match="gap_probe_every"):
        _cfg(gap_probe_every=0).learner.__post_init__()
