"""A build directory's finished stages count only under the lock that trained them; a launch runs only what the build
wrote.

* A stage's marker (DONE.json; a torchtitan stage's FINGERPRINT.json beside its export) records a fingerprint of what
  decided its result. Rebuilt from another spec (other steps, data, or only another learning rate), the directory
  warns at ``llmc build`` (X013) and ``llmc launch`` (``--dry-run`` too), the runtime and the emitted scripts refuse the
  earlier spec's finished stage, naming what changed (L005 / R004), instead of skipping it as this build's.
  ``--no-resume`` sets it aside with the tokenizer it trained with. A later stage's edit keeps the earlier ones.
* ``llmc launch`` refuses a torchtitan job or DeepSpeed config edited after ``llmc build`` (L006; ``--allow-edited``).

Real launches: one 12-step micro run (module fixture) and one 8-step rerun; the rest reads or stubs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from test_build_fakes import ROOT, compile_example, compile_text
from test_safety_e2e import cli, micro_spec
from typer.testing import CliRunner

from llmc.buildfs import write_build
from llmc.cli import app
from llmc.emit import render_artifacts

STEPS_1, STEPS_2 = 12, 8


def _steps(spec: dict) -> int:
    """Optimizer steps of a spec without ``training.steps``: data.tokens / training.global_batch_tokens."""
    return int(spec["data"]["tokens"] // spec["training"]["global_batch_tokens"])


def _other_spec(d: Path, *, steps: int | None = None, lr: float | None = None, extra_source: bool = False) -> Path:
    """The micro spec of ``d`` with other steps / lr, or a second text source (so prepare trains another tokenizer)."""
    spec = yaml.safe_load((d / "spec.yaml").read_text())
    if steps is not None:
        spec["data"]["tokens"] = spec["training"]["global_batch_tokens"] * steps
    if lr is not None:
        spec["training"]["optimizer"]["lr"] = lr
    if extra_source:
        with open(d / "nums.jsonl", "w") as f:
            for i in range(400):
                f.write(json.dumps({"text": " ".join(f"{i * j} plus {j} equals {i * j + j}" for j in range(12))}) + "\n")
        spec["data"]["sources"].append({"name": "nums", "path": "nums.jsonl", "format": "jsonl"})
    p = d / f"other-{steps}-{lr}-{extra_source}.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A micro spec built and launched for real: its build directory, the spec's folder and the tokenizer it ran."""
    d = tmp_path_factory.mktemp("integrity")
    micro_spec(d / "s", steps=STEPS_1, interval=4)
    b = d / "b"
    assert cli("build", str(d / "s/spec.yaml"), "-o", str(b)).returncode == 0
    r = cli("launch", str(b))
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads((b / "run/pretrain/DONE.json").read_text())
    assert done["steps"] == STEPS_1 == _steps(yaml.safe_load((d / "s/spec.yaml").read_text()))
    return {"b": b, "s": d / "s", "tokenizer": (b / "assets/tokenizer.json").read_bytes()}


def _copy(trained: dict, tmp_path: Path) -> Path:
    c = tmp_path / "c"
    shutil.copytree(trained["b"], c, symlinks=True)
    return c


def _errors(text: str, code: str) -> list[str]:
    return [ln for ln in text.splitlines() if f"error[{code}]" in ln]


