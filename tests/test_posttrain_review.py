"""A post-training engineer's findings on the stage checks: ``lora:`` on a stage llmc's LM trainers run (G024: none of
them applies LoRA, so the plan must not count adapters), a chat stage fed llmc's builtin pre-training corpus (G014, and
the runtime that used to swap in synthetic toy records), a LoRA rank that is no low-rank update of an adapted matrix
(T106 error), and the ``lora.targets`` message that now lists the Hugging Face names llmc accepts. Figures are checked
against llmc's runtime model (its parameters, its linears' shapes) and the loader's own behaviour."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from llmc.compiler.compile import compile_spec  # noqa: E402
from llmc.diagnostics import SpecError  # noqa: E402
from llmc.runtime.model import Transformer  # noqa: E402
from llmc.spec.load import loads_spec  # noqa: E402
from llmc.spec.presets import PRESETS  # noqa: E402
from llmc.spec.schema import LORA_HF_NAMES, LORA_TARGETS, make_stage  # noqa: E402

torch.set_num_threads(1)

HEAD = """\
name: t
model: {model}
hardware: {{gpu: {gpu}, count: {count}}}
data: {{sources: [{{name: web}}], tokenizer: {{path: /nope/tok, chat_template: llama3}}, seq_len: 4096, tokens: 1B}}
training: {{backend: {backend}}}
stages:
"""


def spec_text(stages: str, model="llama3-8b", gpu="h100-sxm", count=8, backend="native") -> str:
    return HEAD.format(model=model, gpu=gpu, count=count, backend=backend) + textwrap.indent(
        textwrap.dedent(stages), "  ")


def compile_text(text: str):
    run, lines = loads_spec(text, file="s.yaml")
    return compile_spec(run, "s.yaml", lines, spec_bytes=b"")


def line_of(text: str, needle: str) -> int:
    return next(i + 1 for i, ln in enumerate(text.splitlines()) if needle in ln)


def diags(c, code: str) -> list:
    return [d for d in c.diagnostics if d.code == code]


def runtime_params(arch) -> int:
    """Every parameter of llmc's runtime model (built on the meta device): what a full training trains."""
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(arch).parameters())


# ----------------------------------------------------------------------------- G024: LoRA on an LM stage

LM_STAGES = {
    "midtrain": """\
        - name: s
          kind: midtrain
          init_hf: /models/base
          {lora}data: {{sources: [{{name: code, kind: code}}], seq_len: 4096, tokens: 2B}}
        """,
    "long_context": """\
        - name: s
          kind: long_context
          init_hf: /models/base
          rope_scaling: {{type: yarn, factor: 4, original_max_position: 8192}}
          {lora}data: {{sources: [{{name: books}}], seq_len: 32768, tokens: 1B}}
        """,
    "pretrain": """\
        - name: s
          kind: pretrain
          {lora}
        """,
}


@pytest.mark.parametrize("backend", ["native", "torchtitan", "deepspeed"])
@pytest.mark.parametrize("kind", list(LM_STAGES))
def test_lora_on_an_lm_stage_is_refused_and_planned_as_the_full_training_that_runs(kind, backend):
    """llmc's native trainer, DeepSpeed runner and torchtitan job train every weight of a midtrain / long_context /
    pretrain stage (none of them adds adapters): ``lora:`` there is a G024 error located at the stage's lora, whose
    message says why and whose hint says what to do, and every number the plan gives the stage is the one of the same
    stage without lora (trainable parameters: the runtime model's, learning rate, memory, time)."""
    lora = "lora: {rank: 16, alpha: 32}\n          "
    text = spec_text(LM_STAGES[kind].format(lora=lora), backend=backend)
    c = compile_text(text)
    (d,) = diags(c, "G024")
    assert d.severity == "error" and d.path == "stages.0.lora" and d.line == line_of(text, "lora: {rank: 16")
    assert "not run by llmc's" in d.message and "every weight" in d.message
    assert "drop lora" in d.hint and (kind == "pretrain" or "sft stage" in d.hint)
    full = compile_text(spec_text(LM_STAGES[kind].format(lora=""), backend=backend))
    assert not diags(full, "G024")
    (got,), (want,) = c.stages, full.stages
    assert got.lora is None and got.trainable_params == runtime_params(PRESETS["llama3-8b"]) == want.trainable_params
    assert got.trainable_fraction == 1.0
    assert (got.lr, got.min_lr, got.steps) == (want.lr, want.min_lr, want.steps)
    assert got.memory == want.memory and got.time == want.time and got.models_in_memory == want.models_in_memory
    assert not any("LoRA" in n for n in got.notes)


