"""Launch scripts for every stage of a build, and the build's ``.gitignore``.

    native/launch.sh                llmc's own runtime, torchrun single node, every stage in order
    launch/torchrun_single_node.sh  torchrun --standalone (BACKEND=native|torchtitan)
    launch/torchrun_multi_node.sh   NNODES / MASTER_ADDR, rendezvous c10d (node ranks assigned by c10d), one per
                                    stage (its own id and port: MASTER_PORT + the stage's position)
    launch/slurm.sbatch             srun torchrun, rendezvous on the first host

Each script runs ``python -m llmc.runtime.entry prepare`` (tokenizer + data under the build
directory), then each stage in order, skipping those whose ``run/<stage>/DONE.json`` exists. After
each stage listed in ``evaluation.tasks.stages`` (``eval.tasks``), whatever the backend, they run
``python -m llmc.runtime.evaluate`` on the stage's Hugging Face export (after exporting a torchtitan
stage with ``python -m llmc.runtime.hf_io``), skipped once ``run/<stage>/eval/summary.json`` exists.

A stage's stderr is shown live and appended to ``run/<stage>/stderr.log`` (the file ``llmc launch`` keeps; with
``NNODES`` > 1, ``launch/torchrun_multi_node.sh`` appends each node's to its own ``run/<stage>/stderr.<node>.log``,
<node> the host's short name or ``LOG_NODE``: on a shared filesystem such as NFS, appends from several hosts to one
file can lose lines, open(2) O_APPEND); a stage that does not finish ends the script with one line
(``launch/_logged.sh.j2``): the stage, its exit status, its cause (llmc's ``error[...]`` line, else the last Python
exception, never torchrun's own ChildFailedError report, torch/distributed/elastic/multiprocessing/errors) and the
log's path, or, for a stage that saved its step on a signal, how to resume. Nothing is filtered out of the output
above that line. torchrun exits 1 whenever a worker exits non-zero, so a stage also counts as preempted (exit 75)
when every worker status in torchrun's failure report on this node is 75: with several nodes, that is how a stop
shows on the nodes the signal did not reach (the trainers agree on a stop at a step boundary,
``llmc.runtime.preempt``). The cause and that report are read from the node's own output of this attempt, not from
its log, which keeps the earlier attempts' too.

``native/launch.sh``'s header carries warning X115 when the native run of this build's pre-training does not fit the
GPU (``Compiled.backend_runs["native"]``: the compiler's memory model, the native profile, on the plan's layout; a
build planned for torchtitan or DeepSpeed writes this launcher too). The build prints it and lists it in README.md;
``llmc launch --backend native`` says the same (L015) before it starts.

Slurm (``slurm/slurm.sbatch.j2``): the time-limit warning (``--signal=B:USR1@N``, and a preemption under
``PreemptParameters=send_user_signal``) saves the running step and requeues the job; a SIGTERM to the batch shell
is a cancel (``scancel``, job state CANCELLED) or a preemption Slurm itself requeues or cancels (slurm.conf
``PreemptMode``): the step may save, but the script never requeues it nor starts another stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from llmc import escape
from llmc.buildfs import GITIGNORE as BUILDFS_GITIGNORE
from llmc.emit.base import Emitter
from llmc.emit.common import (
    RDZV_PORT,
    gpus_per_node,
    header_lines,
    is_cpu,
    jinja_env,
    launch_backend,
    launcher_context,
    nnodes,
    nvlink_hint,
    planned_backend,
    stage_list,
    unfit_run_diagnostic,
    world,
)
from llmc.emit.deepspeed import CONFIG_PATH
from llmc.emit.evaluation import eval_stages
from llmc.runtime.runlock import EXIT_PREEMPTED  # torch-free (the preempted status)

TITAN_CONFIG_FN = "job"

# What `llmc launch` / the runtime write into a build directory (prepare_assets: assets/, data/,
# cache/; stage outputs: run/; torchtitan dumps: outputs/); the build itself is meant to be committed.
BUILD_GITIGNORE = (
    "# llmc build: generated inputs and run outputs (the build files themselves are meant to be committed)\n"
    "/assets/\n/cache/\n/data/\n/outputs/\n/run/\n"
    "# an interrupted `llmc build` (its manifest, .llmc-build.json, is committed with the build)\n"
    + BUILDFS_GITIGNORE
)

SCRIPTS = {
    "native/launch.sh": "launch/native_launch.sh.j2",
    "launch/torchrun_single_node.sh": "launch/torchrun_single_node.sh.j2",
    "launch/torchrun_multi_node.sh": "launch/torchrun_multi_node.sh.j2",
    "launch/slurm.sbatch": "slurm/slurm.sbatch.j2",
}


def titan_module(files: Mapping[str, str]) -> str:
    """The torchtitan job module among the build files (``""`` when none was emitted)."""
    mods = sorted(k for k in files if k.startswith("torchtitan/") and k.endswith(".py"))
    return mods[0].rsplit("/", 1)[1][:-3] if mods else ""


def launch_context(compiled, files: Mapping[str, str]) -> dict[str, Any]:
    """The values every launch script template reads."""
    cpu = is_cpu(compiled)
    # on CPU the plan's world (hardware.count) runs as that many processes on one node (the torchtitan scripts
    # do the same), not as hardware.count nodes of one "GPU" each: the runtime refuses any other WORLD_SIZE
    n = 1 if cpu else nnodes(compiled)
    mod = titan_module(files)
    return {
        "header": header_lines(compiled),
        "name": compiled.spec.name,
        "job_name": compiled.spec.name,
        "stages": stage_list(compiled),
        "gpus_per_node": procs_per_node(compiled),
        "nnodes": n,
        "last_node_rank": n - 1,
        "is_cpu": cpu,
        "titan_module": mod,
        "titan_config": TITAN_CONFIG_FN,
        "has_titan": bool(mod),
        "has_ds": CONFIG_PATH in files,
        "default_backend": build_backend(compiled, files),
        "rdzv_port": RDZV_PORT,
        "preempted_exit": EXIT_PREEMPTED,
        **launcher_context(compiled),  # torchrun's shutdown time, the Slurm signal's lead
        "eval_stages": eval_stages(compiled),
        "native_refuses": native_refused_stages(compiled),
        # native/launch.sh's header: X115 when the native run of this build does not fit the GPU (the compiler's figure)
        "native_warnings": [d.render() for d in native_fit_diagnostics(compiled, located=True)],
        **nvlink_context(compiled, n),
    }


def native_fit_diagnostics(compiled, located: bool = False) -> list:
    """X115 when the native run of this build's pre-training (what ``native/launch.sh`` and ``llmc launch --backend
    native`` start) does not fit the GPU: ``Compiled.backend_runs["native"]``, which the compiler sized (the native
    profile on the plan's layout); ``located``: with the spec file, as ``llmc.emit.build_diagnostics`` locates it."""
    d = unfit_run_diagnostic(compiled, "native")
    if d is None:
        return []
    return [replace(d, file=d.file or compiled.spec_path) if located else d]


def nvlink_context(compiled, n_nodes: int) -> dict[str, Any]:
    """:func:`llmc.emit.common.nvlink_hint` for the script that runs every stage: the TP is the widest of
    pre-training's plan and the stages' searched layouts."""
    tps = [compiled.plan.tp] if compiled.plan is not None else []
    tps += [sp.layout.tp for sp in compiled.stages if getattr(sp, "layout", None) is not None]
    return nvlink_hint(compiled, max(tps, default=1), n_nodes)


def procs_per_node(compiled) -> int:
    """Processes per node of the launchers: the GPUs per node, or on CPU the whole world on one node."""
    return world(compiled) if is_cpu(compiled) else gpus_per_node(compiled)


def native_refused_stages(compiled) -> list[str]:
    """Stages llmc's own trainers (native and DeepSpeed) refuse at launch (``TrainJob.check_runner``): pre-training
    whose plan uses a degree they do not run (``NATIVE_UNSUPPORTED``), and continued training planned as its own
    torchtitan job (a stage ``layout``)."""
    from llmc.runtime.capabilities import NATIVE_UNSUPPORTED

    plan = compiled.plan
    out = []
    for s in stage_list(compiled):
        sp = next((x for x in compiled.stages if x.name == s["name"]), None)
        if s["kind"] == "pretrain" and plan is not None and any(getattr(plan, k) != 1 for k in NATIVE_UNSUPPORTED):
            out.append(s["name"])
        elif sp is not None and getattr(sp, "layout", None) is not None:
            out.append(s["name"])
    return out


def build_backend(compiled, files: Mapping[str, str]) -> str:
    """The default backend of the build's launchers: the one the plan was computed for, when its
    artifacts were emitted (``llmc.emit.common.launch_backend``)."""
    return launch_backend(planned_backend(compiled), compiled.plan, bool(titan_module(files)), CONFIG_PATH in files)


class LaunchersEmitter(Emitter):
    name = "launchers"

    def diagnostics(self, compiled) -> list:
        return native_fit_diagnostics(compiled)

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        ctx = launch_context(compiled, earlier)
        env = jinja_env()
        out = {path: env.get_template(tpl).render(**ctx) for path, tpl in SCRIPTS.items()}
        # `llmc launch` writes its inputs and outputs next to the committed files; keep them out of git.
        out[".gitignore"] = "".join(escape.comment(ln, "sh") + "\n" for ln in header_lines(compiled)) + BUILD_GITIGNORE
        return out
