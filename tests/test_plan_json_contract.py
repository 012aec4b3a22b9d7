"""`llmc plan --format json` as a CI contract: every failure is one JSON document on standard output with "ok": false
and every diagnostic (the same located lines on standard error); a valid spec's plan with errors (over budget,
nothing fits) is still reported in full and exits 1; success has "ok": true and a schema version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples/tiny_cpu.yaml"
L8B = "examples/llama3_8b_h100x8.yaml"
# what every diagnostic in a JSON document carries (Diagnostic.to_json)
DIAG_KEYS = {"code", "severity", "path", "line", "message", "hint"}


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def _doc(r) -> dict:
    """Standard output as exactly one JSON document (json.loads refuses anything before or after it)."""
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict) and isinstance(doc["ok"], bool) and doc["schema_version"] == 1, r.stdout[:500]
    for d in doc["diagnostics"]:
        assert set(d) == DIAG_KEYS, d
    return doc


def _codes(doc: dict) -> list[tuple[str, str]]:
    return [(d["code"], d["severity"]) for d in doc["diagnostics"]]


def _err_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def tiny_success() -> dict:
    r = _cli("plan", str(TINY), "-f", "json")
    assert r.returncode == 0, r.stderr
    return _doc(r)


def test_success_says_ok_and_its_schema_version(tiny_success):
    d = tiny_success
    assert d["ok"] is True and d["schema_version"] == 1 and d["llmc_version"]
    assert d["spec"]["path"] == str(TINY) and d["spec"]["name"] == "tiny-cpu" and d["plan"] is not None


def test_the_spec_key_calibration_that_cannot_be_read_is_a_json_error_at_its_line(tmp_path, tiny_success):
    """The reviewer's first case: `calibration: nope.json` in the spec printed nothing on standard output and named
    no line of the spec; it is now a JSON document with K007 located at the key's line, in both outputs."""
    body = TINY.read_text()
    spec = tmp_path / "cal.yaml"
    spec.write_text(body + "calibration: nope.json\n")
    shutil.copytree(TINY.parent / "tasks", tmp_path / "tasks")  # (its eval task file: a missing one is E009)
    line = len(body.splitlines()) + 1  # the appended key's line
    r = _cli("plan", "-f", "json", "cal.yaml", cwd=tmp_path)
    assert r.returncode == 1
    doc = _doc(r)
    assert doc["ok"] is False and "plan" not in doc  # uncalibrated numbers are not the plan that was asked for
    k007 = [d for d in doc["diagnostics"] if d["code"] == "K007"]
    assert len(k007) == 1 and k007[0]["line"] == line and k007[0]["path"] == "calibration", k007
    assert "nope.json" in k007[0]["message"] and "cannot read" in k007[0]["message"]
    # every diagnostic: the spec's own warnings are there as on success (it has no other error)
    (tmp_path / "ok.yaml").write_text(body)
    ok = _cli("plan", "-f", "json", "ok.yaml", cwd=tmp_path)
    assert ok.returncode == 0 and [c for c in _codes(doc) if c[0] != "K007"] == _codes(_doc(ok))
    # failure and success documents give `spec` the same shape
    assert set(doc["spec"]) == set(tiny_success["spec"]) and doc["spec"]["path"] == "cal.yaml"
    assert doc["spec"]["name"] == "tiny-cpu" and doc["spec"]["sha256"] == __import__("hashlib").sha256(
        spec.read_bytes()).hexdigest()
    err = _err_lines(r)
    assert len(err) == 1 and err[0].startswith(f"cal.yaml:{line}: error[K007] calibration: nope.json: cannot read")
    # an invalid calibration file behaves the same way
    (tmp_path / "nope.json").write_text('{"factors": 3}')
    r = _cli("plan", "-f", "json", "cal.yaml", cwd=tmp_path)
    doc = _doc(r)
    assert r.returncode == 1 and doc["ok"] is False
    assert [(d["code"], d["line"]) for d in doc["diagnostics"] if d["severity"] == "error"] == [("K007", line)]
    assert _err_lines(r)[0].startswith(f"cal.yaml:{line}: error[K007] calibration: nope.json: ")


