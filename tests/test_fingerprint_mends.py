"""What the data / tokenizer records of finished stages and DeepSpeed's checkpoint folder must not get wrong.

1. Every runner keeps the stage's tokenizer copy (``run/<stage>/tokenizer``, what its record names) as the tokenizer
   it trains with (``llmc.runtime.job.renew_stage_tokenizer``): a copy an earlier attempt left, which no checkpoint
   was trained with, is renewed by the DeepSpeed runner and by ``llmc launch`` before a DeepSpeed or torchtitan
   stage, so the finished stage is not refused as stale (L005) at the next launch; with a checkpoint it would
   resume, the other tokenizer is refused before anything trains.
2. An interrupted DeepSpeed run of an older llmc (its checkpoints in ``run/<stage>/ds_checkpoints``) resumes from
   there, said in one line, and ``llmc launch`` names that folder as the stage's checkpoints.
4. A record reads at most ``CONTENT_DIGEST_MAX_BYTES`` of its sources' files in all (the others by name, size and
   time), and only rank 0 of a stage checks the stage it starts from.
5. A later stage's corpus (text the tokenizer is trained on) edited under a finished pretraining is not a change of
   pretraining's data: the tokenizer, when it really changes, says so.
7. ``llmc launch --stage S`` checks the data of the stages it runs, not of later ones; a stage checks its own.

Builds: a micro pipeline pretrain -> midtrain -> sft (pretraining finished once, a module fixture) and a micro
pretraining for the DeepSpeed runner (3 steps).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_safety_e2e import MICRO, cli

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _lines(text: str, code: str) -> list[str]:
    return [ln for ln in text.splitlines() if f"[{code}]" in ln]


def _corpus(path: Path, docs: int, offset: int = 0) -> None:
    from llmc.runtime import corpus

    path.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_corpus(path, max_docs=docs + offset)
    if offset:  # (other documents than the first ones: another corpus)
        path.write_text("".join(path.read_text().splitlines(keepends=True)[offset:]))


def _pipe_spec(d: Path) -> Path:
    """pretrain on corpus/docs.jsonl (a BPE trained on every text source) -> midtrain on mid.jsonl -> sft on
    chat.jsonl."""
    _corpus(d / "corpus" / "docs.jsonl", 150)
    _corpus(d / "mid.jsonl", 30, offset=150)
    chat = [{"messages": [{"role": "user", "content": f"what is {i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(20)]
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    spec = {"name": "mendpipe", "model": MICRO, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "corpus/docs.jsonl", "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512, "chat_template": "llama3"}, "seq_len": 32,
                     "tokens": 256 * 3},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": 3, "keep_latest": 1}, "log_every": 1},
            "stages": [{"name": "pretrain", "kind": "pretrain"},
                       {"name": "mid", "kind": "midtrain", "init_from": "pretrain", "steps": 2,
                        "data": {"sources": [{"name": "mid", "path": "mid.jsonl", "format": "jsonl"}],
                                 "seq_len": 32, "tokens": 512}},
                       {"name": "sft", "kind": "sft", "init_from": "mid", "steps": 2, "lr": 1e-4,
                        "global_batch_tokens": 128,
                        "data": {"sources": [{"name": "chat", "path": "chat.jsonl", "format": "jsonl",
                                              "kind": "chat"}], "seq_len": 32, "tokens": 2000}}]}
    p = d / "spec.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Path:
    """The pipeline built (d/b, its spec in d/s) with pretrain finished (``llmc launch --stage pretrain``)."""
    d = tmp_path_factory.mktemp("mendpipe")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        assert cli("build", str(_pipe_spec(d / "s")), "-o", str(d / "b")).returncode == 0
        r = cli("launch", str(d / "b"), "--stage", "pretrain")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (d / "b" / "run" / "pretrain" / "DONE.json").is_file()
    return d


def _copy(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "d"
    shutil.copytree(src, d, symlinks=True)  # (copy2: the data files keep their modification times)
    return d


# ------------------------------------------------------------------ DeepSpeed: a micro pretraining

@pytest.fixture(scope="module")
def ds_build(tmp_path_factory) -> Path:
    """A micro pretraining (3 steps, a DeepSpeed checkpoint every 2) built (d/b) and prepared."""
    d = tmp_path_factory.mktemp("mendds")
    _corpus(d / "s" / "corpus" / "docs.jsonl", 200)
    spec = {"name": "mendds", "model": MICRO, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "corpus/docs.jsonl", "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 256 * 3},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": 2, "keep_latest": 1}, "log_every": 1}}
    (d / "s" / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert cli("build", str(d / "s" / "spec.yaml"), "-o", str(d / "b")).returncode == 0
    assert (d / "b" / "deepspeed" / "ds_config.json").is_file()
    p = _entry("prepare", "--lock", str(d / "b" / "plan.lock.json"), cwd=d / "b")
    assert p.returncode == 0, p.stderr[-3000:]
    return d


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LLMC_FORCE_CPU": "1",
            "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}


def _entry(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmc.runtime.entry", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _ds_train(b: Path, *extra: str) -> subprocess.CompletedProcess:
    """The DeepSpeed runner as the emitted scripts start it (no ``llmc launch`` around it)."""
    port = str(29900 + os.getpid() % 90)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"localhost:{port}", "-m", "llmc.runtime.ds_train", "--lock",
            str(b / "plan.lock.json"), "--ds-config", str(b / "deepspeed" / "ds_config.json"), *extra]
    return subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=900, cwd=str(b))


def _stale_copy(b: Path) -> Path:
    """The tokenizer copy an earlier attempt of pretrain left (it failed before its first checkpoint), with other
    bytes than prepare's tokenizer now."""
    kept = b / "run" / "pretrain" / "tokenizer"
    kept.mkdir(parents=True)
    for f in (b / "assets").glob("tokenizer*.json"):
        shutil.copyfile(f, kept / f.name)
    with open(kept / "tokenizer.json", "a") as f:
        f.write(" \n")
    assert (kept / "tokenizer.json").read_bytes() != (b / "assets" / "tokenizer.json").read_bytes()
    return kept


