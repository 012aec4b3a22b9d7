"""Every command llmc prints to retrain a stage runs as printed, and the launch scripts agree with `llmc launch`.

* The launch scripts skip no finished stage that ``llmc launch`` refuses: a stage whose data changed after it
  finished (its DONE.json's ``data_files``) is refused by the script too (the runtime's ``check``, the one check),
  not skipped because its lock fingerprint still matches.
* After ``llmc launch B --backend deepspeed`` every rerun command it prints (the skip lines, L005) carries
  ``--backend deepspeed``, and the printed command, run (``--dry-run``), trains the stage on DeepSpeed again; X013 of
  a rebuild names the backend that trained the stage (its DONE.json's) when it is not the build's default.
* A script run with its run directory outside the build (RUN_DIR), where ``llmc launch`` cannot train, prints the
  script's own way (set aside, run the script again), which run as printed trains the stage again there.
* A rebuild of an unchanged spec under an llmc whose default changed (warmup_steps) says X013's change is llmc's
  default and names the pin that keeps the finished run valid; pinning it does.

No stage trains: the finished runs are DONE.json records written as llmc's trainers write them
(``llmc.runtime.job.fingerprint_record``), after the real prepare (tokenizer, fingerprints).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_safety_e2e import MICRO, cli

ROOT = Path(__file__).resolve().parents[1]


def _spec(d: Path, pin_warmup: int | None = None) -> Path:
    """pretrain (40 steps: llmc chooses its warmup) -> sft on chat.jsonl, on a small local corpus."""
    d.mkdir(parents=True, exist_ok=True)
    docs = [{"text": f"document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(60))} for i in range(80)]
    (d / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    chat = [{"messages": [{"role": "user", "content": f"what is {i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(30)]
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    training = {"precision": "fp32", "global_batch_tokens": 256, "steps": 40, "optimizer": {"lr": 3e-3},
                "checkpoint": {"interval_steps": 20}}
    if pin_warmup is not None:
        training["schedule"] = {"warmup_steps": pin_warmup}
    spec = {"name": "printed", "model": MICRO, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "corpus.jsonl", "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512, "chat_template": "llama3"}, "seq_len": 32,
                     "tokens": 10240},
            "training": training,
            "stages": [{"name": "pretrain", "kind": "pretrain"},
                       {"name": "sft", "kind": "sft", "init_from": "pretrain", "steps": 4, "lr": 1e-4,
                        "global_batch_tokens": 128,
                        "data": {"sources": [{"name": "chat", "path": "chat.jsonl", "format": "jsonl",
                                              "kind": "chat"}], "seq_len": 32, "tokens": 2000}}]}
    p = d / "spec.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def _env(**extra: str) -> dict:
    """The scripts' environment: this checkout's llmc, and `python` / `torchrun` this interpreter's."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", **extra}


def _prepare(b: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "llmc.runtime.entry", "prepare", "--lock", str(b / "plan.lock.json")],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def _finish(b: Path, spec_dir: Path, stages=("pretrain", "sft"), run: Path | None = None, lock: dict | None = None,
            **fields) -> None:
    """Mark ``stages`` finished in ``run`` (default b/run) as llmc's trainers do: the tokenizer copy, then DONE.json
    with ``fingerprint_record`` of ``lock`` (default the build's)."""
    from llmc.runtime.job import fingerprint_record, keep_tokenizer

    lock = lock or json.loads((b / "plan.lock.json").read_text())
    run = run or b / "run"
    for s in stages:
        out = run / s
        out.mkdir(parents=True, exist_ok=True)
        keep_tokenizer(b / "assets", out)
        record = fingerprint_record(lock, s, b, stage_dir=out, spec_dir=spec_dir)
        (out / "DONE.json").write_text(json.dumps({"status": "done", "stage": s, **fields, **record}, indent=2))


