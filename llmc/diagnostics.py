"""One diagnostic type for every check (spec, math, plan, build) and its two renderings.

Concise form (ruff-like, one line each):
    ``file:line: error[CODE] path: message (hint)``
Codes are stable so tests and docs can cite them:
    S... spec/schema, M... model shape, C... compute/scaling, P... plan/parallelism,
    B... budget, D... data, T... training hyperparameters, G... stage graph, V... serving, X... build.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Diagnostic:
    code: str
    severity: Severity
    path: str
    message: str
    hint: str = ""
    line: int | None = None
    file: str | None = None

    def render(self) -> str:
        loc = f"{self.file or '<spec>'}:{self.line}" if self.line else (self.file or "<spec>")
        hint = f" ({self.hint})" if self.hint else ""
        path = f" {self.path}:" if self.path else ""
        return f"{loc}: {self.severity}[{self.code}]{path} {self.message}{hint}"

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("file")
        return d


def line_for(lines: dict[str, int] | None, path: str) -> int | None:
    """The YAML line of ``path``, or of its nearest parent present in ``lines`` (None if none).

    ``serving[0].gpus`` is accepted as a spelling of ``serving.0.gpus``.
    """
    if not lines:
        return None
    path = re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")
    while path:
        if path in lines:
            return lines[path]
        path = path.rpartition(".")[0]
    return None


def errors(diags: list[Diagnostic]) -> list[Diagnostic]:
    return [d for d in diags if d.severity == "error"]


def sort_diagnostics(diags: list[Diagnostic]) -> list[Diagnostic]:
    """Errors first, then by line and code, for stable output."""
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(diags, key=lambda d: (order[d.severity], d.line or 0, d.code, d.path))


class SpecError(Exception):
    """Raised by the loader/compiler when there are error diagnostics; carries all of them."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = diagnostics
        super().__init__("\n".join(d.render() for d in diagnostics))
