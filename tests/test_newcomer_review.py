"""A newcomer's first spec (review H14): a data source folder whose files are not of the source's format is an error
at plan time (D007, located on the source, naming what the folder holds and the ``format:`` that reads it) and the
launch's R002 line says the same; prepare stops on a JSONL source without its text field with the trainers' own
error instead of starting them; a planning-only source's message names no trainer; prepare writes no JSON to stdout;
a DeepSpeed build that emits no artifacts does not describe them (X104 alone); ``llmc launch``'s help says torchrun
starts every backend's ranks; T002 about a warmup llmc derived says so and sits on the key that sets the run's
length. The hints are checked against the real readers (pyarrow, glob), not against llmc's own words alone."""

from __future__ import annotations

import glob
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_build_fakes import lock_for, make_compiled  # noqa: E402
from test_quality_prepare_paths import ARCH  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from llmc.compiler.compile import compile_spec  # noqa: E402
from llmc.compiler.plan import ParallelPlan  # noqa: E402
from llmc.emit.deepspeed import deepspeed_config  # noqa: E402
from llmc.sources import expand_paths, read_documents  # noqa: E402
from llmc.spec.facts import gather_facts  # noqa: E402
from llmc.spec.load import loads_spec  # noqa: E402

DOCS = [f"document number {i} " * 8 for i in range(40)]


