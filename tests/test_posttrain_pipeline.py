"""sft (LoRA) -> dpo -> grpo chained through run_stage: checkpoints, DONE.json, init_from, merged weights."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from llmc.runtime.checkpoint import load_model_weights  # noqa: E402
from llmc.runtime.job import TrainJob  # noqa: E402
from llmc.runtime.model import build_model  # noqa: E402
from llmc.runtime.posttrain import KIND_FOR_STAGE, PostTrainError, run_stage  # noqa: E402
from llmc.runtime.synthetic import ByteTokenizer  # noqa: E402
from llmc.spec.model import Architecture  # noqa: E402
from llmc.spec.schema import make_stage as Stage  # noqa: E402

torch.set_num_threads(1)
TOK = ByteTokenizer()
ARCH = Architecture(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                    vocab_size=TOK.vocab_size, max_seq_len=128)
def builtin(kind: str, seq_len: int = 96, tokens: float = 1e5) -> dict:
    """Stage data: llmc's synthetic records of a ``kind`` stage (``format: builtin`` with the stage's record kind,
    llmc.runtime.synthetic; a builtin pre-training corpus is refused by the stage's trainer, G014)."""
    return {"sources": [{"name": "synthetic", "format": "builtin", "kind": KIND_FOR_STAGE[kind]}],
            "seq_len": seq_len, "tokens": tokens}


def _job(stage: Stage, steps: int, lr: float, batch: int = 8) -> TrainJob:
    return TrainJob(arch=ARCH, sources=[], seq_len=96, steps=steps, name="p", stage=stage.name, kind=stage.kind,
                    lr=lr, micro_batch=batch, init_from=stage.init_from, stage_spec=stage, log_every=1000)


def test_sft_lora_dpo_grpo_chain(tmp_path):
    run = tmp_path / "run"
    sft = Stage(name="sft", kind="sft", data=builtin("sft"), lora={"rank": 8, "alpha": 16, "targets": ["wq", "wv", "w2"]})
    r1 = run_stage(_job(sft, 30, 3e-3), run / "sft", tokenizer=TOK)
    done = json.loads((run / "sft" / "DONE.json").read_text())
    assert done["status"] == "done" and done["kind"] == "sft" and done == json.loads(json.dumps(r1, default=float))
    assert done["loss_last"] < done["loss_first"]
    assert done["trainable_params"] == 8 * ((64 + 64) + (64 + 32) + (128 + 64)) * 2  # r*(d_in+d_out), 2 layers
    assert (run / "sft" / "lora_adapters.pt").exists() and (run / "sft" / "metrics.jsonl").exists()
    # merged checkpoint loads strictly into a plain model (torchtitan names, no adapters)
    plain = build_model(ARCH, seed=123)
    load_model_weights(plain, run / "sft")
    dpo = Stage(name="dpo", kind="dpo", init_from="sft", data=builtin("dpo"), dpo_beta=0.1)
    r2 = run_stage(_job(dpo, 15, 1e-3), run / "dpo", tokenizer=TOK)  # (2e-3 overshoots: the loss rises again)
    assert abs(r2["loss_first"] - 0.693147) < 1e-4  # reference == init_from model at step 0
    hist = _steps(run / "dpo")
    assert len(hist) == 15
    assert sum(h["loss"] for h in hist[-5:]) / 5 < hist[0]["loss"]
    assert sum(h["margin"] for h in hist[-5:]) / 5 > 0
    grpo = Stage(name="grpo", kind="grpo", init_from="dpo", data=builtin("grpo"), grpo_group_size=4, max_new_tokens=4,
                 prompts_per_step=2)
    r3 = run_stage(_job(grpo, 3, 1e-4), run / "grpo", tokenizer=TOK)
    assert r3["status"] == "done" and r3["group_size"] == 4 and 0 <= r3["reward_last"] <= 1
    lines = _steps(run / "grpo")
    assert len(lines) == 3 and "reward_mean" in lines[0]


