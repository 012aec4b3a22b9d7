"""Untrusted files on the run path (a security reviewer's findings): a checkpoint never unpickles code (llmc's own files
read with ``torch.load(weights_only=True)``, an earlier llmc's RNG format through ``safe_globals``, DCP metadata and
DeepSpeed files vetted before the libraries' own ``pickle.load`` / ``weights_only=False`` read them); ``llmc launch`` and
prepare never write through a link in the build directory; prepare reads a tokenizer file only when it is a regular
file within the plan's cap; and every runtime entry refuses a lock edited after ``llmc build`` wrote it."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_build_fakes import ROOT, compile_example, compile_text
from typer.testing import CliRunner

from llmc.buildfs import write_build
from llmc.cli import app
from llmc.emit import render_artifacts
from llmc.runtime import checkpoint as ck
from llmc.runtime.errors import CheckpointError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


class _Payload:
    """What an attacker plants: unpickling it runs ``os.system('touch MARKER')``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_checkpoint(folder: Path, sharded: bool) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    return ck.save_checkpoint(folder, 2, m, opt, {"tokens": 8}, sharded=sharded), m, opt


def _rehash(step_dir: Path, rel: str) -> None:
    """Update the manifest's bytes / sha256 of ``rel`` (the attacker can write the manifest too)."""
    mf = step_dir / "manifest.json"
    man = json.loads(mf.read_text())
    data = (step_dir / rel).read_bytes()
    man["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mf.write_text(json.dumps(man))


def _plant_torch(f: Path, marker: Path) -> None:
    obj = torch.load(f, weights_only=False)  # (the attacker's side: it reads its own file as it likes)
    obj = {**obj, "pwn": _Payload(marker)} if isinstance(obj, dict) else {"data": obj, "pwn": _Payload(marker)}
    torch.save(obj, f)


# ----------------------------------------------------------------------------- 1. checkpoints never unpickle code


@pytest.mark.parametrize("sharded", [False, True])
def test_llmc_checkpoint_files_read_with_weights_only(tmp_path, sharded):
    """Every file llmc writes in a checkpoint reads with torch's own restricted loader (no NumPy pickle), and the
    RNG states still come back exactly."""
    np.random.seed(5)
    random.seed(5)
    step, m, opt = _tiny_checkpoint(tmp_path / "ck", sharded)
    want_np, want_py, want_t = np.random.rand(4), random.random(), torch.rand(4)
    for f in sorted(step.rglob("*.pt")):
        torch.load(f, map_location="cpu", weights_only=True)  # raises UnpicklingError on a pickled ndarray
    np.random.seed(9)
    random.seed(9)
    torch.manual_seed(9)
    ck.load_checkpoint(step, m, opt)
    assert np.array_equal(np.random.rand(4), want_np)
    assert random.random() == want_py
    assert torch.equal(torch.rand(4), want_t)


@pytest.mark.parametrize("sharded", [False, True])
def test_planted_payload_in_rank_file_is_refused_unrun(tmp_path, sharded):
    step, m, opt = _tiny_checkpoint(tmp_path / "ck", sharded)
    marker = tmp_path / "PWNED"
    _plant_torch(step / "rank-0.pt", marker)
    _rehash(step, "rank-0.pt")
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(step, m, opt)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and "rank-0.pt" in msg and "posix.system" in msg and "hint:" in msg


def test_planted_payload_in_optimizer_file_is_refused_unrun(tmp_path):
    step, m, opt = _tiny_checkpoint(tmp_path / "ck", sharded=False)
    marker = tmp_path / "PWNED"
    _plant_torch(step / "optimizer.pt", marker)
    _rehash(step, "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt: refusing to load it"):
        ck.load_checkpoint(step, m, opt)
    assert not marker.exists()


def test_planted_payload_in_dcp_metadata_is_refused_unrun(tmp_path):
    """torch.distributed.checkpoint reads ``.metadata`` with a plain pickle.load: llmc vets it first."""
    step, m, opt = _tiny_checkpoint(tmp_path / "ck", sharded=True)
    marker = tmp_path / "PWNED"
    meta = step / "dcp" / ".metadata"
    md = pickle.loads(meta.read_bytes())
    md.planner_data = {"x": _Payload(marker)}
    meta.write_bytes(pickle.dumps(md))
    _rehash(step, "dcp/.metadata")
    for load in (lambda: ck.load_checkpoint(step, m, opt), lambda: ck.read_model_state(step),
                 lambda: ck.checkpoint_shapes(step)):
        with pytest.raises(CheckpointError, match=r"\.metadata: refusing to load it: it pickles posix\.system"):
            load()
    assert not marker.exists()


def test_checkpoint_of_the_previous_format_still_resumes(tmp_path, monkeypatch):
    """The previous llmc pickled ``np.random.get_state()`` (a tuple holding a uint32 ndarray) in rank-R.pt: such a
    checkpoint resumes (NumPy's reconstruct globals allowed for it alone), with its RNG states."""
    def old_rng_state() -> dict:  # the previous llmc's llmc.runtime.checkpoint.rng_state
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}

    monkeypatch.setattr(ck, "rng_state", old_rng_state)
    np.random.seed(3)
    step, m, opt = _tiny_checkpoint(tmp_path / "ck", sharded=False)
    want = np.random.rand(4)
    monkeypatch.undo()
    with pytest.raises(pickle.UnpicklingError):  # the old format indeed needs more than weights_only allows
        torch.load(step / "rank-0.pt", weights_only=True)
    np.random.seed(11)
    assert ck.load_checkpoint(step, m, opt)["tokens"] == 8
    assert np.array_equal(np.random.rand(4), want)


