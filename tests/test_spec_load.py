"""The spec loader: examples load, bad specs give the right code on the right line, all at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmc.diagnostics import SpecError, line_for
from llmc.spec.load import load_spec, loads_spec
from llmc.spec.presets import PRESETS
from llmc.spec.schema import RunSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SPECS = ROOT / "tests" / "fixtures" / "specs"
BAD = sorted(SPECS.glob("bad_*.yaml"))
_EXPECT = re.compile(r"^# expect: (?P<code>[A-Z]\d{3}) (?P<line>\d+)(?: (?P<path>\S+))?\s*$")


def _expectations(path: Path) -> list[tuple[str, int, str | None]]:
    out = []
    for text in path.read_text().splitlines():
        m = _EXPECT.match(text)
        if m:
            out.append((m["code"], int(m["line"]), m["path"]))
    assert out, f"{path.name} has no '# expect: CODE LINE [PATH]' header"
    return out


def _diags(path: Path):
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    return ei.value.diagnostics


# ----------------------------------------------------------------------------- examples


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    for required in ("tiny_cpu.yaml", "llama3_8b_h100x8.yaml", "llama3_70b_h100x64.yaml",
                     "llama3_405b_h100x16384.yaml", "mixtral_8x7b.yaml", "deepseek_v3.yaml"):
        assert required in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path: Path):
    run, lines = load_spec(path)
    assert isinstance(run, RunSpec)
    assert lines["name"] >= 1 and lines["model"] >= 1 and lines["data.seq_len"] > lines["data"]
    assert path.read_text().startswith("#"), "each example opens with a comment header"
    assert "llmc plan" in path.read_text()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_roundtrips_through_json(path: Path):
    # the lockfile stores run.model_dump(mode="json"); the runtime re-validates it
    run, _ = load_spec(path)
    assert RunSpec.model_validate(run.model_dump(mode="json")) == run


def test_tiny_cpu_numbers():
    run, _ = load_spec(ROOT / "examples" / "tiny_cpu.yaml")
    assert run.model == PRESETS["tiny"]
    assert run.hardware.gpu == "cpu" and run.hardware.count == 1
    assert run.data.sources[0].name == "python-docs" and run.data.sources[0].format == "builtin"
    assert run.data.tokenizer.train and run.data.tokenizer.vocab_size == 2048
    assert run.data.seq_len == 128
    assert run.data.tokens / run.training.global_batch_tokens == 500


def test_published_runs():
    r405, _ = load_spec(ROOT / "examples" / "llama3_405b_h100x16384.yaml")
    assert r405.model.name == "llama3.1-405b" and r405.hardware.count == 16384
    assert r405.data.tokens == 15.6e12 and r405.training.global_batch_tokens == 2048 * 8192
    assert r405.budget.max_days == 90 and r405.hardware.usd_per_gpu_hour == 2.0
    ds, _ = load_spec(ROOT / "examples" / "deepseek_v3.yaml")
    assert ds.hardware.gpu == "h800" and ds.hardware.count == 2048 and ds.training.precision == "fp8"
    assert ds.training.global_batch_tokens == 15360 * 4096 and ds.data.tokens == 14.8e12


def test_example_gpu_keys_are_in_the_hardware_table():
    hardware = pytest.importorskip("llmc.compiler.hardware")
    for path in EXAMPLES:
        run, _ = load_spec(path)
        keys = {run.hardware.gpu} | {s.gpu for s in run.serving if s.gpu}
        for k in keys:
            assert k in hardware.GPUS, f"{path.name}: GPU {k!r} not in the hardware table"


def test_serving_example():
    run, _ = load_spec(ROOT / "examples" / "llama3_8b_h100x8.yaml")
    assert {s.engine for s in run.serving} == {"vllm", "sglang"}
    assert all(s.max_model_len == 8192 for s in run.serving)


# ----------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_spec_code_and_line(path: Path):
    diags = _diags(path)
    got = {(d.code, d.line, d.path) for d in diags}
    for code, line, dpath in _expectations(path):
        match = [g for g in got if g[0] == code and g[1] == line and (dpath is None or g[2] == dpath)]
        assert match, f"{path.name}: expected {code} at line {line} ({dpath}); got {sorted(got, key=str)}"
    for d in diags:
        assert d.severity == "error" and d.file == str(path)
        rendered = d.render()
        assert rendered.startswith(f"{path}:{d.line}: error[{d.code}]"), rendered
        assert "\n" not in rendered and "Traceback" not in rendered


def test_multiple_errors_reported_at_once():
    diags = _diags(SPECS / "bad_multi.yaml")
    assert len(_expectations(SPECS / "bad_multi.yaml")) == 5
    assert len(diags) == 5, [d.render() for d in diags]
    assert [d.line for d in diags] == sorted(d.line for d in diags)


def test_did_you_mean_key():
    (d,) = [d for d in _diags(SPECS / "bad_unknown_key.yaml") if d.code == "S001"]
    assert d.message == "unknown key 'n_kv_head'"
    assert "did you mean 'n_kv_heads'?" in d.hint
    (d,) = _diags(SPECS / "bad_unknown_toplevel.yaml")
    assert "did you mean 'training'?" in d.hint


def test_did_you_mean_preset():
    (d,) = _diags(SPECS / "bad_preset.yaml")
    assert d.code == "S004" and "did you mean 'llama3-8b'?" in d.hint
    (d,) = _diags(SPECS / "bad_preset_mapping.yaml")
    assert "did you mean 'mistral-7b'?" in d.hint


def test_human_range_messages():
    diags = {d.path: d for d in _diags(SPECS / "bad_range.yaml")}
    assert diags["hardware.count"].message == "must be > 0 (got 0)"
    assert diags["data.seq_len"].message == "must be an integer (got 'long')"
    (d,) = _diags(SPECS / "bad_literal.yaml")
    assert d.message == "must be one of 'bf16', 'fp8', 'nvfp4' or 'fp32' (got 'bf8')" and "'fp8'" in d.hint


def test_list_length_messages_say_which_bound(tmp_path):
    """A list past its longest (one NoPE entry per layer at most: 1024) or a fixed pair given three items says "at
    most", not "must have 1024 items" as if the list needed exactly that many."""
    spec = tmp_path / "s.yaml"
    layers = ", ".join(map(str, range(1100)))
    spec.write_text(f"name: x\nmodel: {{preset: tiny, nope_layers: [{layers}]}}\nhardware: {{gpu: cpu, count: 1}}\n"
                    "data: {seq_len: 128, tokens: 1M}\ntraining: {optimizer: {betas: [0.9, 0.95, 0.99]}}\n")
    diags = {d.path: d.message for d in _diags(spec)}
    assert diags == {"model.nope_layers": "must have at most 1024 items (got 1100)",
                     "training.optimizer.betas": "must have at most 2 items (got 3)"}


