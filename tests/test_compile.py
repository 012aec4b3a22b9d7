"""compile_spec end to end: determinism, hashing, defaults, and every plan/hyper/data/budget diagnostic."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from llmc.compiler import defaults, scaling
from llmc.compiler.compile import compile_spec
from llmc.spec.load import load_spec, loads_spec

BASE = """\
name: t
model: {model}
hardware: {{gpu: {gpu}, count: {count}}}
data: {{seq_len: {seq}, tokens: {tokens}}}
"""


def _compile(text: str):
    run, lines = loads_spec(text, file="spec.yaml")
    return compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())


def _spec(model="llama3-8b", gpu="h100-sxm", count=64, seq=8192, tokens="1T", extra=""):
    return BASE.format(model=model, gpu=gpu, count=count, seq=seq, tokens=tokens) + extra


def _codes(c, severity=None):
    return {d.code for d in c.diagnostics if severity is None or d.severity == severity}


def _diag(c, code):
    ds = [d for d in c.diagnostics if d.code == code]
    assert ds, f"{code} not in {[d.render() for d in c.diagnostics]}"
    return ds[0]


# ------------------------------------------------------------------------------------------- basics


def test_compile_is_deterministic_and_hashes_the_bytes_it_is_given():
    path = "examples/llama3_8b_h100x8.yaml"
    run, lines = load_spec(path)
    with open(path, "rb") as f:
        raw = f.read()
    a = compile_spec(run, path, lines, spec_bytes=raw)
    b = compile_spec(run, path, lines, spec_bytes=raw)
    assert a.to_json() == b.to_json()
    assert a.spec_sha256 == hashlib.sha256(raw).hexdigest()
    # without the bytes the compiler reads nothing: the hash is the resolved spec's
    c = compile_spec(run, "/nonexistent/elsewhere.yaml", lines)
    assert c.spec_sha256 != a.spec_sha256 and c.spec_sha256 == compile_spec(run, path, lines).spec_sha256


def test_compute_optimal_uses_chinchilla_6nd_convention():
    # The report's compute-optimal point and the C001 hint must agree: both use C = 6 N D (Chinchilla's
    # convention, no attention term), not the report's training FLOPs with attention.
    c = _compile(_spec())
    n_act = c.model.params_active
    n, d = scaling.compute_optimal(6.0 * n_act * c.compute.tokens)
    assert c.compute.optimal_params == pytest.approx(n, rel=1e-9)
    assert c.compute.optimal_tokens == pytest.approx(d, rel=1e-9)


def test_compute_optimal_reproduces_chinchilla():
    # Chinchilla itself: 70B parameters on 1.4T tokens is compute-optimal for its budget
    # (Hoffmann et al. 2022, arXiv:2203.15556 Table 1 / §4.2), C = 6 N D = 5.88e23 FLOPs.
    n, d = scaling.compute_optimal(6 * 70e9 * 1.4e12)
    assert n == pytest.approx(70e9, rel=1e-6) and d == pytest.approx(1.4e12, rel=1e-6)


# ------------------------------------------------------------------------------------------- defaults


def test_default_lr_log_interpolation():
    assert defaults.default_lr(1e9) == pytest.approx(3e-4)
    assert defaults.default_lr(70e9) == pytest.approx(1e-4)
    assert 1e-4 < defaults.default_lr(8e9) < 3e-4  # between the anchors, decreasing with size
    assert defaults.default_lr(1e6) == 6e-4 and defaults.default_lr(1e13) == 6e-5


def test_default_batch_and_warmup_and_checkpointing():
    assert defaults.default_batch_seqs(8e9, 8192, 64, False) * 8192 == 4 * 2**20  # 4M tokens for 3-10B
    assert defaults.default_batch_seqs(405e9, 8192, 16384, False) == 2048  # 16M tokens
    assert defaults.default_batch_seqs(8e9, 8192, 96, False) % 3 == 0  # keeps the world's odd factor
    assert defaults.default_batch_seqs(1e6, 128, 1, True) == 8
    assert defaults.default_warmup(10_000) == 100
    assert defaults.default_warmup(3_750_000) == 2000  # capped
    # at least 2 (a 1-step warmup runs step 1 at peak: none) where 2 is within 10% of the steps, else 1
    assert defaults.default_warmup(50) == 2 and defaults.default_warmup(19) == 1 and defaults.default_warmup(1) == 0
    assert defaults.default_checkpoint_interval(6.0, 10**6) == 300  # 30 min / 6 s
    assert defaults.default_checkpoint_interval(0.1, 10**6) == 1000
    assert defaults.default_checkpoint_interval(100.0, 10**6) == 50
    assert defaults.default_checkpoint_interval(0.1, 20) == 20
    assert defaults.default_async_checkpoint(70e9) and not defaults.default_async_checkpoint(8e9)


def test_hyper_reports_defaults():
    c = _compile(_spec())
    h = c.hyper
    assert {"lr", "global_batch_tokens", "steps", "warmup_steps", "checkpoint_interval"} <= set(h.defaults)
    assert h.lr == pytest.approx(defaults.default_lr(c.model.params_active))
    assert h.min_lr == pytest.approx(0.1 * h.lr)
    assert h.steps == math.ceil(1e12 / h.global_batch_tokens)
    c2 = _compile(_spec(extra="training: {optimizer: {lr: 2.0e-4}, global_batch_tokens: 2097152}\n"))
    assert c2.hyper.lr == 2e-4 and "lr" not in c2.hyper.defaults
    assert c2.hyper.global_batch_seqs == 256


# ------------------------------------------------------------------------------------------- plan codes


def test_p001_seed_deepseek_layout_world_mismatch():
    # "TP16 x PP8 x DP64 on 2048 GPUs" multiplies to 8192, not 2048
    c = _compile(_spec(count=2048, extra="parallelism:\n  tp: 16\n  pp: 8\n  dp_shard: 64\n"))
    d = _diag(c, "P001")
    assert d.severity == "error" and "8192" in d.message and "2048" in d.message
    assert d.line == 5 and c.plan is None
    assert "P002" in _codes(c, "error")  # tp 16 spans two nodes
    assert "P003" in _codes(c, "error")  # 8 kv heads not divisible by 16


def test_p003_heads_not_divisible():
    c = _compile(_spec(extra="parallelism: {tp: 3}\n"))
    assert {"P002", "P003"} <= _codes(c, "error")


def test_p004_nothing_fits_names_closest_and_hints():
    c = _compile(_spec(model="llama3.1-405b", count=8))
    d = _diag(c, "P004")
    assert "GiB" in d.message and "more GPUs" in d.hint and "offload" in d.hint


def test_p005_batch_not_whole_sequences_and_not_splittable():
    c = _compile(_spec(extra="training: {global_batch_tokens: 4M}\n"))
    d = _diag(c, "P005")
    assert "4,194,304" in d.hint
    tiny = "name: t\nmodel: tiny\nhardware: {gpu: h100-sxm, count: 16}\ndata: {seq_len: 128, tokens: 1M}\n" \
           "training: {global_batch_tokens: 896}\n"  # 7 sequences over 16 GPUs: no layout splits it
    assert "P005" in _codes(_compile(tiny), "error")
    # a batch that splits, but not with the pinned micro-batch: the pin is named, not the batch
    c = _compile(_spec(count=8, extra="training: {global_batch_tokens: 4194304}\nparallelism: {micro_batch: 3}\n"))
    d = _diag(c, "P005")
    assert d.path == "parallelism.micro_batch" and "pinned micro_batch 3" in d.message and "512" in d.hint


def test_p006_pipeline_bubble_warning():
    c = _compile(_spec(model="llama3-70b", count=64,
                       extra="training: {global_batch_tokens: 131072}\nparallelism: {pp: 4, tp: 8, "
                             "pp_schedule: 1F1B}\n"))
    assert "P006" in _codes(c, "warning")


# ------------------------------------------------------------------------------------------- training codes


def test_t001_lr_out_of_range():
    c = _compile(_spec(extra="training: {optimizer: {lr: 3.0e-3}}\n"))
    assert "T001" in _codes(c, "warning")
    assert "T001" not in _codes(_compile(_spec(extra="training: {optimizer: {lr: 3.0e-4}}\n")))


def test_t002_t003_t004():
    c = _compile(_spec(extra="training:\n  grad_clip: null\n  precision: fp32\n  schedule: {warmup_steps: 0}\n"))
    assert {"T002", "T003", "T004"} <= _codes(c, "warning")
    c = _compile(_spec(extra="training: {schedule: {kind: constant}}\n"))
    assert "T002" in _codes(c)


def test_t005_fp8_without_tensor_cores():
    c = _compile(_spec(gpu="a100-80g", extra="training: {precision: fp8}\n"))
    d = _diag(c, "T005")
    assert d.severity == "error" and c.plan is None


def test_t006_t007_batch_and_z_loss_for_large_runs():
    c = _compile(_spec(model="llama3-70b", count=512, extra="training: {global_batch_tokens: 1048576}\n"))
    assert "T006" in _codes(c, "warning") and "T007" in _codes(c, "info")


def test_t008_moe_without_aux_loss():
    c = _compile(_spec(model="{preset: mixtral-8x7b, moe: {num_experts: 8, top_k: 2, aux_loss_coef: 0}}", seq=4096))
    assert "T008" in _codes(c, "warning")


# ------------------------------------------------------------------------------------------- budget/data/gpu


def test_b001_b002_budget_exceeded():
    c = _compile(_spec())
    days, cost, mfu = c.time.days, c.cost.usd, c.time.mfu
    assert 0.3 < mfu < 0.6  # so 90 % of the predicted time is still above the 60 %-MFU floor (B003)
    tight = _compile(_spec(extra=f"budget: {{max_days: {days * 0.9:.2f}, max_usd: {cost * 0.9:.0f}}}\n"))
    assert {"B001", "B002"} <= _codes(tight, "error") and "B003" not in _codes(tight)
    assert f"{days:.1f} days" in _diag(tight, "B001").message
    ok = _compile(_spec(extra=f"budget: {{max_days: {days * 1.1:.2f}, max_usd: {cost * 1.1:.0f}}}\n"))
    assert not ({"B001", "B002", "B003"} & _codes(ok))


def test_b003_impossible_budget_says_what_is_needed():
    c = _compile(_spec(extra="budget: {max_days: 2, max_usd: 1000}\n"))
    ds = [d for d in c.diagnostics if d.code == "B003"]
    assert {d.path for d in ds} == {"budget.max_days", "budget.max_usd"}
    assert any("GPUs" in d.hint for d in ds)


def test_s007_unknown_gpu_with_did_you_mean():
    c = _compile(_spec(gpu="h100-sxn"))
    d = _diag(c, "S007")
    assert "h100-sxm" in d.hint and d.line == 3 and c.plan is None


def test_d001_d002_d003_data():
    c = _compile(_spec(tokens="1M"))
    assert "D001" in _codes(c, "error")
    # weights are relative: 7 : 3 is 70% / 30%; web needs 1T x 0.7 = 700B of its 100B unique tokens = 7 epochs,
    # code 300B of 500B = 0.6 epochs (no D002)
    extra = ("  sources:\n    - {name: web, tokens: 100B, weight: 7}\n    - {name: code, tokens: 500B, weight: 3}\n")
    text = _spec().replace("data: {seq_len: 8192, tokens: 1T}\n", "data:\n  seq_len: 8192\n  tokens: 1T\n" + extra)
    c = _compile(text)
    d = _diag(c, "D002")
    assert d.severity == "warning" and "web" in d.message and d.line == 8  # the "- {name: web ...}" line
    assert "7.0 epochs (7e+11 of 1e+11 tokens)" in d.message, d.message
    assert [x.path for x in c.diagnostics if x.code == "D002"] == ["data.sources.0.tokens"]
    assert "mixture: web 70.0%, code 30.0%" in _diag(c, "D003").message


def test_every_example_compiles_without_errors():
    import glob

    for path in sorted(glob.glob("examples/*.yaml")):
        run, lines = load_spec(path)
        c = compile_spec(run, path, lines)
        errs = [d.render() for d in c.diagnostics if d.severity == "error"]
        assert not errs, (path, errs)
        pretrains = not run.stages or any(st.kind == "pretrain" for st in run.stages)
        assert (c.plan is not None) == pretrains, path


def test_batch_too_small_for_a_big_cluster():
    # 4M tokens = 512 sequences cannot feed 24,576 GPUs (at most 8-way TP: 3,072 data-parallel ranks)
    c = _compile(_spec(count=24576, extra="training: {global_batch_tokens: 4194304}\n"))
    d = _diag(c, "P005")
    assert "3072" in d.hint and c.plan is None
    # with the batch left to llmc, the default grows to one sequence per data-parallel rank
    c = _compile(_spec(count=24576))
    assert c.plan is not None and c.hyper.global_batch_seqs % 3072 == 0
    assert "T006" not in {d.code for d in c.diagnostics}  # 25M tokens: within 2M-64M (DeepSeek-V3 trained at 63M)
    c = _compile(_spec(count=65536))
    assert c.plan is not None and c.hyper.global_batch_seqs % 8192 == 0
    assert "T006" in {d.code for d in c.diagnostics}  # 67M tokens: outside 2M-64M, said out loud


def test_steps_seed_vector():
    # 15T tokens (Llama 3) at 4M tokens per step = 3,750,000 steps
    assert defaults.default_steps(15e12, 4_000_000) == 3_750_000
    assert defaults.default_steps(15e12 + 1, 4_000_000) == 3_750_001


def test_pretrain_stage_reports_the_searched_plan_memory():
    # One figure per run: the stage table must not contradict the plan the search chose.

    path = Path(__file__).resolve().parents[1] / "examples" / "pipeline_tiny.yaml"
    run, lines = load_spec(path)
    c = compile_spec(run, spec_path=str(path), yaml_lines=lines)
    (pre,) = [s for s in c.stages if s.kind == "pretrain"]
    assert pre.memory.per_gpu_bytes == c.memory.per_gpu_bytes
    assert pre.memory.activation_checkpointing == c.plan.activation_checkpointing


def test_plan_path_reads_no_files_and_skips_networkx(tmp_path):
    # the compiler is pure: tokenizer contents arrive as ExternalFacts, the spec bytes from the caller
    import subprocess
    import sys

    code = (
        "import builtins, io, pathlib, sys\n"
        "from llmc.spec.load import load_spec\n"
        "run, lines = load_spec('examples/pipeline_llama3_8b.yaml')\n"
        "from llmc.compiler.compile import compile_spec\n"
        "opened = []\n"
        "real_open = io.open\n"
        "def spy(f, *a, **k):\n"
        "    if not str(f).endswith('.py') and 'site-packages' not in str(f): opened.append(str(f))\n"
        "    return real_open(f, *a, **k)\n"
        "builtins.open = io.open = spy\n"
        "pathlib.Path.read_text = lambda self, *a, **k: opened.append(str(self))\n"
        "pathlib.Path.read_bytes = lambda self, *a, **k: opened.append(str(self))\n"
        "compile_spec(run, 'examples/pipeline_llama3_8b.yaml', lines)\n"
        "print(opened, 'networkx' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[] False"


def test_tokenizer_facts_drive_the_template_check(tmp_path):
    from llmc.spec.facts import gather_facts

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"content": "<|im_start|>"},
                                                                                  {"content": "<|im_end|>"}]}))
    text = ("name: t\nmodel: llama3-8b\nhardware: {gpu: h100-sxm, count: 8}\n"
            "data: {seq_len: 8192, tokens: 1B, tokenizer: {path: tok, chat_template: llama3}}\n"
            "stages:\n  - {name: sft, kind: sft}\n")
    run, lines = loads_spec(text, file="s.yaml")
    facts = gather_facts(run, tmp_path)
    assert facts.tokenizers["tok"].specials == {"<|im_start|>", "<|im_end|>"}
    with_facts = compile_spec(run, "s.yaml", lines, spec_bytes=text.encode(), facts=facts)
    without = compile_spec(run, "s.yaml", lines, spec_bytes=text.encode())
    sev = {c: [d.severity for d in x.diagnostics if d.code == "T103"] for c, x in (("f", with_facts), ("n", without))}
    assert sev == {"f": ["error"], "n": []}  # the file lacks llama3's header tokens; the name guess has them


def test_tokenizer_folder_without_tokenizer_json_is_warned(tmp_path):
    """D006: a tokenizer folder that is here but holds no tokenizer.json (Kimi K2 ships a tiktoken.model) is warned
    at its spec location, before prepare stops on it: the runtime's own tokenizer loader is the reference (it refuses
    that folder and reads the other); a path that is not here is not checked (planned away from its files)."""
    from llmc.runtime.tokenizer import TextTokenizer, train_bpe
    from llmc.spec.facts import gather_facts

    (tmp_path / "kimi").mkdir()
    (tmp_path / "kimi" / "tiktoken.model").write_text("IQ== 0\n")
    train_bpe(["a tokenizer that reads " * 20], 300, tmp_path / "good")
    text = ("name: t\nmodel: tiny\nhardware: {gpu: h100-sxm, count: 8}\n"
            "data: {seq_len: 256, tokens: 1B, tokenizer: {path: kimi}}\n"
            "stages:\n  - {name: sft, kind: sft, data: {seq_len: 256, tokens: 1M, tokenizer: {path: good, chat_template: chatml}}}\n"
            "  - {name: more, kind: sft, data: {seq_len: 256, tokens: 1M, tokenizer: {path: elsewhere/tok, chat_template: chatml}}}\n")
    run, lines = loads_spec(text, file="s.yaml")
    got = compile_spec(run, "s.yaml", lines, spec_bytes=text.encode(), facts=gather_facts(run, tmp_path))
    d006 = [d for d in got.diagnostics if d.code == "D006"]
    assert [(d.severity, d.path) for d in d006] == [("warning", "data.tokenizer.path")]
    assert "holds no tokenizer.json but tiktoken.model" in d006[0].message and d006[0].line == 4
    with pytest.raises(FileNotFoundError):
        TextTokenizer(tmp_path / "kimi")
    assert TextTokenizer(tmp_path / "good").tok.get_vocab_size() > 256
    (tmp_path / "good" / "tokenizer.json").write_text("{not json")
    bad = compile_spec(run, "s.yaml", lines, spec_bytes=text.encode(), facts=gather_facts(run, tmp_path))
    assert [d.path for d in bad.diagnostics if d.code == "D006"] == ["data.tokenizer.path", "stages.0.data.tokenizer.path"]


MLA_NATIVE = """\
name: mla-native
model:
  name: mla
  n_layers: 4
  d_model: 1024
  n_heads: 16
  d_ff: 4096
  vocab_size: 32000
  mla: {kv_lora_rank: 256, qk_rope_head_dim: 32, qk_nope_head_dim: 64, v_head_dim: 64}
