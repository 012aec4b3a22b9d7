"""A stage's export, its provenance, and the commands llmc tells the user to run on a rebuilt directory.

* ``llmc export`` refuses a stage ``llmc launch`` refuses as stale (its DONE.json fingerprint is not the lock's, or
  it is unfinished and starts from such a stage): one ``error[R010]`` line; ``--allow-stale`` exports it with a
  warning, recorded. ``.llmc-export.json`` records the lock's sha256, the fingerprint of the run exported, the step
  and llmc's version.
* The L005 line names a command that, run as printed, sets the stage and every stage after it aside and trains them
  again (``llmc launch B --no-resume --from S``); a stage failing in it names a rerun that resumes it.
* A post-training stage whose final checkpoint was written whole but whose export failed (a full disk) is finished
  by the rerun from that checkpoint (export and DONE.json only), and the failed export leaves no temporary folder.

One micro pipeline (pretrain -> sft -> dpo -> grpo, 2-4 steps a stage) built and launched for real (module fixture);
the tests rebuild copies of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")

from test_safety_e2e import MICRO, cli  # noqa: E402

import llmc  # noqa: E402
from llmc.runtime.job import FINGERPRINT_SHA, fingerprint_record  # noqa: E402

STAGES = ("pretrain", "sft", "dpo", "grpo")


def _stage(name: str, kind: str, init: str, steps: int, records: str, **extra) -> dict:
    return {"name": name, "kind": kind, "init_from": init, "lr": 1e-3, "steps": steps, "global_batch_tokens": 256,
            "data": {"sources": [{"name": f"syn-{kind}", "format": "builtin", "kind": records}], "seq_len": 64,
                     "tokens": 20000}, **extra}


def _spec(d: Path) -> dict:
    from llmc.runtime import corpus

    d.mkdir(parents=True, exist_ok=True)
    corpus.write_corpus(d / "docs.jsonl", max_docs=300)
    return {"name": "micro-pipe", "model": MICRO, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl", "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512, "chat_template": "llama3"}, "seq_len": 32,
                     "tokens": 256 * 4},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": 4, "keep_latest": 2}, "log_every": 1},
            "stages": [{"name": "pretrain", "kind": "pretrain"},
                       _stage("sft", "sft", "pretrain", 2, "chat"),
                       _stage("dpo", "dpo", "sft", 2, "preference"),
                       _stage("grpo", "grpo", "dpo", 2, "prompts", grpo_group_size=2, prompts_per_step=1,
                              max_new_tokens=2, max_prompt_tokens=32)]}


def _write(d: Path, spec: dict, name: str) -> Path:
    p = d / name
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pipe")
    spec = _spec(d / "s")
    b = d / "b"
    assert cli("build", str(_write(d / "s", spec, "spec.yaml")), "-o", str(b)).returncode == 0
    r = cli("launch", str(b))
    assert r.returncode == 0, r.stderr[-3000:]
    for s in STAGES:
        assert (b / "run" / s / "DONE.json").is_file(), s
    return {"b": b, "s": d / "s", "spec": spec}


def _rebuilt(pipeline: dict, tmp_path: Path, stage: str, lr: float) -> Path:
    """A copy of the launched build directory, rebuilt with ``stage``'s lr changed."""
    c = tmp_path / "c"
    shutil.copytree(pipeline["b"], c, symlinks=True)
    spec = json.loads(json.dumps(pipeline["spec"]))
    next(s for s in spec["stages"] if s["name"] == stage)["lr"] = lr
    r = cli("build", str(_write(pipeline["s"], spec, f"spec-{tmp_path.name}.yaml")), "-o", str(c))
    assert r.returncode == 0, r.stderr
    return c


def _lines(text: str, tag: str) -> list[str]:
    return [ln for ln in text.splitlines() if tag in ln]


def _done(c: Path, stage: str) -> dict:
    return json.loads((c / "run" / stage / "DONE.json").read_text())


