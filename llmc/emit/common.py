"""What every emitter shares: the file header, JSON dumping, the Jinja2 environment, diagnostics.

Every generated file opens with a header naming llmc's version, the target library versions and
the spec sha256; a build made with ``--set`` overrides names the spec file's own sha256, the overrides (their
command-line text, in order) and labels the sha256 of the spec plus overrides as such (a build without overrides
keeps the one ``spec sha256``, which is then the file's). JSON is written with sorted keys and a trailing newline (deterministic, diffable).
Templates are rendered with ``StrictUndefined`` and do no arithmetic: every number is computed by
the emitter (or the compiler) and handed over as a value.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping
from functools import cache
from typing import Any

from llmc import escape
from llmc.compiler.plan import ParallelPlan
from llmc.diagnostics import Diagnostic
from llmc.runtime.capabilities import (
    DS_STAGE_KINDS,
    NATIVE_UNSUPPORTED,
    TITAN_PRETRAIN_MODULE,
    TITAN_STAGE_KINDS,
    titan_stage_module,
)

GEN_NOTE = "generated file, do not edit: change the spec and run `llmc build` again"

# The module built jobs run: ``python -m llmc.runtime.entry`` (prepare, then one stage at a time).
RUNTIME_ENTRY = "llmc.runtime.entry"
#: The c10d rendezvous port of multi-node launches (torchrun's and the DeepSpeed launcher's default, 29500).
RDZV_PORT = 29500


def diag(code: str, severity: str, path: str, message: str, hint: str = "") -> Diagnostic:
    return Diagnostic(code=code, severity=severity, path=path, message=message, hint=hint)  # type: ignore[arg-type]


def unfit_run_words(backend: str, layout: str, per_gpu_bytes: int, capacity_bytes: int, usable_bytes: int,
                    planned: bool) -> str:
    """What X115 (the build) and L015 (``llmc launch``) say of a backend's pre-training run that does not fit the GPU,
    from the compiler's figure (``Compiled.backend_runs``, the lock's ``backend_runs``): nothing recomputed here."""
    from llmc.compiler.units import gib

    whose = "the plan's own backend, compiled with --no-fit-check" if planned else "not the backend the plan was made for"
    return (f"the {backend} run of this build's pre-training does not fit the GPU: llmc's memory model (the {backend} "
            f"profile) puts it at {gib(per_gpu_bytes)} per GPU, over the {gib(usable_bytes)} usable of the "
            f"{gib(capacity_bytes)} GPU ({layout}; {whose})")


def unfit_run_hint(backend: str, planned: bool) -> str:
    if planned:
        return "rebuild without --no-fit-check: the search then keeps to layouts that fit"
    return (f"`llmc launch` without --backend runs the backend the plan was made for; `llmc plan SPEC --set "
            f"training.backend={backend}` plans a layout for this one")


def unfit_run_diagnostic(compiled, backend: str) -> Diagnostic | None:
    """X115 (warning) when ``backend``'s pre-training run of this build does not fit the GPU
    (``Compiled.backend_runs``, sized once by the compiler: llmc.compiler.compile.backend_runs); None when it fits or
    was not sized (no plan, no GPU, or a runner that does not train the plan)."""
    run = (getattr(compiled, "backend_runs", None) or {}).get(backend)
    if run is None or run.fits:
        return None
    return diag("X115", "warning", "parallelism",
                unfit_run_words(backend, run.layout, run.per_gpu_bytes, run.capacity_bytes, run.usable_bytes,
                                run.planned),
                unfit_run_hint(backend, run.planned))


#: What ``spec_sha256`` hashes in the header of a build made with ``--set`` overrides.
SPEC_PLUS_OVERRIDES = "the spec file's bytes followed by the --set overrides (llmc.overrides.override_bytes)"


def set_options(overrides) -> list[str]:
    """``["--set", text, ...]``: the overrides as ``llmc build`` takes them, in order."""
    return [word for text in overrides for word in ("--set", str(text))]


# characters a word keeps as they are inside $'...' (the rest: \xHH of each UTF-8 byte)
_PLAIN_CHAR = re.compile(r"[A-Za-z0-9_ .,/=:+@%-]")
# characters that make a word printed as $'...' rather than shlex-quoted (with the unprintable ones): what would read
# as an expansion or HTML outside the quotes (a build's README holds no such spec-controlled text:
# tests/test_safety_e2e.py)
_ODD = re.compile(r"[$`\\<>]")


def sh_word(word: str) -> str:
    """``word`` as one shell word: as it is when no shell reads anything in it, ``shlex.quote``-d when it holds only
    printable characters that are no shell or Markdown syntax, else ANSI-C quoted (``$'...'``, every other
    character as the ``\\xHH`` escapes of its UTF-8 bytes: bash, zsh, ksh and POSIX.1-2024 sh read it back
    exactly), so it stays one line of inert text."""
    if word.isprintable() and not _ODD.search(word):
        return shlex.quote(word)
    raw = word.encode("utf-8", "surrogateescape")
    return "$'" + "".join(chr(b) if b < 128 and _PLAIN_CHAR.match(chr(b)) else f"\\x{b:02x}" for b in raw) + "'"


def build_command(spec_path: str, out: str, overrides=(), *, calibration: str | None = None,
                  fit_check: bool = True, out_expr: str | None = None) -> str:
    """The shell command that builds ``spec_path`` into ``out`` with the ``--set`` overrides given, a
    ``--calibration`` file given on the command line and ``--no-fit-check`` when the build was made without the fit
    check (the lock's ``fit_check``), each word quoted by :func:`sh_word` (``shlex.quote`` for every ordinary path and
    value): the one rebuild command of the build README and of ``llmc launch``'s L009. ``out_expr``: the output folder
    as a shell expression of llmc's own (the README's ``"$b"``), written as it is in place of ``out``."""
    words = [sh_word(w) for w in ("llmc", "build", str(spec_path), "-o", str(out), *set_options(overrides))]
    if out_expr is not None:
        words[4] = out_expr
    if calibration:
        words += [sh_word("--calibration"), sh_word(calibration)]
    if not fit_check:
        words.append(sh_word("--no-fit-check"))
    return " ".join(words)


def spec_named(compiled) -> str:
    """The spec a build was built from, as its README and headers name it: its path (relative to the build
    directory), or "standard input" for ``llmc build -`` (``llmc.spec.load.STDIN_SPEC``)."""
    from llmc.spec.load import STDIN_SPEC

    return "standard input" if compiled.spec_path == STDIN_SPEC else compiled.spec_path


def header_fields(compiled) -> dict[str, Any]:
    """The header of the JSON artifacts (the lock's ``_llmc``). With ``--set`` overrides it also holds
    ``spec_file_sha256`` (the file's own bytes), ``overrides`` and ``spec_sha256_of`` (what ``spec_sha256`` hashes
    then); without, it is as it always was (``spec_sha256`` is the file's)."""
    import llmc

    h = {"generated_by": f"llmc {llmc.__version__}", "llmc_version": llmc.__version__,
         "target_versions": dict(sorted(llmc.TARGET_VERSIONS.items())), "spec_sha256": compiled.spec_sha256,
         "note": GEN_NOTE}
    if compiled.overrides:
        h.update(spec_file_sha256=compiled.spec_file_sha256, overrides=list(compiled.overrides),
                 spec_sha256_of=SPEC_PLUS_OVERRIDES)
    return h


def header_lines(compiled) -> list[str]:
    """The text header of every other artifact (each emitter writes it as comments of its language)."""
    return header_text(header_fields(compiled))


def header_text(h: Mapping[str, Any]) -> list[str]:
    """:func:`header_lines` from the header's fields (a lock's ``_llmc``: the SkyPilot / Kubeflow manifests, which
    are written from the lock, name the same hashes)."""
    targets = ", ".join(f"{k} {v}" for k, v in sorted((h.get("target_versions") or {}).items()))
    out = [f"{h.get('generated_by', 'llmc')}: {GEN_NOTE}", f"targets: {targets}"]
    if not h.get("overrides"):
        return [*out, f"spec sha256: {h.get('spec_sha256', '')}"]
    return [*out, f"spec file sha256: {h.get('spec_file_sha256') or 'unknown'}",
            f"overrides: {shlex.join(h['overrides'])}",  # (their text: "--set" reads "-\x2dset" in Markdown's comments)
            f"spec + overrides sha256: {h.get('spec_sha256', '')}"]


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def py_literal(value: Any) -> str:
    """A Python literal for a template (floats keep full precision via repr). A missing context key fails
    here as everywhere else (``repr`` of Jinja2's StrictUndefined would print ``Undefined``)."""
    from jinja2 import Undefined

    if isinstance(value, Undefined):
        str(value)  # StrictUndefined: raises UndefinedError naming the key
        raise TypeError("py: undefined value")
    if isinstance(value, float) and math.isinf(value):
        return 'float("inf")'
    return repr(value)


@cache
def jinja_env():
    """The one Jinja2 environment of every emitter (templates under ``llmc/templates``)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("llmc", "templates"), undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["py"] = py_literal
    # every user-controlled string (spec path, names, paths, messages) goes through one of these
    env.filters["cpy"] = lambda s: escape.comment(str(s), "py")
    env.filters["csh"] = lambda s: escape.comment(str(s), "sh")
    env.filters["cyaml"] = lambda s: escape.comment(str(s), "yaml")
    env.filters["cmd"] = lambda s: escape.comment(str(s), "md")
    env.filters["sh"] = lambda s: escape.sh_quote(str(s))
    env.filters["yaml"] = lambda s: escape.yaml_scalar(str(s))
    env.filters["md"] = lambda s: escape.md_text(str(s))
    env.filters["visible"] = lambda s: escape.visible(str(s))
    return env


def world(compiled) -> int:
    return int(compiled.spec.hardware.count)


def gpus_per_node(compiled) -> int:
    """GPUs per node of the compiled hardware (the spec override is applied by the compiler),
    at most the GPU count."""
    return max(1, min(int(compiled.gpu.gpus_per_node), world(compiled)))


def nnodes(compiled) -> int:
    return max(1, -(-world(compiled) // gpus_per_node(compiled)))


def nvlink_hint(compiled, tp: int, n_nodes: int) -> dict:
    """The Slurm scripts' segment hint: ``nvlink_segment``, the nodes per segment that keep a job's TP groups of ``tp``
    in one NVLink domain (``hardware.nvlink_segment_nodes``; None: nothing to ask), and the domain's size."""
    from llmc.compiler.hardware import nvlink_group, nvlink_segment_nodes

    gpu = compiled.gpu
    if gpu is None or is_cpu(compiled):
        return {"nvlink_segment": None, "nvlink_domain": None, "nvlink_domain_nodes": None}
    dom = nvlink_group(gpu)
    return {"nvlink_segment": nvlink_segment_nodes(gpu, tp, n_nodes), "nvlink_domain": dom,
            "nvlink_domain_nodes": dom // max(1, gpu.gpus_per_node)}


def site_env(spec) -> list[dict[str, str]]:
    """The spec's ``cluster.env`` as ``[{"name", "value"}]`` sorted by name, the order of the lock (sorted JSON) and
    so of the cluster manifests (the names are checked by ``llmc.spec.schema.env_name``): what every launcher
    exports."""
    cluster = getattr(spec, "cluster", None)
    return [{"name": k, "value": v} for k, v in sorted(cluster.env.items() if cluster is not None else ())]


def preemption_context(compiled) -> dict[str, Any]:
    """The launch scripts' shutdown figures after a SIGTERM, as the plan sized them (``Compiled.preemption``,
    ``llmc.compiler.checkpoint_cost.preemption_numbers``): torchrun's ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, the Slurm
    script's signal lead, and what they rest on (for the scripts' comments)."""
    from llmc.compiler.checkpoint_cost import PREEMPT_FLOOR_S, PREEMPT_SAFETY, preemption_numbers

    p = compiled.preemption or preemption_numbers([])
    job = (f"{p.job}: a step of {p.step_seconds:.3g} s + a save of {p.save_seconds:.3g} s" if p.job is not None
           else "no save predicted")
    return {"elastic_shutdown_s": p.shutdown_seconds, "signal_lead_s": p.signal_lead_seconds, "preempt_job": job,
            "preempt_safety": f"{PREEMPT_SAFETY:g}", "preempt_floor_s": PREEMPT_FLOOR_S}


def launcher_context(compiled) -> dict[str, Any]:
    """What every launcher's template takes from the plan beyond its own: the shutdown figures
    (:func:`preemption_context`) and ``site_env``, the spec's ``cluster.env`` (:func:`site_env`), both rendered by
    ``launch/_logged.sh.j2``, which every launcher includes (torchrun, Slurm, torchtitan's and DeepSpeed's)."""
    return {**preemption_context(compiled), "site_env": site_env(compiled.spec)}


def is_cpu(compiled) -> bool:
    return str(compiled.spec.hardware.gpu).lower() == "cpu"


def default_backend(plan: ParallelPlan | None, has_titan: bool) -> str:
    """The backend a build runs with when none is named: ``native``, or ``torchtitan`` when the plan
    uses a degree the native trainer refuses (``NATIVE_UNSUPPORTED``) and a torchtitan job exists."""
    if plan is None or not has_titan:
        return "native"
    return "torchtitan" if any(getattr(plan, k) > 1 for k in NATIVE_UNSUPPORTED) else "native"


LAUNCH_BACKENDS = ("native", "torchtitan", "deepspeed")


def launch_backend(planned: str | None, plan: ParallelPlan | None, has_titan: bool, has_ds: bool) -> str:
    """The backend a build's launchers and ``llmc launch`` use by default: the one the plan was computed
    for (``Compiled.backend.name``) when the build has its artifacts, else :func:`default_backend`."""
    if planned == "native" or (planned == "torchtitan" and has_titan) or (planned == "deepspeed" and has_ds):
        return planned
    return default_backend(plan, has_titan)


def planned_backend(compiled) -> str | None:
    """``compiled.backend.name`` (None when the compile recorded none)."""
    return compiled.backend.name if compiled.backend is not None else None


def stage_list(compiled) -> list[dict]:
    """Stages in execution order (``compiled.stages`` order); one ``pretrain`` stage when there are none. ``titan``:
    a torchtitan job runs it under the torchtitan backend (pre-training, and continued training with its own searched
    ``layout``), ``titan_module`` its job module, ``titan_init`` the stage whose Hugging Face export it starts from
    (a continued stage's ``init_from``; None for pre-training, which starts from ``init_hf`` or a fresh init)."""
    out = []
    for i, s in enumerate(compiled.stages):
        own = getattr(s, "layout", None) is not None
        out.append({"name": s.name, "kind": s.kind, "init_from": s.init_from,
                    "ds": s.kind in DS_STAGE_KINDS, "titan": s.kind in TITAN_STAGE_KINDS or own,
                    "titan_module": titan_stage_module(i) if own else TITAN_PRETRAIN_MODULE,
                    "titan_init": s.init_from if own and not s.init_hf else None})
    return out
