"""``training.optimizer.no_decay``: which parameters AdamW leaves undecayed, one rule for the native trainer, DeepSpeed,
the post-training stages and the torchtitan job, stated in the emitted job.

The rules are checked against independent definitions (OLMo 2: 1-D parameters and the token embeddings; Megatron-LM /
nanoGPT: 1-D parameters; torchtitan's ``default_adamw``: every parameter) and the torchtitan job's groups against
torchtitan's own grouping of its own model (``OptimizersContainer._build_param_groups``).
"""

from __future__ import annotations

import ast
import copy
import json
import re
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmc.emit.torchtitan import NO_WD_PATTERNS, NO_WD_RULES, render_torchtitan
from llmc.spec.schema import Optimizer, RunSpec

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "build"
RULES = ("embeddings_and_1d", "1d", "none")


def _compiled(rule: str | None = None):
    from test_torchtitan_render import compiled_for

    return compiled_for(training_extra={"optimizer": {"no_decay": rule}} if rule else None)


def _groups_src(src: str) -> str:
    i = src.index("param_groups=[")
    return src[i:src.index("],", i)]


# ------------------------------------------------------------------------------------------------ the spec key


def test_spec_key_default_and_choices():
    assert Optimizer().no_decay == "embeddings_and_1d"  # today's rule stays the default
    assert typing.get_args(Optimizer.model_fields["no_decay"].annotation) == RULES
    base = {"name": "t", "model": {"name": "m", "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128,
                      "vocab_size": 256, "max_seq_len": 64},
            "data": {"seq_len": 64, "tokens": 1e6}, "hardware": {"gpu": "cpu", "count": 1}}
    for rule in RULES:
        run = RunSpec.model_validate({**base, "training": {"optimizer": {"no_decay": rule}}})
        assert run.training.optimizer.no_decay == rule
    with pytest.raises(ValidationError):
        RunSpec.model_validate({**base, "training": {"optimizer": {"no_decay": "embeddings"}}})
    # each rule is documented with its source in the field's docstring (``llmc schema`` shows it)
    from llmc.spec.load import field_docs

    doc = field_docs(Optimizer)["no_decay"]
    for rule, source in (("embeddings_and_1d", "2501.00656"), ("1d", "Megatron-LM"), ("none", "default_adamw")):
        assert f"``{rule}``" in doc and source in doc


def test_emitter_and_runtime_know_the_same_rules():
    torch = pytest.importorskip("torch")  # noqa: F841
    from llmc.runtime.model import NO_DECAY_PATTERN, NO_DECAY_PATTERNS, NO_DECAY_RULES

    assert tuple(NO_DECAY_PATTERNS) == tuple(NO_WD_PATTERNS) == tuple(NO_WD_RULES) == NO_DECAY_RULES == RULES
    assert NO_WD_PATTERNS == NO_DECAY_PATTERNS and NO_DECAY_PATTERN == NO_DECAY_PATTERNS["embeddings_and_1d"]


# ------------------------------------------------------------------------------------------------ the torchtitan job


@pytest.mark.parametrize("rule", RULES)
def test_torchtitan_job_groups_and_comment(rule):
    src = render_torchtitan(_compiled(rule))["torchtitan/llmc_job.py"]
    ast.parse(src)
    groups = _groups_src(src)
    patterns = [ast.literal_eval(m) for m in re.findall(r"ParamGroupConfig\(pattern=(r?'[^']*'|r?\"[^\"]*\")", groups)]
    if rule == "none":  # torchtitan's default_adamw: one catch-all group at the spec's weight decay
        assert patterns == [".*"] and "adamw_no_wd" not in src
    else:
        assert patterns == [NO_WD_PATTERNS[rule], ".*"]
    comment = " ".join(line.strip().lstrip("# ") for line in groups.splitlines() if line.strip().startswith("#"))
    assert f"training.optimizer.no_decay {rule}:" in comment
    assert {"embeddings_and_1d": "OLMo 2", "1d": "Megatron-LM", "none": "default_adamw"}[rule] in comment
    assert ("token embeddings" in comment) == (rule != "none")