def _steps(d) -> list[dict]:
    """The step records of a stage's metrics.jsonl (its events -- start, truncation, resume -- left out)."""
    return [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_stage_lr_schedule_applies_to_dpo_and_grpo(tmp_path, kind):
    """The lock gives every stage its schedule (job.lr_factor); run_stage used to pass it to SFT only."""
    extra = {"grpo_group_size": 2, "max_new_tokens": 2, "prompts_per_step": 1} if kind == "grpo" else {}
    st = Stage(name=kind, kind=kind, data=builtin(kind), **extra)
    job = _job(st, 6, 1e-3, batch=2).replace(warmup_steps=2, schedule="linear", min_lr=1e-4)
    run_stage(job, tmp_path / kind, tokenizer=TOK)
    lrs = [r["lr"] for r in _steps(tmp_path / kind)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 7.75e-4, 5.5e-4, 3.25e-4])  # warmup 2, then 1 -> 0.1 linearly


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_post_training_builds_the_optimizer_the_stage_plan_says(tmp_path, kind, monkeypatch):
    """The lock's stage hyper carries the post-training AdamW (the spec's betas and eps, no weight decay); each
    trainer builds exactly that one (SFT/DPO/GRPO hard-coded their betas, and GRPO's differed)."""
    made = []
    real = torch.optim.AdamW

    def spy(params, **kw):
        made.append(kw)
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    extra = {"grpo_group_size": 2, "max_new_tokens": 2, "prompts_per_step": 1} if kind == "grpo" else {}
    job = _job(Stage(name=kind, kind=kind, data=builtin(kind), **extra), 1, 1e-3, batch=2)
    opt = {"betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.0}
    job = job.replace(stage_plan={**(job.stage_plan or {}), "hyper": {**((job.stage_plan or {}).get("hyper") or {}),
                                                                      "optimizer": opt}})
    run_stage(job, tmp_path / kind, tokenizer=TOK)
    assert [(k["betas"], k["eps"], k["weight_decay"]) for k in made] == [((0.8, 0.9), 1e-6, 0.0)]


def test_a_lora_dpo_stage_trains_without_dropout(tmp_path, monkeypatch):
    """DPO's implicit reward compares the policy with the reference, which runs without LoRA dropout: the stage runs
    the policy without it too (TRL's DPOConfig disable_dropout; sft.dropout_off restores it after, see the GRPO
    test)."""
    import llmc.runtime.dpo as dpo
    from llmc.runtime.lora import lora_modules

    seen = []
    real = dpo.sequence_logprobs

    def spy(model, *a, **k):
        seen.append({mod.dropout.p for mod in lora_modules(model)} or {None})
        return real(model, *a, **k)

    monkeypatch.setattr(dpo, "sequence_logprobs", spy)
    st = Stage(name="d", kind="dpo", data=builtin("dpo"), lora={"rank": 4, "alpha": 8, "dropout": 0.5, "targets": ["wq"]})
    job = _job(st, 2, 1e-3, batch=2)
    model = build_model(ARCH, seed=0)
    run_stage(job, tmp_path / "d", tokenizer=TOK, model=model)
    assert {0.0} in seen and all(s <= {0.0, None} for s in seen), seen  # the policy's passes: adapters at p 0


def test_qlora_stage_merges_into_the_full_precision_base(tmp_path):
    """A QLoRA stage's merged checkpoint is the init model's full-precision weights + (alpha/r) B A (it used to be
    the NF4-dequantised weights + B A), and its PEFT adapter names that init model as its base."""
    from llmc.runtime.checkpoint import read_model_state, resolve_checkpoint

    run = tmp_path / "run"
    run_stage(_job(Stage(name="base", kind="sft", data=builtin("sft")), 1, 1e-3), run / "base", tokenizer=TOK)
    w0 = read_model_state(resolve_checkpoint(run / "base"))
    st = Stage(name="q", kind="sft", init_from="base", data=builtin("sft"),
               lora={"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["wq", "w2"], "quantize_base": "nf4"})
    run_stage(_job(st, 3, 3e-3), run / "q", tokenizer=TOK)
    ad = torch.load(run / "q" / "lora_adapters.pt", weights_only=True)
    assert any(bool(v.abs().sum() > 0) for k, v in ad.items() if k.endswith("lora_B"))  # the adapters trained
    merged = read_model_state(resolve_checkpoint(run / "q"))
    assert merged.keys() == w0.keys()
    for k, v in merged.items():
        a = ad.get(k.replace(".weight", ".lora_A"))
        want = w0[k] if a is None else w0[k] + (8 / 4) * ad[k.replace(".weight", ".lora_B")] @ a
        torch.testing.assert_close(v, want, rtol=0, atol=1e-6, msg=k)
    cfg = json.loads((run / "q" / "hf" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((run / "base" / "hf").resolve())


def test_init_from_weights_are_loaded(tmp_path):
    run = tmp_path / "run"
    sft = Stage(name="sft", kind="sft", data=builtin("sft"))
    run_stage(_job(sft, 5, 1e-3), run / "sft", tokenizer=TOK)
    a = build_model(ARCH, seed=7)
    load_model_weights(a, run / "sft")
    dpo = Stage(name="dpo", kind="dpo", init_from="sft", data=builtin("dpo"))
    job = _job(dpo, 1, 1e-9)
    m = build_model(ARCH, seed=job.seed)
    load_model_weights(m, run / job.init_from)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), m.state_dict().values(), strict=True))


def test_chat_template_mismatch_is_a_clear_error(tmp_path):
    llama_only = ByteTokenizer(specials=("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>",
                                         "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    st = Stage(name="sft", kind="sft", data={**builtin("sft"), "tokenizer": {"chat_template": "chatml"}})
    job = _job(st, 1, 1e-3).replace(tokenizer=st.data.tokenizer)
    with pytest.raises(PostTrainError, match="chatml"):
        run_stage(job, tmp_path / "sft", tokenizer=llama_only)


def test_stage_inherits_long_context_rope():
    from llmc.runtime.posttrain import stage_arch

    st = Stage(name="sft", kind="sft", init_from="lc", data=builtin("sft"))
    job = _job(st, 1, 1e-3).replace(stage_plan={"context": {
        "max_context": 512, "rope_theta": 40000.0, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                                    "original_max_position": 128}}})
    a = stage_arch(job)
    assert (a.rope_theta, a.max_seq_len, a.rope_scaling.type, a.rope_scaling.factor) == (40000.0, 512, "yarn", 4.0)
    assert stage_arch(_job(st, 1, 1e-3)) is ARCH
