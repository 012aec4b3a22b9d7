"""Shared golden-file mechanism: ``--update-golden`` rewrites golden files instead of comparing.

A golden file that is missing is a failure (it is written only under ``--update-golden``), so a
deleted or never-generated golden cannot pass silently.

Also: per-test CPU accounting (``LLMC_TEST_CPU_LOG=FILE``), and the module order for ``scripts/test.sh``'s two
xdist workers, longest modules first by their measured cost in ``tests/module_cost.json``. After tests were
added or made faster or slower, refresh that file from a full run's log:

    LLMC_TEST_CPU_LOG=/tmp/cost.jsonl scripts/test.sh
    .venv/bin/python scripts/module_cost.py /tmp/cost.jsonl
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


# --- Test order for two workers: the longest modules first. ``scripts/test.sh`` runs the suite with ``-n 2
# --dist loadfile``: pytest-xdist hands each worker one whole module at a time, in collection order, and gives
# a worker its next module as soon as two tests of its current one are left (xdist/scheduler/loadscope.py
# ``_reschedule``), so a worker takes on a module before it is free. Starting with the longest modules and
# ending on many short ones (longest-processing-time first) keeps both workers busy to the end: what a worker
# takes on early near the end is short, and the other worker's last long module is evened out by the short
# ones. A module's tests keep their order. A module's cost is its measured wall time in
# tests/module_cost.json, rewritten from a per-test log of a full run (LLMC_TEST_CPU_LOG above) by
# scripts/module_cost.py; a module not in the file yet counts as SLOW_TEST_S per ``slow`` test and FAST_TEST_S
# per other test (about the suite's means), so a new module is still placed sensibly.
COST_FILE = Path(__file__).parent / "module_cost.json"
SLOW_TEST_S, FAST_TEST_S = 10.0, 0.2


def pytest_configure(config: pytest.Config) -> None:
    """Keep the collection order for xdist's module scheduling: by default (``--loadscope-reorder``) ``--dist
    loadfile`` / ``loadscope`` re-sorts the modules by their number of tests, most first, which would put the
    one-test modules that run for a minute (the multi-node runs) at the very end. An explicit
    ``--loadscope-reorder`` on the command line still wins."""
    if (getattr(config.option, "dist", "no") in ("loadfile", "loadscope")
            and "--loadscope-reorder" not in config.invocation_params.args):
        config.option.loadscopereorder = False


def module_costs(items: list[pytest.Item]) -> dict[str, float]:
    """Module path (as node ids spell it) -> expected seconds: measured (tests/module_cost.json) or
    estimated."""
    import json

    measured = json.loads(COST_FILE.read_text()) if COST_FILE.exists() else {}
    estimate: dict[str, float] = {}
    for it in items:
        module = it.nodeid.split("::", 1)[0]
        estimate[module] = estimate.get(module, 0.0) + (
            SLOW_TEST_S if it.get_closest_marker("slow") is not None else FAST_TEST_S)
    return {m: float(measured.get(m, e)) for m, e in estimate.items()}


def pytest_collection_modifyitems(session, config, items):
    """The modules longest first (see above), ties in file order; the order within a module is kept."""
    cost = module_costs(items)
    pos = {it.nodeid: i for i, it in enumerate(items)}
    items.sort(key=lambda it: (-cost[it.nodeid.split("::", 1)[0]], pos[it.nodeid]))