def test_missing_file():
    (d,) = _diags(SPECS / "does_not_exist.yaml")
    assert d.code == "S000" and "not found" in d.message


def test_hf_unsupported_model_type_message():
    (d,) = _diags(SPECS / "bad_hf_model_type.yaml")
    assert "gpt2" in d.message and "llama" in d.hint  # (the supported types: in the hint)


# ----------------------------------------------------------------------------- model forms


def test_hf_config_with_override():
    run, lines = load_spec(SPECS / "good_hf_override.yaml")
    assert run.model.n_layers == 16
    assert run.model.model_dump(exclude={"n_layers"}) == PRESETS["llama3-8b"].model_dump(exclude={"n_layers"})
    assert run.data.tokens == 15.6e12 and run.training.global_batch_tokens == 1.4e12
    assert lines["model.n_layers"] == 5


def test_explicit_architecture():
    run, _ = load_spec(SPECS / "good_explicit.yaml")
    m = run.model
    assert m.name == "my-moe" and m.moe.num_experts == 16 and m.moe.expert_d_ff == 512
    assert m.rope_scaling.type == "yarn" and m.head_dim == 64
    assert run.data.tokens == 2_000_000 and run.budget.max_usd == 1500


BASE = "name: t\nhardware: {gpu: cpu, count: 1}\ndata: {seq_len: 128, tokens: 1M}\n"


