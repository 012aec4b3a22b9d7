"""Stage graph + per-stage plans (llmc.compiler.stages), checked against published / hand-computed numbers."""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from pathlib import Path

import pytest

from llmc.compiler.defaults import default_lr
from llmc.compiler.hardware import get_gpu
from llmc.compiler.memory import layer_activation_bytes_per_token
from llmc.compiler.params import kv_bytes_per_token, params_total
from llmc.compiler.stages import NF4_BITS_PER_PARAM, plan_stages
from llmc.spec.facts import gather_facts
from llmc.spec.load import load_spec, loads_spec
from llmc.spec.presets import PRESETS
from llmc.spec.schema import RunSpec

ROOT = Path(__file__).resolve().parents[1]
HEAD = """\
name: t
model: {model}
hardware:
  gpu: {gpu}
  count: {count}
data:
  sources:
    - name: web
      path: /data/web.jsonl
  tokenizer:
{tok}
  seq_len: {seq}
  tokens: 1B
"""


def spec(stages: str, model="llama3-8b", gpu="h100-sxm", count=8, seq=8192, tok="    path: /nope/tok"):
    text = HEAD.format(model=model, gpu=gpu, count=count, seq=seq, tok=tok) + "stages:\n" + textwrap.indent(
        textwrap.dedent(stages), "  ")
    run, lines = loads_spec(text, file="s.yaml")
    plans, diags = plan_stages(run, gpu=get_gpu(gpu), lines=lines, file="s.yaml", facts=gather_facts(run, "."))
    return text, plans, diags


def line_of(text: str, needle: str, nth: int = 0) -> int:
    hits = [i + 1 for i, ln in enumerate(text.splitlines()) if needle in ln]
    return hits[nth]


def codes(diags, sev=None):
    return [d.code for d in diags if sev is None or d.severity == sev]


def by_code(diags, code):
    found = [d for d in diags if d.code == code]
    assert found, f"no {code} in {[d.render() for d in diags]}"
    return found[0]


# ----------------------------------------------------------------------------- graph


def test_no_stages_gives_implicit_pretrain():
    run, lines = loads_spec(HEAD.format(model="tiny", gpu="cpu", count=1, seq=128, tok="    train: true"))
    plans, diags = plan_stages(run, gpu=get_gpu("cpu"), lines=lines)
    assert [(p.name, p.kind, p.order) for p in plans] == [("pretrain", "pretrain", 0)]
    assert not codes(diags, "error")


def test_topological_order_follows_init_from_not_yaml_order():
    text, plans, diags = spec("""\
        - {name: dpo, kind: dpo, init_from: sft}
        - {name: grpo, kind: grpo, init_from: dpo}
        - {name: sft, kind: sft}
        """)
    assert [p.name for p in plans] == ["sft", "dpo", "grpo"]
    assert [p.order for p in plans] == [0, 1, 2]
    assert not codes(diags, "error")


def test_cycle_is_G002_with_line():
    text, _, diags = spec("""\
        - name: a
          kind: sft
          init_from: c
        - name: b
          kind: dpo
          init_from: a
        - name: c
          kind: grpo
          init_from: b
        """)
    d = by_code(diags, "G002")
    assert d.severity == "error" and "cycle" in d.message and d.line in {
        line_of(text, "init_from: c"), line_of(text, "init_from: a"), line_of(text, "init_from: b")}
    assert d.render().startswith(f"s.yaml:{d.line}: error[G002] stages.")


def test_self_init_is_G002():
    text, _, diags = spec("""\
        - name: a
          kind: sft
          init_from: a
        """)
    assert by_code(diags, "G002").line == line_of(text, "init_from: a")


def test_unknown_init_from_is_G003_with_did_you_mean():
    text, _, diags = spec("""\
        - name: sft
          kind: sft
        - name: dpo
          kind: dpo
          init_from: stf
        """)
    d = by_code(diags, "G003")
    assert d.severity == "error" and d.path == "stages.1.init_from" and "'sft'" in d.hint
    assert d.line == line_of(text, "init_from: stf")


def test_duplicate_stage_name_G001():
    run = RunSpec(name="x", model=PRESETS["tiny"], data={"seq_len": 128, "tokens": 1e6},
                  hardware={"gpu": "cpu", "count": 1},
                  stages=[{"name": "a", "kind": "sft"}, {"name": "a", "kind": "dpo"}])
    _, diags = plan_stages(run, gpu=None, lines={"stages.1.name": 9})
    d = by_code(diags, "G001")
    assert d.severity == "error" and d.line == 9


def test_vocab_change_is_G004_error():
    run = RunSpec(name="x", model=PRESETS["tiny"], data={"seq_len": 128, "tokens": 1e6},
                  hardware={"gpu": "cpu", "count": 1},
                  stages=[{"name": "p", "kind": "pretrain"},
                          {"name": "s", "kind": "sft", "init_from": "p",
                           "data": {"seq_len": 128, "tokens": 1e5, "tokenizer": {"vocab_size": 4096}}}])
    _, diags = plan_stages(run, gpu=None, lines={"stages.1.data.tokenizer.vocab_size": 21})
    d = by_code(diags, "G004")
    assert d.severity == "error" and d.line == 21 and "4096" in d.message


def test_tokenizer_swap_is_G004_error():
    text, _, diags = spec("""\
        - name: sft
          kind: sft
          data:
            seq_len: 4096
            tokens: 1B
            tokenizer:
              path: /other/tok
        """)
    d = by_code(diags, "G004")
    assert d.severity == "error" and d.line == line_of(text, "path: /other/tok")


