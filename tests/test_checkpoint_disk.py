"""What a run's checkpoints need on disk: the plan's figure (``checkpoint_cost``, "On disk"), the lock that carries it,
and ``llmc launch``'s L019 when the disk holding run/ has less free space than the stages it runs still need.

The figure is checked against a real run: a tiny native pre-training with ``keep_latest: 2`` and a save every 4 of
its 12 steps, whose checkpoint folder is measured at every prune (the moment the new checkpoint is complete and the
oldest not yet deleted: keep_latest + 1 on disk) and, with its Hugging Face export, once it finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from test_safety_e2e import MICRO, cli, micro_spec

#: the plan counts tensor bytes; the files add their own (DCP's serialization of each tensor, its .metadata, the
#: manifest, train.json, the rank's RNG states, the export's config and tokenizer files: checkpoint_cost, "On disk"),
#: ~0.2 MB here, ~1.5% of this 1.4M-parameter model's checkpoint (a tenth of a 140k-parameter one's)
TOLERANCE = 0.03
#: tests/test_safety_e2e.py's micro model made 10x larger (d_model 256): the files' own bytes a small share
MODEL = {**MICRO, "d_model": 256, "d_ff": 512}


def gb(x: float) -> str:
    """Bytes as llmc prints storage, decimal units to 3 digits: '52 MB', '1 kB'."""
    unit, div = next(((u, d) for u, d in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)) if x >= d), ("kB", 1e3))
    return f"{x / div:.3g} {unit}"


def _bytes(*tops: Path) -> int:
    return sum(p.stat().st_size for top in tops for p in top.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A micro build (keep_latest 2, a checkpoint every 4 of 12 steps), not launched."""
    d = tmp_path_factory.mktemp("disk")
    spec = micro_spec(d / "sp", steps=12, interval=4)
    spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), "model": MODEL}, sort_keys=False))
    b = d / "b"
    r = cli("build", str(spec), "-o", str(b))
    assert r.returncode == 0, r.stderr
    return b


def _lock(b: Path) -> dict:
    return json.loads((b / "plan.lock.json").read_text())


def test_the_plan_figure_is_what_a_native_run_keeps_on_disk(built, tmp_path, monkeypatch):
    """The lock's ``time.checkpoint.disk_bytes`` / ``kept_bytes`` against the bytes a real run holds: keep_latest + 1
    step folders at each prune, then keep_latest of them and the export."""
    torch = pytest.importorskip("torch")  # noqa: F841
    from llmc.runtime import checkpoint
    from llmc.runtime.entry import main as entry_main

    shutil.copytree(built.parent, tmp_path / "d", symlinks=True)  # (the spec beside it: its data path is relative)
    b = tmp_path / "d" / "b"
    ck = _lock(b)["time"]["checkpoint"]
    assert ck["keep_latest"] == 2 and ck["interval"] == 4 and ck["saves"] == 3, ck
    seen: list[tuple[int, int]] = []  # (complete step folders, bytes) at each prune
    prune = checkpoint.prune_older

    def measured(folder, step, keep_latest):
        done = [p for p in Path(folder).iterdir() if p.is_dir() and p.name.startswith("step-")
                and not p.name.endswith((".tmp", ".pruned", ".replaced"))]
        seen.append((len(done), _bytes(Path(folder))))
        return prune(folder, step, keep_latest)

    monkeypatch.setattr(checkpoint, "prune_older", measured)
    monkeypatch.setenv("LLMC_FORCE_CPU", "1")
    assert entry_main(["--lock", str(b / "plan.lock.json")]) == 0
    out = b / "run" / "pretrain"
    assert (out / "DONE.json").is_file()
    # the peak: keep_latest + 1 complete checkpoints before the oldest goes (the third save)
    assert max(n for n, _ in seen) == 3, seen
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-00000008", "step-00000012"], steps
    kept = _bytes(out / "checkpoints", out / "hf")
    peak = max(max(size for _, size in seen), kept)  # (the export is written after the last prune)
    assert ck["kept_bytes"] == pytest.approx(kept, rel=TOLERANCE), (ck, kept)
    assert ck["disk_bytes"] == pytest.approx(peak, rel=TOLERANCE), (ck, seen, kept)
    # and the export alone: the model's parameters in fp32 (an fp32 run)
    assert ck["export_bytes"] == pytest.approx(_bytes(out / "hf"), rel=TOLERANCE)


def _usage(free: int):
    return shutil._ntuple_diskusage(10 * free + 10**12, 10**12, free)  # (total, used, free)