def _ds_tag(tmp_path: Path, marker: Path | None) -> Path:
    """A DeepSpeed-shaped tag folder (``mp_rank_00_model_states.pt``), with a planted payload when ``marker``."""
    tag = tmp_path / "ds_checkpoints" / "step-00000002"
    tag.mkdir(parents=True)
    state = {"module": {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}, "ds_version": "0.19.8",
             "step": 2, "tokens": 8}
    if marker is not None:
        state["pwn"] = _Payload(marker)
    torch.save(state, tag / "mp_rank_00_model_states.pt")
    (tag.parent / "latest").write_text(tag.name)
    return tag


def test_deepspeed_checkpoint_with_payload_is_refused_before_deepspeed_reads_it(tmp_path):
    """DeepSpeed's own loaders use weights_only=False: llmc reads its files with weights_only=True first."""
    from llmc.runtime.evaluate import ds_checkpoint_state

    marker = tmp_path / "PWNED"
    tag = _ds_tag(tmp_path, marker)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: refusing to load it"):
        ck.check_deepspeed_files(tag)
    with pytest.raises(CheckpointError, match="refusing to load it"):
        ds_checkpoint_state(tag.parent, tag.name)
    assert not marker.exists()
    clean = _ds_tag(tmp_path / "clean", None)
    ck.check_deepspeed_files(clean)
    assert set(ds_checkpoint_state(clean.parent, clean.name)) == {"weight", "bias"}


def test_deepspeed_own_checkpoint_passes_the_vetting(tmp_path):
    """A real DeepSpeed 0.19.8 ZeRO-2 checkpoint (its loss scaler, ZeRO stage enum and fragment addresses) reads with
    weights_only=True and :func:`deepspeed_globals` alone."""
    script = f"""
import os, torch
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29617")
import deepspeed
from llmc.runtime.ds_train import init_deepspeed_distributed  # gloo, without DeepSpeed's CPU shm op (minutes to build)
init_deepspeed_distributed()
m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
cfg = {{"train_micro_batch_size_per_gpu": 2, "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3, "torch_adam": True}}}},
       "zero_optimization": {{"stage": 2}}}}
eng, _, _, _ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
eng.backward(eng(torch.randn(2, 4)).sum()); eng.step()
eng.save_checkpoint({str(tmp_path / "ds")!r}, tag="step-00000001")
"""
    r = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tag = tmp_path / "ds" / "step-00000001"
    assert any(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)) for f in tag.glob("*.pt"))
    ck.check_deepspeed_files(tag)


# ----------------------------------------------------------------------------- 2. no writes through links


def _tiny_build(tmp_path: Path) -> Path:
    out = tmp_path / "b"
    write_build(out, render_artifacts(compile_example(ROOT / "examples" / "tiny_cpu.yaml")))
    return out


def _user_model(tmp_path: Path) -> dict[str, str]:
    d = tmp_path / "usermodel"
    d.mkdir()
    files = {"tokenizer.json": '{"mine": 1}', "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
             "chat_template.jinja": "{{ x }}"}
    for k, v in files.items():
        (d / k).write_text(v)
    return files


