"""The emitted torchtitan 0.3.0 job modules, checked with the real library.

1. every example's module loads through torchtitan's own ``ConfigManager`` and the resulting
   ``Trainer.Config`` carries the plan's degrees, batch, steps and schedule; its model, built on the
   meta device by torchtitan, has exactly the parameter count llmc computed (independent check);
2. bad values are rejected by torchtitan (so the check can fail);
3. torchtitan trains the tiny example on CPU through ``llmc.runtime.titan_cpu_shim`` (1 and 2 gloo
   processes, loss finite and falling, resume from the last checkpoint);
4. a fake-backend dry run of llama3-8b on 64 simulated ranks (dp_shard 8 x tp 8) builds its mesh and
   takes a step on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["tiny_cpu", "llama3_8b_h100x8", "llama3_70b_h100x64", "llama3_405b_h100x16384", "mixtral_8x7b",
            "deepseek_v3", "qwen2.5_7b_a100x16"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(r"(?<!validate )step:\s+(\d+)\s+loss:\s+([-+0-9.eEnaif]+)")  # training steps, not validation

pytestmark = pytest.mark.slow  # real torchtitan: heavy imports, subprocesses
pytest.importorskip("torch")
pytest.importorskip("torchtitan")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


@functools.cache
def compiled_example(name: str):
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import load_spec

    path = ROOT / "examples" / f"{name}.yaml"
    run, lines = load_spec(path)
    return compile_spec(run, spec_path=str(path), yaml_lines=lines)


def write_build(compiled, out: Path) -> Path:
    from llmc.emit.torchtitan import render_torchtitan

    for rel, text in render_torchtitan(compiled, strict=True).items():
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return out / "torchtitan" / "llmc_job.py"


def load_job(module: Path, config: str = "job", extra: tuple[str, ...] = ()):
    """torchtitan's own loader: ConfigManager().parse_args(["--module", ..., "--config", ...])."""
    from torchtitan.config import ConfigManager

    sys.path.insert(0, str(module.parent))
    sys.modules.pop(module.stem, None)
    try:
        return ConfigManager().parse_args(["--module", module.stem, "--config", config, *extra])
    finally:
        sys.path.remove(str(module.parent))
        sys.modules.pop(module.stem, None)


