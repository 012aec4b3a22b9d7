"""Shared golden-file mechanism: ``--update-golden`` rewrites golden files instead of comparing.

A golden file that is missing is a failure (it is written only under ``--update-golden``), so a
deleted or never-generated golden cannot pass silently.

Also: per-test CPU accounting (``LLMC_TEST_CPU_LOG=FILE``): each test's wall and CPU seconds, its xdist worker and
when it ended (the workers' timelines).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN_ROOT = Path(__file__).parent / "golden"

# llmc's cache (the builtin corpus, parsed once from the stdlib: llmc.runtime.corpus) in the repository's ignored
# build/ folder, shared by both workers and every process they start, and never a user's ~/.cache; a test of the
# cache itself points LLMC_CACHE_DIR at its own folder
os.environ.setdefault("LLMC_CACHE_DIR", str(Path(__file__).resolve().parents[1] / "build" / "test-cache"))


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
# of the test process and of the processes it waited for (torchrun and its workers included), to find where
# the suite's time goes on a 2-core CI machine, and the xdist worker that ran it with the time it ended (each
# worker's timeline: how long one waited for the other at the end); no effect when the variable is unset.
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
                            "cpu_children": round(c1 - c0, 2), "end": round(time.time(), 2),
                            "worker": os.environ.get("PYTEST_XDIST_WORKER")}) + "\n")


# --- Test order: pytest-xdist decides it. With ``--dist loadfile`` it hands each worker whole modules and, by default
# (``--loadscope-reorder``), in order of their number of tests, most first; a worker gets its next module when two
# tests of its current one are left (xdist/scheduler/loadscope.py). Longest-module-first by measured cost was tried
# (xdist's reorder off): it ended both workers within 0.1 s of each other, but it runs the long multi-process
# modules (two-rank torchrun jobs) side by side on the two cores, and their oversubscribed collectives cost more
# CPU than the idle tail it saved: the whole suite took 17:30 against 16:12 with xdist's own order (2 cores, no
# other load; 1,927 vs 1,725 CPU-seconds of tests).