def test_1_deepspeed_renews_a_stale_tokenizer_copy_so_its_finished_stage_is_not_refused(ds_build, tmp_path):
    """The reviewer's repro, through `llmc launch --backend deepspeed` and through the runner alone (the emitted
    scripts): either way the finished stage is this build's at the next launch."""
    from llmc.runtime.job import TOKENIZER_KEY, tokenizer_files

    for how in ("launch", "runner"):
        b = _copy(ds_build, tmp_path / how) / "b"
        kept = _stale_copy(b)
        if how == "launch":
            r = cli("launch", str(b), "--backend", "deepspeed")
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        else:
            r = _ds_train(b)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        done = json.loads((b / "run" / "pretrain" / "DONE.json").read_text())
        assert done["status"] == "done"
        # what it recorded is the tokenizer it trained with: prepare's (the trainer reads assets/), byte for byte
        assert done[TOKENIZER_KEY] == tokenizer_files(b / "assets") == tokenizer_files(kept), how
        r = cli("launch", str(b), "--backend", "deepspeed")
        assert r.returncode == 0 and not _lines(r.stderr, "L005"), (how, r.stderr[-3000:])
        assert "every stage is finished" in r.stdout, r.stdout


def test_1_a_stale_copy_with_a_checkpoint_to_resume_is_refused_and_torchtitan_records_the_tokenizer_it_reads(
        ds_build, tmp_path):
    """``llmc launch``'s start of a stage (DeepSpeed, torchtitan): the rule of every runner, without training."""
    from llmc.launch import Cmd, LaunchError, start_stage
    from llmc.runtime.job import FINGERPRINT_FILE, TOKENIZER_KEY, fingerprint_record, tokenizer_files

    b = _copy(ds_build, tmp_path) / "b"
    lock = json.loads((b / "plan.lock.json").read_text())
    stage_dir = b / "run" / "pretrain"
    kept = _stale_copy(b)
    old = tokenizer_files(kept)
    # a torchtitan stage (its record written as it starts) whose earlier attempt saved no checkpoint: renewed
    dump = b / "outputs" / "torchtitan"
    titan = Cmd(argv=["true"], stage="pretrain", stage_dir=str(stage_dir), dump_dir=str(dump), checkpoints=str(dump),
                record=fingerprint_record(lock, "pretrain", b))
    start_stage(titan, b)
    rec = json.loads((stage_dir / FINGERPRINT_FILE).read_text())
    assert rec[TOKENIZER_KEY] == tokenizer_files(b / "assets") != old
    assert tokenizer_files(kept) == tokenizer_files(b / "assets")

    # a DeepSpeed stage whose earlier attempt saved a checkpoint (DeepSpeed's `latest` naming its tag) with the old
    # tokenizer: refused, the copy left as it is
    shutil.rmtree(kept)
    kept = _stale_copy(b)
    ds = stage_dir / "checkpoints" / "deepspeed"
    (ds / "step-00000002").mkdir(parents=True)
    (ds / "latest").write_text("step-00000002")
    c = Cmd(argv=["true"], stage="pretrain", stage_dir=str(stage_dir), checkpoints=str(ds))
    with pytest.raises(LaunchError) as e:
        start_stage(c, b)
    assert "step-00000002" in str(e.value) and "--no-resume" in str(e.value)
    assert tokenizer_files(kept) == old