def test_default_rule_job_is_todays_pattern():
    """The default keeps the pattern llmc emitted before the key existed (an unchanged job for an unchanged spec)."""
    src = render_torchtitan(_compiled())["torchtitan/llmc_job.py"]
    assert "pattern='(norm\\\\.weight|\\\\.bias|expert_bias|tok_embeddings\\\\.weight)$'" in _groups_src(src)


def test_torchtitan_job_explains_its_timeouts_and_checkpoint_settings():
    from llmc.emit.torchtitan import COMM_TRAIN_TIMEOUT_CKPT_S, comm_train_timeout, comm_train_timeout_comment

    src = render_torchtitan(_compiled())["torchtitan/llmc_job.py"]
    before_comm = src[:src.index("comm=CommConfig(")].splitlines()[-10:]
    comm = " ".join(line.strip().lstrip("# ") for line in before_comm if line.strip().startswith("#"))
    assert "torchtitan's default is 100 s" in comm and f"{COMM_TRAIN_TIMEOUT_CKPT_S} s" in comm
    assert "COMM_TRAIN_TIMEOUT_CKPT_S" in comm and "synchronous checkpoint save" in comm
    assert "torchtitan's default 300 s" in comm
    # the comment names the term that set the value: the floor, or the margin x the predicted save
    assert comm_train_timeout(10.0) == COMM_TRAIN_TIMEOUT_CKPT_S
    assert "llmc's floor" in " ".join(comm_train_timeout_comment(10.0))
    assert comm_train_timeout(1000.0) == 1500 and "1.5 x the plan's predicted preemption save (1000 s)" in " ".join(
        comm_train_timeout_comment(1000.0))
    ck = src[src.index("checkpoint=LlmcCheckpointManager.Config("):src.index("keep_latest_k=")]
    assert "training.checkpoint.folder / keep_latest" in ck and "\"checkpoint\" and 10" in ck


def test_pipeline_chunk_of_only_the_embedding_keeps_chunk_optimizers_under_every_rule():
    """A first pipeline chunk of only the embedding has one group empty under the default rule (the ``.*`` one)
    and under ``1d`` (the no-decay one): the job's ChunkOptimizers skips it either way."""
    from test_torchtitan_render import compiled_for

    from llmc.compiler.plan import ParallelPlan
    from llmc.emit.torchtitan import torchtitan_values

    plan = ParallelPlan(pp=2, pp_schedule="Interleaved1F1B", pp_virtual_stages=3, micro_batch=1, grad_accum=8)
    for rule in RULES:
        c = compiled_for(plan=plan, training_extra={"optimizer": {"no_decay": rule}})
        assert torchtitan_values(c).ctx["pp_module_fqns"][0] == ["tok_embeddings"]
        assert "optimizer=ChunkOptimizers.Config(" in render_torchtitan(c, strict=True)["torchtitan/llmc_job.py"]


# ------------------------------------------------------------------------------------------------ the runtime rule


def _archs():
    from llmc.spec.model import MLA, Architecture, MoE

    base = dict(name="t", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=128, max_seq_len=64)
    return [Architecture(**base), Architecture(**base, qkv_bias=True), Architecture(**base, tied_embeddings=True),
            Architecture(**base, moe=MoE(num_experts=4, top_k=2, router_bias=True, expert_bias=True,
                                         num_shared_experts=1, dense_layers=1)),
            Architecture(**base, mla=MLA(q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8,
                                         v_head_dim=8))]


def _undecayed_by_definition(rule: str, name: str, p) -> bool:
    """The rules as their sources state them (independent of llmc's code): OLMo 2 leaves out 1-D parameters and the
    token embeddings, Megatron-LM / nanoGPT 1-D parameters and biases, torchtitan's default_adamw nothing."""
    one_d = p.dim() < 2 or name.endswith(".bias")
    return {"embeddings_and_1d": one_d or name == "tok_embeddings.weight", "1d": one_d, "none": False}[rule]