def _snapshot(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("where", ["assets", "assets/tokenizer.json", "data/python-docs.jsonl"])
def test_launch_refuses_a_link_where_the_run_writes(tmp_path, where):
    b = _tiny_build(tmp_path)
    files = _user_model(tmp_path)
    link = b / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(tmp_path / "usermodel")
    r = CliRunner().invoke(app, ["launch", str(b), "--dry-run"])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error[L001]" in lines[0] and str(link) in lines[0], r.output
    assert "never writes through links" in lines[0] and "overwrites and deletes its files by name" in lines[0]
    assert _snapshot(tmp_path / "usermodel") == files


def test_w_and_bs_own_links_in_a_stage_folder_do_not_stop_a_relaunch(tmp_path, monkeypatch):
    """W&B (on by default where installed, offline) fills ``run/<stage>/wandb`` with links of its own
    (``latest-run``, ``debug.log``, ``debug-internal.log``): the relaunch of a preempted run was refused (L001, "a
    symbolic link ... on a path the run writes") although llmc never writes there. A link llmc would write through is
    still refused."""
    wandb = pytest.importorskip("wandb")
    from llmc.runtime.observe import RunLogger

    b = _tiny_build(tmp_path)
    stage = b / "run" / "pretrain"
    stage.mkdir(parents=True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLogger(stage, total_steps=2, run_name="t", tensorboard=False, wandb=True, echo=False)
    assert log.wandb_run is not None, log.wandb_skipped
    log.log({"step": 1, "loss": 3.0})
    log.close()
    links = [p for p in (stage / "wandb").rglob("*") if p.is_symlink()]
    assert links, f"W&B {wandb.__version__} made no links: the test is not testing"
    r = CliRunner().invoke(app, ["launch", str(b), "--dry-run"])
    assert r.exit_code == 0 and "L001" not in r.output, r.output
    (stage / "metrics.jsonl").symlink_to(stage / "wandb" / "latest-run")  # a link llmc writes through
    r = CliRunner().invoke(app, ["launch", str(b), "--dry-run"])
    assert r.exit_code == 1 and "error[L001]" in r.output and "metrics.jsonl" in r.output, r.output
    # a stage folder named wandb (run/wandb) is not W&B's: the links in it are checked
    from llmc.launch import linked_write_path

    (stage / "metrics.jsonl").unlink()
    (b / "run" / "wandb").mkdir()
    (b / "run" / "wandb" / "metrics.jsonl").symlink_to(tmp_path / "user.txt")
    assert linked_write_path(b, json.loads((b / "plan.lock.json").read_text())) == b / "run" / "wandb" / "metrics.jsonl"


def test_launch_allows_a_linked_source_folder_in_data(tmp_path):
    """``data/web`` (a user's source folder) is read, never written: a link there is the user's business."""
    b = _tiny_build(tmp_path)
    _user_model(tmp_path)
    (b / "data").mkdir(exist_ok=True)
    (b / "data" / "web").symlink_to(tmp_path / "usermodel")
    r = CliRunner().invoke(app, ["launch", str(b), "--dry-run"])
    assert r.exit_code == 0, r.output


def test_prepare_never_writes_through_a_linked_assets_folder(tmp_path):
    """The emitted launchers run prepare without `llmc launch`: it refuses the link itself, touching nothing."""
    b = _tiny_build(tmp_path)
    files = _user_model(tmp_path)
    (b / "assets").symlink_to(tmp_path / "usermodel")
    r = subprocess.run([sys.executable, "-m", "llmc.runtime.entry", "prepare", "--lock", str(b / "plan.lock.json")],
                       env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1
    assert "is a symbolic link: prepare never writes through links" in r.stderr and len(r.stderr.splitlines()) == 1
    assert _snapshot(tmp_path / "usermodel") == files


# ----------------------------------------------------------------------------- 3. tokenizer files: regular, capped


def _tokenizer_build(tmp_path: Path, tok_dir: Path) -> Path:
    text = (ROOT / "examples" / "tiny_cpu.yaml").read_text()
    import yaml

    spec = yaml.safe_load(text)
    spec["data"]["tokenizer"] = {"path": str(tok_dir)}
    out = tmp_path / "b"
    write_build(out, render_artifacts(compile_text(yaml.safe_dump(spec))))
    return out


def _prepare_limited(b: Path) -> subprocess.CompletedProcess:
    def limit():  # (a prepare that reads /dev/zero whole must fail here, not take the host's memory)
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    return subprocess.run([sys.executable, "-m", "llmc.runtime.entry", "prepare", "--lock", str(b / "plan.lock.json")],
                          env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=limit, cwd=b.parent)


def test_prepare_refuses_a_tokenizer_that_is_a_device(tmp_path):
    tok = tmp_path / "tokf"
    tok.mkdir()
    (tok / "tokenizer.json").symlink_to("/dev/zero")
    r = _prepare_limited(_tokenizer_build(tmp_path, tok))
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert "tokenizer.json is not a regular file" in r.stderr and "prepare stops here" in r.stderr


def test_prepare_refuses_a_tokenizer_file_over_the_cap(tmp_path):
    from llmc.spec.facts import MAX_TOKENIZER_BYTES

    tok = tmp_path / "tokbig"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    with open(tok / "tokenizer_config.json", "wb") as f:  # sparse: no disk used
        f.truncate(MAX_TOKENIZER_BYTES + 1)
    b = _tokenizer_build(tmp_path, tok)
    r = _prepare_limited(b)
    assert r.returncode == 1
    assert f"{MAX_TOKENIZER_BYTES + 1:,} bytes, more than" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (b / "assets" / "tokenizer_config.json").exists()


# ----------------------------------------------------------------------------- 4. an edited lock runs nowhere


def _edit_lock(b: Path, old: str, new: str) -> str:
    p = b / "plan.lock.json"
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new))
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _lr_edit(b: Path) -> str:
    lock = json.loads((b / "plan.lock.json").read_text())
    lr = lock["hyper"]["lr"]
    return _edit_lock(b, f'"lr": {json.dumps(lr)}', '"lr": 0.0421')


@pytest.mark.parametrize("module", ["llmc.runtime.entry prepare", "llmc.runtime.entry", "llmc.runtime.ds_train",
                                    "llmc.runtime.evaluate"])
def test_runtime_refuses_an_edited_lock(tmp_path, module):
    b = _tiny_build(tmp_path)
    sha = _lr_edit(b)
    mod, *sub = module.split()
    argv = [sys.executable, "-m", mod, *sub, "--lock", str(b / "plan.lock.json")]
    if mod == "llmc.runtime.ds_train":
        argv += ["--ds-config", str(b / "deepspeed" / "ds_config.json")]
    if mod == "llmc.runtime.evaluate":
        argv += ["--stage", "pretrain", "--out", str(b / "run" / "pretrain")]
    r = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1
    err = [ln for ln in r.stderr.splitlines() if "error[" in ln]
    assert len(err) == 1, r.stderr[-3000:]
    assert "error[L001] plan.lock.json was changed after `llmc build` wrote it" in err[0]
    assert "rebuild with `llmc build`" in err[0] and f"LLMC_ACCEPT_LOCK_SHA256={sha}" in err[0]
    assert not (b / "assets" / "tokenizer.json").exists()


def test_accepting_an_edited_lock_takes_its_own_sha256(tmp_path, monkeypatch):
    from llmc.launch import launch_commands
    from llmc.runtime.entry import ACCEPT_LOCK_ENV, check_lock_unedited

    b = _tiny_build(tmp_path)
    assert check_lock_unedited(b / "plan.lock.json") is None
    sha = _lr_edit(b)
    monkeypatch.setenv(ACCEPT_LOCK_ENV, "0" * 64)
    assert "error[L001]" in check_lock_unedited(b / "plan.lock.json")
    monkeypatch.setenv(ACCEPT_LOCK_ENV, sha)
    assert check_lock_unedited(b / "plan.lock.json") is None
    # `llmc launch --force` reaches launch_commands with the edited lock: every command carries its sha256
    assert all(c.env.get(ACCEPT_LOCK_ENV) == sha for c in launch_commands(b, gpu=False))


def test_torchtitan_job_refuses_an_edited_lock(tmp_path, capsys):
    import importlib.util

    out = tmp_path / "b"
    write_build(out, render_artifacts(compile_example(ROOT / "examples" / "llama3_8b_h100x8.yaml")))
    sha = _lr_edit(out)
    spec = importlib.util.spec_from_file_location("llmc_job_edited", out / "torchtitan" / "llmc_job.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        mod.job()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error[L001] plan.lock.json was changed after `llmc build` wrote it" in err and sha in err


def test_a_lock_spec_error_is_one_located_line(tmp_path):
    b = _tiny_build(tmp_path)
    sha = _edit_lock(b, '"folder": "checkpoints"', '"folder": "../../../X"')
    env = {**ENV, "LLMC_ACCEPT_LOCK_SHA256": sha}
    r = subprocess.run([sys.executable, "-m", "llmc.runtime.entry", "prepare", "--lock", str(b / "plan.lock.json")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "spec.resolved.training.checkpoint.folder" in r.stderr and "'../../../X'" in r.stderr


# ----------------------------------------------------------------------------- 5. DCP entries that are not tensors


def _sharded_with_planted_param_group(tmp_path: Path, marker: Path) -> tuple[Path, torch.nn.Module,
                                                                             torch.optim.Optimizer]:
    """A real sharded checkpoint whose optimizer entry ``param_groups[0]["lr"]`` is re-saved as a payload (the
    attacker rewrites the DCP shards and the manifest's sizes / hashes)."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    step, m, opt = _tiny_checkpoint(tmp_path / "ck", sharded=True)
    msd, osd = get_state_dict(m, opt)
    osd["param_groups"][0]["lr"] = _Payload(marker)
    shutil.rmtree(step / "dcp")
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(step / "dcp"))
    man = json.loads((step / "manifest.json").read_text())
    man["files"] = {k: v for k, v in man["files"].items() if not k.startswith("dcp/")}
    (step / "manifest.json").write_text(json.dumps(man))
    for f in sorted((step / "dcp").iterdir()):
        _rehash(step, f"dcp/{f.name}")
    return step, m, opt


def test_planted_payload_in_a_dcp_param_group_is_refused_unrun(tmp_path):
    """torch's ``DefaultLoadPlanner.load_bytes`` reads every non-tensor DCP entry with ``weights_only=False``: llmc's
    planner reads them with ``weights_only=True``, so the payload in ``optim.param_groups.0.lr`` never runs."""
    marker = tmp_path / "PWNED"
    step, _, _ = _sharded_with_planted_param_group(tmp_path, marker)
    ck.check_dcp_metadata(step / "dcp")  # (the metadata itself is clean: the payload is in a shard)
    m2 = torch.nn.Linear(3, 4)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(step, m2, opt2)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and "optim.param_groups.0.lr" in msg and "posix.system" in msg and "hint:" in msg
    ck.read_model_state(step)  # the model's tensors alone (an export) still read: the entry is never loaded
    assert not marker.exists()


def test_a_genuine_sharded_checkpoint_resumes_its_param_groups(tmp_path):
    """Every non-tensor entry an AdamW DCP checkpoint holds (lr, betas, eps, weight_decay, flags, parameter names)
    reads with ``weights_only=True``: resuming restores them, and the moments, exactly."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    torch.manual_seed(0)
    m = torch.nn.Linear(3, 4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05, amsgrad=True)
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    step = ck.save_checkpoint(tmp_path / "ck", 1, m, opt, {"tokens": 8}, sharded=True)
    md = FileSystemReader(str(step / "dcp")).read_metadata().state_dict_metadata
    assert any(k.startswith("optim.param_groups.0.") and isinstance(v, BytesStorageMetadata) for k, v in md.items())
    m2 = torch.nn.Linear(3, 4)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1.0, betas=(0.1, 0.2), eps=0.5, weight_decay=0.0, amsgrad=True)
    assert ck.load_checkpoint(step, m2, opt2)["tokens"] == 8
    want = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    assert {k: opt2.param_groups[0][k] for k in want} == want
    for p, q in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])


# ----------------------------------------------------------------------------- 6. links: refused only where llmc
# overwrites or deletes files by name (assets/, data/ when prepare writes there), allowed to a directory outside the
# build in run/, outputs/, cache/


def _launch(b: Path, *extra: str):
    return CliRunner().invoke(app, ["launch", str(b), "--dry-run", *extra])


def _own_source_build(tmp_path: Path) -> Path:
    """A spec with one local jsonl source, no builtin corpus, no quality section, no validation: prepare writes
    nothing in data/."""
    corp = tmp_path / "corp"
    corp.mkdir()
    (corp / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(200)))
    text = (f"name: own-src\nmodel: tiny\nhardware: {{gpu: cpu, count: 1}}\n"
            f"data:\n  sources:\n    - {{name: docs, path: {corp / 'docs.jsonl'}, format: jsonl}}\n"
            f"  tokenizer: {{train: true, vocab_size: 512}}\n  seq_len: 64\n  tokens: 20K\n"
            f"training:\n  precision: fp32\n  global_batch_tokens: 1024\n")
    out = tmp_path / "b3"
    write_build(out, render_artifacts(compile_text(text)))
    return out


