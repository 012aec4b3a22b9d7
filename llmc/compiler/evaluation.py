"""Plan-side evaluation and data quality: validation cost, benchmark-eval targets, dedup estimates, checks.

Pure functions (no I/O, no torch). :func:`plan_evaluation` turns ``spec.eval`` and ``data.quality``
into an :class:`EvaluationPlan` (recorded in the lock as ``evaluation``) and adds the ``E``
diagnostics to the sink.

Validation cost. One validation reads ``max_batches`` global batches (the run's batch of sequences, so the
validation set is the spec's, whatever the layout): ``max_batches * grad_accum`` batches of ``micro_batch``
sequences on each of the ``dp`` data-parallel ranks (torchtitan's ``validation.steps`` x ``local_batch_size``), so

    tokens_per_eval = max_batches * micro_batch * grad_accum * dp * seq_len
    evals           = ceil(steps / every_steps)            (every N steps, and once at the end)
    flops           = forward_flops_per_token * tokens_per_eval * evals

with :func:`llmc.compiler.flops.forward_flops_per_token` (2 N_matmul + the attention forward: the
forward third of llmc's training FLOPs, Kaplan et al. 2020, arXiv:2001.08361, section 2.1: C_forward
~= 2N per token), and its time at the plan's training throughput: ``flops / (tokens_per_second * train_flops_per_token)``.

Data quality. The LSH banding and its false-positive / false-negative areas are
:func:`llmc.compiler.quality_math.banding` (or :func:`~llmc.compiler.quality_math.optimal_bands`
when bands/rows are left to llmc), the same numbers ``llmc.quality`` uses. The CPU time of the
MinHash pass is :func:`llmc.compiler.quality_math.dedup_cpu_seconds` over the shingles of the
declared ``sources[].tokens``: one word n-gram per word, with ``WORDS_PER_TOKEN`` words per token
(the n-1 shingles a document loses at its end are ignored, so this is an upper bound).

Diagnostics (codes E...):

=====  ========  ================================================================================
E001   warning   after the held-out split and the expected quality removal, a source repeats > 4 epochs
E002   warning   an eval task's benchmark is not in ``data.quality.decontaminate.benchmarks``
E003   error     a validation file is a training source, or lies inside / contains one
E004   error     ``eval.task_stages`` names a stage that does not exist
E005   error     ``near_dup.bands x rows`` exceeds ``num_perm``, or only one of bands/rows is given
E006   info      ``eval.tasks`` without decontamination of the training data
E007   info      ``eval.backend: vllm``: ``llmc launch`` runs the hf backend (the vllm command is emitted)
E008   warning   ``eval.every_checkpoints``: ``training.checkpoint.keep_latest`` prunes chosen checkpoints
                 before the eval step runs (the plan lists the steps that will be scored)
E009   error     a local task file of ``eval.tasks`` (or a file it reads) is missing or names no ``task:`` /
                 ``group:``: refused at plan time rather than after training
E010   warning   ``eval.apply_chat_template: true`` for an evaluated stage whose export llmc writes no chat
                 template into (not sft / dpo / grpo): the eval step fails unless its tokenizer carries one
E011   error     a validation file that is neither JSON lines nor text by its suffix (.jsonl / .json / .txt / .md)
=====  ========  ================================================================================

Chat template (``eval.apply_chat_template``). A chat stage's export (sft / dpo / grpo) carries its Jinja chat
template in tokenizer_config.json (:func:`llmc.runtime.hf_io.export_stage`); lm-evaluation-harness scores raw
prompts unless told ``--apply_chat_template``, which lays each prompt out as a user turn and the answer as the
assistant's, with few-shot examples as earlier turns under ``--fewshot_as_multiturn`` (its default with the
template, lm_eval/config/evaluate_config.py;
https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/interface.md). The lock's
``evaluation.tasks.apply_chat_template`` says, per evaluated stage, whether the eval step applies it: by default
(None) exactly the chat stages, so an instruction-tuned model is scored on the layout it was trained on and a
pre-trained one on raw text; ``true`` / ``false`` set every evaluated stage.

Task files in the build (``evaluation.tasks.task_files``). A build is committed and copied to each node on its own,
so it carries its local eval task files: each local file of ``eval.tasks`` and every local file it reads
(:func:`llmc.spec.facts.task_file_tree`: its relative data_files, include: files, !function modules; a group file's
member task files) are copied under ``eval/tasks/<name>/`` (``<name>``: the file's name without .yaml / .yml, with
``-2``, ``-3``... where two share it), laid out so each relative reference still resolves. The lock records, per
task as the spec writes it, the copy the eval step reads (``path``, relative to the build directory) and the sha256
of each copied file (``files``), so a changed eval set shows in the build's diff and the eval step refuses a copy
edited since the build (:mod:`llmc.runtime.evaluate`). The bytes travel to the emitter in :attr:`TasksPlan.copies`, which
the lock leaves out. ``task_files`` is absent when no local task file was read (a compile without the spec's facts);
the eval step then reads them next to the spec, as before.

Checkpoint evals (``eval.every_checkpoints: K``). The native trainer saves a checkpoint every
``checkpoint_interval`` steps before the last step and one at the last step, and keeps the newest
``keep_latest`` of them (:mod:`llmc.runtime.checkpoint`); post-training stages save only the last one.
The eval step runs after the stage, so it scores the K-th, 2K-th, ... intermediate checkpoints that are
still kept (:func:`checkpoint_eval_steps`); the last checkpoint is the stage's HF export, scored anyway.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import asdict, dataclass, field

from llmc.compiler import quality_math
from llmc.compiler.checks import MAX_EPOCHS, mixture_shares
from llmc.compiler.scaling import unique_tokens
from llmc.sources import VALIDATION_FILE_FORMATS, validation_file_format
from llmc.spec.schema import CHAT_KINDS

#: Where the build keeps its copies of the local eval task files (relative to the build directory).
TASK_COPY_DIR = "eval/tasks"

#: Words per BPE token for English text: "1 token ~= 3/4 of a word"
#: (https://help.openai.com/en/articles/4936856-what-are-tokens-and-how-to-count-them).
WORDS_PER_TOKEN = 0.75


@dataclass(frozen=True)
class ValidationPlan:
    """The held-out split (reproducible from these fields) and what validating costs."""

    fraction: float | None  # share of each source's documents held out (None with ``files``)
    seed: int
    files: list[str] | None  # validation files instead of a split (as written in the spec)
    every_steps: int
    max_batches: int
    tokens_per_eval: int | None  # max_batches x micro_batch x dp x seq_len (None without a plan)
    evals: int | None  # ceil(steps / every_steps)
    flops: float | None  # forward FLOPs/token (2 N_matmul + attention) x tokens_per_eval x evals
    seconds: float | None  # at the plan's training throughput
    fraction_of_training_time: float | None


@dataclass(frozen=True)
class NearDupPlan:
    threshold: float
    num_perm: int
    ngram: int
    bands: int
    rows: int
    chosen_by_llmc: bool  # bands/rows from optimal_bands (spec left them None)
    false_positive: float  # integral_0^t P(s) ds
    false_negative: float  # integral_t^1 (1 - P(s)) ds
    s_half: float  # similarity caught with probability 1/2
    seed: int


@dataclass(frozen=True)
class QualityPlan:
    exact: bool
    near_dup: NearDupPlan | None
    decontaminate_ngram: int | None
    benchmarks: list[str]
    workers: int
    declared_tokens: float | None  # sum of sources[].tokens when every source declares them
    shingles: float | None  # words of the declared tokens (WORDS_PER_TOKEN)
    minhash_core_seconds: float | None
    minhash_wall_seconds: float | None  # core seconds / workers
    expected_removal_fraction: float | None
    tokens_left: float | None  # declared x (1 - expected removal); None = unknown


@dataclass(frozen=True)
class TasksPlan:
    tasks: list[str]
    names: list[str]  # what ``lm_eval --tasks`` is given: a built-in name as written, a local file's task / group name
    stages: list[str]  # stages whose final HF export is evaluated
    backend: str
    batch_size: int
    limit: int | None
    every_checkpoints: int | None = None  # eval.every_checkpoints (None = off)
    checkpoint_steps: dict[str, list[int]] | None = None  # stage -> checkpoint steps the eval step scores
    # stage -> whether its evals (export and checkpoints) go through the export's chat template (lm_eval
    # apply_chat_template / fewshot_as_multiturn): eval.apply_chat_template, by default the chat stages
    apply_chat_template: dict[str, bool] = field(default_factory=dict)
    # local task file as the spec writes it -> its copy in the build (None: no local task file was read)
    task_files: dict[str, TaskCopy] | None = None
    # every copied file: path relative to the build directory -> bytes (for the emitter; not in the lock)
    copies: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class TaskCopy:
    """A local task file's copy in the build: ``path`` is the copy the eval step reads, ``files`` every copied file
    (the task file and what it reads) -> its sha256; paths relative to the build directory."""

    path: str
    files: dict[str, str]


@dataclass(frozen=True)
class EvaluationPlan:
    validation: ValidationPlan | None
    tasks: TasksPlan | None
    quality: QualityPlan | None

    def to_json(self) -> dict:
        """The lock's ``evaluation`` block (the checkpoint-eval keys only when ``eval.every_checkpoints`` is set)."""
        d = asdict(self)
        if d["tasks"] is not None:
            del d["tasks"]["copies"]  # bytes: the build's eval/tasks/ files; the lock keeps their sha256
            if self.tasks.task_files is None:
                del d["tasks"]["task_files"]
            if self.tasks.every_checkpoints is None:
                del d["tasks"]["every_checkpoints"], d["tasks"]["checkpoint_steps"]
        return d