def test_seq_len_beyond_base_context_is_G004_warning_and_long_context_fixes_it():
    text, plans, diags = spec("""\
        - name: sft
          kind: sft
          seq_len: 32768
        """)
    d = by_code(diags, "G004")
    assert d.severity == "warning" and d.line == line_of(text, "seq_len: 32768")
    _, plans, diags = spec("""\
        - name: lc
          kind: long_context
          seq_len: 32768
          rope_theta: 2000000
        - name: sft
          kind: sft
          init_from: lc
          seq_len: 32768
        """)
    assert "G004" not in codes(diags) and "T107" not in codes(diags)


# ----------------------------------------------------------------------------- LoRA / QLoRA numbers


@pytest.mark.parametrize("model,targets,want", [
    ("llama3-70b", "[wq, wk, wv, wo, w1, w2, w3]", 207_093_760),
    ("llama3-70b", "[wq, wv]", 32_768_000),  # "32.77M"
    ("llama3-8b", "[wq, wk, wv, wo, w1, w2, w3]", 41_943_040),  # "41.9M"
])
def test_lora_trainable_params(model, targets, want):
    _, plans, _ = spec(f"""\
        - name: sft
          kind: sft
          lora: {{rank: 16, targets: {targets}}}
        """, model=model)
    p = plans[0]
    assert p.trainable_params == want
    assert math.isclose(p.trainable_fraction, want / params_total(PRESETS[model]))
    assert p.lora.scaling == 2.0


def test_qlora_70b_memory_on_a100_80g():
    _, plans, diags = spec("""\
        - name: sft
          kind: sft
          lora: {rank: 16, quantize_base: nf4}
          data: {seq_len: 4096, tokens: 100M}
        """, model="llama3-70b", gpu="a100-80g")
    p = plans[0]
    n = params_total(PRESETS["llama3-70b"])
    # the seed's 70B NF4 figure: 0.5 B/param + double-quantised scales = 35.3 .. 36.4 GB
    assert 35.3e9 <= n * NF4_BITS_PER_PARAM / 8 <= 36.5e9
    m = p.memory
    # as llmc's trainer holds it on a GPU (bf16 autocast): the adapted linears in NF4 (every linear of the 80
    # blocks); the output head bf16 (128256 x 8192 x 2 B = 2.1 GB: only a matmul reads it); the input embedding
    # (4.2 GB) and the 161 RMSNorm weights of 8192 (2 per block + the final one) fp32: 41-42 GB
    head, norms = 128256 * 8192, 161 * 8192
    assert m.weights_bytes == int((n - 2 * head - norms) * NF4_BITS_PER_PARAM / 8) + head * 2 + (head + norms) * 4
    assert 41e9 < m.weights_bytes < 42e9
    assert m.grads_optimizer_bytes == 207_093_760 * 16  # optimizer state only for the adapters
    assert m.reference_bytes == 0 and m.fits is True and m.per_gpu_bytes < 80e9
    assert "G005" not in codes(diags)
    assert p.defaults and "lr" in p.defaults and p.lr == 1e-4  # QLoRA paper LR for 33B/65B


def test_full_finetune_70b_does_not_fit_8x80g():
    _, plans, diags = spec("""\
        - name: dpo
          kind: dpo
        """, model="llama3-70b", gpu="a100-80g")
    m = plans[0].memory
    n = params_total(PRESETS["llama3-70b"])
    # the frozen reference copy as llmc's trainer holds it on a GPU: its matmul weights bf16, the input embedding
    # (128256 x 8192) and the 161 RMSNorm weights of 8192 fp32
    fp32 = 128256 * 8192 + 161 * 8192
    assert m.reference_bytes == 2 * (n - fp32) + 4 * fp32
    assert m.shard_degree == 8 and m.fits is False  # 16 B/param + reference ~ 1.27 TB / 8 GPUs
    g005 = by_code(diags, "G005")
    states = (m.weights_bytes + m.reference_bytes + m.grads_optimizer_bytes) // 8
    assert g005.severity == "error" and f"{states / 2**30:.1f} GiB of it is weights" in g005.hint and "LoRA" in g005.hint


def test_continued_training_batch_must_split_over_every_gpu():
    """midtrain / long_context run data parallel over every GPU and the runtime needs micro x accum x GPUs = batch
    exactly (TrainJob.from_lock refuses the stage at launch otherwise, after the stages before it ran): the plan says
    so first (G006, an error, with a batch that splits)."""
    _, plans, diags = spec("- {name: m, kind: midtrain, seq_len: 4096, global_batch_tokens: 20480}\n")
    g006 = by_code(diags, "G006")
    assert plans[0].global_batch_seqs == 5 and g006.severity == "error"
    assert g006.path == "stages.0.global_batch_tokens" and "multiple of 8 x 4,096 = 32,768 tokens" in g006.hint
    _, plans, diags = spec("- {name: m, kind: midtrain, seq_len: 4096, global_batch_tokens: 32768}\n")
    p = plans[0]
    assert "G006" not in codes(diags) and p.micro_batch * p.grad_accum * 8 == p.global_batch_seqs == 8


