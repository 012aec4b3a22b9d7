"""Facts about files a spec references, gathered before compiling (the compiler reads no files).

``gather_facts(run, spec_dir)`` reads each tokenizer the spec names (``data.tokenizer.path`` and every
stage's) and records its special tokens (the ``added_tokens`` of a Hugging Face ``tokenizer.json``, see
https://huggingface.co/docs/tokenizers/api/tokenizer). The compiler takes the result as
``compile_spec(..., facts=...)``; without it the special tokens are inferred from the model name. It also
reads the ``model_type`` of each local Hugging Face checkpoint an ``init_hf`` names (a folder with a config.json),
which decides whether torchtitan's state-dict adapters can read it, whether its weights are quantized (which no
trainer reads), and what else a launch would find wrong with it (:class:`CheckpointFacts`: the config.json the
spec's model must match, the weight files its safetensors index names that are missing; an ``init_hf`` that is no
folder here told apart from a Hub id by huggingface_hub's own ``repo_id`` rule), each tokenizer's size, and the task
name of each local
lm-evaluation-harness task file ``eval.tasks`` names (``task:``, or ``group:`` over a ``task:`` list: what
``lm_eval --tasks`` takes; https://github.com/EleutherAI/lm-evaluation-harness/blob/main/docs/new_task_guide.md),
with the bytes and sha256 of every local file that task reads (:func:`task_file_tree`), which ``llmc build`` copies
into the build (``eval/tasks/``) so that a build runs its evals with no file from outside it. Each local data source
whose path is a folder that holds files but none its ``format`` reads is recorded too (:func:`read_source_folder`:
what it holds and the ``format:`` that reads it), for the plan's D007.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import itertools
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmc.fileio import expand_user, read_regular_file
from llmc.sources import SUFFIXES, folder_mismatch, is_hf_saved
from llmc.spec.hf import mtp_prefixes, quantization_method
from llmc.spec.schema import EVAL_TASK_NAME, RECORD_SOURCE_KINDS, RunSpec

#: Largest referenced JSON file read (HF config.json files are a few KiB; tokenizer.json a few MiB).
MAX_CONFIG_BYTES = 4 * 2**20
MAX_TOKENIZER_BYTES = 64 * 2**20
MAX_TASK_BYTES = 4 * 2**20
#: Largest file an eval task reads (its data_files) that is read for its copy in the build (the build warns, X014,
#: when the copies pass 16 MiB in all: it is meant to be committed)
MAX_TASK_DATA_BYTES = 2**30
#: At most this many files copied for one task file, and YAML files looked through for a group's members
MAX_TASK_FILES = 1000
MAX_GROUP_SCAN = 5000


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
    size: int | None = None
    """Its tokens with the added ones, as ``tokenizers.Tokenizer.get_vocab_size(with_added_tokens=True)`` counts them
    (the figure llmc's trainers compare with the model's vocab_size); None where the file does not say."""


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
    checkpoints: dict[str, CheckpointFacts] = field(default_factory=dict)
    """Each ``init_hf`` that is a local path (a folder here, or a path that cannot be a Hub id), keyed as the spec
    writes it; a Hub id (huggingface_hub's ``namespace/name``) is absent: it resolves in the cluster's HF cache."""
    source_folders: dict[tuple[str, str], SourceFolderFacts] = field(default_factory=dict)
    """Each data source folder that holds files but none its format reads, keyed by (path as the spec writes it,
    format); absent: a folder that holds such files, a glob, a file, a ``save_to_disk`` dataset, a path not here."""


@dataclass(frozen=True)
class SourceFolderFacts:
    """A data source folder that holds no file of the source's format (:func:`llmc.sources.folder_mismatch`):
    ``wanted`` the suffixes that format reads in a folder, ``holds`` what the folder holds instead (in words),
    ``hint`` the ``format:`` (or the glob) that reads those files. prepare stops on it with the same words."""

    wanted: str
    holds: str
    hint: str


@dataclass(frozen=True)
class CheckpointFacts:
    """What a launch would find in an ``init_hf`` folder (``llmc.runtime.hf_io``), read at plan time.

    ``problem``: why it cannot be loaded at all (no such folder where its parent folder is here, no config.json, no
    weight files), with ``near``: the folders beside it with the closest names (a typo's likely fix); ``config``: its
    config.json; ``missing``: the weight files its ``model.safetensors.index.json`` names that are not there (a
    partial download or copy)."""

    problem: str | None = None
    config: dict | None = None
    missing: tuple[str, ...] = ()
    near: tuple[str, ...] = ()
    #: the multi-token-prediction tensors it stores (``llmc.spec.hf.mtp_prefixes``; DeepSeek-V3's
    #: ``model.layers.61.*``), name and shape, from the safetensors headers; None where they could not be read
    mtp_tensors: tuple[tuple[str, tuple[int, ...]], ...] | None = ()


@dataclass(frozen=True)
class EvalTaskFile:
    """A file an eval task reads, as the build copies it: ``rel`` is its place in the task's copy folder (a POSIX
    path laid out so that every relative reference of the task files still resolves there), ``data`` its bytes."""

    rel: str
    data: bytes = field(repr=False)
    sha256: str


@dataclass(frozen=True)
class EvalTaskFacts:
    """A local lm-evaluation-harness task file: the name ``lm_eval --tasks`` knows it by, or why it cannot be read;
    ``files``: the task file and every local file it reads (:func:`task_file_tree`), for the build to copy, with
    ``main`` the task file's own ``rel`` among them (empty / None where ``problem`` says why not)."""

    name: str | None
    problem: str | None = None
    main: str | None = None
    files: tuple[EvalTaskFile, ...] = ()


class _TaskYaml(yaml.SafeLoader):
    """YAML as lm_eval's task files write it: lm_eval's own tags (``!function utils.process``) read as None."""


_TaskYaml.add_multi_constructor("!", lambda loader, suffix, node: None)


class _Function(str):
    """The ``module.function`` of lm_eval's ``!function`` tag."""


class _RefYaml(yaml.SafeLoader):
    """:class:`_TaskYaml` that keeps each ``!function module.fn`` (lm_eval imports ``module.py`` next to the YAML)."""


_RefYaml.add_multi_constructor("!", lambda loader, suffix, node: _Function(node.value) if (
    suffix == "function" and isinstance(node, yaml.ScalarNode)) else None)


#: entries of a missing init_hf's parent folder read for "did you mean" (each costs a stat)
NEAR_NAMES_LIMIT = 2000

def task_file_name(path: str, text: str) -> tuple[str, bool]:
    """(the name lm_eval knows a task file by, whether it lists other tasks): ``task: x`` -> (x, False); a group
    file (``group: g`` with ``task: [a, b]``) -> (g, True). ValueError when it is neither."""
    try:
        doc = yaml.load(text, Loader=_TaskYaml)  # noqa: S506 (a SafeLoader whose only addition ignores tags)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    task = doc.get("task") if isinstance(doc, dict) else None
    name, group = (task, False) if isinstance(task, str) else (
        (doc["group"], True) if isinstance(task, list) and isinstance(doc.get("group"), str) else (None, False))
    if name is not None:
        if not EVAL_TASK_NAME.fullmatch(name):  # the name lm_eval is run with, as eval.tasks names are checked
            raise ValueError(f"{path}: its {'group' if group else 'task'} name {name[:80]!r} is not an "
                             "lm-evaluation-harness task name (letters, digits, _ - . ( ) and the globs * ? [ ] !)")
        return name, group
    raise ValueError(f"{path}: no top-level 'task:' name (or 'group:' name with a 'task:' list)")


def read_eval_task(path: str, spec_dir: str | Path) -> EvalTaskFacts:
    """The task name of the local task file ``path`` (relative to ``spec_dir``) and the files the build copies for it
    (:func:`task_file_tree`), or why it cannot be read (naming the file as the spec does: the reason lands in the
    lock, which must not depend on the directory llmc ran from)."""
    p = expand_user(path)
    if not p.is_absolute():
        p = Path(spec_dir) / p
    try:
        data = read_regular_file(p, MAX_TASK_BYTES)
        text = data.decode("utf-8")
    except FileNotFoundError:
        return EvalTaskFacts(None, f"{path} does not exist (next to the spec)")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return EvalTaskFacts(None, f"{path}: cannot be read ({type(e).__name__})")
    try:
        name = task_file_name(path, text)[0]
    except (ValueError, RecursionError) as e:
        return EvalTaskFacts(None, str(e))
    try:
        main, files = task_file_tree(p, data, path)
    except (ValueError, RecursionError) as e:
        return EvalTaskFacts(name, str(e))
    return EvalTaskFacts(name, main=main, files=files)


def _file_refs(doc) -> tuple[list[str], list[str], list[str]]:
    """(relative ``dataset_kwargs.data_files``, relative ``include:`` files, ``!function`` modules' files) of a task
    file ``doc``, each relative to the file's folder: what llmc's eval step (``llmc.runtime.evaluate``: data_files
    that hold no ``://`` and are not absolute, read next to the task file) and lm_eval's YAML loader
    (lm_eval/tasks/_yaml_loader.py: ``include`` relative to the file; ``!function m.f`` imports ``m.py`` beside it)
    read."""
    if not isinstance(doc, dict):
        return [], [], []
    kwargs = doc.get("dataset_kwargs")
    data = [v for v in _strings(kwargs.get("data_files") if isinstance(kwargs, dict) else None)
            if "://" not in v and not Path(v).is_absolute()]
    inc = doc.get("include")
    includes = [i for i in (inc if isinstance(inc, list) else [inc]) if isinstance(i, str) and not Path(i).is_absolute()]
    funcs = [v.rpartition(".")[0].replace(".", "/") + ".py" for v in _strings(doc) if isinstance(v, _Function) and "." in v]
    return data, includes, funcs


def _strings(v):
    """Every string in a YAML value (lists and mappings' values walked in order)."""
    if isinstance(v, str):
        yield v
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _strings(x)


def _member_names(tasks) -> set[str]:
    """The task / group / tag names a group file's ``task:`` list refers to (strings, ``{task: name, ...}`` /
    ``{group: name, ...}`` entries, and those of an inline group's own list)."""
    out: set[str] = set()
    for item in tasks if isinstance(tasks, list) else []:
        if isinstance(item, str):
            out.add(item)
        elif isinstance(item, dict):
            out |= {item[k] for k in ("task", "group") if isinstance(item.get(k), str)}
            out |= _member_names(item.get("task"))
    return out


def _names_of(doc) -> set[str]:
    """The names lm_eval's task index registers a task file under: its ``task:``, ``group:`` and ``tag:`` names."""
    if not isinstance(doc, dict):
        return set()
    tags = doc.get("tag")
    return ({doc[k] for k in ("task", "group") if isinstance(doc.get(k), str)}
            | {t for t in (tags if isinstance(tags, list) else [tags]) if isinstance(t, str)})


def group_scan(base: Path, shown: str) -> list[str]:
    """The ``*.yaml`` files under ``base`` (POSIX, relative to it, sorted), as lm_eval's task index walks an
    ``include_path`` folder (lm_eval/tasks/_index.py ``_iter_yaml_files``: ``**/*.yaml`` without ``__pycache__``
    and ``.ipynb_checkpoints``), leaving out hidden folders, virtual environments (``pyvenv.cfg``) and llmc builds
    (``.llmc-build.json``: a build beside the spec holds the copies of an earlier build, which would nest again);
    ValueError (naming ``shown``, the group file as the spec writes it) past :data:`MAX_GROUP_SCAN`."""
    out: list[str] = []
    for root, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith(".")
                         and not (Path(root, d, "pyvenv.cfg").exists() or Path(root, d, ".llmc-build.json").exists()))
        rel = Path(root).relative_to(base).as_posix()
        out += [posixpath.normpath(posixpath.join(rel, f)) for f in sorted(files) if f.endswith(".yaml")]
        if len(out) > MAX_GROUP_SCAN:
            raise ValueError(f"{shown}: more than {MAX_GROUP_SCAN} YAML files beside it to look through for the "
                             "group's member tasks; keep the group file in a folder of its own tasks")
    return sorted(out)


