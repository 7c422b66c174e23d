"""Final-answer checks of the reasoning tasks (engine/data/reasoning.py): pure functions, no eval, no I/O.

A worked solution ends with its final-answer line, ``#`` followed by the answer (``#522``, ``#1 3 5 9``,
``#(3+5)*2``); only the last such line of a response counts, so nothing before it is judged. ``countdown``'s
reference starts with a header line ``3 5 8 2>16`` (the numbers, then the target): the verifier takes the numbers
and the target from the reference, never from the response, and parses the response's expression with ``ast``,
allowing only ``+ - * /``, parentheses and integer literals, each given number used at most once.
"""

from __future__ import annotations

import ast
from collections import Counter
from fractions import Fraction

FINAL = "#"  # a final-answer line starts with it
MAX_EXPRESSION_CHARS = 200  # a longer countdown answer is wrong, unparsed


def final_answer(text: str) -> str | None:
    """The answer on the last line starting with ``#`` (whitespace-normalised), or None if there is none."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith(FINAL):
            return " ".join(line[len(FINAL):].split())
    return None


def check_final(response: str, reference: str) -> tuple[float, bool]:
    """(score, valid): 1.0 when the response's final answer equals the reference's; invalid without a reference
    answer to judge against."""
    ref = final_answer(reference)
    if not ref:
        return 0.0, False
    return (1.0 if final_answer(response) == ref else 0.0), True


def countdown_header(numbers: list[int], target: int) -> str:
    return " ".join(map(str, numbers)) + f">{target}"


def parse_header(reference: str) -> tuple[list[int], int] | None:
    """(numbers, target) from a countdown reference's first line ``3 5 8 2>16``; None if it is not one."""
    head, sep, target = reference.split("\n", 1)[0].partition(">")
    try:
        numbers = [int(x) for x in head.split()]
        return (numbers, int(target)) if sep and numbers else None
    except ValueError:
        return None


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def _value(node: ast.AST, literals: list[int]) -> Fraction:
    """The exact value of an expression of + - * / and integer literals; ValueError for anything else."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_value(node.left, literals), _value(node.right, literals))
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    raise ValueError(f"{type(node).__name__} is not allowed (only + - * /, parentheses and integers)")


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """(value, the integer literals used) of a countdown expression; ValueError when it is not a safe one."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an expression ({type(e).__name__})") from None
    literals: list[int] = []
    try:
        return _value(tree.body, literals), literals
    except ZeroDivisionError:
        raise ValueError("division by zero") from None


def check_countdown(response: str, reference: str) -> tuple[float, bool]:
    """(score, valid): 1.0 when the response's final expression is safe, uses each of the reference's numbers at
    most once and equals its target; invalid when the reference has no header."""
    problem = parse_header(reference)
    if problem is None:
        return 0.0, False
    numbers, target = problem
    expression = final_answer(response)
    if not expression:
        return 0.0, True
    try:
        value, literals = evaluate(expression)
    except ValueError:
        return 0.0, True
    if Counter(literals) - Counter(numbers):  # a literal not given, or a number used more often than given
        return 0.0, True
    return (1.0 if value == target else 0.0), True
