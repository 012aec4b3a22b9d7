"""Reading and resuming ``metrics.jsonl`` (one JSON object per line). Never imports torch.

A run resumed from the checkpoint at step S re-logs steps S+1, S+2, ... that the killed run had
already written. Two ways to keep each step once:

``truncate_after_step(path, step) -> int``
    Before resuming from ``step``: atomically rewrite ``path`` (temp file in the same directory, fsync,
    ``os.replace``, fsync of the directory) keeping the records whose ``"step"`` is ``<= step`` and
    the records without a ``"step"`` (events such as ``{"event": "start"}``); records with a step
    after the checkpoint (training steps and step-tagged events alike) are dropped, and so is a
    half-written last line. Returns the number of records dropped. A missing file is left missing.

``read_metrics(path, keys=None) -> MetricsLog``
    ``steps``: the training records (those with a ``"step"`` and no ``"event"`` key), one per step,
    the last one written winning, in step order (only ``keys`` of them where given), with the line of each one's last
    record (``step_lines``). ``events``: the records with an ``"event"`` key, in file order, with their line
    numbers. A half-written last line (a writer killed mid-line) is ignored;
    any other bad line raises :class:`MetricsError` (a ``ValueError``) naming its line number.

``iter_records(path, data=None)``
    Each complete line as (line number, record), streamed (one line in memory at a time; ``data``: the file's bytes
    already read): the one parser of the file, read by the two above and by ``llmc calibrate``
    (:func:`llmc.measurements.read_llmc_run`). Only :func:`truncate_after_step`, which rewrites the lines it keeps
    byte for byte, reads a line's text beside its record (:func:`_scan`).

``since_relaunch(events, spec_sha256) -> Relaunch | None``
    Which records were trained under a lock's spec: those after the first ``start`` event that follows the last
    ``start`` naming another ``spec_sha256`` (the trainers' start events record the lock's ``spec.sha256``, the spec
    the steps from there train under, :func:`llmc.runtime.observe.open_stage_log`). A build rebuilt with other
    hardware keeps an llmc-trainer run resumable, so one file can hold steps of two layouts: ``llmc report`` and
    ``llmc calibrate`` both compare only the later ones with the lock's prediction, and say so
    (:meth:`Relaunch.note`). No start naming another spec (a run under one lock; records before start events
    recorded ``spec_sha256``; a torchtitan run, whose events name none): None, every record compared.

``ran_backend(records, path, known) -> str | None``
    The backend the run's last ``start`` / ``resume`` event names (``llmc launch --backend`` can differ from the
    build's); an :class:`UnknownBackend` error at the first such event naming one outside ``known`` (``llmc report`` and
    ``llmc calibrate`` both predict a run for the backend that trained it, so an edited or foreign name has none).

The trainers write strict JSON (:func:`llmc.runtime.metrics.json_line`): a figure that was not finite (the loss of a
step that diverged) is ``null``, so a reader takes None where a number was; files written before that may hold the
bare ``NaN`` / ``Infinity`` tokens, which Python's json still reads (as float NaN / inf).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO


class MetricsError(ValueError):
    """A damaged ``metrics.jsonl`` line (not a torn last line, which is dropped): where, and what is wrong."""

    def __init__(self, path: Path, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = path, line, problem


class UnknownBackend(MetricsError):
    """A start or resume event naming a backend llmc does not know (:func:`ran_backend`)."""


@dataclass
class MetricsLog:
    path: Path
    steps: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    event_lines: list[int] = field(default_factory=list)  # the file line of each of ``events``
    step_lines: list[int] = field(default_factory=list)  # the file line of each of ``steps``' last record

    def relaunch(self, spec_sha256: str | None) -> Relaunch | None:
        """:func:`since_relaunch` of these events."""
        return since_relaunch(self.numbered_events(), spec_sha256)

    def numbered_events(self) -> Iterable[tuple[int, dict]]:
        return zip(self.event_lines, self.events, strict=True)


def _scan(f: BinaryIO, path: Path) -> Iterator[tuple[int, bytes, dict | None]]:
    """(line number, raw line with its newline, record) for each non-blank line of the binary file ``f`` read from
    ``path`` (named in a :class:`MetricsError`); a last line that is not a whole record (a writer killed mid-line:
    no newline, and not a JSON object) comes last as (line, raw, None). Lines are read one at a time."""
    for i, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        torn = not raw.endswith(b"\n")  # (a last line missing only its newline is still a whole record)
        try:
            rec = json.loads(raw)
        except ValueError as e:  # (an integer of more digits than Python converts is one too)
            if torn:
                yield i, raw, None
                return
            raise MetricsError(path, i, f"not a JSON record ({e})") from None
        except RecursionError:
            if torn:
                yield i, raw, None
                return
            raise MetricsError(path, i, "not a JSON record (nested too deeply)") from None
        if not isinstance(rec, dict):
            if torn:
                yield i, raw, None
                return
            raise MetricsError(path, i, "not a JSON object")
        yield i, raw, rec


def iter_records(path: str | Path, data: bytes | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each complete line of ``path`` (of ``data``, the bytes read from it, when given),
    streamed; a torn last line is dropped, any other bad line raises :class:`MetricsError`."""
    path = Path(path)
    with io.BytesIO(data) if data is not None else open(path, "rb") as f:  # (BytesIO shares data's buffer)
        for i, _, rec in _scan(f, path):
            if rec is not None:
                yield i, rec


