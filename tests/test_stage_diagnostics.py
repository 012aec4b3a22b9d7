"""Stage diagnostics that refuse, or warn about, what a post-training stage would not run as planned: G005 (the stage
does not fit the GPU: an error, as pre-training's P004, unless --no-fit-check), G013 (offload asked of a chat stage,
whose trainer does not offload), G014 (stage data its trainer does not read), G015 (a GRPO seq_len its trainer does not
read), G004 (a seq_len past the trained context, RoPE-scaled or not) and G018 (a quantized checkpoint to start from). The figures are checked against published
parameter counts and shapes, and the data rules against llmc's runtime itself."""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from llmc.cli import app
from llmc.compiler.compile import compile_spec
from llmc.compiler.hardware import get_gpu
from llmc.spec.load import loads_spec

# Llama 3 70B: 70,553,706,496 parameters (the safetensors total of meta-llama/Meta-Llama-3-70B), and its shapes from
# the model's config.json: hidden 8192, 64 heads / 8 KV heads of 128, intermediate 28672, 80 layers
LLAMA3_70B_PARAMS = 70_553_706_496
D, HEADS, KV, HD, FF, LAYERS = 8192, 64, 8, 128, 28672, 80
# LoRA on every linear: r x (d_in + d_out) per matrix (Hu et al. 2021, arXiv:2106.09685 sec. 4): wq, wk, wv, wo, w1,
# w3, w2 of each layer
LORA_PER_RANK = LAYERS * ((D + HEADS * HD) + 2 * (D + KV * HD) + (HEADS * HD + D) + 3 * (D + FF))
# mixed-precision AdamW: bf16 weight + bf16 gradient + fp32 master, m, v = 16 B per trained parameter (ZeRO, Rajbhandari
# et al. 2020, sec. 3.1)
ADAM_BYTES = 16
# Llama 3.1's context: max_position_embeddings 131072 in meta-llama/Llama-3.1-8B's config.json
LLAMA31_CONTEXT = 131072

HEAD = """\
name: t
model: {model}
hardware: {{gpu: {gpu}, count: {count}}}
data: {{sources: [{{name: web}}], tokenizer: {{path: /nope/tok, chat_template: llama3}}, seq_len: 4096, tokens: 1B}}
{extra}stages:
"""
runner = CliRunner()


def spec_text(stages: str, model="llama3-70b", gpu="h100-sxm", count=16, extra="") -> str:
    return HEAD.format(model=model, gpu=gpu, count=count, extra=extra) + textwrap.indent(textwrap.dedent(stages), "  ")


def compile_text(text: str, **options):
    run, lines = loads_spec(text, file="s.yaml")
    return compile_spec(run, "s.yaml", lines, spec_bytes=b"", **options)


def line_of(text: str, needle: str) -> int:
    return next(i + 1 for i, ln in enumerate(text.splitlines()) if needle in ln)


def diags(c, code: str) -> list:
    return [d for d in c.diagnostics if d.code == code]


# ----------------------------------------------------------------------------- G005: a stage that does not fit

FULL_SFT = """\
- name: sft
  kind: sft
  init_hf: /models/base
  data:
    sources: [{name: chat, path: /d/chat.jsonl, kind: chat}]
    seq_len: 4096
    tokens: 200M
"""


def test_full_sft_70b_on_16_h100_is_refused_with_its_memory():
    """Full SFT of Llama 3 70B on 16 H100s: the bf16 weights are 2 B x 70.55B = 141.1 GB, the weights, gradients and
    AdamW states 16 B x 70.55B / 16 GPUs = 70.6 GB per GPU, and with one micro-step the stage passes the 80 GB: an
    error (it would stop at its first step), located at the stage, with the figures; with the fit check off the same
    diagnostic is a warning."""
    text = spec_text(FULL_SFT)
    c = compile_text(text)
    (d,) = diags(c, "G005")
    m = c.stages[0].memory
    assert m.weights_bytes == 2 * LLAMA3_70B_PARAMS  # bf16, 2 B a parameter
    states = ADAM_BYTES * LLAMA3_70B_PARAMS / 16
    assert m.shard_degree == 16 and m.per_gpu_bytes > get_gpu("h100-sxm").hbm_bytes > states
    assert d.severity == "error" and d.path == "stages.0" and d.line == line_of(text, "- name: sft")
    assert float(re.search(r"needs ([0-9.]+) GiB per GPU", d.message).group(1)) == pytest.approx(m.per_gpu_bytes / 2**30,
                                                                                                   abs=0.05)
    # against what the fit check compares with: the stage estimate keeps the generic 8% margin of the device's total
    assert f"more than the {m.usable_bytes / 2**30:.1f} GiB usable (92% of" in d.message
    assert d.hint.startswith(f"{states / 2**30:.1f} GiB of it is weights, gradients and optimizer states")
    assert "LoRA" in d.hint

    off = compile_text(text, fit_check=False)
    (w,) = diags(off, "G005")
    assert w.severity == "warning" and w.path == "stages.0" and "fit check off" in w.message
    assert off.stages[0].memory.per_gpu_bytes == m.per_gpu_bytes
    assert not [x for x in off.diagnostics if x.severity == "error"]