def _prepare(b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc.runtime.entry", "prepare", "--lock", str(b / "plan.lock.json")],
                          env=ENV, capture_output=True, text=True, timeout=300, cwd=b.parent)


def test_a_linked_data_folder_is_fine_when_prepare_writes_nothing_there(tmp_path):
    """``data -> a dataset mount``: launch and prepare (the emitted launchers run it alone) both accept it, and prepare
    writes nothing through it."""
    b = _own_source_build(tmp_path)
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "theirs.txt").write_text("x")
    (b / "data").symlink_to(mount)
    r = _launch(b)
    assert r.exit_code == 0, r.output
    p = _prepare(b)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(x.name for x in mount.iterdir()) == ["theirs.txt"]
    assert (b / "assets" / "tokenizer.json").is_file()


def test_a_linked_data_folder_is_refused_where_prepare_writes_a_corpus(tmp_path):
    """tiny_cpu writes its builtin corpus to data/python-docs.jsonl (and holds out validation in data/split): a data/
    link is refused by launch and by prepare alike, with the way out, and nothing is written through it."""
    b = _tiny_build(tmp_path)
    mount = tmp_path / "mount"
    mount.mkdir()
    (b / "data").symlink_to(mount)
    r = _launch(b)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "error[L001]" in lines[0] and f"{b / 'data'} is a" in lines[0]
    assert "data/<name> -> your mount" in lines[0], r.output
    p = _prepare(b)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert "is a symbolic link: prepare never writes through links" in p.stderr and "data/<name>" in p.stderr
    assert list(mount.iterdir()) == []