def task_file_tree(p: Path, data: bytes, shown: str) -> tuple[str, tuple[EvalTaskFile, ...]]:
    """The files the build copies for the task file ``p`` (bytes ``data``; ``shown``: its path as the spec writes
    it, for messages): ``p``; the local files it reads, relative to its folder as llmc's eval step and lm_eval read
    them (:func:`_file_refs`: relative ``dataset_kwargs.data_files``, glob patterns expanded, ``include:`` files and
    ``!function`` modules, those of the files they include too); and for a group file (``group:`` + a ``task:``
    list), each ``*.yaml`` under its folder that registers a name the group lists (lm_eval finds the members by name
    in the ``include_path`` folder llmc's eval step gives it: the task file's), with what those read. Absolute paths
    and URLs are read where they are, not copied.

    Returns ``(main, files)``: each file's ``rel`` is its path relative to ``p``'s folder, prefixed with as many of
    that folder's own trailing names as the references climb out of it with ``..`` (``tasks/t.yaml`` reading
    ``../data/x.jsonl`` -> ``tasks/t.yaml``, ``data/x.jsonl``), so the copies keep every relative reference; ``main``
    is ``p``'s. ValueError (naming ``shown``) for a referenced file that is missing or unreadable."""
    base = Path(os.path.abspath(p)).parent
    found: dict[str, bytes] = {}  # path relative to base (normalised, maybe starting with ..) -> bytes
    queue: list[tuple[str, bytes]] = [(p.name, data)]
    wanted: set[str] = set()
    group = False

    def read(rel: str, limit: int, what: str) -> bytes:
        try:
            return read_regular_file(base / rel, limit)
        except FileNotFoundError:
            raise ValueError(f"{shown}: {what} {rel!r} (relative to the task file's folder) does not exist") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{shown}: {what} {rel!r} cannot be read ({type(e).__name__})") from None

    def add(rel: str, limit: int, what: str) -> bytes:
        if rel not in found:
            if len(found) >= MAX_TASK_FILES:
                raise ValueError(f"{shown}: reads more than {MAX_TASK_FILES} files")
            found[rel] = read(rel, limit, what)
        return found[rel]

    def scan(rel: str, raw: bytes) -> None:
        nonlocal group
        try:
            doc = yaml.load(raw.decode("utf-8"), Loader=_RefYaml)  # noqa: S506 (SafeLoader; tags kept as names)
        except (UnicodeDecodeError, yaml.YAMLError):
            raise ValueError(f"{shown}: {rel!r} is not a YAML task file") from None
        here = posixpath.dirname(rel)
        data_files, includes, funcs = _file_refs(doc)
        for ref in data_files:
            target = posixpath.normpath(posixpath.join(here, ref))
            if glob.has_magic(ref):  # datasets expands data_files patterns (datasets.data_files)
                hits = sorted(glob.glob(str(base / target), recursive=True))
                files = [posixpath.normpath(Path(os.path.relpath(h, base)).as_posix()) for h in hits
                         if os.path.isfile(h)]
                if not files:
                    raise ValueError(f"{shown}: data file pattern {target!r} (relative to the task file's folder) "
                                     "matches no file")
                for f in files:
                    add(f, MAX_TASK_DATA_BYTES, "data file")
            else:
                add(target, MAX_TASK_DATA_BYTES, "data file")
        for inc in includes:
            target = posixpath.normpath(posixpath.join(here, inc))
            if target not in found:
                queue.append((target, add(target, MAX_TASK_BYTES, "included file")))
        for mod in funcs:  # lm_eval imports it when it is there, else an installed module of that name
            target = posixpath.normpath(posixpath.join(here, mod))
            if (base / target).is_file():
                add(target, MAX_TASK_BYTES, "!function module")
        if isinstance(doc, dict) and isinstance(doc.get("group"), str) and isinstance(doc.get("task"), list):
            wanted.update(_member_names(doc["task"]))
            group = True

    found[p.name] = data
    while queue:
        scan(*queue.pop(0))
        if group and not queue:  # the group's members, by name, in the task file's folder (as lm_eval indexes it)
            group = False
            for rel in group_scan(base, shown):
                if rel in found:
                    continue
                try:
                    raw = read_regular_file(base / rel, MAX_TASK_BYTES)
                    names = _names_of(yaml.load(raw.decode("utf-8"), Loader=_TaskYaml))  # noqa: S506
                except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError):
                    continue  # lm_eval's index skips what it cannot read, too
                if names & wanted:
                    found[rel] = raw
                    queue.append((rel, raw))
    up = max((_ups(r) for r in found), default=0)
    parts = base.parts[1:]
    if up > len(parts):
        raise ValueError(f"{shown}: a file it reads lies above the filesystem root")
    prefix = "/".join(parts[len(parts) - up:]) if up else ""
    place = {r: posixpath.normpath(posixpath.join(prefix, r)) if prefix else r for r in found}
    files = tuple(EvalTaskFile(place[r], found[r], hashlib.sha256(found[r]).hexdigest())
                  for r in sorted(found, key=lambda r: place[r]))
    return place[p.name], files


