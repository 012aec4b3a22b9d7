"""Post-training on 2 ranks (torchrun, gloo, CPU, FSDP2) against the same stages in one process.

Every stage starts from the same saved base model (``init_from``), so the two runs start from identical
weights; with each step's global batch split between the ranks and the losses normalised by global counts,
the per-step losses must agree to float tolerance (fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmc.runtime.checkpoint import read_model_state, resolve_checkpoint, save_checkpoint  # noqa: E402
from llmc.runtime.job import TrainJob  # noqa: E402
from llmc.runtime.model import build_model  # noqa: E402
from llmc.runtime.posttrain import KIND_FOR_STAGE, run_stage  # noqa: E402
from llmc.runtime.synthetic import ByteTokenizer  # noqa: E402
from llmc.spec.model import Architecture  # noqa: E402
from llmc.spec.schema import make_stage as Stage  # noqa: E402

TOK = ByteTokenizer()
ARCH = dict(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=TOK.vocab_size,
            max_seq_len=128)
def builtin(kind: str, seq_len: int = 96, tokens: float = 1e5) -> dict:
    """Stage data: llmc's synthetic records of a ``kind`` stage (``format: builtin`` with the stage's record kind,
    llmc.runtime.synthetic; a builtin pre-training corpus is refused by the stage's trainer, G014)."""
    return {"sources": [{"name": "synthetic", "format": "builtin", "kind": KIND_FOR_STAGE[kind]}],
            "seq_len": seq_len, "tokens": tokens}
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["wq", "wv", "w2"]}  # dropout 0: no random masks

# name: (stage fields, steps, lr, global batch, meta_init)
STAGES = {
    "sft": ({"kind": "sft"}, 4, 2e-3, 5, None),  # 5 examples: 3 on rank 0, 2 on rank 1
    "sft_lora": ({"kind": "sft", "lora": LORA}, 4, 3e-3, 4, None),
    "sft_lora_meta": ({"kind": "sft", "lora": LORA}, 4, 3e-3, 4, True),  # built on meta, base loaded per shard
    "sft_qlora": ({"kind": "sft", "lora": {**LORA, "quantize_base": "nf4"}}, 3, 3e-3, 4, None),  # NF4 base
    "dpo": ({"kind": "dpo", "dpo_beta": 0.1}, 3, 1e-3, 3, None),  # sharded frozen reference
    "dpo_lora": ({"kind": "dpo", "dpo_beta": 0.1, "lora": LORA}, 3, 2e-3, 4, None),
    "grpo": ({"kind": "grpo", "grpo_group_size": 4, "max_new_tokens": 6, "prompts_per_step": 3}, 2, 1e-4, 1, None),
}

RUNNER = r'''
import json, sys
import torch
torch.set_num_threads(1)
from llmc.runtime.distributed import init_distributed, shutdown
from llmc.runtime.posttrain import run_stage
sys.path.insert(0, sys.argv[2])
from test_posttrain_dist import job_of, TOK
info = init_distributed()
try:
    for name in json.loads(sys.argv[3]):
        run_stage(job_of(name), sys.argv[1] + "/" + name, tokenizer=TOK, info=info)
finally:
    shutdown()
'''


def job_of(name: str) -> TrainJob:
    fields, steps, lr, batch, meta = STAGES[name]
    st = Stage(name=name, init_from="base", data=builtin(fields["kind"]), **fields)
    return TrainJob(arch=Architecture(**ARCH), sources=[], seq_len=96, steps=steps, name="p", stage=name,
                    kind=st.kind, lr=lr, micro_batch=batch, init_from="base", stage_spec=st, log_every=1000,
                    meta_init=meta)


def _base(run: Path) -> None:
    save_checkpoint(run / "base" / "checkpoints", 0, build_model(Architecture(**ARCH), seed=11), None, {})


