"""``eval/tasks.json`` and ``eval/tasks/``: the benchmark evals ``llmc launch`` runs after the chosen stages
(lm-evaluation-harness), and the build's copies of their local task files.

Reads only ``compiled.evaluation.tasks`` (tasks, stages, backend, batch size, limit, task files). A build is
committed and copied to each node on its own, so it carries its local task files: each local file of
``eval.tasks`` and the local files it reads are written under ``eval/tasks/<name>/`` byte for byte
(:mod:`llmc.compiler.evaluation`, ``task_files``: where each goes and its sha256, which the lock and this file
record), and the eval step reads those copies, never the spec's folder. For each stage the file also gives the
equivalent ``lm_eval`` command line (https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/interface.md)
on the stage's Hugging Face export ``run/<stage>/hf``, to run from the build directory (``--include_path`` names the
copies' folders); the results land in ``run/<stage>/eval/``; with ``eval.every_checkpoints``, ``checkpoint_results``
lists where each scored checkpoint's results land (``run/<stage>/eval/step-N/``). (``llmc launch`` runs ``python -m
llmc.runtime.evaluate`` instead, which also reads a task file's relative ``data_files`` next to it; lm_eval itself
reads them from the working directory.) A compile that read no task file (no spec facts) records no copies: its
local task files stay as written in the spec, relative to ``spec_dir``.

Build diagnostic:
    X014 warning  the copied task files pass :data:`LARGE_COPIES` bytes in all (the build is meant to be committed)
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping

from llmc.diagnostics import Diagnostic
from llmc.emit.base import Emitter
from llmc.emit.common import diag, dump_json, header_fields

TASKS_FILE = "eval/tasks.json"
#: Copied task files past this many bytes in all draw X014: llmc's threshold for a build directory committed to git,
#: well under the 50 MiB per file at which GitHub warns on a push
#: (https://docs.github.com/en/repositories/working-with-files/managing-large-files/about-large-files-on-github)
LARGE_COPIES = 16 * 2**20


def _is_local(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def eval_stages(compiled) -> list[str]:
    """Stages whose Hugging Face export is evaluated on ``eval.tasks`` (the launchers' eval steps)."""
    ev = getattr(compiled, "evaluation", None)
    return list(ev.tasks.stages) if ev is not None and ev.tasks is not None else []


def _copy_content(data: bytes) -> str | bytes:
    """A copy as the build writes it: text where it is UTF-8 (written back byte for byte), else the bytes."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


class EvalTasksEmitter(Emitter):
    name = "eval"

    def applies(self, compiled) -> bool:
        ev = getattr(compiled, "evaluation", None)
        return ev is not None and ev.tasks is not None

    def diagnostics(self, compiled) -> list[Diagnostic]:
        copies = compiled.evaluation.tasks.copies
        size = sum(len(b) for b in copies.values())
        if size <= LARGE_COPIES:
            return []
        return [diag("X014", "warning", "eval.tasks",
                     f"the build copies {len(copies)} eval task file(s), {size / 2**20:.1f} MiB in all, into "
                     f"eval/tasks/ (more than {LARGE_COPIES // 2**20} MiB in a build meant to be committed)",
                     "keep them (git LFS), or point the task's data_files at an absolute path on storage every node "
                     "reads: absolute paths are read where they are, not copied")]

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        t = compiled.evaluation.tasks
        names = t.names  # a local file's task: or group: name (llmc.spec.facts), as lm_eval --tasks takes it
        spec_dir = compiled.spec_folder()
        copied = t.task_files
        # the commands run from the build directory (pretrained=run/<stage>/hf): the copies' folders, relative to
        # it; without copies (no facts read) the spec's folders, relative to it as spec_dir is
        include = sorted({posixpath.dirname(copied[x].path) if copied is not None and x in copied else
                          posixpath.normpath(posixpath.join(spec_dir, posixpath.dirname(x) or "."))
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
               "results": {st: f"run/{st}/eval/eval_results.json" for st in t.stages},
               "lm_eval_commands": commands}
        if copied is None:
            doc["spec_dir"] = spec_dir
        else:  # each local task file's copy and the sha256 of every copied file (as the lock records them)
            doc["task_files"] = {k: {"path": c.path, "files": dict(sorted(c.files.items()))}
                                 for k, c in copied.items()}
        if t.every_checkpoints is not None:  # eval.every_checkpoints: the checkpoints scored before the export
            doc["every_checkpoints"] = t.every_checkpoints
            doc["checkpoint_results"] = {st: {str(n): f"run/{st}/eval/step-{n}/eval_results.json" for n in steps}
                                         for st, steps in (t.checkpoint_steps or {}).items()}
        out: dict[str, str | bytes] = {TASKS_FILE: dump_json(doc)}
        out.update({path: _copy_content(data) for path, data in sorted(t.copies.items())})
        return out  # type: ignore[return-value]  (a binary data file stays bytes: llmc.buildfs writes both)


__all__ = ["EvalTasksEmitter", "TASKS_FILE", "LARGE_COPIES", "eval_stages"]
