"""Expert parallelism as torchtitan 0.3.0 lays it out: the routed experts' mesh (efsdp, ep) spans the dp_shard x cp x
tp ranks (torchtitan/distributed/parallel_dims.py build_mesh: efsdp = dp_shard * cp * tp // ep), so EP may take the
TP ranks in, and the experts are sharded dp_shard x cp x tp ways whatever the TP degree.

The reference is torchtitan's own ``ParallelDims`` built on torch.distributed's "fake" process group (one
subprocess, rank 0 of each simulated world): its ep / efsdp mesh sizes, the ranks of rank 0's EP group, and the
layouts it refuses. llmc's expert sharding, memory per rank, EP validity rule, search and all-to-all topology are
checked against it; the reviewer's two repros (Mixtral 8x7B on 64 H100 at tp 4 / 8 with ep 8; Qwen3-30B-A3B on 8 H100
at tp 2 x ep 8) are planned as torchtitan runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from llmc.cli import app
from llmc.compiler import timing
from llmc.compiler.hardware import GPUS
from llmc.compiler.memory import memory_per_gpu
from llmc.compiler.params import params_total
from llmc.compiler.plan import ParallelPlan, ep_domain, ep_rank_span, expert_shards
from llmc.spec.presets import PRESETS

H100 = GPUS["h100-sxm"]
MIXTRAL = PRESETS["mixtral-8x7b"]
GiB = 2**30

# (world, dp_shard, cp, tp, ep): the reviewer's layouts and a few more (EP inside a TP group, EP over CP and TP)
VALID = [(64, 64, 1, 1, 8), (64, 16, 1, 4, 8), (64, 8, 1, 8, 8), (8, 4, 1, 2, 8), (8, 2, 1, 4, 2), (16, 2, 2, 4, 8),
         (16, 4, 1, 4, 16), (32, 4, 1, 8, 4)]
# layouts torchtitan's mesh cannot unflatten: ep not dividing dp_shard x cp x tp
INVALID = [(12, 6, 1, 2, 8), (8, 4, 1, 2, 16), (24, 6, 1, 4, 16)]

_TT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torchtitan.distributed.parallel_dims import ParallelDims

    out = []
    for world, ds, cp, tp, ep in json.loads(sys.argv[1]):
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        try:
            pd = ParallelDims(dp_replicate=1, dp_shard=ds, cp=cp, tp=tp, pp=1, ep=ep, world_size=world)
            pd.build_mesh()
            mesh = lambda n: pd.get_optional_mesh(n, include_singleton_axes=True)
            got = {n: mesh(n).size() for n in ("ep", "efsdp", "dp_shard", "cp", "tp")}
            got["ep_ranks"] = mesh("ep").mesh.flatten().tolist()
            got["tp_ranks"] = mesh("tp").mesh.flatten().tolist()
            out.append(got)
        except Exception as e:  # the layouts torchtitan refuses
            out.append({"error": f"{type(e).__name__}: {e}"[:300]})
        finally:
            dist.destroy_process_group()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def titan():
    """{layout: torchtitan's mesh sizes and rank 0's EP / TP group, or its error} from ParallelDims on a fake
    process group."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan")
    layouts = VALID + INVALID
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _TT, json.dumps(layouts)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(zip(layouts, json.loads(r.stdout.strip().splitlines()[-1]), strict=True))


def test_torchtitan_builds_ep_over_tp_and_refuses_what_does_not_divide(titan):
    for lay in VALID:
        assert "error" not in titan[lay], (lay, titan[lay])
    for lay in INVALID:
        assert "error" in titan[lay], (lay, titan[lay])


@pytest.mark.parametrize("lay", VALID + INVALID)
def test_ep_validity_rule_is_torchtitans(titan, lay):
    """llmc's rule (ep divides dp_shard x cp x tp on torchtitan) accepts exactly the layouts torchtitan builds."""
    world, ds, cp, tp, ep = lay
    assert (ep_domain(ds, cp, tp, "torchtitan") % ep == 0) == ("error" not in titan[lay]), (lay, titan[lay])