def test_a_rebuilt_directory_refuses_the_earlier_specs_finished_stage(trained, tmp_path, capsys):
    """Rebuilt from a spec with other steps, lr and data, the directory's finished stage is the old spec's: `llmc build`
    warns, and `llmc launch` (and --dry-run), the runtime and native/launch.sh refuse it naming what changed; nothing
    is skipped as done or trained over."""
    c = _copy(trained, tmp_path)
    other = _other_spec(trained["s"], steps=STEPS_2, lr=1e-3, extra_source=True)
    assert _steps(yaml.safe_load(other.read_text())) == STEPS_2
    done = (c / "run/pretrain/DONE.json").read_bytes()
    metrics = (c / "run/pretrain/metrics.jsonl").read_bytes()

    r = cli("build", str(other), "-o", str(c))
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "warning[X013]" in ln]
    assert len(warn) == 1 and f"steps {STEPS_1} -> {STEPS_2}" in warn[0] and "llmc launch" in warn[0], r.stderr
    assert "--no-resume --from pretrain`" in warn[0]  # (a bare --no-resume retrains every finished stage)

    for dry in ([], ["--dry-run"]):
        r = cli("launch", str(c), *dry)
        assert r.returncode == 1, (dry, r.stdout, r.stderr)
        err = _errors(r.stderr, "L005")
        assert len(err) == 1 and err[0].startswith(f"{c}: error[L005] stage 'pretrain'"), r.stderr
        assert f"steps {STEPS_1} -> {STEPS_2}" in err[0] and "lr 0.003 -> 0.001" in err[0], err[0]
        assert "the data" in err[0] and "--no-resume" in err[0] and "fresh" in err[0], err[0]
        assert "Traceback" not in r.stderr and "skipped" not in r.stdout

    # the runtime itself (as the emitted scripts and a hand-run stage start it: `python -m llmc.runtime.entry`,
    # its main here in-process)
    from llmc.runtime.entry import main

    capsys.readouterr()
    rc, err = main(["--lock", str(c / "plan.lock.json")]), capsys.readouterr().err
    assert rc == 1 and len(_errors(err, "R004")) == 1, err[-2000:]
    assert f"steps {STEPS_1} -> {STEPS_2}" in _errors(err, "R004")[0]

    # the emitted script: prepare (now the new spec's tokenizer), then stage_done refuses the stage
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(c / "native/launch.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and _errors(r.stderr, "R004"), (r.stdout[-2000:], r.stderr[-2000:])
    assert "skipped" not in r.stdout
    assert (c / "run/pretrain/DONE.json").read_bytes() == done  # nothing trained over it
    assert (c / "run/pretrain/metrics.jsonl").read_bytes() == metrics
    # prepare wrote the new spec's tokenizer; the finished run keeps the one it trained with
    assert (c / "assets/tokenizer.json").read_bytes() != trained["tokenizer"]
    assert (c / "run/pretrain/tokenizer/tokenizer.json").read_bytes() == trained["tokenizer"]


def test_a_rebuild_that_changes_only_the_learning_rate_is_refused(trained, tmp_path):
    c = _copy(trained, tmp_path)
    assert cli("build", str(_other_spec(trained["s"], lr=1e-3)), "-o", str(c)).returncode == 0
    r = cli("launch", str(c), "--dry-run")
    err = _errors(r.stderr, "L005")
    assert r.returncode == 1 and len(err) == 1, (r.stdout, r.stderr)
    # lr and the schedule's floor (min_lr_ratio 0.1 of it: llmc.spec.schema.Schedule) moved; nothing else
    assert "lr 0.003 -> 0.001, min_lr 0.0003 -> 0.0001;" in err[0] and "steps" not in err[0], err[0]


def test_no_resume_sets_the_finished_stage_aside_with_its_tokenizer(trained, tmp_path, capsys):
    """`llmc launch --no-resume` sets the finished stage aside, with the tokenizer it trained with even after prepare
    wrote the new spec's, trains the new spec's stage, and the next launch skips it."""
    c = _copy(trained, tmp_path)
    from llmc.runtime.entry import main

    assert cli("build", str(_other_spec(trained["s"], steps=STEPS_2, extra_source=True)), "-o", str(c)).returncode == 0
    # the new spec's prepare (`python -m llmc.runtime.entry prepare`, here in-process)
    assert main(["prepare", "--lock", str(c / "plan.lock.json")]) == 0, capsys.readouterr().err[-2000:]
    new_tok = (c / "assets/tokenizer.json").read_bytes()
    assert new_tok != trained["tokenizer"]  # (else the test cannot tell the tokenizers apart)

    r = cli("launch", str(c), "--no-resume")
    assert r.returncode == 0, r.stderr[-3000:]
    aside = c / "run/pretrain.set-aside-1"
    assert json.loads((aside / "DONE.json").read_text())["steps"] == STEPS_1
    assert (aside / "tokenizer/tokenizer.json").read_bytes() == trained["tokenizer"]
    assert json.loads((c / "run/pretrain/DONE.json").read_text())["steps"] == STEPS_2
    assert (c / "run/pretrain/tokenizer/tokenizer.json").read_bytes() == new_tok
    r = cli("launch", str(c))  # (every stage finished: it starts nothing, prepare included)
    assert r.returncode == 0 and "pretrain: skipped" in r.stdout, (r.stdout, r.stderr)


def _manifest_sha(b: Path, rel: str) -> str:
    return json.loads((b / ".llmc-build.json").read_text())["files"][rel]


def test_edited_artifacts_are_refused(tmp_path, monkeypatch):
    """A DeepSpeed config or torchtitan job edited after `llmc build`: refused before anything runs (--dry-run says the
    same), one located line naming the file and both sha256; --allow-edited runs it, warned; a backend that does not
    run the file is not concerned."""
    import llmc.cli as cli

    b = tmp_path / "b"
    write_build(b, render_artifacts(compile_example(ROOT / "examples" / "tiny_cpu.yaml")))
    ran: list[list[str]] = []
    monkeypatch.setattr(cli, "_run_logged", lambda argv, env, cwd, log, grace_s: (ran.append(argv), (0, ""))[1])
    cfg = b / "deepspeed/ds_config.json"
    ds = json.loads(cfg.read_text())
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = 16, 2
    cfg.write_text(json.dumps(ds, indent=2))
    job = b / "torchtitan/llmc_job.py"
    text = job.read_text()
    assert "warmup_steps=" in text
    job.write_text(text.replace("warmup_steps=", "warmup_steps=9 + ", 1))

    for rel, backend in (("deepspeed/ds_config.json", "deepspeed"), ("torchtitan/llmc_job.py", "torchtitan")):
        got, want = hashlib.sha256((b / rel).read_bytes()).hexdigest(), _manifest_sha(b, rel)
        assert got != want
        for dry in (["--dry-run"], []):
            r = CliRunner().invoke(app, ["launch", str(b), "--backend", backend, *dry])
            err = _errors(r.output, "L006")
            assert r.exit_code == 1 and len(err) == 1, r.output
            assert err[0].startswith(f"{b / rel}: error[L006]") and got[:12] in err[0] and want[:12] in err[0]
            assert "--allow-edited" in err[0] and "llmc build" in err[0]
        assert not ran  # nothing started
        r = CliRunner().invoke(app, ["launch", str(b), "--backend", backend, "--dry-run", "--allow-edited"])
        assert r.exit_code == 0 and f"{b / rel}: warning[L007]" in r.output, r.output
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "native", "--dry-run"])
    assert r.exit_code == 0 and "L006" not in r.output and "L007" not in r.output, r.output