@pytest.mark.parametrize("rule", RULES)
def test_runtime_param_groups_follow_the_rule(rule):
    pytest.importorskip("torch")
    from llmc.runtime.model import NO_DECAY_PATTERNS, build_model, param_groups

    for arch in _archs():
        model = build_model(arch, device="meta")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = param_groups(model, 0.1, rule)
        assert sum(len(g["params"]) for g in groups) == len(trainable)
        undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
        if rule == "none":  # one group of every parameter, as torchtitan's default_adamw
            assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
        pattern = NO_DECAY_PATTERNS[rule]
        for name, p in trainable:
            assert (id(p) in undecayed) == _undecayed_by_definition(rule, name, p), (arch, rule, name)
            # the torchtitan job's pattern names exactly these (llmc's names are torchtitan's FQNs)
            assert (pattern is not None and re.search(pattern, name) is not None) == (id(p) in undecayed), name
        emb = dict(trainable)["tok_embeddings.weight"]
        assert (id(emb) in undecayed) == (rule == "embeddings_and_1d")


def test_runtime_refuses_an_unknown_rule():
    pytest.importorskip("torch")
    from llmc.runtime.model import build_model, param_groups

    with pytest.raises(ValueError, match="training.optimizer.no_decay"):
        param_groups(build_model(_archs()[0], device="meta"), 0.1, "embeddings")


@pytest.mark.parametrize("rule", RULES)
def test_native_trainer_optimizer_takes_the_jobs_rule(rule):
    torch = pytest.importorskip("torch")
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import build_model
    from llmc.runtime.train import build_optimizer

    arch = _archs()[0]
    model = build_model(arch)
    opt = build_optimizer(model, TrainJob(arch=arch, sources=[], seq_len=16, steps=1, no_decay=rule),
                          torch.device("cpu"))
    emb = model.tok_embeddings.weight
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd_of[id(emb)] == (0.0 if rule == "embeddings_and_1d" else 0.1)
    assert wd_of[id(model.norm.weight)] == (0.1 if rule == "none" else 0.0)
    assert len(opt.param_groups) == (1 if rule == "none" else 2)


def test_post_training_adamw_uses_the_rule_when_it_decays():
    pytest.importorskip("torch")
    from llmc.runtime.model import build_model
    from llmc.runtime.sft import adamw

    model = build_model(_archs()[0])
    emb, norm = model.tok_embeddings.weight, model.norm.weight

    def wd_of(opt):
        return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}

    # no decay (post-training's default): one group of every trainable parameter, as before the rule
    opt = adamw(model, 1e-4, {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0})
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == len(list(model.parameters()))
    assert len(adamw(model, 1e-4, None).param_groups) == 1
    # with decay: the stage plan's rule, else the default one
    w = wd_of(adamw(model, 1e-4, {"weight_decay": 0.05}))
    assert (w[id(emb)], w[id(norm)]) == (0.0, 0.0)
    w = wd_of(adamw(model, 1e-4, {"weight_decay": 0.05, "no_decay": "1d"}))
    assert (w[id(emb)], w[id(norm)]) == (0.05, 0.0)
    w = wd_of(adamw(model, 1e-4, {"weight_decay": 0.05, "no_decay": "none"}))
    assert (w[id(emb)], w[id(norm)]) == (0.05, 0.05)
    # frozen parameters (a LoRA run's base) stay out
    for p in model.parameters():
        p.requires_grad_(p is not emb)
    opt = adamw(model, 1e-4, {"weight_decay": 0.05})
    assert id(emb) not in wd_of(opt) and id(norm) in wd_of(opt)


# ------------------------------------------------------------------------------------------------ the lock


def _old_lock(name: str = "tiny_cpu") -> dict:
    """A lock as llmc wrote it before the key (the golden's, with the key taken out if it has it)."""
    lock = json.loads((GOLDEN / name / "plan.lock.json").read_text())
    lock["spec"]["resolved"]["training"]["optimizer"].pop("no_decay", None)
    return lock


def test_an_older_lock_loads_with_the_default_rule_and_a_new_one_carries_its_rule():
    from llmc.runtime.job import TrainJob

    lock = _old_lock()
    assert TrainJob.from_lock(lock, build_dir=GOLDEN / "tiny_cpu").no_decay == "embeddings_and_1d"
    new = copy.deepcopy(lock)
    new["spec"]["resolved"]["training"]["optimizer"]["no_decay"] = "1d"
    assert TrainJob.from_lock(new, build_dir=GOLDEN / "tiny_cpu").no_decay == "1d"