def _metrics(d: Path) -> list[dict]:
    """The step records (the stage's events -- start, truncation -- left out)."""
    return [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The stages run once in this process and once on 2 ranks (one torchrun for all of them)."""
    root = tmp_path_factory.mktemp("post")
    one, two = root / "one", root / "two"
    for r in (one, two):
        _base(r)
    names = list(STAGES)
    for n in names:
        if n != "sft_lora_meta":  # meta init needs sharding: its single-process twin is sft_lora
            run_stage(job_of(n), one / n, tokenizer=TOK)
    script = root / "runner.py"
    script.write_text(RUNNER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", str(script), str(two), str(Path(__file__).parent), json.dumps(names)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize("name,twin,keys", [
    ("sft", "sft", ("loss",)),
    ("sft_lora", "sft_lora", ("loss",)),
    ("sft_lora_meta", "sft_lora", ("loss",)),
    ("sft_qlora", "sft_qlora", ("loss",)),
    ("dpo", "dpo", ("loss", "margin", "accuracy", "chosen_reward")),
    ("dpo_lora", "dpo_lora", ("loss", "margin", "accuracy")),
])
def test_two_ranks_match_one_process(runs, name, twin, keys):
    one, two = runs
    a, b = _metrics(one / twin), _metrics(two / name)
    assert len(a) == len(b) == STAGES[name][1]
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (name, k, ra, rb)
    done = json.loads((two / name / "DONE.json").read_text())
    assert done["world"] == 2 and done["status"] == "done" and done["hf"] == "hf"
    manifest = json.loads((resolve_checkpoint(two / name) / "manifest.json").read_text())
    assert manifest["layout"] == "dcp" and manifest["world"] == 2
    # the final (merged) weights agree too
    wa, wb = read_model_state(resolve_checkpoint(one / twin)), read_model_state(resolve_checkpoint(two / name))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft_lora", "sft_lora_meta"])
def test_lora_on_two_ranks_changes_only_adapters_and_exports(runs, name):
    transformers = pytest.importorskip("transformers")
    _, two = runs
    base = read_model_state(resolve_checkpoint(two / "base"))
    merged = read_model_state(resolve_checkpoint(two / name))
    ad = torch.load(two / name / "lora_adapters.pt", weights_only=True)
    scale = LORA["alpha"] / LORA["rank"]
    changed = set()
    for k, w in merged.items():
        mod = k.rsplit(".", 1)[0]
        if f"{mod}.lora_B" in ad:  # merged = base + (alpha/r) B A, with B trained away from 0
            assert ad[f"{mod}.lora_B"].abs().max() > 0
            torch.testing.assert_close(w, base[k] + scale * ad[f"{mod}.lora_B"] @ ad[f"{mod}.lora_A"],
                                       rtol=1e-5, atol=1e-6)
            changed.add(mod.rsplit(".", 1)[-1])
        else:
            assert torch.equal(w, base[k]), k  # frozen
    assert changed == set(LORA["targets"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(two / name / "hf", torch_dtype=torch.float32).eval()
    ours = build_model(Architecture(**ARCH), seed=0)
    ours.load_state_dict(merged)  # an fp32 run's export keeps its fp32 weights
    ids = torch.randint(0, TOK.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    assert (two / name / "hf" / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_grpo_on_two_ranks_finishes_and_exports(runs):
    _, two = runs
    done = json.loads((two / "grpo" / "DONE.json").read_text())
    assert done["status"] == "done" and done["world"] == 2 and done["hf"] == "hf"
    assert (two / "grpo" / "hf" / "config.json").exists()
    hist = _metrics(two / "grpo")
    assert len(hist) == 2 and all(0 <= h["reward_mean"] <= 1 and h["kl"] >= 0 for h in hist)


@pytest.mark.slow
def test_entry_runs_a_lora_sft_stage_on_two_ranks(tmp_path):
    """examples/pipeline_tiny.yaml's sft stage through ``torchrun -m llmc.runtime.entry`` on 2 ranks: every rank
    trains (no rank exits early), rank 0 writes DONE.json, the checkpoint is sharded over the 2 ranks."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    b = tmp_path / "build"

    def run(args):
        p = subprocess.run(args, cwd=b if b.exists() else root, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p

    run([sys.executable, "-m", "llmc.cli", "build", str(root / "examples" / "pipeline_tiny.yaml"), "-o", str(b)])
    lock = json.loads((b / "plan.lock.json").read_text())
    pre = TrainJob.from_lock(lock, "pretrain")
    save_checkpoint(b / "run" / "pretrain" / "checkpoints", 1, build_model(pre.arch, seed=3), None, {})
    (b / "run" / "pretrain" / "DONE.json").write_text(json.dumps({"status": "done"}))
    run([sys.executable, "-m", "llmc.runtime.entry", "prepare", "--lock", str(b / "plan.lock.json")])
    p = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
             "--rdzv_endpoint=localhost:0", "-m", "llmc.runtime.entry", "--lock", str(b / "plan.lock.json"),
             "--stage", "sft", "--out", str(b / "run" / "sft"), "--steps", "2"])
    assert "nothing to do" not in p.stdout
    done = json.loads((b / "run" / "sft" / "DONE.json").read_text())
    assert done["status"] == "done" and done["world"] == 2 and done["merged"] and done["hf"] == "hf"
    manifest = json.loads((resolve_checkpoint(b / "run" / "sft") / "manifest.json").read_text())
    assert manifest["layout"] == "dcp" and manifest["world"] == 2
    assert len(_metrics(b / "run" / "sft")) == 2  # one record per step (rank 0 only)