def _step(rec: dict) -> int | None:
    s = rec.get("step")
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def truncate_after_step(path: str | Path, step: int) -> int:
    """Drop the records logged after ``step`` (see the module docstring); returns how many went."""
    path = Path(path)
    if not path.exists():
        return 0
    # two passes over the file, one line in memory at a time: count what goes, then (only if anything does)
    # write what stays, byte for byte, to the temporary file
    with open(path, "rb") as f:
        dropped = partial = 0
        for _, _, rec in _scan(f, path):
            partial = rec is None
            dropped += not partial and _step(rec) is not None and _step(rec) > step
    if dropped == 0 and not partial:
        return 0
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as f:
            for _, raw, rec in _scan(f, path):
                if rec is not None and (_step(rec) is None or _step(rec) <= step):
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return dropped


def is_score(metric: str) -> bool:
    """Whether an lm-evaluation-harness result key is a score, not a standard error (``<metric>_stderr``) or its
    ``sample_len`` (the documents evaluated)."""
    return not metric.endswith("_stderr") and metric != "sample_len"


def score_line(metrics: dict[str, float], documents: int | None = None, n_shot: int | None = None,
               chat: bool = False) -> str:
    """"acc 0.6250 ± 0.1000, acc_norm 0.5000 (24 documents, 0-shot, chat template)": each score with its standard
    error where lm_eval gives one, then the documents evaluated, the few-shot examples each prompt held (lm_eval's
    ``n-shot``) and whether the prompts went through the model's chat template, where known."""
    parts = []
    for k, v in sorted(metrics.items()):
        if is_score(k):
            se = metrics.get(f"{k}_stderr")
            parts.append(f"{k} {v:.4f}" + (f" ± {se:.4f}" if isinstance(se, int | float) else ""))
    how = [f"{documents} documents" if documents else "", f"{n_shot}-shot" if n_shot is not None else "",
           "chat template" if chat else ""]
    how = [h for h in how if h]
    return ", ".join(parts) + (f" ({', '.join(how)})" if how else "")


def read_metrics(path: str | Path, keys: Collection[str] | None = None) -> MetricsLog:
    """Each training step once (step order) and the events in file order. Records of one step are merged,
    later keys winning: a step's training record and its validation record (``val_loss``) become one, and
    a step written again after a resume replaces the earlier values. ``keys``: keep only these fields of a step's
    records (and its ``step``): what a reader of a long run holds in memory (a record's dict as json builds it,
    each key its own string, is about 1.5 KB; its dozen fields under shared keys a third of that)."""
    merged: dict[int, dict] = {}
    last: dict[int, int] = {}
    want = None if keys is None else ("step", *(k for k in keys if k != "step"))
    log = MetricsLog(Path(path))
    for line, rec in iter_records(path):
        if "event" in rec:
            log.events.append(rec)
            log.event_lines.append(line)
            continue
        s = _step(rec)
        if s is None:
            continue
        if want is not None:
            rec = {k: rec[k] for k in want if k in rec}
        if (old := merged.get(s)) is None:
            merged[s] = rec
        else:
            old.update(rec)
        last[s] = line
    order = sorted(merged)
    log.steps = [merged[k] for k in order]
    log.step_lines = [last[k] for k in order]
    return log


