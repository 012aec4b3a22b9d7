"""`llmc plan` through the CLI: exit codes, one-line errors, JSON keys, and no torch import."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmc.cli import app

runner = CliRunner()
EXAMPLES = sorted(glob.glob("examples/*.yaml"))
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", EXAMPLES, ids=[Path(p).stem for p in EXAMPLES])
def test_plan_examples_exit_zero(path):
    r = runner.invoke(app, ["plan", path])
    assert r.exit_code == 0, r.output
    assert "llmc plan:" in r.output and "Diagnostics" in r.output


def test_plan_json_has_required_keys():
    r = runner.invoke(app, ["plan", "examples/llama3_8b_h100x8.yaml", "--format", "json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    assert j["model"]["params_total"] == 8_030_261_248  # Llama-3-8B (meta-llama/Meta-Llama-3-8B config: 8.03B)
    assert j["plan"]["dp_replicate"] * j["plan"]["dp_shard"] * j["plan"]["tp"] * j["plan"]["pp"] * j["plan"]["cp"] == 8
    for key in ("step_seconds", "mfu", "days"):
        assert key in j["time"]
    assert {"gpu_hours", "usd"} <= set(j["cost"])
    assert {"per_gpu_bytes", "capacity_bytes"} <= set(j["memory"])


BAD = {
    # degrees whose product (16 x 8 x 64 = 8192) is not the GPU count (2048)
    "P001": "name: x\nmodel: llama3-8b\nhardware: {gpu: h100-sxm, count: 2048}\ndata: {seq_len: 4096, tokens: 1T}\n"
            "parallelism:\n  tp: 16\n  pp: 8\n  dp_shard: 64\n",
    "S007": "name: x\nmodel: llama3-8b\nhardware: {gpu: h100-sxn, count: 8}\ndata: {seq_len: 4096, tokens: 1T}\n",
    "P004": "name: x\nmodel: llama3.1-405b\nhardware: {gpu: h100-sxm, count: 8}\ndata: {seq_len: 8192, tokens: 1T}\n",
    "B003": "name: x\nmodel: llama3-8b\nhardware: {gpu: h100-sxm, count: 8}\ndata: {seq_len: 8192, tokens: 1T}\n"
            "budget: {max_days: 1}\n",
    "T005": "name: x\nmodel: llama3-8b\nhardware: {gpu: a100-80g, count: 8}\ndata: {seq_len: 8192, tokens: 1T}\n"
            "training: {precision: fp8}\n",
}
LINES = {"P001": 5, "S007": 3, "P004": 3, "B003": 5, "T005": 5}


@pytest.mark.parametrize("code", sorted(BAD))
def test_bad_spec_exits_one_with_located_one_line_errors(code, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(BAD[code])
    r = runner.invoke(app, ["plan", str(spec)])
    assert r.exit_code == 1
    out = r.stderr  # standard output has the report when a valid spec was planned (the errors in its Diagnostics)
    assert "Traceback" not in r.output
    lines = [ln for ln in out.splitlines() if f"error[{code}]" in ln]
    assert lines, out
    assert lines[0].startswith(f"{spec}:{LINES[code]}: error[{code}] ")
    # every line on standard error is a diagnostic line
    assert all(": error[" in ln for ln in out.splitlines() if ln.strip())


def test_bad_format_option():
    r = runner.invoke(app, ["plan", "examples/tiny_cpu.yaml", "--format", "yaml"])
    assert r.exit_code == 1 and "--format" in r.output


_NO_TORCH = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked: llmc plan must not import it")
sys.meta_path.insert(0, Block())
sys.argv = ["llmc", "plan", sys.argv[1], "--format", "json"]
from llmc.cli import main
try:
    main()
except SystemExit as e:
    assert e.code in (0, None), e.code
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch imported"
"""


@pytest.mark.parametrize("path", ["examples/tiny_cpu.yaml", "examples/llama3_405b_h100x16384.yaml"])
def test_plan_never_imports_torch(path):
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, path], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    json.loads(r.stdout)