def _ups(rel: str) -> int:
    """How many leading ``..`` a normalised relative POSIX path has."""
    n = 0
    for part in rel.split("/"):
        if part != "..":
            break
        n += 1
    return n


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
                              chat_template=has_chat_template(f.parent), size=tokenizer_size(js))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        return TokenizerFacts(None, str(f), _tokenizer_problem(p, f, e))


def tokenizer_size(js: dict) -> int | None:
    """Tokens of a parsed tokenizer.json with its added tokens: the distinct strings of the model's vocabulary
    (BPE / WordPiece / WordLevel: a token -> id map; Unigram: a list of [piece, score]) and ``added_tokens``, which is
    what ``tokenizers``' ``get_vocab_size(with_added_tokens=True)`` returns (the union of both vocabularies, by token);
    None for another layout."""
    vocab = (js.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        tokens = set(vocab)
    elif isinstance(vocab, list) and all(isinstance(v, list) and v for v in vocab):
        tokens = {v[0] for v in vocab}
    else:
        return None
    return len(tokens | {t["content"] for t in js.get("added_tokens") or []})


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
    if type(err) is ValueError and str(err).startswith(str(f)):  # read_regular_file's own: a device, too large
        return str(err)
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


#: huggingface_hub's ``repo_id`` rule (``huggingface_hub.utils._validators.REPO_ID_REGEX`` / ``validate_repo_id``):
#: an optional ``namespace/`` and a name, each 1-96 of letters, digits, ``-``, ``_``, ``.``, starting and ending with a
#: letter or digit; no ``--`` or ``..``, not ending in ``.git``. So ``./x``, ``../x``, ``/abs/x``, ``a/b/c`` are paths.
_REPO_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b", re.ASCII)


def hub_id(name: str) -> bool:
    """Whether llmc's loader reads ``name`` (``namespace/name[@revision]``) as a Hugging Face Hub id when it is no
    folder: huggingface_hub's ``repo_id`` rule (:data:`_REPO_ID`) with the namespace that llmc's loader requires
    (``llmc.runtime.hf_io.resolve_hf_source``: exactly one ``/``)."""
    repo = name.partition("@")[0]
    return (repo.count("/") == 1 and _REPO_ID.fullmatch(repo) is not None and "--" not in repo and ".." not in repo
            and not repo.endswith(".git"))


def _in_hub_cache(name: str) -> bool:
    """Whether the Hub id ``name`` (``namespace/name[@revision]``) has a config.json in this machine's Hugging Face
    cache (``huggingface_hub.try_to_load_from_cache``: a look-up in the cache folder, never a download)."""
    repo, _, rev = name.partition("@")
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json", revision=rev or None), str)
    except Exception:  # noqa: BLE001 (no huggingface_hub, an unreadable cache: not known to be there)
        return False


def read_checkpoint(path: str, spec_dir: str | Path) -> CheckpointFacts | None:
    """What the ``init_hf`` ``path`` (relative to ``spec_dir``) holds here, as ``llmc.runtime.hf_io`` would load it;
    None where nothing can be said: a Hub id (:func:`hub_id`) whose namespace is no folder here or that is in this
    machine's Hugging Face cache, or a path whose parent folder is not here either (a spec planned away from its
    files). A Hub-id-shaped name whose namespace is a folder here (and that is not in the cache), and a path that
    cannot be a Hub id, are read as local paths (messages name ``path`` as the spec
    writes it)."""
    p = expand_user(path)
    if not p.is_absolute():
        p = Path(spec_dir) / p
    try:
        if not p.exists():
            if not p.parent.is_dir() or (hub_id(path) and _in_hub_cache(path)):
                return None
            # a bounded look at the parent (a scratch folder on a network filesystem can hold millions of entries)
            names = sorted(d.name for d in itertools.islice(p.parent.iterdir(), NEAR_NAMES_LIMIT) if d.is_dir())
            near = tuple(difflib.get_close_matches(p.name, names, n=3))
            return CheckpointFacts(problem=f"{path} is no folder here", near=near)
        if not p.is_dir():
            return CheckpointFacts(problem=f"{path} is a file, not a Hugging Face model folder")
        if not (p / "config.json").is_file():
            return CheckpointFacts(problem=f"{path} has no config.json (a Hugging Face model folder holds config.json "
                                           "and *.safetensors)")
        cfg = read_checkpoint_config(path, spec_dir)
        if cfg is None:
            return CheckpointFacts(problem=f"{path}/config.json is not a JSON object")
        index = p / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(read_regular_file(index, MAX_TOKENIZER_BYTES).decode("utf-8"))["weight_map"]
                files = sorted({str(f) for f in weight_map.values()})
            except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
                return CheckpointFacts(problem=f"{path}/model.safetensors.index.json has no weight_map", config=cfg)
            missing = tuple(f for f in files if not (p / f).is_file())
            mtp = mtp_prefixes(cfg)
            holding = sorted({str(f) for n, f in weight_map.items() if str(n).startswith(mtp)}) if mtp else []
            return CheckpointFacts(config=cfg, missing=missing,
                                   mtp_tensors=_tensor_shapes(p, [f for f in holding if f not in missing], mtp))
        if not any(p.glob("*.safetensors")):
            return CheckpointFacts(problem=f"{path} holds no *.safetensors weights (PyTorch .bin files are not read: "
                                           "transformers' save_pretrained(safe_serialization=True) writes them)",
                                   config=cfg)
        mtp = mtp_prefixes(cfg)
        files = sorted(f.name for f in itertools.islice(p.glob("*.safetensors"), MAX_WEIGHT_FILES)) if mtp else []
        return CheckpointFacts(config=cfg, mtp_tensors=_tensor_shapes(p, files, mtp))
    except OSError as e:
        return CheckpointFacts(problem=f"{path} cannot be read ({e.strerror or e})")


#: At most this many weight files' headers read for the MTP tensors of a checkpoint without an index (the releases
#: with MTP layers are sharded, with an index naming the files that hold them)
MAX_WEIGHT_FILES = 256
#: Largest safetensors header read (DeepSeek-V3's shards: some 100 KiB each)
MAX_SAFETENSORS_HEADER = 100 * 2**20


def _tensor_shapes(folder: Path, files: list[str], prefixes: tuple[str, ...]
                   ) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    """Name and shape of every tensor named ``prefixes``... in the safetensors ``files`` of ``folder``, from their
    headers alone (the format: an 8-byte little-endian header length, then a JSON object of name -> {dtype, shape,
    data_offsets}; https://huggingface.co/docs/safetensors/index#format). None where a header cannot be read."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for name in files:
        try:
            with open(folder / name, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if size > MAX_SAFETENSORS_HEADER:
                    return None
                header = json.loads(fh.read(size).decode("utf-8"))
            out += [(k, tuple(int(d) for d in v["shape"])) for k, v in header.items()
                    if k.startswith(prefixes) and isinstance(v, dict)]
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return None
    return tuple(sorted(out))


def local_checkpoints(run: RunSpec, spec_dir: str | Path) -> dict[str, CheckpointFacts]:
    """:func:`read_checkpoint` of every ``init_hf`` of the spec that says something."""
    return {p: c for p in init_hf_paths(run) if (c := read_checkpoint(p, spec_dir)) is not None}


def text_sources(run: RunSpec) -> list:
    """Every data source the spec names (``data.sources``, then each stage's) that the trainers read as text files
    with its ``format`` (a path, no ``builtin``, not a post-training records source, which is read as JSONL or a
    ``save_to_disk`` folder whatever its format)."""
    groups = [run.data.sources] + [st.data.sources for st in run.stages if st.data is not None]
    return [s for g in groups for s in g
            if s.path and s.format in SUFFIXES and s.kind not in RECORD_SOURCE_KINDS]


def read_source_folder(path: str, fmt: str, spec_dir: str | Path) -> SourceFolderFacts | None:
    """What the data source folder ``path`` (relative to ``spec_dir``, as prepare resolves it) holds when it holds
    files but none that format ``fmt`` reads in a folder (``llmc.sources.files_of``: its suffixes, recursively, the
    error prepare stops on); None for anything else: a folder with such files, an empty one (it may be filled before
    the launch), a ``datasets`` ``save_to_disk`` folder (prepare reads it as one, whatever the format), a file, a
    glob, a path that is not here (a spec may be planned away from its files)."""
    if glob.has_magic(path):
        return None
    p = expand_user(path)
    if not p.is_absolute():
        p = Path(spec_dir) / p
    try:
        if not p.is_dir() or is_hf_saved(p):
            return None
    except OSError:
        return None
    found = folder_mismatch(p, fmt, whole=True, shown=path)  # (a bounded look: a folder past it is not judged)
    return SourceFolderFacts("/".join(SUFFIXES[fmt]), *found) if found else None


def gather_facts(run: RunSpec, spec_dir: str | Path) -> ExternalFacts:
    """Read every tokenizer the spec references (unreadable ones are recorded with ``specials=None``), the model
    type of every local ``init_hf`` checkpoint, and each local eval task file with the files it reads
    (:func:`read_eval_task`: what the build copies into ``eval/tasks/``), and each data source folder that holds
    none of its format's files (:func:`read_source_folder`)."""
    configs = {p: cfg for p in init_hf_paths(run) if (cfg := read_checkpoint_config(p, spec_dir)) is not None}
    types = {p: mt for p, cfg in configs.items() if isinstance(mt := cfg.get("model_type"), str)}
    quantized = {p: q for p, cfg in configs.items() if (q := quantization_method(cfg)) is not None}
    local_tasks = [t for t in (run.eval.tasks if run.eval is not None else ()) if t.endswith((".yaml", ".yml"))]
    return ExternalFacts(tokenizers={p: read_tokenizer(p, spec_dir) for p in tokenizer_paths(run)},
                         checkpoint_types=types, checkpoint_quantization=quantized,
                         eval_tasks={t: read_eval_task(t, spec_dir) for t in local_tasks},
                         checkpoints=local_checkpoints(run, spec_dir),
                         source_folders={k: f for k in dict.fromkeys((s.path, s.format) for s in text_sources(run))
                                         if (f := read_source_folder(*k, spec_dir)) is not None})


__all__ = ["MAX_CONFIG_BYTES", "MAX_TOKENIZER_BYTES", "TokenizerFacts", "ExternalFacts", "EvalTaskFacts",
           "CheckpointFacts", "EvalTaskFile", "SourceFolderFacts", "read_source_folder", "text_sources", "task_file_tree", "MAX_TASK_DATA_BYTES", "hub_id", "read_checkpoint", "local_checkpoints", "tokenizer_size",
           "tokenizer_paths", "read_tokenizer", "has_chat_template", "init_hf_paths", "read_checkpoint_config",
           "read_eval_task", "task_file_name", "gather_facts"]
