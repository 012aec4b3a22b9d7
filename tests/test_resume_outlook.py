"""What a launch does with an unfinished run after the build changed under it, said before anything runs.

1. A torchtitan worker's exception under torchrun ("[rank0]: RuntimeError: ...") is the failed stage's cause, not
   "it printed no error".
2. ``llmc launch`` (``--dry-run`` too) says per stage "resumes stage S from step N (checkpoint)" or refuses, before
   prepare, what the trainer would refuse after it: a torchtitan checkpoint saved by another data-parallel size
   (L018: torchtitan 0.3.0 cannot reshard its data loader), a native checkpoint under another LR schedule / global
   batch (L018), a torchtitan run started under another lock (L005, naming what changed: ``steps 40 -> 60``);
   ``llmc build`` into such a directory warns (X017).
3. A longer schedule resumes on torchtitan exactly where it does on llmc's trainer: where the LR at the resumed step
   stays (WSD before its decay), which torchtitan's own scheduler confirms.

Checkpoints are written by hand (torch.distributed.checkpoint for torchtitan's, the trainer's train.json for llmc's):
every check here reads only files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_safety_e2e import cli, write_tiny

torch = pytest.importorskip("torch")

STEPS = ["--set", "training.steps=40", "--set", "training.checkpoint.interval_steps=10", "--set", "eval.tasks=[]",
         "--set", "eval.validation.every_steps=20"]


def _build(tmp_path: Path, b: Path, *sets: str) -> tuple[int, str]:
    spec = tmp_path / "spec" / "tiny_cpu.yaml"
    if not spec.exists():
        spec.parent.mkdir(parents=True, exist_ok=True)
        write_tiny(spec)
    r = cli("build", str(spec), "-o", str(b), *STEPS, *[x for s in sets for x in ("--set", s)])
    assert r.returncode == 0, r.stderr
    return r.returncode, r.stderr


def _lock(b: Path) -> dict:
    return json.loads((b / "plan.lock.json").read_text())


def _titan_checkpoint(b: Path, step: int, dp: int) -> Path:
    """A torchtitan DCP checkpoint of ``step`` as ``dp`` data-parallel ranks save its data loader (torchtitan 0.3.0
    ParallelAwareDataloader.state_dict: ``dp_rank_<r>`` and ``world_size``), written by torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    path = b / "outputs" / "torchtitan" / "checkpoints" / f"step-{step}"
    state = {"dataloader": {**{f"dp_rank_{r}": b"position" for r in range(dp)}, "world_size": dp},
             "train_state": {"step": step}, "model": {"w": torch.zeros(2, 2)}}
    dcp.save(state, checkpoint_id=str(path))
    return path


def _titan_started(b: Path) -> None:
    """What `llmc launch --backend torchtitan` leaves when it starts the stage: its record (FINGERPRINT.json)."""
    from llmc.launch import launch_commands, start_stage

    c = next(c for c in launch_commands(b, backend="torchtitan") if c.dump_dir)
    start_stage(c, b)


def _titan_lr(steps: int, step: int, **sched) -> float:
    """torchtitan's own LR factor at ``step`` of a ``steps``-step run (its LRSchedulersContainer, as the job builds
    it): the independent figure."""
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = LRSchedulersContainer.Config(**sched).build(optimizers=[opt], training_steps=steps)
    return s.schedulers[0].lr_lambdas[0](step)


# ----------------------------------------------------------------------------------------- 1. the failed stage's cause

