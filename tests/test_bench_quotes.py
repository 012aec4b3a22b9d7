"""The fidelity figures the READMEs quote are the ones benchmarks/RESULTS.md holds now, and the statement of what was
fitted on which rows covers every factor whose source says so.

* README.md ("How far to trust the numbers") copies rows of RESULTS.md's two summary tables: each copied row must be
  a row of the same table there, cell for cell, and the copy must include the in-sample (fit rows) and held-out lines.
* A per-row figure is quoted as `` `row-id` +x.x% `` (the row's uncalibrated tokens/s error) or
  `` `row-id` +x.x% / +y.y% `` (uncalibrated / leave-one-out calibrated), in README.md's fidelity section and in
  benchmarks/README.md; each must equal the row's cells in RESULTS.md's per-row table, and no other signed
  percentage may appear there (a figure without its row id cannot be checked, and goes stale).
* llmc/compiler/README.md's Llama 3 405B anchor quotes what `llmc plan` and the timing model give now.
* scripts/bench_fidelity.py's provenance statement names every factor of the profiles it scores whose source in
  llmc/compiler/backends.py says it was fitted, or set with benchmark rows in view.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
# first header cells of RESULTS.md's summary tables (scripts/bench_fidelity.py SUMMARY_TABLES)
SUMMARY_HEADERS = ("tokens/s/GPU rows", "peak reserved memory rows")
PER_ROW_HEADING = "## Throughput (tokens/s/GPU) and peak memory per row"
# a quoted row figure: `id` +x.x% [/ +y.y%] (whitespace, a line break included, between the parts)
QUOTE = re.compile(r"`([a-z0-9][a-z0-9.-]*)`\s+([+-]\d+\.\d)%(?:\s+/\s+([+-]\d+\.\d)%)?")
# a signed percentage standing alone ("-18%", "+3.2 %"), not the tail of a range such as "5-31%"
SIGNED_PCT = re.compile(r"(?<![\w.])[+-]\d+(?:\.\d+)?\s?%")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: a list of rows (header first, the |---| line dropped), each a list of cells."""
    out, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            if not re.fullmatch(r"\|[\s|:-]+\|", line.strip()):
                cur.append(_cells(line))
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def _summary_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """{(table header, row label): cells} of the summary tables in ``text``."""
    rows = {}
    for t in _tables(text):
        if t[0][0] in SUMMARY_HEADERS:
            for r in t[1:]:
                rows[(t[0][0], r[0])] = r
    return rows


def _results() -> str:
    return RESULTS.read_text()


def _per_row() -> dict[str, dict[str, str]]:
    """{row id: {"err": uncalibrated tokens/s error cell, "loo": LOO-calibrated cell}} from RESULTS.md's per-row table."""
    text = _results().split(PER_ROW_HEADING, 1)[1]
    (table, *_) = _tables(text)
    head = table[0]
    i_err, i_loo = head.index("err %"), head.index("LOO-cal err %")
    return {r[0]: {"err": r[i_err], "loo": r[i_loo]} for r in table[1:]}


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## How far to trust the numbers\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README.md: the 'How far to trust the numbers' section is gone"
    return m.group(1)


def _quoting_texts() -> dict[str, str]:
    return {"README.md (How far to trust the numbers)": _readme_section(),
            "benchmarks/README.md": (ROOT / "benchmarks" / "README.md").read_text()}


def test_results_md_has_the_tables_these_tests_read():
    res = _summary_rows(_results())
    assert {h for h, _ in res} == set(SUMMARY_HEADERS)
    labels = {lab for _, lab in res}
    assert "all rows" in labels and "fit rows (in-sample)" in labels
    assert any(lab.startswith("check rows") and lab.endswith("(held out)") for lab in labels)
    rows = _per_row()
    assert len(rows) > 80 and all(re.fullmatch(r"[+-]\d+\.\d|-", v["err"]) for v in rows.values())


def test_readme_summary_tables_are_rows_of_results_md():
    """README.md's summary tables are RESULTS.md's, row for row (a subset), and say in-sample vs held out."""
    res = _summary_rows(_results())
    quoted = _summary_rows(_readme_section())
    assert quoted, "README.md's fidelity section quotes no RESULTS.md summary table (first header cell one of " \
                   f"{SUMMARY_HEADERS})"
    wrong = {k: (v, res.get(k)) for k, v in quoted.items() if res.get(k) != v}
    assert not wrong, f"README.md summary rows that RESULTS.md does not hold (quoted, RESULTS.md): {wrong}"
    for header in SUMMARY_HEADERS:
        labels = [lab for h, lab in quoted if h == header]
        assert "fit rows (in-sample)" in labels, f"README.md's {header!r} table leaves out the in-sample line"
        assert any(lab.endswith("(held out)") for lab in labels), \
            f"README.md's {header!r} table leaves out the held-out line"


@pytest.mark.parametrize("where", list(_quoting_texts()))
def test_quoted_row_figures_match_results_md(where):
    text, rows = _quoting_texts()[where], _per_row()
    wrong = []
    for m in QUOTE.finditer(text):
        rid, err, loo = m.groups()
        if rid not in rows:
            wrong.append(f"`{rid}`: no such row in RESULTS.md")
            continue
        if err != rows[rid]["err"] or (loo is not None and loo != rows[rid]["loo"]):
            wrong.append(f"`{rid}` quoted {err}%" + (f" / {loo}%" if loo else "")
                         + f", RESULTS.md has {rows[rid]['err']}% / {rows[rid]['loo']}%")
    assert not wrong, f"{where}: " + "; ".join(wrong)


