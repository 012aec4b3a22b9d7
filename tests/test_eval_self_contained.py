"""A committed build carries its local eval task files: ``llmc build`` copies each local task file of ``eval.tasks``
and the local files it reads into ``eval/tasks/``, records their sha256 in the lock and eval/tasks.json, and the
eval step reads the copies (never the spec's folder) and refuses one whose bytes changed since the build.

Expected figures come from the source files themselves (hashlib over their bytes), never from llmc's output.
One real launch (slow): a copy of the build alone, away from the spec, scores all 24 documents of the example task.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from test_build_fakes import ROOT
from typer.testing import CliRunner

from llmc.cli import app

SETS = ["--set", "data.tokens=40960", "--set", "training.checkpoint.interval_steps=5",
        "--set", "eval.validation.every_steps=5"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _proj(root: Path) -> Path:
    """A project folder ``root/specs`` holding a copy of examples/ (tiny_cpu.yaml, tasks/)."""
    shutil.copytree(ROOT / "examples", root / "specs")
    return root / "specs"


def _build(spec: Path, out: Path, *extra: str, cwd: Path | None = None) -> str:
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        r = CliRunner().invoke(app, ["build", str(spec), "-o", str(out), *SETS, *extra])
    finally:
        os.chdir(old)
    assert r.exit_code == 0, r.output
    return r.output


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_build_copies_the_task_files_and_records_their_sha256(tmp_path):
    specs = _proj(tmp_path / "proj")
    out = tmp_path / "proj" / "build" / "tiny"
    _build(specs / "tiny_cpu.yaml", out)
    src = {"pydoc_mc.yaml": specs / "tasks" / "pydoc_mc.yaml", "pydoc_mc.jsonl": specs / "tasks" / "pydoc_mc.jsonl"}
    for name, p in src.items():  # byte for byte
        assert (out / "eval" / "tasks" / "pydoc_mc" / name).read_bytes() == p.read_bytes()
    want = {f"eval/tasks/pydoc_mc/{name}": _sha(p) for name, p in src.items()}
    lock = json.loads((out / "plan.lock.json").read_text())
    rec = lock["evaluation"]["tasks"]["task_files"]
    assert rec == {"tasks/pydoc_mc.yaml": {"path": "eval/tasks/pydoc_mc/pydoc_mc.yaml", "files": want}}
    doc = json.loads((out / "eval" / "tasks.json").read_text())
    assert doc["task_files"] == rec and "spec_dir" not in doc
    cmd = doc["lm_eval_commands"]["pretrain"]
    assert "--include_path eval/tasks/pydoc_mc" in cmd and "../" not in cmd  # relative to the build, inside it
    manifest = json.loads((out / ".llmc-build.json").read_text())["files"]  # owned build files like the others
    assert {k: manifest[k] for k in want} == want
    assert "eval/tasks/pydoc_mc/pydoc_mc.jsonl" in (out / "README.md").read_text()


def test_the_build_is_the_same_from_any_folder_cwd_and_output_path(tmp_path):
    a, b = _proj(tmp_path / "one" / "proj"), _proj(tmp_path / "two" / "deeper" / "proj")
    _build(a / "tiny_cpu.yaml", a.parent / "build" / "tiny", cwd=tmp_path)
    _build(Path(os.path.relpath(b / "tiny_cpu.yaml", b.parent)), Path("build/tiny"), cwd=b.parent)
    ta, tb = _tree(a.parent / "build" / "tiny"), _tree(b.parent / "build" / "tiny")
    assert ta == tb and "eval/tasks/pydoc_mc/pydoc_mc.jsonl" in ta
    # another output folder: the lock's spec path moves with it, the copies and their records do not
    _build(a / "tiny_cpu.yaml", tmp_path / "elsewhere" / "x" / "tiny", cwd=tmp_path)
    tc = _tree(tmp_path / "elsewhere" / "x" / "tiny")
    assert {k: v for k, v in tc.items() if k.startswith("eval/tasks/")} == \
        {k: v for k, v in ta.items() if k.startswith("eval/tasks/")}
    rec = [json.loads(t["plan.lock.json"])["evaluation"]["tasks"]["task_files"] for t in (ta, tc)]
    assert rec[0] == rec[1]


def test_a_changed_eval_set_changes_the_build_and_its_lock(tmp_path):
    """Cutting the data file to 12 lines after a build: the rebuild rewrites the owned copy and the lock's sha256."""
    specs = _proj(tmp_path / "proj")
    out = tmp_path / "proj" / "build" / "tiny"
    _build(specs / "tiny_cpu.yaml", out)
    before = json.loads((out / "plan.lock.json").read_text())["evaluation"]["tasks"]["task_files"]
    data = specs / "tasks" / "pydoc_mc.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:12]))
    _build(specs / "tiny_cpu.yaml", out)
    after = json.loads((out / "plan.lock.json").read_text())["evaluation"]["tasks"]["task_files"]
    key = "eval/tasks/pydoc_mc/pydoc_mc.jsonl"
    assert before["tasks/pydoc_mc.yaml"]["files"][key] != after["tasks/pydoc_mc.yaml"]["files"][key] == _sha(data)
    assert (out / key).read_bytes() == data.read_bytes()
    assert len((out / key).read_text().splitlines()) == 12


