"""The learner actor: one policy-gradient optimizer step per TrainBatch, data-parallel over torchrun ranks.

consumes: TrainBatch, Shutdown (coordinator -> rank 0)
produces: TrainResult | ErrorReport (rank 0 -> coordinator)
blocks on: the forward/backward/step of every rank (in a thread on rank 0, so heartbeats keep flowing)

Launch (what ``engine.coordinator.launch.learner_command`` builds; the coordinator runs it):

    python -m torch.distributed.run --nproc-per-node=R --nnodes=1 --master-addr=127.0.0.1 --master-port=P \
        -m actors.learner --config run/config.yaml --endpoint tcp://127.0.0.1:PORT \
        --init HF_DIR --weights-dir DIR [--resume CHECKPOINT_DIR]

Process layout: only rank 0 talks to the coordinator (a ``Peer``). It re-broadcasts every frame to the other ranks
over torch.distributed (a gloo group even when the default group is NCCL: learner_parts.py), without pickle: an
int64 size, then the codec's bytes as a uint8 tensor. A size <= 0 is a control code (``TICK``, ``SHUTDOWN``,
``PEER_LOST``). Every rank decodes the same batch and trains on its contiguous shard of the N sequences. Ranks > 0
poll their pending broadcast, so a signal still reaches Python while they wait; rank 0 sends a tick when idle so
gloo's collective timeout never fires.

Batching: one TrainBatch is one optimizer step. Each rank's whole shard is one micro-batch (DeepSpeed's batch
size fields are bookkeeping only: its data loader is never used), so gradient_accumulation_steps = 1. The loss
of each shard is normalised by the whole batch's token (or sequence) count and multiplied by R, because
DeepSpeed averages gradients over the R ranks: the resulting gradient is that of the whole-batch loss.

DeepSpeed on CPU JIT-builds its ``deepspeed_shm_comm`` op at every communication-backend init (about 27 s the
first time). That op only serves ``inference_all_reduce`` (AutoTP inference layers); training collectives go
through torch.distributed either way. We mark it incompatible before init, so no compiler runs at all.

Expert parallelism (``learner.expert_parallel=E``): DeepSpeed AutoEP shards every MoE layer's experts over groups
of E ranks (engine/modeling/expert_parallel.py); the rest stays data-parallel. After each step every rank joins one
all-gather of the expert shards, so rank 0 publishes, and the gap probe loads, plain transformers weights.
``replica_drift`` (0 when the replicated weights agree across ranks) is logged every step with > 1 rank.

Devices and precision: ``learner.dist_backend`` (auto = NCCL on CUDA, each rank on the GPU of its LOCAL_RANK;
gloo = CPU ranks) and ``learner.precision`` (fp32, or DeepSpeed bf16 with fp32 master weights; auto follows
``model.dtype``). The learner loads the --init weights in fp32 and DeepSpeed casts them; published weights are
written in ``model.dtype``, whatever the learner computes in.

Versions: version 0 is the --init weights; after k optimizer steps rank 0 writes
``<weights-dir>/policy_v{k}.safetensors`` atomically and keeps only the newest two files. The sha256 of the
bytes written travels in ``TrainResult.weights_digest``; every rollout worker checks it before serving them.
With ``rollout.weight_sync=distributed`` rank 0 also answers ``WeightsWanted`` between two steps by broadcasting
the current weights into that worker's sglang server (actors/weight_sync.py).

One step (``LearnerRank.step``): shards -> gap probe (every ``learner.gap_probe_every`` versions) -> old-policy
pass -> the loss's batch-global statistics -> per shard, the ``LossInputs`` record through the advantage transforms
(engine/algo/transforms.py) -> loss, backward, optimizer step -> stats reduced over ranks. The first mini-batch's
update forward is also its old-policy pass (the weights have not moved yet): one forward instead of two, and
with one mini-batch per step (the default) no separate old-policy forward at all. The loss is the registered
class of ``learner.loss`` (engine/algo/loss_registry.py) built from its section ``learner.<loss>``.

Threads: each rank runs ``learner_threads(cfg)`` torch threads (engine/coordinator/launch.py: learner.threads_per_rank,
or with 0 the cores the local rollout workers do not take, split over the ranks).

Under 500 lines with the rank's model and step, the rank-0 peer and the ranks > 0 loop read together; the
parts that need no actor machinery are in actors/learner_parts.py, the rank's checkpoint in actors/learner_state.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import structlog
import torch
import torch.distributed as dist
import transformers

from actors.common import actor_parser, make_peer
from configs.load import load_resolved
from configs.schema import RunConfig
from engine.log import configure_logging
from engine.coordinator.launch import learner_threads
from engine.coordinator.procs import die_with_parent
from engine.algo.loss_seam import LossInputs, build_loss
from engine.data.tasks import generation_limit
from engine.algo.transforms import decoupled_weights, rl_zvp
from actors.learner_state import TAG, load_rank, resume_tag, save_rank
from actors.learner_parts import (PEER_LOST, SHUTDOWN, TICK, Shard, StatSums, as_float, compute_dtype,
                                  deepspeed_config, fanout_recv, fanout_send, gather_tokens, init_groups,
                                  logprobs_with_entropy, lost_a_rank, probe_gap, resolve_backend, resolve_precision,
                                  shard_bounds, skip_shm_comm_build, weight_sender)
from engine.modeling.expert_parallel import hf_state_dict, patch_transformers, replica_check
from engine.modeling.model import load_model, old_policy_pass, publish_state, token_logprobs
from engine.modeling.replay_mode import ReplayMode
from engine.modeling.routing import route_hooks
from transport.channels import PeerLost, run
from transport.codec import decode, encode
from transport.messages import (CheckpointSaved, DropWeightGroup, ErrorReport, SaveCheckpoint, Shutdown, TrainBatch,
                                TrainResult, WeightsWanted)

log = structlog.get_logger()

LearnerInbox = TrainBatch | SaveCheckpoint | WeightsWanted | DropWeightGroup | Shutdown

_TICK_S = 60.0  # idle rank 0 sends a tick this often; far below gloo's 30 min collective timeout
_KEEP_VERSIONS = 2
_REPORT_GRACE_S = 0.5  # time for the ErrorReport frame to leave before the socket closes


# ---- one rank's model and step -------------------------------------------------------------------------


class LearnerRank:
    """The model, optimizer and step of one rank; identical on every rank except ``publish`` (rank 0)."""

    def __init__(self, cfg: RunConfig, init_dir: str, weights_dir: str, resume: str | None = None) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        skip_shm_comm_build()
        self.precision = resolve_precision(cfg)  # a bf16 request on a GPU without bf16 fails here, before init
        self.cpu_group = init_groups(resolve_backend(cfg.learner))  # host tensors: fan-out, stats, fault votes
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.publish_dtype = getattr(torch, cfg.model.dtype)  # what the rollout workers load
        model = load_model(init_dir, "float32")  # the master weights; DeepSpeed casts the module under bf16
        model.train()
        self.expert_parallel = cfg.learner.expert_parallel
        if self.expert_parallel > 1:
            patch_transformers()
        self.resume_tag = resume_tag(resume, rank=self.rank, world=self.world, group=self.cpu_group) if resume \
            else TAG  # another group size than the checkpoint's: its Universal Checkpoint (learner_state.py)
        ds_config = deepspeed_config(cfg.learner, model.config.model_type, precision=self.precision,
                                     load_universal=self.resume_tag != TAG)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        self.device = self.engine.device
        self.temperature = cfg.rollout.temperature
        lc = cfg.learner
        self.loss = build_loss(lc.loss, getattr(lc, lc.loss), aggregation=lc.aggregation,
                               vocab_size=model.config.vocab_size, norm_len=generation_limit(cfg.task))
        self.chunk_tokens = cfg.learner.entropy_chunk_tokens
        self.replay, self.num_minibatches = ReplayMode(cfg.learner.router_replay), cfg.learner.num_minibatches
        self.gap_probe_seqs = max(cfg.learner.gap_probe_seqs // self.world, 1) if cfg.learner.gap_probe_seqs else 0
        self.gap_probe_every = cfg.learner.gap_probe_every
        self.fuse_first_pass = True  # False: a separate old-policy forward for every shard (the tests compare)
        self.probe_model = (load_model(init_dir, "float32").to(self.device, compute_dtype(self.precision)).eval()
                            if self.gap_probe_seqs else None)  # the previous version, as the learner computes it
        self.decoupled, self.decoupled_cap = cfg.learner.decoupled, cfg.learner.decoupled_is_cap
        self.rl_zvp_alpha = cfg.learner.rl_zvp_alpha
        self.weights_dir = Path(weights_dir)
        self.version = 0
        self._hf_state = self._gather_hf_state()  # the weights of self.version, as HF names (None: no EP)
        if resume:
            self.load(resume)

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """Old-policy pass over the whole batch, then one optimizer step per mini-batch -> stats of the batch.

        The N sequences split into ``num_minibatches`` contiguous mini-batches; each rank trains on its shard of
        each. The old-policy pass (entropy, proximal log-probs, R2 routes) runs on every shard before the first
        update, i.e. with the weights the batch's newest tokens were sampled from; for the first shard it is that
        shard's update forward (``_fused_forward``). The loss's batch-global statistics (ESPO's batch-scope entropy
        threshold) are taken once, over every rank. The rollout-vs-trainer gap probe runs only on versions that
        are multiples of ``gap_probe_every`` (``logprob_gap_*`` and ``routing_mismatch_frac`` are absent from the
        other steps' stats), and the probe's frozen copy is refreshed only on the step before."""
        t0 = time.perf_counter()
        shards = self._shards(batch)
        acc = StatSums()
        if self._probes(self.version):
            self._probe_rollout_gap(shards, acc)
        if self._probes(self.version + 1):
            self.probe_model.load_state_dict(self.hf_state())  # version v: next step's v - 1
        first_logp = self._fused_forward(shards[0], acc) if self.fuse_first_pass else None
        for sh in shards[1:] if first_logp is not None else shards:
            self._old_policy_pass(sh, acc)
        global_stats = self._batch_statistics(shards)
        for i, sh in enumerate(shards):
            self._update(self._loss_inputs(sh, acc, logp_NL=first_logp if i == 0 else None), global_stats, acc)
        return self._finish(acc, num_seqs=batch.input_ids.shape[0], t0=t0)

    def _shards(self, batch: TrainBatch) -> list[Shard]:
        """This rank's shard of each mini-batch; under R3 the batch must carry the rollout's routes."""
        if self.replay is ReplayMode.R3 and not (batch.routed_lens > 0).any():
            raise ValueError("learner.router_replay=R3 but this batch carries no MoE routes: the rollout "
                             "backend did not record them (keep rollout.return_routes=true) or pass "
                             "learner.router_replay=R2 or off")
        num_seqs, shards = batch.input_ids.shape[0], []
        for m in range(self.num_minibatches):
            mlo, mhi = shard_bounds(num_seqs, m, self.num_minibatches)
            lo, hi = shard_bounds(mhi - mlo, self.rank, self.world)
            shards.append(Shard(batch, mlo + lo, mlo + hi, aggregation=self.loss.aggregation, mb_rows=(mlo, mhi),
                                device=self.device))
        return shards

    def _batch_statistics(self, shards: list[Shard]) -> dict[str, torch.Tensor]:
        """The loss's batch-global hook: the fields it names, at every trained token of every shard and rank."""
        if not self.loss.batch_fields:
            return {}
        gathered = {name: gather_tokens(torch.cat([sh.field(name)[sh.mask_NL] for sh in shards]))
                    for name in self.loss.batch_fields}
        return self.loss.batch_statistics(gathered)

    def _probes(self, version: int) -> bool:
        """Whether the step that starts at ``version`` runs the gap probe."""
        return bool(self.gap_probe_seqs) and version % self.gap_probe_every == 0

    def _loss_inputs(self, sh: Shard, acc: StatSums, logp_NL: torch.Tensor | None = None) -> LossInputs:
        """The shard's log-probs under the live weights (routes replayed as configured; ``logp_NL``: already
        computed by ``_fused_forward``) and its loss record, through the advantage transforms: RL-ZVP, then
        decoupled PPO's proximal ratio and weights."""
        if logp_NL is None:
            forced_NLLK, routed_N = {ReplayMode.R3: (sh.routes_NLLK, sh.routed_N),
                                     ReplayMode.R2: (sh.own_routes_NLLK, None)}.get(self.replay, (None, None))
            with route_hooks(self.engine.module, forced_NTLK=forced_NLLK, routed_N=routed_N, record=False):
                logp_NL = token_logprobs(self.engine, sh.ids_NL, sh.attn_NL, temperature=self.temperature)
        x = LossInputs(logp_NL, sh.old_logp_NL, sh.adv_N, sh.mask_NL, entropy_NT=sh.entropy_NL,
                       denom=float(sh.denom))
        if self.rl_zvp_alpha > 0 and sh.zvp_sign_N is not None and bool((sh.zvp_sign_N != 0).any()):
            x, sums = rl_zvp(x, sh.zvp_sign_N, alpha=self.rl_zvp_alpha)
            acc.add_sums(sums)
        if self.decoupled:  # ratio vs the proximal policy; behaviour -> proximal by truncated IS (AReaL)
            x, sums = decoupled_weights(x, sh.prox_logp_NL, cap=self.decoupled_cap)
            acc.add_sums(sums)
        return x

    def _update(self, x: LossInputs, global_stats: dict[str, torch.Tensor], acc: StatSums) -> None:
        """Loss, backward and one optimizer step on this shard; its loss statistics into ``acc``."""
        loss, stats = self.loss(x, global_stats)
        self.engine.backward(loss * self.world)  # DeepSpeed divides the summed gradients by world
        grad_norm = self._stage0_grad_norm()
        self.engine.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()  # ZeRO 1/2: pre-clip norm of the whole gradient
        tokens = x.mask_NT.sum().double()
        acc.add("loss", loss.detach(), 1.0 / self.world)  # a mini-batch's shard losses sum to its loss
        acc.add("grad_norm", as_float(grad_norm), 1.0)  # the same on every rank
        acc.maximum("ratio_max", stats.pop("ratio_max"))
        for k, v in stats.items():
            acc.add(k, v.double() * tokens, tokens)

    def _finish(self, acc: StatSums, *, num_seqs: int, t0: float) -> dict[str, float]:
        """Count the new version, gather its weights (a collective under EP) and reduce the stats over ranks."""
        self.version += 1
        self._hf_state = self._gather_hf_state()  # a collective under EP: every rank, before rank 0 publishes
        out = acc.reduce(self.cpu_group)
        if self.world > 1:
            out.update(replica_check(self.engine.module))
        out.update(sequences=float(num_seqs), lr=float(self.engine.get_lr()[0]), train_s=time.perf_counter() - t0)
        return out

    @torch.no_grad()
    def _old_policy_pass(self, sh: "Shard", acc: "StatSums") -> None:
        """Entropy and proximal log-probs (rollout routes replayed under R3) and the trainer's own routes (R2)."""
        replay = sh.routes_NLLK is not None and self.replay is ReplayMode.R3
        with route_hooks(self.engine.module, forced_NTLK=sh.routes_NLLK if replay else None,
                         routed_N=sh.routed_N if replay else None) as own:
            prox_logp_NL, sh.entropy_NL = old_policy_pass(self.engine.module, sh.ids_NL, sh.attn_NL,
                                                          temperature=self.temperature,
                                                          chunk_tokens=self.chunk_tokens)
        n, length = sh.ids_NL.shape
        sh.own_routes_NLLK = own.stacked(0).reshape(n, length, *own.stacked(0).shape[1:]) if own.calls else None
        sh.prox_logp_NL = prox_logp_NL
        self._old_policy_stats(sh, acc)

    def _fused_forward(self, sh: Shard, acc: StatSums) -> torch.Tensor:
        """The first shard's update forward, taken before any optimizer step, so it is also its old-policy pass:
        -> its differentiable log-probs; entropy and proximal log-probs are the same forward's, detached. Routes:
        R3 replays the rollout's, as both passes would; R2 lets the router choose, which is what forcing the
        old pass's own choices under the same weights gives (within float tolerance); off routes freely."""
        replay = sh.routes_NLLK is not None and self.replay is ReplayMode.R3
        with route_hooks(self.engine.module, forced_NTLK=sh.routes_NLLK if replay else None,
                         routed_N=sh.routed_N if replay else None, record=False):
            logp_NL, sh.entropy_NL = logprobs_with_entropy(self.engine, sh.ids_NL, sh.attn_NL,
                                                           temperature=self.temperature,
                                                           chunk_tokens=self.chunk_tokens)
        sh.prox_logp_NL = logp_NL.detach()
        self._old_policy_stats(sh, acc)
        return logp_NL

    @staticmethod
    def _old_policy_stats(sh: Shard, acc: StatSums) -> None:
        tokens = sh.mask_NL.sum().double()
        acc.add("entropy", (sh.entropy_NL * sh.mask_NL).sum(), tokens)
        acc.add("behavior_proximal_abs_diff", ((sh.prox_logp_NL - sh.old_logp_NL).abs() * sh.mask_NL).sum(),
                tokens)

    def _probe_rollout_gap(self, shards: list[Shard], acc: StatSums) -> None:
        """The rollout-vs-trainer log-prob gap on up to ``gap_probe_seqs`` sequences (learner_parts.probe_gap):
        tokens of the current version under the live model, tokens one version older under ``probe_model``."""
        models = ((self.version, self.engine.module), (self.version - 1, self.probe_model))
        probe_gap(shards, models, budget=self.gap_probe_seqs, replay_r3=self.replay is ReplayMode.R3,
                  temperature=self.temperature, acc=acc)

    def _gather_hf_state(self) -> dict[str, torch.Tensor] | None:
        return hf_state_dict(self.engine.module) if self.expert_parallel > 1 else None

    def hf_state(self) -> dict[str, torch.Tensor]:
        """The current weights under transformers' names (experts gathered from every expert-parallel rank)."""
        return self._hf_state if self._hf_state is not None else self.engine.module.state_dict()

    def _stage0_grad_norm(self) -> torch.Tensor | None:
        """Without ZeRO, DeepSpeed clips but does not keep the norm; the gradients are already all-reduced."""
        if self.engine.zero_optimization_stage() != 0:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    def save(self, path: str) -> str:
        """Every rank (collective): "" once saved, else the disk fault every rank agreed on
        (actors/learner_state.py ``save_rank``)."""
        return save_rank(self, path)

    def load(self, path: str) -> None:
        """Every rank: continue from ``save(path)`` (actors/learner_state.py ``load_rank``), by the tag the engine
        was built for (a Universal Checkpoint after an elastic resize)."""
        load_rank(self, path, self.resume_tag)

    def published_state(self) -> dict[str, torch.Tensor]:
        """The current weights as the rollout workers load them: in host memory, in ``model.dtype`` (the bf16
        module cast up for a float32 model; fp32 weights cast down for a bfloat16 one)."""
        return {k: v.detach().to("cpu", self.publish_dtype if v.is_floating_point() else v.dtype)
                for k, v in self.hf_state().items()}

    def publish(self) -> tuple[str, str]:
        """Rank 0: write the current weights as ``policy_v{version}`` and drop the older files -> (path, digest of
        the bytes written)."""
        path = self.weights_dir / f"policy_v{self.version}.safetensors"
        # a disk fault: retried, then an OSError naming the path; the workers keep the previous version
        digest = publish_state(self.published_state(), path, version=self.version)
        for old in self.weights_dir.glob("policy_v*.safetensors"):
            m = re.fullmatch(r"policy_v(\d+)\.safetensors", old.name)
            if m and int(m.group(1)) <= self.version - _KEEP_VERSIONS:
                old.unlink(missing_ok=True)
        return str(path), digest


# ---- ranks > 0 -----------------------------------------------------------------------------------------


def _follow(learner: LearnerRank, max_frame_bytes: int) -> int:
    """Ranks > 0: train on every batch rank 0 forwards, until it says stop."""
    while True:
        item = fanout_recv(group=learner.cpu_group)
        if item == TICK:
            continue
        if item == SHUTDOWN:
            return 0
        if item == PEER_LOST:
            log.error("learner.coordinator_lost", detail="rank 0 lost the coordinator; exiting")
            return 1
        msg = decode(item, max_frame_bytes=max_frame_bytes)
        if isinstance(msg, SaveCheckpoint):
            learner.save(msg.path)
        else:
            learner.step(msg)


# ---- rank 0: the coordinator's peer --------------------------------------------------------------------


async def _serve(args: argparse.Namespace, cfg: RunConfig) -> int:
    peer = make_peer(args, cfg, "learner")  # Hello(role="learner", worker_id=0)
    await peer.start()  # Hello goes out now; heartbeats flow while DeepSpeed initialises below
    learner = None
    try:
        t0 = time.perf_counter()
        learner = await asyncio.to_thread(LearnerRank, cfg, args.init, args.weights_dir, args.resume)
        log.info("learner.ready", world=learner.world, version=learner.version, resumed_from=args.resume,
                 init_s=round(time.perf_counter() - t0, 2))
        sender = weight_sender(cfg, args.init)  # rollout.weight_sync=distributed: broadcasts into sglang servers
        while True:
            try:
                msg: LearnerInbox = await peer.recv(timeout=_TICK_S)
            except TimeoutError:
                await asyncio.to_thread(fanout_send, None, TICK, group=learner.cpu_group)
                continue
            match msg:
                case TrainBatch():
                    result = await asyncio.to_thread(_train_and_publish, learner, msg, encode(msg))
                    await peer.send(result)
                case SaveCheckpoint():
                    t0 = time.perf_counter()
                    failed = await asyncio.to_thread(_fanout_and_save, learner, msg, encode(msg))
                    await peer.send(CheckpointSaved(step=msg.step, path="" if failed else msg.path,
                                                    seconds=time.perf_counter() - t0))  # path "": not saved
                case WeightsWanted() if sender is not None:  # between two steps: nothing changes the weights
                    reply, job = sender.answer(msg, learner.hf_state(), learner.version)
                    await peer.send(reply)
                    if job is not None:
                        await asyncio.to_thread(job)
                case DropWeightGroup() if sender is not None:
                    sender.handle_drop(msg)
                case Shutdown():
                    await asyncio.to_thread(fanout_send, None, SHUTDOWN, group=learner.cpu_group)
                    log.info("learner.shutdown", reason=msg.reason, version=learner.version)
                    return 0
                case _:
                    log.warning("learner.unexpected_message", type=type(msg).__name__)
    except PeerLost as e:
        log.error("learner.coordinator_lost", endpoint=args.endpoint, error=str(e))
        if learner is not None:
            await asyncio.to_thread(fanout_send, None, PEER_LOST, group=learner.cpu_group)
        return 1
    except Exception as e:  # the actor boundary: report, then exit non-zero (torchrun stops the other ranks)
        error = traceback.format_exc()
        log.error("learner.failed", error=error)
        if lost_a_rank(e):  # another rank died: not a bug to report but a crash the coordinator recovers from
            return 1
        try:
            await peer.send(ErrorReport(where="learner", error=error))
            await asyncio.sleep(_REPORT_GRACE_S)  # close() drops unsent frames (linger 0)
        except Exception as send_error:
            log.error("learner.error_report_failed", error=repr(send_error))
        return 1
    finally:
        await peer.close()


def _fanout_and_save(learner: LearnerRank, msg: SaveCheckpoint, frame: bytes) -> str:
    """"" once saved, else the disk fault every rank agreed on (``LearnerRank.save``)."""
    fanout_send(frame, group=learner.cpu_group)
    return learner.save(msg.path)


def _train_and_publish(learner: LearnerRank, batch: TrainBatch, frame: bytes) -> TrainResult:
    fanout_send(frame, group=learner.cpu_group)
    stats = learner.step(batch)
    t0 = time.perf_counter()
    path, digest = learner.publish()
    stats["publish_s"] = time.perf_counter() - t0
    return TrainResult(step=batch.step, version=learner.version, weights_path=path, stats=stats,
                       weights_digest=digest)


# ---- entry point ---------------------------------------------------------------------------------------


def _on_signal(signum, _frame) -> None:
    # Quiet and immediate: a rank may be inside a collective that would never finish without its peers.
    log.info("learner.signal", signal=signal.Signals(signum).name)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    p = actor_parser("python -m actors.learner", __doc__.split("\n")[0])  # --endpoint, --config, --worker-id
    p.add_argument("--init", required=True, help="HF save_pretrained folder holding the version-0 weights")
    p.add_argument("--weights-dir", required=True, help="where policy_v{version}.safetensors files go")
    p.add_argument("--resume", default=None, help="a learner checkpoint directory (SaveCheckpoint) to continue")
    p.add_argument("--resume-latest", default=None, metavar="RUN_DIR",
                   help="continue from RUN_DIR's newest complete checkpoint, if any (elastic: every group restart)")
    args = p.parse_args(argv)
    if args.resume_latest:
        from engine.coordinator.checkpoint import latest

        ckpt = latest(Path(args.resume_latest))
        args.resume = str(ckpt.learner_dir) if ckpt else None

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    die_with_parent()  # torchrun starts ranks in their own sessions: never outlive it
    cfg = load_resolved(args.config)
    rank = int(os.environ.get("RANK", "0"))
    configure_logging(role="learner", rank=rank, json_lines=cfg.log_json)
    torch.set_num_threads(learner_threads(cfg))  # cores split between the actor processes (launch.py)
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)  # raised inside DeepSpeed's ZeRO
    if resolve_backend(cfg.learner) == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU ranks; also skips accelerator probing (and its warning)

    if rank == 0:
        code = run(_serve(args, cfg))
    else:
        try:
            code = _follow(LearnerRank(cfg, args.init, args.weights_dir, args.resume),
                           cfg.transport.max_frame_bytes)
        except Exception as e:  # rank 0 reports to the coordinator; here one line is enough
            log.error("learner.rank_failed", error=f"{type(e).__name__}: {e}")
            time.sleep(2 * _REPORT_GRACE_S)  # torchrun kills rank 0 once we exit: let it send its ErrorReport
            code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