def test_2_an_older_llmcs_interrupted_deepspeed_run_resumes_from_ds_checkpoints(ds_build, tmp_path):
    from llmc.launch import launch_commands

    b = _copy(ds_build, tmp_path) / "b"
    out = b / "run" / "pretrain"
    r = _ds_train(b, "--steps", "2")  # interrupted after 2 of its 3 steps, a DeepSpeed checkpoint at step 2
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (out / "DONE.json").exists()
    # ... by an older llmc, which kept its DeepSpeed checkpoints in run/<stage>/ds_checkpoints
    legacy = out / "ds_checkpoints"
    os.replace(out / "checkpoints" / "deepspeed", legacy)
    assert (legacy / "latest").read_text().strip() == "step-00000002"

    ds_cmd = next(c for c in launch_commands(b, backend="deepspeed") if c.stage == "pretrain")

    r = _ds_train(b)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    said = [ln for ln in r.stdout.splitlines() if "earlier llmc" in ln]
    assert len(said) == 1 and str(legacy) in said[0] and str(out / "checkpoints" / "deepspeed") in said[0], r.stdout
    assert f"resumed from {legacy / 'step-00000002'}" in r.stdout, r.stdout[-3000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x
             and '"event"' not in x]
    assert steps == [1, 2, 3], steps  # (steps 1 and 2 from the older run, step 3 resumed: none trained twice)
    done = json.loads((out / "DONE.json").read_text())
    assert done["status"] == "done" and done["step"] == 3
    assert (out / "checkpoints" / "deepspeed" / "latest").read_text().strip() == "step-00000003"
    assert Path(ds_cmd.checkpoints) == legacy  # (`llmc launch` named the folder the rerun resumed from)


# ------------------------------------------------------------------ the pipeline

def test_4_a_record_reads_at_most_its_budget_of_content_in_all(pipe, monkeypatch):
    """sft's record names chat, docs and mid (its init_from chain): each fits the budget alone, not all together."""
    import llmc.fileio
    from llmc.runtime import job as jobmod

    lock = json.loads((pipe / "b" / "plan.lock.json").read_text())
    sizes = {n: (pipe / "s" / p).stat().st_size
             for n, p in (("chat", "chat.jsonl"), ("docs", "corpus/docs.jsonl"), ("mid", "mid.jsonl"))}
    budget = max(sizes.values())
    assert sum(sizes.values()) > budget
    monkeypatch.setattr(jobmod, "CONTENT_DIGEST_MAX_BYTES", budget)
    read: list[Path] = []
    real = llmc.fileio.sha256_file

    def counting(path, *a, **k):
        read.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(llmc.fileio, "sha256_file", counting)
    got = jobmod.data_files(lock, "sft", str(pipe / "s"))
    assert set(got) == set(sizes)
    assert {n: got[n]["bytes"] for n in got} == sizes
    hashed = [n for n in got if got[n]["content"] is not None]
    assert sum(sizes[n] for n in hashed) <= budget < sum(sizes.values())
    assert sum(p.stat().st_size for p in read) <= budget  # what was really read
    assert hashed and len(hashed) < len(sizes)
    assert all(got[n]["listing"] for n in got)  # (the others by names, sizes and modification times)


