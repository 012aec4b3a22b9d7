"""Benchmark evals of a Hugging Face model directory with EleutherAI lm-evaluation-harness (``hf`` backend).

API::

    from llmc.runtime.evaluate import EvalConfig, run_eval

    summary = run_eval(EvalConfig(model_dir="out/hf", tasks=("hellaswag", "evals/my_mc.yaml")), "out/eval")
    summary.metrics["my_mc"]["acc"]     # float
    summary.samples["my_mc"]           # documents evaluated
    summary.results_path               # out/eval/eval_results.json (lm_eval's results dict)

``tasks`` mixes registered lm_eval task names and paths to local task YAML files; a YAML file's
directory is added to lm_eval's ``include_path`` and its ``task:`` name (a group file: its ``group:``
name) is evaluated. When every task is a local file that names no other task (no group of tasks), lm_eval
indexes only those files' directories, not its ~14,000 built-in task files (15-25 s of CPU per eval). A local
multiple-choice task needs no hub access when its dataset is a local file, e.g.::

    task: my_mc
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_mc.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]

(lm-evaluation-harness task guide:
https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/new_task_guide.md.) With
``offline=True`` (default) ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are set before lm_eval is
imported, so nothing is downloaded. Metric names drop lm_eval's ``,none`` filter suffix
(``acc,none`` -> ``acc``); other filters keep it (``exact_match,strict-match``).

A local task file's relative ``dataset_kwargs.data_files`` are read relative to the YAML file (lm_eval
itself would read them relative to the working directory): :func:`resolve_tasks` writes a copy with
absolute paths when a file needs it (YAML with lm_eval's ``!function`` tags is used as written).

Task files from the build: a lock built with its spec's task files (``evaluation.tasks.task_files``, see
:mod:`llmc.compiler.evaluation`) names, for each local task file of ``eval.tasks``, its copy in the build directory
(``eval/tasks/...``, relative to the lock's folder) and the sha256 of every copied file; the eval step reads those
copies, never the spec's folder, and refuses (error R003, on the copied file) one whose bytes no longer hash to what
the build recorded, or a local task file the build holds no copy of (:func:`lock_tasks`). A lock that records no
copies (built without reading them, or by an older llmc) reads its task files next to the spec, as before.

After a stage (every backend; the only place a run is evaluated): ``python -m llmc.runtime.evaluate
--lock plan.lock.json --stage S --out RUN/S`` evaluates ``RUN/S/hf`` on the lock's ``evaluation.tasks``
when S is listed there (:func:`stage_eval`: ``RUN/S/eval/eval_results.json`` and
``RUN/S/eval/summary.json``); it does nothing when the stage is not listed, or when ``summary.json`` exists and
records the lock's :func:`eval_fingerprint` (what decides the scores: the tasks, the task files' sha256, limit,
batch size, few-shot, chat template, the stage's weights). A summary scored under other settings, or by an older
llmc (no record), is scored again: ``RUN/S/eval`` is set aside (``eval.set-aside-N``, never deleted) with one line
saying why. A registered task's dataset that is not in the local cache (the step runs offline) is error R017. :func:`eval_stages` and :data:`SUMMARY` are what launchers need to know (no torch, no lm_eval
import).

Checkpoints (``eval.every_checkpoints``): before the final export, the step scores the checkpoints the
lock lists under ``evaluation.tasks.checkpoint_steps[S]`` (:func:`checkpoint_evals`). Each
``RUN/S/<checkpoint folder>/step-N`` (llmc's full ``model.pt`` or sharded ``dcp/`` layout; for a stage torchtitan
trained, its DCP ``step-N`` under the build's ``outputs/torchtitan``) is converted to
a temporary Hugging Face directory with :func:`llmc.runtime.hf_io.export_stage` (the conversion ``llmc
export`` uses; tokenizer files from ``RUN/S/hf``), scored on the same suite into ``RUN/S/eval/step-N/``
(``eval_results.json``, ``summary.json`` with ``step``) and deleted (also when a killed step left it
behind). A step whose ``summary.json`` exists is skipped; a listed checkpoint that is missing (pruned,
for example) is reported and skipped. A DeepSpeed stage writes an llmc checkpoint only at its end and keeps
its intermediate ones in DeepSpeed's format (``RUN/S/<checkpoint folder>/deepspeed/step-XXXXXXXX``,
:func:`llmc.runtime.capabilities.ds_checkpoint_dir`): a listed step found
only there is rebuilt on the CPU with DeepSpeed's offline converter (:func:`ds_checkpoint_state`: the fp32
master weights of ZeRO 1/2/3, ``deepspeed.utils.zero_to_fp32``; ZeRO-0 the saved module state) and scored
the same way.

Chat template: a stage whose lock entry ``evaluation.tasks.apply_chat_template[S]`` is true (by default the chat
stages, sft / dpo / grpo, whose export carries their Jinja template) is scored through it, the export's and each
checkpoint's alike: lm_eval's ``apply_chat_template=True`` renders each prompt as a user turn followed by the
template's assistant header, the answer alone being scored as the assistant's text (the header's trailing
whitespace stays in the prompt, :func:`answer_only_lm`), and ``fewshot_as_multiturn=True`` makes
few-shot examples earlier turns (lm_eval's own default with the template, lm_eval/config/evaluate_config.py;
https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/interface.md). Other stages are scored on raw
prompts, as before. ``summary.json`` records both flags; a stage that asks for the template when its export has none
(no ``chat_template`` in tokenizer_config.json, no ``chat_template.jinja``) is an error, not a silent raw-prompt
score.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmc.spec.facts import group_scan, has_chat_template, task_file_name


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how."""

    model_dir: str
    """A ``save_pretrained`` directory (config.json, weights, tokenizer files)."""
    tasks: tuple[str, ...]
    """lm_eval task names and/or local task YAML paths."""
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    num_fewshot: int | None = None
    limit: int | None = None
    """At most this many documents per task (None = all)."""
    seed: int = 1234
    offline: bool = True
    model_args: dict[str, Any] = field(default_factory=dict)
    """Extra ``HFLM`` arguments (e.g. ``max_length``, ``trust_remote_code``)."""
    apply_chat_template: bool = False
    """Render prompts with the model's chat template (lm_eval ``--apply_chat_template``)."""
    fewshot_as_multiturn: bool | None = None
    """Few-shot examples as separate turns (lm_eval ``--fewshot_as_multiturn``; only with the template).
    None = ``apply_chat_template``, lm_eval's own default."""


