"""Structured run configuration: these dataclasses are the source of truth.

YAML files in this folder only override them; every CLI takes ``key=value`` (hydra syntax).
``configs.load`` composes and converts once at the entry point, so no DictConfig reaches engine/ or actors/.
Validation lives in ``__post_init__`` and raises ``ValueError`` naming the key and the override that fixes it.

Choices are ``Literal[...]`` annotations, checked by configs/choices.py; ``python -m configs.reference`` prints every
key with its default, type or choices and comment. One module over 400 lines on purpose: the whole schema, one
dataclass a section, read in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal, Optional
from urllib.parse import urlsplit
from configs.choices import check_choices as _check_choices, field_types, literal_choices  # noqa: F401 (re-exported)
from configs.choices import require as _require
from configs.logging_section import LoggingConfig
from configs.reward_section import JudgeConfig, RewardConfig, SandboxConfig  # noqa: F401 (re-exported)

from engine.algo.loss_registry import AGGREGATION_CHOICES, LOSS_NAMES, LOSSES, resolve_aggregation  # torch-free
from engine.backends.registry import ROLLOUT_BACKENDS  # torch-free: names only
from engine.modeling.replay_mode import REPLAY_MODES  # torch-free

_REEXPORTED = (literal_choices, JudgeConfig, SandboxConfig)  # imported from here (pyflakes: used)


# Keys with a fixed set of values are ``Literal[...]`` fields, checked by one mechanism: configs/choices.py.


@functools.cache
def key_prefix(cls: type) -> str:
    """Where instances of ``cls`` sit in a RunConfig, e.g. ``reward.sandbox.`` ("" for RunConfig itself)."""
    todo = [(RunConfig, "")]
    while todo:
        node, prefix = todo.pop()
        if node is cls:
            return prefix
        todo += [(t, f"{prefix}{name}.") for name, t in field_types(node).items() if dataclasses.is_dataclass(t)]
    return ""


def check_choices(cfg) -> None:
    """configs/choices.py's check for a section of the run config: call it first in ``__post_init__``, so later
    checks see only valid choices."""
    _check_choices(cfg, key_prefix(type(cfg)))


@dataclass
class ModelConfig:
    """Tiny Qwen3-MoE built locally from this config (random init, no download)."""

    hidden_size: int = 128
    num_layers: int = 2  # 2 learns the built-in task fastest on a CPU (4 layers: SFT ~2x slower)
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 128
    max_position_embeddings: int = 256
    init_from: Optional[str] = None  # any HF causal-LM folder (AutoModelForCausalLM + its own tokenizer) to start
    # from instead of the tiny model above (random init + SFT); its own config then decides the shape
    dtype: Literal["float32", "bfloat16"] = "float32"  # rollout workers' and learner's weights (bfloat16 runs on CPU)

    def __post_init__(self) -> None:
        check_choices(self)
        _require(1 <= self.top_k <= self.num_experts, "model.top_k", self.top_k,
                 f"it must be between 1 and model.num_experts={self.num_experts}")
        _require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads", self.num_kv_heads,
                 f"model.num_heads={self.num_heads} must be a multiple of it; pass e.g. model.num_kv_heads=1")
        for name in ("hidden_size", "num_layers", "num_heads", "head_dim", "moe_intermediate_size"):
            _require(getattr(self, name) > 0, f"model.{name}", getattr(self, name), "it must be positive")


REASONING_LEVELS = 6  # difficulty levels of the reasoning tasks (engine/data/reasoning.py)
# a reasoning task's final-answer verifier, the reward plugin its runs use in place of the default exact match
REASONING_VERIFIERS = {name: f"engine.rewards.reasoning_verifiers:{name}" for name in ("scratchpad", "countdown",
                                                                                        "sorting")}


@dataclass
class TaskConfig:
    """The prompts and the verifier. ``arithmetic`` is built in; ``jsonl`` reads {"prompt", "answer"} lines;
    ``scratchpad``, ``countdown`` and ``sorting`` are built-in reasoning tasks with worked solutions
    (docs/concepts/tasks.md)."""

    name: Literal["arithmetic", "jsonl", "scratchpad", "countdown", "sorting"] = "arithmetic"
    min_digits: int = 1
    max_digits: int = 4
    jsonl_path: Optional[str] = None  # for name=jsonl
    num_eval: int = 500  # held-out prompts for greedy eval (fixed by seed)
    num_dev: int = 200  # held-out prompts used only to stop SFT
    max_answer_tokens: Optional[int] = None  # generation length limit, EOS included; unset: 8 for arithmetic, and
    # for a dataset its longest reference answer (in tokens, + EOS) plus 25%, resolved before the run starts
    reverse_answer: bool = True  # arithmetic: answer digits least significant first (learns much faster)
    min_level: int = 1  # reasoning tasks: the easiest difficulty level drawn (1: a few characters, no steps)
    max_level: int = REASONING_LEVELS  # the hardest (6: worked solutions of a few hundred characters); levels
    # are drawn with weights 0.6 ** (level - min_level), so most prompts are easy and a few are long
    train_pool: Optional[str] = None  # RL prompts from this jsonl (everyprompt-filter-pool output) instead of
    # the task's own training distribution; eval and dev sets are unchanged
    seed: int = 1234

    def __post_init__(self) -> None:
        check_choices(self)
        if self.name == "jsonl":
            _require(bool(self.jsonl_path), "task.jsonl_path", self.jsonl_path,
                     "task.name=jsonl needs a file: pass task.jsonl_path=/path/to/data.jsonl")
        _require(1 <= self.min_digits <= self.max_digits, "task.min_digits", self.min_digits,
                 f"it must be between 1 and task.max_digits={self.max_digits}")
        _require(self.num_eval > 0, "task.num_eval", self.num_eval, "it must be positive")
        _require(1 <= self.min_level <= self.max_level <= REASONING_LEVELS, "task.min_level", self.min_level,
                 f"it must be between 1 and task.max_level={self.max_level}, and task.max_level at most "
                 f"{REASONING_LEVELS}")
        _require(self.max_answer_tokens is None or self.max_answer_tokens > 0, "task.max_answer_tokens",
                 self.max_answer_tokens, "it must be positive (or unset: derived from the data)")


@dataclass
class SFTConfig:
    """Cold-start SFT (the paper's first stage); the result is cached and reused by later runs."""

    enabled: Optional[bool] = None  # None = on for the built-in model, off with model.init_from (true trains it too)
    target_accuracy: float = 0.3  # stop once greedy dev accuracy reaches this (leaves RL headroom)
    max_steps: int = 3000
    max_time_s: float = 240.0
    batch_size: int = 128
    lr: float = 1.5e-3
    warmup_steps: int = 20  # linear lr warmup, then constant
    eval_every: int = 20  # accuracy jumps quickly once it starts: check often
    cache_dir: Optional[str] = None  # null = <out_dir>/.sft_cache, resolved at load (config.yaml shows it)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(0.0 < self.target_accuracy <= 1.0, "sft.target_accuracy", self.target_accuracy,
                 "it must be in (0, 1]")
        _require(self.lr > 0, "sft.lr", self.lr, "it must be positive")