def test_long_sequences_that_do_not_fit_say_more_gpus_will_not_help():
    """A continued-training stage runs data parallel without CP, so at 256K one sequence's activations (and a slice of
    its logits) are on every GPU: the warning names that share, and a shorter seq_len, not more GPUs."""
    _, plans, diags = spec("""        - name: lc
          kind: long_context
          seq_len: 262144
          rope_scaling: {type: yarn, factor: 32, original_max_position: 8192}
        """)
    m = plans[0].memory
    states = (m.weights_bytes + m.reference_bytes + m.grads_optimizer_bytes) // m.shard_degree
    g005 = by_code(diags, "G005")
    assert m.fits is False and m.per_gpu_bytes - states > states
    assert f"{(m.per_gpu_bytes - states) / 2**30:.1f} GiB of it is one micro-step at seq_len 262144" in g005.hint
    assert "more GPUs do not split" in g005.hint and "LoRA" not in g005.hint


LC_32K = """\
        - name: lc
          kind: long_context
          seq_len: 32768
          rope_scaling: {type: yarn, factor: 4, original_max_position: 8192}
        """


def test_long_context_loss_in_slices_when_the_whole_logits_do_not_fit(monkeypatch):
    """At 32K a Llama 3 8B long-context stage holds a whole sequence per GPU (no CP in llmc's runtimes), and the loss of
    its 32,768 positions x 128,256 vocabulary entries at 12 B each (fp32 log-probs and gradients) is 50 GB: with the
    rest, more than an 80 GB H100. The trainer then computes the loss in slices of 512 tokens (1 GiB of logits), each
    recomputed in the backward: memory falls by exactly the other 32,256 positions' logits (the stage pinned to the
    whole logits needs exactly that much more and does not fit) and the stage fits, on the native trainer and on the
    DeepSpeed runner alike."""
    from llmc.compiler import memory as mem_mod
    from llmc.compiler import stages as S

    V = PRESETS["llama3-8b"].vocab_size
    assert mem_mod.loss_slice_tokens(V) == 512 and 512 * V * 12 <= 2**30 < 1024 * V * 12
    _, plans, diags = spec(LC_32K)
    m = plans[0].memory
    assert m.loss_chunk_tokens == 512 and m.fits and "G005" not in codes(diags)
    saved = (32768 - 512) * V * 12
    assert any("loss in slices of 512 tokens" in n and f"{saved / 2**30:.1f} GiB of logits less" in n
               for n in plans[0].notes)
    assert "loss in slices of 512 tokens" in plans[0].time.source
    with monkeypatch.context() as mp:
        mp.setattr(S, "recompute_options", lambda env, st, tr: [(m.activation_checkpointing, 0)])
        _, whole, whole_diags = spec(LC_32K)
    w = whole[0].memory
    assert w.loss_chunk_tokens == 0 and w.fits is False and "G005" in codes(whole_diags)
    assert w.per_gpu_bytes - m.per_gpu_bytes == saved
    text = HEAD.format(model="llama3-8b", gpu="h100-sxm", count=8, seq=8192, tok="    path: /nope/tok") + \
        "training:\n  backend: deepspeed\nstages:\n" + textwrap.indent(textwrap.dedent(LC_32K), "  ")
    run, lines = loads_spec(text, file="s.yaml")
    ds_plans, _ = plan_stages(run, gpu=get_gpu("h100-sxm"), lines=lines, file="s.yaml", backend="deepspeed")
    assert ds_plans[0].time.backend == "deepspeed"
    assert ds_plans[0].memory.loss_chunk_tokens == 512 and ds_plans[0].memory.fits
    # a stage whose whole logits fit keeps them (the slices cost the head's forward again)
    _, plans16, _ = spec(LC_32K.replace("32768", "16384").replace("factor: 4", "factor: 2"))
    assert plans16[0].memory.loss_chunk_tokens == 0 and plans16[0].memory.fits


@pytest.mark.parametrize("gpu", ["h100-sxm", "a100-40g"])
def test_stage_recomputation_is_the_fastest_option_that_fits(gpu, monkeypatch):
    """Each stage of examples/pipeline_llama3_8b.yaml runs the recomputation (AC none / selective / full, the loss
    whole or in slices) with the shortest predicted step among those within the search's usable memory (92% of the
    GPU), the least recomputation among equals: the same as planning the pipeline once per option, pinned, and
    picking by hand. On 80 GB most stages recompute nothing; on 40 GB the training stages must recompute everything
    (GRPO's peak is its sampling phase, which no recomputation lowers)."""
    from llmc.compiler import stages as S

    run, lines = load_spec(ROOT / "examples" / "pipeline_llama3_8b.yaml")
    run = run.model_copy(update={"hardware": run.hardware.model_copy(update={"gpu": gpu})})
    g = get_gpu(gpu)
    chosen = {p.name: p for p in plan_stages(run, gpu=g, lines=lines)[0]}
    options = [(ac, c) for ac in ("none", "selective", "full") for c in (0, 512)]
    pinned = {}
    for opt in options:
        monkeypatch.setattr(S, "recompute_options", lambda env, st, tr, o=opt: [o])
        for p in plan_stages(run, gpu=g, lines=lines)[0]:
            pinned[p.name, opt] = p
    acs = set()
    for name, plan in chosen.items():
        fit = [o for o in options if pinned[name, o].memory.per_gpu_bytes <= 0.92 * g.hbm_bytes]
        if not fit:  # none fits: the least memory (G005 reports it)
            want = min(options, key=lambda o: pinned[name, o].memory.per_gpu_bytes)
        else:
            want = min(fit, key=lambda o: pinned[name, o].time.step_seconds)
        m = plan.memory
        assert (m.activation_checkpointing, m.loss_chunk_tokens) == want, name
        assert plan.time.step_seconds == pinned[name, want].time.step_seconds
        if fit:  # the note counts the options that fit
            assert any(n.startswith(f"recomputation: AC {want[0]}") and f"of the {len(fit)} of {len(options)} options"
                       in n for n in plan.notes), plan.notes
        acs.add((plan.kind, m.activation_checkpointing))
    if gpu == "a100-40g":
        assert {ac for kind, ac in acs if kind != "grpo"} == {"full"}
    else:
        assert {ac for _, ac in acs} == {"none", "full"}