def _tiny_build(tmp_path: Path, lr: str | None = None) -> Path:
    """examples/tiny_cpu.yaml built into tmp_path/b (its torchtitan job included), with another lr when given."""
    example = (ROOT / "examples" / "tiny_cpu.yaml").read_text()
    if lr is not None:
        example = example.replace("lr: 3.0e-3", f"lr: {lr}")
    write_build(tmp_path / "b", render_artifacts(compile_text(example, str(tmp_path / "tiny_cpu.yaml"))))
    return tmp_path / "b"


def test_a_torchtitan_stage_records_its_lock_and_is_refused_under_another(tmp_path, monkeypatch):
    """torchtitan writes no DONE.json: `llmc launch` records the lock beside the stage's export as it starts it, skips
    the exported stage under that lock, and refuses it once the directory is rebuilt with another learning rate."""
    import llmc.cli as cli

    b = _tiny_build(tmp_path)
    ran: list[list[str]] = []

    def run(argv, env, cwd, log, grace_s):  # stand-ins: torchtitan trains nothing, the export writes its config
        ran.append(argv)
        if "llmc.runtime.hf_io" in argv:
            out = Path(argv[argv.index("-o") + 1])
            out.mkdir(parents=True)
            (out / "config.json").write_text("{}")
        return 0, ""

    monkeypatch.setattr(cli, "_run_logged", run)
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "torchtitan"])
    assert r.exit_code == 0, r.output
    assert any("--module" in a and "llmc_job" in a for a in ran)
    record = json.loads((b / "run/pretrain/FINGERPRINT.json").read_text())
    assert record["stage"] == "pretrain" and len(record["fingerprint_sha256"]) == 64

    def trained() -> list[list[str]]:
        return [a for a in ran if "llmc_job" in a or "llmc.runtime.hf_io" in a]

    ran.clear()
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "torchtitan"])
    assert r.exit_code == 0 and "already finished and exported" in r.output and not trained(), r.output

    _tiny_build(tmp_path, lr="1.0e-3")  # the same directory rebuilt with another learning rate
    ran.clear()
    for dry in ([], ["--dry-run"]):
        r = CliRunner().invoke(app, ["launch", str(b), "--backend", "torchtitan", *dry])
        err = _errors(r.output, "L005")
        assert r.exit_code == 1 and len(err) == 1 and "lr 0.003 -> 0.001" in err[0], r.output
        assert "FINGERPRINT.json" in err[0] and not trained()


