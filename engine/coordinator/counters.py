"""What the producer half of the run counts (engine/coordinator/loop.py): typed fields, one per metrics.jsonl key
(``samples_by_worker``, a dict, is also in the summary).

The names are the keys of metrics.jsonl and of the checkpoint's ``counts`` entry; ``generated_tokens`` and
``prompts_taken`` are kept in the checkpoint but not logged per step (loop.py logs a rate and the frontier instead).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import structlog

log = structlog.get_logger()

_NOT_LOGGED = ("generated_tokens", "prompts_taken")


@dataclass
class RolloutCounters:
    generated_tokens: int = 0
    generated_samples: int = 0  # finished RL responses (train.sample_budget); eval responses are not counted
    prompts_taken: int = 0  # the prompt-stream frontier (resume continues from here)
    admitted_groups: int = 0  # minus the groups dropped as stale (admission replaces them)
    samples_over_bound: int = 0
    regenerated_samples: int = 0
    discarded_samples: int = 0
    continued_samples: int = 0  # resumed on another worker (or after a restore) from the tokens received
    continued_prefix_tokens: int = 0  # tokens those of a lost worker kept (generated once, not again)
    requeued_scores: int = 0
    cancelled_samples: int = 0
    base_samples: int = 0  # rollout.group_size per admitted group: the extra-sample budget is a fraction of it
    adaptive_extra_samples: int = 0
    top_up_samples: int = 0
    samples_by_worker: dict[str, int] = field(default_factory=dict)  # generated_samples by worker name

    def finished_sample(self, peer: str) -> None:
        """An RL response finished on ``peer`` ("{role}-{worker_id}-{pid}"): counted under its worker's name
        ("rollout-0"), so a restarted worker (a new pid) continues its count."""
        self.generated_samples += 1
        name = peer.rsplit("-", 1)[0]
        self.samples_by_worker[name] = self.samples_by_worker.get(name, 0) + 1

    def metrics(self) -> dict[str, int | dict[str, int]]:
        """The per-step metrics.jsonl entries."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_LOGGED}

    def to_dict(self) -> dict[str, int | dict[str, int]]:
        """Everything (the checkpoint's ``counts``)."""
        return asdict(self)

    def restore(self, counts: dict[str, int | dict[str, int]]) -> None:
        """Take the counters of a checkpoint (a key this version does not count is logged and skipped)."""
        known = {f.name for f in fields(self)}
        for key, value in counts.items():
            if key in known:
                by_key = isinstance(value, dict)  # samples_by_worker
                setattr(self, key, {str(k): int(v) for k, v in value.items()} if by_key else int(value))
            else:
                log.warning("counters.unknown_key", key=key, detail="not counted by this version; skipped")