def test_the_reviewers_midtrain_lora_on_the_tiny_model_plans_every_weight():
    """The reviewer's case: midtrain with lora {rank: 4} on the tiny model was planned with 38.9K trainable parameters
    (LoRA's) and LoRA's learning rate, and trained all 1.31M weights. Now: G024, and the tiny runtime model's count."""
    text = spec_text("""\
        - name: mid
          kind: midtrain
          init_hf: /models/base
          steps: 4
          lora: {rank: 4, alpha: 8}
          data: {sources: [{name: web}], seq_len: 128, tokens: 100K}
        """, model="tiny", gpu="cpu", count=1)
    c = compile_text(text)
    assert [d.severity for d in diags(c, "G024")] == ["error"]
    assert c.stages[0].trainable_params == runtime_params(PRESETS["tiny"])


def test_the_native_trainer_refuses_a_stage_with_lora(tmp_path):
    """A lock that still carries lora: on an LM stage (built before the plan refused it) stops at the native trainer's
    start with a located line, instead of fine-tuning every weight."""
    from llmc.runtime.distributed import DistInfo
    from llmc.runtime.job import TrainJob
    from llmc.runtime.train import TrainingError, train

    st = make_stage(name="mid", kind="midtrain", lora={"rank": 4})
    job = TrainJob(arch=PRESETS["tiny"], sources=[], seq_len=64, steps=1, name="p", stage="mid", kind="midtrain",
                   lr=1e-3, micro_batch=1, stage_spec=st)
    with pytest.raises(TrainingError, match=r"midtrain stage 'mid' has lora:.*hint: drop lora"):
        train(job, tmp_path, assets=None, info=DistInfo(0, 1, 0, torch.device("cpu")))
    assert not any(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------- G014: a pre-training corpus in a chat stage

RECORD = {"sft": "chat", "dpo": "preference", "grpo": "prompts"}


def chat_stage(kind: str, sources: str) -> str:
    return f"""\
        - name: s
          kind: {kind}
          init_hf: /models/base
          data:
            sources: {sources}
            seq_len: 2048
            tokens: 10M
        """


@pytest.mark.parametrize("kind", list(RECORD))
def test_a_chat_stage_on_the_builtin_pretraining_corpus_is_an_error_naming_the_builtin_of_its_kind(kind):
    text = spec_text(chat_stage(kind, "[{name: python-docs, format: builtin}]"))
    c = compile_text(text)
    (d,) = diags(c, "G014")
    assert d.severity == "error" and d.path == "stages.0.data.sources.0.format"
    assert d.line == line_of(text, "python-docs")
    assert "python-docs" in d.message and "pre-training text corpus" in d.message
    want = RECORD[kind]
    assert f"format: builtin, kind: {want}" in d.hint
    # what the hint names is what the runtime generates for the stage
    assert _runtime_records(kind, [{"name": "x", "format": "builtin", "kind": want}])


@pytest.mark.parametrize("kind", list(RECORD))
def test_the_builtin_corpus_beside_a_real_source_is_still_an_error(kind, tmp_path):
    """With a jsonl source of the stage's records beside it, the builtin corpus is still refused (the runtime stops at
    it): an error, not the 'skipped' warning of a source of another kind."""
    text = spec_text(chat_stage(kind, f"[{{name: mine, path: /d/r.jsonl, kind: {RECORD[kind]}}}, "
                                      "{name: python-docs, format: builtin}]"))
    c = compile_text(text)
    assert [(d.severity, d.path) for d in diags(c, "G014")] == [("error", "stages.0.data.sources.1.format")]


ROWS = {"chat": {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]},
        "preference": {"prompt": "1+1", "chosen": "2", "rejected": "3"},
        "prompts": {"prompt": "1+1", "answer": "2"}}