def test_sliced_loss_costs_the_heads_forward_again():
    """The time of a step with the loss in slices is the step's plus the head's forward once more per token (2 V d
    FLOPs: flops.loss_recompute_flops_per_token), at the rate the step runs its model FLOPs: the breakdown's compute
    scaled by 2 V d over the model FLOPs per token."""
    from llmc.compiler import timing
    from llmc.compiler.stages import stage_layout

    arch = PRESETS["llama3-8b"]
    sm = timing.step_model(arch, 32768, "bf16", get_gpu("h100-sxm"), "native")
    whole = stage_layout(8, 8, 1, "full", 1, 16)
    t0, _, br = timing.step_time(sm, whole)
    t1, _, br1 = timing.step_time(sm, dataclasses.replace(whole, loss_chunk_tokens=512))
    head_fwd = 2 * arch.vocab_size * arch.d_model
    assert t1 - t0 == pytest.approx(br["compute"] * head_fwd / sm.flops_per_token, rel=1e-9)
    assert br1["recompute"] - br["recompute"] == pytest.approx(t1 - t0, rel=1e-9)  # reported as recomputation


# ----------------------------------------------------------------------------- models held, defaults


def test_models_in_memory_per_kind():
    _, plans, diags = spec("""\
        - {name: sft, kind: sft}
        - {name: dpo, kind: dpo, init_from: sft}
        - {name: grpo, kind: grpo, init_from: dpo}
        - {name: grpo0, kind: grpo, init_from: dpo, grpo_kl_coef: 0}
        - {name: dpo_lora, kind: dpo, init_from: sft, lora: {rank: 16}}
        """)
    p = {x.name: x for x in plans}
    assert p["sft"].n_models == 1
    assert [m.role for m in p["dpo"].models_in_memory] == ["policy", "reference"]
    assert any("4" in n and "critic" in n for n in p["dpo"].notes)  # PPO would hold 4
    assert p["grpo"].n_models == 2 and p["grpo0"].n_models == 1  # reference only when KL > 0
    assert p["dpo_lora"].memory.reference_bytes == 0  # adapters off = reference
    assert by_code(diags, "T105").path == "stages.3.grpo_kl_coef"


def test_size_aware_default_lrs():
    n8, n70 = params_total(PRESETS["llama3-8b"]), params_total(PRESETS["llama3-70b"])
    assert default_lr(n8, "sft", False) == pytest.approx(2e-5)
    assert default_lr(n70, "sft", False) == pytest.approx(2e-5)
    assert default_lr(2e6, "sft", False) == pytest.approx(5e-5)  # tiny: higher
    assert default_lr(1e9, "dpo", False) == pytest.approx(1e-6)
    assert 5e-7 <= default_lr(n70, "dpo", False) <= 5.1e-7
    assert default_lr(n8, "grpo", False) == pytest.approx(1e-6)
    assert default_lr(n8, "sft", True) == pytest.approx(2e-4)  # QLoRA paper 7B/13B
    assert default_lr(65e9, "sft", True) == pytest.approx(1e-4)  # 33B/65B
    assert default_lr(n70, "midtrain", False) == pytest.approx(1e-5)  # Llama 3 continued-training LRs
    _, plans, _ = spec("- {name: dpo, kind: dpo}\n")
    p = plans[0]
    assert p.hyper["beta"] == 0.1 and {"lr", "dpo_beta"} <= set(p.defaults)
    _, plans, _ = spec("- {name: g, kind: grpo}\n")
    h = plans[0].hyper
    assert (h["group_size"], h["kl_coef"], plans[0].lr) == (8, 0.04, 1e-6)
    assert {"grpo_group_size", "grpo_kl_coef", "lr"} <= set(plans[0].defaults)


def test_grpo_rollout_cost():
    _, plans, diags = spec("""\
        - name: g
          kind: grpo
          grpo_group_size: 8
          prompts_per_step: 64
          max_prompt_tokens: 512
          max_new_tokens: 1024
        """)
    r = plans[0].rollout
    n = params_total(PRESETS["llama3-8b"])
    assert r.generated_tokens_per_step == 64 * 8 * 1024
    # llmc's sampler (llmc.runtime.grpo.sample_groups): per batch of groups one forward over the G copies of each
    # 512-token prompt, then 1,024 one-position forwards of every row against the KV cache
    per_group = 8 * 512 + 1024 * 8
    assert r.sampled_tokens_per_step == 64 * per_group and r.decode_steps_per_batch == 1024
    assert r.generation_flops_per_step == pytest.approx(2 * n * r.sampled_tokens_per_step)
    assert r.kv_bytes_per_token == 131_072  # Llama-3-8B bf16 KV per token
    assert r.kv_cache_bytes_per_group == 8 * (512 + 1024) * 131_072
    # 64 prompts over 8 GPUs: each rank's 8 groups (8 x 1.6 GB of KV cache) fit in one sampling batch
    mem = plans[0].memory
    assert r.groups_per_rank == 8
    assert mem.sampling_groups == 8 and mem.sampling_bytes == 8 * 8 * _sampled_row_bytes(512, 1536)
    t, gpu = plans[0].time, get_gpu("h100-sxm")
    # the weights are sharded over the 8 GPUs: each decoding forward gathers 7/8 of the 16 GB of bf16 weights over
    # NVLink (450 GB/s per direction), longer than reading them from HBM (3.35 TB/s) or computing 64 tokens; the
    # prefill (8 x 8 x 512 tokens at a training forward's rate) adds a few per cent
    assert mem.shard_degree == 8 and gpu.nvlink_gbps == 450
    gather = 2 * n * 7 / 8 / 450e9
    assert 1024 * gather < t.sampling_seconds < 1.06 * 1024 * gather
    assert t.sampling_seconds > 0.4 * t.step_seconds
    assert ("T108" in codes(diags, "warning")) == (t.sampling_seconds > 0.5 * t.step_seconds)