def test_launch_scripts_refuse_a_torchtitan_stage_exported_under_another_lock(trained, tmp_path):
    """launch/torchrun_single_node.sh (BACKEND=torchtitan): titan_done records the lock as the stage starts, skips the
    exported stage under it, and stops the script (R004) once the directory is rebuilt with another lr."""
    c = tmp_path / "c"
    spec = trained["s"] / "spec.yaml"
    assert cli("build", str(spec), "-o", str(c)).returncode == 0
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    (bin_ / "torchrun").write_text(f'#!/bin/bash\necho "torchrun $*" >> "{log}"\n')
    # python: the real one (prepare, the runtime's check), but the export only writes the file that marks it done
    (bin_ / "python").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        if [ "$2" = llmc.runtime.hf_io ]; then out="${{@: -1}}"; mkdir -p "$out"; echo {{}} > "$out/config.json"; exit 0; fi
        exec {sys.executable} "$@"
        """))
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "BACKEND": "torchtitan",
           "OMP_NUM_THREADS": "1"}

    def script() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(c / "launch/torchrun_single_node.sh")], env=env, capture_output=True,
                              text=True, timeout=300)

    r = script()
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(ln.split() for ln in (c / "assets/stage-fingerprints.txt").read_text().splitlines())
    assert json.loads((c / "run/pretrain/FINGERPRINT.json").read_text())["fingerprint_sha256"] == lines["pretrain"]
    assert log.read_text().count("torchtitan.train") == 1
    r = script()
    assert r.returncode == 0 and log.read_text().count("torchtitan.train") == 1, r.stderr[-2000:]  # skipped

    assert cli("build", str(_other_spec(trained["s"], lr=1e-3)), "-o", str(c)).returncode == 0
    r = script()
    assert r.returncode == 2 and len(_errors(r.stderr, "R004")) == 1, (r.stdout[-2000:], r.stderr[-2000:])
    assert "--no-resume" in _errors(r.stderr, "R004")[0]
    assert log.read_text().count("torchtitan.train") == 1  # not trained over


def test_a_finished_stage_of_an_older_llmc_is_trusted_with_a_warning(tmp_path):
    b = tmp_path / "b"
    write_build(b, render_artifacts(compile_example(ROOT / "examples" / "tiny_cpu.yaml")))
    (b / "run/pretrain").mkdir(parents=True)
    (b / "run/pretrain/DONE.json").write_text(json.dumps({"status": "done", "stage": "pretrain", "step": 500}))
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "native", "--dry-run"])
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.output.splitlines() if "warning[L008]" in ln]
    assert len(warn) == 1 and "older llmc" in warn[0], r.output


PIPE = ROOT / "examples" / "pipeline_tiny.yaml"


def _pipeline(tmp_path: Path, text: str) -> tuple[Path, dict]:
    b = tmp_path / "b"
    write_build(b, render_artifacts(compile_text(text, str(tmp_path / "pipeline_tiny.yaml"))))
    return b, json.loads((b / "plan.lock.json").read_text())


def _finish(b: Path, lock: dict, *stages: str) -> None:
    """DONE.json of each stage as llmc's trainers write it under ``lock``."""
    from llmc.runtime.job import fingerprint_record

    for s in stages:
        (b / "run" / s).mkdir(parents=True, exist_ok=True)
        (b / "run" / s / "DONE.json").write_text(json.dumps({"status": "done", "stage": s,
                                                             **fingerprint_record(lock, s)}))