def _runtime_records(kind: str, sources: list[dict], tmp_path: Path | None = None) -> list:
    """The records llmc's post-training loader gives a ``kind`` stage with these sources (files: one good record)."""
    from llmc.runtime.posttrain import load_stage_data

    for s in sources:
        if s.get("path"):
            (tmp_path / s["path"]).write_text(json.dumps(ROWS[RECORD[kind]]) + "\n")
    st = make_stage(name="s", kind=kind, data={"sources": sources, "seq_len": 64, "tokens": 1e4})
    job = SimpleNamespace(stage_spec=st, seed=0, stage="s", resolve_path=lambda p: tmp_path / p)
    return load_stage_data(job, RECORD[kind])


@pytest.mark.parametrize("kind", list(RECORD))
def test_the_runtime_refuses_the_builtin_corpus_instead_of_training_on_synthetic_records(kind, tmp_path):
    """The post-training loader generated its synthetic records of the stage's kind for any ``format: builtin``
    source, so a DPO stage on python-docs trained on 512 arithmetic preference pairs; now it stops with one line
    naming the source, alone or beside a real source."""
    from llmc.runtime.posttrain import PostTrainError

    docs = {"name": "python-docs", "format": "builtin"}
    mine = {"name": "mine", "path": "r.jsonl", "kind": RECORD[kind]}
    for sources in ([docs], [mine, docs]):
        with pytest.raises(PostTrainError, match=r"source 'python-docs' is llmc's builtin pre-training text corpus"
                                                 rf".*hint: .*format: builtin and kind: {RECORD[kind]}"):
            _runtime_records(kind, sources, tmp_path)
    assert len(_runtime_records(kind, [mine], tmp_path)) == 1  # the user's file: its one record, nothing added


def test_the_runtime_refuses_a_record_source_without_a_path(tmp_path):
    """A planning-only source (no path) of the stage's kind is refused too, never replaced by synthetic records."""
    from llmc.runtime.posttrain import PostTrainError

    with pytest.raises(PostTrainError, match=r"source 'tulu' has no path"):
        _runtime_records("sft", [{"name": "tulu", "kind": "chat"}], tmp_path)


# ----------------------------------------------------------------------------- T106: a rank that is not low-rank