def _sampled_row_bytes(prompt: int, seq_len: int) -> int:
    """Llama 3 8B, one sampled sequence: its KV cache at the end (seq_len positions of 128 KiB) or the prefill's
    prompt positions of KV cache and one block's tensors (whichever is larger), and the last position's bf16 + fp32
    logits."""
    block = layer_activation_bytes_per_token(PRESETS["llama3-8b"], 0, "none", seq_len=prompt)
    return int(max(seq_len * 131_072, prompt * (131_072 + block)) + 128_256 * 6)


def test_grpo_samples_as_many_groups_at_once_as_fit():
    """With 1,024 prompts per step each rank has 128 groups; their KV caches (1.6 GB each) do not fit at once, so
    the sampler takes as many per batch as keep the sampling phase within 90% of the GPU, and pays one decoding pass
    of gathered weights per batch. Sampling runs between training passes: the states, gathered units and workspace
    stay, the micro-step's activations and logits are gone; the stage's peak is the larger phase."""
    _, plans, _ = spec("""        - name: g
          kind: grpo
          grpo_group_size: 8
          prompts_per_step: 1024
          max_prompt_tokens: 512
          max_new_tokens: 1024
        """)
    p = plans[0]
    r, mem, t = p.rollout, p.memory, p.time
    assert p.seq_len == 1536 and mem.loss_chunk_tokens == 0  # 1,536 tokens per micro-step: the whole logits
    # one sequence: its KV cache at the end (1,536 positions of 128 KiB) or the prefill's 512 positions of KV cache
    # and one block's tensors (whichever is larger), and the last position's bf16 + fp32 logits
    per_group = 8 * _sampled_row_bytes(512, 1536)
    states = (mem.weights_bytes + mem.reference_bytes + mem.grads_optimizer_bytes) // mem.shard_degree
    logits = 1536 * 128_256 * 12  # fp32 log-softmax, its gradient and the nll gradient (memory.LOGITS_BYTES_PER_ELEM)
    idle = states + mem.buffer_bytes - logits
    per = mem.sampling_groups
    assert r.groups_per_rank == 128 and 1 < per < 128
    assert mem.sampling_bytes == per * per_group
    assert idle + mem.sampling_bytes <= 0.9 * mem.capacity_bytes < idle + mem.sampling_bytes + per_group
    training = states + mem.activation_bytes + mem.buffer_bytes
    assert mem.per_gpu_bytes == max(training, idle + mem.sampling_bytes) == idle + mem.sampling_bytes
    assert any("the sampling phase is the peak" in n for n in p.notes)

    gather = 2 * params_total(PRESETS["llama3-8b"]) * 7 / 8 / 450e9
    decode = math.ceil(128 / per) * 1024 * gather  # one decoding pass of gathered weights per batch
    assert decode < t.sampling_seconds < 1.06 * decode + 128 * 8 * 512 * 1e-4


@pytest.mark.parametrize("mu", [None, 3])
def test_grpo_policy_updates_per_sample_batch(mu, monkeypatch):
    """GRPO's mu (policy updates per sampled batch) multiplies the training FLOPs the plan counts, and the runtime
    runs exactly that many updates per step (it ran 2 while the plan counted 1). Default 1 (DeepSeekMath)."""
    from llmc.runtime import grpo, posttrain

    extra = f"\n          grpo_iterations: {mu}" if mu else ""
    _, plans, _ = spec(f"""\
        - name: g
          kind: grpo
          grpo_group_size: 8
          prompts_per_step: 64
          max_prompt_tokens: 512
          max_new_tokens: 1024{extra}
        """)
    r, hyper = plans[0].rollout, plans[0].hyper
    n = params_total(PRESETS["llama3-8b"])
    assert hyper["iterations"] == (mu or 1)
    assert r.train_flops_per_step == pytest.approx(6 * n * 64 * 8 * (512 + 1024) * (mu or 1))
    seen = {}
    monkeypatch.setattr(grpo, "train_grpo", lambda *a, **kw: seen.update(kw) or [{"reward_mean": 0.0, "kl": 0.0}])
    monkeypatch.setattr(posttrain, "load_stage_data", lambda job, kind: [])
    sched = lambda step: 1.0  # noqa: E731 - the stage's schedule, passed through as it is
    job = type("J", (), {"seed": 0, "micro_batch": 4, "loss_chunk": 512, "sampling_groups": 3,
                         "lr_factor": staticmethod(sched)})()
    loop = posttrain._Loop(job=job, model=None, tok=None, template="llama3", hyper=hyper, st=None, steps=1, lr=1e-6,
                           batch=512, seq_len=1536, pad_id=0, log=None)
    posttrain._run_grpo(loop)
    assert seen["inner_steps"] == (mu or 1) and seen["micro_batch"] == 4 and seen["sampling_groups"] == 3
    assert seen["loss_chunk"] == 512 and seen["lr_factor"] is sched and seen["max_prompt_tokens"] == 512