@dataclass(frozen=True)
class EvalSummary:
    results_path: Path
    metrics: dict[str, dict[str, float]]
    """task -> metric -> value (lm_eval's stderr entries appear as ``<metric>_stderr``)."""
    samples: dict[str, int]
    """task -> documents evaluated."""
    lm_eval_version: str
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    n_shot: dict[str, int] = field(default_factory=dict)
    """task -> few-shot examples in each prompt (lm_eval's ``n-shot``)."""


@dataclass(frozen=True)
class ResolvedTasks:
    names: list[str]
    """What lm_eval is asked to evaluate: built-in names as given, a local file's task (or group) name."""
    include: list[str]
    """Directories of the local files (lm_eval's ``include_path``)."""
    builtin: bool
    """Whether lm_eval needs its built-in task index: a task given by name, or a local group of tasks."""


#: Relative to a stage's output directory.
SUMMARY = "eval/summary.json"
RESULTS = "eval/eval_results.json"
STEP_DIR = "eval/step-{step}"
"""Checkpoint ``step``'s results (``eval_results.json``, ``summary.json``), relative to the stage's directory."""


def eval_stages(lock: dict) -> list[str]:
    """The stages whose HF export the lock's ``evaluation.tasks`` evaluates ([] when none)."""
    ev = lock.get("evaluation") if isinstance(lock.get("evaluation"), dict) else None
    tasks = (ev or {}).get("tasks")
    return [str(s) for s in tasks.get("stages") or []] if isinstance(tasks, dict) and tasks.get("tasks") else []


def _absolute_data_files(p: Path, text: str, dest: Path | None) -> Path:
    """``p`` itself, or a copy in ``dest`` whose relative ``dataset_kwargs.data_files`` point next to ``p``."""
    if dest is None:
        return p
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:  # lm_eval's !function tags: used as written
        return p
    files = ((doc or {}).get("dataset_kwargs") or {}).get("data_files") if isinstance(doc, dict) else None
    if not files:
        return p

    def fix(v):
        if isinstance(v, str) and "://" not in v and not Path(v).is_absolute():
            return str((p.resolve().parent / v).resolve())
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    fixed = fix(files)
    if fixed == files:
        return p
    doc["dataset_kwargs"]["data_files"] = fixed
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / p.name
    out.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return out


def _group_copy(p: Path, shown: str, dest: Path) -> Path:
    """A group task file's folder as lm_eval indexes it for the group's members (``llmc.spec.facts.group_scan``: its
    ``*.yaml`` files, those of its subfolders, and the ``.py`` modules beside them for ``!function``), copied to
    ``dest`` with every relative ``dataset_kwargs.data_files`` made absolute (:func:`_absolute_data_files`: lm_eval
    reads a member's data files from the working directory, not beside it). Returns the group file's copy, whose
    folder becomes the include path."""
    import shutil

    base = p.parent
    rels = group_scan(base, shown)
    for rel in rels + ([] if p.name in rels else [p.name]):  # (a .yml group file is not among the indexed .yaml)
        src, out = base / rel, dest / rel
        if _absolute_data_files(src, src.read_text(encoding="utf-8"), out.parent) == src:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
    for d in sorted({posixpath.dirname(r) for r in rels}):
        for py in sorted((base / d).glob("*.py")):
            (dest / d).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(py, dest / d / py.name)
    return dest / p.name


