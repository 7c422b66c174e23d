"""The learner rank's building blocks that need no actor machinery: the process groups and the DeepSpeed config
(``init_groups``, ``resolve_precision``, ``deepspeed_config``), one rank's share of a batch (``Shard``), statistics
reduced across ranks (``StatSums``), the all-gather of token values for a loss's batch-global statistics
(``gather_tokens``), the rollout-vs-trainer gap probe (``probe_gap``), the update forward that is also the
old-policy pass (``logprobs_with_entropy``), and the rank-0 fan-out of frames to the other ranks (an int64 size,
then the codec's bytes as a uint8 tensor; a size <= 0 is a control code), rank 0's weight sender
(``weight_sender``) and the test for a collective that failed because another rank is gone (``lost_a_rank``).
actors/learner.py composes them into ``LearnerRank`` and the actor.

Process groups: the default group is NCCL where CUDA is present (``learner.dist_backend=auto``) and carries every
collective on device tensors (DeepSpeed's gradient reduction, ``gather_tokens``, the expert-parallel gather of the
published weights, the replica check). Everything that lives in host memory goes over a second, gloo group on the
same ranks (``init_groups``): the fan-out frames (uint8 tensors), the reduced step statistics and the checkpoint's
fault agreement, because NCCL cannot move CPU tensors. On CPU both groups are gloo.

Precision (``learner.precision``): fp32, or bf16 mixed precision by DeepSpeed's ``bf16`` section (the module runs in
bf16; the optimizer keeps fp32 master weights and Adam moments; gradients are all-reduced in fp32). Logits are cast
to fp32 before any log-softmax or entropy (as slime's ``get_responses`` asserts float32 logits and verl's
``logprobs_from_logits_v2`` avoids bf16 logsumexp), so log-probs, entropies, ratios and the loss are fp32."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from configs.schema import LearnerConfig, RunConfig
from engine.algo.entropy import entropy_of_logits
from engine.algo.loss_registry import counts_tokens
from engine.modeling.expert_parallel import autoep_config
from engine.modeling.model import token_logprobs
from engine.modeling.routing import mismatch_NT, route_hooks
from transport.messages import TrainBatch

TICK, SHUTDOWN, PEER_LOST = 0, -1, -2  # control codes sent in place of a frame size
_POLL_S = 0.02  # ranks > 0 poll their pending broadcast at this period (s)


def shard_bounds(num_items: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [lo, hi) of rank's share; sizes differ by at most one when world does not divide it."""
    return num_items * rank // world, num_items * (rank + 1) // world


def resolve_backend(cfg: LearnerConfig) -> str:
    """``learner.dist_backend``: auto = nccl where CUDA is present, else gloo (configs/schema.py validates nccl)."""
    if cfg.dist_backend != "auto":
        return cfg.dist_backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def resolve_precision(cfg: RunConfig) -> str:
    """``learner.precision``: auto = bf16 when the rollout serves bfloat16 weights (``model.dtype``), so the learner
    computes with the numerics the tokens were sampled with; fp32 otherwise. On CUDA bf16 needs a GPU that has it."""
    precision = cfg.learner.precision
    if precision == "auto":
        precision = "bf16" if cfg.model.dtype == "bfloat16" else "fp32"
    if (precision == "bf16" and resolve_backend(cfg.learner) == "nccl"
            and not torch.cuda.is_bf16_supported()):
        raise ValueError(f"learner.precision={cfg.learner.precision} resolves to bf16, which this GPU "
                         f"({torch.cuda.get_device_name()}) lacks; pass learner.precision=fp32")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the learner's module (and the gap probe's frozen copy) runs in."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def init_groups(backend: str):
    """Join the default process group (``backend``) through DeepSpeed -> the gloo group for host tensors (the
    module docstring). Under NCCL each rank first takes the GPU of its LOCAL_RANK."""
    import deepspeed

    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)
    return dist.new_group(backend="gloo")


