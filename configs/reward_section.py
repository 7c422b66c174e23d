"""The ``reward`` section of the run config (configs/schema.py imports and re-exports it): reward plugins, the code
sandbox's limits and the tie-aware generative judge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from configs.choices import check_choices, require as _require


@dataclass
class SandboxConfig:
    """Limits of the code sandbox (engine/rewards/sandbox.py), per run of a response's code and its unit tests."""

    cpu_s: float = 2.0  # CPU seconds per process
    wall_s: float = 5.0  # wall-clock seconds for the whole run
    memory_mb: int = 512  # address space per process
    max_processes: int = 16  # processes of the sandbox uid (fork bombs stop here)
    max_file_mb: int = 8  # largest file it may write, stdout/stderr included
    network: Literal["auto", "audit"] = "auto"  # auto: a network namespace when permitted, else an audit hook;
    # audit: the hook only

    def __post_init__(self) -> None:
        check_choices(self, "reward.sandbox.")
        for name in ("cpu_s", "wall_s", "memory_mb", "max_processes", "max_file_mb"):
            _require(getattr(self, name) > 0, f"reward.sandbox.{name}", getattr(self, name), "it must be positive")


@dataclass
class JudgeConfig:
    """The tie-aware generative judge (engine/rewards/judge.py, spec B.5), used when reward.plugin=judge."""

    backend: Literal["hf", "sglang"] = "hf"  # hf: transformers on this machine (the rollout decode loop);
    # sglang: a /generate server
    model: Optional[str] = None  # hf: an HF save_pretrained folder; None = the run's initial (SFT) policy
    url: str = "http://127.0.0.1:30000"  # sglang: the server serving the judge model
    verifier: str = "exact"  # per-response plugin for the raw correctness (accuracy, zero-variance decisions)
    construction: Literal["round_robin", "anchor"] = "round_robin"  # round_robin: pairs within the group
    anchor: Literal["reference", "first"] = "reference"  # anchor construction: compare with the reference
    # answer, or the group's first response
    max_calls_per_group: int = 32  # judge generations per group (0 = every pair); a random subset beyond it
    both_orders: bool = False  # judge (A, B) and (B, A) and average (cancels position bias, twice the calls)
    template: Optional[str] = None  # {question} {response_a} {response_b} {reference}; None = engine/rewards/judge.py's
    max_response_chars: int = 2000
    max_new_tokens: int = 8  # a chain-of-thought judge needs far more (e.g. 2048)
    temperature: float = 0.0
    timeout_s: float = 300.0  # sglang: per group request
    order_rule: Literal["mean", "agree"] = "mean"  # both_orders: mean (average the two verdicts) | agree (Tie
    # unless both orders agree)
    tie_margin: float = 1.0  # round_robin: |net verdicts| <= this = tied (advantage 0); 0 = off
    group_tie_frac: float = 0.1  # round_robin: <= this fraction of non-Tie verdicts = all-tie group; 0 = off

    def __post_init__(self) -> None:
        check_choices(self, "reward.judge.")
        _require(self.order_rule != "agree" or self.both_orders, "reward.judge.order_rule", self.order_rule,
                 "agree compares the two orders of a pair: pass reward.judge.both_orders=true")
        _require(self.tie_margin >= 0, "reward.judge.tie_margin", self.tie_margin,
                 "it is a number of net verdicts and must be >= 0 (0 = no dead zone, 1 = one judge error)")
        _require(0 <= self.group_tie_frac < 1, "reward.judge.group_tie_frac", self.group_tie_frac,
                 "it must be in [0, 1) (0 = off); keep it a few times the judge's error rate on ties and below "
                 "2/rollout.group_size, e.g. 0.1")
        _require(self.verifier != "judge", "reward.judge.verifier", self.verifier,
                 "the per-response verifier must be a plugin such as exact or math")
        _require(self.max_calls_per_group >= 0, "reward.judge.max_calls_per_group", self.max_calls_per_group,
                 "it must be >= 0 (0 = every pair)")
        _require(not self.both_orders or self.max_calls_per_group != 1, "reward.judge.max_calls_per_group",
                 self.max_calls_per_group, "both_orders needs 2 calls per pair; pass at least 2")
        _require(self.max_new_tokens >= 1, "reward.judge.max_new_tokens", self.max_new_tokens, "it must be >= 1")


@dataclass
class RewardConfig:
    """Reward plugins (engine/rewards/plugins.py) and shaping (engine/algo/shaping.py). Zero-variance decisions always use the
    raw correctness."""

    num_workers: int = 1
    plugin: str = "exact"  # a built-in verifier (engine/rewards/verifiers.py: exact, math, code, instruction,
    # choice), judge (engine/rewards/judge.py), or your own package.module:function; checked by configs/load.py
    plugin_processes: int = 2  # processes per reward worker running the plugin (a hung one is replaced)
    plugin_timeout_s: float = 10.0  # per response; past it the response is a recorded failure (valid=false)
    graded: bool = False  # partial credit (fraction of the answer right) instead of 0/1
    overlong_coef: float = 0.0  # weight of DAPO's soft overlong penalty (0 .. -1)
    overlong_cache: int = 2  # the penalty ramps over the last this-many tokens before task.max_answer_tokens
    repetition_coef: float = 0.0  # weight of the n-gram repetition penalty (0 .. -1)
    repetition_ngram: int = 3
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "reward.num_workers", self.num_workers, "it must be >= 1")
        _require(self.overlong_coef >= 0 and self.repetition_coef >= 0, "reward.overlong_coef",
                 self.overlong_coef, "penalty weights must be >= 0 (the penalties themselves are <= 0)")
        _require(self.repetition_ngram >= 1, "reward.repetition_ngram", self.repetition_ngram, "it must be >= 1")
        _require(self.plugin_processes >= 1, "reward.plugin_processes", self.plugin_processes, "it must be >= 1")
        _require(self.plugin_timeout_s > self.sandbox.wall_s or self.plugin != "code", "reward.plugin_timeout_s",
                 self.plugin_timeout_s, f"it must exceed reward.sandbox.wall_s={self.sandbox.wall_s}; pass "
                 f"reward.plugin_timeout_s={self.sandbox.wall_s * 2:g}")
        _require(self.plugin != "judge" or not (self.overlong_coef or self.repetition_coef or self.graded),
                 "reward.plugin", self.plugin, "judge rewards are margins whose zero means a tie; shaping would move "
                 "it: pass reward.graded=false reward.overlong_coef=0 reward.repetition_coef=0")
