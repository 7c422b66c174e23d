"""The ``--task`` presets of the training benches (``everyprompt-bench losses`` and ``zve``).

A preset is only the overrides a task needs to give RL a non-trivial start: the task and its difficulty levels,
a cold-start SFT that teaches the worked-solution format to a useful dev accuracy (``sft.target_accuracy``,
capped by ``sft.max_steps``), and a held-out set small enough to be evaluated often on a CPU. It is passed
before the bench's own overrides and the user's ``key=value`` arguments, which therefore win. It records no
result: the figures are in docs/benchmarks.md.

How the SFT settings were chosen (docs/benchmarks.md, "Long tasks"): on the built-in model (hidden 128, 2
layers, SFT batch 64), scratchpad at levels 1-3 went from dev accuracy 0.06 (SFT step 100) to 0.23 (200), 0.50
(250) and 0.70 (500); level 1 (about half of the prompts, answered directly) is learnt first.
``sft.max_time_s`` is raised so that the step cap, not the clock of a loaded machine, ends an SFT that misses
its target: the cache key has no time in it, so every run of a bench (every loss, seed, stage, denominator)
starts from the one checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskPreset:
    overrides: tuple[str, ...]  # task.*, sft.*, model.* for every run (and the zve bench's offline filter)
    note: str  # one line for --help and the docs


_SFT = ("sft.max_time_s=1800",)  # the step cap decides, never the clock (max_time_s is not in the cache key)
_HELD_OUT = ("task.num_eval=200", "task.num_dev=100")  # greedy eval of long answers costs: 200, not 500


def _reasoning(name: str, max_level: int, target: float, max_steps: int, note: str) -> TaskPreset:
    return TaskPreset((f"task.name={name}", "task.min_level=1", f"task.max_level={max_level}", *_HELD_OUT,
                       f"sft.target_accuracy={target}", f"sft.max_steps={max_steps}", "sft.batch_size=64", *_SFT), note)


PRESETS: dict[str, TaskPreset] = {
    "arithmetic": TaskPreset((), "the built-in task with the run's own defaults (the figures of the earlier rounds)"),
    "scratchpad": _reasoning("scratchpad", 3, 0.3, 1500, "multi-operand addition with carries, levels 1-3"),
    "countdown": _reasoning("countdown", 3, 0.3, 1500, "reach the target by depth-first search, levels 1-3"),
    "sorting": _reasoning("sorting", 3, 0.3, 1500, "selection sort pass by pass, levels 1-3"),
}
TASKS = tuple(PRESETS)


def task_overrides(task: str) -> list[str]:
    """The preset's overrides for ``task`` (KeyError names the choices)."""
    if task not in PRESETS:
        raise KeyError(f"--task {task!r} is unknown; choose from {', '.join(TASKS)}")
    return list(PRESETS[task].overrides)


def task_help() -> str:
    return "; ".join(f"{name}: {p.note}" for name, p in PRESETS.items())