def test_preset_string_and_overrides():
    run, _ = loads_spec(BASE + "model: llama3.1-8b\n")
    assert run.model == PRESETS["llama3.1-8b"]
    run, _ = loads_spec(BASE + "model:\n  preset: deepseek-v3\n  moe: {top_k: 4}\n")
    assert run.model.moe.top_k == 4 and run.model.moe.num_experts == 256  # nested merge keeps the rest
    assert run.model.name == "deepseek-v3"
    run, _ = loads_spec(BASE + "model:\n  preset: llama3-8b\n  d_model: 2048\n  n_heads: 16\n")
    assert run.model.head_dim == 128  # derived again from the override, not copied from the preset
    run, _ = loads_spec(BASE + "model:\n  preset: tiny-moe\n  moe: null\n")
    assert run.model.moe is None


def test_override_error_on_its_own_line():
    with pytest.raises(SpecError) as ei:
        loads_spec(BASE + "model:\n  preset: tiny\n  n_layers: 0\n  d_ff: -3\n", file="x.yaml")
    got = {(d.code, d.line, d.path, d.message) for d in ei.value.diagnostics}
    assert ("S002", 6, "model.n_layers", "must be > 0 (got 0)") in got
    assert ("S002", 7, "model.d_ff", "must be > 0 (got -3)") in got


# ----------------------------------------------------------------------------- line map


def test_line_map():
    text = """name: lines
model:
  preset: tiny
  n_kv_heads: 4
hardware:
  gpu: cpu
  count: 1
data:
  seq_len: 128
  tokens: 1M
training:
  optimizer:
    lr: 1.0e-3
stages:
  - name: a
    kind: sft
  - name: b
    kind: dpo
"""
    _, lines = loads_spec(text)
    assert lines["name"] == 1
    assert lines["model.n_kv_heads"] == 4
    assert lines["training.optimizer.lr"] == 13
    assert lines["stages.0"] == 15 and lines["stages.0.kind"] == 16 and lines["stages.1.name"] == 17
    assert line_for(lines, "training.optimizer.betas") == 12
    assert line_for(lines, "model.d_ff") == 2
    assert line_for(lines, "stages.1.lr") == 17
    assert line_for(lines, "budget.max_days") is None


@pytest.mark.parametrize("text, expected", [
    ("15.6e12", 15.6e12), ("15.6T", 15.6e12), ("16M", 16e6), ("2_000_000", 2e6), ("1.4e+12", 1.4e12),
    ("1e12", 1e12), ("300B", 3e11), ("4G", 4e9), ("8K", 8e3), ('"2,000,000"', 2e6), ("1.1T", 1.1e12),
])
def test_human_numbers_in_yaml(text: str, expected: float):
    run, _ = loads_spec(f"name: n\nmodel: tiny\nhardware: {{gpu: cpu, count: 1}}\n"
                        f"data: {{seq_len: 128, tokens: {text}}}\ntraining: {{global_batch_tokens: {text}}}\n")
    assert run.data.tokens == expected and run.training.global_batch_tokens == expected


def test_no_traceback_on_garbage():
    for text in ["", "null", "[1, 2]", "name: [", "\t- x", "model: {preset: 3}", "name: x\nmodel: 42\n"]:
        with pytest.raises(SpecError) as ei:
            loads_spec(text, file="g.yaml")
        assert ei.value.diagnostics, text
        assert all(d.code.startswith("S") for d in ei.value.diagnostics)


def test_empty_optional_sections_are_absent():
    run, _ = loads_spec(BASE + "model: tiny\nstages:\nserving:\nbudget:\ntraining:\n")
    assert run.stages == [] and run.serving == [] and run.budget.max_days is None
    with pytest.raises(SpecError) as ei:  # required sections may not be empty
        loads_spec("name: t\nmodel: tiny\nhardware:\ndata: {seq_len: 128, tokens: 1M}\n")
    (d,) = ei.value.diagnostics
    assert (d.code, d.path, d.line) == ("S002", "hardware", 3)


def test_line_for_accepts_brackets():
    lines = {"serving": 10, "serving.0": 11, "serving.0.gpus": 12}
    assert line_for(lines, "serving[0].gpus") == 12
    assert line_for(lines, "serving[0].concurrency") == 11
    assert line_for(lines, "serving[3]") == 10