def test_a_ranks_prefixed_exception_is_the_cause_not_torchruns_status():
    from llmc.cli import last_error_line

    text = "\n".join([  # torch.distributed's excepthook prefixes the worker's traceback lines with "[rankN]: "
        "[rank0]:[titan] 2026-01-01 00:00:00,000 - root - INFO - Loading the checkpoint at step 21.",
        "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "/venv/lib/python3.11/site-packages/torchtitan/train.py", line 60, in <module>',
        "[rank0]:     trainer.checkpointer.load(step=config.checkpoint.load_step)",
        "[rank0]: RuntimeError: Missing key in checkpoint state_dict: dataloader.dp_rank_1.",
        "E0101 00:00:01.000000 12 torch/distributed/elastic/multiprocessing/api.py:900] failed (exitcode: 1) "
        "local_rank: 1 (pid: 14) of binary: /venv/bin/python",
        "Traceback (most recent call last):",
        '  File "/venv/bin/torchrun", line 8, in <module>',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "============================================================",
        "Root Cause (first observed failure):",
        "[0]:",
        "  rank      : 1 (local_rank: 1)",
        "  exitcode  : 1 (pid: 14)",
        "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html",
        "============================================================",
    ])
    assert last_error_line(text) == "RuntimeError: Missing key in checkpoint state_dict: dataloader.dp_rank_1."


# ------------------------------------------------------------------- 2. torchtitan: the checkpoint's data-parallel size

def test_dcp_keys_are_read_without_torch_as_torch_reads_them_and_run_nothing(tmp_path):
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    from llmc.runtime.job import dcp_state_keys, titan_data_world

    ck = _titan_checkpoint(tmp_path, 7, dp=3)
    assert dcp_state_keys(ck) == set(FileSystemReader(str(ck)).read_metadata().state_dict_metadata)
    assert titan_data_world(ck) == 3
    # a .metadata that would run code when unpickled: read as inert values, nothing run
    evil = tmp_path / "evil"
    evil.mkdir()

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'ran')!r}, 'w').write('x')",))

    (evil / ".metadata").write_bytes(pickle.dumps(Boom()))
    assert dcp_state_keys(evil) is None and not (tmp_path / "ran").exists()
    # malformed: an object whose state is a pair that is not (dict or None, dict) was a TypeError, which `llmc build`
    # and `llmc launch --dry-run` printed as error[INTERNAL]
    for data in (b"\x80\x02cx\nY\n)\x81K\x05}\x86b.", b"\x80\x02cx\nY\n)\x81}K\x05\x86b."):
        (evil / ".metadata").write_bytes(data)
        assert dcp_state_keys(evil) is None


