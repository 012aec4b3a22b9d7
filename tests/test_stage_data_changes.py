"""A finished stage counts as done only while the data and the tokenizer it trained with are still what the build
reads; prepare checks every stage's data before any stage trains.

* A stage's DONE.json records a digest of its data sources' files (its own and its ``init_from`` chain's:
  ``llmc.runtime.job.data_files``) and the files of its tokenizer copy. A source rewritten
  under the same path, at the same size, makes the stage and every stage that starts from it stale: ``llmc launch``
  refuses them (L005) naming the source and how it changed; a copy or ``touch`` (same bytes) changes nothing.
* A pre-training corpus that changed after pretrain finished: the launch of the next stage is refused before prepare
  runs (no tokenizer retrained under the finished stage); a prepare run by hand that retrains it says which finished
  stages trained with the old one (R016), and the runtime refuses to start the next stage from them (R004).
* A post-training source that is missing, or whose first records are malformed, stops prepare with one R002 line
  naming the stage and the source, before pre-training writes a checkpoint.

One real launch of a micro pipeline (pretrain 3 steps -> sft 2 -> dpo 2, a module fixture); the tests copy it.
"""

from __future__ import annotations

import hashlib
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


def _spec(d: Path, prefs: str = "prefs.jsonl") -> Path:
    """A micro pipeline: pretrain on corpus/docs.jsonl (a BPE trained on it), SFT on chat.jsonl, DPO on ``prefs``."""
    from llmc.runtime import corpus

    (d / "corpus").mkdir(parents=True, exist_ok=True)
    corpus.write_corpus(d / "corpus" / "docs.jsonl", max_docs=200)
    chat = [{"messages": [{"role": "user", "content": f"what is {i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(20)]
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(20)]
    (d / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))

    def post(name: str, kind: str, init: str, path: str, rec: str) -> dict:
        return {"name": name, "kind": kind, "init_from": init, "steps": 2, "lr": 1e-4, "global_batch_tokens": 128,
                "data": {"sources": [{"name": rec, "path": path, "format": "jsonl",
                                      "kind": {"sft": "chat", "dpo": "preference"}[kind]}],
                         "seq_len": 32, "tokens": 2000}}

    spec = {"name": "micropipe", "model": MICRO, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "corpus/docs.jsonl", "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512, "chat_template": "llama3"}, "seq_len": 32,
                     "tokens": 256 * 3},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": 3, "keep_latest": 1}, "log_every": 1},
            "stages": [{"name": "pretrain", "kind": "pretrain"}, post("sft", "sft", "pretrain", "chat.jsonl", "chat"),
                       post("dpo", "dpo", "sft", prefs, "prefs")]}
    p = d / "spec.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The micro pipeline built (d/b, its spec in d/s) and launched to the end: every stage finished."""
    d = tmp_path_factory.mktemp("datachange")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        assert cli("build", str(_spec(d / "s")), "-o", str(d / "b")).returncode == 0
        r = cli("launch", str(d / "b"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert all((d / "b" / "run" / s / "DONE.json").is_file() for s in ("pretrain", "sft", "dpo"))
    return d


def _copy(finished: Path, tmp_path: Path) -> Path:
    d = tmp_path / "d"
    shutil.copytree(finished, d, symlinks=True)  # (copy2: the data files keep their modification times)
    return d


def _lines(text: str, code: str) -> list[str]:
    return [ln for ln in text.splitlines() if f"[{code}]" in ln]


def _rewrite_same_size(path: Path, old: str, new: str) -> None:
    before = path.read_bytes()
    after = before.replace(old.encode(), new.encode())
    assert len(after) == len(before) and hashlib.sha256(after).digest() != hashlib.sha256(before).digest()
    path.write_bytes(after)
    assert path.stat().st_size == len(before)


def test_a_data_file_rewritten_at_the_same_size_refuses_its_stage_and_the_stages_after_it(finished, tmp_path):
    d = _copy(finished, tmp_path)
    b = d / "b"
    r = cli("launch", str(b))  # the copy, as it is: every stage is this build's, skipped
    assert r.returncode == 0 and "every stage is finished" in r.stdout, r.stdout + r.stderr

    # the same bytes under a new modification time (a copy, a touch): not a change
    os.utime(d / "s" / "chat.jsonl", ns=(1, 1))
    r = cli("launch", str(b), "--dry-run")
    assert r.returncode == 0 and not _lines(r.stderr, "L005"), r.stderr

    # SFT's conversations rewritten in place, same size: sft and dpo (which starts from it) are refused, not pretrain
    _rewrite_same_size(d / "s" / "chat.jsonl", "what is", "WHAT IS")
    done = {s: (b / "run" / s / "DONE.json").read_bytes() for s in ("pretrain", "sft", "dpo")}
    r = cli("launch", str(b))
    err = _lines(r.stderr, "L005")
    assert r.returncode == 1 and len(err) == 2, r.stdout + r.stderr
    assert err[0].startswith(f"{b}: error[L005] stage 'sft' finished from other data") and "'chat'" in err[0], err
    assert err[1].startswith(f"{b}: error[L005] stage 'dpo' ") and "'chat'" in err[1], err
    assert all("at the same size" in e and "--no-resume --from" in e for e in err), err
    assert all(str(d / "s" / "chat.jsonl") in e for e in err), err
    assert {s: (b / "run" / s / "DONE.json").read_bytes() for s in done} == done  # nothing trained over

    # DPO's pairs with chosen and rejected swapped (same size): dpo alone, naming its source
    shutil.copy2(finished / "s" / "chat.jsonl", d / "s" / "chat.jsonl")
    text = (d / "s" / "prefs.jsonl").read_text()
    swapped = "".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                      for r in map(json.loads, text.splitlines()))
    assert len(swapped) == len(text) and swapped != text
    (d / "s" / "prefs.jsonl").write_text(swapped)
    r = cli("launch", str(b))
    err = _lines(r.stderr, "L005")
    assert r.returncode == 1 and len(err) == 1 and "stage 'dpo'" in err[0] and "'prefs'" in err[0], r.stderr
    # ... and grown by a record: the size says so
    (d / "s" / "prefs.jsonl").write_text(swapped + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    r = cli("launch", str(b), "--dry-run")
    err = _lines(r.stderr, "L005")
    assert len(err) == 1 and f"size {len(text.encode()):,} -> " in err[0], r.stderr


def _entry(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
           "LLMC_FORCE_CPU": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "llmc.runtime.entry", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_changed_corpus_never_swaps_the_tokenizer_under_a_finished_stage(finished, tmp_path):
    """The reviewer's case: pretrain finished, its corpus rewritten (same path), then `llmc launch B --stage sft`."""
    d = _copy(finished, tmp_path)
    b = d / "b"
    for s in ("sft", "dpo"):  # (only pretrain finished)
        shutil.rmtree(b / "run" / s)
    tokenizer = (b / "assets" / "tokenizer.json").read_bytes()
    assert (b / "run" / "pretrain" / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer
    docs = [json.loads(x) for x in (d / "s" / "corpus" / "docs.jsonl").read_text().splitlines()]
    (d / "s" / "corpus" / "docs.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(reversed(x["text"].split()))[::-1]}) + "\n" for x in docs[::-1]))

    r = cli("launch", str(b), "--stage", "sft")
    err = _lines(r.stderr, "L005")
    assert r.returncode == 1 and len(err) == 1, r.stdout + r.stderr
    assert "stage 'sft' starts from stage 'pretrain' finished from other data" in err[0] and "'docs'" in err[0], err
    assert "the text its tokenizer was trained on" not in err[0]  # (pretrain's own source: named as such)
    assert (b / "assets" / "tokenizer.json").read_bytes() == tokenizer  # prepare did not run: the tokenizer stays
    assert not (b / "run" / "sft").exists()

    # prepare by hand (as the emitted scripts run it): it retrains on the new corpus and says what that leaves stale
    p = _entry("prepare", "--lock", str(b / "plan.lock.json"), cwd=b)
    assert p.returncode == 0, p.stderr[-3000:]
    new = (b / "assets" / "tokenizer.json").read_bytes()
    old_vocab, new_vocab = (json.loads(t)["model"]["vocab"] for t in (tokenizer, new))
    assert old_vocab != new_vocab  # (the BPE really differs: the same ids name other strings)
    warn = _lines(p.stderr, "R016")
    assert len(warn) == 1 and "'pretrain'" in warn[0] and "'docs'" in warn[0] and "--no-resume" in warn[0], p.stderr
    # the stage that would start from the old-tokenizer weights is refused by the runtime, before it trains
    t = _entry("--lock", str(b / "plan.lock.json"), "--stage", "sft", cwd=b)
    err = _lines(t.stderr, "R004")
    assert t.returncode == 1 and len(err) == 1 and "starts from stage 'pretrain'" in err[0], t.stderr[-3000:]
    assert not (b / "run" / "sft" / "DONE.json").exists() and not (b / "run" / "sft" / "checkpoints").exists()


@pytest.mark.parametrize("case", ["missing", "chosen_list"])
def test_a_bad_dpo_source_stops_prepare_before_pretraining_trains(tmp_path, case):
    d = tmp_path / "s"
    if case == "missing":
        spec = _spec(d, prefs="data/missing.jsonl")
        bad = d / "data" / "missing.jsonl"
    else:
        spec = _spec(d)
        bad = d / "prefs.jsonl"
        lines = bad.read_text().splitlines()
        lines[3] = json.dumps({"prompt": "3+1=", "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"})
        bad.write_text("\n".join(lines) + "\n")
    b = tmp_path / "b"
    r = cli("plan", str(spec))
    assert r.returncode == 0 and "0 error(s)" in r.stdout  # (the plan reads no data files)
    assert cli("build", str(spec), "-o", str(b)).returncode == 0
    r = cli("launch", str(b))
    assert r.returncode == 1, r.stdout + r.stderr
    err = _lines(r.stderr, "R002") + _lines(r.stdout, "R002")
    assert len(err) == 1 and "error[R002] dpo: data source 'prefs' (" in err[0], r.stdout + r.stderr
    assert str(bad) in err[0]
    assert ("no .jsonl/.json files found" if case == "missing" else
            f"{bad}:4: preference record 3: 'chosen' is a list, not a string") in err[0], err
    assert "stage 'prepare'" in r.stderr  # (the launch's line: prepare failed)
    assert not (b / "run" / "pretrain").exists() or not any((b / "run" / "pretrain").rglob("step-*")), \
        "pre-training trained before the bad source was found"
    assert "pretrain step" not in r.stdout + r.stderr
