"""``README.md`` of a build: the headline numbers, how to run each backend, how to serve, warnings.

Registered last: it lists every file the other emitters wrote. It names the spec file's own sha256 and has a
"Rebuild" section (:func:`rebuild_section`): the ``llmc build`` command, run from the build directory, that
reproduces the build, ``--set`` overrides included, and with overrides the sha256 of the spec plus them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from llmc.emit.base import Emitter
from llmc.emit.common import (
    build_command,
    gpus_per_node,
    header_lines,
    jinja_env,
    nnodes,
    sh_word,
    spec_named,
    stage_list,
    world,
)
from llmc.emit.deepspeed import CONFIG_PATH, zero_stage_for
from llmc.emit.launchers import build_backend, titan_module
from llmc.emit.serving import served_files
from llmc.spec.load import STDIN_SPEC


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


def rebuild_section(compiled) -> str:
    """The README's "Rebuild" section (Markdown): the command that reproduces the build from the build directory
    (``compiled.spec_path`` is relative to it; ``-o .``), shlex-quoted, in a fenced code block whose fence is longer
    than any run of backticks in it (CommonMark 0.31 section 4.5: the block then ends only at that fence)."""
    stdin = compiled.spec_path == STDIN_SPEC  # `llmc build -`: the spec came on standard input
    cal = compiled.calibration.file if compiled.calibration is not None else None
    given = cal["path"] if cal and not compiled.spec.calibration else None  # --calibration FILE (its name, sha256)
    # (without the fit check the plan may not fit: the rebuild needs the option again, or it stops at P004 / G005)
    here = compiled.spec_folder()
    moved = stdin and here != "."  # its relative paths resolve against the folder `llmc build -` ran in: build there
    cmd = build_command("-" if stdin else compiled.spec_path, ".", compiled.overrides, calibration=given,
                        fit_check=compiled.fit_check, out_expr='"$b"' if moved else None) + (" < SPEC" if stdin else "")
    if moved:
        cmd = f'b="$PWD" && cd {sh_word(here)} && ' + cmd
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", cmd)), default=0))
    out = ["## Rebuild", "",
           "From this directory, this command reproduces the build"
           + (" (its `--set` overrides included)" if compiled.overrides else "")
           + (", given the same spec on standard input (it was read from there: its sha256 is below; SPEC is its "
              "path, from the folder the build ran in, where its relative paths resolve):" if stdin else ":"),
           "", f"{fence}sh", cmd, fence, ""]
    if stdin and not compiled.overrides:
        out += [f"The spec's sha256 is `{compiled.spec_sha256}`.", ""]
    if cal and not compiled.spec.calibration:
        out += [f"`--calibration` names the calibration file the build read (sha256 `{cal['sha256']}`, "
                "`calibration.file` in `plan.lock.json`) by its file name: give its path.", ""]
    if compiled.overrides:
        out += [f"The spec file's own sha256 is `{compiled.spec_file_sha256 or 'unknown'}`; with the "
                f"{len(compiled.overrides)} override(s) applied (`spec.sha256` in `plan.lock.json`, the headers' "
                f"\"spec + overrides sha256\") it is `{compiled.spec_sha256}`. Building the spec without them builds "
                "another run.", ""]
    return "\n".join(out) + "\n"


def _with_section(text: str, section: str, before: str = "## Numbers\n") -> str:
    """``text`` with ``section`` (which ends with a blank line) inserted before its first line ``before`` (at its
    end without one)."""
    at = text.find("\n" + before)
    return text + "\n" + section if at < 0 else text[: at + 1] + section + text[at + 1:]


class ReadmeEmitter(Emitter):
    name = "readme"

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        from llmc.emit import build_warnings

        ctx = {
            "header": header_lines(compiled),
            "name": compiled.spec.name,
            "spec_path": spec_named(compiled),
            # the file's own hash (with --set overrides the build's spec_sha256 hashes them too: rebuild_section)
            "spec_sha256": compiled.spec_file_sha256 or ("unknown" if compiled.overrides else compiled.spec_sha256),
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
            "serving": served_files(compiled, earlier),
            "files": sorted([*earlier, "README.md"]),
            "numbers": readme_numbers(compiled),
        }
        text = jinja_env().get_template("launch/README.md.j2").render(**ctx)
        return {"README.md": _with_section(text, rebuild_section(compiled))}
