"""The learner under its real launcher: torchrun with 2 gloo ranks; the test plays the coordinator (a Hub)."""

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actors.learner import shard_bounds
from engine.coordinator.launch import learner_command, learner_env, learner_threads
from configs.load import save
from configs.schema import ModelConfig, RunConfig
from engine.backends.weights_file import digest_file
from engine.modeling.model import build_model, load_model, load_weights, save_model, token_logprobs
from engine.modeling.routing import route_hooks
from transport.channels import Hub, run
from transport.messages import ErrorReport, Hello, Shutdown, TrainBatch, TrainResult

REPO = Path(__file__).resolve().parents[2]
VOCAB = 24
START_S = 240.0  # torchrun, imports and DeepSpeed init on a busy 2-core box (no JIT build: actors/learner.py)


def _setup(tmp_path: Path, *, peer_timeout_s: float = 60.0, router_replay: str = "R3",
           num_minibatches: int = 1, decoupled: bool = False, expert_parallel: int = 1
           ) -> tuple[RunConfig, str, str]:
    cfg = RunConfig()
    cfg.out_dir = str(tmp_path)
    cfg.model = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                            num_experts=4, top_k=2, moe_intermediate_size=32)
    cfg.learner.num_ranks = 2
    cfg.learner.lr = 1e-2
    cfg.learner.router_replay, cfg.learner.num_minibatches = router_replay, num_minibatches
    cfg.learner.decoupled, cfg.learner.expert_parallel = decoupled, expert_parallel
    cfg.learner.gap_probe_every = 1  # every step: the checks below read the probe's metrics of steps 1-3
    cfg.transport.heartbeat_s = 0.5
    cfg.transport.peer_timeout_s = peer_timeout_s
    config_path = tmp_path / "config.yaml"
    save(cfg, config_path)
    init_dir = tmp_path / "init"
    save_model(build_model(cfg.model, VOCAB, seed=0), init_dir)
    return cfg, str(config_path), str(init_dir)


def _batch(step: int, num_seqs: int = 7, prompt_len: int = 4, max_resp: int = 6, seed: int = 0,
           rollout_model=None, version: int | None = None) -> TrainBatch:
    """Random sequences of policy ``version`` (default step - 1). With ``rollout_model`` the behaviour log-probs
    and MoE routes are that model's (as if it had sampled them); otherwise log-probs are -3 and routes are all
    expert 0/1."""
    rng = np.random.default_rng(seed)
    resp = rng.integers(1, max_resp + 1, size=num_seqs).astype(np.int32)
    length = prompt_len + max_resp
    ids = rng.integers(3, VOCAB, size=(num_seqs, length)).astype(np.int32)
    in_resp = (np.arange(length) >= prompt_len) & (np.arange(length) < prompt_len + resp[:, None])
    ids[np.arange(length) >= prompt_len + resp[:, None]] = 0  # right padding
    behaviour = np.where(in_resp, -3.0, 0.0).astype(np.float32)
    routes = np.tile(np.array([0, 1], np.uint8), (num_seqs, length, 2, 1))  # [N, L, layers=2, k=2]
    if rollout_model is not None:
        ids_t = torch.from_numpy(ids.astype(np.int64))
        with torch.no_grad(), route_hooks(rollout_model) as own:
            logp = token_logprobs(rollout_model, ids_t, (ids_t != 0).long())
        behaviour = np.where(in_resp, logp.numpy(), 0.0).astype(np.float32)
        routes = own.stacked(0).reshape(num_seqs, length, 2, 2).numpy().astype(np.uint8)
    return TrainBatch(step=step, input_ids=ids, prompt_lens=np.full(num_seqs, prompt_len, np.int32),
                      response_lens=resp, behavior_logprobs=behaviour,
                      token_versions=np.where(in_resp, step - 1 if version is None else version, -1).astype(np.int32),
                      advantages=rng.standard_normal(num_seqs).astype(np.float32), routes=routes,
                      routed_lens=(prompt_len + resp - 1).astype(np.int32))


