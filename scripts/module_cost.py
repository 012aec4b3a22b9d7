"""Rewrite tests/module_cost.json (test module -> seconds of wall time) from a per-test log of a full suite
run, so that tests/conftest.py can start the longest modules first.

    LLMC_TEST_CPU_LOG=/tmp/cost.jsonl scripts/test.sh
    .venv/bin/python scripts/module_cost.py /tmp/cost.jsonl

Measure on the suite as it runs in CI (two workers on two cores, ``scripts/test.sh``): a module's wall time
there includes its share of the contention, which is what the schedule has to balance. The log is one JSON
line per test (``tests/conftest.py``, ``LLMC_TEST_CPU_LOG``); a test logged more than once (a log appended to
by several runs) counts with its last record. Modules the log does not cover keep their figure (a log of only
some of a module's tests would understate it: log whole modules); modules whose file is gone are dropped.
Seconds are rounded to whole ones: the order only needs their sizes, and small drifts do not rewrite the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COST_FILE = ROOT / "tests" / "module_cost.json"


def module_walls(log: Path) -> dict[str, float]:
    """Module path (as pytest's node ids spell it) -> the summed wall seconds of its tests' last records."""
    last: dict[str, float] = {}
    for line in log.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            last[r["test"]] = float(r["wall"])
    out: dict[str, float] = {}
    for test, wall in last.items():
        module = test.split("::", 1)[0]
        out[module] = out.get(module, 0.0) + wall
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path, help="the LLMC_TEST_CPU_LOG file of a suite run")
    ap.add_argument("-o", "--out", type=Path, default=COST_FILE,
                    help="the cost file to update (default: %(default)s)")
    args = ap.parse_args(argv)
    walls = module_walls(args.log)
    if not walls:
        print(f"{args.log}: no test records", file=sys.stderr)
        return 1
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    cost = {m: s for m, s in old.items() if (ROOT / m).is_file()}
    cost.update({m: round(s) for m, s in walls.items()})
    args.out.write_text(json.dumps(dict(sorted(cost.items())), indent=1) + "\n")
    dropped = sorted(set(old) - set(cost))
    print(f"{args.out}: {len(walls)} modules measured, {len(cost) - len(walls)} kept, {len(dropped)} dropped"
          f"{': ' + ', '.join(dropped) if dropped else ''}; {sum(cost.values())} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