def deepspeed_config(cfg: LearnerConfig, model_type: str = "qwen3_moe", *, precision: str = "fp32",
                     load_universal: bool = False) -> dict:
    """load_universal: the checkpoint to resume is a Universal Checkpoint (actors/learner_state.py, elastic
    resize), whose optimizer state DeepSpeed re-partitions over this group's size."""
    bf16 = precision == "bf16"
    config = {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: a rank's whole shard is one micro-batch
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW",  # torch_adam: torch's AdamW, so no FusedAdam JIT build
                      "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": bf16},  # bf16 module, fp32 master weights and moments in the optimizer
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["communication_data_type"] = "fp32"  # gradients reduced in fp32 (verl's FSDP reduce_dtype)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if cfg.expert_parallel > 1:
        config["expert_parallel"] = autoep_config(cfg.expert_parallel, model_type)
    return config


def skip_shm_comm_build() -> None:
    """Mark DeepSpeed's CPU shared-memory comm op incompatible so the backend init does not JIT-build it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a cached dict; edits persist by design


class Shard:
    """One rank's rows [lo, hi) of one mini-batch (rows ``mb_rows`` of the batch), as tensors trimmed to their
    own length, on ``device`` (the module's). An empty shard keeps one row with an all-false mask: every rank must
    join every collective."""

    def __init__(self, batch: TrainBatch, lo: int, hi: int, *, aggregation: str, mb_rows: tuple[int, int],
                 device: torch.device | str = "cpu") -> None:
        empty = hi == lo
        if empty:
            lo, hi = mb_rows[0], mb_rows[0] + 1
        start_n = torch.from_numpy(batch.prompt_lens[lo:hi].astype(np.int64))
        end_n = start_n + torch.from_numpy(batch.response_lens[lo:hi].astype(np.int64))
        length = max(int(end_n.max()), 2)  # trim the shard's padding
        pos_L = torch.arange(length)
        self.ids_NL = torch.from_numpy(batch.input_ids[lo:hi, :length].astype(np.int64))
        self.attn_NL = (pos_L < end_n[:, None]).long()
        self.mask_NL = (pos_L >= start_n[:, None]) & (pos_L < end_n[:, None]) & (not empty)
        self.old_logp_NL = torch.from_numpy(np.array(batch.behavior_logprobs[lo:hi, :length], dtype=np.float32))
        self.versions_NL = torch.from_numpy(batch.token_versions[lo:hi, :length].astype(np.int64))
        self.adv_N = torch.from_numpy(np.array(batch.advantages[lo:hi], dtype=np.float32))
        self.zvp_sign_N = (torch.from_numpy(batch.zvp_sign[lo:hi].astype(np.int64)) if batch.zvp_sign.size
                           else None)
        self.routes_NLLK = self.routed_N = None
        if batch.routes.size:
            width = min(length, batch.routes.shape[1])
            routes = np.zeros((hi - lo, length) + batch.routes.shape[2:], dtype=np.int64)
            routes[:, :width] = batch.routes[lo:hi, :width]
            self.routes_NLLK = torch.from_numpy(routes)
            self.routed_N = torch.from_numpy(np.minimum(batch.routed_lens[lo:hi], length).astype(np.int64))
        mb_lens = batch.response_lens[mb_rows[0]:mb_rows[1]]
        self.denom = max(int(mb_lens.sum()) if counts_tokens(aggregation) else int((mb_lens > 0).sum()), 1)
        self.entropy_NL = self.own_routes_NLLK = self.prox_logp_NL = None  # filled by the old-policy pass
        for name in ("ids_NL", "attn_NL", "mask_NL", "old_logp_NL", "versions_NL", "adv_N", "zvp_sign_N",
                     "routes_NLLK", "routed_N"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))

    def field(self, name: str) -> torch.Tensor:
        """The shard's tensor for the ``LossInputs`` field ``name`` known before the update (a loss's
        ``batch_fields``)."""
        fields = {"entropy_NT": self.entropy_NL, "old_logp_NT": self.old_logp_NL, "mask_NT": self.mask_NL}
        if name not in fields:
            raise ValueError(f"a loss asked for batch field {name!r}; the learner gathers only {sorted(fields)}")
        return fields[name]


class StatSums:
    """Weighted means and maxima accumulated over mini-batches, reduced across ranks in one all-reduce each."""

    def __init__(self) -> None:
        self._sums: dict[str, list] = {}
        self._max: dict[str, torch.Tensor] = {}
        self._totals: dict[str, float] = {}

    def add(self, name: str, total, weight) -> None:
        entry = self._sums.setdefault(name, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += float(weight)

    def add_sums(self, sums: dict) -> None:
        """``{name: (total, weight)}`` from an advantage transform (engine/algo/transforms.py)."""
        for name, (total, weight) in sums.items():
            self.add(name, total, weight)

    def total(self, name: str, value) -> None:
        """A sum over mini-batches and ranks (reported as is, not as a mean)."""
        self._totals[name] = self._totals.get(name, 0.0) + float(value)

    def maximum(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().double().reshape(()).cpu()
        self._max[name] = torch.maximum(self._max[name], v) if name in self._max else v

    def reduce(self, group=None) -> dict[str, float]:
        """A collective over ``group`` (host tensors: the learner's gloo group) -> the stats of every rank."""
        names, maxes, totals = sorted(self._sums), sorted(self._max), sorted(self._totals)
        sums = torch.tensor([x for k in names for x in self._sums[k]] + [self._totals[k] for k in totals],
                            dtype=torch.float64)
        top = torch.stack([self._max[k] for k in maxes]) if maxes else torch.zeros(0, dtype=torch.float64)
        dist.all_reduce(sums, group=group)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        out = {k: float(sums[2 * i]) / float(sums[2 * i + 1]) if float(sums[2 * i + 1]) > 0 else float("nan")
               for i, k in enumerate(names)}
        out.update({k: float(top[i]) for i, k in enumerate(maxes)})
        out.update({k: float(sums[2 * len(names) + i]) for i, k in enumerate(totals)})
        out["tokens"] = float(sums[2 * names.index("entropy") + 1]) if "entropy" in names else 0.0
        return out


@torch.no_grad()
def probe_gap(shards: list[Shard], models, *, budget: int, replay_r3: bool, temperature: float,
              acc: StatSums) -> None:
    """|log pi_train_old - log pi_rollout| per token: the trainer's teacher-forced recompute of tokens under the
    very weights that sampled them, against the rollout's log-probs, on up to ``budget`` sequences.

    models: (version, model) pairs; a token is recomputed by the model of its own version (model None: skipped).
    In steady state every token is one version old, so the learner keeps a frozen copy of the previous weights.
    Routes are replayed as configured (``logprob_gap_*``); with R3 replay the same tokens are recomputed once more
    with replay off (``logprob_gap_off_mean``), which also gives the fraction of positions whose expert set differs
    in at least one layer when the trainer routes by itself (``routing_mismatch_frac``). R2 replays the trainer's
    own routes: for the probe that is no replay."""
    for sh in shards:
        rows = torch.arange(min(budget, sh.ids_NL.shape[0]), device=sh.ids_NL.device)
        budget -= len(rows)
        for version, model in models:
            on_NL = sh.mask_NL[rows] & (sh.versions_NL[rows] == version)
            if model is None or not bool(on_NL.any()):
                continue
            keep = on_NL.any(-1)
            r = rows[keep]
            routes = (sh.routes_NLLK[r], sh.routed_N[r]) if sh.routes_NLLK is not None else (None, None)
            replays = [True, False] if replay_r3 and routes[0] is not None else [False]
            for replay in replays:
                _probe_rows(model, sh, r, on_NL[keep], routes if replay else None, routes, temperature, acc,
                            as_configured=replay == replays[0])
        if budget <= 0:
            break


def _probe_rows(model, sh: Shard, r: torch.Tensor, on_NL: torch.Tensor, forced, routes, temperature: float,
                acc: StatSums, *, as_configured: bool) -> None:
    """One recompute of rows ``r`` (forced: the rollout's (routes, routed lengths) to replay, or None)."""
    with route_hooks(model, forced_NTLK=forced[0] if forced else None, routed_N=forced[1] if forced else None) as own:
        logp_NL = token_logprobs(model, sh.ids_NL[r], sh.attn_NL[r], temperature=temperature)
    d = (logp_NL - sh.old_logp_NL[r])[on_NL].double()
    if as_configured:
        acc.add("logprob_gap_mean", d.abs().sum(), float(d.numel()))
        acc.add("logprob_gap_k3", (d.exp() - 1 - d).sum(), float(d.numel()))  # KL(rollout || train)
        acc.maximum("logprob_gap_max", d.abs().max())
        acc.total("logprob_gap_tokens", float(d.numel()))
    if forced is None:
        acc.add("logprob_gap_off_mean", d.abs().sum(), float(d.numel()))
        if routes[0] is not None:
            own_NLLK = own.stacked(0).reshape(routes[0].shape)
            routed_NL = on_NL & (torch.arange(on_NL.shape[1], device=on_NL.device)[None] < routes[1][:, None])
            differs_NL = mismatch_NT(own_NLLK, routes[0]) & routed_NL
            acc.add("routing_mismatch_frac", differs_NL.sum().double(), routed_NL.sum().double())


def logprobs_with_entropy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float,
                          chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One differentiable forward -> (logp_NL, entropy_NL): the log-probs exactly as ``token_logprobs``
    computes them (the same ops, so the loss is unchanged), and, without gradient, the full-vocabulary entropy of
    the same logits (column 0 = 0, as ``old_policy_pass``). While the weights have not moved since the batch
    arrived, ``logp_NL.detach()`` and ``entropy_NL`` are the old-policy pass's outputs, so that pass is skipped."""
    logits_BLV = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits_BLV = logits_BLV[:, :-1].float()
    if temperature > 0 and temperature != 1.0:
        logits_BLV = logits_BLV / temperature
    picked_BL = logits_BLV.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    logp_BL = picked_BL - torch.logsumexp(logits_BLV, dim=-1)
    entropy_BL = entropy_of_logits(logits_BLV, chunk_tokens=chunk_tokens)
    return F.pad(logp_BL, (1, 0), value=0.0), F.pad(entropy_BL, (1, 0), value=0.0)


def as_float(x) -> float:
    return float("nan") if x is None else float(x)


def gather_tokens(values_M: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``values_M`` (lengths may differ), concatenated in rank order; a collective over the
    default group, on the values' device."""
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=values_M.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([values_M.numel()], device=values_M.device))
    padded = values_M.new_zeros(max(max(int(c) for c in counts), 1))
    padded[: values_M.numel()] = values_M
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts)])