def test_export_refuses_a_stale_stage_and_records_its_provenance(pipeline, tmp_path):
    c = _rebuilt(pipeline, tmp_path, "grpo", 1e-4)
    lock = json.loads((c / "plan.lock.json").read_text())
    marker = c / "run/grpo/hf/.llmc-export.json"
    before = marker.read_bytes()
    # launch refuses grpo (its lr changed); export refuses it the same way, one located line, nothing written
    launch = cli("launch", str(c), "--dry-run")
    assert launch.returncode == 1 and len(_lines(launch.stderr, "error[L005]")) == 1, launch.stderr
    r = cli("export", str(c), "--stage", "grpo")
    err = _lines(r.stderr, "error[")
    assert r.returncode == 1 and len(err) == 1 and err[0].startswith(f"{c}: error[R010] export grpo: "), r.stderr
    assert "stage 'grpo' finished under another lock" in err[0] and "lr 0.001 -> 0.0001" in err[0], err[0]
    assert "--no-resume --from grpo" in err[0] and "--allow-stale" in err[0] and "Traceback" not in r.stderr
    assert marker.read_bytes() == before
    # a stage DeepSpeed trained (its DONE.json says so): the rerun the refusal prints trains it on DeepSpeed again
    done_path = c / "run/grpo/DONE.json"
    was = done_path.read_text()
    done_path.write_text(json.dumps({**json.loads(was), "backend": "deepspeed"}))
    r = cli("export", str(c), "--stage", "grpo")
    err = _lines(r.stderr, "error[")
    assert r.returncode == 1 and len(err) == 1 and "--from grpo" in err[0] and "--backend deepspeed" in err[0], err
    done_path.write_text(was)

    # --allow-stale: exported with a warning, recorded as stale
    r = cli("export", str(c), "--stage", "grpo", "--allow-stale")
    assert r.returncode == 0 and len(_lines(r.stderr, "warning[R015]")) == 1, r.stderr
    got = json.loads(marker.read_text())
    done = _done(c, "grpo")
    assert got["lock_sha256"] == hashlib.sha256((c / "plan.lock.json").read_bytes()).hexdigest()
    assert got["fingerprint_sha256"] == done[FINGERPRINT_SHA]  # what trained these weights (the old lock)
    assert got["lock_fingerprint_sha256"] == fingerprint_record(lock, "grpo")[FINGERPRINT_SHA] != done[FINGERPRINT_SHA]
    assert got["stale"] is True and "lr 0.001 -> 0.0001" in got["stale_reason"]
    # the step of the checkpoint exported: the one DONE.json names (its manifest's step)
    manifest = json.loads((c / "run/grpo" / done["checkpoint"] / "manifest.json").read_text())
    assert got["step"] == manifest["step"] == done["steps"] and got["llmc_version"] == llmc.__version__

    # a stage this lock trained exports as before, its provenance the lock's
    r = cli("export", str(c), "--stage", "dpo", "-o", str(tmp_path / "dpo-hf"))
    assert r.returncode == 0 and "warning[" not in r.stderr, r.stderr
    got = json.loads((tmp_path / "dpo-hf/.llmc-export.json").read_text())
    assert got["fingerprint_sha256"] == got["lock_fingerprint_sha256"] == _done(c, "dpo")[FINGERPRINT_SHA]
    assert got["stale"] is False and got["finished"] is True


def test_export_refuses_an_unfinished_stage_that_starts_from_a_stale_one(pipeline, tmp_path):
    """sft rebuilt (its lr); dpo left with its checkpoint but no DONE.json: launch and export both refuse dpo, since
    it starts from an sft another lock trained."""
    c = _rebuilt(pipeline, tmp_path, "sft", 5e-4)
    (c / "run/dpo/DONE.json").unlink()
    shutil.rmtree(c / "run/grpo")
    r = cli("export", str(c), "--stage", "dpo", "-o", str(tmp_path / "out"))
    err = _lines(r.stderr, "error[R010]")
    assert r.returncode == 1 and len(err) == 1 and "stage 'dpo' starts from stage 'sft'" in err[0], r.stderr
    assert "--no-resume --from sft" in err[0] and not (tmp_path / "out").exists()
    r = cli("export", str(c), "--stage", "dpo", "-o", str(tmp_path / "out"), "--allow-stale")
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "out/.llmc-export.json").read_text())
    assert got["stale"] is True and got["finished"] is False and got["fingerprint_sha256"] is None


