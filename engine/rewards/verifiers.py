"""Verifiers: the built-in reward plugins (engine/rewards/plugins.py). Graded where the spec says so (ALGORITHMS.md
B.2.2).

Every verifier is ``fn(response, reference, options) -> PluginScore`` and may raise: the plugin pool turns an
exception into a recorded failure (``valid=False``), never a dead worker. ``@builtin("name")`` registers one as
``reward.plugin=name``: a new built-in verifier is its function here plus its test, nothing else.

- ``exact``: whitespace-normalised exact match (the built-in arithmetic task's verifier, the default).
- ``math``: the response's final answer against the reference with Hugging Face's ``math-verify`` (LaTeX,
  ``\\boxed{}``, fractions, percentages, sets and intervals, symbolic equality). Without that library (an
  ImportError, warned about once) it falls back to ``math_answer_sympy``: the final answer (``\\boxed{}``,
  "answer is ...", ``#### ...`` or the last number), equal as normalised strings, as numbers or symbolically (sympy,
  on a whitelisted character set).
- ``code``: the response's Python (its last fenced block, or all of it) run in the sandbox (engine/rewards/sandbox.py)
  with the reference's unit tests; the score is the fraction of tests passed.
- ``instruction``: the reference is a JSON list of constraints; the score is the fraction satisfied.
- ``choice``: multiple choice; the letter the response picks (``\\boxed{B}``, "the answer is (B)", "Answer: B", or
  a response that is only the letter) against the reference's letter.
"""

from __future__ import annotations

import json
import re
import threading
from fractions import Fraction
from typing import Callable, NamedTuple

import structlog

from engine.rewards.sandbox import run_python
from engine.data.tasks import normalise

log = structlog.get_logger()


class PluginScore(NamedTuple):
    score: float  # correctness in [0, 1], graded where the verifier is (fraction of tests / constraints)
    parts: dict = {}  # extra float parts recorded with the reward (e.g. tests_passed)
    valid: bool = True  # False = this response could not be judged (left out of Eq. 11's set)


Verifier = Callable[[str, str, dict], PluginScore]
VERIFIERS: dict[str, Verifier] = {}  # built-in name -> verifier, filled by @builtin (reward.plugin=<name>)


def builtin(name: str) -> Callable[[Verifier], Verifier]:
    """Register the decorated function as the built-in verifier ``reward.plugin=name``."""
    def register(fn: Verifier) -> Verifier:
        if name in VERIFIERS:
            raise ValueError(f"two built-in verifiers are named {name!r}: rename one")
        VERIFIERS[name] = fn
        return fn
    return register


@builtin("exact")
def exact(response: str, reference: str, options: dict) -> PluginScore:
    ref = normalise(reference)
    if not ref:
        return PluginScore(0.0, valid=False)
    return PluginScore(1.0 if normalise(response) == ref else 0.0)


