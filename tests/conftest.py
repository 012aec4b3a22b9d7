"""Shared golden-file mechanism: ``--update-golden`` rewrites golden files instead of comparing.

A golden file that is missing is a failure (it is written only under ``--update-golden``), so a
deleted or never-generated golden cannot pass silently.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

GOLDEN_ROOT = Path(__file__).parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/** from the current output instead of comparing")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


def check_golden(golden: Path, actual: str, update: bool) -> None:
    """Compare ``actual`` with the golden file (or rewrite it when ``update``); missing = failure."""
    rel = golden.relative_to(GOLDEN_ROOT)
    if update:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual)
        return
    if not golden.exists():
        pytest.fail(f"golden file tests/golden/{rel} is missing (generate it with --update-golden and review it)")
    expected = golden.read_text()
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                                 f"golden/{rel}", f"actual/{rel}"))[:40])
        pytest.fail(f"tests/golden/{rel} differs (review, then regenerate with --update-golden):\n{diff}")