@pytest.mark.parametrize("argv, expected", [
    (["plan", "s.yaml"], {"spec": "s.yaml"}),
    (["plan", "-f", "json", "s.yaml"], {"spec": "s.yaml", "format": "json"}),
    (["plan", "s.yaml", "--format=json", "--no-fit-check"], {"spec": "s.yaml", "format": "json", "no_fit_check": True}),
    (["plan", "s.yaml", "--set", "a=1", "--set=b=2"], {"spec": "s.yaml", "set_": ["a=1", "b=2"]}),
    (["plan", "-", "--diff", "l.json", "--calibration", "c.json"],
     {"spec": "-", "diff": "l.json", "calibration": "c.json"}),
    (["plan"], None), (["plan", "--help"], None), (["plan", "s.yaml", "t.yaml"], None),
    (["plan", "s.yaml", "-f"], None), (["plan", "s.yaml", "-fjson"], None), (["plan", "s.yaml", "--form", "json"], None),
    (["plan", "s.yaml", "-f", "json", "-f", "text"], None), (["plan", "s.yaml", "--set", "--no-fit-check"], None),
    (["plan", "--", "s.yaml"], None), (["build", "s.yaml"], None), ([], None),
])
def test_plan_argv_reads_only_what_typer_reads_the_same_way(argv, expected):
    from llmc.cli import _plan_argv

    got = _plan_argv(argv)
    if expected is None:
        assert got is None
        return
    full = {"spec": None, "format": "text", "diff": None, "set_": None, "no_fit_check": False, "calibration": None}
    full.update(expected)
    for key in ("spec", "diff", "calibration"):
        full[key] = Path(full[key]) if full[key] is not None else None
    assert got == full


_DIRECT = r"""
import sys
sys.argv = ["llmc", *sys.argv[1:]]
from llmc.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
assert "typer" not in sys.modules, "typer imported"
# pydantic's plugin loader (importlib.metadata + an entry-point scan, ~40 ms) is answered with no plugins
assert "importlib.metadata" not in sys.modules, "importlib.metadata imported"
sys.exit(code)
"""


