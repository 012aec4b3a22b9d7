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


# --- CPU accounting (LLMC_TEST_CPU_LOG=FILE): one JSON line per test with its wall time and the CPU seconds
# of the test process and of the processes it waited for (torchrun and its workers included), to find
# where the suite's time goes on a 2-core CI machine; no effect when the variable is unset.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import os

    log = os.environ.get("LLMC_TEST_CPU_LOG")
    if not log:
        yield
        return
    import json
    import resource
    import time

    def cpu() -> tuple[float, float]:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime

    t0, (s0, c0) = time.perf_counter(), cpu()
    yield
    t1, (s1, c1) = time.perf_counter(), cpu()
    with open(log, "a") as f:
        f.write(json.dumps({"test": item.nodeid, "wall": round(t1 - t0, 2), "cpu_self": round(s1 - s0, 2),
                            "cpu_children": round(c1 - c0, 2)}) + "\n")


def pytest_collection_modifyitems(session, config, items):
    """Modules with multi-process ("slow") tests first, the most of them first; the rest after, in file order.

    ``scripts/test.sh`` runs the whole suite on two workers (``-n 2 --dist loadfile``), which take modules in
    collection order: starting the long modules first and ending on many short ones keeps both workers busy
    to the end (longest-first scheduling). The order within a module is kept."""
    slow: dict[str, int] = {}
    for it in items:
        if it.get_closest_marker("slow") is not None:
            slow[it.nodeid.split("::")[0]] = slow.get(it.nodeid.split("::")[0], 0) + 1
    pos = {it.nodeid: i for i, it in enumerate(items)}
    items.sort(key=lambda it: (-slow.get(it.nodeid.split("::")[0], 0), pos[it.nodeid]))