def fanout_send(frame: bytes | None, code: int = TICK, *, group) -> None:
    """Rank 0: broadcast one frame (or, with frame=None, a control code <= 0) to every rank of the gloo
    ``group`` (host tensors: never the NCCL default group)."""
    dist.broadcast(torch.tensor([len(frame) if frame else code], dtype=torch.int64), src=0, group=group)
    if frame:
        dist.broadcast(torch.frombuffer(bytearray(frame), dtype=torch.uint8), src=0, group=group)


def _wait(work) -> None:
    while not work.is_completed():  # poll rather than block in C, so SIGTERM/SIGINT handlers can run
        time.sleep(_POLL_S)
    work.wait()


def fanout_recv(*, group) -> bytes | int:
    """Ranks > 0: the next frame from rank 0 over the gloo ``group``, or a control code (an int <= 0)."""
    size_1 = torch.zeros(1, dtype=torch.int64)
    _wait(dist.broadcast(size_1, src=0, async_op=True, group=group))
    size = int(size_1[0])
    if size <= 0:
        return size
    buf = torch.empty(size, dtype=torch.uint8)
    _wait(dist.broadcast(buf, src=0, async_op=True, group=group))
    return buf.numpy().tobytes()


def weight_sender(cfg: RunConfig, init_dir: str):
    """Rank 0's sender of ``rollout.weight_sync=distributed`` (actors/weight_sync.py), listening on transport.host
    (the address the servers reach this machine at); None for the other modes."""
    if cfg.rollout.weight_sync != "distributed":
        return None
    from actors.weight_sync import WeightSender

    return WeightSender(init_dir, master_address=cfg.transport.host)


def lost_a_rank(e: Exception) -> bool:
    """A collective failed because another rank is gone (killed, crashed): torchrun is stopping the group."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in ("Connection closed by peer", "Connection reset",
                                                                     "Broken pipe"))