@dataclass(frozen=True)
class Relaunch:
    """A run relaunched under a lock of another spec (:func:`since_relaunch`): the records after the start event at
    ``line`` were trained under the lock's spec, those before it (partly) under ``other_sha256``'s."""

    other_sha256: str  # the spec_sha256 of the last start event naming another spec than the lock's
    other_line: int  # that event's line
    line: int | None = None  # the first start event after it (the relaunch); None: none since (not relaunched)
    step: int | None = None  # the step that start resumed from (its resumed_from); None: a fresh start

    def measured(self, line: int) -> bool:
        """Whether the record at ``line`` was trained under the lock's spec (after the relaunch)."""
        return self.line is not None and line > self.line

    def note(self, last_step: int | None, logged_step: int | None = None) -> str:
        """The one line ``llmc report`` and ``llmc calibrate`` say of it: ``last_step``, the last step measured
        (after the relaunch); ``logged_step``, the last step logged at all (what was trained when there is no
        relaunch)."""
        other = f"another spec (sha256 {self.other_sha256[:12]})"
        if self.line is None:
            return (f"measured no steps under this lock: the run's last start (line {self.other_line}) trained "
                    f"under {other} and it has not been relaunched under this one since; its {logged_step or 0:,} "
                    "steps are not compared")
        if not self.step:  # (a resume from step 0 trained nothing before it either)
            return (f"measured {last_step or 0:,} steps since the relaunch under this lock (a fresh start, line "
                    f"{self.line}); the records of the earlier run, under {other}, are not compared")
        return (f"measured {max(0, (last_step or self.step) - self.step):,} steps since the relaunch under this lock "
                f"at step {self.step:,}; {self.step:,} earlier steps were trained under {other} and are not compared")


def since_relaunch(events: Iterable[tuple[int, dict]], spec_sha256: str | None) -> Relaunch | None:
    """Where the records trained under the spec ``spec_sha256`` (a lock's ``spec.sha256``) begin, from the (line
    number, record) events of a metrics.jsonl in file order: after the first ``start`` event that follows the last
    one naming another ``spec_sha256`` (a start naming none counts as the lock's). None -- every record is the
    lock's -- when no start event names another spec, or ``spec_sha256`` is not a string."""
    if not isinstance(spec_sha256, str):
        return None
    found = None
    for line, ev in events:
        if ev.get("event") != "start":
            continue
        sha = ev.get("spec_sha256")
        if isinstance(sha, str) and sha != spec_sha256:
            found = Relaunch(sha, line)
        elif found is not None and found.line is None:
            r = ev.get("resumed_from")
            found = replace(found, line=line, step=r if isinstance(r, int) and not isinstance(r, bool) else None)
    return found


def ran_backend(numbered: Iterable[tuple[int, dict]], path: Path, known: Collection[str]) -> str | None:
    """The backend named by the last ``start`` / ``resume`` event of the (line number, record) pairs read from
    ``path`` (None: no event names one); an :class:`UnknownBackend` error at the first such event whose backend is
    not one of ``known`` (the backends llmc knows, :data:`llmc.compiler.backends.BACKENDS`: a run is predicted for
    the backend that trained it)."""
    ran = None
    for line, ev in numbered:
        b = ev.get("backend")
        if ev.get("event") not in ("start", "resume") or b is None:
            continue
        if not (isinstance(b, str) and b in known):
            shown = repr(b) if len(repr(b)) <= 40 else repr(b)[:37] + "..."  # (repr: on one line)
            raise UnknownBackend(path, line, f"{ev['event']} event: backend {shown} is not a backend llmc knows "
                                               f"(one of {', '.join(known)})")
        ran = b
    return ran