def _eval_main(out: Path, capsys) -> tuple[int, str]:
    from llmc.runtime import evaluate

    (out / "run" / "pretrain" / "hf").mkdir(parents=True, exist_ok=True)
    (out / "run" / "pretrain" / "hf" / "config.json").write_text("{}")
    rc = evaluate.main(["--lock", str(out / "plan.lock.json"), "--stage", "pretrain", "--out",
                        str(out / "run" / "pretrain")])
    return rc, capsys.readouterr().err


def test_the_eval_step_refuses_a_copy_changed_or_missing_since_the_build(tmp_path, capsys):
    specs = _proj(tmp_path / "proj")
    out = tmp_path / "proj" / "build" / "tiny"
    _build(specs / "tiny_cpu.yaml", out)
    copy = out / "eval" / "tasks" / "pydoc_mc" / "pydoc_mc.jsonl"
    copy.write_text("".join(copy.read_text().splitlines(keepends=True)[:12]))
    rc, err = _eval_main(out, capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"{copy}: error[R003] eval pretrain: ") and "changed since `llmc build`" in lines[0]
    assert "rebuild" in lines[0] and not (out / "run" / "pretrain" / "eval").exists()
    copy.unlink()
    rc, err = _eval_main(out, capsys)
    assert rc == 1 and err.startswith(f"{copy}: error[R003]") and "missing from the build" in err


def test_the_eval_step_reads_the_copies_not_the_spec_folder(tmp_path):
    """Only the build, away from the spec: the task paths lm_eval gets lie in the build and its data_files are read
    from the build's copy (llmc.runtime.evaluate.resolve_tasks rewrites them absolute)."""
    import yaml

    from llmc.runtime.evaluate import lock_tasks, resolve_tasks

    specs = _proj(tmp_path / "proj")
    _build(specs / "tiny_cpu.yaml", tmp_path / "proj" / "build" / "tiny")
    node = tmp_path / "node" / "tiny"
    shutil.copytree(tmp_path / "proj" / "build" / "tiny", node)
    shutil.rmtree(tmp_path / "proj")
    plan = json.loads((node / "plan.lock.json").read_text())["evaluation"]["tasks"]
    job = type("Job", (), {"resolve_path": lambda self, p: pytest.fail(f"read {p} from the spec's folder")})()
    tasks = lock_tasks(plan, job, node)
    assert tasks == (str((node / "eval/tasks/pydoc_mc/pydoc_mc.yaml").resolve()),)
    res = resolve_tasks(tasks, tmp_path / "work")
    assert res.names == ["pydoc_mc"]
    doc = yaml.safe_load((Path(res.include[0]) / "pydoc_mc.yaml").read_text())
    assert doc["dataset_kwargs"]["data_files"]["test"] == str((node / "eval/tasks/pydoc_mc/pydoc_mc.jsonl").resolve())
    # a local task file the build has no copy of (unreadable at build: E009) is refused, not looked for elsewhere
    with pytest.raises(FileNotFoundError, match="no copy in the build"):
        lock_tasks({**plan, "tasks": ["tasks/other.yaml"]}, job, node)


