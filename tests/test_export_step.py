"""``llmc export RUN_DIR --stage S --step N``: a kept intermediate checkpoint as a Hugging Face directory.

* Native run (checkpoints every 2 of 6 steps, the newest 2 kept): ``--step 4`` writes ``run/pretrain/hf-step-4``
  whose weights are the step-4 llmc checkpoint's (read here with torch's own DCP converter), not the final export's;
  a stage without DONE.json (killed mid-run) exports its kept steps too. A pruned step is one R010 line listing the
  kept steps, found before torch is imported, and writes nothing.
* DeepSpeed run (ZeRO-2): the step-4 checkpoint exists only as DeepSpeed's tag ``checkpoints/deepspeed/step-00000004``;
  its export holds the weights DeepSpeed's own converter (``zero_to_fp32``) gives.
* torchtitan DCP checkpoints (``outputs/torchtitan/checkpoint/step-N``): the step asked for, not the newest.
* The listing itself (folder names only): step-10 and step-00000010 are one step, llmc's format first, partial
  folders skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402
from test_safety_e2e import MICRO, ROOT, cli  # noqa: E402

from llmc.runtime.model import build_model  # noqa: E402
from llmc.spec.model import Architecture  # noqa: E402


def _launch(d: Path, backend: str) -> Path:
    """A 6-step run of the micro model, a checkpoint every 2 steps, the newest 2 kept (steps 4 and 6)."""
    from llmc.runtime import corpus

    d.mkdir(parents=True, exist_ok=True)
    corpus.write_corpus(d / "docs.jsonl", max_docs=300)
    spec = {"name": "micro", "model": MICRO, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl", "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 256 * 6},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": 2, "keep_latest": 2}, "log_every": 1},
            **({"parallelism": {"zero_stage": 2}} if backend == "deepspeed" else {})}
    (d / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    b = d / "b"
    assert cli("build", str(d / "spec.yaml"), "-o", str(b)).returncode == 0
    r = cli("launch", str(b), "--backend", backend)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((b / "run/pretrain/DONE.json").read_text())["step"] == 6
    return b


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("native"), "native")


def _logits(model_or_dir, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model_or_dir, Path):
            hf = transformers.AutoModelForCausalLM.from_pretrained(model_or_dir, torch_dtype=torch.float32).eval()
            return hf(input_ids=tokens).logits
        return model_or_dir.eval()(tokens)


def _llmc_model(sd: dict) -> torch.nn.Module:
    model = build_model(Architecture(**MICRO))
    model.load_state_dict(sd)
    return model


def _check_export(hf: Path, sd: dict, final: Path, step: int) -> None:
    """``hf`` holds the llmc state dict ``sd`` (same tensors as HF names them, same logits through transformers),
    differs from the final export ``final``, and records ``step``."""
    got = load_file(str(hf / "model.safetensors"))
    # tensors HF's Llama keeps as llmc does (no RoPE row order): the token embedding, the final norm, the head, an MLP
    for ours, theirs in (("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
                         ("lm_head.weight", "lm_head.weight"),
                         ("layers.1.feed_forward.w2.weight", "model.layers.1.mlp.down_proj.weight")):
        assert torch.equal(got[theirs], sd[ours]), theirs
    tokens = torch.randint(0, MICRO["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    want = _logits(_llmc_model(sd), tokens)
    torch.testing.assert_close(_logits(hf, tokens), want, rtol=1e-4, atol=1e-4)
    assert (_logits(final, tokens) - want).abs().max() > 1e-2  # the final weights are others
    assert json.loads((hf / ".llmc-export.json").read_text())["step"] == step


def test_export_step_writes_that_checkpoints_weights(native, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = native / "run" / "pretrain"
    r = cli("export", str(native), "--stage", "pretrain", "--step", "4")
    assert r.returncode == 0, r.stderr
    hf = run / "hf-step-4"
    assert r.stdout.strip() == f"wrote {hf}"
    # the step-4 llmc checkpoint, read with torch's own converter (its sharded DCP layout -> one torch.save file)
    dcp_to_torch_save(run / "checkpoints" / "step-00000004" / "dcp", tmp_path / "step4.pt")
    sd = torch.load(tmp_path / "step4.pt", weights_only=False)["model"]
    _check_export(hf, sd, run / "hf", 4)
    assert json.loads((run / "hf" / ".llmc-export.json").read_text())["step"] == 6  # the final export untouched
    # a stage stopped before its end (no DONE.json, no hf/): its kept steps export all the same, -o as given
    copy = tmp_path / "killed"
    shutil.copytree(native, copy, ignore=shutil.ignore_patterns(".lock"))
    (copy / "run/pretrain/DONE.json").unlink()
    shutil.rmtree(copy / "run/pretrain/hf")
    r = cli("export", str(copy / "run"), "--stage", "pretrain", "--step", "4", "-o", str(tmp_path / "mine"))
    assert r.returncode == 0, r.stderr
    assert load_file(str(tmp_path / "mine" / "model.safetensors")).keys() == load_file(
        str(hf / "model.safetensors")).keys()
    assert json.loads((tmp_path / "mine" / ".llmc-export.json").read_text())["finished"] is False


def test_a_step_not_kept_is_one_line_naming_the_kept_steps(native):
    run = native / "run" / "pretrain"
    before = sorted(p.name for p in run.iterdir())
    r = cli("export", str(native), "--stage", "pretrain", "--step", "2")  # pruned (keep_latest 2)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "error[R010]" in lines[0] and "stage 'pretrain' has no checkpoint of step 2 (kept: 4, 6;" in lines[0]
    assert "one is written every 2 steps (training.checkpoint.interval_steps) and training.checkpoint.keep_latest (2) " \
        "prunes older ones)" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written
    for bad in ("-1", "two"):  # not a step number: one error[CLI] line
        r = cli("export", str(native), "--stage", "pretrain", "--step", bad)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "error[CLI]" in r.stderr, r.stderr
    # found from folder names before torch is imported
    code = ("import sys\nfrom llmc.runtime.export import export_target\nfrom llmc.runtime.errors import HFError\n"
            f"try:\n    export_target({str(native)!r}, 'pretrain', 3)\nexcept HFError as e:\n    print(e)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.splitlines() == ["stage 'pretrain' has no checkpoint of step 3 (kept: 4, 6; one is written every "
                                       "2 steps (training.checkpoint.interval_steps) and training.checkpoint."
                                       "keep_latest (2) prunes older ones)", "False"], out


def test_export_step_of_a_deepspeed_run(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    b = _launch(tmp_path / "ds", "deepspeed")
    run = b / "run" / "pretrain"
    ds_dir = run / "checkpoints" / "deepspeed"
    # step 4 is kept only as DeepSpeed's resumable checkpoint (llmc's own is written at the end only)
    assert (ds_dir / "step-00000004").is_dir() and not (run / "checkpoints" / "step-00000004").exists()
    r = cli("export", str(b), "--stage", "pretrain", "--step", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {run / 'hf-step-4'}"
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="step-00000004")
    _check_export(run / "hf-step-4", {k: v.float() for k, v in sd.items()}, run / "hf", 4)


def test_export_step_of_torchtitan_dcp_checkpoints(tmp_path):
    """torchtitan's DCP checkpoints (its Llama FQNs put q/k/v under attention.qkv_linear): the step asked for."""
    from test_hf_init import titan_build

    from llmc.runtime.errors import HFError
    from llmc.runtime.export import export_checkpoint

    model = titan_build(tmp_path, {2: 0.5, 3: 1.0})
    with pytest.raises(HFError, match=r"no checkpoint of step 1 \(kept: 2, 3;"):
        export_checkpoint(tmp_path, "pretrain", step=1)
    res = export_checkpoint(tmp_path, "pretrain", step=2)
    hf = Path(res["hf"])
    assert hf == tmp_path / "run" / "pretrain" / "hf-step-2"
    assert json.loads((hf / ".llmc-export.json").read_text())["step"] == 2
    tokens = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        for p in model.parameters():  # step 2's weights, as the bf16 export holds them
            p.copy_((p * 0.5).to(torch.bfloat16).float())
    torch.testing.assert_close(_logits(hf, tokens), _logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_a_continued_stage_on_llmcs_trainer_never_exports_pretrainings_torchtitan_steps(tmp_path):
    """A midtrain stage without a layout of its own runs on llmc's trainer (its checkpoints in its own folder); the
    torchtitan dump folder beside it is pre-training's: `--step 20` of the midtrain stage exported pre-training's
    step 20 under the midtrain stage's name, and the steps it listed as kept were pre-training's."""
    from test_build_fakes import lock_for

    from llmc.runtime.errors import HFError
    from llmc.runtime.export import export_target
    from llmc.spec.presets import PRESETS

    spec = {"name": "t", "model": PRESETS["tiny"].model_dump(mode="json"), "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "python-docs", "format": "builtin"}], "seq_len": 32, "tokens": 4096},
            "training": {"global_batch_tokens": 256},
            "stages": [{"name": "pretrain", "kind": "pretrain"},
                       {"name": "mid", "kind": "midtrain", "init_from": "pretrain", "steps": 4,
                        "data": {"sources": [{"name": "python-docs", "format": "builtin"}], "seq_len": 32,
                                 "tokens": 1024}}]}
    lock = lock_for(spec)
    assert not next(s for s in lock["stages"] if s["name"] == "mid").get("layout")  # (llmc's trainer runs it)
    (tmp_path / "plan.lock.json").write_text(json.dumps(lock))
    pre = tmp_path / "outputs" / "torchtitan" / "checkpoint" / "step-20"
    pre.mkdir(parents=True)
    (pre / ".metadata").write_bytes(b"")
    (tmp_path / "run" / "mid").mkdir(parents=True)
    assert export_target(tmp_path, "pretrain", 20).checkpoint.path == pre  # (pre-training's own: found)
    with pytest.raises(HFError, match=r"stage 'mid' has no checkpoint of step 20 \(kept: none;"):
        export_target(tmp_path, "mid", 20)


def test_kept_checkpoints_from_folder_names(tmp_path):
    from llmc.runtime.export import kept_checkpoints, missing_step

    stage = tmp_path / "run" / "pretrain"
    ck = stage / "ckpt"

    def folder(p: Path, *files: str) -> None:
        p.mkdir(parents=True)
        for f in files:
            (p / f).write_text("")

    folder(ck / "step-00000010", "manifest.json")
    folder(ck / "step-20", "manifest.json")
    folder(ck / "step-00000030.tmp", "manifest.json")  # an interrupted save
    folder(ck / "step-00000040")  # no manifest: not complete
    folder(ck / "deepspeed" / "step-00000010", "mp_rank_00_model_states.pt")  # llmc's own step 10 comes first
    folder(ck / "deepspeed" / "step-00000050", "mp_rank_00_model_states.pt")
    folder(ck / "deepspeed" / "step-00000060.tmp", "mp_rank_00_model_states.pt")
    folder(tmp_path / "outputs" / "torchtitan" / "checkpoint" / "step-70", ".metadata")
    job = SimpleNamespace(kind="pretrain", stage="pretrain", checkpoint_folder="ckpt", keep_latest=None,
                          checkpoint_interval=10, steps=80)
    kept = kept_checkpoints(job, stage, (tmp_path / "outputs" / "torchtitan",))
    assert {n: (c.format, c.path.name) for n, c in kept.items()} == {
        10: ("llmc", "step-00000010"), 20: ("llmc", "step-20"), 50: ("deepspeed", "step-00000050"),
        70: ("torchtitan", "step-70")}
    assert missing_step(job, 15, kept) == ("stage 'pretrain' has no checkpoint of step 15 (kept: 10, 20, 50, 70; one "
                                           "is written every 10 steps (training.checkpoint.interval_steps))")
    assert missing_step(job, 90, {}) == ("stage 'pretrain' has no checkpoint of step 90 (kept: none; the stage trains "
                                         "80 steps; one is written every 10 steps (training.checkpoint.interval_steps))")
    many = {n: kept[10] for n in range(0, 300, 20)}  # 15 steps: the oldest 3, the newest 7 and the count
    assert "(kept: 0, 20, 40, ..., 160, 180, 200, 220, 240, 260, 280; 15 in all;" in missing_step(job, 7, many)