def test_the_printed_commands_retrain_the_stage_and_the_ones_after_it(pipeline, tmp_path, monkeypatch):
    """sft's lr changed: the L005 command, run as printed, sets sft, dpo and grpo aside and trains them again
    (pretrain stays); a stage failing in it prints a rerun command that, run as printed, finishes the pipeline."""
    import llmc.cli as llmc_cli

    c = _rebuilt(pipeline, tmp_path, "sft", 5e-4)
    lock = json.loads((c / "plan.lock.json").read_text())
    old = {s: (c / "run" / s / "DONE.json").read_bytes() for s in STAGES}
    r = cli("launch", str(c))
    err = _lines(r.stderr, "error[L005]")
    assert r.returncode == 1 and [e.split("stage ", 1)[1].split()[0] for e in err] == ["'sft'", "'dpo'", "'grpo'"]
    cmd = re.findall(r"`(llmc launch [^`]*)`", err[0])
    assert len(cmd) == 1, err[0]

    # run it as printed, the dpo stage failing once
    real = llmc_cli._run_logged

    def failing(argv, **kw):
        if "dpo" in argv and "llmc.runtime.entry" in argv:
            return llmc_cli._StageRun(1, "RuntimeError: injected failure")
        return real(argv, **kw)

    monkeypatch.setattr(llmc_cli, "_run_logged", failing)
    r = cli(*shlex.split(cmd[0])[1:])
    monkeypatch.setattr(llmc_cli, "_run_logged", real)
    fail = _lines(r.stderr, "error[L002]")
    assert r.returncode == 1 and len(fail) == 1 and "stage 'dpo' failed" in fail[0], r.stderr
    for s in ("sft", "dpo", "grpo"):  # set aside, never deleted
        assert (c / "run" / f"{s}.set-aside-1" / "DONE.json").read_bytes() == old[s]
    rerun = re.findall(r"rerun `(llmc launch [^`]*)`", fail[0])
    assert len(rerun) == 1, fail[0]

    r = cli(*shlex.split(rerun[0])[1:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (c / "run/pretrain/DONE.json").read_bytes() == old["pretrain"]
    for s in ("sft", "dpo", "grpo"):
        assert _done(c, s)[FINGERPRINT_SHA] == fingerprint_record(lock, s)[FINGERPRINT_SHA], s
    # and the directory is this build's: a plain launch skips every stage
    r = cli("launch", str(c))
    assert r.returncode == 0 and all(f"{s}: skipped" in r.stdout for s in STAGES), (r.stdout, r.stderr)


@pytest.mark.parametrize("kind", ["grpo", "sft"])
def test_a_stage_whose_export_failed_is_finished_from_its_final_checkpoint(tmp_path, monkeypatch, kind):
    """The final checkpoint written whole, then ENOSPC in the export: the failed export leaves no temporary folder, and
    the rerun writes the export and DONE.json from that checkpoint without training a step again."""
    import safetensors.torch
    from test_posttrain_pipeline import TOK, _job, builtin

    from llmc.runtime import posttrain
    from llmc.spec.schema import make_stage as Stage

    if kind == "grpo":
        st = Stage(name="grpo", kind="grpo", data=builtin("grpo"), grpo_group_size=2, max_new_tokens=2,
                   prompts_per_step=1)
    else:
        st = Stage(name="sft", kind="sft", data=builtin("sft"), lora={"rank": 4, "alpha": 8, "targets": ["wq", "wv"]})
    job = _job(st, 4, 1e-3, batch=2).replace(checkpoint_interval=4)
    out = tmp_path / kind
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, *a, **kw):  # the export's first weight file: the disk is full
        if ".llmc-tmp-" in str(filename) and not calls["n"]:
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError) as e:
        posttrain.run_stage(job, out, tokenizer=TOK)
    assert e.value.errno == errno.ENOSPC and calls["n"] == 1
    final = out / "checkpoints" / "step-00000004"
    assert (final / "manifest.json").is_file() and not (out / "DONE.json").exists()
    assert not list(tmp_path.rglob("*.llmc-tmp-*")), list(tmp_path.rglob("*.llmc-tmp-*"))
    steps = (out / "metrics.jsonl").read_text()

    trained = {"sft": "train_sft", "grpo": "train_grpo"}[kind]
    module = __import__(f"llmc.runtime.{kind}", fromlist=[trained])

    def no_training(*a, **kw):
        raise AssertionError("the stage was trained again")

    monkeypatch.setattr(module, trained, no_training)
    res = posttrain.run_stage(job, out, tokenizer=TOK)
    done = json.loads((out / "DONE.json").read_text())
    assert res["status"] == done["status"] == "done" and done["step"] == done["steps"] == 4
    assert (out / "hf/config.json").is_file() and (out / "metrics.jsonl").read_text() == steps
    assert json.loads((out / "hf/.llmc-export.json").read_text())["step"] == 4
    if kind == "sft":
        assert (out / "hf/adapter/adapter_model.safetensors").is_file()
