"""TP groups may span the nodes of one NVLink domain: a GB200 NVL72 rack joins 72 GPUs (18 nodes of 4) with one
NVLink fabric (https://www.nvidia.com/en-us/data-center/gb200-nvl72/), so TP 8 there is two nodes of the same rack;
on H100 nodes (8 GPUs, NVLink inside the node only) TP stays within the node."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from llmc.cli import app

SPEC = """\
name: nvl
model: llama3.1-405b
hardware: {{gpu: {gpu}, count: 256}}
data: {{sources: [{{name: w, path: /d/*.jsonl}}], seq_len: 8192, tokens: 1T}}
training: {{precision: bf16, global_batch_tokens: 16_777_216}}
parallelism: {{tp: {tp}}}
"""


def _plan(tmp_path, gpu, tp):
    p = tmp_path / "s.yaml"
    p.write_text(SPEC.format(gpu=gpu, tp=tp))
    return CliRunner().invoke(app, ["plan", str(p), "--format", "json"])


def test_tp_8_spans_two_gb200_nodes_of_one_nvl72_rack(tmp_path):
    r = _plan(tmp_path, "gb200", 8)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["plan"]["tp"] == 8 and d["hardware"]["gpus_per_node"] == 4


def test_tp_still_stays_inside_the_nvlink_domain(tmp_path):
    r = _plan(tmp_path, "gb200", 16)  # 16 does not divide 72: a group would cross the rack's edge
    assert r.exit_code == 1 and "error[P002]" in r.output and "72 GPUs per NVLink domain" in r.output
    r = _plan(tmp_path, "h100-sxm", 16)
    assert r.exit_code == 1 and "tp 16 > 8 GPUs per node" in r.output


def _sbatch(tmp_path, gpu, count, tp):
    p = tmp_path / f"{gpu}-{count}.yaml"
    p.write_text(SPEC.replace("count: 256", f"count: {count}").format(gpu=gpu, tp=tp))
    out = tmp_path / f"b-{gpu}-{count}"
    r = CliRunner().invoke(app, ["build", str(p), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return (out / "launch" / "slurm.sbatch").read_text() + (out / "torchtitan" / "slurm.sbatch").read_text()


def test_the_slurm_script_says_which_segments_keep_tp_groups_in_a_rack(tmp_path):
    """A TP group of 8 spans two GB200 nodes, and a rack's NVLink joins 18 nodes: the Slurm script names the segment
    size (sbatch --segment, Slurm's topology/block plugin) that keeps every group, and as much of the job as fits,
    in one rack -- the largest divisor of the job's nodes up to 18 that holds whole TP groups (64 nodes: 16; 18
    nodes: 18); an H100 job (NVLink inside the node only) gets no such line."""
    for count, nodes in ((256, 64), (72, 18)):
        text = _sbatch(tmp_path, "gb200", count, 8)
        want = max(d for d in range(1, 19) if nodes % d == 0 and d % 2 == 0)
        assert f"#   sbatch --segment={want} launch/slurm.sbatch" in text, (count, text[:3000])
        assert f"#   sbatch --segment={want} torchtitan/slurm.sbatch" in text, count
        assert "--segment" not in "\n".join(ln for ln in text.splitlines() if ln.startswith("#SBATCH"))
    assert "--segment" not in _sbatch(tmp_path, "h100-sxm", 256, 8)