def test_long_context_plan_and_cp():
    _, plans, diags = spec("""\
        - name: lc
          kind: long_context
          seq_len: 131072
          rope_scaling: {type: yarn, factor: 16, original_max_position: 8192}
        """)
    lc = plans[0].long_context
    assert (lc.old_seq_len, lc.new_seq_len, lc.yarn_factor) == (8192, 131072, 16)
    assert lc.recommended_cp == 8  # 16K tokens per rank
    assert lc.kv_cache_bytes_per_sequence == 131072 * kv_bytes_per_token(PRESETS["llama3-8b"])
    assert lc.activation_bytes_per_gpu > 0
    # llmc's runtimes train the stage without CP: its memory and activations are those of whole sequences per GPU
    assert lc.cp == plans[0].memory.cp == 1
    assert any("cp=8" in n and "without context parallelism" in n for n in plans[0].notes)
    assert "T107" not in codes(diags)
    _, plans, _ = spec("- {name: lc, kind: long_context, seq_len: 32768, rope_theta: 2000000}\n")
    assert plans[0].long_context.recommended_cp == 2
    assert plans[0].long_context.rope_theta == 2_000_000


# ----------------------------------------------------------------------------- pitfalls


def test_T107_long_context_without_rope_change():
    text, _, diags = spec("""\
        - name: lc
          kind: long_context
          seq_len: 32768
        """)
    d = by_code(diags, "T107")
    assert d.severity == "warning" and d.line == line_of(text, "kind: long_context")


def test_T101_high_finetune_lr():
    text, _, diags = spec("""\
        - name: sft
          kind: sft
          lr: 3.0e-4
        - name: dpo
          kind: dpo
          init_from: sft
          lr: 1.0e-5
        """)
    t = [d for d in diags if d.code == "T101"]
    assert [d.line for d in t] == [line_of(text, "lr: 3.0e-4"), line_of(text, "lr: 1.0e-5")]
    assert all(d.severity == "warning" for d in t)
    # the same LR with LoRA is normal
    _, _, diags = spec("- {name: sft, kind: sft, lr: 2.0e-4, lora: {rank: 16}}\n")
    assert "T101" not in codes(diags)


def test_D101_domain_stage_without_general_data():
    text, _, diags = spec("""\
        - name: mid
          kind: midtrain
          general_data_fraction: 0.05
          data:
            seq_len: 8192
            tokens: 10B
            sources:
              - {name: code, path: /c.jsonl, kind: code}
        """)
    d = by_code(diags, "D101")
    assert d.severity == "warning" and d.line == line_of(text, "general_data_fraction: 0.05")
    text, _, diags = spec("""\
        - name: mid
          kind: midtrain
          data:
            seq_len: 8192
            tokens: 10B
            sources:
              - {name: code, path: /c.jsonl, kind: code, weight: 0.95}
              - {name: web, path: /w.jsonl, kind: general, weight: 0.05}
        """)
    assert by_code(diags, "D101").line == line_of(text, "data:", 1)
    _, _, diags = spec("- {name: mid, kind: midtrain, general_data_fraction: 0.15}\n")
    assert "D101" not in codes(diags)
    # a declared share the stage's own sources do not give: the runners mix sources by weight and add nothing, so the
    # forgetting check counts the sources (0% general: D101) and G010 says the declaration is not what trains
    text, _, diags = spec("""\
        - name: mid
          kind: midtrain
          general_data_fraction: 0.2
          data:
            seq_len: 8192
            tokens: 10B
            sources:
              - {name: code, path: /c.jsonl, kind: code}
        """)
    assert {"D101", "G010"} <= set(codes(diags))
    assert by_code(diags, "G010").line == line_of(text, "general_data_fraction: 0.2")


def test_T102_sft_without_loss_mask():
    text, _, diags = spec("""\
        - name: sft
          kind: sft
          loss_mask: none
        """)
    assert by_code(diags, "T102").line == line_of(text, "loss_mask: none")


def test_T103_chat_template_vs_tokenizer(tmp_path):
    # llmc-trained tokenizer has Llama-3 specials only: chatml is an error
    text, _, diags = spec("- {name: sft, kind: sft}\n", model="tiny", gpu="cpu", count=1, seq=128,
                          tok="    train: true\n    chat_template: chatml")
    d = by_code(diags, "T103")
    assert d.severity == "error" and "<|im_start|>" in d.message and d.line == line_of(text, "chat_template")
    _, _, diags = spec("- {name: sft, kind: sft}\n", model="tiny", gpu="cpu", count=1, seq=128,
                       tok="    train: true\n    chat_template: llama3")
    assert "T103" not in codes(diags)
    # a Llama-3 model with a chatml template (tokenizer inferred from the model): warning
    _, _, diags = spec("- {name: sft, kind: sft}\n", tok="    path: /nope\n    chat_template: chatml")
    assert by_code(diags, "T103").severity == "warning"
    # a real tokenizer.json lacking the header tokens: llama3 template is an error
    tdir = tmp_path / "tok"
    tdir.mkdir()
    (tdir / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"content": "<|im_start|>"},
                                                                      {"content": "<|im_end|>"}]}))
    _, _, diags = spec("- {name: sft, kind: sft}\n", tok=f"    path: {tdir}\n    chat_template: llama3")
    d = by_code(diags, "T103")
    assert d.severity == "error" and "<|start_header_id|>" in d.message


