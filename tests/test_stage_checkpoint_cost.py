"""Checkpoint saves of the stages other than pre-training in their predicted time and cost
(llmc/compiler/checkpoint_cost.py ``stage_checkpoints``, llmc/compiler/stages.py ``stage_checkpoints``).

The reference is llmc's own post-training runtime: a tiny SFT stage (full fine-tune and LoRA) runs on the CPU for a
few steps, every ``save_checkpoint`` it makes is recorded with the sizes of the files it wrote, and the stall is
computed by hand from those bytes (write at the spec's ``write_gbps``, then rank 0 re-reads and hashes its files at
``HASH_GBPS``). The plan of the same stage on one GPU must predict the same saves, bytes and seconds. At scale
(Llama 3 8B on 8 H100) the stalls are counted by hand from the parameter count and must be in each stage's days,
and the pipeline's total must include them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llmc.compiler.checkpoint_cost import HASH_GBPS
from llmc.compiler.hardware import get_gpu
from llmc.compiler.stages import plan_stages
from llmc.spec.load import loads_spec

torch = pytest.importorskip("torch")

from llmc.runtime import checkpoint as ckpt_mod  # noqa: E402
from llmc.runtime.job import TrainJob  # noqa: E402
from llmc.runtime.lora import apply_lora  # noqa: E402
from llmc.runtime.model import build_model  # noqa: E402
from llmc.runtime.posttrain import run_stage  # noqa: E402
from llmc.runtime.synthetic import ByteTokenizer  # noqa: E402
from llmc.spec.model import Architecture  # noqa: E402
from llmc.spec.schema import make_stage as Stage  # noqa: E402

torch.set_num_threads(1)
TOK = ByteTokenizer()
# big enough that torch.save's per-tensor framing is a small share of each file
ARCH = dict(name="t", n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, d_ff=256, vocab_size=TOK.vocab_size,
            max_seq_len=96)
DATA = {"sources": [{"name": "python-docs", "format": "builtin"}], "seq_len": 96, "tokens": 1e5}
#: the SFT stage's data: llmc's synthetic chat records (format: builtin, kind: chat)
CHAT = {"sources": [{"name": "synthetic-chat", "format": "builtin", "kind": "chat"}], "seq_len": 96, "tokens": 1e5}
LORA = {"rank": 32, "alpha": 64, "targets": ["wq", "wv", "w2"]}
STEPS, INTERVAL = 5, 2  # periodic saves at steps 2 and 4 (before the last), then the final save at 5
WRITE_GBPS = 0.5
GB = 1e9
P_8B = 8_030_261_248  # Meta-Llama-3-8B parameters


def _job(lora: dict | None) -> TrainJob:
    fields = {"kind": "sft", **({"lora": lora} if lora else {})}
    st = Stage(name="sft", init_from="base", data=CHAT, **fields)
    return TrainJob(arch=Architecture(**ARCH), sources=[], seq_len=96, steps=STEPS, name="p", stage="sft",
                    kind="sft", lr=2e-3, micro_batch=2, init_from="base", stage_spec=st, log_every=1000,
                    checkpoint_interval=INTERVAL, keep_latest=5)


def _run_and_record(tmp_path: Path, lora: dict | None, monkeypatch) -> list[tuple[Path, dict, int]]:
    """Run the stage with llmc's runtime (one process, CPU); every save_checkpoint call's folder, its files' sizes on
    disk and the tensor bytes of its model.pt + optimizer.pt, in order (recorded as each save returns: the mid-stage
    folder is removed when the stage ends)."""
    ckpt_mod.save_checkpoint(tmp_path / "base" / "checkpoints", 0, build_model(Architecture(**ARCH), seed=11),
                             None, {})
    real, saves = ckpt_mod.save_checkpoint, []

    def spy(*a, **k):
        path = Path(real(*a, **k))
        sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
        saves.append((path, sizes, sum(_payload(path / f) for f in ("model.pt", "optimizer.pt") if f in sizes)))
        return path

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", spy)  # posttrain / sft import it from the module at call time
    res = run_stage(_job(lora), tmp_path / "sft", tokenizer=TOK)
    assert res["status"] == "done"
    return saves


def _stage_plan(lora: dict | None):
    """The compiler's plan of the same stage on one H100 (one rank: rank 0 writes and hashes whole files, as the
    one-process run above does)."""
    stage = {"name": "sft", "kind": "sft", "steps": STEPS, "seq_len": 96, "global_batch_tokens": 2 * 96,
             "init_hf": "/nope/base", "data": CHAT, **({"lora": lora} if lora else {})}
    text = (f"name: t\nmodel: {json.dumps(ARCH)}\nhardware: {{gpu: h100-sxm, count: 1}}\n"
            f"data: {json.dumps(DATA)}\n"
            f"training: {{checkpoint: {{interval_steps: {INTERVAL}, write_gbps: {WRITE_GBPS}}}}}\n"
            f"stages:\n  - {json.dumps(stage)}\n")
    run, lines = loads_spec(text, file="s.yaml")
    plans, _ = plan_stages(run, gpu=get_gpu("h100-sxm"), lines=lines, file="s.yaml")
    (sp,) = plans
    return sp


def _payload(path: Path) -> int:
    """Tensor bytes in a torch.save file (what the plan's bytes per parameter count)."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    n = 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if torch.is_tensor(x):
            n += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list | tuple):
            stack.extend(x)
    return n


