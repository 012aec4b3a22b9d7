"""Reading measured runs (torchtitan logs, llmc metrics + lock, tables) and ``llmc calibrate``'s body."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re

import pytest

from llmc import measurements as ms
from llmc.compiler.compile import compile_spec
from llmc.emit.lock import lock_text
from llmc.spec.load import loads_spec

# torchtitan train.py's metrics line as it appears in a real log (rank prefix, colour codes, thousands
# separators), and the shorter form of older versions (no tflops), both verbatim in format
TITAN_LINES = [
    "[rank0]:[titan] 2025-06-10 12:00:01,000 - root - INFO - \x1b[31mstep:  1  \x1b[32mloss: 12.2402  "
    "\x1b[33mmemory: 41.20GiB(43.37%)  \x1b[34mtps: 1,126  \x1b[36mtflops: 65.21  \x1b[35mmfu: 6.59%\x1b[39m",
    "[rank0]:[titan] 2025-06-10 12:00:09,000 - root - INFO - \x1b[31mstep: 10  \x1b[32mloss:  9.8801  "
    "\x1b[33mmemory: 58.31GiB(61.37%)  \x1b[34mtps: 7,413  \x1b[36mtflops: 429.32  \x1b[35mmfu: 43.41%\x1b[39m",
    "[rank0]:[titan] 2025-06-10 12:00:18,000 - root - INFO - step: 20  loss:  8.4931  memory: 58.40GiB(61.47%)  "
    "tps: 7,431  tflops: 430.33  mfu: 43.51%",
    "step: 30 loss: 8.1023 memory: 58.40GiB(61.47%) tps: 7,425 mfu: 43.48%",
    "[rank0]:[titan] 2025-06-10 12:00:30,000 - root - INFO - Saving a checkpoint at step 30",
]


def test_parse_torchtitan_log_reads_real_format_lines():
    steps = ms.parse_torchtitan_log("\n".join(TITAN_LINES))
    assert [s.step for s in steps] == [1, 10, 20, 30]
    s = steps[1]
    assert (s.loss, s.memory_gib, s.memory_pct, s.tps, s.tflops, s.mfu_pct) == (9.8801, 58.31, 61.37, 7413.0, 429.32,
                                                                                43.41)
    assert steps[3].tflops is None and steps[3].tps == 7425.0
    # steady state: steps after the warm-up only (step 1 with compilation is excluded)
    assert ms.steady([(s.step, s.tps) for s in steps]) == 7428.0


SPEC = """\
name: m
model: llama3-8b
hardware: {gpu: h100-sxm, count: 8}
data: {seq_len: 8192, tokens: 1T}
training: {backend: torchtitan, global_batch_tokens: 131072}
parallelism: {dp_shard: 8, tp: 1, pp: 1, cp: 1, micro_batch: 1, activation_checkpointing: selective}
"""


@pytest.fixture
def build(tmp_path):
    run, lines = loads_spec(SPEC, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=SPEC.encode())
    assert c.plan is not None
    d = tmp_path / "build"
    d.mkdir()
    (d / "plan.lock.json").write_text(lock_text(c))
    return d, c


def test_torchtitan_log_with_its_lock_becomes_a_measurement(build, tmp_path):
    d, c = build
    log = tmp_path / "train.log"
    log.write_text("\n".join(TITAN_LINES) + "\n")
    m = ms.read_torchtitan_log(log, d / "plan.lock.json")
    assert m.backend == "torchtitan" and m.gpu == "h100-sxm" and m.plan == c.plan
    assert m.tokens_per_s_per_gpu == 7428.0  # torchtitan's tps is per GPU
    assert m.reserved_bytes == pytest.approx(58.40 * 2**30)  # the reserved peak torchtitan prints
    t, mem = ms.predicted(m)
    assert t.step_seconds == pytest.approx(c.time.step_seconds)  # same model, same plan, same settings
    assert mem.reserved_bytes == c.memory.reserved_bytes


def test_llmc_metrics_jsonl_is_per_job_throughput(build):
    d, c = build
    recs = [{"step": s, "loss": 3.0, "tokens_per_s": 8 * 5000.0 + s, "peak_mem_bytes": 40 * 2**30 + s}
            for s in range(1, 40)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = ms.read_llmc_run(d)
    assert m.tokens_per_s_per_gpu == pytest.approx((8 * 5000.0 + 25) / 8)  # median of steps 11..39, / world
    assert m.allocated_bytes == 40 * 2**30 + 39 and m.reserved_bytes is None


@pytest.mark.parametrize("ran", ["torchtitan", "deepspeed", "native"])
def test_a_run_is_fitted_to_the_backend_that_ran_it(build, ran):
    """`llmc launch --backend B` runs the lock's layout on B whatever backend the plan was computed for; every
    trainer's metrics.jsonl opens with a start event naming its backend (torchtitan's job, llmc's native and
    DeepSpeed trainers: llmc.runtime.train.open_run_logger), and calibrate predicts the run for that backend."""
    d, c = build
    recs = [{"event": "start", "backend": ran}] + [{"step": s, "loss": 3.0, "tokens_per_s": 40000.0}
                                                   for s in range(1, 40)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = ms.read_llmc_run(d)
    # on the layout that backend's runner trains, the one the compiler sized its run by (lock backend_runs: llmc's
    # DeepSpeed runner, the ds_config's ZeRO stage)
    assert m.backend == ran and m.plan == c.backend_runs[ran].plan
    assert ran != "deepspeed" or m.plan != c.plan
    from llmc.runtime import ds_train, train

    # the trainers name themselves so: the native logger by default, the DeepSpeed runner explicitly
    assert 'backend: str = "native"' in inspect.getsource(train.open_run_logger)
    assert 'backend="deepspeed"' in inspect.getsource(ds_train.train)


def test_memory_of_a_cpu_run_is_not_a_device_measurement(build, tmp_path):
    """On a CPU the trainers' peak_mem_bytes is the process's peak RSS (the interpreter, torch, data workers),
    not the per-GPU memory llmc predicts: such a run calibrates throughput only. The record llmc's trainers
    write (step_record) says which device it measured; an older record is judged by the lock's hardware."""
    torch = pytest.importorskip("torch")
    from llmc.runtime.metrics import step_record

    d, _ = build
    kw = dict(loss=3.0, lr=1e-3, grad_norm=1.0, tokens=0, tokens_per_step=8 * 5000, dt=1.0, flops_per_token=1.0,
              peak_flops=None, world=8)
    cpu = [step_record(step=s, device=torch.device("cpu"), **kw) for s in range(1, 40)]
    assert cpu[0]["peak_mem_device"] == "cpu" and cpu[0]["peak_mem_bytes"] > 0
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cpu))
    m = ms.read_llmc_run(d)
    assert m.allocated_bytes is None and m.tokens_per_s_per_gpu == pytest.approx(5000.0)
    cuda = [{**r, "peak_mem_device": "cuda", "peak_mem_bytes": 40 * 2**30} for r in cpu]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cuda))
    assert ms.read_llmc_run(d).allocated_bytes == 40 * 2**30

    # records without the field: a run whose lock is for the CPU pseudo-device measured RSS
    tiny = "name: t\nmodel: tiny\nhardware: {gpu: cpu, count: 1}\ndata: {seq_len: 64, tokens: 1e5}\n" \
           "training: {global_batch_tokens: 512}\n"
    run, lines = loads_spec(tiny, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=tiny.encode())
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "plan.lock.json").write_text(lock_text(c))
    old = [{"step": s, "loss": 3.0, "tokens_per_s": 900.0, "peak_mem_bytes": 2 * 2**30} for s in range(1, 40)]
    (tmp_path / "cpu" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    m = ms.read_llmc_run(tmp_path / "cpu")
    assert m.allocated_bytes is None and m.tokens_per_s_per_gpu == pytest.approx(900.0)


def test_bad_inputs_give_one_located_line(tmp_path, capsys):
    bad = tmp_path / "runs.csv"
    bad.write_text("id,model,gpus,seq_len,dp_shard,micro_batch,global_batch,backend,gpu_key,tokens_per_s_per_gpu\n"
                   "a,llama3-8b,8,8192,8,2,16,torchtitan,h100-sxm,5000\n"
                   "b,no-such-model,8,8192,8,2,16,torchtitan,h100-sxm,5000\n")
    with pytest.raises(ms.MeasurementError) as e:
        ms.read_table(bad)
    assert e.value.located().startswith(f"{bad}:3: error[K004] model: unknown preset")
    assert ms.calibrate_main([str(bad)], str(tmp_path / "cal.json")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error[K004]" in err[0] and "Traceback" not in err[0]
    log = tmp_path / "x.log"
    log.write_text("no metrics here\n")
    assert ms.calibrate_main([str(log)], str(tmp_path / "cal.json"), lock=str(tmp_path / "missing.json")) == 1
    assert "error[K001]" in capsys.readouterr().err


def test_calibrate_main_fits_a_table_and_writes_provenance(tmp_path, capsys):
    """A table whose 'measurements' are llmc's own predictions at 0.8x the compute speed: the written
    calibration has compute_scale 0.8, a near-zero leave-one-out band, and the input's sha256."""
    from llmc.compiler.calibration import Calibration, Factors

    rows = [
        ("a", "llama3-8b", 8, 8192, 1, 8, 1, 2, 16, "selective"),
        ("b", "llama3-8b", 16, 8192, 2, 8, 1, 1, 32, "none"),
        ("c", "llama3-8b", 64, 8192, 1, 8, 8, 4, 32, "full"),
        ("d", "llama3-70b", 64, 8192, 1, 8, 8, 2, 16, "full"),
        ("e", "llama3-8b", 32, 8192, 1, 32, 1, 2, 64, "selective"),
    ]
    header = "id,model,gpus,seq_len,dp_replicate,dp_shard,tp,micro_batch,global_batch,ac,backend,gpu_key\n"
    text = header + "".join(",".join(map(str, r)) + ",torchtitan,h100-sxm\n" for r in rows)
    base = tmp_path / "base.csv"
    base.write_text(text)
    truth = Factors(compute_scale=0.8)
    lines = [header.strip() + ",tokens_per_s_per_gpu"]
    for m, r in zip(ms.read_table(base), rows, strict=True):
        t, _ = ms.predicted(m, truth)
        lines.append(",".join(map(str, r)) + f",torchtitan,h100-sxm,{t.tokens_per_second / m.plan.world:.6f}")
    table = tmp_path / "runs.csv"
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cal.json"
    assert ms.calibrate_main([str(table)], str(out)) == 0
    cal = Calibration.from_json(json.loads(out.read_text()))
    assert cal.backend == "torchtitan" and cal.gpu == "h100-sxm"
    assert cal.factors.compute_scale == pytest.approx(0.8, rel=1e-3)
    assert cal.factors.comm_scale == pytest.approx(1.0, rel=1e-2)
    assert cal.time_band["max_abs_pct"] < 0.5
    assert cal.provenance["inputs"][0]["sha256"] == ms.sha256_file(table)
    assert "compute_scale=0.800" in capsys.readouterr().out


def test_benchmark_tables_read_as_measurements():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "torchtitan_llama3_h100_202412.yaml"
    rows = ms.read_table(path)
    assert len(rows) == 18
    r = {m.label: m for m in rows}["tt24-t5-interleaved"]
    assert (r.plan.pp, r.plan.pp_schedule, r.plan.pp_virtual_stages, r.plan.grad_accum) == (8, "Interleaved1F1B", 2, 8)
    assert r.compile is True and r.async_tp is True and r.reserved_bytes == pytest.approx(72.7 * 2**30)


def test_the_locks_fp8_recipe_reaches_the_prediction(tmp_path):
    """A run built with ``training.fp8_recipe: mxfp8`` is re-predicted with MXFP8's cast traffic: the lock
    carries the recipe (spec.resolved), so the measurement's prediction equals the plan's (it would not with the
    backend's default rowwise)."""
    spec = SPEC.replace("h100-sxm", "b200").replace(
        "training: {backend: torchtitan,", "training: {backend: torchtitan, precision: fp8, fp8_recipe: mxfp8,")
    run, lines = loads_spec(spec, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=spec.encode())
    (tmp_path / "plan.lock.json").write_text(lock_text(c))
    log = tmp_path / "train.log"
    log.write_text("\n".join(TITAN_LINES) + "\n")
    m = ms.read_torchtitan_log(log, tmp_path / "plan.lock.json")
    assert m.fp8_recipe == "mxfp8" and m.precision == "fp8"
    t, _ = ms.predicted(m)
    assert t.step_seconds == pytest.approx(c.time.step_seconds)
    rowwise = ms.predicted(dataclasses.replace(m, fp8_recipe=None))[0]
    assert rowwise.step_seconds != pytest.approx(c.time.step_seconds)



def test_an_offload_runs_prediction_is_the_plans(tmp_path):
    """A DeepSpeed run built with ``parallelism.offload_optimizer`` is re-predicted with the optimizer on the host:
    the lock carries the setting, so the measurement's time and memory equal the plan's (without it, the
    prediction would keep the optimizer states on the GPU and the update in HBM: less time, more memory)."""
    spec = SPEC.replace("training: {backend: torchtitan,", "training: {backend: deepspeed,").replace(
        "activation_checkpointing: selective}",
        "activation_checkpointing: full, zero_stage: 2, offload_optimizer: true}")
    run, lines = loads_spec(spec, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=spec.encode())
    assert c.plan is not None and c.backend.name == "deepspeed", [d.message for d in c.diagnostics]
    (tmp_path / "plan.lock.json").write_text(lock_text(c))
    recs = [{"step": s, "loss": 3.0, "tokens_per_s": 8 * 5000.0, "peak_mem_bytes": 40 * 2**30} for s in range(1, 40)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = ms.read_llmc_run(tmp_path)
    assert m.offload_optimizer is True
    t, mem = ms.predicted(m)
    assert t.step_seconds == pytest.approx(c.time.step_seconds)
    assert mem.allocated_bytes == c.memory.allocated_bytes
    t0, mem0 = ms.predicted(dataclasses.replace(m, offload_optimizer=False))
    assert t0.step_seconds < t.step_seconds and mem0.allocated_bytes > mem.allocated_bytes


_CSV_HEAD = "id,model,gpus,seq_len,dp_shard,micro_batch,global_batch,backend,gpu_key,tokens_per_s_per_gpu"
_CSV_ROW = {"id": "a", "model": "llama3-8b", "gpus": "8", "seq_len": "8192", "dp_shard": "8", "micro_batch": "2",
            "global_batch": "16", "backend": "torchtitan", "gpu_key": "h100-sxm", "tokens_per_s_per_gpu": "5000"}


def _csv(tmp_path, **cells):
    import csv

    row = {**_CSV_ROW, **cells}
    p = tmp_path / "runs.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    return p


@pytest.mark.parametrize("word,want", [("false", False), ("False", False), ("no", False), ("0", False),
                                       ("true", True), ("yes", True), ("1", True)])
def test_csv_flags_are_read_as_words_not_as_non_empty_strings(tmp_path, word, want):
    """A CSV cell is text: ``bool("false")`` is True, which read every CSV run as compiled, async-TP and offloaded."""
    m = ms.read_table(_csv(tmp_path, compile=word, async_tp=word, offload_optimizer=word))[0]
    assert (m.compile, m.async_tp, m.offload_optimizer) == (want, want, want)


@pytest.mark.parametrize("cells,path", [
    ({"dp_shard": "eight"}, "dp_shard"), ({"micro_batch": "1.5"}, "micro_batch"), ({"vp": "0"}, "vp"),
    ({"tokens_per_s_per_gpu": "-3"}, "tokens_per_s_per_gpu"), ({"mem_gib": "lots"}, "mem_gib"),
    ({"compile": "maybe"}, "compile"), ({"ac": "partly"}, "ac"), ({"ac": "partial"}, "ac_layers"),
    ({"ac": "partial", "ac_layers": "0"}, "ac_layers"), ({"ac": "full", "ac_layers": "2"}, "ac_layers"), ({"pp_schedule": "1F1F"}, "pp_schedule"),
    ({"precision": "fp16"}, "precision"), ({"quantization": "nvfp4"}, "quantization"), ({"backend": "jax"}, "backend"),
    ({"zero_stage": "7"}, "zero_stage")])
def test_every_bad_table_cell_is_one_located_line(tmp_path, capsys, cells, path):
    """Each of these was an INTERNAL error (a traceback class) or silently read as something else."""
    p = _csv(tmp_path, **cells)
    assert ms.calibrate_main([str(p)], str(tmp_path / "cal.json")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{p}:2: error[K004] {path}: "), err
    assert not (tmp_path / "cal.json").exists()


def test_calibrate_never_writes_a_fit_that_plan_would_refuse(tmp_path, capsys):
    """Runs 1e-300 and 1e300 tokens/s apart fit to NaN factors; `llmc calibrate` wrote that file (and printed a
    "nan%" band) for `llmc plan --calibration` to refuse later. It now stops with one K008 line and writes nothing,
    on the run no compute speed explains (1e300 tokens/s: a step shorter than its communication alone)."""
    import csv

    p = tmp_path / "runs.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(_CSV_ROW))
        w.writeheader()
        w.writerow({**_CSV_ROW, "tokens_per_s_per_gpu": "1e-300"})
        w.writerow({**_CSV_ROW, "id": "b", "micro_batch": "1", "tokens_per_s_per_gpu": "1e300"})
    assert ms.calibrate_main([str(p)], str(tmp_path / "cal.json")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{p}:3: error[K008] tokens_per_s_per_gpu: b: "), err
    assert not (tmp_path / "cal.json").exists()


def test_calibration_input_codes_are_their_own():
    """`llmc calibrate` / `--calibration` errors carry K codes, which no other part of llmc emits: the spec's M codes
    (M001-M006) once shared numbers with them, so `error[M004]` had two meanings."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "llmc"
    code = re.compile(r"""["']([A-Z])\d{3}["']""")
    letters = {p.relative_to(root).as_posix(): set(code.findall(p.read_text())) for p in root.rglob("*.py")}
    assert letters["measurements.py"] == {"K"}
    assert [f for f, ls in letters.items() if "K" in ls and f != "measurements.py"] == []


_YAML_HEAD = "backend: torchtitan\ngpu_key: h100-sxm\nrows:\n  - {id: ok, model: llama3-8b, gpus: 8, dp_shard: 8, micro_batch: 2, global_batch: 16, seq_len: 8192, tokens_per_s_per_gpu: 5000}\n"  # noqa: E501
_YAML_ROW = "model: llama3-8b, gpus: 8, dp_shard: 8, micro_batch: 2, global_batch: 16, seq_len: 8192, tokens_per_s_per_gpu: 5000"  # noqa: E501


@pytest.mark.parametrize("row,path", [
    ("- 1", "rows"),
    ("- [a, b]", "rows"),
    (f"- {{id: [1], {_YAML_ROW}}}", "id"),
    (f"- {{id: b, {_YAML_ROW}, tp: 1{'0' * 400}, gpus: 8}}", "tp"),
    (f"- {{id: b, {_YAML_ROW}, tokens_per_s_per_gpu: 1{'0' * 400}}}", "tokens_per_s_per_gpu"),
    (f"- {{id: b, {_YAML_ROW}, vp: 100, pp_schedule: Interleaved1F1B, pp: 2, dp_shard: 4}}", "vp"),
    (f"- {{id: b, {_YAML_ROW}, seq_len: 1{'0' * 300}}}", "layout"),
    (f"- {{id: b, {_YAML_ROW}, micro_batch: 1{'0' * 300}}}", "global_batch"),  # no whole number of steps
])
def test_mistyped_yaml_table_rows_are_one_located_line(tmp_path, capsys, row, path):
    """A row that is no mapping (AttributeError), a list id (unhashable), an integer beyond a float (OverflowError),
    a layout the pipeline model refuses (ValueError from the compiler; the plan's own check, P014, names it first)
    and a size it overflows on were INTERNAL errors; each is one K004 line at the row's own line (the second row:
    line 5)."""
    p = tmp_path / "runs.yaml"
    p.write_text(_YAML_HEAD + "  " + row + "\n")
    assert ms.calibrate_main([str(p)], str(tmp_path / "cal.json")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"{re.escape(str(p))}:5: error\[K004\] {path}: ", err[0]), err
    assert len(err[0]) < 600 and not (tmp_path / "cal.json").exists()


def test_yaml_rows_are_located_by_position_not_by_id(tmp_path):
    """Each row's line is where the row starts, whatever its id (an integer id, or none, found no line before)."""
    p = tmp_path / "runs.yaml"
    block = "".join(f"    {cell}\n" for cell in _YAML_ROW.split(", "))  # a block mapping, no id
    p.write_text(_YAML_HEAD + f"  - {{id: 7, {_YAML_ROW}}}\n  - kind: throughput\n" + block)
    rows = ms.read_table(p)
    assert [m.line for m in rows] == [4, 5, 6]
    assert [m.label for m in rows] == ["ok", "7", f"{p.name}:6"]


@pytest.mark.parametrize("record,path", [
    ('["step"]', "metrics.jsonl: not a JSON object"),
    ('{"step": "x", "tokens_per_s": 5}', "step: step must be a whole number"),
    ('{"step": 1, "tokens_per_s": "abc"}', "tokens_per_s: tokens_per_s must be a positive number"),
    ('{"step": 1.5, "tokens_per_s": 5}', "step: step must be a whole number"),
    ('{"step": 1, "tokens_per_s": NaN}', "tokens_per_s: tokens_per_s must be a positive number"),
    ('{"step": 1, "tokens_per_s": 5, "peak_mem_bytes": true}', "peak_mem_bytes: peak_mem_bytes must be a positive"),
    ('{"step": 1, "tokens_per_s": 1' + "0" * 400 + "}", "tokens_per_s: tokens_per_s must be a positive number"),
    ('{"step": 1, "tokens_per_s": 1' + "0" * 5000 + "}", "metrics.jsonl: not a JSON record"),
])
def test_mistyped_metrics_records_are_one_located_line(build, capsys, record, path):
    """A metrics.jsonl line that is no object, or whose step / figures are not numbers, was an INTERNAL error
    (AttributeError, ValueError from int() / float()); it is one K001 line naming the file and line."""
    d, _ = build
    m = d / "metrics.jsonl"
    m.write_text('{"step": 1, "loss": 3.0, "tokens_per_s": 40000.0}\n' + record + "\n")
    assert ms.calibrate_main([str(d)], str(d / "cal.json")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{m}:2: error[K001] {path}"), err
    assert len(err[0]) < 600 and not (d / "cal.json").exists()


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d.update(plan=[1]), "plan must be an object, got a list"),
    (lambda d: d["plan"].update(foo=1), "plan.foo is not a field of a parallelism plan"),
    (lambda d: d["plan"].update(dp_shard=0), "the plan's world size is 0"),
    (lambda d: d["spec"].pop("resolved"), "malformed lock (no spec.resolved)"),
    (lambda d: d["spec"]["resolved"].update(model=5), "malformed lock (spec.resolved.model: "),
    (lambda d: d.update(hardware="h100"), "hardware must be an object, got a string"),
])
def test_an_edited_lock_is_one_K002_line(build, capsys, edit, msg):
    """The lock a run was built from, edited by hand, was a TypeError / pydantic error (INTERNAL) in calibrate."""
    d, _ = build
    lock = json.loads((d / "plan.lock.json").read_text())
    edit(lock)
    (d / "plan.lock.json").write_text(json.dumps(lock))
    (d / "metrics.jsonl").write_text('{"step": 1, "tokens_per_s": 40000.0}\n')
    assert ms.calibrate_main([str(d)], str(d / "cal.json")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{d / 'plan.lock.json'}: error[K002] ") and msg in err[0], err


def test_llmc_layout_finds_the_lock_and_a_missing_input_is_named(build, tmp_path, capsys):
    """``llmc launch`` writes <build>/run/<stage>/metrics.jsonl, two folders below the lock: found without
    --lock. A path that does not exist was taken for a torchtitan log and asked for a --lock."""
    d, c = build
    run = d / "run" / "pretrain"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "tokens_per_s": 40000.0}\n')
    assert ms.read_llmc_run(run).plan == c.plan
    assert ms.calibrate_main([str(tmp_path / "nope")], str(tmp_path / "cal.json")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{tmp_path / 'nope'}: error[K001] input: no such file or directory (pass metrics.jsonl files or "
                   "run folders, torchtitan logs, or .yaml/.csv tables)"]


def test_torchtitan_lines_that_only_look_like_metrics_are_ignored():
    """The log pattern admits text that is no number ("loss: -", "tflops: 1.2.3") and steps of thousands of digits
    (int() refuses them): ValueError, an INTERNAL error. Such a line is not a metrics line; a bad optional field
    is missing."""
    steps = ms.parse_torchtitan_log("step: 1 loss: - tps: 5\n"
                                    f"step: 1{'0' * 5000} loss: 1.0 tps: 5\n"
                                    "step: 12 loss: 2.5 tps: 7,000 tflops: 1.2.3\n")
    assert [(s.step, s.loss, s.tps, s.tflops) for s in steps] == [(12, 2.5, 7000.0, None)]


def test_calibrate_cli_mistyped_inputs_are_one_line(tmp_path):
    """Through the CLI (where an unexpected exception becomes error[INTERNAL]): exit 1, one stderr line."""
    import subprocess
    import sys
    from pathlib import Path

    p = tmp_path / "runs.yaml"
    p.write_text(_YAML_HEAD + f"  - {{id: b, {_YAML_ROW}, vp: 100, pp_schedule: Interleaved1F1B, pp: 2, dp_shard: 4}}\n")
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "calibrate", str(p), "-o", str(tmp_path / "cal.json")],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1, r.stderr
    assert err[0].startswith(f"{p}:5: error[K004] vp: llmc plan refuses this layout (P014): pp 2 x 100 chunks = 200")
    assert "Traceback" not in r.stderr and "INTERNAL" not in r.stderr


def test_provenance_names_the_locks_and_tells_two_runs_of_one_stage_apart(build, tmp_path):
    """Two llmc runs are both "pretrain" (their stage folder) and the inputs' hashes do not fix the predictions:
    the provenance lists each run under its own name and the locks (with their sha256) the predictions come from."""
    import shutil

    d, c = build
    other = tmp_path / "other"
    shutil.copytree(d, other)
    for i, b in enumerate((d, other)):
        run = b / "run" / "pretrain"
        run.mkdir(parents=True)
        run.joinpath("metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens_per_s": 40000.0 + 500 * i + s})
                                                         + "\n" for s in range(1, 30)))
    ins = [str(d / "run" / "pretrain"), str(other / "run" / "pretrain")]
    cal = ms.calibrate_measurements(ms.read_any(ins[0]) + ms.read_any(ins[1]), ins)
    runs = cal.provenance["runs"]
    assert len(set(runs)) == 2 and all(r.startswith("pretrain (") for r in runs), runs
    assert cal.provenance["locks"] == sorted(
        [{"path": str(b / "plan.lock.json"), "sha256": ms.sha256_file(b / "plan.lock.json")} for b in (d, other)],
        key=lambda x: x["path"])


def test_a_table_batch_that_is_no_whole_number_of_steps_is_refused(tmp_path, capsys):
    """global_batch 20 with micro_batch 2 on 8 ranks was modelled as 16 sequences (and 4 as 16): another layout than
    the one measured. One located K004 line."""
    t = tmp_path / "runs.csv"
    t.write_text("id,model,gpus,gpu_key,backend,seq_len,global_batch,micro_batch,dp_shard,tokens_per_s_per_gpu\n"
                 "a,llama3-8b,8,h100-sxm,torchtitan,8192,20,2,8,5000\n")
    assert ms.calibrate_main([str(t)], str(tmp_path / "c.json")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{t}:2: error[K004] global_batch" in err[0] and "20" in err[0], err


def test_the_2024_cp_rows_are_ring_attention_and_their_memory_does_not_grow_with_the_sequence():
    """torchtitan's Dec 2024 CP rows (table 2: Llama 3 8B, 32K tokens per rank at cp 2 / 4 / 8) ran torch's SDPA
    context parallel, which keeps only the rank's K/V chunk: the file says ``cp_attention: ring`` and llmc predicts
    one memory for the three, as measured (84.2 / 84.0 / 84.5 GiB); read as llmc's own FlexAttention all-gather the
    prediction would grow with the whole sequence's K/V per kept block. A bad value is one located K004."""
    import dataclasses
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "torchtitan_llama3_h100_202412.yaml"
    rows = {m.label: m for m in ms.read_table(path)}
    cp = [rows[k] for k in ("tt24-t2-cp2-64k", "tt24-t2-cp4-128k", "tt24-t2-cp8-256k")]
    assert all(m.cp_attention == "ring" and m.plan.cp > 1 for m in cp)
    ring = [ms.predicted(m)[1].reserved_bytes for m in cp]
    gathered = [ms.predicted(dataclasses.replace(m, cp_attention=None))[1].reserved_bytes for m in cp]
    assert max(ring) - min(ring) < 0.01 * ring[0]
    assert gathered[0] > ring[0] and gathered[2] - ring[2] > gathered[0] - ring[0] > 0
    with pytest.raises(ms.MeasurementError) as e:
        ms.table_row({"id": "x", "model": "llama3-8b", "gpus": 8, "seq_len": 8192, "dp_shard": 8, "micro_batch": 1,
                      "global_batch": 8, "cp_attention": "tree"}, {"backend": "torchtitan", "gpu_key": "h100-sxm"},
                     "t.yaml", 3)
    assert "cp_attention" in str(e.value)