def test_llmc_plan_exits_1_on_a_stage_that_does_not_fit_and_0_with_no_fit_check(tmp_path):
    spec = tmp_path / "sft70.yaml"
    spec.write_text(spec_text(FULL_SFT))
    r = runner.invoke(app, ["plan", str(spec)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert [ln for ln in r.output.splitlines() if ln.startswith(f"{spec}:6: error[G005] stages.0: stage 'sft' needs ")]

    r = runner.invoke(app, ["plan", "--no-fit-check", str(spec)])
    assert r.exit_code == 0, r.output
    assert "warning[G005] stages.0" in r.output
    r = runner.invoke(app, ["plan", "--no-fit-check", "--format", "json", str(spec)])
    stage = json.loads(r.output)["stages"][0]
    assert stage["memory"]["weights_bytes"] == 2 * LLAMA3_70B_PARAMS and stage["memory"]["fits"] is False


def test_qlora_hint_names_what_is_left_a_lower_rank_that_fits():
    """QLoRA r=64 of Llama 3 70B on one 48 GiB GPU (an L40S given 48 GiB with hardware.gpu_overrides: the table's
    L40S reports 44.4 GiB, ECC on, where the frozen base and its buffers leave no rank that fits): the stage is
    already QLoRA, so the hint does not offer LoRA/QLoRA; it names a rank whose adapters (16 B x r x 12,943,360
    parameters per rank, from the model's shapes) bring the stage within the GPU's usable 92%, and the plan at that
    rank fits."""
    stage = """\
    - name: sft
      kind: sft
      init_hf: /models/base
      lora: {rank: RANK, alpha: 16, quantize_base: nf4}
      global_batch_tokens: 16384
      data:
        sources: [{name: chat, path: /d/chat.jsonl, kind: chat}]
        seq_len: 512
        tokens: 20M
    """
    assert LORA_PER_RANK * 16 == 207_093_760  # the r=16 figure llmc's docs cite for Llama 3 70B
    gpu = "l40s, gpu_overrides: {hbm_gib: 48}"
    c = compile_text(spec_text(stage.replace("RANK", "64"), gpu=gpu, count=1))
    (d,) = diags(c, "G005")
    m = c.stages[0].memory
    cap = 0.92 * 48 * 2**30  # the stage estimate's fit: the generic profile's 8% margin
    assert d.severity == "error" and m.grads_optimizer_bytes == ADAM_BYTES * 64 * LORA_PER_RANK
    assert "LoRA or QLoRA" not in d.hint and "QLoRA (lora.quantize_base" not in d.hint
    rank = int(re.search(r"lora\.rank about (\d+) or lower", d.hint).group(1))
    # the largest rank whose adapters' states leave the stage within the GPU (the rest of the stage unchanged)
    assert m.per_gpu_bytes - ADAM_BYTES * (64 - rank) * LORA_PER_RANK <= cap \
        < m.per_gpu_bytes - ADAM_BYTES * (64 - rank - 1) * LORA_PER_RANK
    assert "of it NF4" in d.hint
    fitted = compile_text(spec_text(stage.replace("RANK", str(rank)), gpu=gpu, count=1))
    assert not diags(fitted, "G005") and fitted.stages[0].memory.fits


# ----------------------------------------------------------------------------- G013: offload on a chat stage


def test_offload_on_a_chat_stage_is_a_located_warning_and_is_not_counted():
    """offload_optimizer reaches DeepSpeed's LM stages only; SFT runs on llmc's native trainer, which keeps the AdamW
    states on the GPU: a warning at the SFT stage, its memory with the full 16 B per parameter (2 B weight in
    ``weights``, 14 B gradient + master + moments), while the midtrain stage offloads and is not warned."""
    text = spec_text("""\
        - name: mid
          kind: midtrain
          init_hf: /models/base
          steps: 10
          data: {sources: [{name: code, kind: code}], seq_len: 4096, tokens: 1B}
        - name: sft
          kind: sft
          init_from: mid
          data: {sources: [{name: chat, path: /d/chat.jsonl, kind: chat}], seq_len: 4096, tokens: 200M}
        """, model="llama3-8b", count=8, extra="training: {backend: deepspeed}\n"
                                               "parallelism: {zero_stage: 3, offload_optimizer: true}\n")
    c = compile_text(text)
    (d,) = diags(c, "G013")
    assert d.severity == "warning" and d.path == "stages.1" and d.line == line_of(text, "- name: sft")
    assert "native trainer" in d.message and "LoRA" in d.hint
    mid, sft = c.stages
    n = sft.params_total
    assert sft.memory.grads_optimizer_bytes == (ADAM_BYTES - 2) * n and mid.memory.grads_optimizer_bytes == 0


# ----------------------------------------------------------------------------- G014: data the stage does not read


def _runtime_reads(stage, tmp_path: Path) -> bool:
    """Whether llmc's post-training runtime finds records for ``stage`` (its own loader on files of every kind)."""
    from llmc.runtime.posttrain import KIND_FOR_STAGE, PostTrainError, load_stage_data

    rows = {"chat": {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]},
            "preference": {"prompt": "1+1", "chosen": "2", "rejected": "3"},
            "prompts": {"prompt": "1+1", "answer": "2"}}
    want = KIND_FOR_STAGE[stage.kind]
    for src in stage.data.sources:  # (a text source holds the stage's records, as a general one may)
        (tmp_path / Path(src.path).name).write_text(json.dumps(rows.get(src.kind, rows[want])) + "\n")
    job = SimpleNamespace(stage_spec=stage, seed=0, stage=stage.name,
                          resolve_path=lambda p: tmp_path / Path(p).name)
    try:
        return bool(load_stage_data(job, want))
    except PostTrainError:
        return False


def test_stage_records_are_the_runtimes():
    from llmc.compiler.stages import STAGE_RECORDS
    from llmc.runtime.posttrain import KIND_FOR_STAGE

    assert {k: v[0] for k, v in STAGE_RECORDS.items()} == KIND_FOR_STAGE


@pytest.mark.parametrize("kind", ["dpo", "grpo", "sft"])
@pytest.mark.parametrize("source", ["chat", "preference", "prompts", "code", "general"])
def test_a_chat_stage_whose_only_source_it_skips_is_an_error_at_the_source(kind, source, tmp_path):
    """Every chat stage kind against every source kind: G014 is an error exactly where llmc's runtime finds no
    records for the stage (it skips sources of another kind; ``general`` is read as the stage's records)."""
    text = spec_text(f"""\
        - name: s
          kind: {kind}
          init_hf: /models/base
          data:
            sources:
              - name: src
                path: /d/src.jsonl
                kind: {source}
            seq_len: 1024
            tokens: 10M
        """, model="llama3-8b", count=8)
    c = compile_text(text)
    g = diags(c, "G014")
    if _runtime_reads(c.spec.stages[0], tmp_path):
        assert not g
        return
    (d,) = g
    want = {"sft": "chat", "dpo": "preference", "grpo": "prompts"}[kind]  # llmc.runtime.posttrain.KIND_FOR_STAGE
    assert d.severity == "error" and d.path == "stages.0.data.sources.0.kind"
    assert d.line == line_of(text, f"kind: {source}") and f"kind: {want}" in d.hint


def test_dpo_with_a_chat_source_beside_its_pairs_is_a_warning_and_text_files_are_refused():
    text = spec_text("""\
        - name: dpo
          kind: dpo
          init_hf: /models/base
          data:
            sources:
              - {name: pairs, path: /d/pairs.jsonl, kind: preference}
              - {name: chats, path: /d/chat.jsonl, kind: chat}
              - {name: more, path: /d/more.parquet, format: parquet, kind: preference}
            seq_len: 1024
            tokens: 10M
        """, model="llama3-8b", count=8)
    c = compile_text(text)
    by_path = {d.path: d for d in diags(c, "G014")}
    assert set(by_path) == {"stages.0.data.sources.1.kind", "stages.0.data.sources.2.format"}
    skipped, fmt = by_path["stages.0.data.sources.1.kind"], by_path["stages.0.data.sources.2.format"]
    assert skipped.severity == "warning" and skipped.line == line_of(text, "name: chats")
    assert fmt.severity == "error" and "jsonl" in fmt.message


# ----------------------------------------------------------------------------- G015: GRPO's length


def test_grpo_seq_len_is_prompt_plus_completion_and_an_ignored_seq_len_is_warned():
    """llmc's GRPO trainer takes no sequence length (train_grpo samples a prompt of up to max_prompt_tokens and up to
    max_new_tokens more): the plan sizes 512 + 4096 = 4608 tokens and warns where the spec says less, at the seq_len
    it does not read, the stage's own included."""
    from llmc.runtime.grpo import train_grpo

    assert not {"seq_len", "max_len"} & set(inspect.signature(train_grpo).parameters)
    stage = """\
        - name: g
          kind: grpo
          init_hf: /models/base
          max_new_tokens: 4096
          max_prompt_tokens: 512
          STAGE_SEQ
          data: {sources: [{name: p, path: /d/p.jsonl, kind: prompts}], seq_len: DATA_SEQ, tokens: 10M}
        """
    for stage_seq, data_seq, where in (("", 1024, "stages.0.data.seq_len"), ("seq_len: 1024", 8192, "stages.0.seq_len"),
                                       ("", 8192, None)):
        text = spec_text(stage.replace("STAGE_SEQ", stage_seq).replace("DATA_SEQ", str(data_seq)), model="llama3-8b",
                         count=8)
        c = compile_text(text)
        assert c.stages[0].seq_len == 512 + 4096
        g = diags(c, "G015")
        if where is None:
            assert not g
            continue
        (d,) = g
        assert d.severity == "warning" and d.path == where and "4,608" in d.message
        assert d.line == line_of(text, "seq_len: 1024")


# ----------------------------------------------------------------------------- G004: past the trained context


def test_sft_past_a_rope_scaled_context_warns_that_positions_are_extrapolated():
    """Llama 3.1's RoPE scaling stretches its positions to 131,072 tokens and no further: an SFT stage at 262,144
    extrapolates the rest (a warning at its seq_len); a long_context stage to that length before it clears it."""
    sft = """\
        - name: sft
          kind: sft
          INIT
          data: {sources: [{name: c, path: /d/c.jsonl, kind: chat}], seq_len: 262144, tokens: 10M}
        """
    text = spec_text(sft.replace("INIT", "init_hf: /models/base"), model="llama3.1-8b", count=8)
    c = compile_text(text, fit_check=False)
    (d,) = diags(c, "G004")
    assert d.severity == "warning" and d.path == "stages.0.data.seq_len" and d.line == line_of(text, "seq_len: 262144")
    assert f"{LLAMA31_CONTEXT:,}" in d.message and "extrapolated" in d.message and "long_context" in d.hint

    text = spec_text(textwrap.dedent("""\
        - name: lc
          kind: long_context
          init_hf: /models/base
          seq_len: 262144
          steps: 10
          rope_scaling: {type: yarn, factor: 2, original_max_position: 131072}
          data: {sources: [{name: books, kind: general}], seq_len: 262144, tokens: 1B}
        """) + textwrap.dedent(sft.replace("INIT", "init_from: lc")), model="llama3.1-8b", count=8)
    assert not diags(compile_text(text, fit_check=False), "G004")


# ----------------------------------------------------------------------------- QLoRA across GPUs


QLORA = """\
- name: sft
  kind: sft
  init_hf: /models/base
  lora: {rank: 16, quantize_base: nf4}
  data: {sources: [{name: chat, path: /d/chat.jsonl, kind: chat}], seq_len: 2048, tokens: 10M}
"""


@pytest.mark.parametrize("model, count, refused", [("llama3-8b", 2, True), ("llama3-8b", 1, False),
                                                   ("llama3.2-1b", 2, False)])
def test_qlora_of_a_model_the_trainer_builds_sharded_is_refused(model, count, refused):
    """llmc's trainer builds a model over 2B parameters sharded on the meta device when it runs on several ranks and
    quantises a QLoRA base from whole weights only: the stage would stop at its start (llmc.runtime.posttrain.
    build_policy refuses it). Llama 3 8B (8.03B) on 2 GPUs is refused at lora.quantize_base; on one GPU, and Llama 3.2
    1B (1.24B) on two, run."""
    import torch  # noqa: F401  (the runtime's threshold, read from the runtime itself)

    from llmc.runtime import train as runtime_train
    from llmc.spec.schema import META_INIT_PARAMS

    assert "META_INIT_PARAMS" in inspect.getsource(runtime_train._setup_model)
    text = spec_text(QLORA, model=model, count=count)
    c = compile_text(text)
    g = diags(c, "G016")
    assert bool(g) == refused
    if refused:
        assert g[0].severity == "error" and g[0].path == "stages.0.lora.quantize_base"
        assert g[0].line == line_of(text, "quantize_base")
        assert META_INIT_PARAMS < 8.03e9


def test_a_qlora_base_is_held_whole_on_every_gpu_its_states_shard_over():
    """QLoRA's NF4 codes are no module parameters (llmc.runtime.lora.NF4Linear keeps them in an attribute), so FSDP2
    shards the rest of the stage's states over the GPUs but every rank holds the codes whole. On GPUs small enough to
    shard a Llama 3.2 1B QLoRA stage over 2, the states per GPU are the whole NF4 part + half of the rest."""
    from llmc.compiler.stages import NF4_BITS_PER_PARAM

    text = spec_text(QLORA, model="llama3.2-1b", gpu="tiny", count=2,
                     extra="").replace("gpu: tiny", "gpu: my-gpu, gpu_overrides: {base: h100-sxm, hbm_gib: 1.5}")
    c = compile_text(text, fit_check=False)
    m = c.stages[0].memory
    assert m.shard_degree == 2
    # Llama 3.2 1B (meta-llama/Llama-3.2-1B config.json): hidden 2048, 32 heads / 8 KV heads of 64, intermediate
    # 8192, 16 layers; every linear of every block adapted, so all of them are NF4
    d, h, kv, hd, ff, layers = 2048, 32, 8, 64, 8192, 16
    nf4 = layers * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * ff)
    assert m.replicated_bytes == int(nf4 * NF4_BITS_PER_PARAM / 8)
    states = m.replicated_bytes + (m.weights_bytes - m.replicated_bytes + m.grads_optimizer_bytes) // 2
    assert m.per_gpu_bytes - (m.activation_bytes + m.buffer_bytes) == states