@dataclass
class RolloutConfig:
    num_workers: int = 1  # workers the coordinator starts on this machine (more can join: runs/<name>/join.json)
    backend: Literal[ROLLOUT_BACKENDS] = "hf"  # engine/backends/registry.py: hf (transformers, CPU default), sglang
    # (a GPU server in its own environment: rollout.sglang_python) or sim (the calibrated simulator, for benchmarks)
    group_size: int = 8  # responses per prompt (G)
    temperature: float = 1.0
    max_batch_samples: int = 512  # sequences decoded together by one worker
    threads_per_worker: int = 1  # torch threads per worker process (split the cores!)
    return_routes: bool = True  # record MoE routes at generation (needed by learner.router_replay=R3)
    adaptive_group_size: bool = False  # zero-variance elimination, rollout stage: raise N for prompts likely to
    # come out zero-variance (offline pass rate, else per-source rate), within the extra-sample budget
    max_group_size: int = 16
    zv_target: float = 0.5  # ... while the predicted zero-variance probability is above this
    top_up: int = 0  # extra samples for a group whose samples all agree in raw correctness (0 = off)
    extra_sample_frac: float = 0.25  # budget for adaptive N and top-ups: this fraction of the base samples
    chunk_tokens: int = 4  # stream each response every this many tokens (0 = only whole responses)
    kv_on_update: Literal["recompute", "keep"] = "recompute"  # new weights mid-response: recompute the KV cache
    # under them (exact), or keep it (no prefill; older keys/values)
    schedule: Literal["fifo", "length_aware"] = "fifo"  # fifo: groups in arrival order to the worker with the
    # fewest outstanding samples;
    # length_aware: longest predicted first to the worker with the fewest predicted tokens (engine/coordinator/schedule.py)
    length_ema: float = 0.5  # length_aware: weight of a prompt's newest mean length in its prediction
    postprocess_workers: int = 0  # detokenization / post-processing pool before scoring (0 = none, score at once)
    reward_overlap: bool = True  # score each response as it finishes; false = hold scores until generation drains
    quantization: Literal["", "fp8"] = ""  # sglang backend: "fp8" = FP8 weights for rollout (--quantization
    # fp8; a server refusing an online weight update at start is a start-up error); "" = none
    kv_cache_dtype: Literal["auto", "fp8_e5m2", "fp8_e4m3"] = "auto"  # sglang backend: "fp8_e5m2" / "fp8_e4m3"
    # = FP8 KV cache
    sglang_url: str = ""  # sglang backend: a running server (http://host:port); "" = each worker launches its own
    sglang_port: int = 30000  # sglang backend without a url: worker i's server listens on this port + i
    sglang_python: str = ""  # sglang backend without a url: the interpreter that launches the server (sglang's
    # own environment, e.g. <env>/bin/python; it pins its own torch); "" = this one. Checked at start
    sglang_idle_timeout_s: float = 120.0  # sglang backend: a streamed request silent this long while /health
    # fails = a lost server (no limit on a response's total time)
    sglang_start_timeout_s: float = 900.0  # sglang backend: a server (launched or given) must answer /health
    # within this long at start and after a relaunch, else the worker exits
    sglang_health_interval_s: float = 1.0  # sglang backend: /health is polled this often while a server starts
    weight_sync: Literal["disk", "relay", "distributed"] = "disk"  # how new weights reach the workers: disk =
    # the policy file on a shared filesystem; relay = over the transport in bounded chunks to a worker-local folder
    # (no shared filesystem); distributed = broadcast from learner rank 0 into each sglang server over a process
    # group (/update_weights_from_distributed; NCCL on GPUs, gloo on CPU)
    relay_chunk_bytes: int = 4 * 1024 * 1024  # weight_sync=relay: bytes per chunk (one frame each, below
    # transport.max_frame_bytes); a worker has at most 4 chunks in flight
    sglang_retry_s: float = 60.0  # sglang backend: requests answered HTTP 5xx (or broken while /health answers)
    # are sent again with backoff until the server has failed this long without answering anything
    sglang_pause_mode: Literal["abort", "retract"] = "abort"  # sglang backend, how requests in flight cross a
    # weight update: abort = /pause_generation mode abort returns their partial tokens and the worker sends them
    # again from those tokens (each segment keeps its version); retract = they stay inside sglang (re-queued, their
    # KV recomputed under the new weights after /continue_generation) and each token's version is read from the
    # response's meta_info.weight_versions. abort is the default: retract has only run against the stand-in
    # (tests/sglang_standin.py), never a real sglang server. retract needs rollout.return_routes=false (sglang's
    # recompute overwrites the routes of the tokens sampled before the update with the new weights' routes)

    def __post_init__(self) -> None:
        check_choices(self)
        _require(self.backend != "sglang" or self.kv_on_update == "recompute", "rollout.kv_on_update",
                 self.kv_on_update, "the sglang backend continues responses across a weight update by re-sending "
                 "them (per-token versions stay exact); pass rollout.kv_on_update=recompute")
        _require(0 < self.length_ema <= 1, "rollout.length_ema", self.length_ema, "it must be in (0, 1]")
        _require(self.postprocess_workers >= 0, "rollout.postprocess_workers", self.postprocess_workers,
                 "it must be >= 0 (0 = no pool)")
        _require(self.num_workers >= 0, "rollout.num_workers", self.num_workers,
                 "it must be >= 0 (0 = only stand-alone workers started with everyprompt-rollout-worker)")
        _require(self.num_workers >= 1 or self.backend != "sim", "rollout.num_workers", self.num_workers,
                 "the sim backend starts its own workers: pass rollout.num_workers >= 1")
        _require(self.group_size >= 2, "rollout.group_size", self.group_size,
                 "group-relative advantages need at least 2 samples; pass rollout.group_size=8")
        _require(self.temperature > 0, "rollout.temperature", self.temperature,
                 "RL sampling needs temperature > 0; pass rollout.temperature=1.0")
        _require(self.max_group_size >= self.group_size, "rollout.max_group_size", self.max_group_size,
                 f"it must be >= rollout.group_size={self.group_size}")
        _require(self.top_up >= 0 and self.extra_sample_frac >= 0, "rollout.top_up", self.top_up,
                 "rollout.top_up and rollout.extra_sample_frac must be >= 0")
        _require(self.chunk_tokens >= 0, "rollout.chunk_tokens", self.chunk_tokens, "it must be >= 0")
        _require(self.threads_per_worker >= 1, "rollout.threads_per_worker", self.threads_per_worker,
                 "it must be >= 1")
        _require(self.sglang_idle_timeout_s > 0, "rollout.sglang_idle_timeout_s", self.sglang_idle_timeout_s,
                 "it must be > 0 seconds (e.g. 120)")
        for key in ("sglang_start_timeout_s", "sglang_health_interval_s", "sglang_retry_s"):
            _require(getattr(self, key) > 0, f"rollout.{key}", getattr(self, key), "it must be > 0 seconds")
        _require(self.sglang_pause_mode != "retract" or not self.return_routes or self.backend != "sglang",
                 "rollout.sglang_pause_mode", self.sglang_pause_mode, "a retracted request's KV is recomputed under "
                 "the new weights, which overwrites the routes of its tokens sampled before the update: pass "
                 "rollout.return_routes=false (and learner.router_replay=R2 or off), or rollout.sglang_pause_mode=abort")


