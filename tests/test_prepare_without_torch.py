"""``python -m llmc.runtime.entry prepare`` and ``check`` make no tensors, so they run without importing torch
(seconds of CPU per process, and a launch runs prepare before its stages and check before each): a process that
cannot import torch at all prepares the assets (builtin corpus, a JSONL source, the near-duplicate pass, the
validation split, a trained tokenizer) and checks the stage (not run yet: exit 1, no error), with the same
results as in a process with torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_quality_prepare_paths import _build

# a process in which `import torch` fails: any import of it on these paths is an error, not a silent cost
NO_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} imported by a command that makes no tensors")
        return None

sys.meta_path.insert(0, NoTorch())
from llmc.runtime.entry import main
sys.exit(main(sys.argv[1:]))
"""


def _entry(args: list[str], cwd: Path, no_torch: bool) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", NO_TORCH, *args] if no_torch else [sys.executable, "-m", "llmc.runtime.entry", *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_prepare_and_check_run_in_a_process_without_torch(tmp_path):
    results = {}
    for no_torch in (True, False):
        root = tmp_path / ("without" if no_torch else "with")
        lock = _build(root, "corpus/*.jsonl", {"corpus/a.jsonl": 60, "corpus/b.jsonl": 40}, quality=True,
                      builtin=True)
        p = _entry(["prepare", "--lock", str(lock)], root, no_torch)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert "Traceback" not in p.stderr
        c = _entry(["check", "--lock", str(lock)], root, no_torch)  # 1: the stage has not run (no error line)
        assert (c.returncode, c.stderr) == (1, ""), c.stdout[-2000:] + c.stderr[-3000:]
        results[no_torch] = (json.loads((root / "assets" / "assets.json").read_text().replace(str(root), "ROOT")),
                             (root / "assets" / "tokenizer.json").read_bytes(),
                             (root / "data" / "python-docs.jsonl").read_bytes())
    assert results[True] == results[False]
    assets, tokenizer, _ = results[True]
    assert [s["name"] for s in assets["sources"]] == ["web", "python-docs"]
    assert json.loads(tokenizer)["model"]["type"] == "BPE"


def test_a_trainer_that_does_not_compile_imports_no_dynamo():
    """torch._dynamo (and with it torch._inductor: ~1.5 s of CPU in each trainer process) is imported only by a
    run that compiles: the sliding-window mask's eager wrapper is made by Transformer.compile_blocks, not at import."""
    code = ("import sys, llmc.runtime.train, llmc.runtime.ds_train, llmc.runtime.sft, llmc.runtime.hf_io;"
            "before = 'torch._dynamo' in sys.modules;"
            "from llmc.runtime.model import build_model; from llmc.spec.model import Architecture;"
            "a = Architecture(name='t', n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=50,"
            " max_seq_len=16, sliding_window=4); m = build_model(a, seed=0); m.compile_blocks(backend='eager');"
            "print(before, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


EXPORT_NO_TORCH = NO_TORCH.replace("from llmc.runtime.entry import main\nsys.exit(main(sys.argv[1:]))",
                                   "from llmc.cli import main\nsys.argv[0] = 'llmc'\nmain()")


def test_a_refused_export_imports_no_torch(tmp_path):
    """``llmc export`` finds the lock, the stage and its output before it imports torch: a wrong folder, a stage the
    lock does not know or one that has not run is one ``error[R010]`` line from a process that cannot import torch
    (each such refusal cost ~4 s of CPU importing it first)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    build = tmp_path / "build"
    _build(build, "corpus/*.jsonl", {"corpus/a.jsonl": 5}, quality=False)
    cases = [(empty, "pretrain", "no plan.lock.json"), (build, "sft", "sft"),
             (build, "pretrain", "has no output yet"), (build / "run", "pretrain", "has no output yet")]
    for folder, stage, says in cases:
        p = subprocess.run([sys.executable, "-c", EXPORT_NO_TORCH, "export", str(folder), "--stage", stage],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, (folder, stage, p.stdout[-1000:], p.stderr[-3000:])
        assert "error[R010]" in lines[0] and says in lines[0], (folder, stage, lines)