# ---- math --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?|-?\.\d+")


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str:
    """The final answer of a response: \\boxed{...}, then "#### x", "answer is x" / "answer: x", then the whole
    text when it is a short expression (no prose), then its last number."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    m = re.findall(r"(?:####|answer is|answer:)\s*([^\n]+)", text, flags=re.IGNORECASE)
    if m:
        return m[-1].strip().rstrip(".")
    stripped = text.strip()
    prose = [w for w in re.findall(r"(?<!\\)\b[A-Za-z]{2,}", stripped) if w.lower() not in _NAMES]
    if len(stripped) <= 100 and not prose:  # the whole response is an expression
        return stripped
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else stripped


def normalise_math(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\cdot", "*"), ("\\times", "*"),
                 ("\\pi", "pi"), ("^", "**"), ("{", "("), ("}", ")")):
        s = s.replace(a, b)
    s = re.sub(r"(\d),(\d{3})\b", r"\1\2", s)  # thousands separators
    s = s.replace(" ", "").rstrip(".")
    return s.lower()


def _number(s: str) -> Fraction | None:
    pct = s.endswith("%")
    s = s.rstrip("%")
    m = re.fullmatch(r"\(?(-?\d+(?:\.\d+)?)\)?(?:/\(?(\d+(?:\.\d+)?)\)?)?", s)
    if not m:
        return None
    value = Fraction(m.group(1)) / (Fraction(m.group(2)) if m.group(2) else 1)
    return value / 100 if pct else value


_SYMBOLIC_OK = re.compile(r"[0-9a-z+\-*/().]+")
_NAMES = {"sqrt", "pi", "e", "log", "exp", "sin", "cos", "tan"}


def _symbolic_equal(a: str, b: str) -> bool:
    """sympy equivalence, only for strings of digits, operators and whitelisted names (sympy's parser evals)."""
    for s in (a, b):
        if len(s) > 200 or not _SYMBOLIC_OK.fullmatch(s):
            return False
        if any(len(w) > 1 and w not in _NAMES for w in re.findall(r"[a-z]+", s)):
            return False
    import sympy
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations, implicit_multiplication
    tr = standard_transformations + (implicit_multiplication,)
    names = {n: getattr(sympy, n) for n in _NAMES if n != "e"} | {"e": sympy.E}
    try:
        diff = parse_expr(a, local_dict=names, transformations=tr) - parse_expr(b, local_dict=names, transformations=tr)
    except (SyntaxError, TypeError, ValueError, AttributeError, sympy.SympifyError):
        return False
    return sympy.simplify(diff) == 0


def math_answer_sympy(response: str, reference: str, options: dict) -> PluginScore:
    """The fallback math verifier (no ``math-verify``): normalised strings, numbers, then sympy."""
    ref = normalise_math(extract_answer(reference))
    if not ref:
        return PluginScore(0.0, valid=False)
    got = normalise_math(extract_answer(response))
    if got == ref:
        return PluginScore(1.0)
    x, y = _number(got), _number(ref)
    if x is not None and y is not None:
        return PluginScore(float(x == y or abs(x - y) <= 1e-6 * max(abs(y), 1)))
    return PluginScore(float(_symbolic_equal(got, ref)))


_MV_TIMEOUT_S = 5  # math-verify's own per-parse / per-comparison limit (signal.alarm: main thread only)
_MV: list = []  # [the math_verify module, or None when it is missing]: imported once, on the first math call


def _math_verify():
    """The ``math_verify`` module, or None (one warning per process) when it is not installed."""
    if not _MV:
        try:
            import math_verify
        except ImportError as e:
            log.warning("reward.math_verify_missing", error=str(e), using="the sympy fallback (math_answer_sympy)",
                        fix="pip install 'math-verify[antlr4_9_3]'")
            math_verify = None
        _MV.append(math_verify)
    return _MV[0]


def _gold_text(reference: str) -> str:
    """The reference as math-verify reads a gold answer: its final answer, in LaTeX math delimiters."""
    ans = extract_answer(reference).strip().strip("$").strip()
    return f"${ans}$" if ans else ""


@builtin("math")
def math_answer(response: str, reference: str, options: dict) -> PluginScore:
    """1 when ``math_verify.verify(gold, prediction)`` holds; the sympy fallback without the library."""
    mv = _math_verify()
    if mv is None:
        return math_answer_sympy(response, reference, options)
    # math-verify's timeouts use signal.alarm, which raises off the main thread: there the caller's own limit
    # (the plugin pool's reward.plugin_timeout_s) is the only one
    limit = _MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = mv.parse(_gold_text(reference), parsing_timeout=limit) or mv.parse(reference, parsing_timeout=limit)
    if not gold:
        return PluginScore(0.0, valid=False)
    pred = mv.parse(response, parsing_timeout=limit)
    return PluginScore(float(bool(pred) and mv.verify(gold, pred, timeout_seconds=limit)))


# ---- code --------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def parse_tests(reference: str) -> list[str]:
    """Unit tests: a JSON list of Python statements, or one statement per non-empty line."""
    text = reference.strip()
    if text.startswith("["):
        tests = json.loads(text)
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise ValueError("code tests must be a JSON list of strings, e.g. [\"assert f(1) == 2\"]")
    else:
        tests = [line for line in text.splitlines() if line.strip()]
    if not tests:
        raise ValueError("the reference holds no unit test")
    return tests


@builtin("code")
def python_tests(response: str, reference: str, options: dict) -> PluginScore:
    tests = parse_tests(reference)
    result = run_python(extract_code(response), tests=tests, limits=options.get("sandbox"))
    if not result.isolation:  # the bootstrap itself failed: the sandbox could not run, not the code
        raise RuntimeError(f"the sandbox did not start (status {result.status}): {result.stderr[-300:]}")
    passed = sum(1 for r in result.reports if r.get("passed"))
    iso = result.isolation
    return PluginScore(passed / len(tests), {
        "tests_passed": float(passed), "tests_total": float(len(tests)),
        "sandbox_timeout": float(result.status == "timeout"),
        "sandbox_memory_limit": float(result.status == "memory_limit"),
        "sandbox_netns": float(iso.get("network") == "netns"), "sandbox_uid": float(iso.get("uid") != "none")})


# ---- instruction following ---------------------------------------------------------------------------------


def _words(t: str) -> list[str]:
    return re.findall(r"\b\w+\b", t)


def _is_json(t: str) -> bool:
    try:
        json.loads(t.strip().removeprefix("```json").removeprefix("```").removesuffix("```"))
        return True
    except ValueError:
        return False


CONSTRAINTS = {  # type -> check(text, constraint) -> bool
    "max_words": lambda t, c: len(_words(t)) <= c["n"],
    "min_words": lambda t, c: len(_words(t)) >= c["n"],
    "max_chars": lambda t, c: len(t) <= c["n"],
    "include": lambda t, c: c["text"].lower() in t.lower(),
    "exclude": lambda t, c: c["text"].lower() not in t.lower(),
    "starts_with": lambda t, c: t.strip().startswith(c["text"]),
    "ends_with": lambda t, c: t.strip().endswith(c["text"]),
    "lowercase": lambda t, c: t == t.lower(),
    "uppercase": lambda t, c: t == t.upper(),
    "no_commas": lambda t, c: "," not in t,
    "json": lambda t, c: _is_json(t),
    "num_bullets": lambda t, c: sum(bool(re.match(r"\s*[-*] ", line)) for line in t.splitlines()) == c["n"],
    "num_paragraphs": lambda t, c: len([p for p in re.split(r"\n\s*\n", t.strip()) if p.strip()]) == c["n"],
    "quoted": lambda t, c: len(t.strip()) >= 2 and t.strip()[0] == t.strip()[-1] == '"',
}


@builtin("instruction")
def instructions(response: str, reference: str, options: dict) -> PluginScore:
    constraints = json.loads(reference)
    if not isinstance(constraints, list) or not constraints:
        raise ValueError('instruction constraints must be a non-empty JSON list, e.g. [{"type": "max_words", "n": 50}]')
    met = 0
    for c in constraints:
        if c.get("type") not in CONSTRAINTS:
            raise ValueError(f"unknown constraint type {c.get('type')!r}; known: {sorted(CONSTRAINTS)}")
        met += bool(CONSTRAINTS[c["type"]](response, c))
    return PluginScore(met / len(constraints), {"constraints_met": float(met),
                                                 "constraints_total": float(len(constraints))})


# ---- multiple choice ---------------------------------------------------------------------------------------

_LETTER = r"\(?([A-Z])\)?(?![A-Za-z0-9])"  # one capital letter, optionally in parentheses
_CHOICE_STATED = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:=]?\s*\**\s*" + _LETTER)
_CHOICE_ALONE = re.compile(r"\s*\**\s*" + _LETTER + r"\s*[.:]?\s*\**\s*")


def choice_letter(text: str) -> str | None:
    """The option a response picks: ``\\boxed{X}``, else the last "answer is X" / "answer: (X)", else the whole
    response when it is only the letter (``B``, ``(B)``, ``B.``); None when it picks none."""
    boxed = _boxed(text)
    if boxed is not None:
        m = _CHOICE_ALONE.fullmatch(re.sub(r"\\text\{([^}]*)\}", r"\1", boxed))
        return m.group(1) if m else None
    stated = _CHOICE_STATED.findall(text)
    if stated:
        return stated[-1]
    m = _CHOICE_ALONE.fullmatch(text)
    return m.group(1) if m else None


@builtin("choice")
def choice(response: str, reference: str, options: dict) -> PluginScore:
    """1 when the response picks the reference's option letter (the reference: ``B``, ``(B)`` or ``B) text``)."""
    m = re.match(r"\s*\(?([A-Za-z])(?:[).:]|\s|$)", reference)
    if not m:
        return PluginScore(0.0, valid=False)
    picked = choice_letter(response)
    return PluginScore(float(picked == m.group(1).upper()), {"choice_found": float(picked is not None)})