def test_torchtitan_dp_change_is_refused_before_anything_runs_with_the_ways_out(tmp_path):
    from llmc.launch import launch_commands
    from llmc.resume import resumptions

    b = tmp_path / "b"
    _build(tmp_path, b)
    _titan_started(b)
    ck = _titan_checkpoint(b, 21, dp=1)
    # the same build resumes, and says so
    r = cli("launch", str(b), "--backend", "torchtitan", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "note: resumes stage 'pretrain' from step 21 (" in r.stderr and "step-21" in r.stderr

    _, err = _build(tmp_path, b, "hardware.count=2")  # 1 -> 2 processes: the plan's dp is 2
    assert (_lock(b)["plan"]["dp_replicate"] * _lock(b)["plan"]["dp_shard"]) == 2
    x017 = [ln for ln in err.splitlines() if "warning[X017]" in ln]
    assert len(x017) == 1 and "dp 1 -> 2" in x017[0] and "--backend torchtitan" in x017[0], err
    (found,) = resumptions(b, launch_commands(b, backend="torchtitan"))
    assert found.checkpoint == ck and found.step == 21 and not found.lock_change
    r = cli("launch", str(b), "--backend", "torchtitan", "--dry-run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "error[L018]" in lines[0], r.stderr
    for said in ("dp 1 -> 2", f"{ck}", "--stage pretrain --step 21", "--no-resume --from pretrain --backend torchtitan",
                 "init_hf"):
        assert said in lines[0], (said, lines[0])


# --------------------------------------------------------- 2-4. torchtitan: another lock, and a longer schedule

def test_torchtitan_run_started_under_other_steps_names_the_change_and_resumes_only_where_the_lr_stays(tmp_path):
    from llmc.launch import LaunchError, launch_commands, start_stage
    from llmc.resume import resumptions
    from llmc.runtime.job import FINGERPRINT_FILE

    cosine = dict(warmup_steps=2, decay_ratio=None, decay_type="cosine", min_lr_factor=0.1)
    b = tmp_path / "cos"
    _build(tmp_path, b)
    _titan_started(b)
    _titan_checkpoint(b, 20, dp=1)
    _, err = _build(tmp_path, b, "training.steps=60")
    was, now = f"{_titan_lr(40, 20, **cosine):.4g}", f"{_titan_lr(60, 20, **cosine):.4g}"
    assert was != now
    assert "warning[X017]" in err and "steps 40 -> 60" in err, err
    cmds = launch_commands(b, backend="torchtitan")
    (found,) = resumptions(b, cmds)
    assert found.lock_change and "steps 40 -> 60" in found.refusal
    assert f"would jump from {was} to {now} x peak" in found.refusal, found.refusal
    with pytest.raises(LaunchError) as e:  # (the launch's own check as the stage starts: the same line)
        start_stage(next(c for c in cmds if c.dump_dir), b)
    assert str(e.value) == found.refusal
    r = cli("launch", str(b), "--backend", "torchtitan", "--dry-run")
    assert r.returncode == 1 and "error[L005]" in r.stderr and "steps 40 -> 60" in r.stderr, r.stderr

    # WSD before its decay: the LR at step 20 is the peak under 40 and 60 steps (torchtitan's own scheduler says so),
    # so the run resumes, as on llmc's trainer, and its record becomes this lock's
    wsd = dict(warmup_steps=2, decay_ratio=0.2, decay_type="sqrt", min_lr_factor=0.1)
    assert _titan_lr(40, 20, **wsd) == _titan_lr(60, 20, **wsd) == 1.0
    b = tmp_path / "wsd"
    _build(tmp_path, b, "training.schedule.kind=wsd")
    _titan_started(b)
    _titan_checkpoint(b, 20, dp=1)
    _, err = _build(tmp_path, b, "training.schedule.kind=wsd", "training.steps=60")
    assert "X017" not in err, err
    cmds = launch_commands(b, backend="torchtitan")
    (found,) = resumptions(b, cmds)
    assert found.refusal is None and found.step == 20
    start_stage(next(c for c in cmds if c.dump_dir), b)
    assert json.loads((b / "run" / "pretrain" / FINGERPRINT_FILE).read_text())["fingerprint"]["numbers"]["steps"] == 60
    # ... but not past the old decay's start: step 36 of 40 is in its cooldown, of 60 not
    assert _titan_lr(40, 36, **wsd) != _titan_lr(60, 36, **wsd)
    _build(tmp_path, b, "training.schedule.kind=wsd")  # back to the 40 steps it was started with
    _titan_started(b)
    _titan_checkpoint(b, 36, dp=1)
    _build(tmp_path, b, "training.schedule.kind=wsd", "training.steps=60")
    (found,) = resumptions(b, launch_commands(b, backend="torchtitan"))
    assert found.lock_change and found.step == 36 and "LR at step 36 would jump" in found.refusal


# ----------------------------------------------------------------------------- 2. llmc's trainer: the same checks

def _native_checkpoint(b: Path, step: int) -> Path:
    """llmc's checkpoint of ``step`` as the trainer writes its train.json under this build's lock (its LR schedule,
    its data position: one stream per sequence slot of the global batch)."""
    from llmc.runtime.job import TrainJob

    job = TrainJob.from_lock(_lock(b), "pretrain", b)
    path = b / "run" / "pretrain" / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    data = {"kind": "stream", "slots": job.global_batch_seqs, "seq_len": job.seq_len, "seed": job.seed, "pos": 0,
            "streams": {str(s): {} for s in range(job.global_batch_seqs)}}
    (path / "train.json").write_text(json.dumps({"step": step, "tokens": step * job.tokens_per_step, "data": data,
                                                 "stage": "pretrain", "kind": "pretrain", "seq_len": job.seq_len,
                                                 "lr_schedule": job.lr_schedule}))
    (path / "manifest.json").write_text(json.dumps({"step": step, "files": {}}))
    return path


@pytest.mark.parametrize(("change", "said"), [
    ("training.steps=60", "would jump from {was} to {now} x peak"),
    # 4096 / 128 = 32 sequences, 8192 / 128 = 64: the data position is one stream per sequence
    ("training.global_batch_tokens=8192", "global_batch_tokens 4096 -> 8192 (so the global batch, global_batch_tokens "
                                          "/ seq_len, 32 -> 64 sequences"),
    ("parallelism.micro_batch=8", None),  # the layout: resumes
])
def test_native_checkpoint_the_trainer_would_refuse_is_refused_before_prepare(tmp_path, change, said):
    b = tmp_path / "b"
    _build(tmp_path, b)
    ck = _native_checkpoint(b, 22)
    _, err = _build(tmp_path, b, change)
    r = cli("launch", str(b), "--dry-run")
    if said is None:
        entry = next(e for e in _lock(b)["stages"] if e["name"] == "pretrain")
        assert entry["micro_batch"] == 8 and entry["grad_accum"] > 1, entry  # (another layout, the same batch)
        assert "X017" not in err and r.returncode == 0, (err, r.stderr)
        assert "note: resumes stage 'pretrain' from step 22 (" in r.stderr and ck.name in r.stderr, r.stderr
        return
    cosine = dict(warmup_steps=2, decay_ratio=None, decay_type="cosine", min_lr_factor=0.1)
    said = said.format(was=f"{_titan_lr(40, 22, **cosine):.4g}", now=f"{_titan_lr(60, 22, **cosine):.4g}")
    assert "warning[X017]" in err and said in err, err
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "error[L018]" in lines[0] and said in lines[0], r.stderr
    assert f"llmc launch {b} --no-resume --from pretrain" in lines[0] and "--stage pretrain --step 22" in lines[0]


# ------------------------------------------- 3. the emitted torchtitan launch script rules as `llmc launch` does

def test_the_torchtitan_launch_script_resumes_a_longer_wsd_run_and_refuses_a_longer_cosine_one(tmp_path):
    """launch/torchrun_single_node.sh with BACKEND=torchtitan used to refuse any unfinished run started under another
    lock (R004, the fingerprints only): a WSD run made longer before its decay, which `llmc launch` resumes, could not
    be resumed from the script. It now asks the runtime the launch's question (`python -m llmc.runtime.entry
    titan-start`): WSD 40 -> 60 at step 20 resumes (torchtitan's own scheduler: the LR at step 20 is the peak under
    both), cosine 40 -> 60 is refused naming the change and the LR jump, with the script's ways out."""
    import os
    import subprocess
    import sys
    import textwrap

    from test_build_fakes import ROOT

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.log"
    # torchrun: the torchtitan job "preempted" after saving its step-20 checkpoint (a complete DCP folder's marker)
    (bin_ / "torchrun").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "torchrun $*" >> "{log}"
        mkdir -p "$BUILD_DIR/outputs/torchtitan/checkpoint/step-20" && echo dcp > "$BUILD_DIR/outputs/torchtitan/checkpoint/step-20/.metadata"
        exit 75
        """))
    (bin_ / "python").write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "BACKEND": "torchtitan",
           "OMP_NUM_THREADS": "1"}

    def script(b: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(b / "launch/torchrun_single_node.sh")], env={**env, "BUILD_DIR": str(b)},
                              capture_output=True, text=True, timeout=300)

    def trains() -> int:
        return log.read_text().count("llmc_job") if log.exists() else 0

    wsd = dict(warmup_steps=2, decay_ratio=0.2, decay_type="sqrt", min_lr_factor=0.1)
    cosine = dict(warmup_steps=2, decay_ratio=None, decay_type="cosine", min_lr_factor=0.1)
    assert _titan_lr(40, 20, **wsd) == _titan_lr(60, 20, **wsd)
    for kind, sched, resumes in (("wsd", wsd, True), ("cosine", cosine, False)):
        b = tmp_path / kind
        _build(tmp_path, b, f"training.schedule.kind={kind}")
        before = trains()
        r = script(b)
        assert trains() == before + 1 and r.returncode != 0, r.stderr[-2000:]  # started, "preempted" at step 20
        assert json.loads((b / "run/pretrain/FINGERPRINT.json").read_text())["fingerprint"]["numbers"]["steps"] == 40
        _build(tmp_path, b, f"training.schedule.kind={kind}", "training.steps=60")
        r = script(b)
        if resumes:
            assert trains() == before + 2, r.stderr[-2000:]
            rec = json.loads((b / "run/pretrain/FINGERPRINT.json").read_text())
            assert rec["fingerprint"]["numbers"]["steps"] == 60 and "R004" not in r.stderr
        else:
            was, now = f"{_titan_lr(40, 20, **sched):.4g}", f"{_titan_lr(60, 20, **sched):.4g}"
            (line,) = [ln for ln in r.stderr.splitlines() if "error[R004]" in ln]
            assert r.returncode == 2 and trains() == before + 1, r.stderr[-2000:]
            for said in ("steps 40 -> 60", f"would jump from {was} to {now} x peak", "--no-resume --from pretrain",
                         "--backend torchtitan", "--stage pretrain --step 20"):
                assert said in line, (said, line)
    # a checkpoint of one data-parallel rank, the build rebuilt for two: torchtitan 0.3.0 would fail to load it
    # (its data loader's dp_rank_1 state is missing); the script refuses it first, as `llmc launch` does (L018)
    b = tmp_path / "wsd"
    ck = _titan_checkpoint(b, 21, dp=1)
    _build(tmp_path, b, "training.schedule.kind=wsd", "training.steps=60", "hardware.count=2")
    before = trains()
    r = script(b)
    (line,) = [ln for ln in r.stderr.splitlines() if "error[R004]" in ln]
    assert r.returncode == 2 and trains() == before, r.stderr[-2000:]
    for said in ("dp 1 -> 2", str(ck), "--stage pretrain --step 21", "--no-resume --from pretrain"):
        assert said in line, (said, line)


@pytest.mark.parametrize("record", ['{"fingerprint_sha256": "abc", "fingerprint": {"parts": "x", "numbers": 3}}',
                                    'garbage{', '[1, 2]', '{"fingerprint_sha256": ""}'])
def test_a_damaged_torchtitan_record_refuses_the_resume_in_one_line_on_both_paths(tmp_path, record):
    """A FINGERPRINT.json whose fingerprint is not a mapping was error[INTERNAL] in `llmc launch` (and a traceback in
    the launch scripts' titan-start); one that cannot be parsed read as "no record", so the run resumed under this
    lock, whatever started it, and its record was overwritten. Both are one line refusing the resume now, the record
    kept; the way out under another RUN_DIR is the script's, naming the build's own assets/ nowhere."""
    import os
    import subprocess
    import sys

    from test_build_fakes import ROOT

    from llmc.launch import launch_commands
    from llmc.resume import resumptions

    b = tmp_path / "b"
    _build(tmp_path, b)
    _titan_started(b)
    _titan_checkpoint(b, 20, dp=1)
    f = b / "run" / "pretrain" / "FINGERPRINT.json"
    f.write_text(record)
    (found,) = resumptions(b, launch_commands(b, backend="torchtitan"))
    assert found.refusal is not None and found.lock_change, found
    r = cli("launch", str(b), "--backend", "torchtitan", "--dry-run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "error[L005]" in lines[0] and "INTERNAL" not in r.stderr, r.stderr
    # the launch scripts' check, with their run directory elsewhere (RUN_DIR): the script's own way out
    run = tmp_path / "elsewhere"
    (run / "pretrain").mkdir(parents=True)
    (run / "pretrain" / "FINGERPRINT.json").write_text(record)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "llmc.runtime.entry", "titan-start", "--lock", str(b / "plan.lock.json"),
                        "--assets", str(b), "--backend", "torchtitan", "--stage", "pretrain", "--out",
                        str(run / "pretrain")], env=env, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1 and "error[R004]" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "mv -- " in lines[0] and f"{b / 'assets'}" not in lines[0], lines[0]
    assert "checkpoints with it)" not in lines[0] and "with their torchtitan checkpoints" in lines[0], lines[0]
    assert (run / "pretrain" / "FINGERPRINT.json").read_text() == record == f.read_text()  # kept as it was