def make_assets(run_dir: Path, vocab: int, n_docs: int = 300, names=("train",)) -> list[str]:
    """A tiny byte-level BPE and a few JSONL documents per source name, offline (stand-in for
    prepare_assets, same layout: assets/tokenizer.json and, for builtin corpora, data/<source>.jsonl with a
    "text" field; the held-out split is applied by the job while it streams). Returns the documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    (run_dir / "assets").mkdir(parents=True, exist_ok=True)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ("the model trains on tokens and the loss falls as the data parallel shards reduce "
             "gradients while tensor pipeline stages exchange activations").split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(30, 120))) for _ in range(n_docs)]
    for name in names:
        with open(run_dir / "data" / f"{name}.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=min(vocab, 600), special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(run_dir / "assets" / "tokenizer.json"))
    (run_dir / "assets" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return docs


def run_logged(argv, env, cwd, timeout=600):
    t = time.time()
    p = subprocess.run(argv, env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    log = ANSI.sub("", p.stdout + p.stderr)
    return p.returncode, log, time.time() - t


def losses(log: str) -> dict[int, float]:
    """step -> loss over every rank's lines. torchtitan logs -1 on pipeline ranks without the last
    stage; data-parallel ranks log the same (all-reduced) loss."""
    out: dict[int, set[float]] = {}
    for s, v in STEP.findall(log):
        out.setdefault(int(s), set())
        if float(v) != -1.0:
            out[int(s)].add(round(float(v), 4))
    assert all(len(v) == 1 for v in out.values()), out  # exactly one real loss per step
    return {k: v.pop() for k, v in out.items()}


# --------------------------------------------------------------------------------------------- 1


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_module_loads_through_config_manager(name, tmp_path, monkeypatch):
    import torch
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    from llmc.compiler.params import n_moe_layers

    c = compiled_example(name)
    plan, hyper, spec = c.plan, c.hyper, c.spec
    module = write_build(c, tmp_path)
    monkeypatch.setenv("LLMC_RUN_DIR", str(tmp_path / "run"))
    src = module.read_text()
    config = "job"
    if spec.training.precision == "fp8":
        assert "Float8LinearConverter.Config(" in src
        # float8 converters are built with the config: they need torchao and an SM89+ GPU
        with pytest.raises((ImportError, ValueError), match="torchao|SM89"):
            load_job(module)
        config = "job_without_converters"
    cfg = load_job(module, config)

    par = cfg.parallelism
    assert (par.data_parallel_replicate_degree, par.data_parallel_shard_degree, par.tensor_parallel_degree,
            par.pipeline_parallel_degree, par.context_parallel_degree, par.expert_parallel_degree) == (
        plan.dp_replicate, plan.dp_shard, plan.tp, plan.pp, plan.cp, plan.ep)
    assert par.pipeline_parallel_schedule == plan.pp_schedule
    # ZeRO-3: torchtitan's own policy (no reshard under PP, whose per-micro-batch all-gathers the time model does not
    # count); ZeRO-1/2: never
    assert par.fsdp_reshard_after_forward == ("never" if plan.zero_stage < 3 else "default")
    tr = cfg.training
    assert tr.global_batch_size == hyper.global_batch_seqs == plan.global_batch_seqs
    accum = tr.global_batch_size // (tr.local_batch_size * plan.dp)
    assert tr.local_batch_size * plan.dp * accum == tr.global_batch_size
    if plan.pp > 1:
        assert tr.disable_cuda_graphs  # torchtitan: "CUDA graphs do not support pipeline parallelism"
        assert tr.local_batch_size // par.pipeline_parallel_microbatch_size == plan.grad_accum
    assert (tr.seq_len, tr.steps) == (hyper.seq_len, hyper.steps)
    assert tr.mixed_precision_param == ("float32" if spec.training.precision == "fp32" else "bfloat16")
    ls = cfg.lr_scheduler
    assert ls.warmup_steps == hyper.warmup_steps
    assert ls.min_lr_factor == pytest.approx(hyper.min_lr / hyper.lr)
    if spec.training.schedule.kind == "wsd":
        assert ls.decay_ratio == spec.training.schedule.decay_fraction
    else:
        assert ls.decay_ratio is None and ls.decay_type == spec.training.schedule.kind
    no_wd, rest = cfg.optimizer.param_groups
    assert rest.optimizer_kwargs["lr"] == hyper.lr and no_wd.optimizer_kwargs["weight_decay"] == 0.0
    assert rest.optimizer_kwargs["weight_decay"] == spec.training.optimizer.weight_decay
    ck = cfg.checkpoint
    assert ck.enable and ck.interval == hyper.checkpoint_interval and ck.last_save_model_only is False
    assert ck.async_mode == ("async" if hyper.checkpoint_async else "disabled")
    ac = {"none": type(None), "selective": SelectiveAC.Config, "full": FullAC.Config,
          "partial": FullAC.Config}[plan.activation_checkpointing]
    assert isinstance(cfg.activation_checkpoint, ac)
    if plan.activation_checkpointing == "partial":  # the job's PartialFullAC: the first ac_layers blocks per chunk
        assert cfg.activation_checkpoint.layers == plan.ac_layers
    run = tmp_path / "run"
    assert cfg.hf_assets_path == str(run / "assets")
    srcs = [s for s in spec.data.sources if s.kind in ("general", "domain", "code", "math", "multilingual")]
    # every source is read where it lies (builtin corpora: what prepare writes under data/); the held-out
    # split is applied while streaming, so no source path points into data/split

    def where(s):
        if s.path is None and s.format != "builtin":
            return None  # planning-only source: the job reports it when it loads the data
        if s.format == "builtin" or spec.data.quality is not None:
            return str(run / "data" / (f"quality/{s.name}" if spec.data.quality is not None else f"{s.name}.jsonl"))
        return str(Path(s.path) if Path(s.path).is_absolute() else (ROOT / "examples" / s.path).resolve())

    if len(srcs) > 1:  # weighted mixture through torchtitan's interleaved loader
        total = sum(s.weight for s in srcs)
        assert [x.dataset_path for x in cfg.dataloader.sources] == [where(s) for s in srcs]
        assert [x.weight for x in cfg.dataloader.sources] == pytest.approx([s.weight / total for s in srcs])
    elif srcs:
        assert cfg.dataloader.dataset_path == where(srcs[0])

    # torchtitan's own validation of the model against the job (tp | heads, seq_len <= RoPE, EP, PP
    # with tying), then the model graph on the meta device: its parameter count must equal llmc's.
    m = cfg.model_spec.model
    m.update_from_config(config=cfg)
    with torch.device("meta"):
        model = m.build()
    n_titan = sum(p.numel() for p in model.parameters())
    arch = spec.model
    # llmc counts DeepSeek-V3's e_score_correction_bias as parameters; torchtitan keeps it as a buffer
    bias = n_moe_layers(arch) * arch.moe.num_experts if arch.moe is not None and arch.moe.expert_bias else 0
    assert n_titan + bias == c.model.params_total, (n_titan, c.model.params_total)
    # no weight decay exactly where llmc's runtime has none (llmc.runtime.model.param_groups): 1-D parameters
    # (norm gains, biases) and the token embeddings, on torchtitan's own parameter names
    names = dict(model.named_parameters())
    pattern = re.compile(no_wd.pattern)
    assert {n for n in names if pattern.search(n)} == {
        n for n, p in names.items() if p.ndim < 2 or n.endswith("tok_embeddings.weight")}
    # MoE routing as the architecture says (DeepSeek-V3: route_scale 2.5, 8 groups, 4 per token)
    if arch.moe is not None:
        routers = [layer.moe.router for layer in m.layers if layer.moe is not None]
        assert routers and {(r.route_scale, r.num_expert_groups, r.num_limited_groups) for r in routers} == {
            (arch.moe.route_scale, arch.moe.n_expert_groups, arch.moe.n_limited_groups)}


def test_pipeline_example_stage_jobs_load_through_config_manager(tmp_path, monkeypatch):
    """examples/pipeline_llama3_8b.yaml continues Llama 3 8B (no pre-training stage): its build is the midtrain and
    long-context jobs alone, and torchtitan's own loader reads each with the layout the plan searched for that stage
    (context parallelism for the 32K one), its sequence length and the weights it starts from."""
    c = compiled_example("pipeline_llama3_8b")
    assert c.plan is None and c.backend.name == "torchtitan"
    write_build(c, tmp_path)
    monkeypatch.setenv("LLMC_RUN_DIR", str(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "torchtitan").glob("*.py")) == ["llmc_job_stage0.py",
                                                                               "llmc_job_stage1.py"]
    for i, name in ((0, "midtrain"), (1, "long_context")):
        sp = c.stages[i]
        assert sp.name == name and sp.layout is not None
        cfg = load_job(tmp_path / "torchtitan" / f"llmc_job_stage{i}.py")
        par, lay = cfg.parallelism, sp.layout
        assert (par.data_parallel_replicate_degree, par.data_parallel_shard_degree, par.tensor_parallel_degree,
                par.pipeline_parallel_degree, par.context_parallel_degree) == (
            lay.dp_replicate, lay.dp_shard, lay.tp, lay.pp, lay.cp)
        assert cfg.training.seq_len == sp.seq_len and cfg.training.steps == sp.steps
    assert c.stages[1].layout.cp > 1 and c.stages[1].seq_len == 32768
    src = (tmp_path / "torchtitan" / "llmc_job_stage0.py").read_text()
    assert "Meta-Llama-3-8B" in src and "initial_load_in_hf=True" in src


def test_published_sizes_through_torchtitan(tmp_path):
    """The torchtitan models llmc emits have the published sizes (not only llmc's own numbers)."""
    import torch

    expect = {"llama3_8b_h100x8": 8.03e9, "llama3_70b_h100x64": 70.55e9, "llama3_405b_h100x16384": 405.85e9,
              "mixtral_8x7b": 46.70e9, "deepseek_v3": 671.0e9}  # model cards / papers, rounded
    for name, published in expect.items():
        module = write_build(compiled_example(name), tmp_path / name)
        cfg = load_job(module, "job_without_converters")
        with torch.device("meta"):
            model = cfg.model_spec.model.build()
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - published) / published < 0.002, (name, n)


def _routers(model_cfg):
    return [(r.route_scale, r.num_expert_groups, r.num_limited_groups, r.top_k, r.score_func, r.route_norm)
            for r in (layer.moe.router for layer in model_cfg.layers if layer.moe is not None)]


def test_deepseek_v3_routing_is_torchtitans_671b(tmp_path):
    """DeepSeek-V3's router in the emitted job equals torchtitan's own 671B flavour's
    (route_scale 2.5, n_expert_groups 8, n_limited_groups 4, top-8 sigmoid, renormalised)."""
    from torchtitan.models.deepseek_v3 import deepseekv3_configs

    ref = deepseekv3_configs["671B"](attn_backend="flex", moe_comm_backend="standard")
    cfg = load_job(write_build(compiled_example("deepseek_v3"), tmp_path), "job_without_converters")
    got = _routers(cfg.model_spec.model)
    assert len(got) == 58 and got == _routers(ref)


