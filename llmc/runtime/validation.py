"""Held-out validation: a deterministic document split and one validation-loss function for every backend.

Split, applied while reading (nothing is copied). Document ``i`` of a source (its index in the source's
own order: sorted files, rows / lines in order; :mod:`llmc.runtime.stream`) is held out when

    int(sha256(f"{seed}:{source}:{i}")[:8]) / 2**64 < fraction

so the split depends only on (source name, document index, seed, fraction): train and validation are
disjoint by construction and the same on every machine and backend (the torchtitan job computes the same
hash). :func:`split_assets` (run by ``prepare``) marks every text source ``holdout=("train", fraction,
seed)``, so the training streams skip the held-out documents; :func:`validation_sources` gives the same
sources with ``("val", ...)``, which read only them. ``data/split/validation.json`` records the split
(fraction, seed, files, sources). With ``eval.validation.files`` nothing is held out and those files are
the validation set. Chat / preference / prompt sources are not split (no packed-text loss). The
tokenizer is trained on all documents.

Mixture (:func:`interleave`). The validation set is a held-out sample of the training mixture: the
held-out documents of every split source, interleaved document by document so that each source holds its
weight's share of the validation tokens. Source ``s`` has ``parts[s] = round(10**6 * weight_s / sum of
weights)`` (:func:`llmc.sources.mixture_parts`, exact integers, which the torchtitan job is given: every
backend takes the same documents); the next
document comes from the source with the fewest tokens taken per part (``taken[s] / parts[s]``, exact
rationals, ties to the source listed first), and a document counts its text tokens + 1 (llmc's EOS;
torchtitan's BOS: the same count in both formats). This is start-time fair queueing (Goyal, Vin & Cheng,
"Start-time Fair Queueing", SIGCOMM 1996) with documents as packets: at every point each source is within
one document of its share. A source whose held-out documents run out drops out and the others go on in
their ratios. With ``eval.validation.files`` the files are read in order (the user's own set).

Loss (:func:`evaluate`), format ``"llmc-packed"`` (:data:`VAL_FORMAT`, in every validation record): the
interleaved documents tokenised like native / DeepSpeed training data (no BOS, EOS after each document,
targets across document boundaries) are cut into windows of ``seq_len + 1`` tokens in order; validation
batch ``b`` of data-parallel rank ``r`` holds windows ``(b * dp + r) * micro_batch ...`` (+ micro_batch),
for ``eval.validation.max_batches x grad_accum`` batches (torchtitan's validator: ``steps`` batches of
``local_batch_size`` per rank): ``max_batches`` global batches, the same windows on every layout of the
run. Reading stops once those windows are full; the tokens are cached in ``<cache>/validation-<key>.npy``
(a few MB at most). The loss is :func:`llmc.runtime.model.lm_loss` without z-loss or MoE auxiliary terms,
averaged over every token of every rank; ``val_ppl = exp(val_loss)``.

The torchtitan job validates in the format it trains (``"torchtitan-documents"``): the same documents in
the same order (the job computes the same split and interleaving), packed by torchtitan 0.3.0's own
``HuggingFaceTextDataset`` (BOS + document + EOS, positions restarting at every document, which its
models turn into document-masked attention; no target crosses a document), cut into the same number of
``seq_len`` windows and dealt to ranks the same way. Its ``val_loss`` is that model's loss on held-out data
in its own format: comparable between runs of one backend, not across backends (a model trained on one
format scores worse on the other).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmc.runtime.data import Assets, SourceData
from llmc.sources import mixture_parts, validation_file_format

SPLIT_DIR = "split"


def is_heldout(source: str, index: int, seed: int, fraction: float) -> bool:
    """Whether document ``index`` of ``source`` belongs to the validation split."""
    h = hashlib.sha256(f"{seed}:{source}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


def split_assets(assets: Assets, validation, *, resolve=lambda p: Path(p), skip: tuple[str, ...] = (),
                 log=print) -> Assets:
    """Hold out the validation documents; returns ``assets`` whose text sources read the training part.

    ``validation``: the spec's ``eval.validation``; ``resolve`` maps spec-relative paths (``files``) to
    absolute ones; ``skip``: source names not to split (non-text sources). Writes only
    ``data/split/validation.json``; no document is read or copied.
    """
    root = Path(assets.root)
    out = root / "data" / SPLIT_DIR
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "validation.json"
    if validation.files:
        files = [str(resolve(f)) for f in validation.files]
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"eval.validation.files: {f} does not exist")
        _atomic(state_file, {"fraction": None, "seed": validation.seed, "files": files, "sources": []})
        return assets
    holdout = ("train", float(validation.fraction), int(validation.seed))
    sources, split = [], []
    for s in assets.sources:
        if s.name in skip:
            sources.append(s)
            continue
        sources.append(SourceData(s.name, s.path, s.format, s.text_field, s.weight, holdout))
        split.append(s.name)
    record = {"fraction": validation.fraction, "seed": validation.seed, "files": None, "sources": split}
    prev = json.loads(state_file.read_text()) if state_file.exists() else None
    if prev != record:
        log(f"prepare: {', '.join(split) or 'no source'}: documents held out for validation while streaming "
            f"(fraction {validation.fraction}, seed {validation.seed}; nothing copied)")
        _atomic(state_file, record)
    return Assets(assets.root, assets.tokenizer_dir, tuple(sources), assets.cache_dir)


def _atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def validation_sources(assets: Assets, names: list[str] | None = None) -> list[SourceData]:
    """The validation sources: the held-out part of every split source of ``assets`` (restricted to
    ``names``), or the spec's validation files as recorded by :func:`split_assets`."""
    state_file = Path(assets.root) / "data" / SPLIT_DIR / "validation.json"
    if not state_file.exists():
        raise FileNotFoundError(f"{state_file} missing: run prepare with eval.validation set")
    st = json.loads(state_file.read_text())
    if st.get("files"):
        return [SourceData(f"val{i}", f, validation_file_format(f) or "jsonl", "text") for i, f in enumerate(st["files"])]
    out = []
    for s in assets.sources:
        if s.holdout is not None and (names is None or s.name in names):
            _, fraction, seed = s.holdout
            out.append(SourceData(s.name, s.path, s.format, s.text_field, s.weight, ("val", fraction, seed)))
    return out


