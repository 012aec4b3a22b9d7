"""A build records the ``--set`` overrides it was made with and the spec file's own sha256 (the lock, every
artifact's header, the README with the command that reproduces the build); ``llmc launch`` warns (L009) when the
spec at the lock's path changed since the build, and says nothing for a spec that is gone or a lock of an older llmc.

Hashes are checked against ``hashlib`` over the file's bytes, the README's command by running it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from test_build_fakes import ROOT
from typer.testing import CliRunner

from llmc.cli import app
from llmc.compiler.compile import compile_loaded
from llmc.lockfile import check_lock
from llmc.overrides import parse_override, read_with_overrides
from llmc.spec.load import read_spec

SETS = ["data.tokens=40960", "training.checkpoint.interval_steps=5"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """The reviewer's layout: proj/specs/tiny_cpu.yaml, built into proj/build/tiny."""
    (tmp_path / "proj" / "specs").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "tiny_cpu.yaml", tmp_path / "proj" / "specs" / "tiny_cpu.yaml")
    if (ROOT / "examples" / "tasks").is_dir():  # its eval task, relative to the spec
        shutil.copytree(ROOT / "examples" / "tasks", tmp_path / "proj" / "specs" / "tasks")
    return tmp_path / "proj"


def _build(proj: Path, sets: list[str], monkeypatch) -> Path:
    monkeypatch.chdir(proj.parent)
    args = ["build", "proj/specs/tiny_cpu.yaml", "-o", "proj/build/tiny"]
    for s in sets:
        args += ["--set", s]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return proj / "build" / "tiny"


def test_loaded_spec_carries_overrides_and_file_hash(proj):
    spec = proj / "specs" / "tiny_cpu.yaml"
    loaded = read_with_overrides(spec, [parse_override(s) for s in SETS])
    assert loaded.ok and loaded.overrides == tuple(SETS)
    assert loaded.spec_file_sha256 == _sha(spec)
    # the combined bytes (what spec.sha256 hashes) are not the file's
    assert hashlib.sha256(loaded.spec_bytes).hexdigest() != _sha(spec)
    plain = read_spec(spec)
    assert plain.overrides == () and plain.spec_file_sha256 == _sha(spec)
    c = compile_loaded(loaded).compiled
    assert c.overrides == SETS and c.spec_file_sha256 == _sha(spec)
    assert c.spec_sha256 == hashlib.sha256(loaded.spec_bytes).hexdigest()


def test_lock_headers_and_readme_record_overrides(proj, monkeypatch):
    b = _build(proj, SETS, monkeypatch)
    file_sha = _sha(proj / "specs" / "tiny_cpu.yaml")
    lock = json.loads((b / "plan.lock.json").read_text())
    assert lock["spec"]["path"] == "../../specs/tiny_cpu.yaml"
    assert lock["spec"]["file_sha256"] == file_sha
    assert lock["spec"]["overrides"] == SETS
    combined = lock["spec"]["sha256"]
    assert combined != file_sha
    head = lock["_llmc"]
    assert head["spec_file_sha256"] == file_sha and head["overrides"] == SETS and head["spec_sha256"] == combined
    assert "override" in head["spec_sha256_of"]
    # every text artifact's header: the file's hash, the overrides and the combined hash labelled as such
    for name in (".gitignore", "native/launch.sh", "launch/slurm.sbatch", "README.md"):
        text = (b / name).read_text()
        assert f"spec file sha256: {file_sha}" in text, name
        assert "overrides: data.tokens=40960 training.checkpoint.interval_steps=5" in text, name
        assert f"spec + overrides sha256: {combined}" in text, name
        assert f"spec sha256: {combined}" not in text.replace(f"overrides sha256: {combined}", ""), name
    readme = (b / "README.md").read_text()
    assert f"(sha256 `{file_sha}`)" in readme  # "Built from <spec> (sha256 ...)": the file's own
    # no absolute path, user or host name in the build
    for name in ("README.md", "plan.lock.json", "native/launch.sh"):
        assert str(proj.parent) not in (b / name).read_text(), name


def _readme_command(readme: str) -> list[str]:
    m = re.search(r"^## Rebuild\n.*?^(`{3,})sh\n(.*?)\n\1$", readme, re.S | re.M)
    assert m, readme
    return shlex.split(m.group(2))