def _stall(nbytes: float) -> float:
    """One synchronous save on one rank: written at WRITE_GBPS, then re-read and sha256-hashed by rank 0."""
    return nbytes / (WRITE_GBPS * GB) + nbytes / (HASH_GBPS * GB)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_sft_stage_stall_is_what_the_runtime_writes(tmp_path, monkeypatch, lora):
    saves = _run_and_record(tmp_path, lora, monkeypatch)
    periodic = [s for s in saves if s[0].parent.name == "resume"]
    final = [s for s in saves if s[0].parent.name != "resume"]
    # the runtime: a save every INTERVAL steps before the last (LoopState.end_step), then the final one
    assert [int(s[0].name.split("-")[1]) for s in periodic] == [2, 4]
    assert [int(s[0].name.split("-")[1]) for s in final] == [STEPS]
    assert "optimizer.pt" not in final[0][1]  # the final save holds the weights alone

    model = build_model(Architecture(**ARCH), seed=0)
    n_total = sum(p.numel() for p in model.parameters())
    trainable = apply_lora(model, **lora) if lora else n_total
    # bytes per parameter the runtime writes: the trainable parameters (fp32) + AdamW's exp_avg, exp_avg_sq (fp32)
    # per periodic save, the whole model's fp32 weights (adapters merged) in the final one
    assert periodic[0][2] / trainable == pytest.approx(12, rel=2e-3)  # (+ AdamW's 4-byte step count per tensor)
    assert final[0][2] / n_total == 4

    # the hand count of the stall from the files on disk (the state files; rank-0.pt, train.json and the manifest
    # are a few kB of RNG state and metadata)
    mid_bytes = [f["model.pt"] + f["optimizer.pt"] for _, f, _ in periodic]
    fin_bytes = final[0][1]["model.pt"]
    hand = sum(_stall(b) for b in mid_bytes) + _stall(fin_bytes)

    sp = _stage_plan(lora)
    assert sp.trainable_params == trainable and sp.checkpoint_interval == INTERVAL
    t = sp.time
    # the stage's days: its steps and the hand-counted stalls
    assert t.days * 86400 - STEPS * t.step_seconds == pytest.approx(hand, rel=0.02)
    ck = t.checkpoint
    assert ck.saves == len(saves) == 3
    assert ck.periodic.saves == len(periodic) and ck.final.saves == 1 and ck.periodic.mode == "sync"
    # predicted bytes per save against the bytes on disk (torch.save's framing: a few % on the tiny LoRA files)
    assert ck.periodic.state_bytes == pytest.approx(mid_bytes[0], rel=0.03 if lora else 0.01)
    assert ck.final.state_bytes == pytest.approx(fin_bytes, rel=0.01)
    assert ck.seconds == pytest.approx(hand, rel=0.02)
    # in the stage's days, GPU-hours and cost
    assert t.days * 86400 == pytest.approx(STEPS * t.step_seconds + ck.seconds, rel=1e-9)
    assert t.gpu_hours == pytest.approx(t.days * 24)
    assert t.usd == pytest.approx(t.gpu_hours * get_gpu("h100-sxm").usd_per_hour)


