"""Training data: local text / JSONL / parquet / Hugging Face ``datasets`` sources, streamed in place.

The trainers read batches from :class:`StreamLoader` (:func:`build_stream_loader`): it streams the
sources where they lie through :class:`llmc.runtime.stream.StreamingMixture`, tokenising on the fly, one
stream per sequence slot of the global batch, so nothing is written before step 1 and nothing
proportional to the data. Global samples are dealt to data-parallel ranks by slot, so dp=2, mb=1 sees
exactly the sequences a single process with mb=2 sees, and ``full_state()`` / ``load_state_dict()``
resume exactly (on any layout with the same global batch). Documents are read in the sources' own
order (no window permutation, as torchtitan's streaming Hugging Face loader), so shuffle a corpus
before training when its files are sorted.

:class:`SourceData` may carry a held-out split (``holdout``): the training streams skip the held-out
documents and the validation set (:mod:`llmc.runtime.validation`) reads only them, both from the
source where it lies. :func:`tokenize_source` pre-tokenises one source into ``<cache>/<name>-<key>.bin``
(a flat uint16 / uint32 memmap, documents joined as ``doc EOS doc EOS ...``, ``key`` hashing the files,
the tokenizer and the field).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmc.runtime.tokenizer import TextTokenizer
from llmc.sources import SourceRef, expand_paths, read_documents  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # torch is imported where tensors are made: prepare (no tensors) starts without it
    import torch


@dataclass(frozen=True)
class SourceData(SourceRef):
    """A source ready to read (:class:`llmc.sources.SourceRef`: where its files are and how to parse them),
    optionally restricted to one part of the held-out validation split: ``holdout = (part, fraction, seed)``
    with ``part`` "train" (every document but the held-out ones) or "val" (only those); see
    :mod:`llmc.runtime.validation`. Applied while streaming (:mod:`llmc.runtime.stream`); nothing is copied."""

    holdout: tuple[str, float, int] | None = None

    def __post_init__(self) -> None:
        if self.holdout is not None:  # JSON gives a list
            part, fraction, seed = self.holdout
            if part not in ("train", "val"):
                raise ValueError(f"holdout part must be 'train' or 'val', got {part!r}")
            object.__setattr__(self, "holdout", (str(part), float(fraction), int(seed)))


def source_files_key(src: SourceRef) -> str:
    """Changes when the source's files change (path, size, mtime of each), without reading them."""
    p = Path(src.path)
    if src.format == "hf" or (p.is_dir() and src.format not in ("text", "jsonl", "parquet")):
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        files = expand_paths(src.path, src.format)
    h = hashlib.sha256(f"{src.format}|{src.text_field}|{getattr(src, 'holdout', None)}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _files_key(src: SourceData, tok: TextTokenizer) -> str:
    h = hashlib.sha256()
    for f in expand_paths(src.path, src.format):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update((tok.dir / "tokenizer.json").read_bytes())
    h.update(f"{src.format}|{src.text_field}|{tok.eos_id}".encode())
    return h.hexdigest()[:16]


def tokenize_source(src: SourceData, tok: TextTokenizer, cache_dir: str | Path, batch_docs: int = 512) -> Path:
    """Pre-tokenise once into a memmap-able ``.bin`` (atomic write, reused when the key matches)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in src.name)
    out = cache / f"{safe}-{_files_key(src, tok)}.bin"
    if out.exists() and out.with_suffix(".json").exists():
        return out
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    tmp = out.with_suffix(f".bin.tmp{os.getpid()}")
    n_tokens = n_docs = 0
    with open(tmp, "wb") as fh:
        buf: list[str] = []

        def flush() -> None:
            nonlocal n_tokens
            ids: list[int] = []
            for doc in tok.encode_batch(buf):
                ids.extend(doc)
                ids.append(tok.eos_id)  # EOS separates packed documents
            np.asarray(ids, dtype=dtype).tofile(fh)
            n_tokens += len(ids)
            buf.clear()

        for doc in read_documents(src.path, src.format, src.text_field):
            buf.append(doc)
            n_docs += 1
            if len(buf) >= batch_docs:
                flush()
        if buf:
            flush()
        fh.flush()
        os.fsync(fh.fileno())
    meta = {"source": src.name, "tokens": n_tokens, "documents": n_docs, "dtype": np.dtype(dtype).name}
    out.with_suffix(".json.tmp").write_text(json.dumps(meta))
    os.replace(tmp, out)
    os.replace(out.with_suffix(".json.tmp"), out.with_suffix(".json"))
    return out


def load_tokens(bin_path: str | Path) -> np.ndarray:
    meta = json.loads(Path(bin_path).with_suffix(".json").read_text())
    if meta["tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(bin_path, dtype=meta["dtype"], mode="r")


@dataclass(frozen=True)
class Assets:
    """What ``prepare_assets`` produced: the tokenizer dir, the sources as local files, the token cache."""

    root: str  # the build/run dir holding assets/, data/, cache/
    tokenizer_dir: str  # assets/ (tokenizer.json + tokenizer_config.json)
    sources: tuple[SourceData, ...]
    cache_dir: str  # token memmaps

    def tokenizer(self) -> TextTokenizer:
        return TextTokenizer(self.tokenizer_dir)

    def to_json(self) -> dict:
        return {"root": self.root, "tokenizer_dir": self.tokenizer_dir, "cache_dir": self.cache_dir,
                "sources": [{k: v for k, v in s.__dict__.items() if k != "holdout" or v is not None}
                            for s in self.sources]}

    @classmethod
    def from_json(cls, d: dict) -> Assets:
        return cls(d["root"], d["tokenizer_dir"], tuple(SourceData(**s) for s in d["sources"]), d["cache_dir"])


# ----------------------------------------------------------------------------- streamed sources (read in place)


def is_hf_saved_dataset(path: str | Path) -> bool:
    """A ``datasets`` ``save_to_disk`` folder (``state.json`` or ``dataset_dict.json`` inside)."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


class StreamLoader:
    """Packed batches streamed from the sources in place, split into one stream per sequence slot of the
    global batch, so the data of a step does not depend on the parallel layout.

    The global batch holds ``slots = micro_batch x grad_accum x dp`` sequences. Slot ``s`` is a
    :class:`llmc.runtime.stream.StreamingMixture` with ``rank=s, world=slots`` (its own disjoint share of
    every source: row groups / lines / files / ``datasets`` shards, and its own seeded mixture draws), and
    each optimizer step takes the next window of every slot. Data-parallel rank ``r`` owns slots
    ``r*K .. (r+1)*K - 1`` (``K = slots / dp``) and opens only those, so ranks read disjoint documents;
    micro-step ``a`` uses slots ``r*K + a*mb .. r*K + (a+1)*mb - 1``. One process with micro_batch 8 and
    two DDP/FSDP ranks with micro_batch 4 therefore train on the same sequences at every step.

    ``state_dict()`` is this rank's slots; :meth:`merge_states` joins every rank's into the full,
    layout-independent state that a checkpoint stores, from which any rank (of any layout with the same
    global batch) takes its own slots with ``load_state_dict``.
    """

    def __init__(self, sources: list[SourceData], tokenize, eos_id: int, seq_len: int, slots: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        from llmc.runtime.stream import StreamingMixture

        if slots % dp_size:
            raise ValueError(f"global batch of {slots} sequences does not split over {dp_size} data-parallel ranks")
        self.slots, self.seq_len, self.seed, self.dp_rank, self.dp_size = slots, seq_len, seed, dp_rank, dp_size
        self.per_rank = slots // dp_size
        self.first = dp_rank * self.per_rank
        refs = [SourceData(s.name, s.path, s.format, s.text_field, s.weight, getattr(s, "holdout", None))
                for s in sources]
        self.mixtures = {s: StreamingMixture(refs, tokenize, eos_id, seq_len, rank=s, world=slots, seed=seed)
                         for s in range(self.first, self.first + self.per_rank)}
        self.pos = 0  # next slot offset inside this rank's share (0 at every optimizer-step boundary)

    def next_batch(self, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, labels), each (micro_batch, seq_len) int64."""
        if self.per_rank % micro_batch:
            raise ValueError(f"micro_batch {micro_batch} does not divide this rank's {self.per_rank} sequences per step")
        import torch

        rows = [self.mixtures[self.first + self.pos + j].next_window() for j in range(micro_batch)]
        self.pos = (self.pos + micro_batch) % self.per_rank
        arr = torch.stack(rows)
        return arr[:, :-1].contiguous(), arr[:, 1:].contiguous()

    def skip(self, micro_batches: int, micro_batch: int) -> None:
        """Advance past ``micro_batches`` batches (loss-spike skipping)."""
        for _ in range(micro_batches):
            self.next_batch(micro_batch)

    def epochs(self) -> dict[str, int]:
        """Completed passes over each source by every owned slot (the least advanced slot)."""
        eps = [m.epochs() for m in self.mixtures.values()]
        return {k: min(e[k] for e in eps) for k in eps[0]}

    def state_dict(self) -> dict:
        return {"kind": "stream", "slots": self.slots, "seq_len": self.seq_len, "seed": self.seed, "pos": self.pos,
                "streams": {str(s): m.state_dict() for s, m in self.mixtures.items()}}

    def full_state(self) -> dict:
        """Every rank's streams joined (collective under torch.distributed: all ranks call it)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.state_dict()
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state_dict())
        return self.merge_states(states)

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """Join the ``state_dict()`` of every rank (tensor-parallel peers repeat theirs) into one."""
        out = {k: v for k, v in states[0].items() if k != "streams"}
        out["streams"] = {}
        for st in states:
            out["streams"].update(st["streams"])
        return out

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise ValueError("the checkpoint's data position is from the pre-tokenised loader; resume with "
                             "the llmc version that wrote it or restart the stage")
        why = position_change(state, self.slots, self.seq_len, self.seed)
        if why is not None:
            raise ValueError(why)
        missing = [s for s in self.mixtures if str(s) not in state["streams"]]
        if missing:
            raise ValueError(f"checkpoint has no data position for sequence slot(s) {missing}")
        for s, m in self.mixtures.items():
            m.load_state_dict(state["streams"][str(s)])
        self.pos = int(state["pos"])


def position_change(state: dict, slots: int, seq_len: int, seed: int, redo: str | None = None) -> str | None:
    """Why the data position ``state`` (a :meth:`StreamLoader.state_dict`, which records its ``slots``, ``seq_len``
    and ``seed``) cannot continue in a loader of ``slots`` sequences of ``seq_len`` tokens drawn with ``seed``; None
    when it can. Said in the spec's settings, old -> new: ``seq_len``, the global batch in tokens
    (``global_batch_tokens`` = slots x seq_len, the tokens of one step) and ``training.seed``; the slots themselves
    (the global batch in sequences, ``global_batch_tokens / seq_len``: one data stream each, so a saved position is
    one per slot) follow from the first two, and are named with them when they changed, with the ways out (``redo``,
    default :data:`llmc.runtime.job.REDO_HINT`; ``llmc launch`` checks a checkpoint with this before anything runs)."""
    from llmc.runtime.job import REDO_HINT

    s0, l0, seed0 = state.get("slots"), state.get("seq_len"), state.get("seed")
    known = isinstance(s0, int) and isinstance(l0, int)
    changed = [f"seq_len {l0} -> {seq_len}" if l0 != seq_len else "",
               f"global_batch_tokens {s0 * l0} -> {slots * seq_len}" if known and s0 * l0 != slots * seq_len else
               f"global batch {s0} -> {slots} sequences" if not known and s0 != slots else "",
               f"training.seed {seed0} -> {seed}" if seed0 != seed else ""]
    if not any(changed):
        return None
    streams = (f" (so the global batch, global_batch_tokens / seq_len, {s0} -> {slots} sequences, each a data "
               f"stream of its own)" if known and s0 != slots else "")
    return (f"settings changed since the checkpoint: {', '.join(x for x in changed if x)}{streams}; the data position would "
            f"not match: {redo or REDO_HINT}")


def build_stream_loader(sources: list[SourceData], tok: TextTokenizer, seq_len: int, slots: int, seed: int = 0,
                        dp_rank: int = 0, dp_size: int = 1) -> StreamLoader:
    """A :class:`StreamLoader` tokenising with ``tok`` (no BOS, EOS after each document, as
    :func:`tokenize_source`)."""
    return StreamLoader(sources, tok.encode, tok.eos_id, seq_len, slots, seed, dp_rank, dp_size)