def test_what_a_task_file_reads_is_copied_with_its_layout(tmp_path):
    """data_files up a folder (and a pattern), include: files, a !function module, a group file's member task files
    (found by name in its folder, as lm_eval indexes it); absolute data_files stay where they are."""
    from llmc.spec.facts import read_eval_task

    s = tmp_path / "specs"
    (s / "tasks" / "sub").mkdir(parents=True)
    (s / "data").mkdir()
    (s / "data" / "a.jsonl").write_text('{"q": 1}\n')
    (s / "data" / "b.jsonl").write_text('{"q": 2}\n')
    (s / "data" / "c.txt").write_text("not matched\n")
    (tmp_path / "abs.jsonl").write_text("{}\n")
    (s / "tasks" / "base.yaml").write_text("output_type: multiple_choice\n")
    (s / "tasks" / "utils.py").write_text("def process(d):\n    return d\n")
    (s / "tasks" / "t.yaml").write_text(
        "task: t\ninclude: base.yaml\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {{test: ../data/*.jsonl, train: {tmp_path / 'abs.jsonl'}}}\n"
        "process_docs: !function utils.process\n")
    (s / "tasks" / "sub" / "m.yaml").write_text("task: member\ndataset_path: json\n"
                                                "dataset_kwargs: {data_files: {test: m.jsonl}}\n")
    (s / "tasks" / "sub" / "m.jsonl").write_text("{}\n")
    (s / "tasks" / "sub" / "unrelated.yaml").write_text("task: unrelated\n")
    (s / "tasks" / "g.yml").write_text("group: g\ntask: [member, hellaswag]\n")
    f = read_eval_task("tasks/t.yaml", s)
    assert f.name == "t" and f.problem is None and f.main == "tasks/t.yaml"
    got = {x.rel: x for x in f.files}
    want = {"tasks/t.yaml": s / "tasks/t.yaml", "tasks/base.yaml": s / "tasks/base.yaml",
            "tasks/utils.py": s / "tasks/utils.py", "data/a.jsonl": s / "data/a.jsonl", "data/b.jsonl": s / "data/b.jsonl"}
    assert set(got) == set(want)
    for rel, p in want.items():
        assert got[rel].data == p.read_bytes() and got[rel].sha256 == _sha(p)
    g = read_eval_task("tasks/g.yml", s)
    assert g.name == "g" and g.main == "g.yml" and {x.rel for x in g.files} == {"g.yml", "sub/m.yaml", "sub/m.jsonl"}
    (s / "data" / "a.jsonl").unlink()
    (s / "data" / "b.jsonl").unlink()
    bad = read_eval_task("tasks/t.yaml", s)
    assert bad.name == "t" and not bad.files and "matches no file" in bad.problem


def test_a_missing_data_file_is_e009_and_gets_no_copy(tmp_path):
    from llmc.compiler.compile import compile_spec
    from llmc.spec.facts import gather_facts
    from llmc.spec.load import load_spec

    specs = _proj(tmp_path / "proj")
    (specs / "tasks" / "pydoc_mc.jsonl").unlink()
    run, lines = load_spec(specs / "tiny_cpu.yaml")
    c = compile_spec(run, str(specs / "tiny_cpu.yaml"), lines, spec_bytes=b"", facts=gather_facts(run, specs))
    e009 = [d for d in c.diagnostics if d.code == "E009"]
    assert len(e009) == 1 and "pydoc_mc.jsonl" in e009[0].message and "does not exist" in e009[0].message
    assert c.evaluation.tasks.names == ["pydoc_mc"] and c.evaluation.tasks.task_files == {}
    assert not c.evaluation.tasks.copies
    # an error: `llmc build` refuses it, located on the task's line, rather than training a run whose eval step fails
    assert e009[0].severity == "error"
    out = tmp_path / "proj" / "build" / "tiny"
    r = CliRunner().invoke(app, ["build", str(specs / "tiny_cpu.yaml"), "-o", str(out), *SETS])
    assert r.exit_code == 1 and "error[E009]" in r.output and "eval.tasks.0" in r.output, r.output
    assert not (out / "plan.lock.json").exists()


