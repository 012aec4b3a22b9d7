"""Verifiable rewards: exact arithmetic checking with sympy (RLVR, Lambert et al. 2024, arXiv:2411.15124: reward 1 if the answer is correct).

The completion's final answer is the last number in the text, preferring what follows "answer:" / "=" /
a \\boxed{}. It must be a number *literal*: an integer, a decimal or a fraction p/q in lowest terms (q > 1), never
an expression that evaluates to the value (else echoing the prompt, \\boxed{17*23}, scores 1: reward hacking; RLVR
and math verifiers compare the final answer). It is compared with the true value of the prompt's expression (parsed
with sympy *without* eval of arbitrary names: only digits, + - * / ( ) . and spaces, ** rejected, length capped)
by exact equality. Anything else scores 0; the verifier never raises.
"""

from __future__ import annotations

import math
import re

import sympy
from sympy.parsing.sympy_parser import parse_expr

_SAFE = re.compile(r"^[0-9+\-*/(). ]{1,64}$")
_NUM = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")
_LITERAL = re.compile(r"(-?\d+(?:\.\d+)?)|(-?\d+)\s*/\s*(\d+)")


def _literal(answer: str) -> sympy.Rational | None:
    """The value of a number literal (integer, decimal, or p/q in lowest terms with q > 1), else None."""
    s = answer.strip().rstrip(".").strip()  # "The answer is 5."
    m = _LITERAL.fullmatch(s) if len(s) <= 64 else None
    if m is None:
        return None
    if m[1] is not None:
        return sympy.Rational(m[1])  # exact: Rational("0.5") == 1/2
    p, q = int(m[2]), int(m[3])
    return sympy.Rational(p, q) if q > 1 and math.gcd(p, q) == 1 else None


def _parse(expr: str) -> sympy.Expr | None:
    s = expr.strip()
    if not _SAFE.match(s) or "**" in s:
        return None
    try:
        val = parse_expr(s, evaluate=True)
        val = sympy.nsimplify(val, rational=True) if val.is_Float else val
        return val if val.is_number else None
    except Exception:  # noqa: BLE001 - junk never crashes the reward
        return None


def extract_answer(text: str) -> str | None:
    """The final answer string of a completion, or None."""
    if not isinstance(text, str):
        return None
    t = text.strip()
    m = re.findall(r"\\boxed\{([^{}]{1,64})\}", t)
    if m:
        return m[-1].strip()
    m = re.findall(r"(?:answer\s*(?:is|:)|=)\s*([-0-9./ ]{1,64})", t, flags=re.IGNORECASE)
    if m and m[-1].strip():
        return m[-1].strip()
    nums = _NUM.findall(t)
    return nums[-1].replace(" ", "") if nums else None


def true_value(expression: str) -> sympy.Expr | None:
    return _parse(expression)


def verifier_truth(expression: str | None = None, answer=None) -> sympy.Expr | None:
    """The number a completion is checked against: ``answer`` when it is given (even ``""``), read as a number,
    else the expression's value; None when there is none (every completion would score 0)."""
    try:
        if answer is not None:
            truth = sympy.nsimplify(answer, rational=True)
            return truth if truth.is_number else None  # ("two" reads as a symbol)
        return _parse(expression if isinstance(expression, str) else "")
    except Exception:  # noqa: BLE001 (sympify raises several kinds)
        return None


def arithmetic_reward(completion: str, expression: str | None = None, answer=None) -> float:
    """1.0 when the completion's final answer is a number literal equal to the expression's value (or ``answer``)
    exactly, else 0 (:func:`verifier_truth`)."""
    try:
        truth = verifier_truth(expression, answer)
        if truth is None:
            return 0.0
        got = extract_answer(completion)
        if got is None:
            return 0.0
        pred = _literal(got)
        if pred is None:
            return 0.0
        return 1.0 if sympy.simplify(pred - truth) == 0 else 0.0
    except Exception:  # noqa: BLE001
        return 0.0