@pytest.mark.parametrize("args", [
    ["plan", "examples/llama3_8b_h100x8.yaml"],
    ["plan", "examples/llama3_70b_h100x64.yaml", "-f", "json", "--set", "hardware.count=128"],
    ["plan", "examples/tiny_cpu.yaml", "--set", "bogus"],
    ["plan", "examples/llama3_8b_h100x8.yaml", "--format", "yaml"],
])
def test_plain_plan_runs_without_typer_and_prints_what_typer_prints(args):
    # `llmc plan SPEC [options]` skips typer (its import and command set-up are about a tenth of the cold start);
    # output, errors and exit code must be what the typer app gives
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}  # set, pydantic's own rule holds
    r = subprocess.run([sys.executable, "-c", _DIRECT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env)
    ref = runner.invoke(app, args)
    assert r.returncode == ref.exit_code, r.stderr[-2000:]
    assert r.stdout + r.stderr == ref.output


def _plan_json(*sets: str) -> dict:
    args = ["plan", "examples/llama3_8b_h100x8.yaml", "--format", "json", "--set", "budget.max_days=1000"]
    for s in sets:
        args += ["--set", s]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_fp8_recipe_is_named_and_reaches_the_timing():
    """The plan says which fp8 scaling it timed (the spec's, else the backend's default, or that the backend
    runs fp8 in bf16), and the recipe reaches the step time: mxfp8's extra cast work makes it slower than rowwise
    on the same B200 layout."""
    b200 = ("hardware.gpu=b200", "training.precision=fp8", "parallelism.tp=1", "parallelism.pp=1")
    mx = _plan_json(*b200, "training.fp8_recipe=mxfp8")
    row = _plan_json(*b200, "training.fp8_recipe=rowwise")
    dflt = _plan_json(*b200)
    assert mx["backend"]["fp8"] == "mxfp8 scaling" and row["backend"]["fp8"] == "rowwise scaling"
    assert dflt["backend"]["fp8"] == "rowwise scaling (torchtitan's default)"
    assert mx["plan"] == row["plan"] and mx["time"]["step_seconds"] != row["time"]["step_seconds"]
    native = _plan_json("training.precision=fp8", "training.backend=native")
    assert native["backend"]["fp8"] == "the native backend trains it in bf16 (timed as bf16)"
    assert _plan_json()["backend"]["fp8"] is None  # bf16


def test_fp8_recipe_the_backend_does_not_run_is_refused_in_the_plan():
    """T011 before any build: torchtitan 0.3.0 has no tensorwise converter (its Float8LinearConverter takes
    rowwise / rowwise_with_gw_hp), so a torchtitan plan pinned to tensorwise is an error located at the
    override; a backend that trains fp8 in bf16 runs no recipe and says so instead."""
    args = ["plan", "examples/llama3_8b_h100x8.yaml", "--set", "training.precision=fp8",
            "--set", "training.fp8_recipe=tensorwise"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    line = [x for x in r.stderr.splitlines() if "T011" in x]  # (standard output: the report, T011 in it too)
    assert len(line) == 1 and "training.fp8_recipe" in line[0] and "mxfp8 or rowwise" in line[0], r.output
    native = _plan_json("training.precision=fp8", "training.fp8_recipe=tensorwise", "training.backend=native")
    assert native["backend"]["fp8"].endswith("trains it in bf16 (timed as bf16)")


@pytest.mark.parametrize("argv,cmd", [
    (["launch", "build", "--nproc", "two"], "llmc launch"),  # a value of the wrong type
    (["plan", "examples/tiny_cpu.yaml", "--bogus"], "llmc plan"),  # an unknown option
    (["lanch", "build"], "llmc"),  # an unknown command
    (["report"], "llmc report"),  # a missing argument
])
def test_command_line_misuse_is_one_line_and_exit_1(argv, cmd):
    """click's usage errors (a boxed, multi-line message and exit 2) follow llmc's rule for bad input: one line
    naming the command, a hint, exit 1; `llmc` alone prints the help."""
    r = subprocess.run([sys.executable, "-m", "llmc.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(err) == 1, r.stderr
    assert err[0].startswith(f"{cmd}: error[CLI] ") and f"(see `{cmd} --help`)" in err[0], err
    r = subprocess.run([sys.executable, "-m", "llmc.cli"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Usage: llmc" in r.stdout and "plan" in r.stdout, r.stderr


@pytest.mark.parametrize("case", ["diff", "calibration", "set", "table"])
def test_inputs_nested_thousands_deep_are_one_located_line(case, tmp_path):
    """A --diff lock, a calibration file, a --set value or a measured table nested thousands of levels deep made the
    JSON / YAML readers overflow Python's recursion limit, which reached the user as error[INTERNAL]; each is now the
    reader's own located error (found by fuzzing the command line)."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "d.json").write_text(deep)
    (tmp_path / "tab.yaml").write_text("rows: " + "[" * 5000 + "]" * 5000)
    argv = {"diff": ["plan", "examples/tiny_cpu.yaml", "--diff", str(tmp_path / "d.json")],
            "calibration": ["plan", "examples/tiny_cpu.yaml", "--calibration", str(tmp_path / "d.json")],
            "set": ["plan", "examples/tiny_cpu.yaml", "--set", "training.seed=" + deep[99_000:101_000]],
            "table": ["calibrate", str(tmp_path / "tab.yaml"), "-o", str(tmp_path / "cal.json")]}[case]
    r = subprocess.run([sys.executable, "-m", "llmc.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = [ln for ln in (r.stdout + r.stderr).splitlines() if "error[" in ln]
    assert r.returncode == 1 and len(err) == 1 and "INTERNAL" not in err[0], r.stdout + r.stderr
    assert "nested too deeply" in err[0] and not (tmp_path / "cal.json").exists()


@pytest.mark.parametrize("special", ["fifo", "huge"])
@pytest.mark.parametrize("case", ["diff", "calibration", "spec_calibration", "table", "log"])
def test_inputs_that_are_not_plain_files_are_one_located_line(case, special, tmp_path):
    """A FIFO (no writer: reading it never ends) or a file past the size llmc reads (here a sparse 300 MB file,
    standing in for /dev/zero, which would be read until memory ran out), given where llmc expects a lock, a
    calibration, a measured table or a log: one located line and exit 1, at once."""
    f = tmp_path / ("in.csv" if case == "table" else "in.json")
    if special == "fifo":
        os.mkfifo(f)
    else:
        with open(f, "wb") as fh:
            fh.truncate(300 * 2**20)
    (tmp_path / "s.yaml").write_text((ROOT / "examples/tiny_cpu.yaml").read_text() + f"calibration: {f}\n")
    shutil.copytree(ROOT / "examples/tasks", tmp_path / "tasks")  # (its eval task file: a missing one is E009)
    argv = {"diff": ["plan", "examples/tiny_cpu.yaml", "--diff", str(f)],
            "calibration": ["plan", "examples/tiny_cpu.yaml", "--calibration", str(f)],
            "spec_calibration": ["plan", str(tmp_path / "s.yaml")],
            "table": ["calibrate", str(f), "-o", str(tmp_path / "cal.json")],
            "log": ["calibrate", str(f), "--lock", str(f), "-o", str(tmp_path / "cal.json")]}[case]
    r = subprocess.run([sys.executable, "-m", "llmc.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    err = [ln for ln in (r.stdout + r.stderr).splitlines() if "error[" in ln]
    assert r.returncode == 1 and len(err) == 1 and "INTERNAL" not in err[0], r.stdout + r.stderr
    # the spec's own calibration: key is located at its line in the spec, the message naming the file
    where = f"{tmp_path / 's.yaml'}:{len((ROOT / 'examples/tiny_cpu.yaml').read_text().splitlines()) + 1}: " \
        if case == "spec_calibration" else str(f)
    assert err[0].startswith(where) and str(f) in err[0], err[0]
    assert "not a regular file" in err[0] or "more than the" in err[0], err[0]
    assert not (tmp_path / "cal.json").exists()


@pytest.mark.parametrize("name", [".llmc-build.json", ".llmc-build.journal"])
def test_build_dir_bookkeeping_nested_thousands_deep_is_refused(name, tmp_path):
    """A build manifest or journal nested 100,000 deep (damaged, or hostile) overflowed the JSON reader's recursion
    (error[INTERNAL]); it is the build directory's own error, and the directory is left as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("[" * 100_000 + "]" * 100_000)
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "build", "examples/tiny_cpu.yaml", "-o", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    err = [ln for ln in (r.stdout + r.stderr).splitlines() if "error[" in ln]
    assert r.returncode == 1 and len(err) == 1 and "error[X010]" in err[0], r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == [name]


@pytest.mark.parametrize("argv,prefix", [
    (["--format", "xml"], "llmc plan: error[CLI] --format"),
    (["--set", "foo"], "--set 'foo': error[S001] "),
    (["--set", "a: b"], "--set 'a: b': error[S001] expected key.path=value"),  # a ': ' inside the option
    (["--set", "name.x=1"], "examples/tiny_cpu.yaml: error[S001] --set name.x: "),
])
def test_option_errors_are_located(argv, prefix):
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "plan", "examples/tiny_cpu.yaml", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(err) == 1 and err[0].startswith(prefix), r.stderr


@pytest.mark.parametrize("args", [["plan", "no\nsuch\x1b[31m.yaml"], ["launch", "no such\x1b[2J\nbuild", "--dry-run"]])
def test_an_error_naming_a_hostile_path_stays_one_inert_line(args):
    """A path holding a newline or a terminal escape sequence is printed escaped: one line, nothing for the terminal
    to act on, the path still recognisable."""
    r = subprocess.run([sys.executable, "-m", "llmc.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "\x1b" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert ascii(args[1])[1:-1] in lines[0]


def _cli(*args: str, cwd: Path = ROOT, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, input=stdin, env=env)


def test_the_readme_spec_plans():
    """The spec the README shows is one llmc plans (its batch a whole number of sequences)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```yaml", text.index("## A spec")) + len("```yaml")
    r = _cli("plan", "-", stdin=text[start:text.index("```", start)])
    assert r.returncode == 0 and " 0 error(s)" in r.stdout, r.stdout[-2000:] + r.stderr


TINY_SPEC = """\
name: x
model: tiny
hardware: {gpu: cpu, count: 1}
data:
  sources: [{name: python-docs, format: builtin}]
  tokenizer: {train: true, vocab_size: 2048}
  seq_len: 128
  tokens: 1M
training: {precision: fp32, global_batch_tokens: 4096}
"""


@pytest.mark.parametrize("text, args, where, code", [
    (TINY_SPEC.replace("count: 1}", "count: 1, gpu_overrides: {base: h100-sxmm}}"), (), "spec.yaml:3", "S007"),
    (TINY_SPEC.replace("count: 1}", "count: " + "9" * 5000 + "}"), (), "spec.yaml:3", "S002"),
    (TINY_SPEC, ("--set", "hardware.count=" + "9" * 5000), "--set hardware.count", "S001"),
])
def test_unknown_base_gpu_and_numbers_past_pythons_limit_are_located_errors(tmp_path, text, args, where, code):
    """A typo in gpu_overrides.base was a plan with no plan and exit 0 (build: INTERNAL); an integer of more than 4300
    digits, in the spec or in --set, was Python's conversion error. Each is one located line now."""
    (tmp_path / "spec.yaml").write_text(text)
    for cmd in (["plan", "spec.yaml"], ["build", "spec.yaml", "-o", str(tmp_path / "b")]):
        r = _cli(*cmd, *args, cwd=tmp_path)
        lines = r.stderr.splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stdout[-500:] + r.stderr
        assert lines[0].startswith(f"{where}: error[{code}]") and "INTERNAL" not in r.stderr, lines
    assert not (tmp_path / "b").exists()


def test_a_home_that_does_not_exist_is_just_a_missing_path(tmp_path):
    """``~nosuchuser/...``: expanduser raises where there is no such user; llmc treats it as a path not found."""
    (tmp_path / "spec.yaml").write_text(TINY_SPEC.replace("global_batch_tokens: 4096}",
                                                          "global_batch_tokens: 4096, init_hf: ~nosuchuser/ckpt}"))
    for cmd in (["plan", "spec.yaml"], ["build", "spec.yaml", "-o", str(tmp_path / "b")]):
        r = _cli(*cmd, cwd=tmp_path)
        assert r.returncode == 0 and "INTERNAL" not in r.stderr, r.stderr
    from types import SimpleNamespace

    from llmc.runtime.job import TrainJob

    assert TrainJob.resolve_path(SimpleNamespace(spec_dir="/s"), "~nosuchuser/ckpt") == Path("/s/~nosuchuser/ckpt")


def test_a_spec_on_stdin_takes_overrides_and_its_hash_covers_the_spec(tmp_path):
    """``llmc plan - --set ...`` reads standard input once; the lock's sha256 is the spec's with the overrides, the
    same as for the file."""
    (tmp_path / "spec.yaml").write_text(TINY_SPEC)
    piped = _cli("plan", "-", "--set", "training.optimizer.lr=0.002", "--format", "json", cwd=tmp_path,
                 stdin=TINY_SPEC)
    named = _cli("plan", "spec.yaml", "--set", "training.optimizer.lr=0.002", "--format", "json", cwd=tmp_path)
    assert piped.returncode == named.returncode == 0, piped.stderr + named.stderr
    a, b = json.loads(piped.stdout), json.loads(named.stdout)
    assert a["spec"]["sha256"] == b["spec"]["sha256"] != json.loads(
        _cli("plan", "spec.yaml", "--format", "json", cwd=tmp_path).stdout)["spec"]["sha256"]
    assert a["spec"]["resolved"]["training"]["optimizer"]["lr"] == 0.002


def test_calibrate_never_overwrites_an_input_or_a_file_it_did_not_write(tmp_path):
    table = tmp_path / "runs.yaml"
    table.write_text("rows: []\n")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    for out in (table, notes, tmp_path):
        r = _cli("calibrate", str(table), "-o", str(out))
        assert r.returncode == 1 and "error[K010]" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert table.read_text() == "rows: []\n" and notes.read_text() == '{"mine": true}\n'


def test_small_inputs_get_messages_that_say_what_is_wrong(tmp_path):
    """An empty eval task name, a spec that is YAML null, `launch` on a file, on an empty path or with an absurd
    --nproc, and a 900 KB name: each one line that names the actual problem (and a bounded line)."""
    (tmp_path / "et.yaml").write_text(TINY_SPEC + 'eval: {tasks: [""]}\n')
    (tmp_path / "null.yaml").write_text("null\n")
    (tmp_path / "long.yaml").write_text(TINY_SPEC.replace("name: x", "name: " + "x" * 900_000))
    b = tmp_path / "b"
    assert _cli("build", "null.yaml", cwd=tmp_path).returncode == 1
    assert _cli("build", str(ROOT / "examples/tiny_cpu.yaml"), "-o", str(b)).returncode == 0
    cases = [(("plan", "et.yaml"), "eval.tasks.0: must not be empty"),
             (("plan", "null.yaml"), "a spec must be a YAML mapping (got null)"),
             (("launch", "null.yaml", "--dry-run"), "not a directory: give the build directory"),
             (("launch", "", "--dry-run"), "no build directory given"),
             (("launch", str(b), "--dry-run", "--nproc", "99999999999999999999"), "--nproc must be 1 to 1024"),
             (("plan", "long.yaml"), "characters cut")]
    for args, says in cases:
        r = _cli(*args, cwd=tmp_path)
        lines = r.stderr.splitlines()
        assert r.returncode == 1 and len(lines) == 1 and says in lines[0] and len(lines[0]) < 2200, (args, r.stderr[:500])


def test_one_section_checks_still_run_when_a_required_section_is_missing(tmp_path):
    """Without `data` no best-effort spec exists; the unknown GPU and the unknown init_from are still reported
    (every error at once), and `--format json` gives the errors as one JSON document on standard output."""
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nmodel: llama3-8b\nhardware: {gpu: h1000, count: 8}\nstages:\n"
                    "  - {name: base, kind: pretrain}\n  - {name: sft, kind: sft, init_from: bsae}\n")
    r = runner.invoke(app, ["plan", str(spec), "--format", "json"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["spec"]["path"] == str(spec)
    got = [(d["code"], d["path"], d["line"]) for d in doc["diagnostics"]]
    assert got == [("S003", "data", 1), ("S007", "hardware.gpu", 3), ("G003", "stages.1.init_from", 6)]
    assert [ln.split("error[")[1][:4] for ln in r.stderr.splitlines()] == ["S003", "S007", "G003"]
    # a custom GPU the section's own overrides define is not unknown
    spec.write_text("name: t\nmodel: llama3-8b\n"
                    "hardware: {gpu: my-gpu, count: 8, gpu_overrides: {base: h100-sxm, hbm_gib: 100}}\n")
    r = runner.invoke(app, ["plan", str(spec)])
    assert r.exit_code == 1 and "S007" not in r.output and "error[S003] data:" in r.output


def test_overrides_get_every_error_at_once_each_naming_its_override():
    """A schema error from one --set no longer hides the compiler's error from another; the compiler's error about
    an overridden value names the override, not the file line holding the old value; serving targets on the
    training GPU add no second error for the same unknown GPU."""
    r = runner.invoke(app, ["plan", "examples/llama3_8b_h100x8.yaml", "--set", "hardware.gpu=h1000",
                            "--set", "training.bogus=1"])
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines == [
        "--set training.bogus: error[S001] training.bogus: unknown key 'bogus' (valid keys: backend, checkpoint, "
        "compile, fp8_recipe, global_batch_tokens, grad_clip, init_hf, log_every, loss_spike, nvfp4_bf16_tail, optimizer, "
        "precision, "
        "schedule, seed, steps, z_loss)",
        "--set hardware.gpu: error[S007] hardware.gpu: unknown GPU type 'h1000' (did you mean 'h800'?)"], r.output


def test_a_pipeline_without_pretraining_reports_no_compute_of_its_own():
    """The text report shows no Compute section for a pipeline that starts from a trained base; the JSON said
    8.7e23 training FLOPs for the top-level data no stage trains on. Now it says null, like plan / time / cost, and
    the stages carry their own numbers."""
    r = runner.invoke(app, ["plan", "examples/pipeline_llama3_8b.yaml", "--format", "json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert [s["kind"] for s in j["spec"]["resolved"]["stages"] if s["kind"] == "pretrain"] == []
    assert j["compute"] is None and j["plan"] is None and j["time"] is None
    assert j["pipeline"]["gpu_hours"] > 0 and all(s["time"]["gpu_hours"] > 0 for s in j["stages"])
    r = runner.invoke(app, ["plan", "examples/llama3_8b_h100x8.yaml", "--format", "json"])
    assert json.loads(r.stdout)["compute"]["training_flops"] > 0


def test_plan_json_days_include_the_checkpoint_saves():
    r = runner.invoke(app, ["plan", "examples/llama3_8b_h100x8.yaml", "--format", "json",
                            "--set", "training.checkpoint.write_gbps=4", "--set", "training.checkpoint.interval_steps=100"])
    assert r.exit_code == 0, r.output
    t = json.loads(r.output)["time"]
    ck = t["checkpoint"]
    # 39,340 steps, a save every 100: 394; each 12 B x 8,030,261,248 params over one node at 4 GB/s
    assert (ck["saves"], ck["interval"], ck["mode"]) == (394, 100, "sync")
    assert ck["write_source"] == "training.checkpoint.write_gbps"
    assert ck["total_seconds"] == pytest.approx(394 * 12 * 8_030_261_248 / 4e9)
    assert t["days"] == pytest.approx((39_340 * t["step_seconds"] + 394 * 12 * 8_030_261_248 / 4e9) / 86400)
