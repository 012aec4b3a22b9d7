"""Facts about files a spec references, gathered before compiling (the compiler reads no files).

``gather_facts(run, spec_dir)`` reads each tokenizer the spec names (``data.tokenizer.path`` and every
stage's) and records its special tokens (the ``added_tokens`` of a Hugging Face ``tokenizer.json``, see
https://huggingface.co/docs/tokenizers/api/tokenizer). The compiler takes the result as
``compile_spec(..., facts=...)``; without it the special tokens are inferred from the model name. It also
reads the ``model_type`` of each local Hugging Face checkpoint an ``init_hf`` names (a folder with a config.json),
which decides whether torchtitan's state-dict adapters can read it, whether its weights are quantized (which no
trainer reads), and the task name of each local
lm-evaluation-harness task file ``eval.tasks`` names (``task:``, or ``group:`` over a ``task:`` list: what
``lm_eval --tasks`` takes; https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/new_task_guide.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmc.fileio import expand_user, read_regular_file
from llmc.spec.hf import quantization_method
from llmc.spec.schema import RunSpec

#: Largest referenced JSON file read (HF config.json files are a few KiB; tokenizer.json a few MiB).
MAX_CONFIG_BYTES = 4 * 2**20
MAX_TOKENIZER_BYTES = 64 * 2**20
MAX_TASK_BYTES = 4 * 2**20


@dataclass(frozen=True)
class TokenizerFacts:
    """What a tokenizer file says: its special tokens (None when unreadable) and the file read; ``problem``: why a
    path that exists here holds no tokenizer llmc's trainers can read (None where it reads, or is not here: a spec
    may be planned away from its files)."""

    specials: frozenset[str] | None
    source: str
    problem: str | None = None
    chat_template: bool | None = None
    """Whether the tokenizer folder carries a chat template of its own (chat_template.jinja, or ``chat_template`` in
    tokenizer_config.json: what transformers reads); None where the folder was not read."""


@dataclass(frozen=True)
class ExternalFacts:
    """Facts keyed by the path exactly as the spec writes it: tokenizers, and the config.json ``model_type`` of
    each ``init_hf`` checkpoint that is a local folder (absent: a Hub id, or unreadable)."""

    tokenizers: dict[str, TokenizerFacts] = field(default_factory=dict)
    checkpoint_types: dict[str, str] = field(default_factory=dict)
    checkpoint_quantization: dict[str, str] = field(default_factory=dict)
    """The ``quant_method`` of each local ``init_hf`` checkpoint whose weights are quantized
    (:func:`llmc.spec.hf.quantization_method`); absent: plain weights, a Hub id, or unreadable."""
    eval_tasks: dict[str, EvalTaskFacts] = field(default_factory=dict)
    """Each local task file of ``eval.tasks`` (``*.yaml``), keyed as the spec writes it."""


@dataclass(frozen=True)
class EvalTaskFacts:
    """A local lm-evaluation-harness task file: the name ``lm_eval --tasks`` knows it by, or why it cannot be read."""

    name: str | None
    problem: str | None = None


class _TaskYaml(yaml.SafeLoader):
    """YAML as lm_eval's task files write it: lm_eval's own tags (``!function utils.process``) read as None."""


_TaskYaml.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_file_name(path: str, text: str) -> tuple[str, bool]:
    """(the name lm_eval knows a task file by, whether it lists other tasks): ``task: x`` -> (x, False); a group
    file (``group: g`` with ``task: [a, b]``) -> (g, True). ValueError when it is neither."""
    try:
        doc = yaml.load(text, Loader=_TaskYaml)  # noqa: S506 (a SafeLoader whose only addition ignores tags)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    task = doc.get("task") if isinstance(doc, dict) else None
    if isinstance(task, str):
        return task, False
    if isinstance(task, list) and isinstance(doc.get("group"), str):
        return doc["group"], True
    raise ValueError(f"{path}: no top-level 'task:' name (or 'group:' name with a 'task:' list)")


def read_eval_task(path: str, spec_dir: str | Path) -> EvalTaskFacts:
    """The task name of the local task file ``path`` (relative to ``spec_dir``), or why it cannot be read (naming the
    file as the spec does: the reason lands in the lock, which must not depend on the directory llmc ran from)."""
    p = expand_user(path)
    if not p.is_absolute():
        p = Path(spec_dir) / p
    try:
        text = read_regular_file(p, MAX_TASK_BYTES).decode("utf-8")
    except FileNotFoundError:
        return EvalTaskFacts(None, f"{path} does not exist (next to the spec)")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return EvalTaskFacts(None, f"{path}: cannot be read ({type(e).__name__})")
    try:
        return EvalTaskFacts(task_file_name(path, text)[0])
    except (ValueError, RecursionError) as e:
        return EvalTaskFacts(None, str(e))


def tokenizer_paths(run: RunSpec) -> list[str]:
    """Every tokenizer path the spec names, in spec order, without repeats."""
    paths = [run.data.tokenizer.path] + [st.data.tokenizer.path for st in run.stages if st.data is not None]
    return list(dict.fromkeys(p for p in paths if p))


def read_tokenizer(path: str, spec_dir: str | Path) -> TokenizerFacts:
    """Special tokens of ``path`` (a ``tokenizer.json`` or a folder holding one; relative to ``spec_dir``)."""
    p = expand_user(path)
    if not p.is_absolute():
        p = Path(spec_dir) / p
    f = p / "tokenizer.json" if p.is_dir() else p
    try:
        js = json.loads(read_regular_file(f, MAX_TOKENIZER_BYTES).decode("utf-8"))
        return TokenizerFacts(frozenset(t["content"] for t in js.get("added_tokens", [])), str(f),
                              chat_template=has_chat_template(f.parent))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        return TokenizerFacts(None, str(f), _tokenizer_problem(p, f, e))


#: tokenizer files other than tokenizer.json that a model folder may ship instead: what they are
_OTHER_TOKENIZER_FILES = {
    "tiktoken.model": "a tiktoken BPE file, as Kimi K2 ships; transformers' TikTokenConverter converts it",
    "tokenizer.model": "a SentencePiece model; transformers' AutoTokenizer.from_pretrained(folder).save_pretrained("
                       "folder) writes its tokenizer.json",
}


def has_chat_template(d: str | Path) -> bool | None:
    """Whether the tokenizer folder ``d`` has a chat template of its own, where transformers' tokenizer reads one:
    chat_template.jinja, else ``chat_template`` in tokenizer_config.json (None: that file does not read). The plan
    (``chat_template: tokenizer``) and the eval step (``--apply_chat_template`` on an export) ask the same question."""
    d = Path(d)
    if (d / "chat_template.jinja").is_file():
        return True
    try:
        cfg = json.loads(read_regular_file(d / "tokenizer_config.json", MAX_TOKENIZER_BYTES).decode("utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return isinstance(cfg, dict) and bool(cfg.get("chat_template"))


def _tokenizer_problem(p: Path, f: Path, err: Exception) -> str | None:
    """Why the tokenizer at ``p`` (file ``f``) does not read, where something is there; None where nothing is."""
    try:
        if not p.exists():
            return None
        if p.is_dir() and not f.exists():
            other = next((f"{name}, {what}" for name, what in _OTHER_TOKENIZER_FILES.items() if (p / name).exists()),
                         None)
            return f"{p} holds no tokenizer.json" + (f" but {other}" if other else "")
    except OSError as e:
        return f"{p} cannot be read ({e.strerror or e})"
    if isinstance(err, OSError):
        return f"{f} cannot be read ({err.strerror or err})"
    return f"{f} is not a Hugging Face tokenizer.json ({type(err).__name__})"


def init_hf_paths(run: RunSpec) -> list[str]:
    """Every ``init_hf`` the spec names (``training.init_hf``, then each stage's), without repeats."""
    paths = [run.training.init_hf] + [getattr(st, "init_hf", None) for st in run.stages]
    return list(dict.fromkeys(p for p in paths if p))


def read_checkpoint_config(path: str, spec_dir: str | Path) -> dict | None:
    """``path``/config.json (relative to ``spec_dir``) as a dict, None when it is not a readable local one."""
    p = expand_user(path)
    if not p.is_absolute():
        p = Path(spec_dir) / p
    try:
        cfg = json.loads(read_regular_file(p / "config.json", MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError):
        return None
    return cfg if isinstance(cfg, dict) else None


def gather_facts(run: RunSpec, spec_dir: str | Path) -> ExternalFacts:
    """Read every tokenizer the spec references (unreadable ones are recorded with ``specials=None``) and the model
    type of every local ``init_hf`` checkpoint."""
    configs = {p: cfg for p in init_hf_paths(run) if (cfg := read_checkpoint_config(p, spec_dir)) is not None}
    types = {p: mt for p, cfg in configs.items() if isinstance(mt := cfg.get("model_type"), str)}
    quantized = {p: q for p, cfg in configs.items() if (q := quantization_method(cfg)) is not None}
    local_tasks = [t for t in (run.eval.tasks if run.eval is not None else ()) if t.endswith((".yaml", ".yml"))]
    return ExternalFacts(tokenizers={p: read_tokenizer(p, spec_dir) for p in tokenizer_paths(run)},
                         checkpoint_types=types, checkpoint_quantization=quantized, eval_tasks={t: read_eval_task(t, spec_dir) for t in local_tasks})


__all__ = ["MAX_CONFIG_BYTES", "MAX_TOKENIZER_BYTES", "TokenizerFacts", "ExternalFacts", "EvalTaskFacts",
           "tokenizer_paths", "read_tokenizer", "has_chat_template", "init_hf_paths", "read_checkpoint_config",
           "read_eval_task", "task_file_name", "gather_facts"]