@pytest.mark.parametrize("lay", VALID)
def test_expert_shard_degree_matches_torchtitan_mesh(titan, lay):
    world, ds, cp, tp, ep = lay
    tt = titan[lay]
    # with EP: the experts are split over ep (dim 0, no expert TP in 0.3.0) and FSDP-sharded over efsdp
    assert expert_shards(ds, cp, tp, ep, "torchtitan") == (tt["ep"], tt["efsdp"])
    assert tt["ep"] * tt["efsdp"] == tt["dp_shard"] * tt["cp"] * tt["tp"]  # every layout: dp_shard x cp x tp ways
    # without EP: TP-sharded (moe_sharding.py expert_param_placement_dense) and FSDP over dp_shard x cp
    assert expert_shards(ds, cp, tp, 1, "torchtitan") == (tt["tp"], tt["dp_shard"] * tt["cp"])


@pytest.mark.parametrize("lay", VALID)
def test_ep_group_is_consecutive_ranks(titan, lay):
    """torchtitan's EP group is ep consecutive ranks (ep innermost of its expert mesh), taking rank 0's TP group in
    when ep >= tp: what the all-to-all topology (ep_rank_span) assumes."""
    world, ds, cp, tp, ep = lay
    ranks, tp_ranks = titan[lay]["ep_ranks"], titan[lay]["tp_ranks"]
    assert ranks == list(range(ep))
    assert max(ranks) - min(ranks) + 1 == ep_rank_span(tp, cp, ep, "torchtitan")
    assert set(tp_ranks) <= set(ranks) if ep >= tp else set(ranks) <= set(tp_ranks)


@pytest.mark.parametrize("tp", [1, 4, 8])
def test_mixtral_states_per_rank_as_torchtitan_shards_them(titan, tp):
    """Mixtral 8x7B on 64 H100, ep 8, ZeRO-3: torchtitan shards the experts ep x efsdp = 64 ways and the rest
    tp x dp_shard = 64 ways in each layout, so the fp32 weights / grads (4 B) and Adam moments (8 B) per rank are the
    same at tp 1, 4 and 8 (up to the norms and router, replicated over tp: < 0.1 %). llmc charged the experts 4x at tp 4
    (10.59 GiB of weights against 2.72)."""
    ds = 64 // tp
    tt = titan[(64, ds, 1, tp, 8)]
    m = MIXTRAL.moe
    experts = MIXTRAL.n_layers * m.num_experts * 3 * MIXTRAL.d_model * MIXTRAL.d_ff  # w1, w2, w3 of each expert
    total = params_total(MIXTRAL)
    assert abs(total - 46.7e9) < 0.005 * 46.7e9  # mistralai/Mixtral-8x7B-v0.1: 46.7B parameters
    per_rank = experts / (tt["ep"] * tt["efsdp"]) + (total - experts) / (tt["tp"] * tt["dp_shard"] * tt["cp"])
    plan = ParallelPlan(dp_shard=ds, tp=tp, ep=8, zero_stage=3, activation_checkpointing="full")
    br = memory_per_gpu(MIXTRAL, plan, 4096, "bf16", H100.hbm_bytes, backend="torchtitan").breakdown
    for key, bytes_per_param in (("weights", 4), ("grads", 4), ("optimizer", 8)):
        assert br[key] == pytest.approx(bytes_per_param * per_rank, rel=2e-3), (key, br[key] / GiB)


def test_other_profiles_keep_their_expert_convention():
    """Megatron-Core folds its expert mesh as ETP x EP x EDP (its own convention, not modelled): llmc's megatron and
    generic profiles keep EP carved out of dp_shard x cp, the experts whole on each TP rank."""
    for be in ("megatron", "generic", None):
        assert expert_shards(16, 1, 4, 8, be) == (8, 2)
        assert ep_domain(4, 1, 2, be) == 4
        assert ep_rank_span(4, 1, 8, be) == 32


