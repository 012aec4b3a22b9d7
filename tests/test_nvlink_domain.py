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
