"""Emitters: compiled run -> build files, one module per target (see ``llmc.emit.base.Emitter``).

``EMITTERS`` is the registry, in order (an emitter sees the files of those before it):
lock (plan.lock.json), torchtitan, deepspeed, serving (vLLM, SGLang), launchers (native / torchrun /
Slurm scripts, .gitignore), skypilot and kubeflow (multi-node GPU builds only), readme (README.md, last:
it lists every file).

``render_artifacts(compiled)`` runs every applicable emitter and returns ``{relative path: text}``;
pure (the CLI writes the tree atomically) and deterministic (no timestamps, sorted JSON).

Build-wide diagnostics:
    X100 error    no plan and no stages: nothing to build
    X117 warning  a ``cluster.kubernetes`` / ``cluster.skypilot`` section on a build that writes no cluster manifest
                  (one node, or the CPU): ``llmc.emit.skypilot.unused_site``
"""

from __future__ import annotations

from dataclasses import replace

from llmc.diagnostics import Diagnostic, SpecError, errors, sort_diagnostics
from llmc.emit.base import Emitter
from llmc.emit.common import diag
from llmc.emit.deepspeed import DeepSpeedEmitter
from llmc.emit.evaluation import EvalTasksEmitter
from llmc.emit.kubeflow import KubeflowEmitter
from llmc.emit.launchers import LaunchersEmitter
from llmc.emit.lock import LockEmitter
from llmc.emit.readme import ReadmeEmitter
from llmc.emit.serving import ServingEmitter
from llmc.emit.skypilot import SkyPilotEmitter, unused_site
from llmc.emit.torchtitan import TorchtitanEmitter

EMITTERS: list[Emitter] = [LockEmitter(), TorchtitanEmitter(), DeepSpeedEmitter(), ServingEmitter(),
                           LaunchersEmitter(), SkyPilotEmitter(), KubeflowEmitter(), EvalTasksEmitter(), ReadmeEmitter()]


def build_diagnostics(compiled) -> list[Diagnostic]:
    """Every build-time diagnostic of the applicable emitters, located in the spec file."""
    if compiled.plan is None and not compiled.stages:
        diags = [diag("X100", "error", "", "no feasible parallelism plan: nothing to build",
                      "run `llmc plan` to see why every candidate was rejected")]
    else:
        # (a pipeline of stages from a base model has no pre-training plan; its stages carry their own)
        diags = [d for e in EMITTERS if e.applies(compiled) for d in e.diagnostics(compiled)]
        diags += unused_site(compiled)  # X117: a cluster section no manifest uses
    return [d if d.file else replace(d, file=compiled.spec_path) for d in diags]


def build_warnings(compiled) -> list[Diagnostic]:
    """The non-error build diagnostics (also listed in README.md), for the CLI to print."""
    return sort_diagnostics([d for d in build_diagnostics(compiled) if d.severity != "error"])


def render_artifacts(compiled, emitters: list[Emitter] | None = None) -> dict[str, str]:
    """Every build artifact as {relative path: text}; raises SpecError on build errors."""
    errs = errors(build_diagnostics(compiled))
    if errs:
        raise SpecError(sort_diagnostics(errs))
    files: dict[str, str] = {}
    for e in EMITTERS if emitters is None else emitters:
        if e.applies(compiled):
            files.update(e.files(compiled, dict(files)))
    return dict(sorted(files.items()))


__all__ = ["EMITTERS", "Emitter", "build_diagnostics", "build_warnings", "render_artifacts"]
