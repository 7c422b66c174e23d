"""Built-in reasoning tasks with worked solutions: ``scratchpad``, ``countdown``, ``sorting`` (docs/concepts/tasks.md).

Each is generated procedurally (no download) at difficulty levels 1..6 (``task.min_level``/``task.max_level``),
drawn with weights ``LEVEL_DECAY ** (level - min_level)``, so most prompts are easy and a few are long: a level-1
answer is a handful of characters, a level-6 worked solution a few hundred. An Example's answer is the whole worked
solution ending in its final-answer line (``#...``); the cold-start SFT trains on it, and the verifier
(engine/data/reasoning_check.py, as a reward plugin in engine/rewards/reasoning_verifiers.py) checks the final
answer only. Every character is newline or printable ASCII (the built-in character tokenizer's vocabulary).
"""

from __future__ import annotations

import random

from engine.data.datasets import Example
from engine.data.reasoning_check import FINAL, countdown_header

LEVELS = 6
LEVEL_DECAY = 0.6


def draw_level(rng: random.Random, lo: int, hi: int) -> int:
    return rng.choices(range(lo, hi + 1), weights=[LEVEL_DECAY ** (lv - lo) for lv in range(lo, hi + 1)])[0]


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


# ---- scratchpad: multi-operand addition, each addition written out column by column with its carries ----------

# level -> (fewest operands, most operands, fewest and most digits per operand); level 1 is answered directly
_SCRATCHPAD = {1: (2, 3, 1, 1), 2: (2, 2, 1, 2), 3: (3, 3, 1, 2), 4: (3, 4, 2, 3), 5: (4, 5, 2, 4), 6: (6, 7, 3, 4)}