def test_a_scratch_disk_link_for_the_runs_checkpoints_is_allowed_with_a_note(tmp_path):
    """run/, outputs/ (a torchtitan stage's), cache/ (the validation tokens): llmc writes only its own names there, so
    a link to a directory outside the build directory is the user's choice of disk, named in a note line."""
    b = _tiny_build(tmp_path)
    scratch = tmp_path / "scratch"
    for sub in ("ck", "outputs", "cache"):
        (scratch / sub).mkdir(parents=True)
    (b / "run" / "pretrain").mkdir(parents=True)
    (b / "run" / "pretrain" / "checkpoints").symlink_to(scratch / "ck")
    (b / "outputs").symlink_to(scratch / "outputs")
    (b / "cache").symlink_to(scratch / "cache")
    r = _launch(b, "--backend", "native")
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.output.splitlines() if ": note: " in ln]
    # (native: no torchtitan stage runs, so outputs/ is not looked at)
    assert len(notes) == 2 and all("outside the build directory" in n for n in notes), r.output
    assert any(str(scratch / "ck") in n and "checkpoints" in n for n in notes)
    assert any(str(scratch / "cache") in n and "validation tokens" in n for n in notes)
    if any((b / "torchtitan").glob("llmc_job*.py")):
        r = _launch(b, "--backend", "torchtitan")
        assert r.exit_code == 0, r.output
        assert any(str(scratch / "outputs") in ln and "torchtitan checkpoints" in ln for ln in r.output.splitlines())


def test_an_outputs_link_in_a_native_build_is_not_looked_at(tmp_path):
    """Only a torchtitan stage writes outputs/: a native run leaves it alone, whatever it is."""
    b = _tiny_build(tmp_path)
    (b / "outputs").symlink_to(b / "native")  # (into the build: refused where a torchtitan stage runs)
    r = _launch(b, "--backend", "native")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("what", ["into-build", "file", "dangling"])
def test_a_run_link_to_anything_but_an_outside_directory_is_refused(tmp_path, what):
    b = _tiny_build(tmp_path)
    (tmp_path / "f.txt").write_text("mine")
    target = {"into-build": b / "native", "file": tmp_path / "f.txt", "dangling": tmp_path / "nothing"}[what]
    link = b / "run" / "pretrain" / ("checkpoints" if what != "file" else "metrics.jsonl")
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    r = _launch(b, "--backend", "native")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "error[L001]" in lines[0] and str(link) in lines[0], r.output
    assert "only into a directory outside the build directory" in lines[0] and "hint:" in lines[0]
    assert (tmp_path / "f.txt").read_text() == "mine"