def _parquet_folder(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir()
    pq.write_table(pa.table({"text": DOCS}), d / "a.parquet")
    return d


def _py_folder(d: Path, n: int = 50) -> Path:
    d.mkdir()
    for i in range(n):
        (d / f"f{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    return d


def _spec(source: str, tokens: str = "64K") -> str:
    return ("name: t\nmodel: {n_layers: 2, d_model: 64, n_heads: 4, d_ff: 128, vocab_size: 512}\n"
            f"data:\n  sources:\n    - {source}\n  seq_len: 64\n  tokens: {tokens}\n"
            "hardware: {gpu: cpu, count: 1}\ntraining: {precision: fp32, global_batch_tokens: 8192}\n")


def _plan(text: str, spec_dir: Path):
    run, lines = loads_spec(text, file="s.yaml")
    return compile_spec(run, "s.yaml", lines, spec_bytes=text.encode(), facts=gather_facts(run, spec_dir))


def _d007(c) -> list:
    return [d for d in c.diagnostics if d.code == "D007"]


# ----------------------------------------------------------------------------- 1. the source's format, at plan time


def test_a_parquet_folder_with_the_default_format_is_an_error_naming_format_parquet(tmp_path):
    """`{name: s, path: pq}` over a folder of .parquet files is read as JSONL by default: an error on the source's
    path (the format is not written), saying the default and naming `format: parquet`, which pyarrow reads."""
    _parquet_folder(tmp_path / "pq")
    got = _d007(_plan(_spec("{name: s, path: pq}"), tmp_path))
    assert [(d.severity, d.path, d.line) for d in got] == [("error", "data.sources.0.path", 5)]
    assert "1 .parquet file" in got[0].message and "default" in got[0].message
    assert "format: parquet" in got[0].hint
    # the fix the hint names: no D007, and the folder reads (pyarrow) as the documents written
    assert not _d007(_plan(_spec("{name: s, path: pq, format: parquet}"), tmp_path))
    assert list(read_documents(tmp_path / "pq", "parquet")) == DOCS
    # a format written by the user is where the error is located
    given = _d007(_plan(_spec("{name: s, path: pq, format: jsonl}"), tmp_path))
    assert [d.path for d in given] == ["data.sources.0.format"] and "default" not in given[0].message


def test_a_text_folder_of_other_extensions_names_the_glob_that_reads_them(tmp_path):
    """format: text reads a folder's .txt/.md/.text files only; a folder of .py files is an error whose hint is a
    glob that the reader expands to every file written (glob.glob is the reference)."""
    _py_folder(tmp_path / "txt")
    got = _d007(_plan(_spec("{name: s, path: txt, format: text}"), tmp_path))
    assert [d.path for d in got] == ["data.sources.0.format"] and "50 .py files" in got[0].message
    pattern = got[0].hint.split("path: '")[1].split("'")[0]
    assert pattern == "txt/*.py"
    assert not _d007(_plan(_spec(f"{{name: s, path: '{pattern}', format: text}}"), tmp_path))
    written = sorted(str(p) for p in (tmp_path / "txt").iterdir())
    assert [str(p) for p in expand_paths(tmp_path / pattern, "text")] == sorted(glob.glob(str(tmp_path / pattern)))
    assert [str(p) for p in expand_paths(tmp_path / pattern, "text")] == written


def test_what_the_plan_does_not_judge(tmp_path):
    """No D007 for a folder that holds the format's files, an empty folder (filled before the launch), a glob, a
    path that is not here (planned away from its files), or a stage's source that is fine; a stage's bad source is
    located in the stage."""
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "empty").mkdir()
    _parquet_folder(tmp_path / "pq")
    for src in ("{name: s, path: ok}", "{name: s, path: empty}", "{name: s, path: 'pq/*.jsonl'}",
                "{name: s, path: /nonexistent/here}"):
        assert not _d007(_plan(_spec(src), tmp_path)), src
    text = _spec("{name: s, path: ok}") + (
        "stages:\n  - {name: pretrain, kind: pretrain}\n"
        "  - {name: mid, kind: midtrain, init_from: pretrain, data: {seq_len: 64, tokens: 64K, sources: "
        "[{name: m, path: pq}]}}\n")
    assert [d.path for d in _d007(_plan(text, tmp_path))] == ["stages.1.data.sources.0.path"]


# ----------------------------------------------------------------------------- 1. ... and at launch


def test_the_readers_say_what_the_folder_holds_and_what_reads_it(tmp_path):
    """The launch's R002 text (llmc.sources.files_of, which every trainer's reader and prepare use) names the
    folder's files and the format / glob that reads them."""
    from llmc.runtime.stream import SourceRef, documents

    _parquet_folder(tmp_path / "pq")
    _py_folder(tmp_path / "txt")
    with pytest.raises(FileNotFoundError) as e:
        next(documents(SourceRef("s", str(tmp_path / "pq"), "jsonl")))
    assert "no .jsonl/.json files found" in str(e.value) and "1 .parquet file" in str(e.value)
    assert "format: parquet" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        next(documents(SourceRef("s", str(tmp_path / "txt"), "text")))
    pattern = str(e.value).split("path: '")[1].split("'")[0]
    assert pattern == f"{tmp_path / 'txt'}/*.py" and len(expand_paths(pattern, "text")) == 50


def _tokenizer(d: Path) -> Path:
    from llmc.runtime.tokenizer import train_bpe

    train_bpe(DOCS * 3, 300, d)
    return d


def _lock(root: Path, source: dict) -> Path:
    spec = {"name": "q", "model": ARCH, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [source], "tokenizer": {"path": str(_tokenizer(root / "tok"))}, "seq_len": 32,
                     "tokens": 2048},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3}}}
    lock = lock_for(spec, plan={"micro_batch": 8}, spec_path=str(root / "spec.yaml"))
    (root / "plan.lock.json").write_text(json.dumps(lock))
    return root / "plan.lock.json"