def _commands(text: str) -> list[str]:
    """Every `llmc launch ...` command in backticks."""
    return re.findall(r"`(llmc launch [^`]*)`", text)


def _options(cmd: str) -> tuple[str, dict[str, str | bool]]:
    """(the build directory, {option: value, or True for a flag}) of an `llmc launch` command line."""
    argv = shlex.split(cmd)[2:]
    build, opts, i = argv[0], {}, 1
    while i < len(argv):
        if argv[i] in ("--from", "--stage", "--backend", "--nproc"):
            opts[argv[i]], i = argv[i + 1], i + 2
        else:
            opts[argv[i]], i = True, i + 1
    return build, opts


@pytest.fixture()
def built(tmp_path) -> tuple[Path, Path]:
    spec = _spec(tmp_path / "s")
    b = tmp_path / "b"
    assert cli("build", str(spec), "-o", str(b)).returncode == 0
    _prepare(b)
    return b, spec.parent


def test_the_scripts_refuse_a_finished_stage_whose_data_changed_as_llmc_launch_does(built):
    b, s = built
    _finish(b, s)
    r = subprocess.run(["bash", str(b / "native/launch.sh")], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "stage sft: done" in r.stdout, r.stdout + r.stderr  # (this build's: skipped)

    (s / "chat.jsonl").write_text((s / "chat.jsonl").read_text().replace("what is", "WHAT IS"))
    r = cli("launch", str(b), "--dry-run")
    assert r.returncode == 1 and "error[L005] stage 'sft' finished from other data" in r.stderr, r.stderr
    for script in ("native/launch.sh", "launch/torchrun_single_node.sh"):
        r = subprocess.run(["bash", str(b / script)], env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (script, r.stdout, r.stderr)
        assert "stage sft: done" not in r.stdout, (script, r.stdout)
        err = [ln for ln in r.stderr.splitlines() if "error[R004]" in ln]
        assert len(err) == 1 and "sft" in err[0] and "from other data" in err[0] and "'chat'" in err[0], r.stderr
        # the command it prints, in the build's own run/: llmc launch on the script's backend
        (cmd,) = _commands(err[0])
        assert _options(cmd) == (str(b), {"--backend": "native", "--no-resume": True, "--from": "sft"}), cmd


def test_every_rerun_command_after_backend_deepspeed_carries_it(built, tmp_path):
    b, s = built
    assert (b / "deepspeed" / "ds_config.json").is_file()
    _finish(b, s, backend="deepspeed")
    r = cli("launch", str(b), "--backend", "deepspeed")  # every stage finished: skipped, nothing runs
    skips = [ln for ln in r.stdout.splitlines() if ": skipped: " in ln and "already finished" in ln]
    assert r.returncode == 0 and len(skips) == 2, r.stdout + r.stderr
    printed = [c for ln in skips for c in _commands(ln)]

    (s / "corpus.jsonl").write_text((s / "corpus.jsonl").read_text().replace("document", "DOCUMENT"))
    r = cli("launch", str(b), "--backend", "deepspeed", "--dry-run")
    l005 = [ln for ln in r.stderr.splitlines() if "error[L005]" in ln]
    assert r.returncode == 1 and l005 and "stage 'pretrain' finished from other data" in l005[0], r.stderr
    printed += [c for ln in l005 for c in _commands(ln)]

    # a rebuild (another lr): X013 names the backend that trained the stage, not the build's default (native)
    spec = yaml.safe_load((s / "spec.yaml").read_text())
    spec["training"]["optimizer"]["lr"] = 2e-3
    (s / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    r = cli("build", str(s / "spec.yaml"), "-o", str(b))
    x013 = [ln for ln in r.stderr.splitlines() if "warning[X013]" in ln]
    assert r.returncode == 0 and x013, r.stderr
    printed += [c for ln in x013 for c in _commands(ln)]

    assert len(printed) >= 5, printed
    for cmd in printed:
        assert _options(cmd)[0] == str(b) and _options(cmd)[1].get("--backend") == "deepspeed", cmd
    # run as printed (planned only): pretrain trains on DeepSpeed again, set aside first
    argv = shlex.split(next(c for c in printed if _options(c)[1].get("--from") == "pretrain"))
    r = cli(*argv[1:], "--dry-run")
    assert r.returncode == 0, r.stderr
    plan = [ln for ln in r.stdout.splitlines() if ln.startswith("+ ")]
    assert any("llmc.runtime.ds_train" in ln and "--stage pretrain" in ln for ln in plan), plan


def test_a_script_with_another_run_dir_prints_the_scripts_way_which_retrains_there(built, tmp_path):
    b, s = built
    run = tmp_path / "elsewhere" / "run"
    _finish(b, s, run=run)
    (s / "chat.jsonl").write_text((s / "chat.jsonl").read_text().replace("what is", "WHAT IS"))
    r = subprocess.run(["bash", str(b / "native/launch.sh")], env=_env(RUN_DIR=str(run)), capture_output=True,
                       text=True, timeout=300)
    err = [ln for ln in r.stderr.splitlines() if "error[R004]" in ln]
    assert r.returncode == 2 and len(err) == 1 and "sft" in err[0], r.stdout + r.stderr
    assert not _commands(err[0]), err[0]  # (`llmc launch` would train in b/run, not here)
    move = re.search(r"`(mv -- [^`]*)`", err[0])
    assert move and "run the same launch script again" in err[0], err[0]

    # as printed: the stage is set aside, and the script run again trains it (a stand-in torchrun records the call)
    subprocess.run(["bash", "-c", move.group(1)], check=True)
    assert not (run / "sft").exists() and (run / "sft.set-aside-1" / "DONE.json").is_file()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text(f'#!/bin/bash\necho "$@" >> {shlex.quote(str(tmp_path / "calls"))}\n')
    (fake / "torchrun").chmod(0o755)
    env = _env(RUN_DIR=str(run))
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    r = subprocess.run(["bash", str(b / "native/launch.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1 and f"--stage sft --out {run}/sft" in calls[0], calls


def test_x013_of_a_changed_default_names_it_and_the_pin_that_keeps_the_run(tmp_path):
    from llmc.compiler.defaults import default_warmup

    spec = _spec(tmp_path / "s")
    b = tmp_path / "b"
    assert cli("build", str(spec), "-o", str(b)).returncode == 0
    lock = json.loads((b / "plan.lock.json").read_text())
    now = default_warmup(40)
    assert "warmup_steps" in lock["hyper"]["defaults"] and lock["stages"][0]["warmup_steps"] == now
    # the run an llmc with another default trained: its lock's pretrain warmup was another number
    old = json.loads(json.dumps(lock))
    old["stages"][0]["warmup_steps"] = was = now - 1
    _finish(b, spec.parent, stages=("pretrain",), lock=old)

    r = cli("build", str(spec), "-o", str(b))  # the same spec, rebuilt
    x013 = [ln for ln in r.stderr.splitlines() if "warning[X013]" in ln and "'pretrain'" in ln]
    assert r.returncode == 0 and len(x013) == 1, r.stderr
    assert f"warmup_steps {was} -> {now} (llmc's default changed: the spec does not set it)" in x013[0], x013
    assert f"`training.schedule.warmup_steps: {was}`" in x013[0], x013
    r = cli("launch", str(b), "--dry-run")
    assert r.returncode == 1 and f"`training.schedule.warmup_steps: {was}`" in r.stderr, r.stderr

    # the pin, as said: the finished run is this build's again
    _spec(tmp_path / "s", pin_warmup=was)
    r = cli("build", str(spec), "-o", str(b))
    assert r.returncode == 0 and "X013" not in r.stderr, r.stderr
    r = cli("launch", str(b), "--dry-run")
    assert r.returncode == 0 and "L005" not in r.stderr, r.stderr
