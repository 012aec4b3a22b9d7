"""Hardware table: datasheet figures, the dense-vs-sparse trap, units."""

from __future__ import annotations

import pytest

from llmc.compiler.hardware import GPUS, get_gpu, peak_flops, supports

REQUIRED = ["h100-sxm", "h100-pcie", "h800", "h200", "b200", "a100-40g", "a100-80g", "mi300x", "l40s", "rtx4090",
            "cpu"]  # fmt: skip


def test_required_keys_and_fields():
    for k in REQUIRED:
        g = get_gpu(k)
        assert g is not None and g.key == k
        assert g.bf16_tflops > 0 and g.fp32_tflops > 0 and g.hbm_bytes > 0 and g.gpus_per_node >= 1
        assert g.source
    assert get_gpu("nope") is None
    assert get_gpu("H100") is GPUS["h100-sxm"]


def test_datasheet_values():
    h100 = GPUS["h100-sxm"]
    # NVIDIA H100 SXM datasheet: "1,979 TFLOPS BF16" is with 2:4 sparsity -> dense 989.4
    assert h100.bf16_tflops == pytest.approx(1979 / 2, rel=1e-3)
    assert h100.fp8_tflops == pytest.approx(3958 / 2, rel=1e-3)
    assert h100.hbm_marketed_gb == 80 and h100.hbm_gbps == 3350  # hbm_bytes: the device's (test_device_capacity)
    assert h100.nvlink_gbps == 900 / 2  # 900 GB/s bidirectional -> per direction
    assert GPUS["h200"].hbm_marketed_gb == 141 and GPUS["h200"].hbm_gbps == 4800
    assert GPUS["b200"].bf16_tflops == pytest.approx(2250) and GPUS["b200"].fp8_tflops == pytest.approx(4500)
    assert GPUS["a100-80g"].bf16_tflops == 312 and GPUS["a100-40g"].bf16_tflops == 312
    mi = GPUS["mi300x"]
    assert mi.bf16_tflops == pytest.approx(1307.4) and mi.hbm_marketed_gb == 192 and mi.hbm_gbps == 5300
    # H800: same compute as H100 SXM, NVLink cut to 400 GB/s bidirectional
    assert GPUS["h800"].bf16_tflops == h100.bf16_tflops and GPUS["h800"].nvlink_gbps == 200
    assert GPUS["l40s"].nvlink_gbps == 0 and GPUS["rtx4090"].hbm_marketed_gb == 24


def test_no_sparse_figures():
    # Guard against copying the sparsity figure: dense BF16 of every part is at most 2.5 PFLOPS
    # (GB200: 360 PF sparse / 72 GPUs / 2), and fp8 (where present) is 2x bf16 within 2% (L40S datasheet:
    # 362.05 vs 733).
    for g in GPUS.values():
        assert g.bf16_tflops <= 2500
        if g.fp8_tflops is not None and g.key != "cpu":
            assert g.fp8_tflops == pytest.approx(2 * g.bf16_tflops, rel=0.02)


def test_peak_flops_units_and_errors():
    assert peak_flops(GPUS["h100-sxm"], "bf16") == pytest.approx(989.4e12)
    assert peak_flops(GPUS["h100-sxm"], "fp8") == pytest.approx(1978.9e12)
    assert peak_flops(GPUS["a100-80g"], "fp32") == pytest.approx(19.5e12)
    assert not supports(GPUS["a100-80g"], "fp8")
    with pytest.raises(ValueError):
        peak_flops(GPUS["a100-80g"], "fp8")
    with pytest.raises(ValueError):
        peak_flops(GPUS["h100-sxm"], "int3")


def test_cpu_pseudo_device_is_conservative():
    cpu = GPUS["cpu"]
    assert cpu.gpus_per_node == 1 and cpu.nvlink_gbps == 0 and cpu.fp8_tflops is None
    assert cpu.bf16_tflops <= 1.0 and cpu.usd_per_hour == 0


def test_ridge_point_h100():
    # roofline ridge point (Williams et al. 2009) ~ 989 / 3.35 ~ 295 FLOP/byte
    h = GPUS["h100-sxm"]
    assert peak_flops(h, "bf16") / (h.hbm_gbps * 1e9) == pytest.approx(295, rel=0.01)