def _loss_sections(cls: type) -> type:
    """Give the (not yet dataclass) ``cls`` one nested section per registered loss, after its own fields:
    ``learner.<name>`` of type ``LOSSES[name].config`` (engine/algo/loss_registry.py), so a new loss needs no
    edit here."""
    for name, entry in LOSSES.items():
        cls.__annotations__[name] = entry.config
        setattr(cls, name, field(default_factory=entry.config))
    return cls


@dataclass
@_loss_sections
class LearnerConfig:
    """The learner. ``loss`` selects a registered loss (engine/algo/loss_registry.py); each loss's own options
    sit in its section ``learner.<loss>.*`` (e.g. learner.espo.alpha, learner.gspo.clip_eps_low), added after
    these fields by ``_loss_sections``."""

    num_ranks: int = 1  # data-parallel ranks launched with torchrun
    zero_stage: int = 1  # DeepSpeed ZeRO stage (1 or 2)
    loss: Literal[LOSS_NAMES] = "espo"  # espo | gspo | grpo | cispo | dr_grpo; options in learner.<loss>.*
    aggregation: Literal[AGGREGATION_CHOICES] = "auto"  # auto = the loss's own (espo seq_mean_group_mean, gspo
    # seq_mean_token_mean, dr_grpo seq_mean_token_sum_norm, else token_mean); engine/algo/loss_registry.py
    lr: float = 3e-4
    weight_decay: float = 0.0
    entropy_chunk_tokens: int = 1024  # old-policy pass: tokens per chunk of full-vocabulary entropy
    router_replay: Literal[REPLAY_MODES] = "R3"  # R3: rollout routes; R2: the learner's own old-pass routes; off
    # (spec B.4; engine/modeling/replay_mode.py)
    num_minibatches: int = 1  # optimizer steps per TrainBatch (PPO mini-batches); the version counts batches
    rl_zvp_alpha: float = 0.0  # RL-ZVP (actor stage): zero-variance groups get entropy-shaped token advantages
    # of this scale (0 = off: such groups get zero advantage); spec B.2.3
    adv_std: Literal["population", "unbiased"] = "population"  # the group std advantages are divided by:
    # population (/ n; spec A.8 does not say which) or unbiased (/ n - 1, as verl and TRL); docs/concepts/losses.md
    decoupled: bool = False  # decoupled PPO: ratio vs the proximal policy (this learner before the batch's
    # updates), times a truncated importance weight behaviour -> proximal (min(w, decoupled_is_cap))
    decoupled_is_cap: float = 2.0
    expert_parallel: int = 1  # MoE experts sharded over this many ranks (DeepSpeed AutoEP); divides num_ranks
    nnodes: str = "1"  # "MIN:MAX" = elastic: torchrun agents (this machine's + ones started on other nodes) join a
    # c10d rendezvous the coordinator hosts; num_ranks is then ranks per node
    rdzv_port: int = 0  # elastic: the rendezvous store's port on transport.host (0 = a free port, see join.json)
    max_restarts: int = 3  # elastic: group restarts torchrun itself makes (a rank died, a node joined or left)
    gap_probe_seqs: int = 64  # sequences per probed step whose log-probs are recomputed under the weights that
    # sampled them (a frozen copy of the previous version is kept) to log the rollout-vs-trainer gap; 0 = off, no copy
    gap_probe_every: int = 10  # probe the gap (logprob_gap_*, routing_mismatch_frac) on versions 0, k, 2k, ...;
    # other steps omit those keys. Cheap by default: 64 sequences every 10 steps; 1 = every step (the old cost)
    grad_clip: float = 1.0
    threads_per_rank: int = 0  # torch threads per learner rank; 0 = auto: the cores of this machine that the hf
    # rollout workers do not take (num_workers x rollout.threads_per_worker), split over num_ranks, at least 1
    master_port: int = 0  # 0 = pick a free port
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # torch.distributed backend of the learner ranks: auto =
    # nccl where CUDA is present (GPU ranks; host-side fan-out still over a gloo group), else gloo (CPU ranks)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16 = DeepSpeed bf16 mixed precision (fp32 master
    # weights and Adam moments); auto = bf16 when model.dtype=bfloat16, else fp32. Log-probs/entropy are fp32

    def __post_init__(self) -> None:
        check_choices(self)
        if self.dist_backend == "nccl":
            import torch  # only here: the schema stays torch-free unless NCCL is asked for

            _require(torch.cuda.is_available(), "learner.dist_backend", self.dist_backend,
                     "NCCL needs CUDA and this machine has none; pass learner.dist_backend=gloo (or auto)")
        _require(self.zero_stage in (0, 1, 2), "learner.zero_stage", self.zero_stage,
                 "use learner.zero_stage=1 or 2 (0 disables ZeRO)")
        resolve_aggregation(self.loss, self.aggregation)  # e.g. seq_mean_group_mean needs espo's entropy groups
        _require(self.num_ranks >= 1, "learner.num_ranks", self.num_ranks, "it must be >= 1")
        _require(self.lr > 0, "learner.lr", self.lr, "it must be positive")
        _require(self.num_minibatches >= 1, "learner.num_minibatches", self.num_minibatches, "it must be >= 1")
        _require(self.rl_zvp_alpha >= 0, "learner.rl_zvp_alpha", self.rl_zvp_alpha, "it must be >= 0 (0 = off)")
        _require(self.decoupled_is_cap > 0, "learner.decoupled_is_cap", self.decoupled_is_cap, "it must be > 0")
        _require(self.gap_probe_seqs >= 0, "learner.gap_probe_seqs", self.gap_probe_seqs, "it must be >= 0")
        _require(self.gap_probe_every >= 1, "learner.gap_probe_every", self.gap_probe_every,
                 "it must be >= 1 (turn the probe off with learner.gap_probe_seqs=0)")
        _require(self.threads_per_rank >= 0, "learner.threads_per_rank", self.threads_per_rank,
                 "it must be >= 0 (0 = auto)")
        _require(self.expert_parallel >= 1 and self.num_ranks % self.expert_parallel == 0, "learner.expert_parallel",
                 self.expert_parallel, f"it must divide learner.num_ranks={self.num_ranks} (1 = no expert parallelism)")
        _require(re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", self.nnodes) is not None
                 and int(self.nnodes.split(":")[0]) <= int(self.nnodes.split(":")[-1]), "learner.nnodes", self.nnodes,
                 'pass a node count ("1") or an elastic range MIN:MAX such as "1:2"')
        _require(self.max_restarts >= 0, "learner.max_restarts", self.max_restarts, "it must be >= 0")
        _require(self.expert_parallel == 1 or self.zero_stage in (1, 2), "learner.zero_stage", self.zero_stage,
                 "expert parallelism runs on ZeRO stage 1 or 2; pass learner.zero_stage=1")