class _Learner:
    """The torchrun process group, killed by handle (its whole session) if the test does not end cleanly."""

    def __init__(self, tmp_path: Path, cfg: RunConfig, config_path: str, init_dir: str, endpoint: str):
        self.log_path = tmp_path / "learner.log"
        argv = learner_command(cfg, config_path=config_path, endpoint=endpoint, init_dir=init_dir,
                               weights_dir=str(tmp_path / "weights"), master_port=0)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **learner_env(cfg)},
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # one process group: torchrun + ranks

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def wait(self, timeout: float) -> int:
        for _ in range(int(timeout / 0.1)):
            if (code := self.proc.poll()) is not None:
                return code
            await asyncio.sleep(0.1)
        raise AssertionError(f"learner did not exit within {timeout}s; log tail:\n{self.log()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def _expect(hub: Hub, learner: _Learner, kind: type, timeout: float):
    try:
        _, msg = await hub.recv(timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"no {kind.__name__} within {timeout}s; log tail:\n{learner.log()}") from None
    assert isinstance(msg, kind), f"expected {kind.__name__}, got {msg!r:.2000}"
    return msg


@contextlib.asynccontextmanager
async def _connected_learner(tmp_path: Path, cfg: RunConfig, config_path: str, init_dir: str):
    """A Hub playing the coordinator and the learner under torchrun, connected (its Hello received)."""
    hub = Hub(heartbeat_s=cfg.transport.heartbeat_s, peer_timeout_s=cfg.transport.peer_timeout_s)
    await hub.start()
    learner = _Learner(tmp_path, cfg, config_path, init_dir, hub.endpoint)
    try:
        hello = await _expect(hub, learner, Hello, START_S)
        yield hub, learner, hello
    finally:
        learner.kill()
        await hub.close()


def test_shard_bounds_cover_every_sequence_once():
    for n in (1, 2, 7, 8, 512):
        for world in (1, 2, 3):
            parts = [shard_bounds(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


def test_learner_command_is_a_torchrun_argv(tmp_path):
    cfg, config_path, _ = RunConfig(), "c.yaml", None
    cfg.learner.num_ranks = 3
    argv = learner_command(cfg, config_path=config_path, endpoint="tcp://127.0.0.1:1", init_dir="i",
                           weights_dir="w", master_port=0)
    assert argv[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=3" in argv
    port = int(next(a for a in argv if a.startswith("--master-port=")).split("=")[1])
    assert 0 < port < 65536
    assert argv[argv.index("-m", 3) + 1] == "actors.learner"
    env = learner_env(cfg)
    assert env["OMP_NUM_THREADS"] == str(learner_threads(cfg))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("replay, minibatches, decoupled, ep", [("R3", 2, False, 1), ("R2", 1, True, 1),
                                                                 ("R3", 1, False, 2)])
def test_two_ranks_train_publish_and_shut_down(tmp_path, replay, minibatches, decoupled, ep):
    """Data-parallel, or (ep=2) expert-parallel with DeepSpeed AutoEP: each rank holds 2 of the 4 experts."""
    cfg, config_path, init_dir = _setup(tmp_path, router_replay=replay, num_minibatches=minibatches,
                                        decoupled=decoupled, expert_parallel=ep)
    rollout_model = load_model(init_dir).eval()
    initial = rollout_model.state_dict()  # HF files hold experts unfused; the learner saves these

    async def coordinator():
        async with _connected_learner(tmp_path, cfg, config_path, init_dir) as (hub, learner, hello):
            assert hello.role == "learner" and hello.worker_id == 0
            peer = next(iter(hub.peers))
            results = []
            # step 1: tokens of the learner's own version-0 weights; step 2: made-up log-probs and routes;
            # step 3: tokens of version 1 while the learner holds version 2 (the steady state of a one-step-off run)
            for step in (1, 2, 3):
                model = rollout_model if step == 1 else None
                if step == 3:
                    load_weights(rollout_model, results[0].weights_path)
                    model = rollout_model
                await hub.send(peer, _batch(step, seed=step, rollout_model=model, version=1 if step == 3 else None))
                results.append(await _expect(hub, learner, TrainResult, START_S))
            await hub.send(peer, Shutdown(reason="test done"))
            code = await learner.wait(60)
            assert code == 0, f"torchrun exited {code}; log tail:\n{learner.log()}"
            return results

    results = run(coordinator())
    assert [r.version for r in results] == [1, 2, 3] and [r.step for r in results] == [1, 2, 3]
    newest = results[-1]  # the digest sent is the digest of the bytes published (the workers check it)
    assert newest.weights_digest.startswith("sha256:") and newest.weights_digest == digest_file(newest.weights_path)
    first = results[0]
    for key in ("loss", "clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean",
                "ratio_max", "grad_norm", "tokens", "train_s", "logprob_gap_mean", "logprob_gap_max",
                "routing_mismatch_frac"):
        assert np.isfinite(first.stats[key]), (key, first.stats)
    assert first.stats["tokens"] == _batch(1, seed=1).response_lens.sum()  # both ranks' shards counted once
    assert first.stats["grad_norm"] > 0
    # the trainer reproduces its own rollout: same weights, same routes, fp32 -> no gap, no routing mismatch
    assert first.stats["logprob_gap_tokens"] > 0 and first.stats["logprob_gap_max"] < 1e-4
    assert first.stats["routing_mismatch_frac"] == 0.0
    # step 2's made-up log-probs (-3) and routes (experts 0, 1 everywhere) are far from what the trainer computes
    assert results[1].stats["logprob_gap_mean"] > 0.1 and results[1].stats["routing_mismatch_frac"] > 0.2
    # step 3: recomputed with a frozen copy of version 1, not the updated weights (lr 1e-2 moved them visibly);
    # under EP that copy is the all-gathered expert shards, so this also checks the gather
    assert results[2].stats["logprob_gap_max"] < 1e-4 and results[2].stats["behavior_proximal_abs_diff"] > 1e-3
    for r in results:  # replicated weights stay identical across ranks; EP experts differ between ranks
        assert r.stats["replica_drift"] == 0.0, r.stats
        assert r.stats.get("expert_shards_distinct", 0.0) == float(ep > 1), r.stats
    if decoupled:  # behaviour -> proximal importance weights: exactly 1 at step 1 (same weights), not at step 2
        assert abs(first.stats["is_weight_mean"] - 1.0) < 1e-4 and first.stats["is_truncated_frac"] == 0.0
        assert 1e-3 < abs(results[1].stats["is_weight_mean"] - 1.0) and results[1].stats["is_weight_mean"] <= 2.0
    weights = load_file(first.weights_path.replace("v1", "v3"))
    assert weights.keys() == initial.keys()
    assert any(not torch.equal(weights[k], initial[k]) for k in initial)
    on_disk = sorted(p.name for p in (tmp_path / "weights").glob("*.safetensors"))
    assert on_disk == ["policy_v2.safetensors", "policy_v3.safetensors"]  # only the newest two are kept


@pytest.mark.timeout(300)
def test_failed_step_reports_error_and_all_ranks_exit_nonzero(tmp_path):
    cfg, config_path, init_dir = _setup(tmp_path)

    async def coordinator():
        async with _connected_learner(tmp_path, cfg, config_path, init_dir) as (hub, learner, _):
            good = _batch(1)
            bad = TrainBatch(**{**{f: getattr(good, f) for f in TrainBatch.__slots__},
                                "advantages": np.zeros(0, np.float32)})  # no advantage for any sequence
            await hub.send(next(iter(hub.peers)), bad)
            report = await _expect(hub, learner, ErrorReport, START_S)
            assert report.where == "learner" and "advantages" in report.error
            assert await learner.wait(60) != 0

    run(coordinator())


@pytest.mark.timeout(300)
def test_ranks_exit_nonzero_when_the_coordinator_vanishes(tmp_path):
    cfg, config_path, init_dir = _setup(tmp_path, peer_timeout_s=3.0)

    async def coordinator():
        async with _connected_learner(tmp_path, cfg, config_path, init_dir) as (hub, learner, _):
            await hub.close()  # silent from now on
            assert await learner.wait(START_S) != 0
            assert "learner.coordinator_lost" in learner.log()

    run(coordinator())


@pytest.mark.parametrize("loss, aggregation", [("espo", "seq_mean_group_mean"), ("gspo", "seq_mean_token_mean"),
                                               ("grpo", "token_mean"), ("cispo", "token_mean"),
                                               ("dr_grpo", "seq_mean_token_sum_norm")])
def test_each_loss_is_built_from_its_config_section(loss, aggregation):
    from engine.algo.loss_seam import LossInputs, build_loss

    cfg = RunConfig()
    cfg.learner.loss = loss
    section = getattr(cfg.learner, loss)
    built = build_loss(loss, section, aggregation=cfg.learner.aggregation, vocab_size=99,
                       norm_len=8)
    assert built.aggregation == aggregation and built.cfg is section
    assert built.ctx.vocab_size == 99 and built.ctx.norm_len == 8
    logp = torch.zeros(2, 3, requires_grad=True)
    loss_value, stats = built(LossInputs(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3),
                                         entropy_NT=torch.rand(2, 3)))
    assert torch.isfinite(loss_value) and "clip_frac" in stats
    with pytest.raises(TypeError, match="takes a"):
        build_loss(loss, object(), vocab_size=99, norm_len=8)
