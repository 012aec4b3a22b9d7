"""Time the pre-training stream loader's reading (``llmc.runtime.stream`` behind ``llmc.runtime.data.StreamLoader``)
before and after a change, on data made here: 20,000 documents of ~2,000 characters, seq_len 4,096, a global batch of
64 sequences (64 sequence slots, one process; jsonl also at 512 slots).

    .venv/bin/python scripts/bench_data_paths.py [--before REV] [--repeats N] [--only TEXT]

``--before``: a git revision whose ``llmc/runtime/stream.py`` is timed as "before" (loaded from ``git show``;
default 1ce7061, the code before the reading fixes); everything else is the working tree's. Per source, the
process CPU seconds (less noisy than wall time on a shared host; best of ``--repeats``, before and after
interleaved) of: the first global batch (every slot opens its stream), a steady global batch (mean of 5), and a
resume (a fresh loader restores the state saved after 20 global batches and makes one). The windows of both
versions are checked to be equal. Tokenising is a stand-in (a token per 4 characters) so that reading shows; the
BPE's own cost per global batch (llmc's byte-level BPE, 8,192 tokens, trained on the demo corpus) is printed
under the table. Sources: a ``save_to_disk`` dataset; parquet with fewer row groups (40) than slots (rows dealt
``i % 64``); parquet in 200 files of one row group; jsonl in 4 files at 64 and at 512 slots (every slot reads every
line of the corpus and keeps every 64th / 512th, so its reading grows with the slots). ``--only``: the sources whose
name holds TEXT.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ_LEN, SLOTS, DOCS = 4096, 64, 20_000


def make_data(tmp: Path) -> dict[str, tuple[str, str, int]]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmc.runtime import corpus
    from llmc.runtime.tokenizer import train_bpe

    corpus.write_corpus(tmp / "seed.jsonl", max_docs=3000)
    texts = [json.loads(line)["text"] for line in (tmp / "seed.jsonl").read_text().splitlines()]
    words = " ".join(texts).split()
    rng = random.Random(0)
    docs = []
    for _ in range(DOCS):
        s = rng.randrange(len(words) - 600)
        docs.append(" ".join(words[s:s + 600])[:rng.randint(1500, 2500)])
    train_bpe(texts, 8192, tmp / "tok")
    (tmp / "jsonl").mkdir()
    (tmp / "few").mkdir()
    (tmp / "many").mkdir()
    for f in range(4):
        part = docs[f * 5000:(f + 1) * 5000]
        (tmp / "jsonl" / f"part{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        pq.write_table(pa.table({"text": part}), tmp / "few" / f"part{f}.parquet", row_group_size=500)
    for f in range(200):
        pq.write_table(pa.table({"text": docs[f * 100:(f + 1) * 100]}), tmp / "many" / f"part{f:03d}.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp / "hf"))
    return {"hf (save_to_disk)": ("hf", str(tmp / "hf"), SLOTS),
            "parquet, 40 row groups < 64 slots": ("parquet", str(tmp / "few"), SLOTS),
            "parquet, 200 files": ("parquet", str(tmp / "many"), SLOTS),
            "jsonl, 64 slots": ("jsonl", str(tmp / "jsonl"), SLOTS),
            "jsonl, 512 slots": ("jsonl", str(tmp / "jsonl"), 512)}


def load_before(rev: str):
    try:
        code = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:llmc/runtime/stream.py"], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "stream_before.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("llmc_stream_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Loader:
    """StreamLoader's reading (one StreamingMixture per sequence slot) over a given stream module."""

    def __init__(self, mod, src, tokenize, slots: int = SLOTS):
        self.m = [mod.StreamingMixture([src], tokenize, 0, SEQ_LEN, rank=s, world=slots, seed=0)
                  for s in range(slots)]

    def batch(self):
        return [m.next_window() for m in self.m]

    def state(self):
        return json.loads(json.dumps([m.state_dict() for m in self.m]))

    def load(self, st):
        for m, s in zip(self.m, st, strict=True):
            m.load_state_dict(s)


def stand_in(text: str) -> list[int]:
    return [len(text) % 1000 + 1] * (len(text) // 4)


def run_once(mod, src, slots: int = SLOTS) -> tuple[list[float], list]:
    """(CPU seconds of: first batch, a steady batch, resume + 1 batch; the first and the resumed windows)."""
    if hasattr(mod, "_parquet_row_groups"):
        mod._parquet_row_groups.cache_clear()  # as in a fresh process: no footer read yet
    clock = time.process_time
    t0 = clock()
    ld = Loader(mod, src, stand_in, slots)
    b0 = ld.batch()
    first = clock() - t0
    t0 = clock()
    for _ in range(5):
        ld.batch()
    steady = (clock() - t0) / 5
    for _ in range(14):
        ld.batch()
    st = ld.state()
    want = ld.batch()
    if hasattr(mod, "_parquet_row_groups"):
        mod._parquet_row_groups.cache_clear()
    t0 = clock()
    ld2 = Loader(mod, src, stand_in, slots)
    ld2.load(st)
    got = ld2.batch()
    resume = clock() - t0
    assert all(bool((a == b).all()) for a, b in zip(got, want, strict=True)), "resume is not exact"
    return [first, steady, resume], [b0, got]


def same(x: list, y: list) -> bool:
    return all(bool((a == b).all()) for u, v in zip(x, y, strict=True) for a, b in zip(u, v, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="1ce7061")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="time only the sources whose name holds this text")
    args = ap.parse_args()

    import llmc.runtime.stream as after
    from llmc.runtime.tokenizer import TextTokenizer

    before = load_before(args.before)
    tmp = Path(tempfile.mkdtemp())
    sources = make_data(tmp)
    head = ["first batch", "steady batch", "resume + 1 batch"]
    print(f"{DOCS:,} documents of ~2,000 chars, seq_len {SEQ_LEN}, {SLOTS} slots unless named; process CPU seconds, "
          f"best of {args.repeats} (before: {args.before if before is not None else 'not available'})\n")
    print("| source | " + " | ".join(f"{h} before | {h} after" for h in head) + " |")
    print("|---|" + "---:|" * (2 * len(head)))
    for name, (fmt, path, slots) in sources.items():
        if args.only not in name:
            continue
        src = after.SourceRef(name, path, fmt)
        best = {"before": [float("inf")] * 3, "after": [float("inf")] * 3}
        for _ in range(args.repeats):
            t_new, out_new = run_once(after, src, slots)
            best["after"] = [min(a, b) for a, b in zip(best["after"], t_new, strict=True)]
            if before is not None:
                t_old, out_old = run_once(before, src, slots)
                best["before"] = [min(a, b) for a, b in zip(best["before"], t_old, strict=True)]
                assert same(out_old, out_new), f"{name}: the windows differ from {args.before}'s"
        print(f"| {name} | " + " | ".join(f"{o:.2f} | {n:.2f}" for o, n in zip(best["before"], best["after"],
                                                                               strict=True)) + " |", flush=True)
    tok = TextTokenizer(tmp / "tok")
    docs = [d for d in after.documents(after.SourceRef("j", str(tmp / "jsonl"), "jsonl"))][:2000]
    t0 = time.process_time()
    n = sum(len(tok.encode(d)) for d in docs)
    dt = time.process_time() - t0
    print(f"\nBPE tokenising (tokenizers, one document per call, as the loader does): {dt / n * SEQ_LEN * SLOTS:.2f} "
          f"CPU s per global batch of {SLOTS} x {SEQ_LEN} tokens")


if __name__ == "__main__":
    main()
