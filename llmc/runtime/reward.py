"""Verifiable rewards: exact arithmetic checking with sympy (RLVR, Lambert et al. 2024, arXiv:2411.15124: reward 1 if the answer is correct).

The completion's final answer is the last number (integer, decimal, fraction or simple expression
of digits) in the text, preferring what follows "answer:" / "=" / a \\boxed{}. It is parsed with
sympy *without* eval of arbitrary names (only digits, + - * / ( ) . and spaces are allowed, ** is
rejected, length capped) and compared with the true value of the prompt's expression by exact
symbolic equality. Anything unparsable scores 0; the verifier never raises.
"""

from __future__ import annotations

import re

import sympy
from sympy.parsing.sympy_parser import parse_expr

_SAFE = re.compile(r"^[0-9+\-*/(). ]{1,64}$")
_NUM = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")


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


def arithmetic_reward(completion: str, expression: str | None = None, answer=None) -> float:
    """1.0 when the completion's final answer equals the expression's value (or ``answer``) exactly, else 0."""
    try:
        truth = sympy.nsimplify(answer, rational=True) if answer is not None else _parse(expression or "")
        if truth is None:
            return 0.0
        got = extract_answer(completion)
        if got is None:
            return 0.0
        pred = _parse(got)
        if pred is None:
            return 0.0
        return 1.0 if sympy.simplify(pred - truth) == 0 else 0.0
    except Exception:  # noqa: BLE001
        return 0.0