def test_math_modules_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import llmc.compiler.hardware, llmc.compiler.params, llmc.compiler.flops\n"
        "import llmc.compiler.scaling, llmc.compiler.memory\n"
        "assert sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_table_covers_the_current_parts_with_sources():
    want = {"h100-sxm", "h100-pcie", "h100-nvl", "h100-hbm2e-96g", "h800", "h200", "h20", "b200", "gb200",
            "b300", "gb300", "a100-40g", "a100-80g", "l40s", "mi300x", "mi325x"}
    assert want <= set(GPUS)
    for k in want:
        g = GPUS[k]
        assert g.source.startswith("https://"), k
        assert g.power_w and g.power_w > 0, k
    # GB200 / GB300 NVL72: 4 GPUs per compute tray, 72 in one NVLink domain (NVL72 spec pages)
    for k in ("gb200", "gb300"):
        assert GPUS[k].gpus_per_node == 4 and GPUS[k].nvlink_domain == 72
    # Blackwell Ultra: the rack totals divided per GPU -- GB300 NVL72 720 PF sparse FP8 / 72 / 2 = 5 PF dense,
    # 20 TB HBM3e / 72 = 279 GB (rounded as the spec pages' per-GPU figures); HGX B300 72 PF sparse FP8 / 8 / 2
    # = 4.5 PF dense, 2.3 TB / 8 = 288 GB
    assert GPUS["gb300"].fp8_tflops == 720e3 / 72 / 2 and GPUS["gb300"].bf16_tflops == 360e3 / 72 / 2
    assert GPUS["b300"].fp8_tflops == 72e3 / 8 / 2 and GPUS["b300"].bf16_tflops == 36e3 / 8 / 2
    assert abs(GPUS["gb300"].hbm_bytes - 20e12 / 72) < 2e9 and abs(GPUS["b300"].hbm_bytes - 2.3e12 / 8) < 1e9
    assert get_gpu("GB300-NVL72") is GPUS["gb300"]
    # the HBM2e H100 of torchtitan's benchmarks: 96 GB at 2.4 TB/s
    assert GPUS["h100-hbm2e-96g"].hbm_bytes == 96 * 10**9 and GPUS["h100-hbm2e-96g"].hbm_gbps == 2400


def test_nvlink_domain_decides_which_traffic_stays_on_nvlink():
    """A 64-way FSDP group on GB200 NVL72 stays inside the NVLink domain; on B200 (8 per node) it does not."""
    from llmc.compiler import timing
    from llmc.compiler.plan import ParallelPlan
    from llmc.spec.presets import PRESETS

    arch = PRESETS["llama3-70b"]
    plan = ParallelPlan(dp_shard=64, micro_batch=1, grad_accum=1, activation_checkpointing="full", zero_stage=3)
    b200 = timing.step_time(timing.step_model(arch, 8192, "bf16", GPUS["b200"]), plan)[2]["fsdp_comm"]
    gb200 = timing.step_time(timing.step_model(arch, 8192, "bf16", GPUS["gb200"]), plan)[2]["fsdp_comm"]
    assert gb200 < b200 / 3


def test_a_power_cap_set_in_the_spec_lowers_the_clocks_from_the_parts_rated_power():
    """hardware.gpu_overrides.power_w below the table entry's board power sustains (cap / rated)^(1/3) of the
    datasheet peak (f ~ P^(1/3)), as the 500 W H100 entry does from 700 W; at or above it, the full peak."""
    from llmc.compiler.hardware import clock_factor, with_overrides

    capped = with_overrides("h100-sxm", {"power_w": 500})
    assert clock_factor(capped) == pytest.approx((500 / 700) ** (1 / 3))
    assert clock_factor(capped) == pytest.approx(clock_factor(GPUS["h100-hbm2e-96g"]))
    assert clock_factor(with_overrides("h100-sxm", {"power_w": 350})) == pytest.approx(0.5 ** (1 / 3))
    assert clock_factor(with_overrides("h100-sxm", {"power_w": 900})) == 1.0
    # an entry that names its rated power keeps it: 600 W on the 500 W part quoted at 700 W
    assert clock_factor(with_overrides("h100-hbm2e-96g", {"power_w": 600})) == pytest.approx((600 / 700) ** (1 / 3))
    # peaks given with the power are the part's at that power: not derated again
    mine = with_overrides("my-h100", {"base": "h100-sxm", "bf16_tflops": 800, "power_w": 500})
    assert clock_factor(mine) == 1.0 and mine.bf16_tflops == 800
    assert clock_factor(with_overrides("h100-hbm2e-96g", {"bf16_tflops": 700})) == 1.0


