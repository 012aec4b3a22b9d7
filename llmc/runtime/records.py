"""Post-training records (chat / preference / prompts) read from a stage's sources and checked one by one (no torch).

The one reader and checker of a record: the post-training loops (:func:`llmc.runtime.posttrain.load_stage_records`)
read every record through it, and prepare (:func:`llmc.runtime.entry.prepare_assets`) reads the first
:data:`PREPARE_RECORDS` of each record source of every stage through it, so a missing file or a malformed record is
found before any stage trains, with the line the stage would give. By ``kind``: ``chat`` -> {"messages": [{role,
content}...]}; ``preference`` -> {"prompt", "chosen", "rejected"} (prompt a string or messages, chosen and rejected
the response texts); ``prompts`` -> {"prompt", "expression" | "answer"}. A ``datasets`` ``save_to_disk`` folder is
read with ``datasets.load_from_disk``. A bad record is one line naming its file and line (or folder and row), what is
wrong and what a record holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmc.sources import json_kind

KIND_FOR_STAGE = {"sft": "chat", "dpo": "preference", "grpo": "prompts"}
RECORD_FORMS = {"chat": '{"messages": [{"role": ..., "content": ...}, ...]}',
                "preference": '{"prompt": ..., "chosen": "...", "rejected": "..."}',
                "prompts": '{"prompt": ..., "answer": "42"} (or "expression": "6*7")'}
#: how many records of each record source prepare reads and checks before any stage trains (the stage reads them all)
PREPARE_RECORDS = 16


class PostTrainError(ValueError):
    pass


def check_format(name: str, fmt: str, kind: str) -> None:
    """A record source is jsonl records (or a ``save_to_disk`` folder declared so): PostTrainError otherwise."""
    if fmt != "jsonl":
        raise PostTrainError(f"source {name!r}: {kind} data must be jsonl records (got {fmt})")


def source_rows(path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    """(where, record) of each record of a source: a ``datasets`` ``save_to_disk`` folder is read with
    ``datasets.load_from_disk`` (where = "<folder> row i", i as ``ds[i]`` counts), anything else as jsonl files
    (where = "file:line"; :func:`llmc.sources.jsonl_record`, so a malformed line, a byte that is not UTF-8 or a line
    that is not an object is one located line, as pre-training's readers say it)."""
    from llmc.sources import expand_paths, hf_saved, is_hf_saved, jsonl_record, open_jsonl

    if is_hf_saved(path):
        try:
            ds = hf_saved(path)
        except ImportError:
            raise PostTrainError(f"{path}: a `datasets` save_to_disk folder, read with the datasets package, which is "
                                 "not installed; hint: pip install datasets, or write the records as jsonl") from None
        except Exception as e:  # noqa: BLE001 (datasets / pyarrow raise many kinds on a damaged folder)
            raise PostTrainError(f"{path}: datasets cannot load this save_to_disk folder ({type(e).__name__}: {e}); "
                                 "hint: save it again with Dataset.save_to_disk, or write the records as jsonl") from None
        for i, row in enumerate(ds):
            yield f"{path} row {i}", row
        return
    field = {"chat": "messages", "preference": "prompt", "prompts": "prompt"}[kind]
    for f in expand_paths(path, "jsonl"):
        with open_jsonl(f) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = jsonl_record(line, f"{f}:{n}", field)
                except ValueError as e:
                    raise PostTrainError(str(e)) from None
                yield f"{f}:{n}", rec


def field_of(r: dict, key: str, where: str, kind: str) -> Any:
    """``r[key]``, or one located line naming what the record lacks (a ``datasets`` row holds null there)."""
    v = r.get(key)
    if v is None:
        raise PostTrainError(f"{where}: no {key!r} field; hint: a {kind} record is {RECORD_FORMS[kind]}")
    return v


def messages(v: Any, where: str, key: str) -> list[dict]:
    """``v`` checked as a list of messages: objects with a string role and content (a string or a list of parts);
    only an assistant message with ``tool_calls`` may go without content. One located line otherwise."""
    if not isinstance(v, list) or not v:
        raise PostTrainError(f"{where}: {key!r} is {'an empty list' if v == [] else json_kind(v)}, not a list of "
                             'messages; hint: [{"role": "user", "content": "..."}, ...]')
    for j, m in enumerate(v):
        if not isinstance(m, dict):
            raise PostTrainError(f"{where}: message {j} is {json_kind(m)}, not an object with role and content")
        role, c = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise PostTrainError(f"{where}: message {j} has {'no role' if role is None else 'role ' + repr(role)}; "
                                 "hint: role is system, user, assistant or tool")
        if c is None and not (role == "assistant" and m.get("tool_calls")):
            raise PostTrainError(f"{where}: message {j} ({role}) has no content; hint: content is a string or a list "
                                 'of {"type": "text", "text": ...} parts (an assistant tool call carries tool_calls)')
        if c is not None and not isinstance(c, (str, list)):
            raise PostTrainError(f"{where}: message {j} ({role}) has {json_kind(c)} as content; hint: content is a "
                                 'string or a list of {"type": "text", "text": ...} parts')
    return v


def as_messages(p: Any, where: str = "prompt", key: str = "prompt") -> list[dict]:
    return [{"role": "user", "content": p}] if isinstance(p, str) else list(messages(p, where, key))


def response_problem(p: dict) -> str | None:
    """What is wrong with a preference record's ``chosen`` / ``rejected`` (they are the response texts, strings;
    TRL's conversational format gives message lists), None when nothing is."""
    bad = [k for k in ("chosen", "rejected") if not isinstance(p[k], str)]
    if not bad:
        return None
    return (f"{bad[0]!r} is a {type(p[bad[0]]).__name__}, not a string: chosen and rejected must be the response "
            "texts (for the conversational format, give the assistant message's content)")


def check_record(r: Any, where: str, kind: str, text_field: str, index: int = 0) -> Any:
    """One source record as the stage trains on it (chat: the messages; preference: {prompt messages, chosen,
    rejected}; prompts: {prompt messages, expression, answer, where}), checked: PostTrainError naming ``where``
    (``index``: the record's position among the stage's records of its kind, which a preference error names)."""
    if not isinstance(r, dict):
        raise PostTrainError(f"{where}: {json_kind(r)}, not a record; hint: a {kind} record is {RECORD_FORMS[kind]}")
    if kind == "chat":
        key = "messages" if r.get("messages") is not None or r.get(text_field) is None else text_field
        return messages(field_of(r, key, where, kind), where, key)
    if kind == "preference":
        rec = {"prompt": as_messages(field_of(r, "prompt", where, kind), where),
               "chosen": field_of(r, "chosen", where, kind), "rejected": field_of(r, "rejected", where, kind)}
        why = response_problem(rec)
        if why:
            raise PostTrainError(f"{where}: preference record {index}: {why}")
        return rec
    return {"prompt": as_messages(field_of(r, "prompt", where, kind), where), "expression": r.get("expression"),
            "answer": r.get("answer"), "where": where}


def check_source(name: str, path: Path, fmt: str, kind: str, text_field: str, first: int = PREPARE_RECORDS) -> int:
    """Prepare's check of one record source: jsonl (:func:`check_format`), files there (``no .jsonl/.json files
    found`` otherwise) and its first ``first`` records as the stage reads them (:func:`check_record`); returns how
    many it read. PostTrainError / FileNotFoundError (one line) otherwise."""
    check_format(name, fmt, kind)
    n = 0
    for where, r in source_rows(path, kind):
        if n >= first:
            break
        check_record(r, where, kind, text_field, n)
        n += 1
    return n