@dataclass
class TrainConfig:
    num_steps: int = 200
    groups_per_step: int = 64  # prompts (groups) per optimizer step
    max_staleness: int = 1  # a token sampled by version v trains with weights of version <= v + max_staleness
    stale_policy: Literal["regenerate", "drop"] = "regenerate"  # a sample over the bound anyway: regenerate it
    # (same prompt, no prompt is lost) or drop its group (counted in discarded_samples)
    checkpoint_every: int = 50  # save the whole async state every this many steps (0 = never); resume=true
    interrupt_checkpoint_s: float = 60.0  # on Ctrl-C or SIGTERM, checkpoint the last completed step within this
    # many seconds before stopping (0 = stop at once, saving nothing)
    buffer_order: Literal["fifo", "variance"] = "fifo"  # variance: groups at the staleness bound first, then
    # highest reward spread
    buffer_staleness_weight: float = 0.1  # variance order: priority = reward std - this x versions behind
    sample_budget: int = 0  # stop after the step at which this many rollout samples were generated (0 = none)
    eval_every: int = 50  # held-out greedy eval every this many steps (0 = only before and after RL)

    def __post_init__(self) -> None:
        check_choices(self)
        _require(self.num_steps >= 0, "train.num_steps", self.num_steps, "it must be >= 0")
        _require(self.groups_per_step >= 1, "train.groups_per_step", self.groups_per_step, "it must be >= 1")
        _require(self.max_staleness >= 0, "train.max_staleness", self.max_staleness, "it must be >= 0")
        _require(self.sample_budget >= 0, "train.sample_budget", self.sample_budget, "it must be >= 0 (0 = none)")
        _require(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, "it must be >= 0")
        _require(self.interrupt_checkpoint_s >= 0, "train.interrupt_checkpoint_s", self.interrupt_checkpoint_s,
                 "it must be >= 0 (0 = save nothing)")