def resolve_tasks(tasks: tuple[str, ...], copy_dir: str | Path | None = None) -> ResolvedTasks:
    """Task names and include paths: YAML files become their ``task:`` (or ``group:``) name plus their
    directory. With ``copy_dir``, a YAML whose ``data_files`` are relative is copied there with them made
    absolute."""
    names: list[str] = []
    include: list[str] = []
    builtin = False
    for i, t in enumerate(tasks):
        p = Path(t)
        if p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise FileNotFoundError(f"eval task file {t} does not exist")
            text = p.read_text(encoding="utf-8")
            name, lists_tasks = task_file_name(t, text)
            names.append(name)
            builtin |= lists_tasks
            if lists_tasks and copy_dir is not None:  # a group: its members' data_files too (_group_copy)
                p = _group_copy(p, t, Path(copy_dir) / str(i))
            else:
                p = _absolute_data_files(p, text, Path(copy_dir) / str(i) if copy_dir is not None else None)
            d = str(p.resolve().parent)
            if d not in include:
                include.append(d)
        else:
            names.append(t)
            builtin = True
    return ResolvedTasks(names, include, builtin)


class TaskCopyError(ValueError):
    """A copied task file of the build that the eval step refuses; ``rel``: its path relative to the build."""

    def __init__(self, rel: str, message: str):
        super().__init__(message)
        self.rel = rel


def lock_tasks(plan: dict, job, build_dir: str | Path | None = None) -> tuple[str, ...]:
    """The lock's ``evaluation.tasks`` ``plan`` as :func:`run_eval` takes its tasks: a built-in name as written; a
    local task file the lock copied into the build: its copy under ``build_dir`` (the lock's folder; None: the
    current directory, where ``llmc launch`` runs every command), after checking that every file copied for it still
    has the sha256 the build recorded (:class:`TaskCopyError` otherwise); with no copies recorded (a lock built
    without reading the task files), the file next to the spec (``job.resolve_path``)."""
    from llmc.buildfs import UnsafePathError, check_inside

    copies = plan.get("task_files")
    root = Path(build_dir) if build_dir is not None else Path.cwd()
    out: list[str] = []
    for t in plan["tasks"]:
        if not t.endswith((".yaml", ".yml")):
            out.append(t)
            continue
        if not isinstance(copies, dict):
            out.append(str(job.resolve_path(t)))
            continue
        entry = copies.get(t)
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict) or entry.get("path") not in \
                entry["files"]:
            raise FileNotFoundError(f"eval task file {t} has no copy in the build (llmc build could not read it: "
                                    "its E009 says why); fix it and rebuild with `llmc build`")
        for rel, sha in sorted(entry["files"].items()):
            try:
                path = check_inside(root, rel)
                got = hashlib.sha256(path.read_bytes()).hexdigest()
            except UnsafePathError as e:
                raise TaskCopyError(str(rel), f"eval task file copy outside the build ({e.message}); rebuild with "
                                              "`llmc build`") from None
            except FileNotFoundError:
                raise TaskCopyError(rel, f"eval task file copy {rel} is missing from the build (copy the whole "
                                         "build directory, or rebuild with `llmc build`)") from None
            except OSError as e:
                raise TaskCopyError(rel, f"eval task file copy {rel} cannot be read ({e.strerror or e})") from None
            if got != sha:
                raise TaskCopyError(rel, f"eval task file copy {rel} changed since `llmc build` (sha256 {got[:12]}, "
                                         f"the lock records {str(sha)[:12]}); refusing to score on an eval set the "
                                         "build did not record: rebuild with `llmc build` (the change then shows in "
                                         "the build's diff), or restore the file")
        out.append(str(check_inside(root, entry["path"])))
    return tuple(out)


def answer_only_lm():
    """lm_eval's ``hf`` model (``HFLM``) scoring a continuation alone after a prompt that ends in whitespace: the
    class :func:`run_eval` scores chat-template prompts with. lm_eval 0.4's ``TemplateLM._encode_pair`` moves a
    context's trailing whitespace into the continuation (for raw prompts: "Answer:" + " Paris", so a word keeps its
    leading-space token); through a chat template, whose prompt ends with the assistant header and its own
    whitespace (Llama 3's ``<|end_header_id|>\n\n``) and whose answers lm_eval appends with no delimiter
    (``ConfigurableTask.construct_requests``), that moves the header's ``\n\n`` token into every answer: its
    log-probability then counts in ``acc_norm`` (divided by each answer's length) as if the model had written it.
    This class keeps the whitespace in the context, so the answer's tokens alone are scored, as the model generates
    them after the header; a context with no trailing whitespace, or whose tokens the whole string does not start
    with, is split as lm_eval splits it. (lm_eval's own model classes override ``_encode_pair`` the same way, e.g.
    ``lm_eval.models.megatron_lm``.)"""
    from lm_eval.models.huggingface import HFLM

    class AnswerOnlyHFLM(HFLM):
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if self.backend != "causal" or context == context.rstrip():
                return super()._encode_pair(context, continuation)
            whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
            if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
                return super()._encode_pair(context, continuation)
            return ctx, whole[len(ctx):]

    return AnswerOnlyHFLM


def _metric_name(key: str) -> str:
    return key[: -len(",none")] if key.endswith(",none") else key