def _with(c, **training):
    return dataclasses.replace(c, spec=c.spec.model_copy(update={"training": c.spec.training.model_copy(update=training)}))


def test_torchtitan_adapters_drop_qkv_biases_so_none_is_emitted(tmp_path):
    """The library fact behind the q/k/v-bias decision: torchtitan 0.3.0's Llama3 and Qwen3 state-dict adapters
    map no bias key (to_hf leaves them out, so an HF load would keep them at zero init). The emitted Qwen2.5-style
    job therefore names no adapter."""
    import torch
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    c = compiled_example("tiny_cpu")
    c = dataclasses.replace(c, spec=c.spec.model_copy(
        update={"model": c.spec.model.model_copy(update={"qkv_bias": True})}))
    cfg = load_job(write_build(c, tmp_path))
    assert cfg.model_spec.state_dict_adapter is None
    with torch.device("meta"):
        model = cfg.model_spec.model.build()
    sd = model.state_dict()  # FusedQKVLinear's hook splits wqkv into wq/wk/wv (weight and bias)
    biases = [k for k in sd if k.endswith(("wq.bias", "wk.bias", "wv.bias"))]
    assert len(biases) == 3 * c.spec.model.n_layers
    for adapter in (Llama3StateDictAdapter, Qwen3StateDictAdapter):
        hf = adapter(cfg.model_spec.model, None).to_hf(sd)
        assert "model.layers.0.self_attn.q_proj.weight" in hf
        assert not [k for k in hf if k.endswith("bias")], adapter.__name__


def test_init_hf_job_loads_through_config_manager(tmp_path):
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    from llmc.emit.torchtitan import render_torchtitan

    hf_dir = tmp_path / "models" / "llama"
    hf_dir.mkdir(parents=True)
    c = compiled_example("tiny_cpu")
    cfg = load_job(write_build(_with(c, init_hf=str(hf_dir)), tmp_path / "abs"))
    ck = cfg.checkpoint
    assert (ck.initial_load_path, ck.initial_load_in_hf, ck.initial_load_model_only) == (str(hf_dir), True, True)
    assert cfg.model_spec.state_dict_adapter is Llama3StateDictAdapter
    # relative to the spec's folder, written relative to the build directory: loads from any cwd
    build = tmp_path / "build"
    rel = dataclasses.replace(_with(c, init_hf="../models/llama"), spec_path="../specs/t.yaml")  # as build records it
    for name, text in render_torchtitan(rel, strict=True).items():
        (build / name).parent.mkdir(parents=True, exist_ok=True)
        (build / name).write_text(text)
    assert "INIT_HF = '../models/llama'" in (build / "torchtitan" / "llmc_job.py").read_text()
    assert load_job(build / "torchtitan" / "llmc_job.py").checkpoint.initial_load_path == str(hf_dir)