def test_4_only_rank_0_checks_the_stage_it_starts_from(pipe, monkeypatch):
    from llmc.runtime import entry

    lock = json.loads((pipe / "b" / "plan.lock.json").read_text())
    calls: list[tuple] = []

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(entry, "check_finished", lambda *a, **k: calls.append(a) or True)
    monkeypatch.setattr(entry, "_prepare_collective", stop)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(Stop):
            entry.run_stage(lock, "sft", pipe / "b" / "run" / "sft", pipe / "b", lock_dir=pipe / "b")
        assert [a[1] for a in calls] == ([] if rank == "1" else ["mid"]), (rank, calls)


def test_5_a_later_stages_corpus_edited_leaves_finished_pretraining_valid(pipe, tmp_path):
    from llmc.runtime.job import DATA_KEY, stage_data_sources

    d = _copy(pipe, tmp_path)
    b = d / "b"
    lock = json.loads((b / "plan.lock.json").read_text())
    assert set(stage_data_sources(lock, "pretrain")) == {"docs"}
    assert set(json.loads((b / "run" / "pretrain" / "DONE.json").read_text())[DATA_KEY]) == {"docs"}
    with open(d / "s" / "mid.jsonl", "a") as f:  # midtrain has not run: its corpus grows by a document
        f.write(json.dumps({"text": "one more midtraining document"}) + "\n")
    r = cli("launch", str(b), "--dry-run")
    assert r.returncode == 0 and not _lines(r.stderr, "L005"), r.stderr[-3000:]


def test_7_launch_stage_checks_the_data_of_the_stages_it_runs_and_a_stage_its_own(pipe, tmp_path):
    d = _copy(pipe, tmp_path)
    b = d / "b"
    (d / "s" / "chat.jsonl").unlink()  # sft's conversations are not there yet
    r = cli("launch", str(b), "--stage", "mid")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (b / "run" / "mid" / "DONE.json").is_file()
    prep = next(ln for ln in r.stdout.splitlines() if "llmc.runtime.entry prepare" in ln)
    assert prep.endswith("--stages mid"), prep
    # the stage that reads it: refused by the launch's prepare, and by its own start without the launch
    r = cli("launch", str(b), "--stage", "sft")
    err = _lines(r.stderr, "R002") + _lines(r.stdout, "R002")
    assert r.returncode == 1 and err and "error[R002] sft: data source 'chat' (" in err[0], r.stdout + r.stderr
    t = _entry("--lock", str(b / "plan.lock.json"), "--stage", "sft", cwd=b)
    err = _lines(t.stderr, "R002")
    assert t.returncode == 1 and len(err) == 1 and "data source 'chat' (" in err[0], t.stderr[-3000:]
    assert not (b / "run" / "sft" / "DONE.json").exists()


def test_a_later_stages_own_prepare_keeps_the_tokenizer_the_launchs_prepare_trained(pipe, tmp_path):
    """midtrain's trainer prepares with its own job, whose sources come first: the tokenizer's training text is still
    read (and keyed) in the launch's order, so it is not trained again (on a corpus over MAX_TOKENIZER_TRAIN_CHARS,
    another first part of the text would make another tokenizer under the finished pretraining)."""
    from llmc.runtime.entry import prepare_assets
    from llmc.runtime.job import TrainJob

    d = _copy(pipe, tmp_path)
    b = d / "b"
    lock = json.loads((b / "plan.lock.json").read_text())
    # the launch's prepare (`prepare --lock`: the default stage's job) in the copy (other paths: trained again there)
    prepare_assets(TrainJob.from_lock(lock, None, build_dir=b), b, log=lambda _: None, measure=False)
    before = (b / "assets" / "tokenizer.json").read_bytes()
    said: list[str] = []
    prepare_assets(TrainJob.from_lock(lock, "mid", build_dir=b), b, log=said.append, measure=False)
    assert not [ln for ln in said if "trained byte-level BPE" in ln], said
    assert (b / "assets" / "tokenizer.json").read_bytes() == before