hardware: {gpu: h100-sxm, count: 8}
data: {seq_len: 4096, tokens: 1e9}
training: {backend: native}
"""


def test_native_mla_tensor_parallelism_is_planned_and_runs():
    """llmc's native trainer shards MLA attention over TP (heads; test_runtime_train checks the losses against one
    process), so a native MLA plan is searched over tp like any other and a pinned tp 2 is no error; the runtime's
    apply_tp accepts it (a mesh of 2 on the meta device) and refuses a tp that does not divide the heads."""
    c = _compile(MLA_NATIVE)
    assert c.backend.name == "native" and not [d for d in c.diagnostics if d.severity == "error"]
    tp_line = next(r for r in c.reasons if r.strip().startswith("TP "))
    assert "others: 2: +" in tp_line and "8: +" in tp_line  # tp 2..8 searched and timed (was pinned to 1)
    pinned = _compile(MLA_NATIVE + "parallelism: {tp: 2}\n")
    assert pinned.plan.tp == 2 and not [d for d in pinned.diagnostics if d.severity == "error"]
    pytest.importorskip("torch")
    from llmc.runtime.distributed import apply_tp
    from llmc.runtime.model import build_model

    with pytest.raises(ValueError, match="must divide n_heads=16"):
        apply_tp(build_model(c.spec.model, "meta"), type("Mesh", (), {"size": lambda self: 3})())


def test_a_sliding_window_is_counted_planned_and_run_by_a_trainer_that_applies_it():
    """Mistral-7B v0.1 attends to the previous 4096 tokens (its config.json). Its attention FLOPs stop growing at the
    window (Megatron-Bridge's transformer_flops: min(window, seq_len) keys per query); torchtitan has no window
    (X315), so ``auto`` plans llmc's trainer; that trainer's band mask (seq_len^2 elements) is in the memory, and the
    masked kernel computes the whole square, so the step takes longer per counted FLOP than without a window."""
    from llmc.compiler import flops
    from llmc.report import render_text
    from llmc.spec.presets import PRESETS

    mistral = PRESETS["mistral-7b"]
    full = mistral.model_copy(update={"sliding_window": None})
    hd, L, H = mistral.hd, mistral.n_layers, mistral.n_heads
    for s in (2048, 4096, 8192, 32768):  # the attention term: 6 L s' H (d_qk + d_v), s' = min(s, 4096)
        got = flops.train_flops_per_token(mistral, s) - flops.train_flops_per_token(mistral, s, attention=False)
        assert got == 6 * L * min(s, 4096) * H * 2 * hd
        assert flops.train_flops_per_token(full, s) - flops.train_flops_per_token(full, s, attention=False) == \
            6 * L * s * H * 2 * hd
    c8 = _compile(_spec("mistral-7b", count=8, seq=8192, tokens="1B"))
    assert c8.compute.flops_per_token == flops.train_flops_per_token(mistral, 4096)
    assert "sliding_window 4096" in c8.compute.convention and "M007" not in _codes(c8)
    assert c8.backend.name == "native" and "no sliding window" in c8.backend.reason
    # sequences no longer than the window: full causal attention is the windowed model, which torchtitan runs
    c4 = _compile(_spec("mistral-7b", count=8, seq=4096, tokens="1B"))
    assert c4.backend.name == "torchtitan" and c4.memory.breakdown["buffers"] < c8.memory.breakdown["buffers"]
    longer = _compile(_spec("mistral-7b", count=8, seq=4096, tokens="1B", extra=(  # a torchtitan job past the window
        "stages:\n  - {name: pre, kind: pretrain}\n  - {name: long, kind: long_context, init_from: pre, "
        "seq_len: 16384, rope_theta: 1.0e+6, data: {seq_len: 16384, tokens: 1e8}}\n")))
    assert longer.backend.name == "native" and "shorter than seq_len 16384" in longer.backend.reason
    # the same plan without the window: one (s, s) bf16 mask less, and less time per FLOP
    plain = _compile(_spec("mistral-7b", count=8, seq=8192, tokens="1B", extra="training: {backend: native}\n").replace(
        "model: mistral-7b", "model: {preset: mistral-7b, sliding_window: null}"))
    assert plain.plan == c8.plan
    assert c8.memory.breakdown["buffers"] - plain.memory.breakdown["buffers"] == 8192 ** 2 * 2
    # the masked kernel does the full model's attention work: the same step time, so the MFU falls by the FLOP ratio
    assert c8.time.step_seconds == pytest.approx(plain.time.step_seconds, rel=1e-12)
    assert c8.time.mfu / plain.time.mfu == pytest.approx(c8.compute.flops_per_token / plain.compute.flops_per_token)
    assert "sliding-window attention (4096 tokens)" in render_text(c8)


def test_nope_layers_plan_the_trainer_that_skips_rope_there():
    """SmolLM3-3B has no RoPE in every 4th layer. That changes no count (RoPE's rotations are not in the matmul
    FLOPs, and NoPE adds no weight): the same FLOPs, parameters and plan as the model with RoPE everywhere on the
    native trainer. torchtitan 0.3.0's Llama ropes every layer (X316), so ``auto`` plans llmc's trainer and says
    why; the report names the NoPE layers; the tokenizer is known to hold ChatML's specials."""
    from llmc.report import render_text

    smol = _spec("smollm3-3b", count=8, seq=4096, tokens="10B")
    c = _compile(smol)
    assert c.backend.name == "native" and "applies RoPE in every layer" in c.backend.reason
    assert c.model.params_total == 3_075_098_624
    roped = _compile(smol.replace("model: smollm3-3b", "model: {preset: smollm3-3b, nope_layers: []}") +
                     "training: {backend: native}\n")
    assert (c.compute.flops_per_token, c.plan, c.time.step_seconds) == (
        roped.compute.flops_per_token, roped.plan, roped.time.step_seconds)
    assert _compile(smol.replace("model: smollm3-3b", "model: {preset: smollm3-3b, nope_layers: []}")
                    ).backend.name == "torchtitan"
    assert "none in 9 of 36 layers (NoPE: 3, 7, 11, 15, 19, 23, ...)" in render_text(c)
    sft = _compile(smol + "stages:\n  - {name: sft, kind: sft, init_hf: /models/SmolLM3-3B, data: {seq_len: 4096, "
                   "tokens: 1e7, sources: [{name: c, path: c.jsonl, kind: chat}]}}\n")
    assert sft.stages[0].hyper["chat_template"] == "chatml" and "T103" not in _codes(sft)


def test_olmo2_plans_the_native_trainer():
    """OLMo-2 7B: torchtitan 0.3.0 has no OLMo 2 block (X317), so ``auto`` plans llmc's trainer, whose TP shards the
    q / k norms over the whole projection with it (a pinned tp 2 plans and is what runs:
    test_runtime_train.test_tensor_parallel_matches_single_process[olmo2]). Its counts: the model page's 7.3B
    parameters; per token, the Llama block of the same shape's FLOPs plus 6 x its q / k norm weights (6N counts
    every non-embedding weight)."""
    from llmc.compiler import flops
    from llmc.compiler.params import params_total
    from llmc.spec.presets import PRESETS

    c = _compile(_spec("olmo2-7b", count=16, seq=4096, tokens="10B"))
    assert c.backend.name == "native" and "no OLMo 2 block" in c.backend.reason
    assert not _codes(c, "error")
    assert round(c.model.params_total / 1e9, 1) == 7.3
    from llmc.report import render_text

    text = " ".join(render_text(c).split())  # (the table wraps long lines)
    assert "q/k norms over the whole projections, norms on the attention / MLP outputs (OLMo 2)" in text
    llama = PRESETS["olmo2-7b"].model_copy(update={"qk_norm": False, "qk_norm_scope": "head", "norm_placement": "pre"})
    extra = params_total(PRESETS["olmo2-7b"]) - params_total(llama)
    assert extra == 32 * (4096 + 4096)  # one q and one k norm over 32 x 128 dims a layer
    assert c.compute.flops_per_token == flops.train_flops_per_token(llama, 4096) + 6 * extra
    pinned = _compile(_spec("olmo2-7b", count=16, seq=4096, tokens="10B", extra="parallelism: {tp: 2}\n"))
    assert pinned.plan.tp == 2 and pinned.backend.name == "native" and not _codes(pinned, "error")


def test_olmo3_counts_windowed_and_full_layers_apart():
    """OLMo 3-7B windows 24 of its 32 layers at 4096 tokens; the other 8 attend to the whole sequence. Its attention
    FLOPs per token are Megatron-Bridge's per-layer sum (transformer_flops: min(window, s) keys in a windowed layer, s
    in a full one), between the all-windowed and the unwindowed model's; everything else is OLMo 2-7B's block (the
    same FLOPs at s <= 4096, where no window binds). ``auto`` plans llmc's trainer (torchtitan has neither the window,
    X315, nor OLMo's block, X317);
    the report names the full-attention layers and says where YaRN applies; on vLLM each windowed layer holds only the
    window's positions of a sequence, a full layer all of them."""
    from llmc.compiler import flops
    from llmc.compiler.serving import kv_tokens_per_sequence
    from llmc.report import render_text
    from llmc.spec.presets import PRESETS

    o3 = PRESETS["olmo3-7b"]
    windowed = o3.model_copy(update={"full_attention_layers": ()})
    unwindowed = o3.model_copy(update={"full_attention_layers": (), "sliding_window": None})
    hd, H = o3.hd, o3.n_heads
    for s in (4096, 8192, 65536):
        attn = [flops.train_flops_per_token(a, s) - flops.train_flops_per_token(a, s, attention=False)
                for a in (o3, windowed, unwindowed)]
        assert attn[0] == 6 * (8 * s + 24 * min(s, 4096)) * H * 2 * hd
        assert attn[1] <= attn[0] <= attn[2] and (attn[1] < attn[0]) is (s > 4096)
    olmo2 = PRESETS["olmo2-7b"].model_copy(update={"vocab_size": o3.vocab_size})
    assert flops.train_flops_per_token(o3, 4096) == flops.train_flops_per_token(olmo2, 4096)
    c = _compile(_spec("olmo3-7b", count=16, seq=16384, tokens="10B"))
    assert c.backend.name == "native" and "no OLMo 2 block" in c.backend.reason and not _codes(c, "error")
    assert c.model.params_total == 7_298_011_136
    assert c.compute.flops_per_token == flops.train_flops_per_token(o3, 16384)
    assert "min(seq_len, sliding_window 4096) in 24 of 32 layers" in c.compute.convention
    text = " ".join(render_text(c).split())
    assert "sliding-window attention (4096 tokens; full attention in 8 of 32 layers: 3, 7, 11, 15, 19, 23, ...)" in text
    assert "YaRN x8 from 8,192 tokens (full-attention layers); windowed layers theta 500000, unscaled" in text
    # time: llmc's trainer masks the band in SDPA, which computes every score of the square, so the model's
    # compute time is the unwindowed model's (same plan), as for Mistral's window in every layer, and the MFU falls
    # by about the FLOP ratio (the sliced loss's recomputed head is charged at the model's blended rate: 0.3% here)
    plain = _compile(_spec("olmo3-7b", count=16, seq=16384, tokens="10B", extra="training: {backend: native}\n").replace(
        "model: olmo3-7b", "model: {preset: olmo3-7b, sliding_window: null, full_attention_layers: []}"))
    assert plain.plan == c.plan
    assert c.time.breakdown["compute"] == pytest.approx(plain.time.breakdown["compute"], rel=1e-12)
    assert c.time.mfu / plain.time.mfu == pytest.approx(c.compute.flops_per_token / plain.compute.flops_per_token,
                                                        rel=0.01)
    n = 65536
    assert kv_tokens_per_sequence(o3, "vllm", n) * 32 == 8 * n + 24 * kv_tokens_per_sequence(windowed, "vllm", n)
    assert kv_tokens_per_sequence(o3, "sglang", n) == n


def test_gemma3_plans_the_native_trainer_with_its_block_counted():
    """Gemma 3-1B: transformers' 999,885,952 parameters (test_spec_hf); torchtitan 0.3.0 has no Gemma block (X318),
    so ``auto`` plans llmc's trainer (test_torchtitan_render: X318). Its FLOPs per token: 6 x the non-embedding weights (the tied head counted as a
    matmul) + the attention term with 22 windowed layers at min(s, 512) keys and 4 full ones at s; the report
    names the block and the two RoPE bases."""
    from llmc.compiler import flops
    from llmc.compiler.params import params_total
    from llmc.report import render_text
    from llmc.spec.presets import PRESETS

    g = PRESETS["gemma3-1b"]
    c = _compile(_spec("gemma3-1b", count=8, seq=8192, tokens="10B"))
    assert c.backend.name == "native" and not _codes(c, "error")
    assert "no Gemma block" in c.backend.reason  # (the block, not its window, is why)
    assert c.model.params_total == params_total(g) == 999_885_952
    H, hd, s = g.n_heads, g.hd, 8192
    assert c.compute.flops_per_token == 6 * params_total(g) + 6 * (4 * s + 22 * 512) * H * 2 * hd
    assert c.compute.flops_per_token == flops.train_flops_per_token(g, s)
    text = " ".join(render_text(c).split())
    assert "norms before and after attention and MLP (Gemma: 1 + weight), GeGLU, embeddings x sqrt(d_model)" in text
    assert "theta 1e+06" in text and "windowed layers theta 10000" in text
    assert "999,885,952 total (1B)" in text  # (3 significant digits round it up to the next unit, not to "1e+03M")
    # a chat stage from Gemma 3 weights takes Gemma's turn format (its tokenizer's <start_of_turn> / <end_of_turn>)
    sft = _compile(_spec("gemma3-1b", count=8, seq=8192, tokens="10B") + "stages:\n  - {name: sft, kind: sft, init_hf: "
                   "/models/gemma-3-1b-it, data: {seq_len: 4096, tokens: 1e7, sources: [{name: c, path: c.jsonl, "
                   "kind: chat}]}}\n")
    assert sft.stages[0].hyper["chat_template"] == "gemma" and "T103" not in _codes(sft)


def test_gemma2_plans_its_soft_capped_scores():
    """Gemma 2-9B (transformers' 9,241,705,984 parameters, test_spec_hf) plans llmc's trainer (no Gemma block in
    torchtitan 0.3.0, X318). Its soft-capped attention keeps every score (8 B a score, memory.softcap_score_bytes; test_memory
    measures it): at 8K tokens without recomputation that is 16 heads x 8192 x 8 B = 1 MiB a token a layer, so the plan
    checkpoints; the scores also cost HBM time (elementwise) that the same model without soft-capping does not pay.
    The report says the scores are kept and names both caps."""
    from llmc.compiler import memory
    from llmc.compiler.params import params_total
    from llmc.report import render_text
    from llmc.spec.presets import PRESETS

    g = PRESETS["gemma2-9b"]
    c = _compile(_spec("gemma2-9b", count=8, seq=8192, tokens="10B"))
    assert c.backend.name == "native" and not _codes(c, "error") and "no Gemma block" in c.backend.reason
    assert c.model.params_total == params_total(g) == 9_241_705_984
    assert c.plan.activation_checkpointing != "none"
    none = memory.layer_activation_bytes_per_token(g, 0, "none", seq_len=8192)
    plain = memory.layer_activation_bytes_per_token(g.model_copy(update={"attn_logit_softcap": None}), 0, "none",
                                                    seq_len=8192)
    assert none - plain == 16 * 8192 * 8 + 2 * 2 * (16 - 8) * 256 - 2 * 2 * 16  # scores + expanded K/V - the LSE
    uncapped = _compile(_spec("gemma2-9b", count=8, seq=8192, tokens="10B").replace(
        "model: gemma2-9b", "model: {preset: gemma2-9b, attn_logit_softcap: null}"))
    assert c.time.breakdown["elementwise"] > 1.5 * uncapped.time.breakdown["elementwise"]
    text = " ".join(render_text(c).split())
    assert "attention scores soft-capped at 50 (no fused kernel: every score is kept for the backward)" in text
    assert "logits soft-capped at 30" in text


def test_a_yarn_long_context_stage_is_a_torchtitan_job_with_yarns_temperature():
    """A long-context stage's YaRN (cos/sin times 0.1 ln(factor) + 1, transformers' and llmc's model) runs as the
    stage's torchtitan job, whose TemperedRoPE puts that factor on torchtitan's pure rotation; a rule torchtitan's RoPE
    lacks (linear) is refused at the stage, and `auto` then plans llmc's trainer instead of a job the build would
    refuse."""
    from llmc.emit.torchtitan import render_torchtitan, torchtitan_diagnostics

    stages = ("stages:\n  - {name: pre, kind: pretrain}\n"
              "  - {name: long, kind: long_context, init_from: pre, seq_len: 16384, rope_scaling: "
              "{type: %s, factor: 2, original_max_position: 8192}, data: {seq_len: 16384, tokens: 1e8}}\n")
    c = _compile(_spec("llama3-8b", count=8, seq=8192, tokens="1B", extra=stages % "yarn"))
    assert c.backend.name == "torchtitan" and not _codes(c, "error") and torchtitan_diagnostics(c) == []
    job = render_torchtitan(c)["torchtitan/llmc_job_stage1.py"]
    assert "return TemperedRoPE.Config(" in job and "attention_factor=" in job
    assert "TemperedRoPE" not in render_torchtitan(c)["torchtitan/llmc_job.py"]  # pre-training: no scaling
    pinned = _compile(_spec("llama3-8b", count=8, seq=8192, tokens="1B",
                            extra="training: {backend: torchtitan}\n" + stages % "linear"))
    [d] = torchtitan_diagnostics(pinned)
    assert (d.code, d.severity) == ("X301", "error") and "'linear'" in d.message
    auto = _compile(_spec("llama3-8b", count=8, seq=8192, tokens="1B", extra=stages % "linear"))
    assert auto.backend.name == "native" and not _codes(auto, "error")


def test_a_stage_that_starts_from_no_weights_is_flagged():
    """A stage with neither init_from nor init_hf is trained from a fresh init by every backend (a fine-tune of
    random weights): G008 at the stage, not for one that names its base or chains from an earlier stage."""
    base = _spec("llama3-8b", count=8, seq=4096, tokens="1B")
    sft = "  - {name: sft, kind: sft, data: {seq_len: 4096, tokens: 1e7, sources: [{name: c, path: c.jsonl, kind: chat}]}"
    bare = _compile(base + "stages:\n" + sft + "}\n")
    d = _diag(bare, "G008")
    assert (d.severity, d.path, d.line) == ("warning", "stages.0", 6) and "randomly initialised" in d.message
    assert "G008" not in _codes(_compile(base + "stages:\n" + sft + ", init_hf: /models/llama3-8b}\n"))
    chained = _compile(base + "stages:\n  - {name: pre, kind: pretrain}\n" + sft + ", init_from: pre}\n")
    assert "G008" not in _codes(chained)
    for ex in ("pipeline_tiny", "pipeline_llama3_8b", "pipeline_llama3_70b_qlora"):
        run, lines = load_spec(f"examples/{ex}.yaml")
        assert "G008" not in _codes(compile_spec(run, ex, lines)), ex


def test_training_init_hf_with_stages_is_an_error_not_a_random_init():
    """With `stages:`, only a stage's own init_hf is read (the lock's stage entries, every backend): a top-level
    training.init_hf would leave the pre-training stage at random init, so it is G007 at its line."""
    stages = "stages:\n  - {name: pretrain, kind: pretrain}\n  - {name: sft, kind: sft, init_from: pretrain}\n"
    c = _compile(_spec(count=8, seq=4096, tokens="1B") + "training: {init_hf: /models/llama}\n" + stages)
    d = _diag(c, "G007")
    assert (d.severity, d.path, d.line) == ("error", "training.init_hf", 5)
    assert "G007" not in _codes(_compile(_spec(count=8, seq=4096, tokens="1B") + "training: {init_hf: /models/llama}\n"))
    ok = _compile(_spec(count=8, seq=4096, tokens="1B") + stages.replace("kind: pretrain}", "kind: pretrain, "
                                                                           "init_hf: /models/llama}"))
    assert "G007" not in _codes(ok) and ok.stages[0].init_hf == "/models/llama"


def test_compute_optimal_checks_are_for_training_from_scratch():
    """C001 (fewer than 20 tokens per parameter) judges a model trained from scratch; continued pre-training of a
    trained model (init_hf) on 1B tokens is not under-trained by that rule."""
    assert "C001" in _codes(_compile(_spec(count=8, seq=4096, tokens="1B")))
    assert "C001" not in _codes(_compile(_spec(count=8, seq=4096, tokens="1B") + "training: {init_hf: /models/llama}\n"))
    staged = "stages:\n  - {name: pretrain, kind: pretrain, init_hf: /models/llama}\n"
    assert "C001" not in _codes(_compile(_spec(count=8, seq=4096, tokens="1B") + staged))


def test_options_the_running_backend_drops_are_said_and_not_timed():
    """T013: torchtitan 0.3.0 has no z-loss and no loss-spike rewind, llmc's DeepSpeed runner no torch.compile and no
    rewind; the plan says so for the backend that runs it, and a compile the runner never applies is not timed."""
    base = _spec(count=8, extra="training: {z_loss: 0.0001, loss_spike: {enabled: true}, compile: true}\n")
    titan = _compile(base)
    assert titan.backend.name == "torchtitan"
    assert {d.path for d in titan.diagnostics if d.code == "T013"} == {"training.z_loss", "training.loss_spike"}
    ds = _compile(base.replace("compile: true}", "compile: true, backend: deepspeed}"))
    assert {d.path for d in ds.diagnostics if d.code == "T013"} == {"training.compile", "training.loss_spike"}
    assert ds.backend.compile is False
    ds_eager = _compile(base.replace("compile: true}", "compile: false, backend: deepspeed}"))
    assert ds.time.step_seconds == pytest.approx(ds_eager.time.step_seconds)  # timed as it runs: uncompiled
    native = _compile(base.replace("compile: true}", "compile: true, backend: native}"))
    assert not [d for d in native.diagnostics if d.code == "T013"] and native.backend.compile


def test_the_z_loss_suggestion_names_a_backend_that_applies_it():
    c = _compile(_spec(model="llama3-70b", count=64))
    assert c.backend.name == "torchtitan"
    assert "native or deepspeed" in _diag(c, "T007").hint
    c = _compile(_spec(model="llama3-70b", count=64, extra="training: {backend: native}\n"))
    assert "backend" not in _diag(c, "T007").hint


def test_a_long_context_stage_extends_the_context_its_base_was_trained_at():
    """rope_scaling without original_max_position on a long_context stage scales from the base model's context (the
    context YaRN / llama3's bands are placed for), not RopeScaling's 8192 default: the lock's stage context, the
    torchtitan stage job and the runtime's model all carry the base's 4096."""
    from llmc.emit.lock import lock_text
    from llmc.emit.torchtitan import render_torchtitan
    from llmc.runtime.job import TrainJob

    stages = ("stages:\n  - {name: pre, kind: pretrain}\n"
              "  - {name: long, kind: long_context, init_from: pre, seq_len: 16384, rope_scaling: "
              "{type: yarn, factor: 4}, data: {seq_len: 16384, tokens: 1e8}}\n")
    spec = _spec("llama3-8b", count=8, seq=4096, tokens="1B", extra=stages).replace(
        "model: llama3-8b", "model: {preset: llama3-8b, max_seq_len: 4096}")
    c = _compile(spec)
    long = next(s for s in c.stages if s.name == "long")
    assert long.context.rope_scaling == {"type": "yarn", "factor": 4, "original_max_position": 4096}
    assert long.long_context.rope_scaling["original_max_position"] == 4096
    assert "original_seq_len=4096," in render_torchtitan(c)["torchtitan/llmc_job_stage1.py"]
    job = TrainJob.from_lock(json.loads(lock_text(c)), "long")
    assert job.arch.rope_scaling.original_max_position == 4096 and job.arch.rope_scaling.factor == 4