def test_spec_overrides_and_custom_gpu():
    from llmc.compiler.hardware import with_overrides

    g = with_overrides("h100-sxm", {"hbm_gib": 94, "nvlink_domain": 16, "power_w": 500})
    assert g.hbm_bytes == 94 * 2**30 and g.nvlink_domain == 16 and g.power_w == 500
    assert g.bf16_tflops == GPUS["h100-sxm"].bf16_tflops  # untouched fields come from the table
    c = with_overrides("my-asic", {"bf16_tflops": 1200, "fp8_tflops": 2400, "hbm_gib": 128, "hbm_tbps": 5})
    assert c.key == "my-asic" and peak_flops(c, "fp8") == pytest.approx(2.4e15) and c.hbm_gbps == 5000
    assert with_overrides("my-asic", {"bf16_tflops": 1200}) is None  # not enough to define a part
    b = with_overrides("my-h100", {"base": "h100-sxm", "hbm_gib": 96})
    assert b.key == "my-h100" and b.bf16_tflops == GPUS["h100-sxm"].bf16_tflops


def test_spec_defines_a_custom_gpu_end_to_end():
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    text = """\
name: t
model: llama3-8b
hardware:
  gpu: my-accel
  count: 8
  gpu_overrides: {bf16_tflops: 1500, fp8_tflops: 3000, hbm_gib: 128, hbm_tbps: 6, nvlink_gbps: 450}
data: {seq_len: 8192, tokens: 1T}
training: {global_batch_tokens: 1048576}
"""
    run, lines = loads_spec(text, file="s.yaml")
    c = compile_spec(run, "s.yaml", lines, spec_bytes=text.encode())
    assert not [d for d in c.diagnostics if d.severity == "error"], [d.render() for d in c.diagnostics]
    assert c.gpu.key == "my-accel" and c.gpu.hbm_bytes == 128 * 2**30 and c.plan is not None
    # an unknown key without enough fields is still S007
    bad = text.replace("bf16_tflops: 1500, fp8_tflops: 3000, ", "")
    run, lines = loads_spec(bad, file="s.yaml")
    c = compile_spec(run, "s.yaml", lines, spec_bytes=bad.encode())
    assert "S007" in {d.code for d in c.diagnostics}


def test_spec_pcie_override_reaches_the_timing_of_a_part_without_nvlink():
    """An L40S box (no NVLink): a slower PCIe link set in the spec makes the same plan slower, never faster."""
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    def tokens_per_s(pcie: float) -> float:
        text = f"""\
name: t
model: llama3-8b
hardware: {{gpu: l40s, count: 8, gpu_overrides: {{pcie_gbps: {pcie}}}}}
data: {{seq_len: 4096, tokens: 1e9}}
training: {{global_batch_tokens: 1048576}}
parallelism: {{dp_shard: 8}}
"""
        run, lines = loads_spec(text, file="s.yaml")
        c = compile_spec(run, "s.yaml", lines, spec_bytes=text.encode())
        assert c.gpu.pcie_gbps == pcie and c.gpu.nvlink_gbps == 0
        return c.time.tokens_per_second

    slow, table, fast = tokens_per_s(8), tokens_per_s(GPUS["l40s"].pcie_gbps), tokens_per_s(256)
    assert slow < table < fast


def test_llmc_gpus_prints_the_tables_figures_and_json_every_field():
    """`llmc gpus` showed keys and names only, though the docs send users there for a part's figures: every row now
    has the dense bf16 / fp8 peaks, HBM, links, node and price of the table (read back and compared), and
    `--format json` every field, the datasheet source included."""
    import dataclasses
    import json

    from typer.testing import CliRunner

    from llmc.cli import app
    from llmc.compiler.hardware import GPUS

    r = CliRunner().invoke(app, ["gpus"])
    assert r.exit_code == 0, r.output
    rows = {ln.split()[0]: ln.split() for ln in r.output.splitlines()[1:] if ln.strip() and ln.split()[0] in GPUS}
    assert set(rows) == set(GPUS)
    for key, cols in rows.items():
        g = GPUS[key]
        assert float(cols[1].replace(",", "")) == pytest.approx(g.bf16_tflops, abs=0.5), key
        assert cols[2] == "-" if g.fp8_tflops is None else float(cols[2].replace(",", "")) == pytest.approx(
            g.fp8_tflops, abs=0.5)
        assert cols[3] == ("-" if not g.hbm_marketed_gb else f"{g.hbm_marketed_gb:g}"), key  # the datasheet's GB
        # the device-reported GiB the plans fit against; '*' where the table has no public device figure
        assert float(cols[4].rstrip("*")) == pytest.approx(g.hbm_gib, abs=0.005), key
        assert cols[4].endswith("*") == (not g.hbm_source) and int(cols[8]) == g.gpus_per_node, key
        assert float(cols[10]) == pytest.approx(g.usd_per_hour, abs=0.005), key
    j = json.loads(CliRunner().invoke(app, ["gpus", "--format", "json"]).stdout)
    assert j == {k: json.loads(json.dumps(dataclasses.asdict(g))) for k, g in GPUS.items()}
    assert all(v["source"].startswith("http") or v["key"] == "cpu" for v in j.values())