@dataclass
class TransportConfig:
    host: str = "127.0.0.1"  # the coordinator's bind address; anything but loopback needs curve_keys_dir
    port: int = 0  # the coordinator's port (0 = a free one; fix it so stand-alone workers can find it again)
    heartbeat_s: float = 1.0
    peer_timeout_s: float = 60.0  # a peer silent this long is dead
    start_timeout_s: float = 180.0  # time allowed for every actor to say Hello
    max_actor_restarts: int = 3  # rollout/reward worker restarts allowed per run before it fails
    max_learner_restarts: int = 3  # learner failures survived per run (each resumes from the newest checkpoint)
    max_frame_bytes: int = 256 * 1024 * 1024
    hwm: int = 10000  # frames queued per socket direction and per inbox before senders are pushed back
    curve_keys_dir: Optional[str] = None  # CURVE authentication + encryption: a folder from `python -m
    # transport.keys DIR` (server.key_secret on the coordinator, server.key + <curve_client>.key_secret on actors)
    curve_client: str = "client"  # which client key pair in curve_keys_dir this machine's actors use
    insecure: bool = False  # allow a non-loopback host without CURVE (logs a warning)

    def __post_init__(self) -> None:
        loopback = self.host == "localhost" or _is_loopback_ip(self.host)
        _require(loopback or self.curve_keys_dir is not None or self.insecure, "transport.host", self.host,
                 "a non-loopback bind needs CURVE authentication: run `python -m transport.keys DIR` and pass "
                 "transport.curve_keys_dir=DIR (or transport.insecure=true to accept unauthenticated peers)")
        for key in ("max_actor_restarts", "max_learner_restarts"):
            _require(getattr(self, key) >= 0, f"transport.{key}", getattr(self, key), "it must be >= 0")
        _require(self.hwm >= 1, "transport.hwm", self.hwm, "it must be >= 1 (frames)")
        _require(self.max_frame_bytes >= 1024, "transport.max_frame_bytes", self.max_frame_bytes,
                 "it must be >= 1024")
        _require(self.peer_timeout_s > self.heartbeat_s > 0, "transport.peer_timeout_s", self.peer_timeout_s,
                 f"it must be above transport.heartbeat_s={self.heartbeat_s} (> 0), or every peer looks dead")