@dataclass(frozen=True)
class CheckpointEvals:
    """Which checkpoints of one stage ``eval.every_checkpoints`` chooses and which the eval step will find."""

    saved: list[int]  # steps the trainer checkpoints (intermediate ones, then the last step)
    chosen: list[int]  # every K-th intermediate checkpoint
    scored: list[int]  # those still kept after training (the newest keep_latest of ``saved``)
    keep_needed: int  # keep_latest that would keep every chosen one


def checkpoint_eval_steps(steps: int, interval: int, every: int, keep_latest: int,
                          intermediate: bool = True) -> CheckpointEvals:
    """Checkpoint steps of a ``steps``-step stage saved every ``interval`` steps (``intermediate``) and at
    the end, the K = ``every``-th intermediate ones, and those among the newest ``keep_latest``."""
    mids = [k * interval for k in range(1, (steps - 1) // interval + 1)] if intermediate and interval > 0 else []
    saved = mids + [steps]
    chosen = [s for k, s in enumerate(mids, 1) if k % every == 0]
    kept = set(saved[-keep_latest:])
    scored = [s for s in chosen if s in kept]
    need = len(saved) - saved.index(chosen[0]) if chosen else 1
    return CheckpointEvals(saved=saved, chosen=chosen, scored=scored, keep_needed=need)


def validation_plan(v, *, steps: int | None, micro_batch: int | None, dp: int | None, seq_len: int,
                    forward_flops_per_token: float, tokens_per_second: float | None,
                    train_flops_per_token: float | None, step_seconds: float | None,
                    grad_accum: int = 1) -> ValidationPlan:
    """Cost of ``eval.validation`` ``v`` for a run of ``steps`` with the plan's micro-batch, accumulation and dp."""
    tokens = evals = flops = seconds = frac = None
    if micro_batch and dp:
        tokens = v.max_batches * micro_batch * grad_accum * dp * seq_len
    if steps:
        evals = math.ceil(steps / v.every_steps)
    if tokens is not None and evals is not None:
        flops = forward_flops_per_token * tokens * evals
        if tokens_per_second and train_flops_per_token:
            seconds = flops / (tokens_per_second * train_flops_per_token)
            if step_seconds and steps:
                frac = seconds / (step_seconds * steps)
    return ValidationPlan(fraction=None if v.files else v.fraction, seed=v.seed,
                          files=list(v.files) if v.files else None, every_steps=v.every_steps,
                          max_batches=v.max_batches, tokens_per_eval=tokens, evals=evals, flops=flops,
                          seconds=seconds, fraction_of_training_time=frac)


def quality_plan(q, sources) -> QualityPlan:
    """Banding, MinHash CPU estimate and tokens left for ``data.quality`` ``q`` over ``sources``.

    Raises ValueError for an impossible banding (reported as E005 by :func:`plan_evaluation`)."""
    nd = None
    if q.near_dup is not None:
        n = q.near_dup
        if (n.bands is None) != (n.rows is None):
            raise ValueError("near_dup.bands and near_dup.rows must be given together (or both omitted)")
        if n.bands is None:
            b = quality_math.optimal_bands(n.threshold, n.num_perm)
        else:
            if n.bands * n.rows > n.num_perm:
                raise ValueError(f"near_dup.bands x rows = {n.bands * n.rows} > num_perm {n.num_perm}")
            b = quality_math.banding(n.threshold, n.bands, n.rows)
        nd = NearDupPlan(threshold=n.threshold, num_perm=n.num_perm, ngram=n.ngram, bands=b.bands, rows=b.rows,
                         chosen_by_llmc=n.bands is None, false_positive=b.false_positive,
                         false_negative=b.false_negative, s_half=b.s_half, seed=n.seed)
    declared = unique_tokens(sources)
    shingles = core = wall = None
    if declared is not None and nd is not None:
        shingles = declared * WORDS_PER_TOKEN
        cost = quality_math.dedup_cpu_seconds(1, shingles, nd.num_perm, q.workers)
        core, wall = cost.core_seconds, cost.wall_seconds
    left = None
    if declared is not None and q.expected_removal_fraction is not None:
        left = declared * (1.0 - q.expected_removal_fraction)
    dc = q.decontaminate
    return QualityPlan(exact=q.exact, near_dup=nd, decontaminate_ngram=dc.ngram if dc else None,
                       benchmarks=list(dc.benchmarks) if dc else [], workers=q.workers, declared_tokens=declared,
                       shingles=shingles, minhash_core_seconds=core, minhash_wall_seconds=wall,
                       expected_removal_fraction=q.expected_removal_fraction, tokens_left=left)


def _norm(path: str, spec_dir: str) -> str:
    """A spec-relative path, normalised lexically (the compiler reads no files)."""
    return posixpath.normpath(path if posixpath.isabs(path) else posixpath.join(spec_dir or ".", path))


def _inside(a: str, b: str) -> bool:
    """True when path ``a`` equals ``b`` or lies under it (glob characters cut the path at their folder)."""
    def base(p: str) -> str:
        for i, ch in enumerate(p):
            if ch in "*?[":
                return posixpath.dirname(p[:i]) or "."
        return p
    a, b = base(a), base(b)
    return a == b or a.startswith(b.rstrip("/") + "/")


def _task_key(task: str) -> str:
    """``hellaswag`` -> hellaswag; ``evals/my_mc.yaml`` -> my_mc."""
    t = posixpath.basename(task)
    for ext in (".yaml", ".yml"):
        if t.endswith(ext):
            t = t[: -len(ext)]
    return t.lower()


def task_copies(tasks: list[str], task_files) -> tuple[dict[str, TaskCopy] | None, dict[str, bytes]]:
    """Where the build copies each local task file of ``tasks`` and what it reads (see the module docstring), from
    ``task_files`` (:class:`llmc.spec.facts.EvalTaskFacts` by spec path): ``({task: TaskCopy}, {build path:
    bytes})``; ``(None, {})`` when none of them was read. A file with a problem (E009) gets no copy."""
    local = list(dict.fromkeys(t for t in tasks if t.endswith((".yaml", ".yml"))))
    if not any(t in (task_files or {}) for t in local):
        return None, {}
    plans: dict[str, TaskCopy] = {}
    copies: dict[str, bytes] = {}
    used: set[str] = set()
    for t in local:
        fact = task_files.get(t)
        if fact is None or fact.problem is not None or not fact.files or fact.main is None:
            continue
        stem = posixpath.splitext(posixpath.basename(t))[0] or "task"
        key, n = stem, 1
        while key in used:
            n += 1
            key = f"{stem}-{n}"
        used.add(key)
        root = f"{TASK_COPY_DIR}/{key}"
        plans[t] = TaskCopy(path=f"{root}/{fact.main}", files={f"{root}/{f.rel}": f.sha256 for f in fact.files})
        copies.update({f"{root}/{f.rel}": f.data for f in fact.files})
    return plans, copies


def plan_evaluation(run, sink, *, spec_dir: str, stage_names: list[str], steps: int | None,
                    micro_batch: int | None, dp: int | None, forward_flops_per_token: float, grad_accum: int = 1,
                    tokens_per_second: float | None, train_flops_per_token: float | None,
                    step_seconds: float | None, stages=None, task_files=None,
                    trained_tokens: float | None = None) -> EvaluationPlan | None:
    """The :class:`EvaluationPlan` of ``run`` (None when it has neither ``eval`` nor ``data.quality``).

    ``stages``: the compiled stages (``name``, ``kind``, ``steps``, ``checkpoint_interval``), for
    ``eval.every_checkpoints``. ``task_files``: what each local task file of ``eval.tasks`` says
    (:class:`llmc.spec.facts.EvalTaskFacts` by spec path; absent: not read, its file name stands in).
    ``trained_tokens``: the tokens the run trains (:func:`llmc.compiler.scaling.trained_tokens`; None: data.tokens),
    which E001's epochs count."""
    ev, q, data = run.eval, run.data.quality, run.data
    if ev is None and q is None:
        return None
    val = tasks = qual = None
    if ev is not None and ev.validation is not None:
        v = ev.validation
        val = validation_plan(v, steps=steps, micro_batch=micro_batch, dp=dp, grad_accum=grad_accum, seq_len=data.seq_len,
                              forward_flops_per_token=forward_flops_per_token, tokens_per_second=tokens_per_second,
                              train_flops_per_token=train_flops_per_token, step_seconds=step_seconds)
        train_paths = [(i, _norm(s.path, spec_dir)) for i, s in enumerate(data.sources) if s.path]
        for j, f in enumerate(v.files or []):
            fp = _norm(f, spec_dir)
            if validation_file_format(f) is None:  # how every backend reads it, by its suffix
                sink.add("E011", "error", f"eval.validation.files.{j}",
                         f"validation file {f!r} is neither JSON lines nor text "
                         f"({' / '.join(VALIDATION_FILE_FORMATS)}): every trainer reads a validation file as JSON lines "
                         "with a `text` field, or as one text document",
                         "convert it (e.g. datasets.Dataset.from_parquet(...).to_json(...)), or drop files to hold "
                         "out a fraction of the training sources")
            for i, sp in train_paths:
                if _inside(fp, sp) or _inside(sp, fp):
                    sink.add("E003", "error", f"eval.validation.files.{j}",
                             f"validation file {f!r} overlaps training source {data.sources[i].name!r} "
                             f"({data.sources[i].path}): validation loss would be measured on training data",
                             "use files outside every source's path, or drop files to hold out a fraction")
    if ev is not None and ev.tasks:
        names = list(ev.task_stages) if ev.task_stages else stage_names[-1:]
        for j, name in enumerate(ev.task_stages or []):
            if name not in stage_names:
                sink.add("E004", "error", f"eval.task_stages.{j}", f"unknown stage {name!r}",
                         f"stages: {', '.join(stage_names) or '(none)'}")
        ck = None
        if ev.every_checkpoints is not None:
            ck = _checkpoint_evals(run, ev.every_checkpoints, names, stages or [], sink)
        lm_names = []
        for j, t in enumerate(ev.tasks):
            fact = (task_files or {}).get(t)
            if fact is not None and fact.problem is not None:
                sink.add("E009", "error", f"eval.tasks.{j}", f"eval task file: {fact.problem}; the eval step after "
                         "training would fail", "fix the path (relative to the spec's folder) or the file, or drop it "
                         "from eval.tasks")
            local = t.endswith((".yaml", ".yml"))
            lm_names.append(fact.name if fact is not None and fact.name else
                            posixpath.splitext(posixpath.basename(t))[0] if local else t)
        chat = _chat_template_stages(ev.apply_chat_template, names, stages or [], sink)
        copied, copies = task_copies(list(ev.tasks), task_files)
        tasks = TasksPlan(tasks=list(ev.tasks), names=lm_names, stages=names, backend=ev.backend, batch_size=ev.batch_size,
                          limit=ev.limit, every_checkpoints=ev.every_checkpoints, checkpoint_steps=ck,
                          apply_chat_template=chat, task_files=copied, copies=copies)
        if ev.backend == "vllm":
            sink.add("E007", "info", "eval.backend",
                     "llmc launch evaluates with lm-evaluation-harness's hf backend; eval/tasks.json gives the "
                     "vllm command line to run yourself", "")
        dc = q.decontaminate if q is not None else None
        if dc is None:
            sink.add("E006", "info", "eval.tasks",
                     f"{len(ev.tasks)} eval task(s) but the training data is not decontaminated",
                     "set data.quality.decontaminate.benchmarks to the benchmarks' files")
        else:
            bench = [_task_key(b.rsplit(".", 1)[0] if "." in posixpath.basename(b) else b) for b in dc.benchmarks]
            for j, t in enumerate(ev.tasks):
                k = _task_key(t)
                if not any(k in b or b in k for b in bench):
                    sink.add("E002", "warning", f"eval.tasks.{j}",
                             f"eval task {t!r} has no benchmark file in data.quality.decontaminate.benchmarks; "
                             f"its score may be inflated by contamination",
                             f"add its items (e.g. {k}.jsonl) to the benchmarks list")
    if q is not None:
        try:
            qual = quality_plan(q, data.sources)
        except ValueError as e:
            sink.add("E005", "error", "data.quality.near_dup", str(e),
                     "b x r <= num_perm; or omit both for llmc's choice")
    _check_epochs(run, val, qual, sink, trained_tokens)
    return EvaluationPlan(validation=val, tasks=tasks, quality=qual)


def _chat_template_stages(asked: bool | None, names: list[str], stages, sink) -> dict[str, bool]:
    """stage -> whether its evals apply the chat template: ``asked`` (``eval.apply_chat_template``), or by default
    whether the stage's export carries one (a chat kind); E010 where ``true`` meets a stage llmc writes none for."""
    kinds = {st.name: st.kind for st in stages}
    out: dict[str, bool] = {}
    for name in names:
        chat = kinds.get(name) in CHAT_KINDS
        out[name] = chat if asked is None else asked
        if asked and not chat and name in kinds:
            sink.add("E010", "warning", "eval.apply_chat_template",
                     f"stage {name!r} ({kinds[name]}) is scored through a chat template, but its export carries none "
                     "of llmc's (only sft / dpo / grpo exports do); the eval step fails unless its tokenizer has one",
                     "leave apply_chat_template out (chat stages only) or set it false")
    return out


def _checkpoint_evals(run, every: int, names: list[str], stages, sink) -> dict[str, list[int]]:
    """stage -> checkpoint steps the eval step scores; E008 where keep_latest prunes chosen ones first."""
    keep = run.training.checkpoint.keep_latest
    out: dict[str, list[int]] = {}
    for st in stages:
        if st.name not in names or not st.steps:
            continue
        c = checkpoint_eval_steps(st.steps, st.checkpoint_interval or st.steps, every, keep,
                                  intermediate=st.kind not in CHAT_KINDS)
        out[st.name] = c.scored
        lost = [s for s in c.chosen if s not in c.scored]
        if lost:
            sink.add("E008", "warning", "eval.every_checkpoints",
                     f"stage {st.name!r}: checkpoints at steps {format_steps(lost)} are pruned (training.checkpoint."
                     f"keep_latest {keep}) before the eval step runs; it scores {format_steps(c.scored) or 'none of them'}",
                     f"keep_latest: {c.keep_needed} keeps every chosen checkpoint; or raise every_checkpoints")
    return out


def format_steps(s: list[int], n: int = 6) -> str:
    """``100, 200, ..., 900`` (at most ``n`` shown)."""
    if len(s) <= n:
        return ", ".join(str(x) for x in s)
    return ", ".join(str(x) for x in s[: n - 1]) + f", ... ({len(s) - n} more), {s[-1]}"


def _check_epochs(run, val: ValidationPlan | None, qual: QualityPlan | None, sink,
                  trained_tokens: float | None = None) -> None:
    """E001: epochs per source over the tokens left for training after the split and the expected removal,
    only where the declared tokens alone stay within MAX_EPOCHS (the D002 check covers those); the epochs of the
    tokens the run trains (``trained_tokens``, as D002's; None: data.tokens), over the pre-training run's sources
    (a ``pretrain`` stage's own where it sets them: ``defaults.pretrain_inputs``)."""
    from llmc.compiler.defaults import pretrain_inputs, pretrain_paths

    data, where = pretrain_inputs(run)[0], pretrain_paths(run)[0]
    keep = 1.0
    why = []
    if val is not None and val.fraction is not None:
        keep *= 1.0 - val.fraction
        why.append(f"{100 * val.fraction:.2g}% held out for validation")
    if qual is not None and qual.expected_removal_fraction:
        keep *= 1.0 - qual.expected_removal_fraction
        why.append(f"{100 * qual.expected_removal_fraction:.2g}% expected removed by the quality pass")
    if keep >= 1.0 or not data.sources:
        return
    for i, (s, share) in enumerate(zip(data.sources, mixture_shares(data.sources), strict=True)):
        if s.tokens is None:
            continue
        need = (data.tokens if trained_tokens is None else trained_tokens) * share
        raw, after = need / s.tokens, need / (s.tokens * keep)
        if raw <= MAX_EPOCHS < after:
            sink.add("E001", "warning", f"{where}.sources.{i}.tokens",
                     f"source {s.name!r} would be repeated {after:.1f} epochs over the {s.tokens * keep:.3g} tokens "
                     f"left ({'; '.join(why)})",
                     f"beyond ~{MAX_EPOCHS:.0f} epochs repeated data loses value (Muennighoff et al. 2023, "
                     f"arXiv:2305.16264); add data or train on fewer tokens")


__all__ = ["CheckpointEvals", "checkpoint_eval_steps", "format_steps", "EvaluationPlan", "ValidationPlan", "QualityPlan", "NearDupPlan", "TasksPlan", "TaskCopy", "TASK_COPY_DIR", "task_copies", "plan_evaluation",
           "validation_plan", "quality_plan", "MAX_EPOCHS", "WORDS_PER_TOKEN"]