def test_large_copies_warn_x014_and_are_still_copied(tmp_path):
    from llmc.emit.evaluation import LARGE_COPIES

    specs = _proj(tmp_path / "proj")
    data = specs / "tasks" / "pydoc_mc.jsonl"
    line = data.read_text().splitlines(keepends=True)[0]
    small = _build(specs / "tiny_cpu.yaml", tmp_path / "b1")
    assert "X014" not in small
    data.write_text(line * (LARGE_COPIES // len(line) + 1))
    assert data.stat().st_size > LARGE_COPIES == 16 * 2**20
    out = _build(specs / "tiny_cpu.yaml", tmp_path / "b2")
    warn = [ln for ln in out.splitlines() if "warning[X014]" in ln]
    assert len(warn) == 1 and "16" in warn[0], out
    assert (tmp_path / "b2" / "eval" / "tasks" / "pydoc_mc" / "pydoc_mc.jsonl").read_bytes() == data.read_bytes()


def _group_project(root: Path) -> Path:
    """A group task file (grp.yaml: group mygrp over mc_x) whose member reads a relative data file, beside the spec,
    and a virtual environment holding a task file of the same name (a venv next to a spec is common)."""
    g = root / "g"
    g.mkdir()
    shutil.copy(ROOT / "examples/tasks/pydoc_mc.jsonl", g)
    (g / "mc_x.yaml").write_text((ROOT / "examples/tasks/pydoc_mc.yaml").read_text().replace(
        "task: pydoc_mc", "task: mc_x"))
    (g / "grp.yaml").write_text("group: mygrp\ntask:\n  - mc_x\naggregate_metric_list:\n  - metric: acc\n")
    (g / ".venv" / "tasks").mkdir(parents=True)
    (g / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (g / ".venv" / "tasks" / "mc_x.yaml").write_text("task: mc_x\n")
    spec = g / "spec.yaml"
    spec.write_text((ROOT / "examples/tiny_cpu.yaml").read_text().replace(
        "tasks: [tasks/pydoc_mc.yaml]", "tasks: [grp.yaml]"))
    assert "grp.yaml" in spec.read_text()
    return spec


def test_a_group_rebuilt_beside_its_build_copies_the_same_files(tmp_path):
    """A build beside the group file (its earlier copies) and a virtual environment there are not members: building
    twice into the folder gives the same copies, not a copy of the last build nested in the next."""
    spec = _group_project(tmp_path)
    out = spec.parent / "build"
    _build(spec, out)
    first = _tree(out / "eval")
    _build(spec, out)
    assert _tree(out / "eval") == first
    assert sorted(first) == ["tasks.json", "tasks/grp/grp.yaml", "tasks/grp/mc_x.yaml", "tasks/grp/pydoc_mc.jsonl"]


def test_a_groups_members_read_their_data_from_the_copies(tmp_path):
    """lm_eval loads the copied group through the eval step's resolution from any working directory: its member's
    relative data_files (read from the working directory by lm_eval itself) are made absolute in the eval step's copy,
    and the member's 24 documents load."""
    from lm_eval.tasks import TaskManager

    from llmc.runtime.evaluate import resolve_tasks

    spec = _group_project(tmp_path)
    out = tmp_path / "b"
    _build(spec, out)
    r = resolve_tasks((str(out / "eval/tasks/grp/grp.yaml"),), tmp_path / "work")
    assert r.names == ["mygrp"] and r.builtin
    loaded = TaskManager(include_path=r.include).load(r.names)
    tasks = [t for t in _leaves(loaded) if hasattr(t, "test_docs")]
    assert len(tasks) == 1 and tasks[0].config.task == "mc_x" and len(list(tasks[0].test_docs())) == 24


def _leaves(d):
    for v in (d.values() if isinstance(d, dict) else [d]):
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


@pytest.mark.slow
def test_a_copy_of_the_build_alone_launches_and_scores_every_document(tmp_path):
    """The reviewer's run: build in one folder, copy only the build elsewhere, ``llmc launch`` it (10 steps of
    tiny_cpu): the eval step reads the build's copy of the task and scores all 24 documents."""
    import subprocess

    specs = _proj(tmp_path / "proj")
    _build(specs / "tiny_cpu.yaml", tmp_path / "proj" / "build" / "tiny")
    node = tmp_path / "onlybuild" / "n1" / "tiny"
    shutil.copytree(tmp_path / "proj" / "build" / "tiny", node)
    shutil.rmtree(tmp_path / "proj" / "specs")  # nothing of the spec's folder is left to read
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "launch", str(node)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    summary = json.loads((node / "run" / "pretrain" / "eval" / "summary.json").read_text())
    n = len((node / "eval" / "tasks" / "pydoc_mc" / "pydoc_mc.jsonl").read_text().splitlines())
    assert n == 24 and summary["samples"]["pydoc_mc"] == n and 0 <= summary["tasks"]["pydoc_mc"]["acc"] <= 1

    # the eval set changes (the task file cut to its first 6 items) and the build is rebuilt from the same spec:
    # the finished stage is not trained again, its eval is scored again on 6 documents, the 24-document results
    # set aside (not deleted), said in one line; unchanged, a relaunch skips it
    specs = _proj(tmp_path / "proj")
    data = specs / "tasks" / "pydoc_mc.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:6]))
    _build(specs / "tiny_cpu.yaml", node)
    launch = [sys.executable, "-m", "llmc.cli", "launch", str(node)]
    r = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "pretrain: skipped: stage 'pretrain' already finished" in r.stdout
    assert "pretrain: evaluated again: the task files' bytes changed since it was scored" in r.stdout
    run = node / "run" / "pretrain"
    assert json.loads((run / "eval" / "summary.json").read_text())["samples"]["pydoc_mc"] == 6
    assert json.loads((run / "eval.set-aside-1" / "summary.json").read_text())["samples"]["pydoc_mc"] == 24
    r = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "pretrain: skipped: stage 'pretrain' already evaluated" in r.stdout
    # an eval that fails after the stage trained says so (not "stage failed"): a copy edited since the build
    copy = node / "eval" / "tasks" / "pydoc_mc" / "pydoc_mc.jsonl"
    copy.write_text(copy.read_text() + copy.read_text().splitlines(keepends=True)[0])
    shutil.rmtree(run / "eval")
    r = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1 and "error[L002] stage 'pretrain' trained; its eval failed (exit 1)" in r.stderr, r.stderr


@pytest.mark.slow
def test_launch_refuses_an_unknown_registered_task_before_training(tmp_path):
    """eval.tasks names a task lm-evaluation-harness does not know: `llmc plan` stays quiet (it reads no lm_eval),
    `llmc launch` checks the name against lm_eval's own task index before prepare and refuses it in one line with
    the closest known names (difflib over that index), training nothing."""
    import difflib
    import subprocess

    from lm_eval.tasks import TaskManager

    specs = _proj(tmp_path / "proj")
    out = tmp_path / "b"
    _build(specs / "tiny_cpu.yaml", out, "--set", "training.steps=3", "--set", "eval.tasks=[hellaswagg]")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "LLMC_FORCE_CPU": "1"}
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "launch", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    lines = [ln for ln in r.stderr.splitlines() if "error[" in ln]
    assert r.returncode == 1 and len(lines) == 1 and "error[L016]" in lines[0] and "'hellaswagg'" in lines[0], r.stderr
    close = difflib.get_close_matches("hellaswagg", TaskManager().all_tasks, n=3, cutoff=0.6)
    assert close[0] == "hellaswag" and f"did you mean {' or '.join(repr(n) for n in close)}?" in lines[0]
    assert not (out / "run" / "pretrain").exists()  # nothing trained


def test_a_dataset_not_in_the_cache_is_one_located_line(tmp_path, capsys):
    """The eval step runs offline: a task whose hub dataset is not in the local cache ends in one R017 line with
    the hint (pre-cache it with `datasets`, or a local task file), not datasets' ConnectionError traceback."""
    pytest.importorskip("lm_eval")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_evaluate import TASK_YAML, _eval_lock, make_model

    from llmc.runtime import evaluate

    _, path = _eval_lock(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        TASK_YAML.format(data="x.jsonl").replace("dataset_path: json", "dataset_path: llmc-tests/never-cached"))
    make_model(tmp_path / "run" / "pretrain" / "hf")
    capsys.readouterr()
    assert evaluate.main(["--lock", str(path), "--stage", "pretrain", "--out", str(tmp_path / "run" / "pretrain")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error[" in ln or "Traceback" in ln]
    assert len(err) == 1 and err[0].startswith(f"{path}: error[R017] eval pretrain:"), err
    assert "llmc-tests/never-cached" in err[0] and "datasets.load_dataset('llmc-tests/never-cached')" in err[0]
    assert "local task file" in err[0]


@pytest.mark.slow
def test_the_cache_check_follows_groups_and_tags_to_their_tasks_datasets(tmp_path):
    """`--check-tasks` (what `llmc launch` runs before training) with an empty Hugging Face cache, offline: a group
    (mmlu: its 57 subjects, Hendrycks et al. 2021, arXiv:2009.03300, one `cais/mmlu` config each) and a tag (ai2_arc:
    ARC-Easy and ARC-Challenge) are checked through the tasks they run, as a plain task (hellaswag) is; a group or tag
    is not passed over for naming no dataset itself."""
    import json as _json
    import subprocess

    pytest.importorskip("lm_eval")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_evaluate import _eval_lock

    lock, path = _eval_lock(tmp_path)
    lock["evaluation"]["tasks"].update(tasks=["mmlu", "ai2_arc", "hellaswag"], names=["mmlu", "ai2_arc", "hellaswag"])
    path.write_text(_json.dumps(lock))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_DATASETS_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "llmc.runtime.evaluate", "--lock", str(path), "--check-tasks"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    found = _json.loads(r.stdout.strip().splitlines()[-1])
    assert found["unknown"] == []
    by: dict[str, list[str]] = {}
    for name, dataset in found["uncached"]:
        by.setdefault(name, []).append(dataset)
    assert len(by["mmlu"]) == 57 and all(d.startswith("cais/mmlu (") for d in by["mmlu"])
    assert sorted(by["ai2_arc"]) == ["allenai/ai2_arc (ARC-Challenge)", "allenai/ai2_arc (ARC-Easy)"]
    assert by["hellaswag"] == ["Rowan/hellaswag"]