def test_readme_quotes_row_figures_in_the_checked_form():
    assert len(QUOTE.findall(_readme_section())) >= 10


@pytest.mark.parametrize("where", list(_quoting_texts()))
def test_no_signed_figure_without_its_row_id(where):
    """Outside the summary tables and the `row-id` quotes, no signed percentage: it could not be checked."""
    text = QUOTE.sub(" ", _quoting_texts()[where])
    text = "\n".join(line for line in text.splitlines() if not line.startswith("|"))
    loose = [text[max(0, m.start() - 60):m.end()].replace("\n", " ") for m in SIGNED_PCT.finditer(text)]
    assert not loose, (f"{where}: signed figures without a row id (quote them as `row-id` +x.x% [/ +y.y%], or point "
                       f"to RESULTS.md): {loose}")


def test_quoted_spearman_is_results_md():
    m = re.search(r"lowest\s+Spearman\s+rho\s+within\s+a\s+sweep\s+([+-]\d\.\d\d)", _readme_section(), re.I)
    assert m, "README.md's fidelity section no longer quotes the lowest within-sweep Spearman rho"
    r = re.search(r"Lowest Spearman rho \(tokens/s\) within a sweep: ([+-]\d\.\d\d)\.", _results())
    assert r and m.group(1) == r.group(1)


def test_compiler_readme_405b_anchor_is_what_llmc_computes_now():
    """The Llama 3 405B anchor (Llama 3 paper Table 4: TP8 PP16 DP128 on 16,384 H100, 8K, 16M tokens per step):
    `llmc plan` with those degrees pinned, and the generic profile at Interleaved 1F1B v4 with selective AC."""
    from llmc.compiler import timing
    from llmc.compiler.compile import compile_spec
    from llmc.compiler.hardware import get_gpu
    from llmc.compiler.plan import ParallelPlan
    from llmc.spec.load import loads_spec
    from llmc.spec.presets import PRESETS

    text = (ROOT / "llmc" / "compiler" / "README.md").read_text()
    plan_q = re.search(r"with those degrees pinned predicts ([0-9.]+) % MFU", text)
    generic_q = re.search(r"`generic` profile at v4 \(tests/test_timing.py\) ([0-9.]+) %", text)
    assert plan_q and generic_q, "llmc/compiler/README.md: the 405B anchor's two MFU figures are gone"

    spec = yaml.safe_load((ROOT / "examples" / "llama3_405b_h100x16384.yaml").read_text())
    spec["parallelism"] = {"dp_replicate": 1, "dp_shard": 128, "tp": 8, "pp": 16, "cp": 1}
    src = yaml.safe_dump(spec)
    run, lines = loads_spec(src, file="405b.yaml")
    c = compile_spec(run, "405b.yaml", lines, spec_bytes=src.encode())
    assert (c.plan.tp, c.plan.pp, c.plan.dp_shard) == (8, 16, 128)
    assert plan_q.group(1) == f"{100 * c.time.mfu:.1f}"

    sm = timing.step_model(PRESETS["llama3.1-405b"], 8192, "bf16", get_gpu("h100-sxm"))
    plan = ParallelPlan(tp=8, pp=16, cp=1, dp_shard=128, dp_replicate=1, micro_batch=1, grad_accum=16,
                        pp_schedule="Interleaved1F1B", pp_virtual_stages=4, activation_checkpointing="selective",
                        zero_stage=1)
    assert generic_q.group(1) == f"{100 * timing.step_time(sm, plan)[1]:.1f}"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_fidelity", ROOT / "scripts" / "bench_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_fidelity", mod)
    spec.loader.exec_module(mod)
    return mod


# a profile field's source (llmc/compiler/backends.py) that says the value was fitted on, or set with, rows
SET_ON_ROWS = re.compile(r"\bfitted\b|\bin view\b|\bon the benchmark\b", re.I)


def test_the_provenance_statement_names_every_factor_set_on_benchmark_rows():
    from llmc.compiler.backends import get_backend

    bf = _bench()
    listed = " ".join(what for what, *_ in bf.provenance())
    missing = []
    for name in sorted(set(bf.BACKEND_PROFILE.values()) - {"deepspeed"}):  # deepspeed: model states only
        for field, src in get_backend(name).sources.items():
            if SET_ON_ROWS.search(src) and f"{name} `{field}`" not in listed:
                missing.append(f"{name}.{field}")
    assert not missing, f"fitted / set-in-view factors missing from bench_fidelity.provenance(): {missing}"
    # the profiles whose check rows are reported apart are those whose sources say rows were in view
    in_view = {name for name in set(bf.BACKEND_PROFILE.values())
               if any(re.search(r"\bin view\b|\bon the benchmark\b", s) for s in get_backend(name).sources.values())}
    assert bf.PROFILES_SET_WITH_CHECK_ROWS_IN_VIEW == in_view
