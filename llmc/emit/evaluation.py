"""``eval/tasks.json``: the benchmark evals ``llmc launch`` runs after the chosen stages (lm-evaluation-harness).

Reads only ``compiled.evaluation.tasks`` (tasks, stages, backend, batch size, limit). Local task files
stay as written in the spec (relative to ``spec_dir``, which the runtime resolves them against). For
each stage the file also gives the equivalent ``lm_eval`` command line
(https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/interface.md) on the stage's
Hugging Face export ``run/<stage>/hf``, to run from the build directory; the results land in
``run/<stage>/eval/``; with ``eval.every_checkpoints``, ``checkpoint_results`` lists where each scored
checkpoint's results land (``run/<stage>/eval/step-N/``). (``llmc launch`` runs ``python -m llmc.runtime.evaluate`` instead, which also reads a
task file's relative ``data_files`` next to it; lm_eval itself reads them from the working directory.)
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping

from llmc.emit.base import Emitter
from llmc.emit.common import dump_json, header_fields

TASKS_FILE = "eval/tasks.json"


def _is_local(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def eval_stages(compiled) -> list[str]:
    """Stages whose Hugging Face export is evaluated on ``eval.tasks`` (the launchers' eval steps)."""
    ev = getattr(compiled, "evaluation", None)
    return list(ev.tasks.stages) if ev is not None and ev.tasks is not None else []


class EvalTasksEmitter(Emitter):
    name = "eval"

    def applies(self, compiled) -> bool:
        ev = getattr(compiled, "evaluation", None)
        return ev is not None and ev.tasks is not None

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        t = compiled.evaluation.tasks
        names = t.names  # a local file's task: or group: name (llmc.spec.facts), as lm_eval --tasks takes it
        spec_dir = posixpath.dirname(compiled.spec_path) or "."
        # the commands run from the build directory (pretrained=run/<stage>/hf); spec_dir is relative to it
        include = sorted({posixpath.normpath(posixpath.join(spec_dir, posixpath.dirname(x) or "."))
                          for x in t.tasks if _is_local(x)})
        commands = {}
        for st in t.stages:
            argv = ["lm_eval", "--model", t.backend, "--model_args", f"pretrained=run/{st}/hf",
                    "--tasks", ",".join(names), "--batch_size", str(t.batch_size), "--output_path", f"run/{st}/eval"]
            if include:
                argv += ["--include_path", ",".join(include)]
            if t.limit:
                argv += ["--limit", str(t.limit)]
            if t.apply_chat_template.get(st):  # the chat stages (eval.apply_chat_template), as the eval step runs
                argv += ["--apply_chat_template", "--fewshot_as_multiturn"]
            commands[st] = shlex.join(argv)
        doc = {"_llmc": header_fields(compiled), "tasks": list(t.tasks), "stages": list(t.stages),
               "backend": t.backend, "batch_size": t.batch_size, "limit": t.limit,
               "spec_dir": spec_dir,
               "results": {st: f"run/{st}/eval/eval_results.json" for st in t.stages},
               "lm_eval_commands": commands}
        if t.every_checkpoints is not None:  # eval.every_checkpoints: the checkpoints scored before the export
            doc["every_checkpoints"] = t.every_checkpoints
            doc["checkpoint_results"] = {st: {str(n): f"run/{st}/eval/step-{n}/eval_results.json" for n in steps}
                                         for st, steps in (t.checkpoint_steps or {}).items()}
        return {TASKS_FILE: dump_json(doc)}


__all__ = ["EvalTasksEmitter", "TASKS_FILE", "eval_stages"]
