"""A past run `llmc launch --no-resume` set aside (``run/<stage>.set-aside-N``) is never written again: the launch's
link check does not look through it (a relaunched run's many checkpoints cost every launch a walk), a link in its
place is still found, and a stage may not take such a name (G019), since the launch and `llmc report` pass over it."""

from __future__ import annotations

import json

from test_untrusted_inputs import _tiny_build

from llmc.compiler.compile import compile_spec
from llmc.fileio import set_aside
from llmc.launch import linked_write_path
from llmc.spec.load import loads_spec


def test_the_link_check_passes_over_set_aside_runs_but_not_links_in_their_place(tmp_path):
    b = _tiny_build(tmp_path)
    lock = json.loads((b / "plan.lock.json").read_text())
    past = b / "run" / "pretrain"
    (past / "checkpoints" / "step-4").mkdir(parents=True)
    (tmp_path / "user.txt").write_text("the user's")
    (past / "checkpoints" / "step-4" / "shard").symlink_to(tmp_path / "user.txt")
    assert linked_write_path(b, lock) == past / "checkpoints" / "step-4" / "shard"  # a stage's own: refused
    aside = set_aside(past)
    assert aside is not None and aside.name == "pretrain.set-aside-1"
    assert linked_write_path(b, lock) is None  # (never written again: not looked through)
    (b / "run" / "pretrain.set-aside-2").symlink_to(tmp_path / "user.txt")  # a link in its place still is one
    assert linked_write_path(b, lock) == b / "run" / "pretrain.set-aside-2"


def test_a_stage_named_like_a_set_aside_run_is_refused():
    spec = """\
name: g19
model: tiny
hardware: {gpu: cpu, count: 1}
data: {sources: [{name: python-docs, format: builtin}], tokens: 300K, seq_len: 128}
stages:
  - {name: pretrain, kind: pretrain}
  - {name: sft.set-aside-1, kind: sft, init_from: pretrain}
"""
    run, lines = loads_spec(spec, file="g19.yaml")
    c = compile_spec(run, "g19.yaml", lines)
    (d,) = [d for d in c.diagnostics if d.code == "G019"]
    assert d.severity == "error" and d.path == "stages.1.name" and "set-aside" in d.message
