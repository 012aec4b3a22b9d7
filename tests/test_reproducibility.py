"""What a run records of the software that ran it, and what ``training.seed`` does and does not drive.

* ``llmc.runtime.software.runtime_versions``: the versions the libraries themselves report; every trainer's ``start``
  event and a finished stage's DONE.json hold them (not in the fingerprint: another torch does not make a finished
  stage stale; another Python's builtin corpus text does, as data); the torchtitan job's inlined copy says the same.
* ``llmc launch`` (``--dry-run`` too, without importing torch) warns once (L017) when the installed torch, or the
  launched backend's library, is another release than the lock's ``target_versions``.
* ``training.seed`` does not regenerate llmc's builtin post-training records (a fixed seed), and does not reorder a
  single source's documents (file order, as its description and the README say), only the mixture's draws.
"""

from __future__ import annotations

import ast
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from test_build_fakes import ROOT
from typer.testing import CliRunner

from llmc.cli import app
from llmc.runtime.software import public_version, runtime_versions


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """examples/tiny_cpu.yaml built (its builtin python-docs corpus, every backend's artifacts)."""
    b = tmp_path_factory.mktemp("tiny") / "b"
    r = CliRunner().invoke(app, ["build", str(ROOT / "examples" / "tiny_cpu.yaml"), "-o", str(b)])
    assert r.exit_code == 0, r.output
    return b


def test_runtime_versions_are_what_the_libraries_say():
    import datasets
    import tokenizers
    import torch
    import transformers

    import llmc

    got = runtime_versions()
    assert got["python"] == ".".join(map(str, sys.version_info[:3]))
    assert got["torch"] == torch.__version__ and got["tokenizers"] == tokenizers.__version__
    assert got["transformers"] == transformers.__version__ and got["datasets"] == datasets.__version__
    assert got["llmc"] == llmc.__version__
    for mod in ("deepspeed", "torchtitan", "lm_eval"):  # optional: recorded when installed
        try:
            __import__(mod)
        except ImportError:
            assert mod not in got
        else:
            assert got[mod]
    assert public_version("2.14.1+cu130") == "2.14.1" and public_version("0.19.8") == "0.19.8"


def test_the_torchtitan_jobs_inlined_copy_records_the_same(built):
    """The job imports nothing of llmc: its ``_software`` is an inlined copy, which its start and resume events call."""
    import importlib.metadata

    src = (built / "torchtitan" / "llmc_job.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "_software")
    ns: dict = {"sys": sys}
    exec(compile(ast.Module([fn], []), "llmc_job.py", "exec"), ns)
    want = {**runtime_versions(), "llmc": importlib.metadata.version("llmc")}
    assert ns["_software"]() == want
    # the job's llmc version (the installed package's metadata, from pyproject.toml) is the trainers' llmc.__version__:
    # the two sources cannot drift apart without this failing
    import tomllib

    import llmc

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert declared == llmc.__version__ == want["llmc"], (declared, llmc.__version__, want["llmc"])
    assert 'self.event("start", backend="torchtitan", software=_software())' in src
    assert 'self.event("resume", step=step, backend="torchtitan", software=_software())' in src


# a process in which `import torch` fails, whose installed torch metadata reads 2.13.0+cu130
OTHER_TORCH = """
import importlib.metadata, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} imported by llmc launch")
        return None

sys.meta_path.insert(0, NoTorch())
real = importlib.metadata.version
importlib.metadata.version = lambda d: "2.13.0+cu130" if d == "torch" else real(d)
from llmc.cli import main
sys.argv[0] = "llmc"
main()
"""


def test_launch_warns_once_when_torch_is_another_release_without_importing_it(built):
    target = json.loads((built / "plan.lock.json").read_text())["_llmc"]["target_versions"]["torch"]
    p = subprocess.run([sys.executable, "-c", OTHER_TORCH, "launch", str(built), "--backend", "native", "--dry-run"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if "L017" in ln]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"{built}: warning[L017] built for torch {target}, this environment has 2.13.0: ")
    assert f"install torch=={target}" in lines[0]


def test_launch_compares_the_launched_backends_library(built, monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    lock = json.loads((built / "plan.lock.json").read_text())["_llmc"]["target_versions"]

    def launch(backend: str) -> list[str]:
        r = CliRunner().invoke(app, ["launch", str(built), "--backend", backend, "--dry-run"])
        assert r.exit_code == 0, r.output
        return [ln for ln in r.output.splitlines() if "L017" in ln]

    # this environment as it is: a warning exactly when its releases are not the targets
    same = all(public_version(real(d)) == lock[d] for d in ("torch", "deepspeed"))
    assert bool(launch("deepspeed")) == (not same)
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: {"torch": lock["torch"] + "+cu130", "deepspeed": "0.18.0",
                                   "torchtitan": "0.2.0"}.get(d) or real(d))
    (line,) = launch("deepspeed")
    assert f"built for deepspeed {lock['deepspeed']}, this environment has 0.18.0: " in line  # (+cu130: the same)
    assert launch("native") == []  # deepspeed / torchtitan only when the launch runs them
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: {"torch": "2.13.0", "torchtitan": "0.2.0"}.get(d) or real(d))
    (line,) = launch("native")
    assert "torchtitan" not in line
    from llmc.launch import launch_commands, software_warning

    cmds = launch_commands(str(built), backend="torchtitan", gpu=False)
    line = software_warning(str(built), cmds, "torchtitan")
    assert (f"built for torch {lock['torch']} and torchtitan {lock['torchtitan']}, this environment has torch 2.13.0 "
            "and torchtitan 0.2.0: ") in line
    assert software_warning(str(built), [], "torchtitan") is None  # a launch that runs nothing: nothing to say


