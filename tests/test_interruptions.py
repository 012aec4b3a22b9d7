"""The unexpected interruptions a plan expects (``checkpoint_cost.interruptions``) and B005.

The rate is Llama 3's published one (arXiv:2407.21783, sec. 3.3.4: 419 unexpected interruptions in a 54-day
snapshot of 405B pre-training on 16,384 H100 GPUs); each interruption costs a restart, the checkpoint read back and,
on average, half a checkpoint interval redone. The figures are recomputed here from the plan's own step, interval and
checkpoint bytes, and the whole-run figures from the published counts."""

from __future__ import annotations

import json

from test_build_fakes import ROOT, compile_example
from typer.testing import CliRunner

from llmc.cli import app

LLAMA3_UNEXPECTED, LLAMA3_DAYS, LLAMA3_GPUS = 419, 54, 16384  # the paper's snapshot


def _plan(spec: str) -> dict:
    r = CliRunner().invoke(app, ["plan", spec, "--format", "json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_the_405b_plan_expects_llama3s_interruptions_and_what_they_cost():
    """At the 405B example's 16,384 GPUs the rate is Llama 3's own: 419 / 54 = 7.76 a day. Each loses a 10-minute
    restart, the checkpoint's node bytes read at the storage's rate and half an interval of steps; the run then takes
    days / (1 - interruptions a day x loss / day)."""
    c = compile_example(ROOT / "examples" / "llama3_405b_h100x16384.yaml")
    t = c.time
    it, ck = t.interruptions, t.checkpoint
    per_day = LLAMA3_UNEXPECTED / LLAMA3_DAYS  # at the paper's GPU count, which is this plan's
    assert c.spec.hardware.count == LLAMA3_GPUS
    assert it.per_gpu_day * LLAMA3_GPUS == per_day
    lost = 600 + ck.node_bytes / (ck.write_gbps * 1e9) + c.hyper.checkpoint_interval * t.step_seconds / 2
    assert abs(it.lost_seconds - lost) < 1e-6
    days = t.days / (1 - per_day * lost / 86400)
    assert abs(it.days - days) < 1e-9 and abs(it.expected - per_day * days) < 1e-6
    # ~25 minutes each (half of a ~30-minute interval + the restart), ~7.76 a day: 13.5% of the time lost
    assert 20 * 60 < it.lost_seconds < 30 * 60 and 0.10 < 1 - t.days / it.days < 0.16
    assert abs(it.extra_fraction - (it.days / t.days - 1)) < 1e-12


def test_b005_when_only_the_interruptions_break_the_budget(tmp_path):
    """The 405B example plans 80.3 days against its 90-day budget; with the expected interruptions it needs ~93:
    a warning (not an error: the rate is one fleet's), none with a 100-day budget, and none on a CPU run."""
    d = _plan(str(ROOT / "examples" / "llama3_405b_h100x16384.yaml"))
    b5 = [x for x in d["diagnostics"] if x["code"] == "B005"]
    it = d["time"]["interruptions"]
    assert d["time"]["days"] <= 90 < it["days"]
    assert len(b5) == 1 and b5[0]["severity"] == "warning" and b5[0]["path"] == "budget.max_days"
    assert f"{it['days']:.1f} days" in b5[0]["message"]
    text = (ROOT / "examples" / "llama3_405b_h100x16384.yaml").read_text().replace("max_days: 90", "max_days: 100")
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    assert not [x for x in _plan(str(spec))["diagnostics"] if x["code"] == "B005"]
    cpu = _plan(str(ROOT / "examples" / "tiny_cpu.yaml"))
    assert cpu["time"]["interruptions"] is None


def test_a_shorter_interval_redoes_less_and_more_gpus_fail_more_often(tmp_path):
    """Halving the checkpoint interval halves the work redone per interruption; the expected count grows with the
    GPUs (the rate is per GPU) over the days the run takes."""
    base = (ROOT / "examples" / "llama3_70b_h100x64.yaml").read_text()
    rows = {}
    for name, extra in (("a", "  checkpoint: {interval_steps: 400}\n"), ("b", "  checkpoint: {interval_steps: 200}\n")):
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(base.replace("training:\n", "training:\n" + extra, 1))
        rows[name] = _plan(str(spec))["time"]
    a, b = rows["a"]["interruptions"], rows["b"]["interruptions"]
    assert abs(b["rollback_seconds"] - a["rollback_seconds"] / 2) < 1e-6
    for r in (a, b):
        assert abs(r["expected"] / (r["per_gpu_day"] * r["days"]) - 64) < 1e-9


def test_an_interval_longer_than_the_time_between_interruptions_never_finishes(tmp_path):
    """Each interruption redoes half an interval: once that, the restart and the read exceed the ~3.1 h between
    interruptions on 16,384 GPUs, the run never finishes. The plan says so (B005 at the interval, budget or not) and
    names the longest interval that finishes: at it the lost share is below 1, one step more it is not."""
    text = (ROOT / "examples" / "llama3_405b_h100x16384.yaml").read_text()
    spec = tmp_path / "s.yaml"
    spec.write_text(text.replace("  checkpoint:\n", "  checkpoint:\n    interval_steps: 3000\n", 1))
    d = _plan(str(spec))
    it, t = d["time"]["interruptions"], d["time"]
    assert it["days"] is None and it["expected"] is None
    between = 86400 / (LLAMA3_UNEXPECTED / LLAMA3_DAYS)
    assert abs(it["between_seconds"] - between) < 1e-6
    assert it["lost_seconds"] > between

    def lost(interval):
        return it["restart_seconds"] + it["load_seconds"] + interval * t["step_seconds"] / 2

    k = it["max_interval_steps"]
    assert lost(k) < between <= lost(k + 1)
    b5 = [x for x in d["diagnostics"] if x["code"] == "B005"]
    assert len(b5) == 1 and b5[0]["path"] == "training.checkpoint.interval_steps"
    assert "never finish" in b5[0]["message"] and f"{k:,} steps" in b5[0]["hint"]
    r = CliRunner().invoke(app, ["plan", str(spec)])
    assert "would never finish" in r.output and "Traceback" not in r.output


def test_a_fleets_own_rate_and_restart_replace_the_published_ones(tmp_path):
    """hardware.interruptions_per_gpu_day and training.checkpoint.restart_minutes are the fleet's figures: the plan
    uses them (a tenth of Llama 3's rate: a tenth as many interruptions a day; a 2-minute restart: 480 s less lost
    each) and says where they come from; a rate of 0 expects none."""
    text = (ROOT / "examples" / "llama3_405b_h100x16384.yaml").read_text()
    base = _plan(str(ROOT / "examples" / "llama3_405b_h100x16384.yaml"))["time"]["interruptions"]
    spec = tmp_path / "s.yaml"
    rate = LLAMA3_UNEXPECTED / (LLAMA3_DAYS * LLAMA3_GPUS) / 10
    spec.write_text(text.replace("  usd_per_gpu_hour: 2.0\n", f"  usd_per_gpu_hour: 2.0\n  interruptions_per_gpu_day: "
                                 f"{rate!r}\n", 1).replace("  checkpoint:\n", "  checkpoint:\n    restart_minutes: 2\n", 1))
    d = _plan(str(spec))
    it = d["time"]["interruptions"]
    assert it["per_gpu_day"] == rate and it["restart_seconds"] == 120
    assert abs(it["lost_seconds"] - (base["lost_seconds"] - 480)) < 1e-6
    assert abs(it["between_seconds"] - 10 * base["between_seconds"]) < 1e-6
    assert not it["published_rate"] and not it["estimated_restart"]
    out = CliRunner().invoke(app, ["plan", str(spec)]).output
    assert "hardware.interruptions_per_gpu_day" in out and "(an estimate)" not in out.split("interruptions", 1)[1]
    spec.write_text(text.replace("  usd_per_gpu_hour: 2.0\n", "  usd_per_gpu_hour: 2.0\n  interruptions_per_gpu_day: 0\n"))
    d = _plan(str(spec))
    assert d["time"]["interruptions"] is None and not [x for x in d["diagnostics"] if x["code"] == "B005"]