@pytest.mark.parametrize("host_gib, severity", [(128, "error"), (300, "warning"), (2048, None), (None, "info")])
def test_a_qlora_host_build_is_checked_against_the_nodes_host_memory(host_gib, severity):
    """llmc's trainer builds a QLoRA stage's model in fp32 on the host, quantises it there and moves it to the GPU
    (llmc.runtime.posttrain.build_policy): Llama 3 70B needs 4 B x 70,553,706,496 = 262.8 GiB of host memory on its
    node. Above the node's (hardware.host_memory_gib) it is an error, above 80 % of it a warning, unknown an info."""
    host = "" if host_gib is None else f", host_memory_gib: {host_gib}"
    text = spec_text(QLORA, model="llama3-70b", gpu="a100-80g", count=1).replace(
        "hardware: {gpu: a100-80g, count: 1}", "hardware: {gpu: a100-80g, count: 1" + host + "}")
    g = diags(compile_text(text, fit_check=False), "G017")
    if severity is None:
        assert not g
        return
    assert [d.severity for d in g] == [severity] and g[0].path == "stages.0.lora"
    assert f"{4 * LLAMA3_70B_PARAMS / 2**30:,.0f} GiB per node" in g[0].message


# ----------------------------------------------------------------------------- G018: a quantized checkpoint