def add_steps(a: int, b: int) -> str:
    """``485+37: 5+7+0=12 8+3+1=12 4+0+1=05 =522``: per column (least significant first) the two digits and the
    carry in, then carry out and digit; then the sum."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, cols = 0, []
    for k in range(max(len(da), len(db))):
        x, y = int(da[k]) if k < len(da) else 0, int(db[k]) if k < len(db) else 0
        s = x + y + carry
        cols.append(f"{x}+{y}+{carry}={s // 10}{s % 10}")
        carry = s // 10
    return f"{a}+{b}: {' '.join(cols)} ={a + b}"


def scratchpad_example(rng: random.Random, level: int) -> Example:
    lo, hi, fewest, most = _SCRATCHPAD[level]
    operands = [_number(rng, rng.randint(fewest, most)) for _ in range(rng.randint(lo, hi))]
    lines, acc = [], operands[0]
    if level > 1:
        for b in operands[1:]:
            lines.append(add_steps(acc, b))
            acc += b
    lines.append(f"{FINAL}{sum(operands)}")
    return Example(prompt="+".join(map(str, operands)) + "=", answer="\n".join(lines), source=f"scratchpad-L{level}",
                   difficulty=level)


# ---- sorting: selection sort, the list written after every pass -------------------------------------------------

# level -> (shortest list, longest list, most digits per value); level 1 is answered directly
_SORTING = {1: (2, 3, 1), 2: (3, 3, 1), 3: (4, 4, 2), 4: (5, 6, 2), 5: (7, 8, 2), 6: (9, 11, 2)}


def selection_passes(values: list[int]) -> list[str]:
    """One line per pass: the list after swapping the smallest of the unsorted part to its front,
    ``|`` after the sorted part (``1 3|9 5``)."""
    xs, lines = list(values), []
    for i in range(len(xs) - 1):
        j = min(range(i, len(xs)), key=lambda k: (xs[k], k))
        xs[i], xs[j] = xs[j], xs[i]
        lines.append(" ".join(map(str, xs[: i + 1])) + "|" + " ".join(map(str, xs[i + 1:])))
    return lines


def sorting_example(rng: random.Random, level: int) -> Example:
    lo, hi, digits = _SORTING[level]
    values = [_number(rng, rng.randint(1, digits)) for _ in range(rng.randint(lo, hi))]
    lines = selection_passes(values) if level > 1 else []
    lines.append(FINAL + " ".join(map(str, sorted(values))))
    return Example(prompt="sort " + " ".join(map(str, values)) + "=", answer="\n".join(lines),
                   source=f"sorting-L{level}", difficulty=level)


# ---- countdown: reach the target with the given numbers, a depth-first search written out ----------------------

# level -> (how many numbers, largest number); level 1 is answered directly
_COUNTDOWN = {1: (2, 9), 2: (2, 20), 3: (3, 20), 4: (4, 20), 5: (4, 50), 6: (5, 30)}
COUNTDOWN_MAX_LINES = 24  # a problem whose search writes more lines is drawn again
_MAX_TARGET = 999


def _reductions(state: list[tuple[int, str]], target: int) -> list[tuple[int, str, list[tuple[int, str]], str]]:
    """Every (value, expression, next state, line text) one step from ``state``, closest to the target first:
    ``a+b``, ``a-b``, ``a*b``, ``a/b`` on each pair, the larger number first; no 0, no ``*1`` or ``/1``."""
    out = []
    for i in range(len(state)):
        for j in range(i + 1, len(state)):
            (a, ea), (b, eb) = sorted((state[i], state[j]), key=lambda t: -t[0])
            rest = [s for k, s in enumerate(state) if k not in (i, j)]
            pa, pb = (f"({e})" if not e.isdigit() else e for e in (ea, eb))
            cands = [(a + b, "+"), (a - b, "-")] + ([(a * b, "*"), (a // b, "/")] if b > 1 else [])
            for value, op in cands:
                if value > 0 and (op != "/" or a % b == 0):
                    out.append((value, f"{pa}{op}{pb}", rest + [(value, f"{pa}{op}{pb}")], f"{a}{op}{b}={value}"))
    return sorted(out, key=lambda r: abs(r[0] - target))  # stable: ties keep the pair order


def countdown_search(numbers: list[int], target: int,
                     max_lines: int = COUNTDOWN_MAX_LINES) -> tuple[list[str], str] | None:
    """The search's lines (indented by depth; ``|`` then the numbers left) and the expression that reaches the
    target, or None when it is not found within ``max_lines`` lines."""
    lines: list[str] = []

    def dfs(state: list[tuple[int, str]], depth: int) -> str | None:
        for value, expr, nxt, text in _reductions(state, target):
            if len(lines) >= max_lines:
                return None
            left = " ".join(str(v) for v, _ in nxt) if len(nxt) > 1 and value != target else ""
            lines.append(" " * depth + text + (f"|{left}" if left else ""))
            if value == target:
                return expr
            if len(nxt) > 1 and (found := dfs(nxt, depth + 1)) is not None:
                return found
        return None

    found = dfs([(n, str(n)) for n in numbers], 0)
    return None if found is None else (lines, found)


def _target(rng: random.Random, numbers: list[int]) -> int | None:
    """The value of a random expression over all of ``numbers`` (exact division only), or None."""
    vals = list(numbers)
    rng.shuffle(vals)
    while len(vals) > 1:
        a, b = sorted((vals.pop(), vals.pop()), reverse=True)
        ops = [a + b, a - b, a * b] + ([a // b] if a % b == 0 else [])
        vals.append(rng.choice(ops))
        if vals[-1] <= 0:
            return None
    return vals[0] if vals[0] <= _MAX_TARGET and vals[0] not in numbers else None


def countdown_example(rng: random.Random, level: int) -> Example:
    count, largest = _COUNTDOWN[level]
    while True:
        numbers = [rng.randint(1, largest) for _ in range(count)]
        target = _target(rng, numbers)
        solved = None if target is None else countdown_search(numbers, target)
        if solved is not None:
            break
    lines, expr = solved
    body = [] if level == 1 else lines
    answer = "\n".join([countdown_header(numbers, target), *body, FINAL + expr])
    return Example(prompt=f"{target} from {' '.join(map(str, numbers))}=", answer=answer,
                   source=f"countdown-L{level}", difficulty=level)


GENERATORS = {"scratchpad": scratchpad_example, "countdown": countdown_example, "sorting": sorting_example}