def test_default_chat_template_follows_the_tokenizer(tmp_path):
    """A chat stage without chat_template uses the format its tokenizer has the special tokens for (read from its
    tokenizer.json, or inferred from the model's family), never one T103 would then refuse: Qwen's ChatML, Phi-4's,
    Phi-3's, Llama 3's; llmc's own tokenizer keeps llama3. The choice is listed with the stage's defaults."""
    def default_for(tokens, model="llama3-8b", tok=None):
        if tok is None:
            tdir = tmp_path / "-".join(t.strip("<|>") for t in tokens)
            tdir.mkdir()
            (tdir / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"content": t} for t in tokens]}))
            tok = f"    path: {tdir}"
        _, plans, diags = spec("- {name: sft, kind: sft}\n", model=model, tok=tok)
        sft = next(p for p in plans if p.name == "sft")
        assert "chat_template" in sft.defaults and "T103" not in codes(diags)
        return sft.hyper["chat_template"]

    assert default_for(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == "chatml"
    assert default_for(["<|im_start|>", "<|im_sep|>", "<|im_end|>"]) == "phi4"
    assert default_for(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]) == "phi3"
    assert default_for(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]) == "llama3"
    assert default_for([], model="qwen2.5-7b", tok="    path: /nope/tok") == "chatml"  # inferred from the family
    assert default_for([], model="tiny", tok="    train: true") == "llama3"  # llmc's own tokenizer


def test_T104_T106():
    text, _, diags = spec("""\
        - name: g
          kind: grpo
          grpo_group_size: 1
          lora: {rank: 128}
        """)
    d = by_code(diags, "T104")
    assert d.severity == "error" and d.line == line_of(text, "grpo_group_size: 1")
    d = by_code(diags, "T106")
    assert d.severity == "warning" and d.path == "stages.0.lora.rank"


def test_post_training_stages_plan_the_specs_adam_settings_without_weight_decay():
    """SFT / DPO / GRPO run AdamW with training.optimizer's betas and eps and no weight decay (TRL's default): the
    stage plan says so (the lock's stage hyper, which the trainers read); continued training has no such entry (it
    runs the pre-training optimizer, weight decay included)."""
    text, plans, _ = spec("""\
        - {name: s, kind: sft}
        - {name: d, kind: dpo, init_from: s}
        - {name: g, kind: grpo, init_from: d}
        - {name: m, kind: midtrain, steps: 3}
        """, model="tiny", gpu="cpu", count=1, seq=128, tok="    train: true")
    _ = text
    got = {p.name: p.hyper.get("optimizer") for p in plans}
    assert got == {"s": {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}, "d": got["s"], "g": got["s"],
                   "m": None}


def test_G011_grpo_without_a_verifier():
    """reward: none used to pass the compiler and fail only when the run reached the GRPO stage (the runtime has
    no reward without a verifier): an error at the spec line; left out, the reward is the arithmetic verifier."""
    text, plans, diags = spec("""\
        - name: g
          kind: grpo
          reward: none
        - {name: ok, kind: grpo}
        """, model="tiny", gpu="cpu", count=1, seq=128, tok="    train: true")
    d = by_code(diags, "G011")
    assert (d.severity, d.path, d.line) == ("error", "stages.0.reward", line_of(text, "reward: none"))
    assert "reward: arithmetic" in d.hint and codes(diags).count("G011") == 1
    assert {p.name: p.hyper["reward"] for p in plans} == {"g": "none", "ok": "arithmetic"}


def test_G012_a_continued_stage_without_data_rereads_pretrainings_first_tokens():
    """A midtrain / long_context stage without data: of its own opens the top-level data afresh (every runner reads a
    stage's data from document 0): after a pre-training stage it repeats pre-training's first tokens. Warned at the
    stage; not for a stage with its own data, nor in a pipeline that does not pre-train on the top-level data."""
    stages = """\
        - {name: pre, kind: pretrain}
        - {name: mid, kind: midtrain, init_from: pre, steps: 10}
        - {name: long, kind: long_context, init_from: mid, seq_len: 16384, rope_theta: 2.0e+6, steps: 10}
        - name: mid2
          kind: midtrain
          init_from: pre
          data: {seq_len: 8192, tokens: 1e8, sources: [{name: m, path: /m.jsonl}]}
        """
    text, _, diags = spec(stages)
    found = [(d.path, d.severity, d.line) for d in diags if d.code == "G012"]
    assert found == [("stages.1", "warning", line_of(text, "name: mid,")), ("stages.2", "warning", line_of(text, "name: long,"))]
    assert "from its first document" in by_code(diags, "G012").message
    _, _, diags = spec("""\
        - {name: mid, kind: midtrain, init_hf: /models/base, steps: 10}
        """)
    assert "G012" not in codes(diags)


# ----------------------------------------------------------------------------- examples


@pytest.mark.parametrize("name", ["pipeline_tiny.yaml", "pipeline_llama3_8b.yaml", "pipeline_llama3_70b_qlora.yaml"])
def test_examples_plan_cleanly(name):
    run, lines = load_spec(ROOT / "examples" / name)
    plans, diags = plan_stages(run, gpu=get_gpu(run.hardware.gpu), lines=lines)
    assert not codes(diags, "error") and "G005" not in codes(diags)
    assert all(p.memory.fits is not False for p in plans)
    rows = [dataclasses.asdict(p) for p in plans]
    json.dumps(rows)  # JSON-serialisable
    keys = set(rows[0])
    assert all(set(r) == keys for r in rows)  # stable keys
    if name == "pipeline_tiny.yaml":
        assert [p.name for p in plans] == ["pretrain", "sft", "dpo", "grpo"]
    if name == "pipeline_llama3_8b.yaml":
        assert [p.kind for p in plans] == ["midtrain", "long_context", "sft", "dpo", "grpo"]
        assert plans[1].long_context.new_seq_len == 32768 and plans[1].memory.fits
        assert plans[1].memory.loss_chunk_tokens == 512


