"""``README.md`` of a build: the headline numbers, how to run each backend, how to serve, warnings.

Registered last: it lists every file the other emitters wrote.
"""

from __future__ import annotations

from collections.abc import Mapping

from llmc.emit.base import Emitter
from llmc.emit.common import (
    gpus_per_node,
    header_lines,
    jinja_env,
    nnodes,
    stage_list,
    world,
)
from llmc.emit.deepspeed import CONFIG_PATH, zero_stage_for
from llmc.emit.launchers import build_backend, titan_module
from llmc.emit.serving import served_files


def readme_numbers(compiled) -> list[tuple[str, str]]:
    """(label, value) rows of the README's numbers table, formatted from the compiled run."""
    out: list[tuple[str, str]] = []
    m, h = compiled.model, compiled.hyper
    out.append(("parameters", f"{m.params_total:,} ({m.params_active:,} active)"))
    if compiled.spec.pretrains:  # a pipeline of other stages trains no top-level data
        out.append(("tokens", f"{compiled.compute.tokens:.4g}"))
    p = compiled.plan
    if p is None:
        out.append(("plan", "no pre-training plan: the stages start from the base model (per-stage plans in plan.lock.json)"))
        return out
    out.append(("global batch", f"{h.global_batch_seqs} sequences x {h.seq_len} tokens, {h.steps} steps"))
    out.append(("plan", f"dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x tp {p.tp} x pp {p.pp} x cp {p.cp}"
                        f" (ep {p.ep}), micro-batch {p.micro_batch}, grad-accum {p.grad_accum}, "
                        f"AC {p.ac_label}"))
    if compiled.memory is not None:
        out.append(("memory per GPU", f"{compiled.memory.per_gpu_bytes / 2**30:.2f} GiB of "
                                      f"{compiled.memory.capacity_bytes / 2**30:.2f} GiB"))
    if compiled.time is not None:
        t = compiled.time
        out.append(("time", f"{t.step_seconds:.3g} s/step, MFU {t.mfu:.1%}, {t.days:.3g} days"))
    if compiled.cost is not None:
        out.append(("cost", f"{compiled.cost.gpu_hours:,.0f} GPU-hours, ${compiled.cost.usd:,.0f}"))
    return out


class ReadmeEmitter(Emitter):
    name = "readme"

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        from llmc.emit import build_warnings

        ctx = {
            "header": header_lines(compiled),
            "name": compiled.spec.name,
            "spec_path": compiled.spec_path,
            "spec_sha256": compiled.spec_sha256,
            "gpu": compiled.spec.hardware.gpu,
            "world": world(compiled),
            "gpus_per_node": gpus_per_node(compiled),
            "nnodes": nnodes(compiled),
            "stages": stage_list(compiled),
            "has_titan": bool(titan_module(earlier)),
            "default_backend": build_backend(compiled, earlier),
            "has_ds": CONFIG_PATH in earlier,
            "zero_stage": zero_stage_for(compiled) if CONFIG_PATH in earlier else 0,
            "warnings": [d.render() for d in build_warnings(compiled)],
            "serving": served_files(earlier),
            "files": sorted([*earlier, "README.md"]),
            "numbers": readme_numbers(compiled),
        }
        return {"README.md": jinja_env().get_template("launch/README.md.j2").render(**ctx)}