@dataclass
class ValidationSet:
    """The validation windows of one data-parallel rank."""

    windows: np.ndarray  # (n, seq_len + 1) int64 token windows of this rank, batch-major
    micro_batch: int
    batches: int
    total_windows: int  # windows used on all ranks

    @classmethod
    def from_streams(cls, streams: list[np.ndarray], seq_len: int, micro_batch: int, max_batches: int,
                     dp_rank: int = 0, dp_size: int = 1, grad_accum: int = 1) -> ValidationSet:
        """At most ``max_batches`` batches of ``micro_batch`` windows per rank, in whole global batches
        (``grad_accum`` batches on each of the ``dp_size`` ranks, ``micro_batch x grad_accum x dp_size`` windows):
        a held-out set smaller than ``max_batches`` of them is cut to whole global batches, so every layout of the
        same global batch reads the same windows. One holding less than a global batch (a small
        ``eval.validation.files`` on a large batch) is read in whole ``micro_batch x dp_size`` batches, as many as it
        holds (those windows then depend on the layout); less than one of those is an error."""
        stream = np.concatenate([np.asarray(s, dtype=np.int64) for s in streams]) if streams else np.zeros(0)
        n_win = max(0, (len(stream) - 1) // seq_len)
        per_batch = micro_batch * dp_size
        accum = max(int(grad_accum), 1)
        batches = min(max_batches, n_win // (per_batch * accum) * accum) or min(max_batches, n_win // per_batch)
        if batches == 0:
            raise ValueError(f"validation set has {len(stream)} tokens: fewer than one batch of "
                             f"{per_batch} x {seq_len + 1} (raise eval.validation.fraction or give more data)")
        rows = []
        for b in range(batches):
            for j in range(micro_batch):
                w = (b * dp_size + dp_rank) * micro_batch + j
                rows.append(stream[w * seq_len: w * seq_len + seq_len + 1])
        return cls(np.stack(rows), micro_batch, batches, batches * per_batch)

    def batch(self, b: int):
        import torch

        w = torch.from_numpy(self.windows[b * self.micro_batch:(b + 1) * self.micro_batch])
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


#: what llmc's validation windows hold (every validation record says it): documents joined with EOS, no BOS,
#: packed across document boundaries, positions 0..seq_len-1 over the window (the torchtitan job's records say
#: "torchtitan-documents")
VAL_FORMAT = "llmc-packed"



def interleave(streams: list, parts: list[int] | None, size=len):
    """``(source index, item)`` from the per-source iterators ``streams``, interleaved by start-time fair
    queueing (module docstring): the next item comes from the source with the least ``taken / part`` (exact
    rationals; ties to the lower index), ``taken`` summing ``size(item)``; a source that runs out, or has part
    0, drops out. ``parts`` None: the streams one after the other (validation files)."""
    from fractions import Fraction

    taken = [0] * len(streams)
    live = [i for i in range(len(streams)) if parts is None or parts[i] > 0]
    while live:
        i = live[0] if parts is None else min(live, key=lambda s: (Fraction(taken[s], parts[s]), s))
        item = next(streams[i], None)
        if item is None:
            live.remove(i)
            continue
        taken[i] += size(item)
        yield i, item


def validation_parts(srcs: list[SourceData]) -> list[int] | None:
    """The mixture parts of the validation sources: None for the spec's validation files (read in order)."""
    if any(getattr(s, "holdout", None) is None for s in srcs):
        return None
    return mixture_parts([s.weight for s in srcs])


def _tokenised(src: SourceData, tok, batch_docs: int):
    """The documents of ``src`` as token ids (no special tokens), tokenised ``batch_docs`` at a time as read."""
    from llmc.runtime.stream import documents

    batch: list[str] = []
    for doc in documents(src):
        batch.append(doc)
        if len(batch) == batch_docs:
            yield from tok.encode_batch(batch)
            batch.clear()
    if batch:
        yield from tok.encode_batch(batch)


def validation_documents(srcs: list[SourceData], tok, batch_docs: int = 16):
    """``(source index, token ids)`` of the validation documents in the mixture's order (:func:`interleave`
    with :func:`validation_parts`), each counted as its ids + 1; streamed, ``batch_docs`` documents of a source
    tokenised together."""
    streams = [_tokenised(s, tok, batch_docs) for s in srcs]
    return interleave(streams, validation_parts(srcs), size=lambda ids: len(ids) + 1)


def validation_tokens(srcs: list[SourceData], tok, n_tokens: int, batch_docs: int = 16) -> np.ndarray:
    """The first ``n_tokens`` (or fewer, when the sources run out) tokens of the validation documents in the
    mixture's order (:func:`validation_documents`), EOS after each, streamed in place: reading stops once there
    are enough (at most ``batch_docs`` documents of a source, tokenised together, past the last one needed)."""
    ids: list[int] = []
    for _, doc in validation_documents(srcs, tok, batch_docs):
        ids.extend(doc)
        ids.append(tok.eos_id)
        if len(ids) >= n_tokens:
            break
    return np.asarray(ids[:n_tokens], dtype=np.int64)


def build_validation_set(assets: Assets, tok, seq_len: int, micro_batch: int, max_batches: int,
                         dp_rank: int = 0, dp_size: int = 1, names: list[str] | None = None,
                         grad_accum: int = 1) -> ValidationSet:
    """Tokenise the validation documents (streamed, only as many as ``max_batches`` batches need; cached,
    rank 0 first, the others wait) and take this rank's windows, in whole global batches
    (:meth:`ValidationSet.from_streams`)."""
    import torch.distributed as dist

    from llmc.runtime.data import source_files_key

    srcs = validation_sources(assets, names)
    need = max_batches * micro_batch * dp_size * seq_len + 1
    h = hashlib.sha256(f"{need}|{tok.eos_id}|mix {validation_parts(srcs)}".encode())
    h.update((Path(tok.dir) / "tokenizer.json").read_bytes())
    for s in srcs:
        h.update(f"{s.name}|{source_files_key(s)}".encode())
    cache = Path(assets.cache_dir) / f"validation-{h.hexdigest()[:16]}.npy"
    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not cache.exists() and (not group or dist.get_rank() == 0):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npy")
        np.save(tmp, validation_tokens(srcs, tok, need))
        os.replace(tmp, cache)
    if group:
        dist.barrier()
    return ValidationSet.from_streams([np.load(cache)], seq_len, micro_batch, max_batches, dp_rank, dp_size,
                                      grad_accum)


def evaluate(model, vset: ValidationSet, device, autocast=None, loss_chunk: int = 0) -> dict:
    """Mean next-token loss of ``model`` (returns logits for ``model(x)``) over the validation set, averaged
    over all data-parallel ranks: ``{"val_loss", "val_ppl", "val_tokens"}``. Collective under a process group.
    The loss is llmc's model's own (``model(x, targets=y, loss_chunk=...)``), in slices of ``loss_chunk`` tokens when
    the stage's plan sliced it (a micro-batch's whole logits would not fit); 0: all at once."""
    import contextlib

    import torch
    import torch.distributed as dist

    from llmc.runtime.model import mean_token_loss

    was_training = getattr(model, "training", False)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of loss x tokens, tokens)
    try:
        with torch.no_grad():
            for b in range(vset.batches):
                x, y = vset.batch(b)
                x, y = x.to(device), y.to(device)
                with autocast if autocast is not None else contextlib.nullcontext():
                    loss = mean_token_loss(model(x, targets=y, loss_chunk=loss_chunk), y)
                total[0] += loss.double() * y.numel()
                total[1] += y.numel()
    finally:
        if was_training:
            model.train()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    val = float(total[0] / total[1])
    return {"val_loss": val, "val_ppl": math.exp(min(val, 700.0)), "val_tokens": int(total[1])}


def due(step: int, every: int, last_step: int) -> bool:
    """Validate every ``every`` steps and at the final step."""
    return step % every == 0 or step == last_step


__all__ = ["is_heldout", "split_assets", "validation_sources", "ValidationSet", "validation_tokens",
           "validation_documents", "validation_parts", "mixture_parts", "interleave", "build_validation_set",
           "evaluate", "due", "SPLIT_DIR", "VAL_FORMAT"]


class Validator:
    """What a training loop calls: ``v.maybe(step, last_step, model, log)`` validates when due and logs a
    ``{"step", "val_loss", "val_ppl", "val_tokens", "val_format"}`` record to metrics.jsonl (``val_format``:
    :data:`VAL_FORMAT`, what the windows hold); ``v.last`` is the latest."""

    def __init__(self, vset: ValidationSet, every: int, device, autocast=None, loss_chunk: int = 0):
        self.vset, self.every, self.device, self.autocast = vset, every, device, autocast
        self.loss_chunk = loss_chunk  # the stage's loss slices (evaluate)
        self.last: dict | None = None

    @classmethod
    def for_job(cls, job, assets: Assets, micro_batch: int, dp_rank: int, dp_size: int, device,
                autocast=None, grad_accum: int | None = None) -> Validator | None:
        """None unless the run's spec sets ``eval.validation`` and the stage trains on packed text. ``grad_accum``:
        the micro-batches per step the trainer runs (None: the job's)."""
        from llmc.spec.schema import LM_KINDS

        ev = job.spec.eval if job.spec is not None else None
        if ev is None or ev.validation is None or job.kind not in LM_KINDS:
            return None
        v = ev.validation
        # max_batches global batches: the same windows whatever the layout (micro_batch x grad_accum x dp sequences
        # each), so val_loss compares across plans and hardware
        accum = max(int(job.grad_accum if grad_accum is None else grad_accum), 1)
        vset = build_validation_set(assets, assets.tokenizer(), job.seq_len, micro_batch, v.max_batches * accum,
                                    dp_rank, dp_size, names=[s.name for s in job.sources], grad_accum=accum)
        if vset.batches < v.max_batches * accum and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: validation uses {vset.batches / accum:g} of eval.validation.max_batches={v.max_batches} "
                  f"global batches (the held-out set is smaller; raise eval.validation.fraction)", flush=True)
        return cls(vset, v.every_steps, device, autocast, job.loss_chunk)

    def maybe(self, step: int, last_step: int, model, log) -> dict | None:
        if not due(step, self.every, last_step):
            return None
        self.last = {"step": step, **evaluate(model, self.vset, self.device, self.autocast, self.loss_chunk),
                     "val_format": VAL_FORMAT}
        log.log(dict(self.last))
        return self.last


__all__ += ["Validator"]