@pytest.mark.parametrize("argv,code,stderr_start", [
    (["--set", "nonsense"], "S001", "--set 'nonsense': error[S001] expected key.path=value"),
    (["--diff", "nope.json"], "X001", "nope.json: error[X001] no such file: nope.json"),
    (["--calibration", "nope.json"], "K007", "nope.json: error[K007] calibration: cannot read: "),
    (["--set", "calibration=nope.json"], "K007", "--set calibration: error[K007] calibration: examples/nope.json: cannot read"),
    (["--set", "training.optimizer.lr=-1"], "S", "--set training.optimizer.lr: error[S"),
])
def test_option_errors_are_one_json_document(argv, code, stderr_start, tiny_success):
    """The reviewer's --set / --diff / --calibration cases printed nothing on standard output; each is now the
    failure document, and standard error keeps its one located line."""
    r = _cli("plan", "-f", "json", *argv, "examples/tiny_cpu.yaml")
    assert r.returncode == 1
    doc = _doc(r)
    errs = [d for d in doc["diagnostics"] if d["severity"] == "error"]
    assert doc["ok"] is False and len(errs) == 1 and errs[0]["code"].startswith(code), doc["diagnostics"]
    assert set(doc["spec"]) == set(tiny_success["spec"]) and doc["spec"]["path"] == "examples/tiny_cpu.yaml"
    # no plan from a spec that did not validate or a run that could not finish (a best-effort spec's numbers
    # are meaningless)
    assert "plan" not in doc and "cost" not in doc
    err = _err_lines(r)
    assert len(err) == 1 and err[0].startswith(stderr_start), err


def test_a_missing_spec_and_a_spec_on_stdin_are_documents_too(tiny_success):
    r = _cli("plan", "-f", "json", "no/such/spec.yaml")
    doc = _doc(r)
    assert r.returncode == 1 and doc["ok"] is False and _codes(doc) == [("S000", "error")]
    assert set(doc["spec"]) == set(tiny_success["spec"]) and doc["spec"]["path"] == "no/such/spec.yaml"
    assert doc["spec"]["sha256"] is None and doc["spec"]["resolved"] is None
    assert _err_lines(r) == ["no/such/spec.yaml: error[S000] spec file not found: no/such/spec.yaml (check the path)"]


@pytest.fixture(scope="module")
def budget_docs() -> tuple:
    """The reviewer's fourth case: the 8B example over a $12,000 budget, and the same at $20,000 (passes)."""
    over = _cli("plan", L8B, "--set", "budget.max_usd=12000", "-f", "json")
    ok = _cli("plan", L8B, "--set", "budget.max_usd=20000", "-f", "json")
    return over, ok


def test_a_budget_error_keeps_every_number_and_every_diagnostic(budget_docs):
    over, ok = budget_docs
    assert over.returncode == 1 and ok.returncode == 0, (over.stderr, ok.stderr)
    bad, good = _doc(over), _doc(ok)
    assert bad["ok"] is False and good["ok"] is True
    # the planned numbers are there, the same as the passing run's (the budget does not change the plan)
    for key in ("plan", "memory", "time", "cost", "compute", "model", "stages", "alternatives"):
        assert bad[key] == good[key] and bad[key] is not None, key
    cost = bad["cost"]
    assert cost["usd"] == pytest.approx(cost["gpu_hours"] * cost["usd_per_gpu_hour"]) and cost["usd"] > 12_000
    # every diagnostic: the passing run's warnings and infos, and the budget error
    assert _codes(bad) == [("B002", "error"), *_codes(good)]
    assert any(s == "warning" for _, s in _codes(good)) and any(s == "info" for _, s in _codes(good))
    b002 = bad["diagnostics"][0]
    assert b002["path"] == "budget.max_usd" and f"${cost['usd']:,.0f}" in b002["message"]
    assert [k for k in bad if k not in good] == [] and set(good) - set(bad) == set()
    assert bad["spec"]["overrides"] == ["budget.max_usd=12000"] and bad["spec"]["resolved"]["budget"]["max_usd"] == 12000
    err = _err_lines(over)
    assert len(err) == 1 and err[0].startswith("--set budget.max_usd: error[B002] budget.max_usd: predicted $")


def test_a_budget_error_prints_the_whole_text_report_and_the_error_line():
    over = _cli("plan", L8B, "--set", "budget.max_usd=12000")
    ok = _cli("plan", L8B, "--set", "budget.max_usd=20000")
    assert over.returncode == 1 and ok.returncode == 0
    for section in ("Parallelism plan", "Memory per GPU", "Time and cost", "Budget", "Diagnostics"):
        assert section in over.stdout, section
    assert "EXCEEDED" in over.stdout and "warning[T013]" in over.stdout and "info[D003]" in over.stdout
    # the report is the passing run's, but for the budget line and the error in its diagnostics
    import difflib

    changed = [ln for ln in difflib.ndiff(ok.stdout.splitlines(), over.stdout.splitlines()) if ln[:2] in ("- ", "+ ")]
    err = _err_lines(over)
    # (the budget row; the diagnostics' count; the header names the file's hash and counts the --set, the same in both)
    assert [ln for ln in changed if not ln[2:].lstrip().startswith(("max_usd ", "0 error(s)", "1 error(s)"))
            ] == ["+   " + err[0]] and len(changed) == 5, changed
    assert len(err) == 1 and "error[B002]" in err[0] and err[0] in over.stdout


P004 = "name: x\nmodel: llama3.1-405b\nhardware: {gpu: h100-sxm, count: 8}\ndata: {seq_len: 8192, tokens: 1T}\n"