def test_init_hf_checkpoint_gives_torchtitan_the_same_model(tmp_path):
    """What the job's initial HF load does, in one process: llmc's runtime model exported to Hugging Face
    format (llmc.runtime.hf_io.export_hf), read back through the job's own state-dict adapter into the model
    torchtitan builds from the job: every key matches and the logits equal llmc's."""
    import torch
    from safetensors.torch import load_file

    from llmc.runtime.hf_io import export_hf
    from llmc.runtime.model import build_model
    from llmc.runtime.titan_cpu_shim import swap_flex_for_sdpa

    c = compiled_example("tiny_cpu")
    arch = c.spec.model
    ref = build_model(arch, "cpu", seed=0).eval()
    hf = tmp_path / "hf"
    export_hf(ref.state_dict(), arch, hf, dtype=torch.float32)
    cfg = load_job(write_build(_with(c, init_hf=str(hf)), tmp_path / "build"))
    assert cfg.checkpoint.initial_load_path == str(hf) and cfg.checkpoint.initial_load_in_hf
    swap_flex_for_sdpa(cfg)  # CPU: no flex-attention block masks
    m = cfg.model_spec.model
    model = m.build()
    model.init_states(buffer_device=torch.device("cpu"))
    hf_sd = {}
    for f in sorted(hf.glob("*.safetensors")):
        hf_sd.update(load_file(f))
    res = model.load_state_dict(cfg.model_spec.state_dict_adapter(m, str(hf)).from_hf(hf_sd), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    x = torch.randint(0, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x)
        got = model.eval()(x)
    want = want[0] if isinstance(want, tuple) else want
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


# --------------------------------------------------------------------------------------------- 2


def test_bad_values_are_rejected_by_torchtitan(tmp_path, capsys):
    from torch.distributed.pipelining.schedules import get_schedule_class

    module = write_build(compiled_example("llama3_405b_h100x16384"), tmp_path)  # pp > 1 in its plan
    ok = load_job(module)
    assert ok.parallelism.pipeline_parallel_degree > 1
    with pytest.raises(SystemExit):  # tyro: not one of the Literal choices
        load_job(module, extra=("--lr_scheduler.decay_type", "exponential"))
    with pytest.raises(SystemExit):
        load_job(module, extra=("--training.dtype", "float16"))
    with pytest.raises(SystemExit):  # unknown field
        load_job(module, extra=("--training.bogus", "1"))
    capsys.readouterr()
    with pytest.raises(SystemExit):  # Trainer.Config.__post_init__ ValueError, reported by tyro
        load_job(module, extra=("--training.no-disable-cuda-graphs",))
    assert "CUDA graphs do not support pipeline parallelism" in capsys.readouterr().err
    # pipeline_parallel_schedule is a plain str in the config; torchtitan resolves it with torch's
    # get_schedule_class when it builds the pipeline: every emitted name resolves, a typo does not.
    for name in EXAMPLES:
        get_schedule_class(compiled_example(name).plan.pp_schedule)
    with pytest.raises(ValueError):
        get_schedule_class("Interleaved1F1F")
    # a module that is not a job at all
    bad = tmp_path / "torchtitan" / "llmc_bad.py"
    bad.write_text(module.read_text().replace("def job():", "def job(x):"))
    with pytest.raises(TypeError):
        load_job(bad)


# --------------------------------------------------------------------------------------------- 3


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_titan")
    c = compiled_example("tiny_cpu")
    module = write_build(c, out)
    # 600 documents (~45k words): the runs below read at most 8 steps x 8 x 128 tokens (validation off)
    make_assets(out / "run", c.spec.model.vocab_size, n_docs=600, names=[s.name for s in c.spec.data.sources])
    return module, out / "run", c


# the runs of the tiny example on its trainer: 8 sequences per step instead of the example's 32 and no validation
# (no check reads it): a quarter of the compute, the same code paths (checkpoints, preemption, resume, FSDP)
SMALL_STEP = ["--training.global_batch_size", "8", "--validator.no-enable"]


def _preempt_after(argv, env, cwd, step: int, send=None, timeout: float = 600) -> tuple[int, str]:
    """Run ``argv`` in its own session and, once the log shows training step ``step``, call ``send(pid)``
    (default: SIGTERM to every process of the session, as a preempting Slurm does); (exit status, log)."""
    import signal

    proc = subprocess.Popen(argv, env={**os.environ, **env}, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            m = STEP.search(ANSI.sub("", line))
            if m and int(m.group(1)) >= step:
                (send or (lambda pid: os.killpg(pid, signal.SIGTERM)))(proc.pid)
                break
        rest, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, ANSI.sub("", "".join(lines) + rest)


def test_tiny_trains_on_cpu_one_process_and_resumes_after_preemption(tiny_build, tmp_path):
    """8 steps uninterrupted; the same job SIGTERMed after step 2 with no interval checkpoint due saves the
    step it is at (full state: torchtitan resumes from it), and the rerun ends on the uninterrupted losses."""
    from llmc.runtime.titan_launch import torchtitan_command

    module, run, c = tiny_build
    extra = ["--training.steps", "8", "--checkpoint.interval", "4", "--metrics.log_freq", "1",
             "--training.local_batch_size", "8", *SMALL_STEP]
    argv, env = torchtitan_command(module, 1, True, extra, run_dir=run)
    rc, log, dt = run_logged(argv, env, run)
    assert rc == 0, log[-3000:]
    got = losses(log)
    assert sorted(got) == list(range(1, 9)), log[-2000:]
    assert all(math.isfinite(v) for v in got.values())
    assert got[8] < got[1] - 0.3, got  # from ~ln(vocab) down
    assert "Model llama3 llmc-tiny" in log and "Training completed" in log
    assert "Optimizer AdamW (model_part=0)" in log and "weight_decay': 0.0" in log
    # torch's notice about torchao's enums (torchtitan imports torchao) is silenced by the shim, llmc.runtime.quiet
    assert "KernelPreference" not in log and "ScaleCalculationMode" not in log, log[:3000]
    assert (run / "outputs" / "torchtitan" / "checkpoints" / "step-8").is_dir()

    run2 = tmp_path / "run2"  # same tokenizer and data, its own checkpoints
    run2.mkdir()
    for d in ("assets", "data"):
        (run2 / d).symlink_to(run / d, target_is_directory=True)
    extra2 = ["--training.steps", "8", "--checkpoint.interval", "100", "--metrics.log_freq", "1",
              "--training.local_batch_size", "8", *SMALL_STEP]
    argv, env = torchtitan_command(module, 1, True, extra2, run_dir=run2)
    rc, log1 = _preempt_after(argv, env, run2, step=2)
    m = re.search(r"preempted \(signal 15\): saved step (\d+); rerun", log1)
    assert m and rc != 0, log1[-3000:]
    cut = int(m.group(1))
    assert 2 <= cut < 8 and "Training completed" not in log1, log1[-3000:]
    ckpts = run2 / "outputs" / "torchtitan" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{cut}"]  # the step it was at, no interval one
    rc, log2, _ = run_logged(argv, env, run2)  # the same command resumes there
    assert rc == 0, log2[-3000:]
    assert f"Training starts at step {cut + 1}" in log2
    again = losses(log2)
    assert sorted(again) == list(range(cut + 1, 9))
    assert again == {s: got[s] for s in again}, (got, again)  # as if never interrupted
    print(f"tiny 1 proc: {dt:.1f}s, losses {got}, preempted at {cut}")


def _worker_of_rank(torchrun_pid: int, rank: int, timeout: float = 120):
    """The torchrun worker process whose RANK is ``rank``."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.Process(torchrun_pid).children(recursive=True):
            try:
                if p.environ().get("RANK") == str(rank):
                    return p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under pid {torchrun_pid}")


def test_tiny_trains_on_cpu_two_gloo_processes_fsdp_and_preempts_together(tiny_build, tmp_path):
    """FSDP over 2 gloo ranks trains; a SIGTERM to rank 1 only (nothing due by the interval) makes BOTH ranks
    save the same step (they agree by an all-reduce at the step boundary) and exit 75."""
    import signal

    from llmc.runtime.titan_launch import torchtitan_command

    module, run, c = tiny_build
    run2 = tmp_path / "run2"
    run2.mkdir()
    (run2 / "assets").symlink_to(run / "assets", target_is_directory=True)
    (run2 / "data").symlink_to(run / "data", target_is_directory=True)
    extra = ["--training.steps", "8", "--metrics.log_freq", "1", "--checkpoint.interval", "100",
             "--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "4", *SMALL_STEP]
    argv, env = torchtitan_command(module, 2, True, extra, run_dir=run2)
    t = time.time()
    rc, log = _preempt_after(argv, env, run2, step=2,
                             send=lambda pid: _worker_of_rank(pid, 1).send_signal(signal.SIGTERM))
    dt = time.time() - t
    assert "dp_shard=2" in log
    said = re.findall(r"preempted \(signal (15|on another rank)\): saved step (\d+); rerun", log)
    assert sorted(w for w, _ in said) == ["15", "on another rank"], log[-3000:]  # rank 1 got it, rank 0 agreed
    cut = int(said[0][1])
    assert said[1][1] == str(cut) and 2 <= cut < 8, said
    assert rc != 0 and "exitcode  : 75" in log, log[-3000:]  # torchrun reports the workers' 75
    assert sorted(p.name for p in (run2 / "outputs" / "torchtitan" / "checkpoints").iterdir()) == [f"step-{cut}"]
    got = losses(log)
    assert sorted(got) == list(range(1, cut + 1)) and all(math.isfinite(v) for v in got.values()), log[-2000:]
    assert got[cut] < got[1], got
    print(f"tiny 2 procs FSDP: {dt:.1f}s, losses {got}, preempted at {cut}")


def write_parquet_source(d: Path, docs: list[str], files: int = 2, row_group: int = 16, column: str = "body") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    per = math.ceil(len(docs) / files)
    for f in range(files):
        part = docs[f * per:(f + 1) * per]
        pq.write_table(pa.table({"id": list(range(len(part))), column: part}), d / f"part-{f}.parquet",
                       row_group_size=row_group)
    return d


def _tiny_family_build(tmp_path, model, plan):
    """A tiny job of another model family reading a local parquet folder in place."""
    from test_torchtitan_render import TINY, compiled_for  # tests/ is on sys.path under pytest

    model = {**TINY, **model}
    src = tmp_path / "corpus"
    data = {"seq_len": 64, "tokens": 1e6,
            "sources": [{"name": "web", "path": str(src), "format": "parquet", "text_field": "body"}]}
    c = compiled_for(model=model, plan=plan, gpu="cpu", seq=64, steps=8, lr=3e-3, warmup=1, data=data)
    module = write_build(c, tmp_path)
    docs = make_assets(tmp_path / "run", c.spec.model.vocab_size, names=())
    write_parquet_source(src, docs)
    return module, tmp_path / "run"


def _import_job(module: Path):
    import importlib

    sys.path.insert(0, str(module.parent))
    sys.modules.pop(module.stem, None)
    try:
        return importlib.import_module(module.stem)
    finally:
        sys.path.remove(str(module.parent))
        sys.modules.pop(module.stem, None)


def test_job_streams_the_same_heldout_split_as_llmc(tmp_path, monkeypatch):
    """The job's datasets read each source in place (parquet folder, JSONL with blank lines, text files, a
    `datasets` save_to_disk folder) and hold out exactly the documents llmc's own streams hold out; the
    training part, split by rank as torchtitan does (split_dataset_by_node), is the rest, once. Its validation
    documents are every held-out document once, in the order of llmc's validation set (the sources interleaved
    by weight, llmc.runtime.validation.validation_documents), not one source after the other."""
    datasets = pytest.importorskip("datasets")
    from datasets.distributed import split_dataset_by_node
    from test_torchtitan_render import TINY, compiled_for

    from llmc.runtime.data import SourceData
    from llmc.runtime.stream import documents
    from llmc.runtime.tokenizer import TextTokenizer
    from llmc.runtime.validation import validation_documents

    docs = [f"doc {i} " + "word " * (i % 7) for i in range(120)]
    src = tmp_path / "src"
    write_parquet_source(src / "pq", docs, files=3, row_group=10)
    (src / "js").mkdir(parents=True)
    for f in range(2):
        with open(src / "js" / f"p{f}.jsonl", "w") as fh:
            for i in range(f * 60, f * 60 + 60):
                fh.write(json.dumps({"text": docs[i]}) + ("\n\n" if i % 13 == 0 else "\n"))
    (src / "tx").mkdir()
    for i, d in enumerate(docs[:40]):
        (src / "tx" / f"{i:03d}.txt").write_text(d)
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(src / "hf"), num_shards=3)
    specs = [("pq", "parquet", "body"), ("js", "jsonl", "text"), ("tx", "text", "text"), ("hf", "parquet", "content")]
    weights = (4, 3, 2, 1)
    data = {"seq_len": 64, "tokens": 1e6, "sources": [
        {"name": n, "path": str(src / n), "format": f, "text_field": t, "weight": w}
        for (n, f, t), w in zip(specs, weights, strict=True)]}
    c = compiled_for(model=TINY, plan=None, gpu="cpu", data=data,
                     eval={"validation": {"fraction": 0.2, "seed": 11, "every_steps": 4, "max_batches": 1}})
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    job = _import_job(write_build(c, tmp_path / "b"))
    assert [s["path"] for s in job.DATA_SOURCES] == [str(src / n) for n, _, _ in specs]  # in place
    all_val, val_srcs = [], []
    for i, (n, f, t) in enumerate(specs):
        fmt = "hf" if n == "hf" else f
        val_srcs.append(SourceData(n, str(src / n), fmt, t, float(weights[i]), ("val", 0.2, 11)))
        ours = [list(documents(SourceData(n, str(src / n), fmt, t, 1.0, (part, 0.2, 11)))) for part in ("val", "train")]
        ds = job._source_dataset(job.DATA_SOURCES[i], "val")
        theirs = [r["text"] for r in ds]
        assert theirs == ours[0] and 3 <= len(theirs) < len(ours[1]), n
        all_val += theirs
        train = job._source_dataset(job.DATA_SOURCES[i], "train")
        per_rank = [[r["text"] for r in split_dataset_by_node(train, rank=r, world_size=2)] for r in range(2)]
        assert sorted(per_rank[0] + per_rank[1]) == sorted(ours[1]), n
        assert not set(per_rank[0]) & set(per_rank[1])
    # the validation documents, interleaved with token counts of the tokenizer in the folder it is given
    tok_dir = tmp_path / "tok" / "assets"
    make_assets(tok_dir.parent, 600, n_docs=60, names=())
    theirs = [job._sample_text(r) for r in job._validation_dataset(str(tok_dir))]
    assert sorted(theirs) == sorted(all_val) and theirs != all_val  # each held-out document once, interleaved
    tok = TextTokenizer(tok_dir)
    want = [ids for _, ids in validation_documents(val_srcs, tok)]
    assert [tok.encode(d) for d in theirs] == want
    even = [dataclasses.replace(s, weight=1.0) for s in val_srcs]  # the weights set the order
    assert [ids for _, ids in validation_documents(even, tok)] != want
    assert not list((tmp_path / "b").rglob("*.jsonl")) and not list((tmp_path / "hf_cache").rglob("*.arrow"))


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk"])
def test_job_dataset_resumes_exactly_through_torchtitan_state(kind, tmp_path, monkeypatch):
    """torchtitan's HuggingFaceTextDataset over the job's streamed training part (rank 1 of 2, held-out
    documents skipped): its state_dict, restored into a fresh dataset, continues with the same windows,
    within the first pass and after re-looping."""
    import copy

    datasets = pytest.importorskip("datasets")
    from test_torchtitan_render import TINY, compiled_for
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    docs = make_assets(tmp_path / "b" / "run", 600, n_docs=40, names=())
    if kind == "parquet":
        write_parquet_source(tmp_path / "src", docs, files=2, row_group=8)
    else:
        datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "src"), num_shards=2)
    data = {"seq_len": 64, "tokens": 1e6,
            "sources": [{"name": "web", "path": str(tmp_path / "src"), "format": "parquet", "text_field": "body"}]}
    c = compiled_for(model=TINY, plan=None, gpu="cpu", data=data,
                     eval={"validation": {"fraction": 0.2, "seed": 1, "every_steps": 4, "max_batches": 1}})
    monkeypatch.setenv("LLMC_RUN_DIR", str(tmp_path / "b" / "run"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    _import_job(write_build(c, tmp_path / "b"))  # registers llmc_train_0
    tok = HuggingFaceTokenizer(tokenizer_path=str(tmp_path / "b" / "run" / "assets"))

    def dataset():
        return HuggingFaceTextDataset("llmc_train_0", None, tok, seq_len=64, dp_rank=1, dp_world_size=2, infinite=True)

    for n in (5, 60):  # 60 windows: past the end of the rank's share (re-looped)
        ds = dataset()
        it = iter(ds)
        for _ in range(n):
            next(it)
        state = copy.deepcopy(ds.state_dict())  # torchtitan's buffers are live lists
        want = [next(it)[1].tolist() for _ in range(15)]
        resumed = dataset()
        resumed.load_state_dict(state)
        got = [y.tolist() for (_, y), _ in zip(resumed, range(15), strict=False)]
        assert got == want, (kind, n)
    assert ds._epoch >= 1  # the second case did re-loop


def test_job_tokenizer_reads_special_token_strings_in_documents_as_text(tmp_path, monkeypatch):
    """A document quoting "<|end_of_text|>" gets no EOS id inside it from the job's tokenizer (the one its
    Trainer.Config builds), in training (torchtitan's HuggingFaceTextDataset: BOS, the text, EOS) and in the
    validation stream; the text's ids are the ones llmc's own trainers read (TextTokenizer)."""
    from test_torchtitan_render import TINY, compiled_for
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    from llmc.runtime.tokenizer import TextTokenizer

    assets = tmp_path / "b" / "run" / "assets"
    make_assets(tmp_path / "b" / "run", 600, n_docs=40, names=())
    quoted = "the model trains <|end_of_text|> on <|begin_of_text|> tokens"
    (tmp_path / "src.jsonl").write_text((json.dumps({"text": quoted}) + "\n") * 3)
    data = {"seq_len": 16, "tokens": 1e6, "sources": [{"name": "web", "path": str(tmp_path / "src.jsonl"),
                                                       "format": "jsonl", "text_field": "text"}]}
    c = compiled_for(model=TINY, plan=None, gpu="cpu", data=data,
                     eval={"validation": {"files": [str(tmp_path / "src.jsonl")], "every_steps": 4, "max_batches": 1}})
    monkeypatch.setenv("LLMC_RUN_DIR", str(tmp_path / "b" / "run"))
    job = _import_job(write_build(c, tmp_path / "b"))
    tok = job.job_without_converters().tokenizer.build(tokenizer_path=str(assets))
    bos, eos = tok.bos_id, tok.eos_id
    want = TextTokenizer(assets).encode(quoted)
    assert eos not in want and bos not in want and len(want) > 10  # the quoted strings are spelled out as bytes

    ds = HuggingFaceTextDataset("llmc_train_0", None, tok, seq_len=16, dp_rank=0, dp_world_size=1, infinite=False)
    windows = list(ds)  # consecutive windows: the first input token, then every window's labels
    stream = [int(windows[0][0]["input"][0])] + [t for _, y in windows for t in y.tolist()]
    assert len(stream) >= len(want) + 2 and stream[:len(want) + 2] == [bos, *want, eos]
    from test_validation_format import job_llmc_stream

    assert job_llmc_stream(job, tok, len(want) + 1) == [*want, eos]


STREAM_SPEC = """
name: stream-titan
model: tiny
hardware: {gpu: cpu, count: 1}
data:
  sources:
    - {name: web, path: corpus/web, format: parquet, text_field: body, weight: 0.7}
    - {name: wiki, path: corpus/wiki, format: parquet, text_field: content, weight: 0.3}
  tokenizer: {train: true, vocab_size: 2048}
  seq_len: 64
  tokens: 4096
training:
  backend: torchtitan
  precision: fp32
  global_batch_tokens: 512
  optimizer: {lr: 3.0e-3}
  checkpoint: {interval_steps: 100}
  log_every: 1
eval:
  validation: {fraction: 0.1, every_steps: 4, max_batches: 2}
"""


def test_launch_prepare_and_torchtitan_stream_parquet_and_hf_dataset_in_place(tmp_path, monkeypatch):
    """`llmc build` + `llmc launch --backend torchtitan`'s prepare step + the job on CPU: a local parquet
    folder and a local `datasets` save_to_disk folder are streamed where they lie (training skips the
    held-out documents, the validator reads them); the build holds no copy of either."""
    datasets = pytest.importorskip("datasets")
    from typer.testing import CliRunner

    from llmc.cli import app
    from llmc.launch import launch_commands
    from llmc.runtime.entry import main as entry_main
    from llmc.runtime.titan_launch import torchtitan_command

    rng = random.Random(1)
    words = "the model trains on tokens and the loss falls as shards reduce gradients".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(30, 90))) for _ in range(400)]
    write_parquet_source(tmp_path / "corpus" / "web", docs[:240], files=3, row_group=20)
    datasets.Dataset.from_dict({"content": docs[240:]}).save_to_disk(str(tmp_path / "corpus" / "wiki"), num_shards=2)
    (tmp_path / "spec.yaml").write_text(STREAM_SPEC)
    b = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", str(tmp_path / "spec.yaml"), "-o", str(b)])
    assert r.exit_code == 0, r.output
    cmds = launch_commands(b, backend="torchtitan", nproc=1, gpu=False)
    prep = cmds[0]
    assert prep.stage == "prepare" and "--jsonl" not in prep.argv and not prep.env
    # the prepare step's own entry point, in this process (`python -m llmc.runtime.entry prepare --lock ...`)
    assert prep.argv[1:3] == ["-m", "llmc.runtime.entry"]
    monkeypatch.chdir(prep.cwd)
    assert entry_main(prep.argv[3:]) in (0, None)
    assets = json.loads((b / "assets" / "assets.json").read_text())
    assert [(s["path"], s["holdout"]) for s in assets["sources"]] == [
        (str(tmp_path / "corpus" / n), ["train", 0.1, 0]) for n in ("web", "wiki")]

    module = b / "torchtitan" / "llmc_job.py"
    argv, env = torchtitan_command(module, 1, True, ["--training.steps", "8", "--metrics.log_freq", "1",
                                                     "--checkpoint.no-enable"], run_dir=b)
    rc, log, dt = run_logged(argv, {**env, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}, b)
    assert rc == 0, log[-3000:]
    train_log = "\n".join(ln for ln in log.splitlines() if "validate step" not in ln)
    got = losses(train_log)
    assert sorted(got) == list(range(1, 9)) and all(math.isfinite(v) for v in got.values()), log[-2000:]
    val = {int(s): float(x) for s, x in re.findall(r"validate step:\s+(\d+)\s+loss:\s+([0-9.]+)", log)}
    assert 4 in val and 8 in val and all(math.isfinite(x) for x in val.values()), log[-2000:]
    # nothing copied: no data file in the build or the datasets cache, data/ holds only small records
    # not logs: torchtitan's outputs/, the stages' run/ (metrics.jsonl)
    files = [f for f in b.rglob("*") if f.is_file() and not {"outputs", "run"} & set(f.relative_to(b).parts)]
    assert not [f for f in files if f.suffix in (".jsonl", ".parquet", ".arrow")], files
    assert not [f for f in (tmp_path / "hf_cache").rglob("*") if f.suffix == ".arrow"]
    assert all(f.stat().st_size < 16_384 for f in (b / "data").rglob("*") if f.is_file())
    print(f"torchtitan streamed parquet + save_to_disk: {dt:.1f}s, losses {got}, validation {val}")


def test_tiny_moe_qwen3_family_expert_parallel_two_gloo_processes(tmp_path):
    """GQA + MoE (Mixtral-style, emitted on torchtitan's qwen3 block): dp_shard 2 x ep 2 on gloo."""
    from llmc.compiler.plan import ParallelPlan
    from llmc.runtime.titan_launch import torchtitan_command

    module, run = _tiny_family_build(tmp_path, {"moe": {"num_experts": 4, "top_k": 2}},
                                     ParallelPlan(dp_shard=2, ep=2, micro_batch=4))
    assert "Qwen3TransformerBlock.Config(" in module.read_text()
    argv, env = torchtitan_command(module, 2, True, ["--metrics.log_freq", "1", "--checkpoint.no-enable"],
                                   run_dir=run)
    rc, log, dt = run_logged(argv, env, run)
    assert rc == 0, log[-3000:]
    assert "dp_shard=2, cp=1, tp=1, ep=2" in log and "Model qwen3 llmc-tiny" in log
    got = losses(log)
    assert sorted(got) == list(range(1, 9)) and all(math.isfinite(v) for v in got.values()), log[-2000:]
    assert got[8] < got[1], got
    print(f"tiny MoE dp2 x ep2: {dt:.1f}s, losses {got}")


def test_tiny_mla_moe_deepseek_family_one_process(tmp_path):
    """MLA + MoE with a shared expert, a dense first layer and sigmoid routing (DeepSeek-V3-style)."""
    from llmc.compiler.plan import ParallelPlan
    from llmc.runtime.titan_launch import torchtitan_command

    model = {"n_kv_heads": 4,
             "moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "dense_layers": 1,
                     "score_func": "sigmoid", "expert_bias": True},
             "mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16}}
    module, run = _tiny_family_build(tmp_path, model, ParallelPlan(micro_batch=4))
    argv, env = torchtitan_command(module, 1, True, ["--metrics.log_freq", "1", "--checkpoint.no-enable"],
                                   run_dir=run)
    rc, log, dt = run_logged(argv, env, run)
    assert rc == 0, log[-3000:]
    assert "Model deepseek_v3 llmc-tiny" in log
    got = losses(log)
    assert sorted(got) == list(range(1, 9)) and all(math.isfinite(v) for v in got.values()), log[-2000:]
    assert got[8] < got[1], got
    print(f"tiny MLA+MoE: {dt:.1f}s, losses {got}")


@pytest.mark.parametrize("layout", ["pp2_interleaved", "tp2"])
def test_tiny_llama_pipeline_or_tensor_parallel_two_gloo_processes(layout, tmp_path):
    """The emitted PP mapping (local batch = micro-batches per step, pipeline micro-batch size, 3 stages
    per rank for Interleaved1F1B: 6 stages for the 4 blocks, the first of only the embedding, the last of only
    the norm and head; CUDA graphs off) and TP degree run in torchtitan on 2 gloo ranks."""
    from llmc.compiler.plan import ParallelPlan
    from llmc.runtime.titan_launch import torchtitan_command

    plan = {"pp2_interleaved": ParallelPlan(pp=2, pp_schedule="Interleaved1F1B", pp_virtual_stages=3,
                                            micro_batch=2, grad_accum=2),
            "tp2": ParallelPlan(tp=2, micro_batch=4)}[layout]
    module, run = _tiny_family_build(tmp_path, {}, plan)
    if layout == "pp2_interleaved":
        assert "[['tok_embeddings'], ['layers.0'], ['layers.1'], ['layers.2'], ['layers.3'], ['norm', 'lm_head']]" \
            in module.read_text()
    argv, env = torchtitan_command(module, 2, True, ["--metrics.log_freq", "1", "--checkpoint.no-enable"],
                                   run_dir=run)
    rc, log, dt = run_logged(argv, env, run)
    assert rc == 0, log[-3000:]
    mesh = {"pp2_interleaved": "pp=2, dp_replicate=1, dp_shard=1, cp=1, tp=1", "tp2": "dp_shard=1, cp=1, tp=2"}
    assert mesh[layout] in log
    got = losses(log)  # with PP only the last stage's rank logs a loss
    assert sorted(got) == list(range(1, 9)) and all(math.isfinite(v) for v in got.values()), log[-2000:]
    assert got[8] < got[1], got
    print(f"tiny {layout}: {dt:.1f}s, losses {got}")


# --------------------------------------------------------------------------------------------- 4


def test_fake_backend_dry_run_llama3_8b_64_ranks(tmp_path):
    """llama3-8b laid out dp_shard 8 x tp 8 on 64 simulated ranks: rank 0 builds the real mesh, applies
    TP + FSDP and runs one step with fake collectives. Two of its 32 layers (every shape of the 8B kept: 4096 wide,
    32 / 8 heads, FFN 14336, vocabulary 128256) and short sequences keep the CPU step small: a CPU DTensor draws
    each initial weight whole before it keeps its shard, ~45 s for all 8B (the 32-layer count is checked against
    the published one on the meta device in test_published_sizes_through_torchtitan)."""
    from llmc.runtime.titan_launch import dry_run_command

    c = compiled_example("llama3_8b_h100x8")
    accum = c.hyper.global_batch_seqs // (8 * c.plan.micro_batch)
    c = dataclasses.replace(c, plan=dataclasses.replace(c.plan, dp_shard=8, tp=8, dp_replicate=1, pp=1, cp=1,
                                                        grad_accum=accum))
    assert c.plan.world == 64 and c.plan.global_batch_seqs == c.hyper.global_batch_seqs
    docs = make_assets(tmp_path / "run", c.spec.model.vocab_size, n_docs=50, names=())
    local = []  # the example's sources (/data/...) stand in by small local files of the same formats
    for s in c.spec.data.sources:
        d = tmp_path / "corpus" / s.name
        if s.format == "parquet":
            write_parquet_source(d, docs, column=s.text_field)
        else:
            d.mkdir(parents=True)
            (d / "a.jsonl").write_text("".join(json.dumps({s.text_field: t}) + "\n" for t in docs))
        local.append(s.model_copy(update={"path": str(d)}))
    arch = c.spec.model
    spec = c.spec.model_copy(update={"model": arch.model_copy(update={"n_layers": 2}),
                                     "data": c.spec.data.model_copy(update={"sources": local})})
    c = dataclasses.replace(c, spec=spec)
    module = write_build(c, tmp_path)
    src = module.read_text()
    assert "tensor_parallel_degree=8" in src and "data_parallel_shard_degree=8" in src
    argv, env = dry_run_command(module, 64, ["--training.seq_len", "32", "--training.local_batch_size", "1",
                                             "--training.global_batch_size", "-1"], run_dir=tmp_path / "run")
    rc, log, dt = run_logged(argv, env, tmp_path, timeout=900)
    rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    assert rc == 0, log[-3000:]
    assert "Building device mesh with parallelism: pp=1, dp_replicate=1, dp_shard=8, cp=1, tp=8" in log
    # Llama-3.1-8B's parameters (8,030,261,248 at 32 layers: the model card's 8.03B), counted by hand at 2 layers
    d, f, v = arch.d_model, arch.d_ff, arch.vocab_size
    kv = (arch.n_kv_heads or arch.n_heads) * (arch.head_dim or d // arch.n_heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q, o; k, v; SwiGLU; two norms
    assert 2 * v * d + 32 * per_layer + d == 8_030_261_248
    assert f"{2 * v * d + 2 * per_layer + d:,} total parameters" in log
    got = losses(log)
    assert list(got) == [1] and math.isfinite(got[1]), log[-2000:]
    print(f"fake-backend 8B (2 of its layers) x64: {dt:.1f}s, max child RSS {rss_gib:.1f} GiB, loss {got[1]}")


# --------------------------------------------------------------------------------------------- 5


def test_pipeline_parallel_pretraining_then_midtrain_launches_end_to_end(tmp_path):
    """`llmc build` + `llmc launch` of pre-training on a pipeline-parallel layout (torchtitan, pp 2 on 2 gloo
    processes) followed by a midtrain stage, which runs as its own torchtitan job on the layout the compiler searched
    for it (llmc_job_stage1.py), started from the pre-training stage's Hugging Face export: the job loads it through
    torchtitan's state-dict adapter, trains the stage's 3 steps at the stage's batch, writes its checkpoints to its own
    dump folder and ends, as every stage does, with its own export."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("""\
name: pp-then-mid
model: tiny
hardware: {gpu: cpu, count: 2}
data:
  sources: [{name: python-docs, format: builtin}]
  tokenizer: {train: true, vocab_size: 2048}
  seq_len: 64
  tokens: 20480
training:
  precision: fp32
  global_batch_tokens: 1024
  backend: torchtitan
  optimizer: {lr: 3.0e-3}
  log_every: 1
parallelism: {pp: 2}
stages:
  - {name: pre, kind: pretrain}
  - {name: mid, kind: midtrain, init_from: pre, steps: 3, lr: 1.0e-3}
""")
    from typer.testing import CliRunner

    from llmc.cli import app

    env = dict(os.environ, **OFFLINE)
    llmc = [sys.executable, "-c", "from llmc.cli import main; main()"]
    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", str(spec), "-o", str(out)])  # (the build runs no process)
    assert r.exit_code == 0, r.output
    lock = json.loads((out / "plan.lock.json").read_text())
    assert lock["plan"]["pp"] == 2 and lock["backend"]["name"] == "torchtitan"
    mid_plan = lock["stages"][1]["layout"]
    assert mid_plan["micro_batch"] * mid_plan["grad_accum"] * mid_plan["dp_shard"] * mid_plan["dp_replicate"] == 16
    assert (out / "torchtitan" / "llmc_job_stage1.py").is_file()
    t0 = time.time()
    logs = {}
    for stage in ("pre", "mid"):  # one launch per stage: each job's log on its own
        r = subprocess.run([*llmc, "launch", str(out), "--nproc", "2", "--stage", stage], capture_output=True,
                           text=True, env=env, timeout=900)
        logs[stage] = ANSI.sub("", r.stdout + r.stderr)
        assert r.returncode == 0, logs[stage][-4000:]
    assert (out / "run" / "pre" / "hf" / "config.json").is_file() and (out / "run" / "mid" / "hf" / "config.json").is_file()
    assert (out / "outputs" / "torchtitan-mid" / "checkpoints" / "step-3").is_dir()
    mid_log = logs["mid"]
    assert "--module llmc_job_stage1" in mid_log
    assert f"initial_load_path: {out.resolve() / 'run' / 'pre' / 'hf'}" in mid_log, mid_log[:3000]
    degrees = ", ".join(f"{k}={mid_plan[k]}" for k in ("dp_replicate", "dp_shard", "cp", "tp"))
    assert f"pp={mid_plan['pp']}, {degrees}" in mid_log
    got = losses(mid_log)
    assert sorted(got) == [1, 2, 3], mid_log[-3000:]
    # from the pre-trained weights: well below a random model's ln(2048) = 7.62 nats
    assert got[1] < math.log(2048) - 0.8, got
    print(f"pp2 pretrain + midtrain (own torchtitan job): {time.time() - t0:.1f}s, midtrain losses {got}")
    # a relaunch skips both stages (each torchtitan job's by its export: it writes no DONE.json)
    r = subprocess.run([*llmc, "launch", str(out), "--nproc", "2"], capture_output=True, text=True, env=env,
                       timeout=300)
    out_text = r.stdout + r.stderr
    assert r.returncode == 0 and out_text.count("already finished and exported") == 2, out_text[-3000:]

    # a pipeline that continues that model (no pre-training stage): its build is the stage's torchtitan job alone,
    # which `llmc launch` runs by default, from the checkpoint the stage names
    base = out.resolve() / "run" / "pre" / "hf"
    spec2 = tmp_path / "continue.yaml"
    spec2.write_text(spec.read_text().replace("{train: true, vocab_size: 2048}", f"{{path: '{base}'}}")
                     .replace("  - {name: pre, kind: pretrain}\n", "")
                     .replace("init_from: pre", f"init_hf: '{base}'").replace("parallelism: {pp: 2}\n", ""))
    out2 = tmp_path / "b2"
    r = CliRunner().invoke(app, ["build", str(spec2), "-o", str(out2)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out2 / "torchtitan").glob("*.py")) == ["llmc_job_stage0.py"]
    r = subprocess.run([*llmc, "launch", str(out2), "--nproc", "2"], capture_output=True, text=True, env=env,
                       timeout=900)
    log2 = ANSI.sub("", r.stdout + r.stderr)
    assert r.returncode == 0, log2[-4000:]
    assert "--module llmc_job_stage0" in log2 and f"initial_load_path: {base}" in log2, log2[:3000]
    got2 = losses(log2)
    assert sorted(got2) == [1, 2, 3] and got2[1] < math.log(2048) - 0.8, got2
    assert (out2 / "run" / "mid" / "hf" / "config.json").is_file()