def test_all_to_all_stays_in_the_node_when_the_ep_group_does(titan):
    """tp 4 x ep 8 on 8-GPU nodes: torchtitan's EP group is ranks 0-7, one node, so the dispatch / combine go over
    NVLink (llmc priced them over the network, spacing the EP ranks tp apart); each rank sends its own sequence
    shard (tokens / tp)."""
    assert max(titan[(64, 16, 1, 4, 8)]["ep_ranks"]) < H100.gpus_per_node
    sm = timing.step_model(MIXTRAL, 4096, "bf16", H100, "torchtitan")
    lt = timing.LayoutTimer(sm, 4, 1, 1, 8, 16, 1, 3)
    k = MIXTRAL.moe.top_k
    assert lt.a2a_per_token == pytest.approx(k * 7 / 8 / sm.nvlink_Bps)
    # the same tokens cross the same links at tp 1 (dp_shard 64) and tp 4: the EP traffic per optimizer step is equal
    plan1 = ParallelPlan(dp_shard=64, tp=1, ep=8, micro_batch=1, grad_accum=16, activation_checkpointing="full")
    plan4 = ParallelPlan(dp_shard=16, tp=4, ep=8, micro_batch=1, grad_accum=64, activation_checkpointing="full")
    ep1, ep4 = (timing.step_time(sm, p)[2]["ep_comm"] for p in (plan1, plan4))
    assert ep4 == pytest.approx(ep1)


# ----------------------------------------------------------------------------- the reviewer's repros, through the CLI

MEM = """name: mem
model: mixtral-8x7b
hardware: {gpu: h100-sxm, count: 64, gpus_per_node: 8}
data:
  sources: [{name: web, tokens: 1T}]
  seq_len: 4096
  tokens: 100B
training: {precision: bf16, global_batch_tokens: 4_194_304, backend: torchtitan}
parallelism: {ep: 8, tp: 1, pp: 1, dp_replicate: 1, zero_stage: 3, micro_batch: 1, activation_checkpointing: full}
"""
EP_TP = """name: eptp8
model: qwen3-30b-a3b
hardware: {gpu: h100-sxm, count: 8, gpus_per_node: 8}
data:
  sources: [{name: web, tokens: 1T}]
  seq_len: 4096
  tokens: 10B
training: {precision: bf16, global_batch_tokens: 1_048_576, backend: torchtitan}
parallelism: {tp: 2, ep: 8}
"""


def _plan(tmp_path, text: str, *sets: str) -> dict:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    r = CliRunner().invoke(app, ["plan", str(spec), "--format", "json"] + [x for s in sets for x in ("--set", s)])
    assert "Traceback" not in r.output
    errs = [ln for ln in r.stderr.splitlines() if ": error[" in ln]
    assert not errs, errs
    return json.loads(r.stdout)


def test_mixtral_tp4_tp8_cost_what_tp1_does(tmp_path):
    got = {t: _plan(tmp_path, MEM, f"parallelism.tp={t}") for t in (1, 4, 8)}  # tp 8 was P004 (93.9 GiB)
    for t in (1, 4, 8):
        assert (got[t]["plan"]["tp"], got[t]["plan"]["ep"], got[t]["plan"]["dp_shard"]) == (t, 8, 64 // t)
    w1 = got[1]["memory"]["breakdown"]
    for t in (4, 8):
        wt = got[t]["memory"]["breakdown"]
        for key in ("weights", "grads", "optimizer"):
            assert wt[key] == pytest.approx(w1[key], rel=2e-3), (t, key, wt[key] / GiB, w1[key] / GiB)


def test_ep_spanning_tp_is_planned(tmp_path, titan):
    """qwen3-30b-a3b on 8 H100 at tp 2 x ep 8: torchtitan builds it (dp_shard 4, efsdp 1); llmc refused it
    ("ep 8 must divide num_experts 128 and dp_shard x cp 4")."""
    assert titan[(8, 4, 1, 2, 8)]["efsdp"] == 1
    d = _plan(tmp_path, EP_TP)
    p = d["plan"]
    assert (p["tp"], p["ep"], p["dp_shard"], p["cp"], p["pp"], p["dp_replicate"]) == (2, 8, 4, 1, 1, 1)


def test_pinned_ep_not_dividing_the_gpus_is_a_located_p007(tmp_path, titan):
    """12 GPUs at tp 2 x ep 8: no dp_shard x cp x tp divides by 8 (torchtitan's mesh refuses it), said on the pin."""
    assert "error" in titan[(12, 6, 1, 2, 8)]
    spec = tmp_path / "spec.yaml"
    spec.write_text(EP_TP.replace("count: 8, gpus_per_node: 8", "count: 12, gpus_per_node: 4"))
    r = CliRunner().invoke(app, ["plan", str(spec)])
    assert "Traceback" not in r.output
    errs = [ln for ln in r.stderr.splitlines() if ": error[" in ln]
    assert len(errs) == 1 and "error[P007] parallelism.ep: ep 8 does not divide the 12 GPUs" in errs[0], errs