# An AutoAWQ release's quantization_config (e.g. Qwen/Qwen2.5-7B-Instruct-AWQ's config.json) and a bitsandbytes 4-bit
# one (transformers' BitsAndBytesConfig.to_dict(), as unsloth's *-bnb-4bit releases save it)
AWQ = {"bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq", "version": "gemm",
       "zero_point": True}
BNB = {"_load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "load_in_4bit": True, "quant_method": "bitsandbytes"}


@pytest.mark.parametrize("quant, stages", [(AWQ, True), (BNB, False), (None, True)])
def test_a_quantized_checkpoint_to_start_from_is_refused_where_the_spec_names_it(quant, stages, tmp_path):
    """A checkpoint whose config.json has a quantization_config holds packed weights (AWQ's qweight / qzeros /
    scales, bitsandbytes' absmax / quant_map) that no llmc trainer reads: ``llmc plan`` stops with one located line
    at the init_hf that names it (a stage's, or training.init_hf without stages), the method named and the bf16
    release offered; the same folder without quantization_config is not refused as quantized (it holds no weights at
    all: G021 says so)."""
    ckpt = tmp_path / "qwen-awq"
    ckpt.mkdir()
    cfg = {"model_type": "qwen2", **({"quantization_config": quant} if quant else {})}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    spec = tmp_path / "s.yaml"
    if stages:
        spec.write_text(spec_text("""\
            - name: sft
              kind: sft
              init_hf: qwen-awq
              lora: {rank: 16}
              data: {sources: [{name: chat, path: /d/chat.jsonl, kind: chat}], seq_len: 2048, tokens: 10M}
            """, model="qwen2.5-7b", gpu="a100-80g", count=1))
        where = "stages.0.init_hf"
    else:
        spec.write_text("name: t\nmodel: qwen2.5-7b\nhardware: {gpu: a100-80g, count: 8}\n"
                        "data: {seq_len: 4096, tokens: 1B}\ntraining: {init_hf: qwen-awq}\n")
        where = "training.init_hf"
    r = runner.invoke(app, ["plan", str(spec)])
    found = [ln for ln in r.stderr.splitlines() if "[G018]" in ln]  # (standard output: the report, G018 in it too)
    if quant is None:
        assert not found and "Traceback" not in r.output, r.output
        assert r.exit_code == 0 or "error[G021]" in r.output, r.output
        return
    assert r.exit_code == 1 and "Traceback" not in r.output
    line = line_of(spec.read_text(), "init_hf: qwen-awq")
    assert len(found) == 1 and found[0].startswith(f"{spec}:{line}: error[G018] {where}: qwen-awq holds quantized "
                                                   f"weights ({quant['quant_method']}")
    assert "bf16" in r.output


def test_a_chat_stage_says_it_decays_no_weights_whatever_the_pre_training_optimizer_says():
    """SFT / DPO / GRPO train with AdamW without weight decay (TRL's default: transformers' TrainingArguments
    weight_decay 0.0), not the spec's training.optimizer.weight_decay (0.1 by default): the lock's stage optimizer
    says 0, as llmc's trainer builds it (llmc.runtime.sft reads it from there), and the plan's stage notes say so."""
    text = spec_text(FULL_SFT, model="llama3.2-1b", count=8)
    c = compile_text(text)
    (st,) = c.stages
    assert c.spec.training.optimizer.weight_decay == 0.1
    assert st.hyper["optimizer"]["weight_decay"] == 0.0
    assert [n for n in st.notes if n.startswith("AdamW without weight decay") and "weight_decay 0.1" in n]
    none = compile_text(text.replace("stages:", "training: {optimizer: {weight_decay: 0.0}}\nstages:"))
    assert not [n for n in none.stages[0].notes if n.startswith("AdamW without weight decay")]


def test_pretraining_without_a_plan_gets_its_plan_error_and_no_stage_g005():
    """A batch no layout splits (4,000,000 tokens is 488.28 sequences of 8192: P005) leaves pre-training without a
    plan. Its stage was then sized as one data-parallel micro-step of the whole 488-sequence batch and reported as a
    G005 warning of ~1.76 TB per GPU for an 8B model, on a spec with no stages: the plan's error is the one finding."""
    spec, _ = loads_spec(textwrap.dedent("""\
        name: b8
        model: llama3-8b
        hardware: {gpu: h100-sxm, count: 64}
        data: {sources: [{name: web, tokens: 2T}], tokens: 160B, seq_len: 8192}
        training: {global_batch_tokens: 4M}
        """))
    assert 4_000_000 % 8192 != 0
    c = compile_spec(spec, "b8.yaml")
    codes = {d.code for d in c.diagnostics if d.severity in ("error", "warning")}
    assert "P005" in codes and "G005" not in codes, codes