def _is_loopback_host(host: str | None) -> bool:
    return host == "localhost" or _is_loopback_ip(host or "")


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class SimConfig:
    """The simulated rollout backend (rollout.backend=sim, engine/backends/sim.py) and its workload.

    Costs are in simulated seconds and were calibrated once from the transformers backend (``everyprompt-bench
    pipeline --calibrate``); ``time_scale`` wall seconds pass per simulated second. Response lengths are
    long-tailed per prompt and stable across epochs (engine/backends/simulate.py)."""

    time_scale: float = 1.0  # wall seconds per simulated second
    workers_per_process: int = 32  # simulated rollout workers hosted by one process (each its own actor + socket)
    decode_base_s: float = 2.9e-3  # one decode step of a running batch of b sequences costs base + b x per_seq
    decode_per_seq_s: float = 4.3e-5  # (these three: fitted to the transformers backend, 1 thread)
    prefill_per_token_s: float = 3.2e-5  # prompt (once per group: prefix reuse) and KV recompute
    load_s: float = 0.01  # applying new weights
    detok_per_token_s: float = 5.0e-6  # rollout.postprocess_workers: detokenizing and post-processing a response
    # (an assumption: a BPE detokenizer plus response clean-up on one core; not calibrated)
    train_base_s: float = 0.05  # actors/sim_learner.py: one optimizer step costs base + tokens x per_token
    train_per_token_s: float = 1.0e-6
    num_prompts: int = 4096  # the prompt pool (epochs repeat it)
    num_sources: int = 4  # data sources with different typical lengths
    prompt_len: int = 32
    mean_len: float = 128.0  # mean response length before clipping at task.max_answer_tokens
    prompt_sigma: float = 1.0  # log-normal spread of per-prompt typical lengths (the long tail)
    sample_sigma: float = 0.3  # log-normal spread of one prompt's samples around its typical length
    seed: int = 0
    learner: bool = False  # actors/sim_learner.py instead of the DeepSpeed learner (benchmarks)
    prefill_on_add: Literal["new", "all"] = "new"  # rows joining a running batch prefill: "new" = only
    # themselves (prefix-cached engines: sglang); "all" = every unfinished row again, padded to the longest
    # (engine/modeling/decode.py's rebuild)
    weights_file: str = ""  # sim learner: a real safetensors file it publishes as every new version (so real
    # rollout backends, e.g. the bench's --backend hf sanity run, have weights to load); "" = no file is written

    def __post_init__(self) -> None:
        check_choices(self)
        _require(self.time_scale > 0, "sim.time_scale", self.time_scale, "it must be positive")
        _require(self.workers_per_process >= 1, "sim.workers_per_process", self.workers_per_process,
                 "it must be >= 1")
        for name in ("decode_base_s", "decode_per_seq_s", "prefill_per_token_s", "load_s", "detok_per_token_s",
                     "train_base_s", "train_per_token_s", "prompt_sigma", "sample_sigma"):
            _require(getattr(self, name) >= 0, f"sim.{name}", getattr(self, name), "it must be >= 0")
        _require(self.num_prompts >= 1 and self.num_sources >= 1, "sim.num_prompts", self.num_prompts,
                 "sim.num_prompts and sim.num_sources must be >= 1")
        _require(self.mean_len >= 1 and self.prompt_len >= 1, "sim.mean_len", self.mean_len,
                 "sim.mean_len and sim.prompt_len must be >= 1")