def test_readme_command_reproduces_the_build(proj, monkeypatch):
    b = _build(proj, SETS, monkeypatch)
    argv = _readme_command((b / "README.md").read_text())
    assert argv == ["llmc", "build", "../../specs/tiny_cpu.yaml", "-o", ".", "--set", SETS[0], "--set", SETS[1]]
    before = {p: (b / p).read_bytes() for p in ("plan.lock.json", "README.md", "native/launch.sh")}
    monkeypatch.chdir(b)  # the README's command, run where it says: the build directory
    r = CliRunner().invoke(app, argv[1:])
    assert r.exit_code == 0, r.output
    assert {p: (b / p).read_bytes() for p in before} == before
    assert json.loads(before["plan.lock.json"])["hyper"]["steps"] == 10  # 40960 tokens / (32 x 128) per step


def test_build_without_overrides(proj, monkeypatch):
    b = _build(proj, [], monkeypatch)
    file_sha = _sha(proj / "specs" / "tiny_cpu.yaml")
    lock = json.loads((b / "plan.lock.json").read_text())
    assert lock["spec"]["sha256"] == lock["spec"]["file_sha256"] == file_sha
    assert lock["spec"]["overrides"] == []
    # the other artifacts' headers are as before: one "spec sha256", the file's
    assert set(lock["_llmc"]) == {"generated_by", "llmc_version", "note", "spec_sha256", "target_versions"}
    text = (b / "native/launch.sh").read_text()
    assert f"# spec sha256: {file_sha}" in text and "overrides" not in text.split("\n\n")[0]
    assert _readme_command((b / "README.md").read_text()) == ["llmc", "build", "../../specs/tiny_cpu.yaml", "-o", "."]


def test_launch_warns_when_the_spec_changed(proj, monkeypatch):
    from llmc.launch import launch_commands, spec_change_warning

    b = _build(proj, SETS, monkeypatch)
    spec = proj / "specs" / "tiny_cpu.yaml"
    built_from = _sha(spec)
    assert spec_change_warning("proj/build/tiny") is None  # unchanged
    spec.write_text(spec.read_text().replace("lr: 3.0e-3", "lr: 0.1"))
    line = spec_change_warning("proj/build/tiny")
    assert line is not None and "\n" not in line
    assert line.startswith("proj/build/tiny: warning[L009] the spec proj/specs/tiny_cpu.yaml changed since this build")
    assert f"sha256 {_sha(spec)[:12]}, built from {built_from[:12]}" in line
    cmd = re.search(r"rebuild \(`([^`]*)`\)", line).group(1)
    assert shlex.split(cmd) == ["llmc", "build", "proj/specs/tiny_cpu.yaml", "-o", "proj/build/tiny",
                                "--set", SETS[0], "--set", SETS[1]]
    # from the build directory the paths are the ones that shell sees
    monkeypatch.chdir(b)
    assert "the spec ../../specs/tiny_cpu.yaml changed" in spec_change_warning(".")
    # a build copied alone to a node: no spec there, nothing to say
    spec.rename(spec.with_suffix(".moved"))
    assert spec_change_warning(".") is None
    spec.with_suffix(".moved").rename(spec)
    # a lock of the previous llmc (no file_sha256 / overrides): unknown, no warning, and it still launches
    lock = json.loads((b / "plan.lock.json").read_text())
    for key in ("file_sha256", "overrides"):
        del lock["spec"][key]
    for key in ("spec_file_sha256", "overrides", "spec_sha256_of"):
        del lock["_llmc"][key]
    check_lock(lock)  # an older lock is still a current one (the fields are optional: no schema bump)
    (b / "plan.lock.json").write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    assert spec_change_warning(".") is None
    assert [c.stage for c in launch_commands(".", backend="native", gpu=False)][0] == "prepare"


def test_launch_warns_for_a_build_without_overrides(proj, monkeypatch):
    from llmc.launch import spec_change_warning

    _build(proj, [], monkeypatch)
    spec = proj / "specs" / "tiny_cpu.yaml"
    spec.write_text(spec.read_text().replace("lr: 3.0e-3", "lr: 0.1"))
    line = spec_change_warning("proj/build/tiny")
    assert "warning[L009]" in line and "--set" not in line
    assert "(`llmc build proj/specs/tiny_cpu.yaml -o proj/build/tiny`)" in line


