"""DeepSpeed runner: the committed ds_config runs as written (per-stage file, refused when it is not the stage's
or the world's), ZeRO-3 builds under zero.Init (a rank holds about 1/world of the weights, also at peak),
the init equals an unsharded build, the plan's activation checkpointing is applied, the grad norm is a
number, and a ZeRO-3 run started from a Hugging Face model has transformers' first-step loss and ends with
an HF export. Multi-process runs are 2 gloo ranks on CPU (DS_ACCELERATOR=cpu); all the runs of this module's
tests are cases of one torchrun launch (test_runtime_train's torchrun_cases)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from test_runtime_train import CASES_LOOP, CaseRun, torchrun_cases  # noqa: E402  (the multi-rank launcher)

from llmc.runtime.ds_train import check_config, stage_config_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": str(ROOT)}
ARCH = dict(name="tiny", n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=96, vocab_size=512, max_seq_len=64,
            rope_theta=5000.0, norm_eps=1e-5)


def ds_config(*, zero=3, lr=1e-3, steps=4, micro=2, accum=1, world=2, bf16=False) -> dict:
    return {"_llmc": {"note": "header"}, "train_batch_size": micro * accum * world,
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1, "torch_adam": True}},
            "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": steps, "warmup_num_steps": 1,
                                                               "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1,
                                                               "warmup_type": "linear"}},
            "zero_optimization": {"stage": zero}, "steps_per_print": 1000, "wall_clock_breakdown": False}


def test_config_runs_as_written_or_is_refused(tmp_path):
    job = SimpleNamespace(global_batch_seqs=4, lr=1e-3, steps=4, warmup_steps=1, precision="fp32", stage="mid")
    cfg = ds_config()
    got = check_config(cfg, job, 2)
    assert "_llmc" not in got and {k: v for k, v in cfg.items() if k != "_llmc"} == got  # nothing patched
    with pytest.raises(ValueError, match=r"train_batch_size 4 = micro 2 x accum 1 x 2 processes, but 1 are running"):
        check_config(cfg, job, 1)
    with pytest.raises(ValueError, match=r"not stage 'mid''s config: lr 0.001 != 1e-05; scheduler total_num_steps 4"
                                         r" != 40 .*ds_config.mid.json"):
        check_config(cfg, SimpleNamespace(**{**vars(job), "lr": 1e-5, "steps": 40}), 2)
    with pytest.raises(ValueError, match="bf16 off but the stage trains in bf16"):
        check_config(cfg, SimpleNamespace(**{**vars(job), "precision": "bf16"}), 2)
    with pytest.raises(ValueError, match="train_batch_size 4 != 8 sequences"):
        check_config(cfg, SimpleNamespace(**{**vars(job), "global_batch_seqs": 8}), 2)
    base = tmp_path / "ds_config.json"
    base.write_text("{}")
    assert stage_config_path(base, "mid") == base
    (tmp_path / "ds_config.mid.json").write_text("{}")
    assert stage_config_path(base, "mid") == tmp_path / "ds_config.mid.json"
    assert stage_config_path(base, None) == base


# ----------------------------------------------------------------------------- 2-rank runs


DS_CASES_RUN = r'''
"""Run several cases in one torchrun launch (one process group). A case is llmc.runtime.ds_train's main as a
one-case launch would run it (its lock, the ds_config in the lock's deepspeed/ folder, its out), recording
each rank's main return code and how many times TransformerBlock.forward ran in that case (``result.<rank>.json``
in the case's folder); or, when its lock file is ``build.json`` (the architecture, the ds_config and
``check``), a ZeRO-3 build under zero.Init (``build_zero3_model``), recording each rank's peak resident growth
while it builds, the elements it holds, what is materialised outside the shards and (``check``) whether each
gathered parameter equals an unsharded build's (``result-<rank>.json``). The peak is the growth of the
process's high-water mark (ru_maxrss) from the case's start: what a launch of its own measures only when the
case is the launch's first. main ends the process group as it returns, and a second group does not come up in
the same process under torchrun (torch names it "0" again and its gloo ranks read the first group's addresses
from the launcher's store: "Connection refused"), so before the last case that end is only its barrier: the
ranks still leave each case together, and the group, DeepSpeed's groups and the imports carry over to the
next case."""
import json
import os
import resource
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import llmc.runtime.distributed as distributed
import llmc.runtime.model as M
from llmc.runtime.ds_train import _local_numel, build_zero3_model, init_deepspeed_distributed, main
from llmc.spec.model import Architecture

calls = {"n": 0}
orig = M.TransformerBlock.forward


def counted(self, *a, **k):
    calls["n"] += 1
    return orig(self, *a, **k)


M.TransformerBlock.forward = counted
end_group = distributed.shutdown


def keep_group(together: bool = True) -> None:
    if together:
        dist.barrier()


def build_case(case):
    init_deepspeed_distributed()  # gloo, without DeepSpeed's CPU shm op
    rank = dist.get_rank()
    args = json.loads(Path(case["lock"]).read_text())
    arch = Architecture(**args["arch"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = build_zero3_model(arch, args["cfg"], seed=7, rank=rank)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    local = _local_numel(model)
    full_data = sum(p.data.numel() for p in model.parameters())  # what is materialised outside the shards
    check = {}
    if args["check"]:  # gather and compare with the unsharded build (small models only)
        ref = M.build_model(arch, seed=7).state_dict()
        for n, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                check[n] = bool(torch.equal(p.data, ref[n]))
    res = {"rank": rank, "peak": peak, "local": local, "data": full_data,
           "total": sum(p.ds_numel for p in model.parameters()), "equal": check}
    (Path(case["dir"]) / f"result-{rank}.json").write_text(json.dumps(res))
    dist.barrier()  # the ranks leave the case together


def run_case(case):
    if Path(case["lock"]).name == "build.json":
        build_case(case)
        return
    calls["n"] = 0
    distributed.shutdown = end_group if case["last"] else keep_group
    lock = Path(case["lock"])
    rc = main(["--lock", str(lock), "--ds-config", str(lock.parent / "deepspeed" / "ds_config.json"),
               "--out", case["out"]])
    rank = int(os.environ["RANK"])
    (Path(case["dir"]) / f"result.{rank}.json").write_text(
        json.dumps({"rank": rank, "rc": rc, "block_calls": calls["n"]}))
    if rc != 0:
        raise RuntimeError(f"llmc.runtime.ds_train's main returned {rc} (its message is in stderr)")

''' + CASES_LOOP


def _results(run: CaseRun) -> list[dict]:
    """Each rank's record of ``run`` (``DS_CASES_RUN``), rank 0 first."""
    return [json.loads(f.read_text()) for f in sorted(run.dir.glob("result.*.json"))]


def _build_results(run: CaseRun) -> list[dict]:
    """Each rank's record of a ``build`` case of ``DS_CASES_RUN``, rank 0 first."""
    return [json.loads(f.read_text()) for f in sorted(run.dir.glob("result-*.json"))]


BIG = dict(name="big", n_layers=16, d_model=1024, n_heads=16, n_kv_heads=4, d_ff=2048, vocab_size=2048,
           max_seq_len=64)
HF_SIZE = dict(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2, vocab_size=512,
               max_position_embeddings=64)


def _case_names(test: str, params: dict) -> list[str]:
    """The runs of ``DS_CASES_RUN`` that a test of this module inspects (``params``: its parameters and ``id``)."""
    return {"test_zero3_build_peak_memory_is_a_shard": ["build-big"],
            "test_zero3_build_is_partitioned_and_equals_the_unsharded_init": ["build-small"],
            "test_activation_checkpointing_follows_the_plan": [f"ac-{params.get('id')}"],
            "test_zero3_from_hugging_face_matches_transformers_and_exports": [f"hf-{params.get('kind')}"],
            }.get(test, [])


def _build_case(folder: Path, name: str, params: dict) -> Path:
    """Write case ``name``'s lock (a build case: its JSON arguments) into ``folder``; return its path."""
    if name.startswith("build-"):
        arch = BIG if name == "build-big" else {**ARCH, "tied_embeddings": True}
        f = folder / "build.json"
        f.write_text(json.dumps({"arch": arch, "cfg": ds_config(), "check": name == "build-small"}))
        return f
    if name.startswith("ac-"):
        return _lock(folder, steps=2, ac=params["ac"], zero=params["zero"])
    from test_hf_init import arch_of, make_hf

    kind = params["kind"]  # a run from its own random HF model (``hf-<kind>`` in its folder)
    src = make_hf(folder, kind, seed=3, **HF_SIZE,
                  **{"phi3": {"partial_rotary_factor": 0.5}, "mistral": {"sliding_window": 8}}.get(kind, {}))
    arch = arch_of(src).model_dump(mode="json") if kind != "llama" else None
    return _lock(folder, steps=2, ac="none", init_hf=str(src), arch=arch)


@pytest.fixture(scope="module")
def ds_runs(request, tmp_path_factory) -> dict[str, CaseRun]:
    """Every 2-rank run that this session's tests of this module inspect (``-k`` or node ids narrow them), in one
    torchrun launch of ``DS_CASES_RUN`` (each launch's start-up, seconds of CPU per process, paid once): the
    large ZeRO-3 build first (its peak memory is measured from the process's start-up), then the small build,
    the activation checkpointing runs and the Hugging Face runs (needing transformers). glibc is told to
    return freed blocks above 128 KiB to the OS at once (mallopt M_MMAP_THRESHOLD), so the peak RSS is live
    memory."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        transformers = None
    order = ("build-big", "build-small", "ac-", "hf-")
    wanted: dict[str, dict] = {}
    for it in request.session.items:
        if getattr(it, "module", None) is request.module:
            params = {**it.callspec.params, "id": it.callspec.id} if hasattr(it, "callspec") else {}
            for name in _case_names(getattr(it, "originalname", it.name), params):
                if transformers is not None or not name.startswith("hf-"):
                    wanted.setdefault(name, params)
    root = tmp_path_factory.mktemp("ds_runs")
    locks = {}
    for name in sorted(wanted, key=lambda n: next(i for i, o in enumerate(order) if n.startswith(o))):
        (root / name).mkdir()
        locks[name] = _build_case(root / name, name, wanted[name])
    if not locks:
        return {}
    (root / "launch").mkdir()
    return torchrun_cases(root / "launch", locks, 2, script=DS_CASES_RUN, timeout=300,
                          env={**{k: ENV[k] for k in ("DS_ACCELERATOR", "PYTHONWARNINGS", "PYTHONPATH")},
                               "MALLOC_MMAP_THRESHOLD_": "131072"})


@pytest.mark.slow
def test_zero3_build_is_partitioned_and_equals_the_unsharded_init(ds_runs):
    res = _build_results(ds_runs["build-small"].check())
    assert len(res) == 2
    for r in res:
        assert r["data"] == 0  # every parameter is a placeholder outside its shard
        assert r["local"] <= r["total"] / 2 + 64 * 2  # half the elements, up to padding
        assert all(r["equal"].values()) and len(r["equal"]) == 2 + 9 * 2 - 0  # same numbers as build_model


@pytest.mark.slow
def test_zero3_build_peak_memory_is_a_shard(ds_runs):
    """~147M parameters (587 MB fp32): the peak resident growth of a rank while building and initialising stays
    near half the model plus one gathered block, well below the full model (the launch's first case, so the
    peak is measured as in a launch of its own)."""
    res = _build_results(ds_runs["build-big"].check())
    assert len(res) == 2
    full = res[0]["total"] * 4
    for r in res:
        assert r["local"] * 4 < 0.51 * full
        # a rank that materialised the whole model would reach >= 1.0 x; measured 0.59-0.66 x (RSS noise)
        assert r["peak"] < 0.8 * full, (r["peak"] / 2**20, full / 2**20)


def _lock(tmp: Path, *, steps: int, ac: str, init_hf: str | None = None, arch: dict | None = None,
          zero: int = 3) -> Path:
    from test_build_fakes import lock_for

    from llmc.runtime import corpus

    corpus.write_corpus(tmp / "docs.jsonl", max_docs=150)
    spec = {"name": "ds", "model": arch or ARCH, "hardware": {"gpu": "cpu", "count": 2},
            "data": {"sources": [{"name": "docs", "path": str(tmp / "docs.jsonl"), "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 128 * steps},
            "training": {"precision": "fp32", "global_batch_tokens": 128, "optimizer": {"lr": 1e-3},
                         "checkpoint": {"interval_steps": 100}, "log_every": 1,
                         "schedule": {"warmup_steps": 1, "min_lr_ratio": 0.1}, "init_hf": init_hf}}
    lock = lock_for(spec, plan={"dp_shard": 2, "micro_batch": 2, "grad_accum": 1, "activation_checkpointing": ac,
                                "ac_layers": 1 if ac == "partial" else 0},
                        hyper={"warmup_steps": 1}, spec_path=str(tmp / "spec.yaml"))
    (tmp / "plan.lock.json").write_text(json.dumps(lock))
    (tmp / "deepspeed").mkdir(exist_ok=True)
    (tmp / "deepspeed" / "ds_config.json").write_text(json.dumps(ds_config(steps=steps, zero=zero)))
    return tmp / "plan.lock.json"


@pytest.mark.slow
@pytest.mark.parametrize("ac,per_micro,zero", [("none", 2, 0), ("partial", 3, 3)])
def test_activation_checkpointing_follows_the_plan(request, ds_runs, ac, per_micro, zero):
    """A block recomputed whole re-runs in backward: 2 layers -> 2 block forwards per micro-batch without AC, 3 with
    the first block recomputed (the lock's partial, ac_layers 1; full re-runs both: test_runtime_partial_ac).
    The logged grad norm is a finite number on ZeRO-0 (where DeepSpeed reports none) and ZeRO-3."""
    p = ds_runs[f"ac-{request.node.callspec.id}"].check()
    res = _results(p)
    assert len(res) == 2 and all(r["rc"] == 0 for r in res)
    assert {r["block_calls"] for r in res} == {2 * per_micro}  # 2 steps x 1 micro-batch
    recs = [json.loads(x) for x in (p.out / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in recs if "grad_norm" in r]
    assert len(norms) == 2 and all(isinstance(g, float) and 0 < g < 1e3 for g in norms), norms


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "phi3", "mistral", "olmo2", "gemma3_mm", "gpt_oss"])
def test_zero3_from_hugging_face_matches_transformers_and_exports(ds_runs, kind):
    """ZeRO-3 partitions built under zero.Init: rank 0 reads each HF tensor (Phi-3: its rows of the fused qkv_proj /
    gate_up_proj, with partial RoPE) and DeepSpeed re-partitions it; the first loss is transformers' (Mistral: with
    an 8-token sliding window, shorter than the sequences; OLMo 2: its post-norm block and whole-projection q / k
    norms; Gemma 3's image-text checkpoint: its language model, the norms' 1 + weight, windowed and full layers;
    gpt-oss: attention sinks, the experts' biases (above the persistence threshold: partitioned, gathered around the
    MoE block like the experts' weights) and clamped SwiGLU)."""
    transformers = pytest.importorskip("transformers")

    from llmc.runtime.data import build_stream_loader
    from llmc.runtime.entry import prepare_assets
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import lm_loss

    p = ds_runs[f"hf-{kind}"].check()
    src, lock = p.dir / f"hf-{kind}", p.lock
    res = _results(p)
    assert len(res) == 2 and all(r["rc"] == 0 for r in res)
    out = p.out
    done = json.loads((out / "DONE.json").read_text())
    assert done["hf"] == "hf" and done["rank0_param_numel"] <= done["params"] / 2 + 128
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in recs if r.get("step") == 1)
    job = TrainJob.from_lock(json.loads(lock.read_text()))
    assets = prepare_assets(job, p.dir)
    tok = assets.tokenizer()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    losses = []
    for rank in (0, 1):  # the loss logged is the mean over the two ranks' micro-batches
        loader = build_stream_loader(list(assets.sources), tok, job.seq_len, job.global_batch_seqs, job.seed,
                                     dp_rank=rank, dp_size=2)
        x, y = loader.next_batch(2)
        with torch.no_grad():
            losses.append(float(lm_loss(ref_model(input_ids=x).logits, y)))
    assert abs(first - sum(losses) / 2) < 1e-4, (first, losses)
    assert (out / "hf" / "config.json").exists()
    from llmc.runtime.checkpoint import resolve_checkpoint

    sd = torch.load(resolve_checkpoint(out) / "model.pt", weights_only=True)  # gathered from the ZeRO-3 shards
    assert sum(v.numel() for v in sd.values()) == done["params"] and all(v.dtype == torch.float32 for v in sd.values())
