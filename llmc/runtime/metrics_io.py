"""Reading and resuming ``metrics.jsonl`` (one JSON object per line). Never imports torch.

A run resumed from the checkpoint at step S re-logs steps S+1, S+2, ... that the killed run had
already written. Two ways to keep each step once:

``truncate_after_step(path, step) -> int``
    Before resuming from ``step``: atomically rewrite ``path`` (temp file in the same directory, fsync,
    ``os.replace``, fsync of the directory) keeping the records whose ``"step"`` is ``<= step`` and
    the records without a ``"step"`` (events such as ``{"event": "start"}``); records with a step
    after the checkpoint (training steps and step-tagged events alike) are dropped, and so is a
    half-written last line. Returns the number of records dropped. A missing file is left missing.

``read_metrics(path) -> MetricsLog``
    ``steps``: the training records (those with a ``"step"`` and no ``"event"`` key), one per step,
    the last one written winning, in step order. ``events``: the records with an ``"event"`` key, in
    file order, with their line numbers. A half-written last line (a writer killed mid-line) is ignored;
    any other bad line raises :class:`MetricsError` (a ``ValueError``) naming its line number.

``records(path)`` / ``parse_records(data, path)``
    Each complete line as (line number, raw text, record), and whether a torn last line was dropped: the one
    parser of the file, read by the two above and by ``llmc calibrate`` (:func:`llmc.measurements.read_llmc_run`).

``ran_backend(records, path, known) -> str | None``
    The backend the run's last ``start`` / ``resume`` event names (``llmc launch --backend`` can differ from the
    build's); an :class:`UnknownBackend` error at the first such event naming one outside ``known`` (``llmc report`` and
    ``llmc calibrate`` both predict a run for the backend that trained it, so an edited or foreign name has none).

The trainers write strict JSON (:func:`llmc.runtime.metrics.json_line`): a figure that was not finite (the loss of a
step that diverged) is ``null``, so a reader takes None where a number was; files written before that may hold the
bare ``NaN`` / ``Infinity`` tokens, which Python's json still reads (as float NaN / inf).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path


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

    def numbered_events(self) -> Iterable[tuple[int, dict]]:
        return zip(self.event_lines, self.events, strict=True)


def records(path: str | Path) -> tuple[list[tuple[int, str, dict]], bool]:
    """(line number, raw line, record) for each complete line of ``path``, and whether a partial tail was dropped."""
    return parse_records(Path(path).read_bytes(), Path(path))


def parse_records(data: bytes, path: Path) -> tuple[list[tuple[int, str, dict]], bool]:
    """:func:`records` of the bytes ``data`` read from ``path`` (named in a :class:`MetricsError`)."""
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    out = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError as e:  # (an integer of more digits than Python converts is one too)
            raise MetricsError(path, i, f"not a JSON record ({e})") from None
        except RecursionError:
            raise MetricsError(path, i, "not a JSON record (nested too deeply)") from None
        if not isinstance(rec, dict):
            raise MetricsError(path, i, "not a JSON object")
        out.append((i, raw.decode("utf-8", "replace"), rec))
    if tail.strip():
        try:  # a last line missing only its newline is still a whole record
            rec = json.loads(tail)
            if isinstance(rec, dict):
                out.append((len(lines) + 1, tail.decode("utf-8", "replace"), rec))
                return out, False
        except (ValueError, RecursionError):
            pass
        return out, True
    return out, False


def _step(rec: dict) -> int | None:
    s = rec.get("step")
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def truncate_after_step(path: str | Path, step: int) -> int:
    """Drop the records logged after ``step`` (see the module docstring); returns how many went."""
    path = Path(path)
    if not path.exists():
        return 0
    recs, partial = records(path)
    keep = [raw for _, raw, rec in recs if _step(rec) is None or _step(rec) <= step]
    dropped = len(recs) - len(keep)
    if dropped == 0 and not partial:
        return 0
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
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


def read_metrics(path: str | Path) -> MetricsLog:
    """Each training step once (step order) and the events in file order. Records of one step are merged,
    later keys winning: a step's training record and its validation record (``val_loss``) become one, and
    a step written again after a resume replaces the earlier values."""
    recs, _ = records(path)
    steps: dict[int, dict] = {}
    log = MetricsLog(Path(path))
    for line, _, rec in recs:
        if "event" in rec:
            log.events.append(rec)
            log.event_lines.append(line)
        elif _step(rec) is not None:
            steps[_step(rec)] = {**steps.get(_step(rec), {}), **rec}
    log.steps = [steps[k] for k in sorted(steps)]
    return log


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