def test_cli_launch_prints_one_warning_line(proj, monkeypatch):
    b = _build(proj, SETS, monkeypatch)
    r = CliRunner().invoke(app, ["launch", "proj/build/tiny", "--backend", "native", "--dry-run"])
    assert r.exit_code == 0 and "warning[L009]" not in r.output, r.output
    spec = proj / "specs" / "tiny_cpu.yaml"
    spec.write_text(spec.read_text().replace("lr: 3.0e-3", "lr: 0.1"))
    r = CliRunner().invoke(app, ["launch", "proj/build/tiny", "--backend", "native", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert r.output.count("warning[L009]") == 1 and "+ " in r.output
    assert r.output.index("warning[L009]") < r.output.index("+ ")  # before the commands
    assert b.is_dir()


def test_plan_diff_names_the_overrides(proj, monkeypatch):
    from llmc.emit.lock import diff_lock

    b = _build(proj, SETS, monkeypatch)
    old = json.loads((b / "plan.lock.json").read_text())
    plain = compile_loaded(read_spec(proj / "specs" / "tiny_cpu.yaml")).compiled
    text = diff_lock(old, plain)
    assert "--set overrides data.tokens=40960 training.checkpoint.interval_steps=5 -> (none)" in text
    assert "data.tokens: 40960.0 -> 2048000.0" in text and "steps: 10 -> 500" in text  # why, and what it does
    # a lock of an older llmc records no overrides: nothing said about them
    del old["spec"]["overrides"]
    assert "--set overrides" not in diff_lock(old, plain)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to read the words back")
@pytest.mark.parametrize("word", ["../../specs/tiny_cpu.yaml", "my specs/a b.yaml", 'name="my run"', "it's",
                                  "é/ü.yaml", "tab\there", 'evil\n$(touch x)`touch y`\'";<!-- -->.yaml'])
def test_rebuild_command_words_read_back_exactly(word):
    import subprocess

    from llmc.emit.common import build_command

    cmd = build_command(word, "out dir", [f"name={word}"])
    assert "\n" not in cmd and "$(" not in cmd and "<!--" not in cmd
    # bash splits the command into the argv `llmc build` would get
    got = subprocess.run(["bash", "-c", "printf '%s\\0' " + cmd], capture_output=True, check=True).stdout
    assert got.split(b"\0")[:-1] == [w.encode() for w in ["llmc", "build", word, "-o", "out dir", "--set",
                                                          f"name={word}"]]


def test_a_spec_read_from_standard_input_gets_a_rebuild_command_that_reads_it_there(proj, monkeypatch):
    """`llmc build - -o DIR`: the README's command reads the spec on standard input again (a file named "-" does not
    exist), and its hash is the one recorded."""
    monkeypatch.chdir(proj / "specs")
    text = (proj / "specs" / "tiny_cpu.yaml").read_text()
    r = CliRunner().invoke(app, ["build", "-", "-o", "../build/stdin", "--set", SETS[0]], input=text)
    assert r.exit_code == 0, r.output
    readme = (proj / "build" / "stdin" / "README.md").read_text()
    # its relative paths resolve against the folder the build ran in: the command builds from there, into here
    cmd = f'b="$PWD" && cd ../../specs && llmc build - -o "$b" --set {SETS[0]} < SPEC'
    assert cmd in readme
    assert hashlib.sha256(text.encode()).hexdigest() in readme
    # run as printed from the build directory (SPEC: the spec's path from that folder), it rebuilds the same files
    import subprocess
    import sys

    py = f"{shlex.quote(sys.executable)} -m llmc.cli"
    r = subprocess.run(["bash", "-c", cmd.replace("llmc build", f"{py} build").replace("SPEC", "tiny_cpu.yaml")],
                       cwd=proj / "build" / "stdin", capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"wrote 0 of (\d+) files .*\(\1 unchanged\)", r.stdout + r.stderr), r.stdout + r.stderr


def test_a_spec_read_from_standard_input_is_recorded_as_such(proj, monkeypatch):
    """A stdin spec is recorded as "<stdin>" (not "<folder>/-"), its relative paths resolving against the directory it
    was built in (dir_from_build); the README and headers say "standard input"; a file named "-" there (or an older
    llmc's "<folder>/-" lock) gives no L009, which compared an unrelated file."""
    from llmc.launch import spec_change_warning
    from llmc.runtime.job import TrainJob

    monkeypatch.chdir(proj / "specs")
    text = (proj / "specs" / "tiny_cpu.yaml").read_text()
    r = CliRunner().invoke(app, ["build", "-", "-o", "../build/stdin"], input=text)
    assert r.exit_code == 0, r.output
    b = proj / "build" / "stdin"
    lock = json.loads((b / "plan.lock.json").read_text())
    assert lock["spec"]["path"] == "<stdin>" and lock["spec"]["dir_from_build"] == "../../specs"
    assert "# Spec: standard input  sha256: " in (b / "torchtitan" / "llmc_job.py").read_text()
    assert "Built from standard input (sha256 " in (b / "README.md").read_text()
    # the relative paths of the spec resolve against the folder it was built in, from wherever the build is launched
    monkeypatch.chdir(b)
    assert Path(TrainJob.from_lock(lock, build_dir=str(b)).spec_dir) == (proj / "specs").resolve()
    (proj / "specs" / "-").write_text("x: 1\n")
    (b / "-").write_text("x: 1\n")
    assert spec_change_warning(".") is None
    r = CliRunner().invoke(app, ["launch", ".", "--backend", "native", "--dry-run"])
    assert r.exit_code == 0 and "L009" not in r.output, r.output
    lock["spec"]["path"] = "../../specs/-"  # what an older llmc recorded
    (b / "plan.lock.json").write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    assert spec_change_warning(".") is None


def test_the_cluster_manifests_name_the_hashes_as_every_other_header(tmp_path, monkeypatch):
    """The SkyPilot task and the Kubeflow TrainJob (written from the lock) label the hashes of a build with overrides
    as the other headers do: the file's own, then the spec plus overrides'; an override holding a newline stays in its
    comment (both still parse as YAML)."""
    import yaml

    spec = ROOT / "examples" / "llama3_70b_h100x64.yaml"
    out = tmp_path / "b"
    # (a quoted value: unquoted, the "#x: y" line would be a YAML comment the value loses, which --set refuses)
    r = CliRunner().invoke(app, ["build", str(spec), "-o", str(out), "--set", "cluster.env.NCCL_DEBUG='ck\n#x: y'"])
    assert r.exit_code == 0, r.output
    lock = json.loads((out / "plan.lock.json").read_text())
    for rel in ("skypilot/task.yaml", "kubeflow/trainjob.yaml"):
        text = (out / rel).read_text()
        head = text.splitlines()[:5]
        assert f"# spec file sha256: {_sha(spec)}" in head and f"# spec + overrides sha256: {lock['spec']['sha256']}" in head
        assert not any(ln.startswith("# spec sha256") for ln in head) and "\n#x: y" not in text
        yaml.safe_load(text)


def test_a_build_made_with_no_fit_check_rebuilds_with_it(proj, monkeypatch):
    """A build whose plan does not fit the GPU (0.001 GiB of memory) exists only with --no-fit-check: its lock says
    so (``fit_check: false``) and its README's rebuild command carries the option, so that running the command
    reproduces the build; without the option the same command stops at P004."""
    monkeypatch.chdir(proj.parent)
    tight = "hardware.gpu_overrides.hbm_gib=0.001"
    args = ["build", "proj/specs/tiny_cpu.yaml", "-o", "proj/build/tiny", "--set", tight]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and "P004" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--no-fit-check"])
    assert r.exit_code == 0, r.output
    b = proj / "build" / "tiny"
    assert json.loads((b / "plan.lock.json").read_text())["fit_check"] is False
    argv = _readme_command((b / "README.md").read_text())
    assert argv == ["llmc", "build", "../../specs/tiny_cpu.yaml", "-o", ".", "--set", tight, "--no-fit-check"]
    before = {p: (b / p).read_bytes() for p in ("plan.lock.json", "README.md")}
    monkeypatch.chdir(b)
    r = CliRunner().invoke(app, argv[1:])
    assert r.exit_code == 0, r.output
    assert {p: (b / p).read_bytes() for p in before} == before
    assert json.loads(_build(proj, [], monkeypatch).joinpath("plan.lock.json").read_text())["fit_check"] is True


def test_l009_rebuild_command_carries_no_fit_check(proj, monkeypatch):
    """L009's rebuild command is the README's: a build made with --no-fit-check says so there too (without it the
    command stops at P004)."""
    from llmc.launch import spec_change_warning

    monkeypatch.chdir(proj.parent)
    tight = "hardware.gpu_overrides.hbm_gib=0.001"
    r = CliRunner().invoke(app, ["build", "proj/specs/tiny_cpu.yaml", "-o", "proj/build/tiny", "--set", tight,
                                 "--no-fit-check"])
    assert r.exit_code == 0, r.output
    spec = proj / "specs" / "tiny_cpu.yaml"
    spec.write_text(spec.read_text().replace("lr: 3.0e-3", "lr: 0.1"))
    cmd = re.search(r"rebuild \(`([^`]*)`\)", spec_change_warning("proj/build/tiny")).group(1)
    assert shlex.split(cmd) == ["llmc", "build", "proj/specs/tiny_cpu.yaml", "-o", "proj/build/tiny", "--set", tight,
                                "--no-fit-check"]
