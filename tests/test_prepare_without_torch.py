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
        results[no_torch] = (json.loads(p.stdout[p.stdout.index("{"):].replace(str(root), "ROOT")),
                             (root / "assets" / "tokenizer.json").read_bytes(),
                             (root / "data" / "python-docs.jsonl").read_bytes())
    assert results[True] == results[False]
    assets, tokenizer, _ = results[True]
    assert [s["name"] for s in assets["sources"]] == ["web", "python-docs"]
    assert json.loads(tokenizer)["model"]["type"] == "BPE"