def test_stage_memory_counts_the_logits_the_runtime_losses_materialise():
    """llmc's post-training losses upcast the whole logits unless sliced (``model.token_losses``: ``logits.float()``
    then cross-entropy), so a micro-step holds at least the fp32 copy and the fp32 log-probs of
    every position: 8 B x seq_len x vocab (Llama 3: 128,256 entries; 4 GiB at 4K tokens). The stage estimate
    used to leave them out (SFT of Llama 3 8B on 8 H100: 16.6 GiB, now 26.5 GiB)."""
    from test_build_fakes import ROOT, compile_text

    c = compile_text((ROOT / "examples" / "pipeline_llama3_8b.yaml").read_text())
    vocab = c.spec.model.vocab_size
    for st in c.stages:
        if st.kind in ("sft", "dpo", "grpo"):
            m = st.memory
            floor = 8 * st.seq_len * vocab // m.cp
            assert m.buffer_bytes >= floor, (st.name, m.buffer_bytes, floor)
            assert m.per_gpu_bytes >= m.activation_bytes + m.buffer_bytes


def _stage_times(stages: str, **kw):
    _, plans, diags = spec(stages, **kw)
    return {p.name: p for p in plans}, diags


def test_stage_time_counts_dpo_pairs_the_reference_and_loras_cheaper_backward():
    """A DPO step over B pairs trains 2B sequences like an SFT step over 2B sequences, plus one forward of the frozen
    reference (a third of a pass's compute); LoRA's frozen base skips the weight gradients (4N instead of 6N on the
    linears). Both stages run on llmc's native trainer with the same layout here (replicated, selective AC)."""
    p, _ = _stage_times("""\
        - name: sft
          kind: sft
          steps: 10
          seq_len: 2048
          global_batch_tokens: 262144
        - name: sft_8k
          kind: sft
          steps: 10
          seq_len: 8192
          global_batch_tokens: 262144
        - name: sft_lora
          kind: sft
          steps: 10
          seq_len: 8192
          global_batch_tokens: 262144
          lora: {rank: 16}
        - name: dpo
          kind: dpo
          steps: 10
          seq_len: 2048
          global_batch_tokens: 131072
        """, model="llama3.2-1b")
    sft, lora, dpo, full = p["sft"].time, p["sft_lora"].time, p["dpo"].time, p["sft_8k"].time
    assert p["sft"].memory.shard_degree == p["dpo"].memory.shard_degree == 1
    assert (sft.backend, sft.forward_passes, dpo.forward_passes, sft.updates) == ("native", 0, 1, 1)
    # 64 pairs train 128 sequences (counted as 64 it would be ~0.5); micro-steps of a pair (2 sequences) against
    # SFT's 1 sequence run a little more efficiently
    assert 0.85 < dpo.train_pass_seconds / sft.train_pass_seconds < 1.0
    assert 1.2 < dpo.step_seconds / dpo.train_pass_seconds < 1.34  # + the reference's forward (at most a third)
    # at 8K both recompute the same (none: both fit without); LoRA saves the base linears' weight-gradient GEMMs, a third of
    # their training FLOPs: less than a third of the step, and not nothing (the linears are ~3/4 of the FLOPs)
    assert p["sft_8k"].memory.activation_checkpointing == p["sft_lora"].memory.activation_checkpointing
    assert 2 / 3 < lora.step_seconds / full.step_seconds < 0.95
    assert sft.days == pytest.approx((10 * sft.step_seconds + sft.checkpoint.seconds) / 86400)
    assert sft.tokens_per_second == pytest.approx(128 * 2048 / sft.step_seconds)


def test_pipeline_time_sums_the_stages_and_is_checked_against_the_budget():
    text = HEAD.format(model="llama3-8b", gpu="h100-sxm", count=8, seq=4096, tok="    path: /nope/tok") + """\
budget: {max_days: 1.0}
stages:
  - {name: pre, kind: pretrain}
  - {name: sft, kind: sft, steps: 30000, seq_len: 4096}
  - {name: g, kind: grpo, steps: 5, init_from: sft}
"""
    from llmc.compiler.compile import compile_spec

    run, lines = loads_spec(text, file="s.yaml")
    c = compile_spec(run, "s.yaml", lines)
    st = {s.name: s for s in c.stages}
    pipe = c.pipeline
    assert st["pre"].time is None and c.time is not None  # pre-training's figures are the plan's
    assert pipe.counted == ["pre", "sft", "g"] and pipe.unknown == []
    assert pipe.days == pytest.approx(c.time.days + st["sft"].time.days + st["g"].time.days)
    assert pipe.usd == pytest.approx(c.cost.usd + st["sft"].time.usd + st["g"].time.usd)
    assert st["g"].time.sampling_seconds > 0
    assert c.time.days < 1.0 < pipe.days  # pre-training fits the budget, the pipeline does not
    b004 = [d for d in c.diagnostics if d.code == "B004"]
    assert len(b004) == 1 and b004[0].severity == "warning" and "sft" in b004[0].message
    # the pre-training stage (named "pre" here) is the calibrated part: the hint names only the stage estimates
    assert pipe.estimated == ["sft", "g"] and "other than pre-training (sft, g) are uncalibrated" in b004[0].hint
    assert not [d for d in c.diagnostics if d.code == "B001"]
