"""The built-in verifiers: math answers (math-verify, and the sympy fallback), code by unit tests (real sandbox),
instruction constraints."""

import json
import sys
import threading

import pytest

from configs.schema import SandboxConfig
from engine.rewards import verifiers
from engine.rewards.verifiers import (choice, choice_letter, exact, extract_answer, instructions, math_answer,
                                      math_answer_sympy, python_tests)

pytestmark = pytest.mark.timeout(60)


EQUIVALENT = [
    ("The answer is 42.", "42"), ("so \\boxed{\\frac{1}{2}}", "0.5"), ("#### 1,000", "1000"),
    ("it is 50%", "0.5"), ("\\boxed{2\\sqrt{2}}", "sqrt(8)"), ("x = \\boxed{(x+1)^2}", "x^2 + 2x + 1"),
    ("-3/6", "-0.5"), ("$\\dfrac{3}{4}$", "3/4"),
]
WRONG = [("The answer is 41.", "42"), ("\\boxed{x^2}", "x^3"), ("no number here", "7"), ("__import__('os')", "1")]


@pytest.mark.parametrize("response,reference", EQUIVALENT + [
    ("$\\frac{1}{2}$", "0.5"), ("The answer is 0.5", "\\frac{1}{2}"), ("\\boxed{\\frac{6}{8}}", "\\frac{3}{4}"),
    ("so \\boxed{\\{2,1\\}}", "\\{1,2\\}"), ("the set is $\\{3, 1, 2\\}$", "\\{1,2,3\\}"),
    ("x lies in $[0, 1)$", "[0,1)"), ("\\boxed{(-\\infty, 2]}", "(-\\infty,2]"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{1}{\\sqrt{2}}"),
])
def test_math_verifier_accepts_equivalent_answers(response, reference):
    assert math_answer(response, reference, {}) == (1.0, {}, True)


@pytest.mark.parametrize("response,reference", WRONG + [
    ("\\boxed{\\frac{1}{3}}", "0.5"), ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}"), ("$[0, 1]$", "[0,1)"),
    ("\\boxed{(0,1]}", "(0,1)"),
])
def test_math_verifier_rejects_wrong_or_unsafe_answers(response, reference):
    assert math_answer(response, reference, {}) == (0.0, {}, True)


def test_math_verifier_cannot_judge_an_empty_reference():
    assert not math_answer("42", "  ", {}).valid


def test_math_verifier_runs_off_the_main_thread():
    """math-verify's signal-based timeouts only work in the main thread: off it they are turned off, not raised."""
    out = []
    t = threading.Thread(target=lambda: out.append(math_answer("\\boxed{\\{2,1\\}}", "\\{1,2\\}", {})))
    t.start()
    t.join(30)
    assert out == [(1.0, {}, True)]


@pytest.mark.parametrize("response,reference", EQUIVALENT)
def test_sympy_fallback_accepts_equivalent_answers(response, reference):
    assert math_answer_sympy(response, reference, {}).score == 1.0


@pytest.mark.parametrize("response,reference", WRONG)
def test_sympy_fallback_rejects_wrong_or_unsafe_answers(response, reference):
    assert math_answer_sympy(response, reference, {}).score == 0.0


def test_math_verifier_falls_back_to_sympy_without_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # what an uninstalled package does: ImportError
    monkeypatch.setattr(verifiers, "_MV", [])
    assert math_answer("so \\boxed{\\frac{1}{2}}", "0.5", {}).score == 1.0
    assert math_answer("The answer is 41.", "42", {}).score == 0.0
    assert verifiers._MV == [None]  # imported (and warned about) once


def test_math_answer_extraction_prefers_boxed_then_marker_then_last_number():
    assert extract_answer("3 then \\boxed{5} then 7") == "5"
    assert extract_answer("work 3 ... Answer: 12") == "12"
    assert extract_answer("1 plus 2 gives 3") == "3"


def test_exact_verifier_is_the_built_in_tasks_check():
    assert exact(" 225 ", "225", {}).score == 1.0 and exact("22", "225", {}).score == 0.0
    assert not exact("x", "  ", {}).valid


def test_code_verifier_scores_the_fraction_of_unit_tests_passed():
    response = "Here you go:\n```python\ndef add(a, b):\n    return a + b if a < 10 else 0\n```\n"
    tests = json.dumps(["assert add(1, 2) == 3", "assert add(20, 1) == 21", "assert add(0, 0) == 0",
                        "assert add(2, 2) == 4"])
    s = python_tests(response, tests, {"sandbox": SandboxConfig(cpu_s=1, wall_s=5)})
    assert s.score == 0.75 and s.parts["tests_passed"] == 3 and s.parts["tests_total"] == 4 and s.valid
    hang = python_tests("def add(a, b):\n    while True:\n        pass", "assert add(1, 2) == 3",
                        {"sandbox": SandboxConfig(cpu_s=1, wall_s=3)})
    assert hang.score == 0.0 and hang.parts["sandbox_timeout"] == 1.0 and hang.valid  # a wrong answer, scored


def test_instruction_verifier_scores_the_fraction_of_constraints_met():
    constraints = json.dumps([{"type": "max_words", "n": 5}, {"type": "include", "text": "moe"},
                              {"type": "lowercase"}, {"type": "no_commas"}])
    s = instructions("experts, a moe model", constraints, {})
    assert s.score == 0.75 and s.parts["constraints_met"] == 3
    with pytest.raises(ValueError, match="unknown constraint type"):
        instructions("x", json.dumps([{"type": "rhymes"}]), {})


@pytest.mark.parametrize("response, letter", [
    ("B", "B"), ("(C)", "C"), (" D. ", "D"), ("The answer is (D).", "D"), ("Answer: **A**", "A"),
    ("so the final answer is \\boxed{B}", "B"), ("\\boxed{\\text{(C)}}", "C"),
    ("Answer: C. On reflection, the answer is D", "D"),  # the last stated answer wins
    ("The answer is a prime", None), ("The answer is Alice", None), ("I think so", None), ("", None),
])
def test_choice_letter_reads_the_picked_option(response, letter):
    assert choice_letter(response) == letter


def test_choice_verifier_compares_option_letters():
    assert choice("The answer is (B).", "B", {}) == (1.0, {"choice_found": 1.0}, True)
    assert choice("The answer is (B).", "(b) a dog", {}).score == 1.0  # the reference's letter, any case
    assert choice("Answer: C", "B", {}) == (0.0, {"choice_found": 1.0}, True)
    assert choice("no idea", "B", {}) == (0.0, {"choice_found": 0.0}, True)  # picks nothing: wrong, scored
    assert not choice("B", "42", {}).valid  # a reference without an option letter cannot be judged