def test_llama3_8b_pipeline_total_includes_every_stages_saves():
    """Llama 3 8B on one node of 8 H100 (1 GB/s per node to storage, the table's default). Hand count per stage:

    * sft, full fine-tune, 1,000 steps, a save every 400: periodic saves at 400 and 800 of 12 B x 8.03B = 96.36 GB
      (fp32 params + AdamW m, v), DCP shards of all 8 ranks: one node writes all of it, 96.36 s, then each rank
      hashes its eighth, 12.05 s; the final save of the fp32 weights, 4 B x 8.03B = 32.12 GB: 32.12 s + 4.02 s;
    * sft LoRA r=16 on wq, wv: 32 layers x 16 x ((4096 + 4096) + (4096 + 1024)) = 6,815,744 adapter parameters,
      12 B each per periodic save (81.8 MB); the same final save (the merged weights);
    * dpo, 100 steps (interval min(400, 100)): only the final save.
    """
    text = """\
name: p
model: llama3-8b
hardware: {gpu: h100-sxm, count: 8, gpus_per_node: 8, usd_per_gpu_hour: 2.5}
data: {sources: [{name: web, path: /data/web.jsonl}], tokenizer: {path: /nope/tok}, seq_len: 4096, tokens: 2B}
training: {checkpoint: {interval_steps: 400}}
stages:
  - {name: pre, kind: pretrain}
  - {name: sft, kind: sft, steps: 1000, seq_len: 4096, init_from: pre}
  - {name: lo, kind: sft, steps: 1000, seq_len: 4096, init_from: pre, lora: {rank: 16, targets: [wq, wv]}}
  - {name: dpo, kind: dpo, steps: 100, seq_len: 4096, init_from: sft}
"""
    from llmc.compiler.compile import compile_spec

    run, lines = loads_spec(text, file="s.yaml")
    c = compile_spec(run, "s.yaml", lines)
    st = {s.name: s for s in c.stages}
    write = lambda b: b / GB + b / 8 / (HASH_GBPS * GB)  # noqa: E731  one node writes, each of 8 ranks hashes 1/8
    final = write(4 * P_8B)
    adapters = 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    hand = {"sft": 2 * write(12 * P_8B) + final, "lo": 2 * write(12 * adapters) + final, "dpo": final}
    assert st["lo"].trainable_params == adapters
    assert final == pytest.approx(36.14, abs=0.01) and hand["sft"] == pytest.approx(252.96, abs=0.01)
    # the pipeline's time is its stages' steps plus the hand-counted stalls
    steps_only = c.time.days * 86400 + sum(st[n].steps * st[n].time.step_seconds for n in hand)
    assert c.pipeline.days * 86400 - steps_only == pytest.approx(sum(hand.values()), rel=1e-6)
    total = c.time.days * 86400
    for name, seconds in hand.items():
        t = st[name].time
        assert t.checkpoint.seconds == pytest.approx(seconds, rel=1e-9), name
        assert t.days * 86400 == pytest.approx(st[name].steps * t.step_seconds + seconds, rel=1e-9), name
        total += t.days * 86400
    assert st["dpo"].time.checkpoint.periodic is None and st["dpo"].time.checkpoint.saves == 1
    assert c.pipeline.days * 86400 == pytest.approx(total, rel=1e-9)
    assert c.pipeline.usd == pytest.approx(c.cost.usd + sum(st[n].time.usd for n in hand))
    assert math.isclose(st["sft"].time.usd, st["sft"].time.days * 24 * 8 * 2.5, rel_tol=1e-9)


def test_each_stage_saves_every_30_minutes_of_its_own_step_by_default():
    """Without training.checkpoint.interval_steps a stage saves about every 30 minutes of its own predicted step,
    clamped to [50, 1000] steps and to its length (the documented default), whatever pre-training's interval is: the
    Llama 3 8B pipeline has no pre-training step, and its midtrain (~63 s steps) saved every 1,000 steps (17.6 h of
    training a preemption could lose). The interval the saves are timed at is the one the lock hands the trainer;
    a pinned interval_steps is kept."""
    from llmc.compiler.compile import compile_spec

    path = Path(__file__).resolve().parents[1] / "examples" / "pipeline_llama3_8b.yaml"
    text = path.read_text()
    run, lines = loads_spec(text, file=str(path))
    c = compile_spec(run, str(path), lines)
    assert c.plan is None and c.stages
    for s in c.stages:
        want = max(1, min(min(max(round(1800 / s.time.step_seconds), 50), 1000), s.steps))
        assert s.checkpoint_interval == want, (s.name, s.checkpoint_interval, want)
        periodic = s.time.checkpoint.periodic
        if periodic is not None:
            assert periodic.interval == want
        hours_between = want * s.time.step_seconds / 3600
        assert hours_between <= max(0.6, 50 * s.time.step_seconds / 3600 + 1e-9), (s.name, hours_between)
    pinned = text.replace("training:\n", "training:\n  checkpoint: {interval_steps: 700}\n", 1)
    assert pinned != text
    run, lines = loads_spec(pinned, file=str(path))
    c = compile_spec(run, str(path), lines)
    assert all(s.checkpoint_interval == min(700, s.steps) for s in c.stages)