def test_nothing_fits_reports_the_closest_layout(tmp_path):
    spec = tmp_path / "big.yaml"
    spec.write_text(P004)
    r = _cli("plan", str(spec), "-f", "json")
    assert r.returncode == 1
    doc = _doc(r)
    assert doc["ok"] is False and doc["plan"] is None and doc["unfit"] is not None
    # Llama 3.1 405B: 405B parameters (meta-llama/Llama-3.1-405B model card), far past 8 x 80 GB in bf16 alone
    assert 400e9 < doc["model"]["params_total"] < 410e9
    assert doc["unfit"]["memory"]["per_gpu_bytes"] > doc["unfit"]["memory"]["capacity_bytes"]
    assert ("P004", "error") in _codes(doc)
    errs = [d for d in doc["diagnostics"] if d["severity"] == "error"]
    assert [ln.split("error[")[1][:4] for ln in _err_lines(r)] == [d["code"] for d in errs]
    r = _cli("plan", str(spec))
    assert r.returncode == 1 and "Closest layout (does not fit)" in r.stdout and "error[P004]" in r.stderr


def test_a_best_effort_spec_is_never_reported_as_a_plan(tmp_path):
    """A spec with a schema error is compiled from its best-effort version for the independent checks, but its
    numbers are not the spec's: no plan in either output, only the diagnostics."""
    spec = tmp_path / "s.yaml"
    spec.write_text(P004 + "training: {optimizer: {lr: -1}}\n")
    r = _cli("plan", str(spec), "-f", "json")
    doc = _doc(r)
    assert r.returncode == 1 and doc["ok"] is False
    assert "plan" not in doc and "unfit" not in doc and doc["spec"]["resolved"] is None
    assert any(d["path"] == "training.optimizer.lr" for d in doc["diagnostics"]), doc["diagnostics"]
    r = _cli("plan", str(spec))
    assert r.returncode == 1 and r.stdout == ""


def test_build_still_writes_nothing_on_a_plan_error(tmp_path):
    out = tmp_path / "out"
    r = _cli("build", L8B, "--set", "budget.max_usd=12000", "-o", str(out))
    assert r.returncode == 1 and not out.exists()
    assert _err_lines(r) and all("error[" in ln for ln in _err_lines(r)) and r.stdout == ""


def test_an_internal_error_is_a_json_document_too(monkeypatch, capsys):
    """Whatever ends `llmc plan -f json` with exit 1 (here a bug) leaves one document on standard output; main still
    prints its error[INTERNAL] line."""
    import llmc.cli as cli
    import llmc.compiler.compile as compile_mod

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(compile_mod, "compile_loaded", boom)
    monkeypatch.delenv("LLMC_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["llmc", "plan", str(TINY), "--format", "json"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    assert e.value.code == 1
    doc = json.loads(out)
    assert doc["ok"] is False and _codes(doc) == [("INTERNAL", "error")] and "boom" in doc["diagnostics"][0]["message"]
    assert err.startswith("error[INTERNAL] RuntimeError: boom")


def test_the_typer_path_follows_the_same_contract():
    """`llmc plan` through typer (what an unusual spelling of the options gets, and the CliRunner tests)."""
    from llmc.cli import app

    r = CliRunner().invoke(app, ["plan", "--format=json", "--diff", "nope.json", str(TINY)])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and [c for c, s in _codes(doc) if s == "error"] == ["X001"]
    assert r.stderr.startswith("nope.json: error[X001]")
    # a --diff that succeeds says so too
    r = CliRunner().invoke(app, ["plan", "--format=json", "--diff", "tests/golden/build/tiny_cpu/plan.lock.json",
                                 str(TINY)])
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["ok"] is True and doc["schema_version"] == 1  # (every document has both)


def test_the_failure_documents_spec_hash_covers_the_overrides_however_the_spec_fails(tmp_path):
    """spec.sha256 hashes the file followed by the overrides (spec.file_sha256 the file alone) for a spec that is not
    even YAML as for one that fails validation: the same input, the same meaning."""
    import hashlib

    from llmc.overrides import override_bytes, parse_override

    sets = ["training.optimizer.lr=1"]
    for name, text in (("broken.yaml", "name: x\nmodel: [tiny\n"), ("invalid.yaml", "name: x\nmodel: 3\n")):
        f = tmp_path / name
        f.write_text(text)
        r = _cli("plan", str(f), "--format", "json", "--set", sets[0])
        doc = json.loads(r.stdout)["spec"]
        assert r.returncode == 1 and doc["overrides"] == sets, doc
        assert doc["file_sha256"] == hashlib.sha256(text.encode()).hexdigest()
        want = hashlib.sha256(text.encode() + override_bytes([parse_override(s) for s in sets])).hexdigest()
        assert doc["sha256"] == want, name