def run_eval(config: EvalConfig, out_dir: str | Path) -> EvalSummary:
    """Evaluate ``config.model_dir`` on ``config.tasks``; write ``<out_dir>/eval_results.json``."""
    _offline(config.offline)
    from llmc.runtime.quiet import quiet_git_describe, quiet_torchao_enum_notice

    quiet_torchao_enum_notice()  # (before lm_eval's model load imports transformers' torchao quantizer)
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if not (Path(config.model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{config.model_dir}: not a Hugging Face model directory (no config.json)")
    if config.apply_chat_template and not has_chat_template(config.model_dir):  # (llmc.spec.facts)
        raise ValueError(f"{config.model_dir}: the evals apply the chat template, but the tokenizer has none (no "
                         "chat_template in tokenizer_config.json, no chat_template.jinja); give the tokenizer one, or set "
                         "eval.apply_chat_template: false")
    chat = bool(config.apply_chat_template)
    multiturn = chat and (config.fewshot_as_multiturn is None or bool(config.fewshot_as_multiturn))
    out = Path(out_dir)
    tasks = resolve_tasks(config.tasks, out / "tasks")
    tm = TaskManager(include_path=tasks.include or None, include_defaults=tasks.builtin)
    model_args = {"pretrained": str(config.model_dir), "dtype": config.dtype, **config.model_args}
    model: Any = "hf"
    if chat:  # the answer alone is scored after the template's assistant header (answer_only_lm)
        model = answer_only_lm().create_from_arg_obj(
            model_args, {"batch_size": config.batch_size, "max_batch_size": None, "device": config.device})
    with quiet_git_describe():  # (its git hash without git's "fatal: not a git repository" line: llmc.runtime.quiet)
        results = lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=tasks.names, num_fewshot=config.num_fewshot,
            batch_size=config.batch_size, device=config.device, limit=config.limit, task_manager=tm,
            log_samples=False, apply_chat_template=chat, fewshot_as_multiturn=multiturn, random_seed=config.seed,
            numpy_random_seed=config.seed, torch_random_seed=config.seed, fewshot_random_seed=config.seed)
    if results is None:  # non-zero ranks under a distributed launch
        raise RuntimeError("lm_eval returned no results on this rank")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval_results.json"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, sort_keys=True) + "\n")
    os.replace(tmp, path)

    metrics: dict[str, dict[str, float]] = {}
    for task, vals in results["results"].items():
        metrics[task] = {}
        for k, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            metrics[task][_metric_name(k)] = float(v)
    samples: dict[str, int] = {}
    for task, n in results.get("n-samples", {}).items():
        samples[task] = int(n.get("effective", n.get("original", 0)) if isinstance(n, dict) else n)
    shots = {t: int(n) for t, n in (results.get("n-shot") or {}).items() if isinstance(n, int) and t in metrics}
    return EvalSummary(path, metrics, samples, getattr(lm_eval, "__version__", "unknown"), chat, multiturn, shots)


def _tasks_plan(lock: dict) -> dict | None:
    ev = lock.get("evaluation") if isinstance(lock.get("evaluation"), dict) else None
    plan = (ev or {}).get("tasks")
    return plan if isinstance(plan, dict) and plan.get("tasks") else None


#: summary.json's record of what decided its scores (:func:`eval_fingerprint`)
EVAL_FINGERPRINT = "eval_fingerprint"
# what each part of the record is called when it differs
_EVAL_PARTS = {"tasks": "the tasks", "task_files": "the task files' bytes", "limit": "eval.limit",
               "num_fewshot": "the few-shot count", "chat": "the chat template setting",
               "weights": "the stage's weights (its fingerprint in the lock)"}


def eval_fingerprint(lock: dict, stage: str) -> dict | None:
    """What decides the scores of ``stage``'s eval under ``lock``: ``{"sha256", "parts"}``, the parts being the lock's
    evaluation entries for the stage (the tasks and their lm_eval names, the sha256 of every file the build copied for
    a local task file, ``limit``, the few-shot count, the chat-template flags; not ``batch_size``, which scores no
    document differently, nor the checkpoint steps listed, each of which records its own) and which weights it scores (the stage's fingerprint in the lock, :func:`llmc.runtime.job.
    stage_fingerprint`, which eval settings are not part of). None when the lock evaluates no such stage. Recorded in
    ``summary.json``; a summary whose record differs is scored again (:func:`eval_change`)."""
    from llmc.runtime.job import stage_fingerprint

    plan = _tasks_plan(lock)
    if plan is None or stage not in (plan.get("stages") or []):
        return None
    copies = plan.get("task_files")
    chat = bool((plan.get("apply_chat_template") or {}).get(stage, False))
    parts = {
        "tasks": [list(plan["tasks"]), list(plan.get("names") or [])],
        "task_files": ({t: (copies.get(t) or {}).get("files") for t in plan["tasks"] if t.endswith((".yaml", ".yml"))}
                       if isinstance(copies, dict) else None),
        "limit": plan.get("limit"),  # (not eval.batch_size: the documents' scores do not depend on it)
        "num_fewshot": EvalConfig.num_fewshot,  # (each task's own: the eval step sets none)
        "chat": {"apply_chat_template": chat, "fewshot_as_multiturn": chat},
        # (not the checkpoint steps listed: each step's summary, and the export's, records its own scoring)
        "weights": (stage_fingerprint(lock, stage) or {}).get("sha256"),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"sha256": digest, "parts": parts}


def eval_change(summary_path: Path, lock: dict, stage: str) -> str | None:
    """Why ``stage``'s saved eval (``summary_path``, its ``summary.json``) is not the lock's: None when its record
    (:data:`EVAL_FINGERPRINT`) matches :func:`eval_fingerprint`; else what differs, or that the summary records none
    (written by an older llmc: scored again, since nothing says which settings scored it) or cannot be read."""
    now = eval_fingerprint(lock, stage)
    if now is None:
        return None
    try:
        was = json.loads(Path(summary_path).read_text()).get(EVAL_FINGERPRINT)
    except (OSError, ValueError, AttributeError):
        return f"its {summary_path} cannot be read"
    if not isinstance(was, dict) or not isinstance(was.get("parts"), dict):
        return f"its {summary_path} records no eval fingerprint (written by an older llmc), so which settings it " \
               "was scored with is unknown"
    if was.get("sha256") == now["sha256"]:
        return None
    differ = [label for k, label in _EVAL_PARTS.items() if was["parts"].get(k) != now["parts"].get(k)]
    said = " and ".join([", ".join(differ[:-1]), differ[-1]] if len(differ) > 1 else differ) or "its eval settings"
    return f"{said} changed since it was scored ({summary_path})"


def checkpoint_steps(lock: dict, stage: str) -> list[int]:
    """The checkpoint steps of ``stage`` the eval step scores (the lock's ``checkpoint_steps``; [] when off)."""
    plan = _tasks_plan(lock) or {}
    return [int(s) for s in (plan.get("checkpoint_steps") or {}).get(stage) or []]


def _summarize(model_dir: Path, dest: Path, plan: dict, job, what: str, log, label: str = "",
               lock_dir: Path | None = None, fingerprint: dict | None = None, **extra) -> dict:
    """lm_eval on ``model_dir`` with the lock's suite (:func:`lock_tasks`: local task files from the build in
    ``lock_dir``), through the chat template where the lock says so; ``dest/eval_results.json`` and
    ``dest/summary.json`` (with ``apply_chat_template`` / ``fewshot_as_multiturn``)."""
    import torch

    tasks = lock_tasks(plan, job, lock_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chat = bool((plan.get("apply_chat_template") or {}).get(job.stage, False))
    log(f"{job.stage}: lm-evaluation-harness {', '.join(plan['tasks'])} on {what} ({device}"
        f"{', chat template applied' if chat else ''})")
    res = run_eval(EvalConfig(model_dir=str(model_dir), tasks=tasks, batch_size=int(plan["batch_size"]),
                              limit=plan.get("limit"), device=device, apply_chat_template=chat), dest)
    summary = {**extra, "tasks": res.metrics, "samples": res.samples, "results": str(res.results_path),
               "lm_eval_version": res.lm_eval_version, "apply_chat_template": res.apply_chat_template,
               "fewshot_as_multiturn": res.fewshot_as_multiturn, "n_shot": res.n_shot,
               **({EVAL_FINGERPRINT: fingerprint} if fingerprint is not None else {})}
    path = dest / "summary.json"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    from llmc.runtime.metrics_io import score_line

    for task, metrics in res.metrics.items():
        log(f"{job.stage}: eval {label}{task}: "
            f"{score_line(metrics, res.samples.get(task), res.n_shot.get(task), res.apply_chat_template)}")
    return summary


DS_TAG = "step-{step:08d}"  # its tag of step N


def ds_checkpoint_state(ds_dir: str | Path, tag: str) -> dict:
    """Full weights (CPU tensors, llmc's names) of DeepSpeed checkpoint ``ds_dir/tag`` written by
    ``engine.save_checkpoint``. ZeRO 1/2/3: the fp32 master weights merged from every rank's optimizer
    shards by DeepSpeed's own offline converter, ``deepspeed.utils.zero_to_fp32.
    get_fp32_state_dict_from_zero_checkpoint`` (parameters and persistent buffers, tied weights under both
    names; https://www.deepspeed.ai/docs/config-json/#zero-optimizations-for-fp16-training and
    https://deepspeed.readthedocs.io/en/latest/model-checkpointing.html). ZeRO-0 keeps no ZeRO shards (bf16's
    optimizer shards carry no ZeRO stage the converter reads): the module state the engine saved
    (``mp_rank_00_model_states.pt`` ``module``, in the training precision). ``engine.module`` is
    llmc's ``Transformer`` itself, so the names need no mapping."""
    import contextlib
    import io

    import torch

    d = Path(ds_dir) / tag
    if not d.is_dir():
        raise FileNotFoundError(f"no DeepSpeed checkpoint {d}")
    from llmc.runtime.checkpoint import check_deepspeed_files, deepspeed_globals, safe_load

    check_deepspeed_files(d)  # (DeepSpeed's converter reads them with weights_only=False)
    sd = None
    if any(d.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
        except ValueError as e:  # bf16 without ZeRO saves bf16_zero_pp_rank_* shards with no ZeRO stage
            if "is not a zero checkpoint" not in str(e):
                raise
    if sd is None:
        files = sorted(d.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{d}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
        sd = safe_load(files[0], legacy=deepspeed_globals())["module"]
    return {k: v.detach().cpu() for k, v in sd.items() if torch.is_tensor(v)}


def checkpoint_evals(lock: dict, job, out: Path, log=print, build_dir: Path | None = None,
                     lock_dir: Path | None = None) -> dict[int, dict]:
    """Score the stage's listed checkpoints (see the module docstring); returns step -> summary of those
    scored or already scored. ``out/hf`` (the stage's export) supplies the tokenizer files. A stage that
    torchtitan trained has no llmc checkpoints: its DCP checkpoints under ``build_dir/outputs/torchtitan``
    are scored instead (``build_dir``: where the job wrote them, its ``LLMC_RUN_DIR``, by default the build
    directory). A step with no llmc checkpoint but a DeepSpeed one (``out/<checkpoint folder>/deepspeed``) is scored
    from that (:func:`ds_checkpoint_state`)."""
    import shutil
    import tempfile

    from llmc.runtime.capabilities import TITAN_STAGE_KINDS, ds_checkpoint_dir
    from llmc.runtime.checkpoint import list_checkpoints
    from llmc.runtime.hf_io import export_stage, titan_checkpoints
    # (``lock_dir``: the lock's folder, where the build's copies of the local task files are; None: the current one)

    plan = _tasks_plan(lock)
    steps = checkpoint_steps(lock, job.stage)
    if plan is None or not steps:
        return {}
    for stale in (out / "eval").glob(".hf-step-*"):  # left by an eval step that was killed
        shutil.rmtree(stale, ignore_errors=True)
    present = dict(list_checkpoints(out / job.checkpoint_folder))
    own = bool((job.stage_plan or {}).get("layout"))  # a continued stage trained by its own torchtitan job
    if not present and build_dir is not None and (job.kind in TITAN_STAGE_KINDS or own):
        present = titan_checkpoints(build_dir, job.stage if own else None)
    done: dict[int, dict] = {}
    for n in steps:
        dest = out / STEP_DIR.format(step=n)
        if (dest / "summary.json").is_file():
            why = eval_change(dest / "summary.json", lock, job.stage)
            if why is None:
                log(f"{job.stage}: checkpoint step {n} already evaluated ({dest / 'summary.json'})")
                done[n] = json.loads((dest / "summary.json").read_text())
                continue
        ds = ds_checkpoint_dir(out, job.checkpoint_folder) / DS_TAG.format(step=n)
        if n not in present and not ds.is_dir():
            if (dest / "summary.json").is_file():  # stale, but nothing to score again: kept, and said
                log(f"{job.stage}: checkpoint step {n}'s scores are not this lock's ({why}), but its checkpoint is "
                    f"gone (pruned?): kept as they are ({dest / 'summary.json'})")
                continue
            log(f"{job.stage}: no checkpoint at step {n} under {out / job.checkpoint_folder} or {ds.parent} "
                "(pruned?); not scored")
            continue
        if (dest / "summary.json").is_file():
            rescore(dest, f"{job.stage} checkpoint step {n}", why, log, folder=dest)
        src, model_sd = present.get(n, ds), None
        if n not in present:
            try:
                model_sd = ds_checkpoint_state(ds.parent, ds.name)
            except Exception as e:  # noqa: BLE001 - a partial or foreign folder: report it, score the rest
                log(f"{job.stage}: cannot read DeepSpeed checkpoint {ds}: {type(e).__name__}: {e}; not scored")
                continue
        (out / "eval").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".hf-step-{n}-", dir=out / "eval"))
        try:
            export_stage(job, src, tmp / "hf", tokenizer_dir=out / "hf", model_sd=model_sd)
            model_sd = None
            done[n] = _summarize(tmp / "hf", dest, plan, job, f"checkpoint step {n}", log, f"step {n} ",
                                 lock_dir=lock_dir, fingerprint=eval_fingerprint(lock, job.stage), step=n,
                                 checkpoint=os.path.relpath(src, out))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return done


def stage_eval(lock: dict, job, out: Path, log=print, build_dir: Path | None = None,
               lock_dir: Path | None = None) -> dict | None:
    """The eval step of stage ``job.stage``: its listed checkpoints, then its HF export ``out/hf``
    (``out/eval/summary.json``, returned). None when the stage is not listed; the saved summary when done. The
    build's task file copies (in ``lock_dir``, the lock's folder; None: the current directory) are checked first."""
    plan = _tasks_plan(lock)
    if plan is None or job.stage not in (plan.get("stages") or []):
        return None
    why = eval_change(out / SUMMARY, lock, job.stage) if (out / SUMMARY).is_file() else None
    if (out / SUMMARY).is_file() and why is None:
        return json.loads((out / SUMMARY).read_text())
    if not (out / "hf" / "config.json").is_file():  # (before anything is moved: the saved scores stay)
        raise FileNotFoundError(f"stage {job.stage!r}: no Hugging Face export at {out / 'hf'} to evaluate")
    if why is not None:
        rescore(out, job.stage, why, log)
    lock_tasks(plan, job, lock_dir)  # a changed or missing copy stops the step before any checkpoint is scored
    checkpoint_evals(lock, job, out, log, build_dir=build_dir, lock_dir=lock_dir)
    return _summarize(out / "hf", out / "eval", plan, job, str(out / "hf"), log, lock_dir=lock_dir,
                      fingerprint=eval_fingerprint(lock, job.stage))


def rescore(out: Path, stage: str, why: str, log=print, folder: Path | None = None) -> Path | None:
    """Set earlier eval results aside (never deleted) so the eval step scores them again, saying so in one line:
    ``folder`` (a checkpoint's ``eval/step-N``) is renamed (:func:`llmc.fileio.set_aside`); by default the export's
    scores (``eval/summary.json`` and ``eval/eval_results.json``) move into ``eval.set-aside-N`` beside ``eval``, and
    the checkpoints' scores stay (each records its own scoring: :func:`checkpoint_evals`)."""
    from llmc.fileio import set_aside, set_aside_target

    if folder is not None:
        moved = set_aside(folder)
    else:
        moved = set_aside_target(out / "eval")
        if moved is not None:
            moved.mkdir()
            for rel in (SUMMARY, RESULTS):
                if (out / rel).is_file():
                    os.replace(out / rel, moved / Path(rel).name)
    where = f"set aside in {moved}" if moved is not None else "nothing to set aside"
    log(f"{stage}: evaluated again: {why}; the earlier results: {where}")
    return moved


def _offline(config_offline: bool = True) -> bool:
    """Set lm_eval's and datasets' offline switches as :func:`run_eval` does (unless the environment sets its own);
    whether datasets then runs offline."""
    if config_offline:
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(k, "1")
    return os.environ.get("HF_DATASETS_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_tasks(lock: dict, lock_dir: Path | None = None) -> dict:
    """The lock's registered task names against lm_eval's own task index (``lm_eval.tasks.TaskManager``, with the
    folders of the build's task file copies included, as the eval step indexes them), before any training:
    ``{"unknown": [[name, [closest known names]]], "uncached": [[name, dataset]]}``. ``uncached``: a known task whose
    dataset (its config's ``dataset_path`` / ``dataset_name``) ``datasets`` cannot load from the local Hugging Face
    cache while the eval step runs offline (``datasets.load_dataset_builder``): a group or tag is checked through the
    tasks it runs (:func:`_task_configs`), each (dataset, config) once. Runs in the runtime's environment (``python -m llmc.runtime.evaluate
    --check-tasks``), which ``llmc launch`` starts once before prepare."""
    import difflib
    import fnmatch

    plan = _tasks_plan(lock)
    names = [t for t in (plan or {}).get("tasks") or [] if not t.endswith((".yaml", ".yml"))]
    out: dict = {"unknown": [], "uncached": []}
    if not names:
        return out
    offline = _offline()
    from lm_eval.tasks import TaskManager

    root = Path(lock_dir) if lock_dir is not None else Path.cwd()
    copies = plan.get("task_files") if isinstance(plan.get("task_files"), dict) else {}
    include = sorted({str((root / e["path"]).parent) for e in copies.values()
                      if isinstance(e, dict) and isinstance(e.get("path"), str) and (root / e["path"]).is_file()})
    tm = TaskManager(include_path=include or None)
    local = {n for t, n in zip(plan["tasks"], plan.get("names") or [], strict=False) if t.endswith((".yaml", ".yml"))}
    known = set(tm.all_tasks) | local  # (a local file's task / group name)
    for t in names:
        if t in known or (any(c in t for c in "*?[") and fnmatch.filter(known, t)):
            continue
        out["unknown"].append([t, difflib.get_close_matches(t, sorted(known), n=3, cutoff=0.6)])
    if not offline or out["unknown"]:
        return out
    import datasets

    tried: set = set()
    for t in names:
        for cfg in _task_configs(tm, t):
            path = cfg.get("dataset_path")
            if not isinstance(path, str) or not path or path in ("json", "csv", "parquet", "text", "arrow"):
                continue
            key = (path, cfg.get("dataset_name"))
            if key in tried:
                continue
            tried.add(key)
            try:
                datasets.load_dataset_builder(path, cfg.get("dataset_name"), **(cfg.get("dataset_kwargs") or {}))
            except ConnectionError:  # (datasets' offline mode: "Couldn't reach ... on the Hub")
                out["uncached"].append([t, path + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")])
            except Exception:  # noqa: BLE001 - anything else is the eval step's to report, not a cache question
                continue
    return out


def _task_configs(tm, name: str, seen: set | None = None) -> list[dict]:
    """The configs of the tasks ``name`` runs in lm_eval's index (``tm.task_index``): a task's own; a group's
    ``task`` list, followed (a name, or an inline task config); a tag's tasks (those that carry it)."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    entry = tm.task_index.get(name)
    if entry is None:
        return []
    kind = str(getattr(getattr(entry, "kind", None), "name", "")).upper()
    cfg = getattr(entry, "cfg", None) or {}
    if kind == "TASK":
        return [cfg]
    if kind == "GROUP":
        members = cfg.get("task") or []
        members = members if isinstance(members, list) else [members]
    else:  # a tag
        members = sorted(n for n, e in tm.task_index.items() if name in (getattr(e, "tags", None) or ()))
    out: list[dict] = []
    for m in members:
        if isinstance(m, dict):
            out += [m] if m.get("dataset_path") else _task_configs(tm, str(m.get("task", "")), seen)
        else:
            out += _task_configs(tm, str(m), seen)
    return out


#: what an eval step that could not reach a task's dataset offline says to do (error R017)
OFFLINE_HINT = ("{why}; hint: on a machine with network, download "
                "the dataset into the cache with `datasets` (python -c \"import datasets; "
                "datasets.load_dataset('{dataset}')\", with the task's dataset_name as second argument where it has "
                "one) and copy the cache folder (HF_HOME, by default ~/.cache/huggingface) here, or score a local task "
                "file instead")


def offline_message(e: BaseException) -> str:
    """R017's text for ``e``, datasets' ConnectionError of a dataset not in the cache under offline mode."""
    import re

    from llmc.runtime.entry import one_line_error

    m = re.search(r"reach '([^']+)'", str(e))
    why = ("the eval step runs offline (HF_DATASETS_OFFLINE=1: lm-evaluation-harness's registered tasks read their "
           "datasets from the local Hugging Face cache only)" if _offline(False) else
           "the dataset could not be downloaded (HF_DATASETS_OFFLINE is off here: the network or the Hub failed)")
    return f"{one_line_error(e)}: {OFFLINE_HINT.format(why=why, dataset=m.group(1) if m else '<dataset_path>')}"


def main(argv: list[str] | None = None) -> int:
    """``python -m llmc.runtime.evaluate --lock L --stage S --out RUN/S``: the benchmark evals after stage S."""
    ap = argparse.ArgumentParser(prog="python -m llmc.runtime.evaluate",
                                 description="Run the lock's eval.tasks on a finished stage's Hugging Face export.")
    ap.add_argument("--lock", required=True, type=Path, help="plan.lock.json written by `llmc build`")
    ap.add_argument("--stage", help="stage name")
    ap.add_argument("--out", type=Path, help="the stage's output directory (holds hf/)")
    ap.add_argument("--check-tasks", action="store_true",
                    help="only check the lock's registered task names and their datasets' cache (JSON on stdout)")
    a = ap.parse_args(argv)
    if not a.check_tasks and (a.stage is None or a.out is None):
        ap.error("--stage and --out are required")
    from llmc.lockfile import read_lock
    from llmc.runtime.entry import check_lock_unedited, one_line_error

    edited = check_lock_unedited(a.lock)  # a lock edited after `llmc build` wrote it: error[L001], as llmc launch says
    if edited:
        print(edited, file=sys.stderr)
        return 1
    try:
        lock = read_lock(a.lock)
    except ValueError as e:
        print(f"{a.lock}: error[R001] lock: {one_line_error(e)}", file=sys.stderr)
        return 1
    if a.check_tasks:
        print(json.dumps(check_tasks(lock, a.lock.resolve().parent)))
        return 0
    if a.stage not in eval_stages(lock):
        print(f"{a.stage}: no eval.tasks for this stage")
        return 0
    if (a.out / SUMMARY).is_file() and eval_change(a.out / SUMMARY, lock, a.stage) is None:
        print(f"{a.stage}: already evaluated ({a.out / SUMMARY})")
        return 0
    from llmc.runtime.job import TrainJob

    try:
        job = TrainJob.from_lock(lock, a.stage, build_dir=a.lock.resolve().parent)
        # a torchtitan job writes its checkpoints under LLMC_RUN_DIR (the job's own rule, default: the build
        # directory), which the multi-node launchers export to every command they run, this one included
        runs = Path(os.environ.get("LLMC_RUN_DIR") or a.lock.resolve().parent)
        stage_eval(lock, job, a.out, log=lambda m: print(m, flush=True), build_dir=runs,
                   lock_dir=a.lock.resolve().parent)
    except ConnectionError as e:  # a registered task's dataset, not in the cache, under offline mode
        print(f"{a.lock}: error[R017] eval {a.stage}: {offline_message(e)}", file=sys.stderr)
        return 1
    except TaskCopyError as e:  # located on the copied file, as its folder was given
        print(f"{a.lock.parent / e.rel}: error[R003] eval {a.stage}: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # (FileNotFoundError, a set-aside refused: OSErrors)
        print(f"{a.lock}: error[R003] eval {a.stage}: {one_line_error(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