def runtime_min_dim(arch, targets) -> tuple[str, int]:
    """(target, min(d_in, d_out)) of the adapted nn.Linear of llmc's runtime model with the smallest such dimension."""
    with torch.device("meta"):
        model = Transformer(arch)
    dims = [(name.rsplit(".", 1)[-1], min(m.weight.shape)) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    return min(dims, key=lambda x: x[1])


def lora_stage(rank: int, targets=None) -> str:
    t = f", targets: {json.dumps(targets)}" if targets else ""
    return f"""\
        - name: s
          kind: sft
          init_hf: /models/base
          lora: {{rank: {rank}{t}}}
          data: {{sources: [{{name: c, path: /d/c.jsonl, kind: chat}}], seq_len: 128, tokens: 1M}}
        """


@pytest.mark.parametrize("model,targets", [("tiny", None), ("tiny", ["wq", "wo"]), ("llama3-8b", None),
                                           ("llama3-70b", ["w1", "w2", "w3"])])
def test_a_rank_at_min_d_in_d_out_of_an_adapted_matrix_is_an_error_naming_it(model, targets):
    """At r = min(d_in, d_out) a rank-r product B A spans every update of the matrix (the test below): no low-rank
    adapter, and r (d_in + d_out) parameters at least half the matrix's. T106 is an error there,
    naming the matrix and its shape; one below it is at most the ordinary out-of-range warning."""
    arch = PRESETS[model]
    name, k = runtime_min_dim(arch, targets or list(LORA_TARGETS))
    gpu = "cpu" if model == "tiny" else "h100-sxm"
    text = spec_text(lora_stage(k, targets), model=model, gpu=gpu, count=1 if model == "tiny" else 8)
    (d,) = diags(compile_text(text), "T106")
    assert d.severity == "error" and d.path == "stages.0.lora.rank" and d.line == line_of(text, "lora: {rank")
    assert f"for {name} " in d.message and f"{k:,} = min(d_in, d_out)" in d.message
    assert "r=16" in d.hint and "full fine-tuning" in d.hint
    below = [(x.severity, x.path) for x in diags(compile_text(
        spec_text(lora_stage(k - 1, targets), model=model, gpu=gpu, count=1 if model == "tiny" else 8)), "T106")]
    assert below == ([] if k - 1 <= 64 else [("warning", "stages.0.lora.rank")])


def test_at_rank_min_d_in_d_out_b_a_spans_every_update():
    """The claim T106 rests on, for the tiny model's wk (d_in 128, d_out 64): any 64 x 128 update is B A with B 64 x
    64, A 64 x 128 (its SVD, B = U S, A = V^T), so a rank-64 adapter is no low-rank constraint there."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, dtype=torch.float64, generator=g)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    b, a = u * s, vh
    assert b.shape == (64, 64) and a.shape == (64, 128) and torch.allclose(b @ a, w)


def test_ordinary_out_of_range_ranks_stay_a_warning():
    (d,) = diags(compile_text(spec_text(lora_stage(128))), "T106")  # llama3-8b: k_proj 4096 -> 1024
    assert d.severity == "warning" and "outside the usual 4-64" in d.message


# ----------------------------------------------------------------------------- lora.targets: the names accepted


def test_an_unknown_target_lists_every_name_llmc_accepts_and_each_of_them_loads():
    text = spec_text(lora_stage(16, ["q_proj", "qkv_proj"]))
    with pytest.raises(SpecError) as e:
        loads_spec(text, file="s.yaml")
    (d,) = e.value.diagnostics
    assert d.path == "stages.0.lora.targets.1" and "(got 'qkv_proj')" in d.message
    listed = [n for n in (*LORA_TARGETS, *LORA_HF_NAMES, "all-linear") if f"'{n}'" in d.message]
    assert listed == [*LORA_TARGETS, *LORA_HF_NAMES, "all-linear"]
    for n in listed:  # every name the message offers is one the loader takes
        run, _ = loads_spec(spec_text(lora_stage(16, [n])), file="s.yaml")
        want = LORA_TARGETS if n == "all-linear" else [LORA_HF_NAMES.get(n, n)]
        assert list(run.stages[0].lora.targets) == list(want)


# ----------------------------------------------------------------------------- G026: a chat stage without data


@pytest.mark.parametrize("kind", list(RECORD))
def test_a_chat_stage_without_data_is_said_to_train_on_the_builtin_synthetic_records(kind):
    """A chat stage with no data of its own plans with a G026 warning on the stage: llmc's trainer would train it on
    its builtin synthetic records (which the runtime does: checked), not on the user's; the hint names the builtin
    source that trains on them on purpose, which, named, plans without G026, as a stage with its own records does."""
    text = spec_text("""\
        - name: s
          kind: {kind}
          init_hf: /models/base
        """.replace("{kind}", kind))
    c = compile_text(text)
    (d,) = diags(c, "G026")
    assert d.severity == "warning" and d.path == "stages.0" and d.line == line_of(text, "name: s")
    assert "synthetic" in d.message and f"kind: {RECORD[kind]}" in d.hint
    st = make_stage(name="s", kind=kind, data=None)
    job = SimpleNamespace(stage_spec=st, seed=0, stage="s", resolve_path=lambda p: p)
    from llmc.runtime.posttrain import load_stage_records

    assert all(w.startswith("synthetic ") for w in load_stage_records(job, RECORD[kind])[1])
    # the hint as written (its N given): the stage's data, with the builtin source it names or with records of yours
    data = d.hint.split("`")[1].replace("seq_len: N", "seq_len: 2048").replace("tokens: N", "tokens: 10M")
    builtin = d.hint.split("name them as its source: ")[1]
    for sources in (f"[{builtin}]", f"[{{name: mine, path: /d/r.jsonl, kind: {RECORD[kind]}}}]"):
        stage = f"""\
        - name: s
          kind: {kind}
          init_hf: /models/base
          {data.replace("[...]", sources)}
        """
        c = compile_text(spec_text(stage))
        assert not diags(c, "G026") and not [x for x in c.diagnostics if x.severity == "error"], (stage, [
            x.render() for x in c.diagnostics if x.severity == "error"])