@dataclass
class RunConfig:
    name: str = "default"
    out_dir: str = "runs"
    seed: int = 0
    log_json: bool = False
    progress: bool = True
    resume: bool = False  # continue runs/<name> from its latest checkpoint (train.checkpoint_every)
    overwrite: bool = False  # start afresh in a runs/<name> that holds checkpoints (they are deleted; logs are kept)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        self.sft.cache_dir = self.sft.cache_dir or f"{self.out_dir or '.'}/.sft_cache"  # shared by later runs
        if self.task.name in REASONING_VERIFIERS:  # exact match would judge the whole worked solution
            for section, key in ((self.reward, "plugin"), (self.reward.judge, "verifier")):
                if getattr(section, key) == "exact":
                    setattr(section, key, REASONING_VERIFIERS[self.task.name])
        n = self.learner.num_ranks
        g_max = max(self.rollout.group_size, self.rollout.max_group_size if self.rollout.adaptive_group_size else 0)
        _require(self.reward.plugin != "judge" or self.reward.judge.group_tie_frac < 2 / g_max,
                 "reward.judge.group_tie_frac", self.reward.judge.group_tie_frac,
                 f"a group of {g_max} with one differing response has only 2/{g_max} non-Tie pairs and would be "
                 f"called all-tie; pass reward.judge.group_tie_frac={1 / g_max:.3g} or less (0 = off)")
        _require(self.train.groups_per_step * self.rollout.group_size >= n, "train.groups_per_step",
                 self.train.groups_per_step, f"each of learner.num_ranks={n} ranks needs at least one sequence")
        _require(self.model.num_experts % self.learner.expert_parallel == 0, "learner.expert_parallel",
                 self.learner.expert_parallel, f"it must divide model.num_experts={self.model.num_experts}")
        _require(self.learner.router_replay != "R3" or self.rollout.return_routes, "learner.router_replay",
                 self.learner.router_replay, "R3 replays rollout routes: keep rollout.return_routes=true, "
                 "or pass learner.router_replay=R2 or off")
        _require(self.train.groups_per_step * self.rollout.group_size >= n * self.learner.num_minibatches,
                 "learner.num_minibatches", self.learner.num_minibatches,
                 "every mini-batch needs at least one sequence per learner rank")
        _require(self.model.init_from is not None or self.sft.enabled is not False or self.task.name == "jsonl",
                 "sft.enabled", self.sft.enabled,
                 "a random-init model cannot solve the task; keep sft.enabled=true or set model.init_from")
        _require(not (self.resume and self.overwrite), "overwrite", self.overwrite,
                 "resume=true continues the run and overwrite=true replaces it: pass only one")
        _require(self.rollout.weight_sync != "relay" or 4096 <= self.rollout.relay_chunk_bytes
                 <= self.transport.max_frame_bytes - 4096, "rollout.relay_chunk_bytes", self.rollout.relay_chunk_bytes,
                 f"a chunk travels in one frame: pass 4096 <= rollout.relay_chunk_bytes <= "
                 f"transport.max_frame_bytes - 4096 = {self.transport.max_frame_bytes - 4096}")
        _require(self.rollout.weight_sync != "relay" or not self.sim.learner or bool(self.sim.weights_file),
                 "rollout.weight_sync", self.rollout.weight_sync, "the simulated learner writes no weight file "
                 "to relay: set sim.weights_file=<a safetensors file> or pass rollout.weight_sync=disk")
        _require(self.rollout.weight_sync != "distributed" or self.rollout.backend == "sglang", "rollout.weight_sync",
                 self.rollout.weight_sync, f"a broadcast into the server needs rollout.backend=sglang (not "
                 f"{self.rollout.backend!r}); pass rollout.weight_sync=disk")
        _require(self.rollout.weight_sync != "distributed" or not self.sim.learner, "rollout.weight_sync",
                 self.rollout.weight_sync, "the simulated learner has no weights to broadcast: pass "
                 "rollout.weight_sync=disk or sim.learner=false")
        _require(self.rollout.weight_sync != "distributed" or self.learner.nnodes == "1", "rollout.weight_sync",
                 self.rollout.weight_sync, f"learner rank 0 listens for the servers on transport.host, and with "
                 f"learner.nnodes={self.learner.nnodes} it may run on another machine: pass rollout.weight_sync=disk "
                 f"or relay, or learner.nnodes=1")
        server = urlsplit(self.rollout.sglang_url).hostname if self.rollout.sglang_url else "127.0.0.1"
        _require(self.rollout.weight_sync != "distributed" or not _is_loopback_host(self.transport.host)
                 or _is_loopback_host(server), "transport.host", self.transport.host,
                 f"rollout.weight_sync=distributed: the server at {self.rollout.sglang_url} joins learner rank 0's "
                 f"group at transport.host, which it cannot reach on loopback; pass transport.host=<this machine's "
                 f"address as the server sees it> (with transport.curve_keys_dir)")