def _prepare(lock: Path, capsys) -> tuple[int, str, str]:
    from llmc.runtime.entry import main

    rc = main(["prepare", "--lock", str(lock)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_prepare_stops_on_a_parquet_folder_read_as_jsonl_with_the_hint(tmp_path, capsys):
    _parquet_folder(tmp_path / "pq")
    rc, _, err = _prepare(_lock(tmp_path, {"name": "s", "path": "pq"}), capsys)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "error[R002]" in err and "1 .parquet file" in err and "format: parquet" in err


def test_prepare_stops_on_records_without_the_text_field_with_the_trainers_error(tmp_path, capsys):
    """JSONL records with `content`, not `text`: prepare measured the source, found the field missing and only
    warned (R011), then started the trainer, which stopped on it. Now prepare stops, with the trainer's own line."""
    from llmc.runtime.stream import SourceRef, StreamingMixture

    (tmp_path / "recs").mkdir()
    (tmp_path / "recs" / "a.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS))
    lock = _lock(tmp_path, {"name": "s", "path": "recs"})
    rc, _, err = _prepare(lock, capsys)
    assert rc == 1 and len(err.splitlines()) == 1 and "R011" not in err, err
    m = StreamingMixture([SourceRef("s", str(tmp_path / "recs"), "jsonl")], lambda t: [1] * len(t), 0, 32)
    with pytest.raises(KeyError) as e:  # what the trainers' streams raise on the same source
        m.next_window()
    assert err.strip() == f"{lock}: error[R002] pretrain: {e.value}"
    assert "no field 'text'" in err


def test_prepare_writes_no_json_to_stdout_and_names_the_assets_file(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    rc, out, err = _prepare(_lock(tmp_path, {"name": "web", "path": "corpus"}), capsys)
    assert rc == 0, err
    assert not [ln for ln in out.splitlines() if ln.lstrip().startswith(("{", "}", '"'))], out
    assets = json.loads((tmp_path / "assets" / "assets.json").read_text())  # (what the trainers read)
    assert [s["name"] for s in assets["sources"]] == ["web"] and str(tmp_path / "assets" / "assets.json") in out


# ----------------------------------------------------------------------------- 2. a planning-only source


def test_a_planning_only_source_names_no_trainer(tmp_path, capsys):
    rc, _, err = _prepare(_lock(tmp_path, {"name": "general-web"}), capsys)
    assert rc == 1 and len(err.splitlines()) == 1
    assert "'general-web' has no path" in err and "training needs local data" in err
    assert "native trainer" not in err


# ----------------------------------------------------------------------------- 3. X103 / X104


def test_no_deepspeed_artifacts_means_x104_alone_with_the_reason():
    c = make_compiled(plan=ParallelPlan(dp_shard=1, tp=8, micro_batch=4, grad_accum=1), global_batch_seqs=4)
    cfg, diags = deepspeed_config(c)
    assert cfg is None and 4 % 8 != 0  # 4 sequences over the 8 GPUs as data-parallel ranks
    assert [d.code for d in diags] == ["X104"]
    assert "tp=8" in diags[0].message and "not emitted" in diags[0].message
    # a batch that splits: X103 describes the artifacts written, no X104
    cfg, diags = deepspeed_config(make_compiled(plan=ParallelPlan(dp_shard=4, tp=2, micro_batch=2, grad_accum=4),
                                                global_batch_seqs=32))
    assert cfg is not None and [d.code for d in diags] == ["X103"]


# ----------------------------------------------------------------------------- 4. launch's help


def test_launch_help_says_torchrun_starts_every_backend_on_one_node():
    from llmc.cli import app

    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    line = next(ln for ln in r.output.splitlines() if " launch " in ln)
    assert "torchrun" in line and "deepspeed launcher for" not in line.lower()
    r = CliRunner().invoke(app, ["launch", "--help"], env={"COLUMNS": "200"})
    assert "HOSTFILE" in r.output and "torchrun" in r.output


# ----------------------------------------------------------------------------- 5. T002 about a derived warmup


def test_a_derived_warmup_is_said_so_and_located_on_what_sets_the_run_length(tmp_path):
    """16K tokens at 8192 per step is ceil(16384 / 8192) = 2 steps; llmc's warmup (1% of them, at least 1) is 1 step,
    50%: the warning says it was derived and sits on data.tokens (line 7), the key the user changes."""
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.jsonl").write_text('{"text": "x"}\n')
    steps = math.ceil(16 * 1024 / 8192)
    warmup = max(1, round(0.01 * steps))
    c = _plan(_spec("{name: s, path: ok}", tokens="16K"), tmp_path)
    t002 = [d for d in c.diagnostics if d.code == "T002"]
    assert [(d.path, d.line) for d in t002] == [("data.tokens", 7)]
    assert f"warmup {warmup} (derived" in t002[0].message and f"{100 * warmup / steps:.0f}%" in t002[0].message
    assert "training.schedule.warmup_steps" in t002[0].hint
    # pinned by the user: on the key that sets it, not called derived
    text = _spec("{name: s, path: ok}", tokens="16K").replace("global_batch_tokens: 8192}",
                                                             "global_batch_tokens: 8192, schedule: {warmup_steps: 1}}")
    pinned = [d for d in _plan(text, tmp_path).diagnostics if d.code == "T002"]
    assert [d.path for d in pinned] == ["training.schedule.warmup_steps"] and "derived" not in pinned[0].message
