"""The eval step prints no line that reads like an error but is none (llmc.runtime.quiet), and every other warning
still shows.

* lm-evaluation-harness's ``git describe`` outside a git checkout: no ``fatal: not a git repository`` line; the
  results' ``git_hash`` is what lm_eval's own function gives (None there, the describe string inside a checkout).
* torch's notice about torchao's enums (logged when lm_eval's model load imports transformers' torchao quantizer):
  gone, while the same notice for another library's enum, another record of that logger and a Python warning show.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from test_evaluate import QUESTIONS, TASK_YAML, make_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# run_eval in a fresh process (nothing imported yet: torchao is first imported by the eval's model load), then three
# records that must still show
SCRIPT = """
import enum, json, logging, sys, warnings
from llmc.runtime.evaluate import EvalConfig, run_eval

s = run_eval(EvalConfig(model_dir=sys.argv[1], tasks=(sys.argv[2],), batch_size=4), sys.argv[3])
print(json.dumps({"acc": s.metrics["tiny_local_mc"]["acc"], "torchao": "torchao" in sys.modules,
                  "git_hash": json.loads(s.results_path.read_text())["git_hash"]}))
sys.stdout.flush()
import torch.utils._pytree as pytree

class OtherLibEnum(str, enum.Enum):  # torch's notice about an enum that is not torchao's
    A = "a"

pytree.register_constant(OtherLibEnum)
logging.getLogger("torch.utils._pytree").warning("llmc-test: another record of the pytree logger")
warnings.warn("llmc-test: a real warning", UserWarning)
"""


@pytest.mark.slow
def test_eval_step_prints_no_git_fatal_nor_torchao_notice_and_keeps_real_warnings(tmp_path):
    """Outside a git checkout (``GIT_CEILING_DIRECTORIES`` stops git's search at the test's folder), one ``run_eval``
    on the tiny model: stderr holds neither git's ``fatal:`` line nor torch's notice about torchao's enums
    (``KernelPreference``, ``ScaleCalculationMode``), but does hold the same notice for another enum, another
    warning of the same logger and a Python UserWarning. lm_eval records git_hash None (its own fallback's value)."""
    make_model(tmp_path / "model")  # (in this process: the subprocess imports transformers' models only in run_eval)
    (tmp_path / "tiny_mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    task = tmp_path / "tasks" / "tiny_mc.yaml"
    task.parent.mkdir()
    task.write_text(TASK_YAML.format(data=tmp_path / "tiny_mc.jsonl"))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GIT_CEILING_DIRECTORIES": str(tmp_path),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("GIT_DIR", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "model"), str(task), str(tmp_path / "eval")],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= got["acc"] <= 1.0
    if shutil.which("git"):
        assert subprocess.run(["git", "describe", "--always"], cwd=work, env=env, capture_output=True).returncode != 0
    assert got["git_hash"] is None  # lm_eval's fallback outside a checkout, not git's message or a garbage string
    assert "fatal: not a git repository" not in r.stderr and "fatal:" not in r.stderr
    if importlib.util.find_spec("torchao") is not None:
        assert got["torchao"], "the eval's model load no longer imports torchao: nothing left to check"
    assert "KernelPreference" not in r.stderr and "ScaleCalculationMode" not in r.stderr, r.stderr[-3000:]
    notices = [ln for ln in r.stderr.splitlines() if "is an Enum subclass" in ln]
    assert len(notices) == 1 and "OtherLibEnum" in notices[0], notices  # the notice itself still shows
    assert "llmc-test: another record of the pytree logger" in r.stderr
    assert "UserWarning: llmc-test: a real warning" in r.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_git_hash_is_lm_evals_own_value_without_gits_stderr(tmp_path, monkeypatch, capfd):
    """:func:`llmc.runtime.quiet.git_commit_hash` gives what lm_eval's ``get_git_commit_hash`` gives, inside a git
    checkout (the ``git describe --always`` string: the commit's short hash) and outside one (None), and writes
    nothing to stderr; ``quiet_git_describe`` swaps it into ``lm_eval.evaluator`` and restores lm_eval's own."""
    import lm_eval.evaluator as evaluator
    from lm_eval.loggers.utils import get_git_commit_hash as lm_evals

    from llmc.runtime.quiet import git_commit_hash, quiet_git_describe

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.delenv("GIT_DIR", raising=False)
    outside, repo = tmp_path / "outside", tmp_path / "repo"
    outside.mkdir()
    repo.mkdir()
    monkeypatch.chdir(outside)
    capfd.readouterr()
    assert git_commit_hash() is None
    assert capfd.readouterr().err == ""
    assert lm_evals() is None
    assert "not a git repository" in capfd.readouterr().err  # (what lm_eval's own prints: the line removed)

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f").write_text("x\n")
    subprocess.run([*git, "-C", str(repo), "add", "f"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "c"], check=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    monkeypatch.chdir(repo)
    capfd.readouterr()
    assert git_commit_hash() == lm_evals() and head.startswith(git_commit_hash())
    assert capfd.readouterr().err == ""

    was = evaluator.get_git_commit_hash
    with quiet_git_describe():
        assert evaluator.get_git_commit_hash is git_commit_hash
    assert evaluator.get_git_commit_hash is was
