"""prepare never reads its own output back as input: a source that is prepare's ``data/`` folder, holds it, or
lies inside what prepare writes there is one located error line (exit 1) before anything is written; a
folder of its own inside ``data/`` (``data/web``) and a one-level glob (``data/*.jsonl``) still work."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from test_build_fakes import lock_for  # noqa: E402

from llmc.runtime.entry import main  # noqa: E402

ARCH = dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512,
            max_seq_len=64)


def _build(root: Path, src_path: str, files: dict[str, int], quality: bool, builtin: bool = False) -> Path:
    rng = random.Random(0)
    for rel, n in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(3000)}" for _ in range(40))}) + "\n"
                             for _ in range(n)))
    sources = [{"name": "web", "path": src_path}] + ([{"name": "python-docs", "format": "builtin"}] if builtin else [])
    spec = {"name": "q", "model": ARCH, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": sources, "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32,
                     "tokens": 1024},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3}},
            "eval": {"validation": {"fraction": 0.1, "seed": 0, "every_steps": 2, "max_batches": 1}}}
    if quality:
        spec["data"]["quality"] = {"exact": True, "near_dup": {}, "workers": 2}
    lock = lock_for(spec, plan={"micro_batch": 8}, spec_path=str(root / "spec.yaml"))
    (root / "plan.lock.json").write_text(json.dumps(lock))
    return root / "plan.lock.json"


@pytest.mark.parametrize("src_path, quality, builtin, says", [
    ("data", True, False, "is prepare's output folder"),  # the quality pass read its own .work records
    ("data", False, False, "is prepare's output folder"),  # the 2nd prepare read data/split/validation.json
    (".", True, False, "holds prepare's output folder"),  # the lock's folder: lock, assets/, data/
    ("data/quality/web", False, False, "which prepare writes"),
    ("data/**/*.jsonl", True, False, "is prepare's output folder"),
    ("data/*.jsonl", False, True, "builtin corpus files"),  # would read data/python-docs.jsonl
])
def test_prepare_refuses_a_source_that_reads_its_own_output(tmp_path, capsys, src_path, quality, builtin, says):
    lock = _build(tmp_path, src_path, {"data/a.jsonl": 30, "data/quality/web/part-00000.jsonl": 5}, quality,
                  builtin)
    before = sorted(p for p in tmp_path.rglob("*"))
    for _ in range(2):  # the first prepare already refuses (it used to pass once, then read its output back)
        assert main(["prepare", "--lock", str(lock)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "data source 'web'" in err[0] and says in err[0] and "hint:" in err[0], err
        assert "Traceback" not in err[0]
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("src_path, files", [
    ("data/web", {"data/web/a.jsonl": 30}),
    ("data/*.jsonl", {"data/a.jsonl": 30}),
])
def test_a_source_beside_prepares_output_prepares_twice(tmp_path, capsys, src_path, files):
    pytest.importorskip("datasketch")
    lock = _build(tmp_path, src_path, files, quality=True)
    outs = []
    for _ in range(2):
        assert main(["prepare", "--lock", str(lock)]) == 0, capsys.readouterr().err
        capsys.readouterr()
        outs.append(sorted((tmp_path / "data" / "quality" / "web").glob("part-*.jsonl")))
        rep = json.loads((tmp_path / "data" / "quality" / "quality_report.json").read_text())
        assert rep["sources"]["web"]["documents"] == 30  # only the source's own 30 documents, every time
    assert outs[0] == outs[1]
