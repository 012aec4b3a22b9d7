"""Entry point of built jobs: ``python -m llmc.runtime.entry``.

    python -m llmc.runtime.entry --lock plan.lock.json [--stage NAME] [--out DIR] [--steps N] [--max-seconds S]
                               [--stop-after N] [--assets DIR] [--fallback-checkpoint] [--no-resume] [--cpu-bf16]

``--steps N`` makes the stage N optimizer steps long (LR schedule and warmup fitted to N, like torchtitan's
``--training.steps``; DONE.json is written at the end). ``--stop-after N`` / ``--max-seconds S`` instead
stop a run of the planned length early, with a checkpoint and without DONE.json; rerun to continue.
    python -m llmc.runtime.entry prepare --lock plan.lock.json [--stage NAME] [--assets DIR] [--stages A,B]
    python -m llmc.runtime.entry check --lock plan.lock.json --stage NAME [--out DIR] [--export]
    python -m llmc.runtime.entry titan-start --lock plan.lock.json --stage NAME [--out DIR] [--assets DIR]
    torchrun --nnodes N --nproc_per_node 1 ... -m llmc.runtime.entry shared-check --dir DIR
    deepspeed --hostfile H --num_gpus 1 --no_local_rank --module llmc.runtime.entry shared-check --dir DIR

Runs one stage: pretrain / midtrain / long_context in :mod:`llmc.runtime.train`; sft / dpo / grpo via
``llmc.runtime.posttrain.run_stage(job, out_dir)``. Works as one process or under torchrun
(RANK / WORLD_SIZE). ``prepare`` (also done automatically before training) builds the shared assets,
idempotently: ``<assets>/assets/tokenizer.json`` (+ tokenizer_config.json) and ``assets.json`` naming the
sources where they lie (streamed by the trainers; only ``builtin`` corpora are written, to ``<assets>/data/``). Default ``--assets`` = the lock's folder;
default ``--out`` = ``<assets>/run/<stage>``. User errors print one line and exit 1.

A finished stage (its DONE.json) is done only when the lock trained it: DONE.json records the fingerprint of what
decided the stage's result (:func:`llmc.runtime.job.stage_fingerprint`), and a stage finished under another lock (a
build directory rebuilt from another spec) is refused (``error[R004]``, naming what changed), as is a stage that
starts from such a one; ``--no-resume`` sets it aside. ``prepare`` writes the lock's fingerprint of every stage to
``assets/stage-fingerprints.txt`` (the launch scripts compare it with the markers'); ``check`` says whether a stage's
folder holds a run the lock finished (exit 0), none (1), or one finished under another lock (3, the R004 line;
``--export``: a stage a torchtitan job trains, done once ``hf/`` exists). A stage's folder keeps a copy of the
tokenizer it trains with (``run/<stage>/tokenizer/``), so a run set aside keeps its tokenizer when prepare writes
another. ``titan-start`` is what a launch script does as a torchtitan stage starts (torchtitan writes no DONE.json):
its unfinished run started under another lock is refused (3, the R004 line) unless only its steps changed and the LR
at its checkpoint's step stays, as ``llmc launch`` rules; else ``run/<stage>/FINGERPRINT.json`` records this lock (0).
DONE.json also records what the stage's data sources' files held and its tokenizer copy's files
(:func:`llmc.runtime.job.fingerprint_record`): a stage whose data changed since, or whose tokenizer is not prepare's
now, is refused as one finished under another lock is. When prepare trains (or copies) a new tokenizer while finished
stages trained with the old one, it says so (R016: which stages, and ``--no-resume``); and it checks every stage's
data sources before any stage trains (files of the declared format there; the first records of a post-training
source read as its stage reads them, :mod:`llmc.runtime.records`): a bad one is one R002 line naming the stage.
``prepare --stages A,B`` (``llmc launch --stage`` / ``--from``) checks those stages' sources only (a later stage's
data need not exist yet; every text source still when prepare trains the tokenizer on it), and each stage checks its
own when it starts.

``shared-check`` (one process per node, under torchrun or the DeepSpeed launcher: :func:`shared_check`) says whether ``DIR`` is one storage
on every node: exit 0 when every node sees the file the first rank wrote there, else 1 with one line naming the
nodes that do not. The multi-node launchers run it before prepare, since every node reads prepare's output and the
stages' checkpoints from the same folder.

Exit status: 0 when the stage is done or stopped as asked (``--stop-after`` / ``--max-seconds``); 75
(:data:`llmc.runtime.preempt.EXIT_PREEMPTED`) when a SIGTERM / SIGUSR1 stopped it after saving a checkpoint
of the current step (rerun to resume from it); 1 on an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from llmc.fileio import write_atomic
from llmc.lockfile import read_lock
from llmc.runtime.data import Assets, SourceData
from llmc.runtime.job import NATIVE_KINDS, POSTTRAIN_KINDS, TrainJob
from llmc.runtime.tokenizer import TOKENIZER_FILES
from llmc.spec.schema import RECORD_SOURCE_KINDS

MAX_TOKENIZER_TRAIN_CHARS = 50_000_000  # cap on text fed to BPE training


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


#: the environment variable that lets the runtime run a lock edited after ``llmc build`` wrote it: its value must be the
#: edited lock's sha256 (``llmc launch --force`` sets it; a value left in a shell does not cover a later edit)
ACCEPT_LOCK_ENV = "LLMC_ACCEPT_LOCK_SHA256"


def lock_integrity(build_dir: str | os.PathLike) -> tuple[str, str] | None:
    """``(what differs, the lock's sha256)`` when ``build_dir/plan.lock.json`` is not the one ``llmc build`` wrote
    (its sha256 differs from the one the build manifest ``.llmc-build.json`` records, :mod:`llmc.buildfs`), or the
    manifest cannot be read; None when it is, or when there is no manifest or no recorded lock to compare with (a lock
    written by hand, an older build). Reads only the build's own two files. ``llmc launch`` refuses the first case
    (``error[L001]``, :func:`llmc.launch.check_lock_integrity`), and so does the runtime at its start
    (:func:`check_lock_unedited`), on every backend: the emitted launchers run it without ``llmc launch``."""
    from llmc.buildfs import BuildDirError, read_manifest
    from llmc.lockfile import LOCK_FILE

    b = Path(build_dir)
    p = b / LOCK_FILE
    try:
        m = read_manifest(b) if b.is_dir() else None
    except BuildDirError as e:
        return str(e), ""
    if m is None or LOCK_FILE not in m.files or not p.is_file():
        return None
    data = p.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got == m.files[LOCK_FILE]:
        return None
    return (f"{LOCK_FILE} was changed after `llmc build` wrote it (sha256 {got[:12]}, the build recorded "
            f"{m.files[LOCK_FILE][:12]}; {lock_change_summary(data)})"), got


def lock_change_summary(data: bytes) -> str:
    """What can be said about an edited lock without the original: whether it still parses and whether
    its header hash still matches its spec hash."""
    try:
        d = json.loads(data)
    except ValueError as e:
        return f"it is no longer valid JSON: {e}"
    except RecursionError:
        return "it is no longer valid JSON: nested too deeply"
    if not isinstance(d, dict):
        return "it is no longer a JSON object"
    head = (d.get("_llmc") or {}).get("spec_sha256") if isinstance(d.get("_llmc"), dict) else None
    spec = (d.get("spec") or {}).get("sha256") if isinstance(d.get("spec"), dict) else None
    if head != spec:
        return "its spec.sha256 no longer matches its header"
    return "its spec hash is unchanged, so a plan or number was edited"


def check_lock_unedited(lock_path: str | os.PathLike) -> str | None:
    """The runtime's start (``llmc.runtime.entry`` prepare / train, ``llmc.runtime.ds_train``, ``llmc.runtime.evaluate``):
    None when the lock may run, else the one ``error[L001]`` line, ``llmc launch``'s words with the runtime's way past
    it (:data:`ACCEPT_LOCK_ENV` set to the edited lock's sha256, which ``llmc launch --force`` does)."""
    lock_path = Path(lock_path)
    found = lock_integrity(lock_path.resolve().parent)
    if found is None:
        return None
    problem, got = found
    if not got or os.environ.get(ACCEPT_LOCK_ENV) == got:
        return None  # (an unreadable manifest: `llmc launch` says so, L001; the runtime has nothing to compare with)
    line = (f"{lock_path}: error[L001] {problem} (rebuild with `llmc build`, or set {ACCEPT_LOCK_ENV}={got} to run it "
            "as it is)")
    return " ".join(line.split())


def one_line_error(e: BaseException) -> str:
    """``e`` as one line: a pydantic validation error of the lock's spec (a lock edited by hand) as its first field, its
    message and the value, located in the lock (``spec.resolved.<field>``); any other error's text with its line
    breaks folded."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        errs = e.errors()
        if errs:
            first = errs[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            msg = str(first.get("msg", "")).removeprefix("Value error, ")
            more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
            got = f" (got {first['input']!r})" if "input" in first and not isinstance(first["input"], dict | list) else ""
            return " ".join(f"lock spec.resolved.{loc}: {msg}{got}{more}; hint: rebuild the build directory with "
                            "`llmc build` (llmc runs the lock it wrote)".split())
    text = str(e)
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def _drop_tokenizer_files(asset_dir: Path, keep) -> None:
    """Remove from prepare's own ``assets/`` the tokenizer files (:data:`TOKENIZER_FILES`) the tokenizer it now holds
    does not have: a chat template copied with an earlier tokenizer would otherwise ride along into every export.
    Only in ``asset_dir`` itself, never through a link (:func:`_refuse_links` checked it is none)."""
    _refuse_links(asset_dir)
    for name in TOKENIZER_FILES:
        f = asset_dir / name
        if name not in keep and (f.is_symlink() or f.is_file()):
            f.unlink()  # (a link itself, never what it names)


#: how prepare's refusal of a link ends
PREPARE_LINK_HINT = ("hint: replace the link with a directory, or give prepare the real location (--assets; the "
                     "launchers' LLMC_RUN_DIR)")


def _refuse_links(*paths: Path, entries: bool = True) -> None:
    """ValueError (one line) when one of ``paths`` (a folder prepare writes), or an entry of one (``entries``), is a
    symbolic link: prepare never deletes, copies or writes through a link."""
    for p in paths:
        found = p if p.is_symlink() else None
        if found is None and entries and p.is_dir():
            found = next((e for e in sorted(p.iterdir()) if e.is_symlink()), None)
        if found is not None:
            raise ValueError(_prepare_link_message(found))


#: how a refusal of a link in ``data/`` ends (prepare's and ``llmc launch``'s)
DATA_LINK_HINT = ("hint: make data/ a real directory and link your sources inside it (data/<name> -> your mount); "
                  "data/ itself may be a link only when prepare writes nothing there (no builtin corpus, data.quality "
                  "or eval.validation)")


def _prepare_link_message(found: Path, root: Path | None = None) -> str:
    data = root is not None and (found == root / "data" or found.is_relative_to(root / "data"))
    return (f"{found} is a symbolic link: prepare never writes through links in the folders it writes "
            f"({DATA_LINK_HINT if data else PREPARE_LINK_HINT})")


def _lock_datas(spec: dict) -> list:
    """The ``data`` sections of a lock's resolved spec: the run's and each stage's."""
    return [spec.get("data")] + [st.get("data") for st in spec.get("stages") or [] if isinstance(st, dict)]


def _resolved_spec(lock: dict) -> dict | None:
    spec = (lock.get("spec") or {}).get("resolved") if isinstance(lock, dict) and isinstance(lock.get("spec"),
                                                                                               dict) else None
    return spec if isinstance(spec, dict) else None


def lock_builtin_sources(lock: dict) -> set[str]:
    """The names of the lock's ``builtin`` sources, every stage's (prepare writes each to ``data/<name>.jsonl``)."""
    spec = _resolved_spec(lock)
    if spec is None:
        return set()
    return {str(x.get("name")) for d in _lock_datas(spec) if isinstance(d, dict) for x in d.get("sources") or []
            if isinstance(x, dict) and x.get("format") == "builtin"}


def prepare_writes_data(lock: dict) -> bool:
    """Does prepare (of any stage of ``lock``) write into ``data/``: a ``builtin`` corpus (``data/<name>.jsonl``), a
    ``quality`` section's cleaned copies (``data/quality*``) or ``eval.validation``'s record (``data/split``)
    (:func:`prepare_assets`)? Else ``data/`` holds only the user's sources, which prepare reads: it may be a link (a
    dataset mount). A lock without a resolved spec: yes (assume the most)."""
    spec = _resolved_spec(lock)
    if spec is None:
        return True
    if lock_builtin_sources(lock) or any(isinstance(d, dict) and d.get("quality") for d in _lock_datas(spec)):
        return True
    return bool((spec.get("eval") or {}).get("validation")) if isinstance(spec.get("eval"), dict) else False


def first_link(top: Path) -> Path | None:
    """``top`` when it is a symbolic link, else the first link anywhere under it (``lstat``: links never followed),
    else None."""
    if top.is_symlink():
        return top
    if not top.is_dir():
        return None
    for where, dirs, files in os.walk(top, followlinks=False):
        for name in sorted(dirs + files):
            if os.path.islink(os.path.join(where, name)):
                return Path(where) / name
    return None


def prepare_link(root: Path, lock: dict) -> Path | None:
    """The first symbolic link on a path prepare writes under ``root`` (the build directory, or ``--assets``), else
    None: ``assets/`` itself or anything in it (prepare overwrites and deletes tokenizer files there by name); and,
    only when prepare writes ``data/`` (:func:`prepare_writes_data`), ``data/`` itself and each entry it writes there
    (:func:`_prepare_output`: ``<builtin>.jsonl``, ``split``, ``quality*``) with anything in it. Not ``cache/``
    (prepare writes nothing there) nor a user's source in ``data/``. ``llmc launch`` checks the same with this
    function before it runs anything (:func:`llmc.launch.linked_write_path`); the emitted launchers run prepare
    without it, and :func:`prepare_assets` refuses what it finds."""
    found = first_link(root / "assets")
    if found is not None or not prepare_writes_data(lock):
        return found
    data = root / "data"
    if data.is_symlink():
        return data
    if data.is_dir():
        builtins = lock_builtin_sources(lock)
        for entry in sorted(data.iterdir()):
            if _prepare_output(entry, root, builtins) is not None:
                found = first_link(entry)
                if found is not None:
                    return found
    return None


def _read_tokenizer_file(path: Path) -> bytes:
    """A tokenizer file prepare copies (``data.tokenizer.path``): read only when it is a regular file of at most
    ``llmc.spec.facts.MAX_TOKENIZER_BYTES``, the cap ``llmc plan`` reads it with (``llmc.fileio.read_regular_file``:
    never a device, FIFO or socket, e.g. a link to /dev/zero); else ValueError, one line naming it."""
    from llmc.fileio import read_regular_file
    from llmc.spec.facts import MAX_TOKENIZER_BYTES

    try:
        return read_regular_file(path, MAX_TOKENIZER_BYTES)
    except ValueError as e:
        raise ValueError(f"data.tokenizer.path: {e}; prepare stops here (hint: point it at a folder holding a "
                         f"regular tokenizer.json of at most {MAX_TOKENIZER_BYTES // 2**20} MiB)") from None
    except IsADirectoryError:
        raise ValueError(f"data.tokenizer.path: {path} is a directory, not a tokenizer file; prepare stops here "
                         "(hint: point it at a tokenizer.json, or a folder holding one)") from None


def _stage_sources(job: TrainJob) -> list:
    """Every source any stage of the run reads (so one prepare serves all stages)."""
    srcs = list(job.sources)
    if job.spec is not None:
        srcs += list(job.spec.data.sources)
        for st in job.spec.stages:
            if st.data is not None:
                srcs += list(st.data.sources)
    seen, out = set(), []
    for s in srcs:
        if s.name not in seen:
            seen.add(s.name)
            out.append(s)
    return out


def _launch_order(job: TrainJob) -> list[str]:
    """The run's source names in the order the launch's prepare lists them (``prepare --lock``: the job of the lock's
    default stage, :func:`llmc.runtime.job.stage_entry`; :func:`_stage_sources` puts the job's own first), whichever
    stage's trainer prepares: the tokenizer is trained on the text sources in this order (the first
    :data:`MAX_TOKENIZER_TRAIN_CHARS`) and keyed by it, so a later stage's own prepare finds the launch's tokenizer
    current instead of training another on its own corpus first."""
    spec = job.spec
    if spec is None:
        return [s.name for s in _stage_sources(job)]
    from llmc.runtime.job import stage_entry

    try:
        default = str(stage_entry(job.lock, None)["name"]) if job.lock else None
    except (KeyError, TypeError, ValueError):
        default = None
    first = next((st for st in spec.stages if st.name == default), None)
    lead = list(first.data.sources) if first is not None and first.data is not None else list(spec.data.sources)
    every = [*lead, *spec.data.sources, *(s for st in spec.stages if st.data is not None for s in st.data.sources),
             *job.sources]
    return list(dict.fromkeys(s.name for s in every))


def _source_stages(job: TrainJob) -> dict[str, list[str]]:
    """The stages that read each source, by source name (a stage without data of its own reads the run's)."""
    out: dict[str, list[str]] = {}
    spec = job.spec
    stages = list(spec.stages) if spec is not None else []
    for st in stages or [None]:
        name = st.name if st is not None else job.stage
        data = st.data if st is not None and st.data is not None else None
        srcs = data.sources if data is not None else (spec.data.sources if spec is not None else job.sources)
        for src in srcs:
            out.setdefault(src.name, [])
            if name not in out[src.name]:
                out[src.name].append(name)
    return out


def _deferred_sources(job: TrainJob, stages) -> set[str]:
    """The data sources a prepare that serves only ``stages`` (stage names; None: every stage, nothing left out)
    leaves unchecked: those none of ``stages`` reads, of whose files nothing prepare writes depends: a record source
    (chat / preference / prompt: read by its own stage alone), or a text source when the tokenizer is copied (a trained
    one is trained on every text source of the run, whichever stage reads it) and no ``quality`` section cleans it
    (cleaned together with the other sources of its section). ``llmc launch --stage`` / ``--from`` runs its prepare
    so: a later stage's data need not exist yet; a stage's own prepare (its trainer's start) checks that stage's."""
    if stages is None:
        return set()
    wanted = set(stages)
    spec = job.spec
    datas = [spec.data, *(st.data for st in spec.stages if st.data is not None)] if spec is not None else []
    cleaned = {s.name for d in datas if d.quality is not None for s in d.sources}
    trains = not job.tokenizer.path
    readers, out = _source_stages(job), set()
    for src in _stage_sources(job):
        if wanted & set(readers.get(src.name) or [job.stage]) or src.format == "builtin":
            continue
        if src.kind in RECORD_SOURCE_KINDS or not (trains or src.name in cleaned):
            out.add(src.name)
    return out


class SourceCheckError(ValueError):
    """A stage's data source that prepare found missing or malformed before any stage trains (one line); ``stage``:
    the (first) stage that reads it, which the R002 line names."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def _checked(job: TrainJob, stages: dict[str, list[str]], src, path: Path, check, *args):
    """``check(*args)``, a check of the source ``src`` (at ``path``); its error is one line naming the stage(s) that
    read the source (:class:`SourceCheckError`)."""
    try:
        return check(*args)
    except (OSError, ValueError, KeyError) as e:
        readers = stages.get(src.name) or [job.stage]
        msg = one_line_error(e)
        for lead in (f"data source {path}: ", f"{path}: "):  # (the readers' own lines name the path already)
            msg = msg.removeprefix(lead)
        also = f"; stages {', '.join(map(repr, readers))} read it" if len(readers) > 1 else ""
        raise SourceCheckError(readers[0], f"data source {src.name!r} ({path}{also}): {msg} (checked by prepare, "
                               "before any stage trains)") from None


def _source_key(path: Path, fmt: str, text_field: str) -> str:
    """Changes when a source's files change (path, size, mtime of each), without reading them."""
    from llmc.runtime.data import expand_paths

    files = sorted(f for f in path.rglob("*") if f.is_file()) if fmt == "hf" else expand_paths(path, fmt)
    h = hashlib.sha256(f"{fmt}|{text_field}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _prepare_output(p: Path, root: Path, builtins: set[str]) -> Path | None:
    """The place prepare writes that ``p`` (resolved) is, or lies inside: ``assets/``, ``cache/``, and in
    ``data/`` the quality outputs (``quality``, ``quality-<k>``), the validation record (``split``) and the
    ``builtin`` corpora (``<name>.jsonl``); None when ``p`` is none of them."""
    import re

    from llmc.runtime.quality_prepare import QUALITY_DIR
    from llmc.runtime.validation import SPLIT_DIR

    for out in (root / "assets", root / "cache"):
        if p.is_relative_to(out):
            return out
    data = root / "data"
    if p.is_relative_to(data) and p != data:
        top = p.relative_to(data).parts[0]
        if top == SPLIT_DIR or re.fullmatch(rf"{QUALITY_DIR}(-\d+)?", top) or top in {f"{b}.jsonl" for b in builtins}:
            return data / top
    return None


def check_source_location(name: str, path: Path, root: Path, builtins: set[str] = frozenset()) -> None:
    """Refuse (ValueError, one line) a source that would read what prepare writes under ``root``: a folder that
    is ``data/`` or holds it (the lock's folder, ``.``), or a path inside ``assets/``, ``cache/`` or one of
    the folders / files prepare owns in ``data/`` (:func:`_prepare_output`); a sibling such as ``data/web/``
    is fine. Checked on the spec's paths, before anything is written, so the first prepare refuses what a
    second one would otherwise read back (the quality pipeline's ``.work`` records, ``validation.json``,
    ``tokenizer.json``, the cleaned copies). A glob is checked by its folder before the first wildcard,
    except that a one-level pattern (``data/*.jsonl``) only matches files directly in that folder, of which
    prepare writes only the ``builtin`` corpora."""
    import fnmatch
    import glob as _glob

    root = Path(os.path.realpath(root))
    data = root / "data"
    text = str(path)
    pattern = None
    if _glob.has_magic(text):
        parts = Path(text).parts
        k = next(i for i, part in enumerate(parts) if _glob.has_magic(part))
        path, rest = Path(*parts[:k]), parts[k:]  # a deeper or recursive pattern: checked as its folder
        pattern = rest[0] if len(rest) == 1 and "**" not in rest[0] else None
    p = Path(os.path.realpath(path))
    hint = (f"hint: keep the source's files in a folder of their own (such as data/{name}/) or give prepare "
            "another --assets folder")
    out = _prepare_output(p, root, builtins)
    if out is not None:
        raise ValueError(f"data source {name!r}: {path} is inside {out}, which prepare writes; {hint}")
    if pattern is not None:
        if p == data and any(fnmatch.fnmatch(f"{b}.jsonl", pattern) for b in builtins):
            raise ValueError(f"data source {name!r}: {text} matches the builtin corpus files prepare writes "
                             f"to {data}; {hint}")
        return
    if data.is_relative_to(p):
        what = "is prepare's output folder" if p == data else f"holds prepare's output folder {data}"
        raise ValueError(f"data source {name!r}: {path} {what}: prepare would read its own output back as input; "
                         f"{hint}")


def prepare_assets(job: TrainJob, out_dir: str | Path, log=_say, measure: bool = True,
                   stages: tuple[str, ...] | list[str] | None = None) -> Assets:
    """Build (or reuse) ``out_dir/assets`` (the tokenizer); returns :class:`Assets` naming every source where
    it lies, for the trainers to stream (:class:`llmc.runtime.data.StreamLoader`).

    Nothing proportional to the data is written: ``text`` / ``jsonl`` / ``parquet`` sources stay where they
    are (a ``datasets`` ``save_to_disk`` folder is read as a Hugging Face dataset, whatever its declared
    format). Only ``builtin`` corpora (``python-docs``, generated offline by :mod:`llmc.runtime.corpus`,
    a few MB) are written, to ``data/<name>.jsonl``. Chat / preference / prompt sources are passed as they
    are. Tokenizer: ``tokenizer.path`` is copied into assets/; ``tokenizer.train`` trains a byte-level BPE of
    ``vocab_size`` (default: the model's) on at most ``MAX_TOKENIZER_TRAIN_CHARS`` of the text sources, read
    in place. Every step is skipped when its inputs are unchanged (a key in ``assets/prepare.json``).
    With ``eval.validation`` the held-out documents are marked, not copied (:func:`llmc.runtime.validation.
    split_assets`). Every backend (native, DeepSpeed, the torchtitan job) streams the sources from here.
    A source that is ``data/``, holds it, or lies inside a place prepare writes is refused before anything
    is written (:func:`check_source_location`), so prepare never reads its own output back as input.
    Every stage's sources are checked before any stage trains: a text source's files of its format are there, a
    post-training source's first records read as its stage reads them (:func:`llmc.runtime.records.check_source`);
    a failure is one line naming the stage and the source (:class:`SourceCheckError`, R002). ``stages`` (names; None:
    every stage, as the emitted scripts' prepare): only those stages' sources are checked, and the sources nothing
    prepare writes depends on are left for their own stage (:func:`_deferred_sources`: named in ``assets.json``
    where they lie, unchecked, unmeasured): ``llmc launch --stage`` / ``--from`` passes the stages it runs, a
    stage's own prepare (its trainer's start) its own. A tokenizer trained or
    copied over one that finished stages trained with is said (:func:`tokenizer_renewed`, R016).
    Last, each text source's tokens (its training part) are counted or estimated and set against what the run
    draws from it (``assets/data_stats.json``; a warning line where a source is read more than the plan's epoch
    limit or its declared ``tokens`` is far off, R011, or where a stage that trains past its model's context reads
    documents much shorter than its seq_len, R012: :mod:`llmc.runtime.data_stats`); ``measure=False`` skips that (a
    stage's own prepare: the launch's prepare step, which runs first, measured and said it once).
    """
    from llmc.runtime import corpus
    from llmc.runtime.data import is_hf_saved_dataset
    from llmc.runtime.stream import SourceRef, documents
    from llmc.runtime.tokenizer import train_bpe

    root = Path(out_dir).resolve()
    data_dir, asset_dir, cache_dir = root / "data", root / "assets", root / "cache"
    builtins = {s.name for s in _stage_sources(job) if s.format == "builtin"}
    for src in _stage_sources(job):  # never read prepare's own output as input
        if src.format != "builtin" and src.path is not None:
            check_source_location(src.name, job.resolve_path(src.path), root, builtins)
    # never through a link: assets/ and, when prepare writes there, data/ and the entries it writes (prepare_link)
    linked = prepare_link(root, job.lock or {})
    if linked is not None:
        raise ValueError(_prepare_link_message(linked, root))
    asset_dir.mkdir(parents=True, exist_ok=True)
    state_file = asset_dir / "prepare.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    produced: list[SourceData] = []
    text_keys: dict[str, str] = {}  # text source name -> key of its content
    readers = _source_stages(job)
    deferred = _deferred_sources(job, stages)
    for src in _stage_sources(job):
        if src.format == "builtin" and src.kind in RECORD_SOURCE_KINDS:
            continue  # post-training records: generated at stage time by llmc.runtime.synthetic
        if src.name in deferred:  # (a stage this prepare does not serve: its own start checks it)
            if src.path is not None:
                path = job.resolve_path(src.path)
                fmt = "hf" if src.kind not in RECORD_SOURCE_KINDS and is_hf_saved_dataset(path) else src.format
                produced.append(SourceData(src.name, str(path), fmt, src.text_field, src.weight))
            continue
        if src.format == "builtin":
            target = data_dir / f"{src.name}.jsonl"
            key = f"builtin:{src.name}:{corpus.fingerprint()}"
            if state.get(target.name) != key or not target.exists():
                if src.name not in corpus.BUILTIN_CORPORA:
                    raise ValueError(f"data source {src.name!r}: unknown builtin corpus "
                                     f"(known: {', '.join(corpus.BUILTIN_CORPORA)})")
                data_dir.mkdir(parents=True, exist_ok=True)
                info = corpus.write_corpus(target, src.name)
                how = f" (a copy of {info['cached']})" if info["cached"] else ""
                log(f"prepare: wrote {info['docs']} documents ({info['chars']:,} chars) to {target}{how}")
                state[target.name] = key
            produced.append(SourceData(src.name, str(target), "jsonl", "text", src.weight))
            text_keys[src.name] = key
            continue
        if src.path is None:  # (whichever backend trains it: every trainer streams the files prepare names)
            raise ValueError(f"data source {src.name!r} has no path (planning-only source): training needs local "
                             "data; hint: give it a path (a file, folder or glob of jsonl / parquet / text files) "
                             "with its format")
        path = job.resolve_path(src.path)
        if src.kind in RECORD_SOURCE_KINDS:  # structured records: read by the post-training code
            # checked now, for every stage, with the stage's own reader (files there, the first records as it reads
            # them): a missing file or a malformed record stops prepare, not the launch after earlier stages trained
            from llmc.runtime.records import check_source

            _checked(job, readers, src, path, check_source, src.name, path, src.format, src.kind, src.text_field)
            produced.append(SourceData(src.name, str(path), src.format, src.text_field, src.weight))
            continue
        fmt = "hf" if is_hf_saved_dataset(path) else src.format
        # its files exist (their records: _measure_data, with the trainers' own error)
        key = text_keys[src.name] = _checked(job, readers, src, path, _source_key, path, fmt, src.text_field)
        produced.append(SourceData(src.name, str(path), fmt, src.text_field, src.weight))

    from llmc.runtime.quality_prepare import apply_quality  # data.quality: dedup + decontamination

    produced, quality_key = apply_quality(job, produced, root, log)
    from llmc.runtime.job import tokenizer_files

    tk = job.tokenizer
    tok_json = asset_dir / "tokenizer.json"
    before = tokenizer_files(asset_dir)  # (what the stages finished so far trained with)
    renewed = None  # why prepare wrote another tokenizer over the one it held
    if tk.path:
        src_dir = job.resolve_path(tk.path)
        src_dir = src_dir if src_dir.is_dir() else src_dir.parent
        (src_dir / "tokenizer.json").stat()  # (FileNotFoundError, as before: the folder holds no tokenizer)
        present = [n for n in TOKENIZER_FILES if (src_dir / n).exists()]
        digest = hashlib.sha256()
        files = {name: _read_tokenizer_file(src_dir / name) for name in present}  # (regular, capped: read once)
        for name in present:  # (a changed config or template is copied again too)
            digest.update(name.encode() + b"\0" + files[name])
        key = "copy:" + digest.hexdigest()
        if state.get("tokenizer") != key or not tok_json.exists():
            for name in present:  # the bytes read above (never a second open of the user's file)
                write_atomic(asset_dir / name, files[name])
            _drop_tokenizer_files(asset_dir, keep=present)
            state["tokenizer"] = key
            renewed = f"the tokenizer files in {src_dir} (data.tokenizer.path) changed"
            log(f"prepare: copied tokenizer from {src_dir}")
    else:
        vocab = tk.vocab_size or job.arch.vocab_size
        order = _launch_order(job)  # (not this job's own order: the launch's prepare trained it so)
        text_srcs = sorted((s for s in produced if s.name in text_keys),
                           key=lambda s: order.index(s.name) if s.name in order else len(order))
        key = (f"bpe:{vocab}:{MAX_TOKENIZER_TRAIN_CHARS}:{quality_key}:"
               + ",".join(f"{s.name}={text_keys[s.name]}" for s in text_srcs))
        was_keys, now_keys = state.get("tokenizer_sources") or {}, {s.name: text_keys[s.name] for s in text_srcs}
        changed = sorted(n for n in {*was_keys, *now_keys} if was_keys.get(n) != now_keys.get(n))
        renewed = (f"its training text changed: data source {', '.join(map(repr, changed))}" if was_keys and changed
                   else "its training text or settings changed")
        state["tokenizer_sources"] = now_keys
        if state.get("tokenizer") == key and tok_json.exists():
            renewed = None
        else:
            if not text_srcs:
                raise ValueError("tokenizer.train needs at least one text data source")

            def texts():  # the first MAX_TOKENIZER_TRAIN_CHARS characters, sources in order, read in place
                budget = MAX_TOKENIZER_TRAIN_CHARS
                for s in text_srcs:
                    for d in documents(SourceRef(s.name, s.path, s.format, s.text_field)):
                        if budget <= 0:
                            return
                        budget -= len(d)
                        yield d

            train_bpe(texts(), vocab, asset_dir)
            _drop_tokenizer_files(asset_dir, keep=("tokenizer.json", "tokenizer_config.json"))
            state["tokenizer"] = key
            log(f"prepare: trained byte-level BPE (vocab {vocab}) -> {tok_json}")
    _atomic_write(state_file, json.dumps(state, indent=1, sort_keys=True) + "\n")
    if renewed and before is not None:
        tokenizer_renewed(job.lock, root, before, renewed)
    assets = Assets(str(root), str(asset_dir), tuple(produced), str(cache_dir))
    ev = job.spec.eval if job.spec is not None else None
    if ev is not None and ev.validation is not None:  # hold out the validation documents (validation.py)
        from llmc.runtime.validation import split_assets

        skip = tuple(s.name for s in _stage_sources(job) if s.kind in RECORD_SOURCE_KINDS)
        assets = split_assets(assets, ev.validation, resolve=job.resolve_path, skip=skip, log=log)
    _atomic_write(asset_dir / "assets.json", json.dumps(assets.to_json(), indent=1) + "\n")
    write_fingerprints(job.lock, asset_dir)
    if measure:
        _measure_data(job, assets, {n: f"{k}|{quality_key}|{state.get('tokenizer')}" for n, k in text_keys.items()},
                      state, log)
        _atomic_write(state_file, json.dumps(state, indent=1, sort_keys=True) + "\n")
    return assets


def tokenizer_renewed(lock: dict | None, root: Path, before: dict, why: str) -> list[str]:
    """After prepare wrote another tokenizer over ``before`` (:func:`llmc.runtime.job.tokenizer_files` of the one it
    held): the stages of ``lock`` finished in ``root/run`` with another than the new one (their copy,
    ``run/<stage>/tokenizer``; a run that kept none trained with ``before``). Their weights were trained on the old
    token ids, which the new tokenizer gives to other strings: a launch refuses them (their record's tokenizer, or
    their data, differs: ``llmc.runtime.job.finished_stage``), never starts a stage from them. One warning line (R016)
    names them, why prepare retrained it and the way to train them again. Returns their names."""
    from llmc.runtime.job import STAGE_TOKENIZER, tokenizer_files

    asset_dir = root / "assets"
    now = tokenizer_files(asset_dir)
    if now is None or now == before:  # (trained again on the same text: the same tokenizer, byte for byte)
        return []
    stale = []
    for e in (lock or {}).get("stages") or []:
        name = e.get("name") if isinstance(e, dict) else None
        d = root / "run" / str(name)
        if not name or not ((d / "DONE.json").is_file() or (d / "hf" / "config.json").is_file()):
            continue
        if (tokenizer_files(d / STAGE_TOKENIZER) or before) != now:
            stale.append(str(name))
    if stale:
        # root is the build directory (its lock and manifest beside assets/) under `llmc launch` and the scripts'
        # default; a launch script's LLMC_RUN_DIR elsewhere holds no build, and `llmc launch` trains only in the
        # build's own run/: the way out there is to set the stages aside in it and run the script again
        import shlex

        from llmc.runtime.job import set_aside_shell

        if (root / "plan.lock.json").is_file() and (root / ".llmc-build.json").is_file():
            way = (f"`{shlex.join(['llmc', 'launch', str(root), '--no-resume'])}` sets them aside (each with its "
                   "tokenizer) and trains them again with this one")
        else:
            move = set_aside_shell(root / "run", stale)
            way = ((f"`{move}` sets them aside" if move else f"set {root / 'run'}/<stage> aside for each of them")
                   + " (each with its tokenizer), then the launch script run again (same LLMC_RUN_DIR) trains them "
                   f"again with this one (`llmc launch` trains in the build's own run/, not in {root / 'run'})")
        print(f"{asset_dir / 'tokenizer.json'}: warning[R016] prepare trained a new tokenizer ({why}), and stage(s) "
              f"{', '.join(map(repr, stale))} finished with the previous one (kept in run/<stage>/{STAGE_TOKENIZER}): "
              "their weights were trained on its token ids, so a launch refuses them (L005 / R004) instead of "
              f"skipping them or starting a stage from them; hint: {way}", file=sys.stderr, flush=True)
    return stale


def _measure_data(job: TrainJob, assets: Assets, keys: dict[str, str], state: dict, log) -> None:
    """``assets/data_stats.json``: the tokens each text source holds (its training part) and the epochs the run
    reads it (:func:`llmc.runtime.data_stats.data_stats`, reused while ``keys``, prepare's keys of each source's
    files, the quality pass and the tokenizer, are unchanged), with the documents' lengths set against every stage
    that trains past its model's context (R012). Warning lines at most, never a failed prepare, but for a source
    whose records lack its ``text_field``: the error every trainer would stop on, raised here."""
    from llmc.runtime.data_stats import STATS_FILE, data_stats
    from llmc.runtime.stream import SourceFieldError

    try:
        data_stats(job, assets, keys, state, log)
    except SourceFieldError:  # a source without its text_field: the trainers' own error, now (R002 in main)
        raise
    except Exception as e:  # noqa: BLE001 (a measurement only informs: it never stops a launch)
        print(f"{Path(assets.tokenizer_dir) / STATS_FILE}: warning[R011] could not measure the data sources: "
              f"{type(e).__name__}: {e} (hint: training reads them as before)", file=sys.stderr, flush=True)


def write_fingerprints(lock: dict | None, asset_dir: Path) -> None:
    """``asset_dir/stage-fingerprints.txt``: ``<stage> <sha256>`` for every stage of ``lock``, the fingerprint a
    finished stage's marker must record to count as this lock's (the launch scripts' ``stage_done`` compares them)."""
    from llmc.runtime.job import FINGERPRINTS_TXT, stage_fingerprint

    if not lock:
        return
    lines = []
    for e in lock.get("stages") or []:
        fp = stage_fingerprint(lock, e.get("name")) if isinstance(e, dict) and e.get("name") else None
        if fp is not None:
            lines.append(f"{e['name']} {fp['sha256']}\n")
    _atomic_write(asset_dir / FINGERPRINTS_TXT, "".join(lines))


def check_outputs(job: TrainJob, root: Path, out: Path | None) -> None:
    """Refuse (ValueError) every output path built from a spec string that would leave its folder: data
    files ``<root>/data/<source>.jsonl``, the stage folder ``<root>/run/<stage>`` and the checkpoint folder
    inside the stage's output (``llmc.buildfs.check_inside``: no absolute path, no ``..``, no symlink out)."""
    from llmc.buildfs import UnsafePathError, check_inside

    try:
        for src in _stage_sources(job):
            check_inside(root / "data", f"{src.name}.jsonl")
        check_inside(root / "run", job.stage)
        if job.init_from:
            check_inside(root / "run", job.init_from)
        check_inside(out or root / "run" / job.stage, job.checkpoint_folder)
    except UnsafePathError as e:
        raise ValueError(f"unsafe output path: {e}") from None


class _stage_lock:
    """Rank 0 holds ``llmc.runtime.runlock.RunLock(out)`` while the stage runs: one trainer per stage
    folder, whichever launcher started it (``llmc launch``, the emitted scripts, by hand)."""

    def __init__(self, out: Path):
        self.out, self.lock = out, None

    def __enter__(self):
        if int(os.environ.get("RANK", "0")) == 0:
            from llmc.runtime.runlock import RunLock, RunLockBusy

            try:
                self.lock = RunLock(self.out).acquire()
            except RunLockBusy as e:
                raise ValueError(str(e)) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


def _stage_assets(job: TrainJob, assets: Assets) -> Assets:
    """Restrict the prepared sources to this stage's."""
    names = {s.name for s in job.sources}
    return Assets(assets.root, assets.tokenizer_dir, tuple(s for s in assets.sources if s.name in names),
                  assets.cache_dir)


def _prepare_collective(job: TrainJob, root: Path) -> Assets:
    """Rank 0 prepares; the other ranks wait for it (file-based, before/without a process group)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or rank == 0:
        # (the launch's prepare step measured the data and checked the stages it runs; the stage checks its own)
        return prepare_assets(job, root, measure=False, stages=(job.stage,))
    import torch.distributed as dist

    from llmc.runtime.distributed import init_distributed

    init_distributed()
    dist.barrier()  # rank 0 joins this barrier after preparing (see main)
    return Assets.from_json(json.loads((root / "assets" / "assets.json").read_text()))


def run_stage(lock: dict, stage: str | None, out: Path | None, assets_root: Path, *, steps: int | None = None,
              max_seconds: float | None = None, stop_after: int | None = None, resume: bool = True,
              fallback: bool = False, cpu_bf16: bool = False, lock_dir: Path | None = None) -> dict:
    """Prepare assets, build the job and run it; the Python twin of the command line.

    steps: override the stage length (schedule follows; warmup capped at 10% of it).
    stop_after / max_seconds: stop a planned-length run early (checkpoint, no DONE.json)."""
    from llmc.runtime.distributed import init_distributed, shutdown

    job = TrainJob.from_lock(lock, stage, build_dir=lock_dir)
    job.check_runner("native")
    if steps:
        job = job.replace(steps=steps, warmup_steps=min(job.warmup_steps, steps // 10),
                          checkpoint_interval=min(job.checkpoint_interval, steps))
    check_outputs(job, assets_root, out)
    out = out or assets_root / "run" / job.stage
    done = out / "DONE.json"
    if not resume:  # start over: the earlier run is set aside (renamed), never deleted or pruned into
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if any(out.glob("*")):
                raise ValueError(f"{out}: --no-resume with several ranks: set the stage aside before they start "
                                 "(`llmc launch BUILD --no-resume` does)")
        else:
            from llmc.runtime.job import set_stage_aside

            moved = set_stage_aside(out, assets_root / "assets")
            if moved is not None:
                _say(f"{job.stage}: the earlier run is set aside in {moved}")
    # rank 0 decides whether the stage, or the one it starts from, is this lock's (their data digests read once per
    # process group, not on every rank); the other ranks follow it: they wait for it in _prepare_collective, which a
    # refusal never reaches (it exits 1, and torchrun stops them)
    decides = int(os.environ.get("RANK", "0")) == 0
    if resume and done.exists():
        res = job.finished_result(done)
        if decides:
            check_finished(lock, job.stage, out, lock_dir or assets_root, asset_dir=assets_root / "assets")
        _say(f"{job.stage}: already done ({done}); nothing to do")
        return res
    if job.init_from and decides:  # a stage that starts from one finished under another lock would carry it on
        check_finished(lock, job.init_from, out.parent / job.init_from, lock_dir or assets_root, export=True,
                       starts=job.stage, asset_dir=assets_root / "assets")
    with _stage_lock(out):
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        assets = _prepare_collective(job, assets_root)
        if rank == 0:
            stage_tokenizer(out, Path(assets.tokenizer_dir), job.checkpoint_folder)
        info = init_distributed()
        if world > 1 and rank == 0:
            import torch.distributed as dist

            dist.barrier()  # release the ranks waiting in _prepare_collective
        assets = _stage_assets(job, assets)
        init_ckpt = None
        if job.init_from:  # its llmc checkpoint, else its hf/ export (a torchtitan stage)
            from llmc.runtime.hf_io import HFError, init_from_source

            init_ckpt = out.parent / job.init_from
            try:
                init_from_source(init_ckpt)
            except HFError as e:
                raise ValueError(f"stage {job.stage!r} starts from stage {job.init_from!r}, which has not "
                                 f"finished: {e}") from None
        finished = False
        try:
            if job.kind in NATIVE_KINDS:
                from llmc.runtime.train import train

                res = train(job, out, assets, max_steps=stop_after, max_seconds=max_seconds, resume=resume,
                            fallback_checkpoint=fallback, init_checkpoint=init_ckpt, cpu_bf16=cpu_bf16, info=info)
            elif job.kind in POSTTRAIN_KINDS:  # every rank: FSDP2 over the ranks (llmc.runtime.posttrain)
                from llmc.runtime import posttrain

                res = posttrain.run_stage(job, out, assets=assets, info=info, stop_after=stop_after,
                                          max_seconds=max_seconds, resume=resume, fallback=fallback,
                                          cpu_bf16=cpu_bf16)
            else:
                raise ValueError(f"stage kind {job.kind!r} is not runnable by the native trainer")
            finished = True
            return res
        finally:
            shutdown(together=finished)  # a failing rank leaves at once (torchrun then stops the others)


def check_finished(lock: dict, stage: str, stage_dir: Path, build: Path, *, export: bool = False,
                   starts: str | None = None, asset_dir: Path | None = None, options=None) -> bool:
    """Whether ``stage_dir`` holds a finished run of ``stage`` (:func:`llmc.runtime.job.finished_stage`); raises
    :class:`llmc.runtime.job.StaleStageError` when it finished under another lock, or from other data or another
    tokenizer than prepare's in ``asset_dir`` (default ``build/assets``) now (``starts``: the stage that would start
    from it), and warns (R005) when its marker records no fingerprint (an older llmc wrote it)."""
    from llmc.runtime.job import StaleStageError, finished_stage, legacy_message, stale_message

    f = finished_stage(lock, stage, stage_dir, export=export, build_dir=build, asset_dir=asset_dir)
    if f is None:
        return False
    if f.change is not None:
        msg = stale_message(stage, f, str(build), options, lock, asset_dir.parent if asset_dir is not None else None)
        raise StaleStageError(f"stage {starts!r} starts from {msg}" if starts else msg)
    if f.legacy and int(os.environ.get("RANK", "0")) == 0:
        print(f"{stage_dir}: warning[R005] {legacy_message(stage, f)}", file=sys.stderr, flush=True)
    return True


def stage_tokenizer(out: Path, asset_dir: Path, checkpoint_folder: str) -> None:
    """Keep in ``out/tokenizer`` the tokenizer the stage trains with: the rule of every runner
    (:func:`llmc.runtime.job.renew_stage_tokenizer`), with the checkpoint the native trainers would resume from
    (:func:`llmc.runtime.job.resume_checkpoint` of ``out/<checkpoint_folder>``)."""
    from llmc.runtime.job import renew_stage_tokenizer, resume_checkpoint

    renew_stage_tokenizer(asset_dir, out, resume_checkpoint(out / checkpoint_folder))


def _check_main(lock: dict, stage: str | None, out: Path | None, root: Path, export: bool, where: Path,
                backend: str | None = None) -> int:
    """``check``: 0 when the stage's folder holds a run this lock finished (or one an older llmc finished: warned),
    1 when it holds none, 3 when ``llmc launch`` would refuse it (the R004 line): the check it applies
    (:func:`llmc.runtime.job.stage_staleness`: the lock, the data, the tokenizer in ``root/assets`` and the
    ``init_hf`` weights it finished with, and the stages it starts from), so that the launch scripts, which run it,
    skip no stage ``llmc launch`` refuses. ``backend``: the script's, which the command its R004 line prints carries;
    a run directory other than the build's ``run/`` gets the script's way out instead (:func:`llmc.runtime.job.rerun_way`)."""
    from llmc.runtime.job import LaunchOptions, legacy_message, stage_entry, stage_staleness

    name = str(stage_entry(lock, stage)["name"])
    d = out or root / "run" / name
    build = where.resolve().parent
    run = d.parent
    # (llmc launch trains in the build's own run/ with the build's own assets/: a script's other run or assets
    # directory gets the script's way out)
    other = run.resolve() != (build / "run").resolve() or root.resolve() != build or d.name != name
    options = LaunchOptions(backend=backend, run_dir=str(run.resolve()) if other else None)
    if d.name != name:  # (a stage folder of another name: its own record only, no init_from chain to follow)
        from llmc.runtime.job import StaleStageError

        try:
            return 0 if check_finished(lock, name, d, build, export=export, asset_dir=root / "assets",
                                       options=options) else 1
        except StaleStageError as e:
            print(f"{where}: error[R004] {name}: {e}", file=sys.stderr)
            return 3
    fin, stale = stage_staleness(lock, name, run, build, export=export, options=options, asset_dir=root / "assets")
    if stale is not None:
        print(f"{where}: error[R004] {name}: {stale}", file=sys.stderr)
        return 3
    if fin is None:
        return 1
    if fin.legacy and int(os.environ.get("RANK", "0")) == 0:
        print(f"{d}: warning[R005] {legacy_message(name, fin)}", file=sys.stderr, flush=True)
    return 0


def _titan_start_main(lock: dict, stage: str | None, out: Path | None, root: Path, where: Path,
                      backend: str | None = None) -> int:
    """``titan-start``: what a launch script does as a torchtitan stage starts, the check ``llmc launch`` applies
    (:func:`llmc.runtime.job.titan_lock_change`): its unfinished run started under another lock, whose checkpoints
    the job would resume, is refused (the R004 line, exit 3) unless only its ``steps`` changed and the LR at its
    checkpoint's step stays (a WSD run made longer before its decay: it resumes), and so is a checkpoint saved by
    another data-parallel size (:func:`llmc.runtime.job.titan_world_change`); else the stage folder's
    ``FINGERPRINT.json`` records this lock (exit 0). ``backend``: the script's, which the command its R004 line
    prints carries; a run directory other than the build's ``run/`` gets the script's way out."""
    from llmc.runtime.capabilities import titan_dump_subdir, titan_own_job
    from llmc.runtime.job import (
        LaunchOptions,
        fingerprint_record,
        resume_checkpoint,
        stage_entry,
        titan_lock_change,
        titan_lock_message,
        titan_world_change,
        write_titan_record,
    )

    entry = stage_entry(lock, stage)
    name = str(entry["name"])
    d = out or root / "run" / name
    build = where.resolve().parent
    other = d.parent.resolve() != (build / "run").resolve() or root.resolve() != build
    options = LaunchOptions(backend=backend, run_dir=str(d.parent.resolve()) if other else None)
    dump = root / "outputs" / titan_dump_subdir(name if titan_own_job(entry.get("kind"), entry.get("layout")) else None)
    now = fingerprint_record(lock, name, build)
    change = titan_lock_change(lock, name, build, d, dump, now)
    if change is not None:
        print(f"{d}: error[R004] {titan_lock_message(name, change, dump, build, options, lock, root)}", file=sys.stderr)
        return 3
    saved = resume_checkpoint(dump)
    why = titan_world_change(build, lock, entry, saved, options, root) if saved is not None else None
    if why is not None:
        print(f"{d}: error[R004] {why}", file=sys.stderr)
        return 3
    if now:
        write_titan_record(d, name, now)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "shared-check":
        return shared_check_main(argv[1:])
    cmd = "train"
    if argv and argv[0] in ("prepare", "train", "check", "titan-start"):
        cmd = argv.pop(0)
    ap = argparse.ArgumentParser(prog="python -m llmc.runtime.entry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", required=True, type=Path, help="plan.lock.json written by `llmc build`")
    ap.add_argument("--stage", default=None, help="stage name (default: the main pre-training)")
    ap.add_argument("--out", type=Path, default=None, help="stage output dir (default <assets>/run/<stage>)")
    ap.add_argument("--assets", type=Path, default=None, help="where assets/, data/, cache/ go (default: lock's dir)")
    ap.add_argument("--steps", type=int, default=None, help="run the stage for N optimizer steps (schedule fitted)")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after N steps of the planned run (checkpoint, no DONE.json; rerun to continue)")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop (with a checkpoint) after S seconds")
    ap.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    ap.add_argument("--fallback-checkpoint", action="store_true",
                    help="if the newest checkpoint is corrupt, resume from the newest complete one")
    ap.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on CPU too (default fp32 on CPU)")
    ap.add_argument("--stages", default=None, metavar="NAME[,NAME...]",
                    help="prepare: check the data sources of these stages only (default: every stage's)")
    ap.add_argument("--export", action="store_true",
                    help="check: the stage is a torchtitan job's, finished once its hf/ export exists")
    ap.add_argument("--backend", default=None,
                    help="check: the launch script's backend, which the command its refusal prints carries")
    a = ap.parse_args(argv)
    from llmc.runtime.errors import (  # (prepare, check: no torch)
        CheckpointError,
        NonFiniteStep,
        TrainingError,
    )
    from llmc.runtime.job import StaleStageError

    if cmd not in ("check", "titan-start"):  # a lock edited after `llmc build` wrote it runs nowhere unasked (check only reads markers)
        edited = check_lock_unedited(a.lock)
        if edited:
            print(edited, file=sys.stderr)
            return 1
    try:
        lock = read_lock(a.lock)
    except ValueError as e:
        print(f"{a.lock}: error[R001] lock: {one_line_error(e)}", file=sys.stderr)
        return 1
    lock_dir = a.lock.resolve().parent
    root = (a.assets or lock_dir).resolve()
    try:
        if cmd == "check":
            return _check_main(lock, a.stage, a.out, root, a.export, a.lock, a.backend)
        if cmd == "titan-start":
            return _titan_start_main(lock, a.stage, a.out, root, a.lock, a.backend)
        if cmd == "prepare":
            check_outputs(TrainJob.from_lock(lock, a.stage, build_dir=lock_dir), root, None)
            serves = None
            if a.stages is not None:  # (the stages a launch runs: only their data sources are checked)
                from llmc.runtime.job import stage_entry

                serves = tuple(str(stage_entry(lock, n)["name"]) for n in a.stages.split(",") if n)
            assets = prepare_assets(TrainJob.from_lock(lock, a.stage, build_dir=lock_dir), root, stages=serves)
            # what it prepared is assets/assets.json (the trainers read it there; nothing reads prepare's stdout)
            _say(f"prepare: {len(assets.sources)} data source(s) and the tokenizer ready "
                 f"({Path(assets.tokenizer_dir) / 'assets.json'})")
            return 0
        res = run_stage(lock, a.stage, a.out, root, steps=a.steps, max_seconds=a.max_seconds, stop_after=a.stop_after,
                        resume=not a.no_resume, fallback=a.fallback_checkpoint, cpu_bf16=a.cpu_bf16,
                        lock_dir=lock_dir)
    except StaleStageError as e:
        print(f"{a.lock}: error[R004] {a.stage or 'pretrain'}: {e}", file=sys.stderr)
        return 1
    except NonFiniteStep as e:  # every rank stops together (a collective verdict); rank 0 says why
        if os.environ.get("RANK", "0") == "0":
            print(f"{a.lock}: error[R014] {a.stage or 'pretrain'}: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, TrainingError, ValueError, FileNotFoundError, KeyError) as e:
        label = e.stage if isinstance(e, SourceCheckError) else a.stage or "pretrain"  # (prepare: the source's stage)
        print(f"{a.lock}: error[R002] {label}: {one_line_error(e)}", file=sys.stderr)
        return 1
    return exit_code(res.get("status", "done"))


SHARED_CHECK_FILE = ".llmc-shared-check"  # + "." + the token: a name no node has looked up before


def shared_check(directory: Path) -> str | None:
    """Whether ``directory`` is one storage on every node of the torchrun job this process is a rank of (one rank
    per node): None when it is, else the one-line error. Rank 0 writes a fresh random token to a file of its own
    name in ``directory`` (a temporary file renamed into place, so a reader sees all of it or nothing), passes the
    name on (``broadcast_object_list``, after the rename: it orders the write before every read), every rank reads
    the file, and the ranks' host names and results are gathered (``all_gather_object``) so every rank reaches the
    same verdict; rank 0 then removes the file. The name is new to every node: NFS clients cache a lookup that
    found nothing, not one never made (nfs(5), "lookupcache"). gloo on CPU: it runs before the trainers, GPU or
    none."""
    import secrets
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    host = socket.gethostname()
    what = f"LLMC_RUN_DIR={directory}"
    # gloo connects the nodes over the address their host name resolves to (GLOO_SOCKET_IFNAME picks an interface);
    # the nodes have all joined torchrun's rendezvous by now, so a short timeout bounds a connection that cannot be
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("LLMC_SHARED_CHECK_S", "120"))))
    try:
        sent: list = [None, None]  # [file name, token], or [None, rank 0's error]
        if rank == 0:
            token = secrets.token_hex(16)
            name = f"{SHARED_CHECK_FILE}.{token}"
            tmp = directory / f"{name}.tmp"
            try:
                tmp.write_text(token)
                os.replace(tmp, directory / name)
                sent = [name, token]
            except OSError as e:
                tmp.unlink(missing_ok=True)
                sent = [None, f"error: {what}: cannot write {tmp} ({e.strerror or e}); give LLMC_RUN_DIR a folder "
                              "every node can write"]
        dist.broadcast_object_list(sent, src=0)
        name, token = sent
        if name is None:
            return token
        try:
            seen = (directory / name).read_text() == token
        except OSError:
            seen = False
        views: list = [None] * dist.get_world_size()
        dist.all_gather_object(views, (host, seen))  # (returns once every rank has read the file)
        if rank == 0:
            (directory / name).unlink(missing_ok=True)
        hosts = [h for h, _ in views]
        label = [h if hosts.count(h) == 1 else f"{h} (node {i})" for i, h in enumerate(hosts)]
        blind = [label[i] for i, (_, ok) in enumerate(views) if not ok]
        if not blind:
            return None
        return (f"error: {what} is not shared by the nodes: {', '.join(blind)} "
                f"{'does' if len(blind) == 1 else 'do'} not see the file {label[0]} wrote; put it on storage every "
                "node mounts (NFS, Lustre, a ReadWriteMany volume)")
    finally:
        dist.destroy_process_group()


def shared_check_main(argv: list[str]) -> int:
    """``shared-check --dir DIR``: :func:`shared_check`, its verdict as the exit status (0 shared, 1 not) and one
    line on stderr; never a traceback (a node lost during the check is that line too)."""
    ap = argparse.ArgumentParser(prog="python -m llmc.runtime.entry shared-check",
                                 description="Check that DIR is one storage on every node (run under torchrun, "
                                             "one process per node).")
    ap.add_argument("--dir", required=True, type=Path, help="the folder every node must share (LLMC_RUN_DIR)")
    a = ap.parse_args(argv)
    d = a.dir.absolute()  # a folder missing on a node is a node that does not see the file (every rank takes part)
    try:
        err = shared_check(d)
    except Exception as e:  # noqa: BLE001 (a peer lost mid-check, a store gone: one line, never a traceback)
        why = (str(e).strip().splitlines() or [""])[-1][:300]
        err = (f"error: LLMC_RUN_DIR={d}: the check that every node shares it did not complete "
               f"({type(e).__name__}: {why}); check that every node started and can reach MASTER_ADDR, and that "
               "each host name resolves to an address the other nodes reach (not 127.0.1.1, as /etc/hosts has it on "
               "some distributions), else set GLOO_SOCKET_IFNAME to the nodes' network interface")
    if err:
        print(err, file=sys.stderr, flush=True)
        return 1
    return 0


def exit_code(status: str) -> int:
    """The process exit status for a stage result's status: 0 done / stopped, :data:`llmc.runtime.preempt.
    EXIT_PREEMPTED` preempted (saved, resume me: a launcher requeues), 1 anything else."""
    from llmc.runtime.preempt import EXIT_PREEMPTED

    if status == "preempted":
        return EXIT_PREEMPTED
    return 0 if status in ("done", "stopped") else 1


if __name__ == "__main__":
    from llmc.runtime.runlock import report_exit

    _code = main()
    # the launcher's evidence (llmc.runtime.runlock.supervise_stage): a stage is preempted, exit 75, only when every
    # rank reports it saved its step; torchrun's own status after a SIGTERM is 1 either way
    report_exit(_code)
    sys.exit(_code)