@pytest.mark.parametrize("given, preset", [
    ("meta-llama/Meta-Llama-3-8B", "llama3-8b"), ("meta-llama/Llama-3.1-405B", "llama3.1-405b"),
    ("Llama-2-7b-hf", "llama2-7b"), ("mistralai/Mistral-7B-v0.1", "mistral-7b"),
    ("Qwen/Qwen2.5-72B", "qwen2.5-72b"), ("deepseek-ai/DeepSeek-V3", "deepseek-v3"), ("LLAMA3-70B", "llama3-70b"),
])
def test_preset_hint_for_hf_ids(given: str, preset: str):
    with pytest.raises(SpecError) as ei:
        loads_spec(BASE + f"model: {given}\n")
    (d,) = ei.value.diagnostics
    assert d.code == "S004" and d.hint == f"did you mean {preset!r}?"


def test_stage_keys_are_checked_per_kind():
    text = BASE + """\
model: tiny
stages:
  - name: a
    kind: sft
    dpo_beta: 0.1
  - name: b
    steps: 3
  - name: c
    kind: sfd
  - name: d
    kind: long_context
    rope_theta: 1000000
"""
    with pytest.raises(SpecError) as ei:
        loads_spec(text, file="s.yaml")
    got = {d.code: d for d in ei.value.diagnostics}
    assert set(got) == {"S001", "S003", "S002"}
    assert got["S001"].render() == ("s.yaml:{}: error[S001] stages.0.dpo_beta: unknown key 'dpo_beta' for a sft "
                                    "stage ('dpo_beta' belongs to dpo stages)").format(text.splitlines().index(
                                        "    dpo_beta: 0.1") + 1)
    assert got["S003"].path == "stages.1.kind" and got["S002"].path == "stages.2.kind"
    assert "did you mean 'sft'?" in got["S002"].hint


def test_stage_kinds_load_as_their_classes():
    from llmc.spec.schema import STAGE_KINDS, STAGE_TYPES

    body = "".join(f"  - {{name: s{i}, kind: {k}}}\n" for i, k in enumerate(STAGE_KINDS))
    run, _ = loads_spec(BASE + "model: tiny\nstages:\n" + body)
    assert [type(s) for s in run.stages] == [STAGE_TYPES[k] for k in STAGE_KINDS]
    # the resolved spec round-trips through JSON (the lockfile stores it)
    assert RunSpec.model_validate(run.model_dump(mode="json")) == run


@pytest.mark.parametrize(("key", "shown"), [("~", "null"), ("null", "null"), ("yes", "True"), ("0x10", "16")])
def test_a_key_yaml_reads_as_another_type_is_located_under_the_name_it_loads_as(key, shown):
    text = f"name: t\nmodel: llama3-8b\nhardware:\n  gpu: h100-sxm\n  count: 8\n  {key}: 3\n"
    with pytest.raises(SpecError) as e:
        loads_spec(text, file="s.yaml")
    bad = [d for d in e.value.diagnostics if "keys should be strings" in d.message]
    assert [(d.path, d.line) for d in bad] == [(f"hardware.{shown}", 6)], [d.render() for d in e.value.diagnostics]
    assert "quote the key" in bad[0].hint


@pytest.mark.parametrize(("escape", "said"), [("\\0", "NUL character"), ("\\udc80", "lone surrogate (\\udc80)")])
def test_text_no_file_or_argument_can_hold_is_refused_where_it_is_written(escape, said):
    """A YAML escape can put a NUL or a lone surrogate in any string; a path holding one built fine and failed at
    launch. Each is one located error, wherever it is (a path, a name inside a list)."""
    text = (f'name: t\nmodel: llama3-8b\ndata:\n  seq_len: 4096\n  tokens: 1B\n'
            f'  sources: [{{name: web, path: "/data/web{escape}x"}}]\n'
            f'  tokenizer: {{path: "/tok{escape}"}}\nhardware: {{gpu: h100-sxm, count: 8}}\n')
    with pytest.raises(SpecError) as e:
        loads_spec(text, file="s.yaml")
    got = [(d.code, d.path, d.line) for d in e.value.diagnostics]
    assert got == [("S002", "data.sources.0.path", 6), ("S002", "data.tokenizer.path", 7)], got
    assert all(said in d.message for d in e.value.diagnostics)