def test_editing_a_later_stage_keeps_the_finished_earlier_ones(tmp_path, capsys):
    """A pipeline whose pretrain and sft finished: a new sft learning rate refuses sft and dpo (which starts from it),
    never pretrain; serving, eval tasks and the hardware count change nothing finished; a new pretrain learning rate
    refuses every stage after it too. The runtime refuses a stage that starts from a stale one (--stage)."""
    from llmc.launch import launch_commands
    from llmc.runtime.entry import main

    text = PIPE.read_text()
    b, lock = _pipeline(tmp_path, text)
    _finish(b, lock, "pretrain", "sft")
    sft_lr = "    lr: 2.0e-3                # LoRA adapters start at B = 0; high LR is fine for a tiny model"
    assert sft_lr in text and "  count: 1" in text

    def state(new_text: str) -> dict:
        write_build(b, render_artifacts(compile_text(new_text, str(tmp_path / "pipeline_tiny.yaml"))))
        cmds = {c.stage: c for c in launch_commands(b, backend="native", gpu=False)
                if "llmc.runtime.evaluate" not in c.argv}
        return {s: ("stale" if c.stale else "done" if c.skip_reason else "run") for s, c in cmds.items()
                if s != "prepare"} | {"_": {s: c.stale for s, c in cmds.items() if c.stale}}

    same = {"pretrain": "done", "sft": "done", "dpo": "run", "grpo": "run"}
    for edit in (text.replace("  count: 1", "  count: 2"),
                 text + "\nserving:\n  - engine: vllm\n",
                 text + "\neval:\n  tasks: [hellaswag]\n"):
        got = state(edit)
        assert {k: v for k, v in got.items() if k != "_"} == same, got

    got = state(text.replace(sft_lr, "    lr: 1.0e-3"))
    assert {k: v for k, v in got.items() if k != "_"} == {"pretrain": "done", "sft": "stale", "dpo": "stale",
                                                         "grpo": "run"}
    assert "lr 0.002 -> 0.001" in got["_"]["sft"] and got["_"]["dpo"].startswith("stage 'dpo' starts from stage 'sft'")

    capsys.readouterr()
    assert main(["--lock", str(b / "plan.lock.json"), "--stage", "dpo"]) == 1
    err = _errors(capsys.readouterr().err, "R004")
    assert len(err) == 1 and "starts from stage 'sft'" in err[0] and "lr 0.002 -> 0.001" in err[0], err

    got = state(text.replace("    lr: 3.0e-3\n", "    lr: 1.0e-3\n", 1))
    assert {k: v for k, v in got.items() if k != "_"} == {"pretrain": "stale", "sft": "stale", "dpo": "stale",
                                                         "grpo": "run"}
    assert "the run it starts from changed" in got["_"]["sft"]


def test_an_unfinished_torchtitan_run_of_another_lock_is_refused_and_no_resume_sets_its_checkpoints_aside(
        tmp_path, monkeypatch):
    """A torchtitan stage started (not finished) under one lock resumes its DCP checkpoints from the dump folder,
    which `--no-resume` used to leave in place: relaunched under another learning rate it is refused (L005), not
    stamped with the new lock's fingerprint; `--no-resume --stage pretrain` sets the stage and its checkpoints aside and
    trains it from the start."""
    import llmc.cli as cli

    b = _tiny_build(tmp_path)
    ran: list[list[str]] = []
    def run(argv, env, cwd, log, grace_s):  # stand-ins: prepare does nothing, the torchtitan job is preempted
        ran.append(argv)
        return (75 if any("llmc_job" in a for a in argv) else 0), ""

    monkeypatch.setattr(cli, "_run_logged", run)
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "torchtitan"])  # preempted before it finished
    first = json.loads((b / "run/pretrain/FINGERPRINT.json").read_text())["fingerprint_sha256"]
    ckpt = b / "outputs" / "torchtitan" / "checkpoint" / "step-4"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_text("dcp")

    _tiny_build(tmp_path, lr="1.0e-3")  # the same directory rebuilt with another learning rate
    ran.clear()
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "torchtitan"])
    err = _errors(r.output, "L005")
    assert r.exit_code == 1 and len(err) == 1 and "--no-resume --from pretrain" in err[0], r.output
    assert not [a for a in ran if "llmc_job" in a]  # nothing resumed the other lock's checkpoints
    assert json.loads((b / "run/pretrain/FINGERPRINT.json").read_text())["fingerprint_sha256"] == first

    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "torchtitan", "--no-resume", "--stage", "pretrain"])
    assert (b / "outputs" / "torchtitan.set-aside-1" / "checkpoint" / "step-4" / ".metadata").is_file(), r.output
    assert not (b / "outputs" / "torchtitan" / "checkpoint").exists()
    assert json.loads((b / "run/pretrain/FINGERPRINT.json").read_text())["fingerprint_sha256"] != first