def test_launch_warns_when_the_disk_holding_run_is_short(built, monkeypatch):
    """L019: one line naming what the stages need (the lock's figure) and the free space, with the ways out; none
    with plenty of room. ``--dry-run`` too."""
    need = _lock(built)["time"]["checkpoint"]["disk_bytes"]
    asked = []

    def small(path):
        asked.append(Path(path))
        return _usage(1000)

    monkeypatch.setattr(shutil, "disk_usage", small)
    r = cli("launch", str(built), "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "L019" in ln]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith(f"{built}: warning[L019] the stage this launch runs (pretrain) needs up to "), line
    assert f"up to {gb(need)} more" in line and f"{gb(1000)} free" in line, line
    assert "keep_latest" in line and "scratch disk" in line and "bigger volume" in line, line
    assert asked and all(p.resolve() == built.resolve() for p in asked)  # (no run/ yet: the build directory's disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _usage(10**15))
    r = cli("launch", str(built), "--dry-run")
    assert r.returncode == 0 and "L019" not in r.stderr, r.stderr


def test_a_resumed_stage_needs_less_what_it_holds_already(built, tmp_path):
    """The launch's figure is the lock's, less what the stage's folder holds already (a resumed run's checkpoints);
    with --no-resume (its run set aside, still on the disk) the whole figure; a finished stage needs nothing."""
    from llmc.launch import disk_need, launch_commands

    shutil.copytree(built.parent, tmp_path / "d", symlinks=True)  # (the spec beside it: its data path is relative)
    b = tmp_path / "d" / "b"
    ck = _lock(b)["time"]["checkpoint"]
    cmds = launch_commands(b)
    assert disk_need(b, cmds) == (int(-(-ck["disk_bytes"] // 1)), ["pretrain"])
    held = b / "run" / "pretrain" / "checkpoints" / "step-00000004"
    held.mkdir(parents=True)
    (held / "blob").write_bytes(b"x" * 100_000)
    assert disk_need(b, launch_commands(b))[0] == pytest.approx(ck["disk_bytes"] - 100_000, abs=1)
    assert disk_need(b, launch_commands(b), resume=False)[0] == pytest.approx(ck["disk_bytes"], abs=1)
    (b / "run" / "pretrain" / "DONE.json").write_text("{}")
    cmds = [c for c in launch_commands(b) if c.stage == "pretrain"]
    for c in cmds:
        c.skip_reason = "finished"
    assert disk_need(b, cmds) == (0, [])


def test_a_lock_without_the_figure_says_nothing(built, tmp_path, monkeypatch):
    """A lock of an older llmc (no disk_bytes) or a hand-edited one (not a number): no warning, no error."""
    from llmc.launch import disk_need, disk_warning, launch_commands

    monkeypatch.setattr(shutil, "disk_usage", lambda path: _usage(0))
    lock = _lock(built)
    cmds = launch_commands(built)
    assert disk_warning(built, cmds, lock) is not None
    for value in (None, "12", True, float("nan"), -1):
        edited = json.loads(json.dumps(lock))
        if value is None:
            del edited["time"]["checkpoint"]["disk_bytes"]
        else:
            edited["time"]["checkpoint"]["disk_bytes"] = value
        assert disk_need(built, cmds, edited) == (0, []), value
        assert disk_warning(built, cmds, edited) is None, value


def test_pipeline_peak_counts_what_finished_stages_keep():
    """A pipeline's figure: its stages run one after another, a finished one keeping its checkpoints and export (a
    post-training stage its final save and export, its resume checkpoints removed), so the peak is the largest of
    what the stages before one keep plus that one's peak; each stage's figures by their parts (bytes per parameter,
    keep_latest 3): continued training 3 checkpoints of 12 B/param + one more while saving, a bf16 export (2 B);
    post-training the same resume checkpoints while it runs, then its fp32 weights (4 B) and the export."""
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import load_spec

    path = Path(__file__).resolve().parents[1] / "examples" / "pipeline_llama3_8b.yaml"
    c = compile_spec(load_spec(path)[0], str(path))
    n = c.model.params_total
    st = {s.name: s.time.checkpoint for s in c.stages}
    assert st["midtrain"].disk_bytes == pytest.approx((3 + 1) * 12 * n)
    assert st["midtrain"].kept_bytes == pytest.approx(3 * 12 * n + 2 * n)
    assert st["sft"].disk_bytes == pytest.approx((3 + 1) * 12 * n)  # (a full fine-tune: every parameter trained)
    assert st["sft"].kept_bytes == pytest.approx(4 * n + 2 * n)
    kept_before_grpo = sum(st[k].kept_bytes for k in ("midtrain", "long_context", "sft", "dpo"))
    assert c.pipeline.disk_bytes == pytest.approx(kept_before_grpo + st["grpo"].disk_bytes)
    assert c.pipeline.disk_unknown == []


def test_plan_text_and_json_say_the_figures(built):
    """`llmc plan`: the checkpoints line says the peak and what is kept; --format json carries the figures."""
    spec = built.parent / "sp" / "spec.yaml"
    r = cli("plan", str(spec), "-f", "json")
    assert r.returncode == 0, r.stderr
    ck = json.loads(r.stdout)["time"]["checkpoint"]
    assert ck["disk_bytes"] > ck["kept_bytes"] > ck["export_bytes"] > 0 and ck["keep_latest"] == 2
    r = cli("plan", str(spec))
    text = " ".join(r.stdout.split())
    assert f"on disk: {gb(ck['disk_bytes'])} at the peak, {gb(ck['kept_bytes'])} kept at the end" in text, text
    assert os.path.exists(built / "plan.lock.json")


def test_deepspeed_keeps_its_model_pt_beside_its_engine_checkpoints():
    """llmc's DeepSpeed runner: keep_latest engine checkpoints (ZeRO-0, fp32: the module 4 B + AdamW m, v 8 B per
    parameter), then model.pt (fp32 weights, 4 B) and the export (fp32, 4 B); its peak is the one extra engine
    checkpoint while a save is written, larger here than model.pt and the export together."""
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import load_spec

    run, lines = load_spec(Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml")
    run = run.model_copy(update={"training": run.training.model_copy(update={"backend": "deepspeed"})})
    c = compile_spec(run, "tiny_cpu.yaml", lines)
    ck, n, keep = c.time.checkpoint, c.model.params_total, run.training.checkpoint.keep_latest
    assert run.training.precision == "fp32" and "ZeRO-0" in ck.writer and keep == 3
    assert ck.kept_bytes == pytest.approx(keep * (4 + 8) * n + 4 * n + 4 * n)
    assert ck.disk_bytes == pytest.approx((keep + 1) * (4 + 8) * n)