def test_fingerprint_of_the_default_rule_is_an_older_locks():
    """Finished stages of an older lock stay this lock's (the default rule is what they trained with); another rule
    is another training setting."""
    from llmc.runtime.job import fingerprint_change, stage_fingerprint

    old = _old_lock("pipeline_tiny")
    stages = [s["name"] for s in old["stages"]]
    for rule, same in (("embeddings_and_1d", True), ("1d", False), ("none", False)):
        new = copy.deepcopy(old)
        new["spec"]["resolved"]["training"]["optimizer"]["no_decay"] = rule
        for stage in stages:
            a, b = stage_fingerprint(old, stage), stage_fingerprint(new, stage)
            assert a is not None and (a["sha256"] == b["sha256"]) == same, (rule, stage)
            if not same:
                assert "training settings" in fingerprint_change(a, b)


def test_a_checkpoint_is_not_resumed_under_another_rule():
    from llmc.runtime.job import TrainJob

    arch = _archs()[0]
    job = TrainJob(arch=arch, sources=[], seq_len=16, steps=10)
    assert job.lr_schedule["no_decay"] == "embeddings_and_1d"
    assert job.schedule_change(job.lr_schedule, "step-4", 4) is None
    other = job.replace(no_decay="1d")
    why = other.schedule_change(job.lr_schedule, "step-4", 4)
    assert why and "no_decay embeddings_and_1d" in why and "no_decay 1d" in why
    # a checkpoint of an llmc before the key trained with the default rule
    older = {k: v for k, v in job.lr_schedule.items() if k != "no_decay"}
    assert job.schedule_change(older, "step-4", 4) is None
    assert "no_decay" in (other.schedule_change(older, "step-4", 4) or "")


# ------------------------------------------------------------------------------------------------ torchtitan itself


@pytest.mark.slow
@pytest.mark.parametrize("example", ["tiny_cpu", "deepseek_v3"])
def test_torchtitan_groups_its_model_as_llmcs_runtime(example, tmp_path, monkeypatch):
    """torchtitan's own grouping (``OptimizersContainer._build_param_groups``, first match wins) of the model it
    builds from the emitted job, under each rule, decays as many weights as llmc's runtime does on llmc's model of
    the same architecture (torchtitan fuses some projections, so the totals are compared; DeepSeek-V3: MLA norms,
    MoE with the expert bias, which torchtitan keeps as a buffer and llmc's runtime does not train)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchtitan")
    from test_torchtitan import _with, compiled_example, load_job, write_build
    from torchtitan.components.optimizer import OptimizersContainer

    from llmc.runtime.model import build_model, param_groups

    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
        monkeypatch.setenv(k, v)
    base = compiled_example(example)
    monkeypatch.setenv("LLMC_RUN_DIR", str(tmp_path / "run"))
    arch = base.spec.model
    wd = base.spec.training.optimizer.weight_decay
    assert wd > 0
    llmc_model = build_model(arch, device="meta")
    for rule in RULES:
        c = _with(base, optimizer=base.spec.training.optimizer.model_copy(update={"no_decay": rule}))
        cfg = load_job(write_build(c, tmp_path / rule), "job_without_converters")  # (fp8: no CPU float8)
        with torch.device("meta"):
            titan_model = cfg.model_spec.model.build()
        titan_groups, _ = OptimizersContainer._build_param_groups(titan_model, cfg.optimizer.param_groups, {})
        titan = {}
        for g in titan_groups["AdamW"]:
            titan[g["weight_decay"]] = titan.get(g["weight_decay"], 0) + sum(p.numel() for p in g["params"])
        ours = {}
        for g in param_groups(llmc_model, wd, rule):
            ours[g["weight_decay"]] = ours.get(g["weight_decay"], 0) + sum(p.numel() for p in g["params"])
        assert titan == ours, (rule, titan, ours)
        assert len(titan_groups["AdamW"]) == (1 if rule == "none" else 2)