def test_done_records_the_software_outside_the_fingerprint_and_another_pythons_corpus_is_stale(built, monkeypatch):
    """DONE.json records the versions (with a stage folder: what a trainer writes); another torch there leaves the
    stage finished; the builtin corpus parsed from another Python's stdlib (another sha256) makes it stale, as data."""
    from llmc.runtime import corpus
    from llmc.runtime.job import fingerprint_record, finished_stage

    lock = json.loads((built / "plan.lock.json").read_text())
    out = built / "run" / "pretrain"
    out.mkdir(parents=True, exist_ok=True)
    record = fingerprint_record(lock, "pretrain", built, stage_dir=out)
    assert record["software"] == runtime_versions()
    assert "software" not in fingerprint_record(lock, "pretrain", built)  # (what a launch compares: no versions)
    record["software"] = {**record["software"], "torch": "2.13.0", "python": "3.12.1"}
    (out / "DONE.json").write_text(json.dumps({"status": "done", "step": 1, **record}))
    assert finished_stage(lock, "pretrain", out, build_dir=built).change is None
    assert record["data_files"]["python-docs"]["builtin"] == "python-docs"
    monkeypatch.setattr(corpus, "corpus_sha256", lambda name="python-docs": "0" * 64)  # another Python's text
    stale = finished_stage(lock, "pretrain", out, build_dir=built)
    assert stale.cause == "data" and "python-docs" in stale.change


def test_native_start_event_and_done_json_record_the_software(tmp_path):
    from test_runtime_train import make_lock, run

    from llmc.runtime import corpus

    corpus.write_corpus(tmp_path / "docs.jsonl", max_docs=100)
    lock = make_lock(tmp_path, tmp_path / "docs.jsonl", steps=2, interval=2)
    assert run(lock, tmp_path / "out")["status"] == "done"
    start = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["software"] == runtime_versions()
    assert start["software"]["python"] == platform.python_version()
    done = json.loads((tmp_path / "out" / "DONE.json").read_text())
    assert done["software"] == runtime_versions()


def _pipeline_lock(seed: int) -> dict:
    from llmc.compiler.compile import compile_loaded
    from llmc.emit.lock import lock_dict
    from llmc.overrides import parse_override, read_with_overrides

    loaded = read_with_overrides(ROOT / "examples" / "pipeline_tiny.yaml", [parse_override(f"training.seed={seed}")])
    return lock_dict(compile_loaded(loaded).compiled)


def test_the_seed_changes_the_init_not_the_builtin_post_training_records():
    import torch

    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import build_model
    from llmc.runtime.posttrain import load_stage_records

    jobs = {s: {k: TrainJob.from_lock(_pipeline_lock(s), k) for k in ("sft", "dpo", "grpo")} for s in (0, 12345)}
    assert jobs[0]["sft"].seed == 0 and jobs[12345]["sft"].seed == 12345
    for stage, kind in (("sft", "chat"), ("dpo", "preference"), ("grpo", "prompts")):
        a, b = (load_stage_records(jobs[s][stage], kind, n_synthetic=64) for s in (0, 12345))
        assert a == b and len(a[0]) == 64, stage
    w0, w1 = (build_model(jobs[s]["sft"].arch, "cpu", seed=s).state_dict() for s in (0, 12345))
    assert not torch.equal(w0["tok_embeddings.weight"], w1["tok_embeddings.weight"])


def test_the_seed_draws_the_mixture_not_a_single_sources_order(tmp_path):
    """What the seed's description says: one source streams in file order under every seed; two are drawn by it."""
    from llmc.runtime import corpus
    from llmc.runtime.data import SourceData, build_stream_loader
    from llmc.runtime.tokenizer import TextTokenizer, train_bpe
    from llmc.spec.load import field_docs
    from llmc.spec.schema import Training

    docs = tmp_path / "docs.jsonl"
    corpus.write_corpus(docs, max_docs=200)
    lines = docs.read_text().splitlines()
    (tmp_path / "b.jsonl").write_text("\n".join(lines[100:]) + "\n")
    tok = TextTokenizer(train_bpe([json.loads(x)["text"] for x in lines], 300, tmp_path / "tok"))
    one = [SourceData("docs", str(docs), "jsonl", "text", 1.0)]
    two = [*one, SourceData("b", str(tmp_path / "b.jsonl"), "jsonl", "text", 1.0)]

    def batches(sources, seed):
        loader = build_stream_loader(sources, tok, 32, 4, seed)
        return [loader.next_batch(4)[0].tolist() for _ in range(3)]

    assert batches(one, 0) == batches(one, 1) == batches(one, 12345)
    assert batches(two, 0) != batches(two, 1)
    # in file order: the first window is the first document's first tokens
    first = tok.encode(json.loads(lines[0])["text"])[:32]
    assert batches(one, 7)[0][0] == first
    said = field_docs(Training)["seed"]
    assert "file order" in said and "eval.validation.seed" in said and "mixture" in said
