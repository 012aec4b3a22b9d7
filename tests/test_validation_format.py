"""What the validation loss measures, per backend.

1. The validation set is a held-out sample of the mixture: four sources of disjoint vocabularies (weights
   50/30/10/10) each hold their weight's share of the validation tokens, counted by vocabulary, in llmc's set
   and in the torchtitan job's (the same documents in the same order).
2. The torchtitan job's JSONL reader accepts what llmc's accepts (a UTF-8 BOM, blank lines) and stops on a bad
   line with one located line in llmc's words.
3. The torchtitan job validates in the format it trains (torchtitan 0.3.0's HuggingFaceTextDataset: BOS +
   document + EOS, positions restarting per document, no label across documents): its validator's windows are
   the held-out documents packed that way (built here by hand); test_validation.py's torchtitan tests check
   that the val_loss a run logs is its checkpoint's loss on those windows.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))

from llmc.runtime.data import Assets, SourceData  # noqa: E402
from llmc.runtime.validation import (  # noqa: E402
    is_heldout,
    split_assets,
    validation_parts,
    validation_sources,
    validation_tokens,
)
from llmc.sources import mixture_parts  # noqa: E402
from llmc.spec.schema import Validation  # noqa: E402

ALPHABETS = ("abcdef", "ghijkl", "mnopqr", "stuvwx")
WEIGHTS = (50, 30, 10, 10)
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _tokenizer(folder: Path, docs: list[str], vocab: int = 300) -> None:
    """A byte-level BPE with BOS / EOS (tokenizer.json + tokenizer_config.json, as prepare writes them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))


def _four_sources(tmp_path: Path, n_docs: int = 400):
    """Four JSONL sources whose documents are runs of letters of one alphabet each (no space: a byte-level
    BPE token of a document never holds another source's letters); their held-out split; the tokenizer."""
    rng = random.Random(0)
    paths, every = [], []
    for k, letters in enumerate(ALPHABETS):
        docs = ["".join(rng.choice(letters) for _ in range(rng.randint(20, 120))) for _ in range(n_docs)]
        p = tmp_path / "src" / f"s{k}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        paths.append(p)
        every += docs
    run = tmp_path / "run"
    _tokenizer(run / "assets", every)
    srcs = tuple(SourceData(f"s{k}", str(p), "jsonl", "text", float(w))
                 for k, (p, w) in enumerate(zip(paths, WEIGHTS, strict=True)))
    (run / "data").mkdir(parents=True, exist_ok=True)
    assets = split_assets(Assets(str(run), str(run / "assets"), srcs, str(run / "cache")),
                          Validation(fraction=0.3, seed=2), log=lambda *_: None)
    return assets, paths


def _by_source(stream: list[int], tok) -> list[int]:
    """Tokens of ``stream`` per source, told by their letters (an EOS counts for the document it ends)."""
    owner = {}
    for i in range(tok.tok.get_vocab_size()):
        letters = set(tok.tok.decode([i])) - {" "}
        hits = [k for k, a in enumerate(ALPHABETS) if letters and letters <= set(a)]
        if hits:
            owner[i] = hits[0]
    counts, last = [0] * len(ALPHABETS), None
    for t in stream:
        k = last if t == tok.eos_id else owner[t]
        counts[k] += 1
        last = k
    return counts


def job_llmc_stream(job, tokenizer, n_tokens: int) -> list[int]:
    """The torchtitan job's validation documents (its ``_validation_dataset``, in its order) written as llmc's
    trainers read them -- each encoded without special tokens, then EOS, no BOS -- the first n_tokens: comparable
    token for token with llmc.runtime.validation.validation_tokens."""
    ids: list[int] = []
    for row in job._validation_dataset(getattr(tokenizer, "tokenizer_path", job.ASSETS_DIR)):
        ids += tokenizer.tokenizer.encode(job._sample_text(row), add_special_tokens=False).ids + [tokenizer.eos_id]
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def test_validation_tokens_hold_each_sources_share_of_the_mixture(tmp_path, monkeypatch):
    """50/30/10/10: every source's tokens in the validation set are its weight's share within one document
    (the longest held-out document, EOS included); the old set was the first source's documents only. The
    torchtitan job's validation documents are the same, in the same order."""
    from test_torchtitan import OFFLINE, _import_job, write_build
    from test_torchtitan_render import TINY, compiled_for

    assets, paths = _four_sources(tmp_path)
    tok = assets.tokenizer()
    n = 8000
    srcs = validation_sources(assets)
    held = [[d for i, d in enumerate(json.loads(ln)["text"] for ln in p.read_text().splitlines())
             if is_heldout(f"s{k}", i, 2, 0.3)] for k, p in enumerate(paths)]
    longest = max(len(tok.encode(d)) + 1 for docs in held for d in docs)
    have = [sum(len(tok.encode(d)) + 1 for d in docs) for docs in held]
    assert all(h > n * w / sum(WEIGHTS) + longest for h, w in zip(have, WEIGHTS, strict=True))  # no source runs out
    stream = validation_tokens(srcs, tok, n).tolist()
    assert len(stream) == n
    counts = _by_source(stream, tok)
    for k, w in enumerate(WEIGHTS):
        assert abs(counts[k] - n * w / sum(WEIGHTS)) <= longest, (counts, longest)
    print(f"validation tokens by source (weights {WEIGHTS}): {counts} of {n}, longest document {longest}")

    # the torchtitan job reads the same documents in the same order
    pytest.importorskip("torchtitan")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    data = {"seq_len": 64, "tokens": 1e6, "sources": [
        {"name": f"s{k}", "path": str(p), "format": "jsonl", "text_field": "text", "weight": w}
        for k, (p, w) in enumerate(zip(paths, WEIGHTS, strict=True))]}
    c = compiled_for(model=TINY, plan=None, gpu="cpu", data=data,
                     eval={"validation": {"fraction": 0.3, "seed": 2, "every_steps": 4, "max_batches": 1}})
    monkeypatch.setenv("LLMC_RUN_DIR", assets.root)
    job = _import_job(write_build(c, tmp_path / "b"))
    titan_tok = job.LlmcTokenizer(tokenizer_path=assets.tokenizer_dir)
    assert job_llmc_stream(job, titan_tok, n) == stream
    # the integer shares the interleaving compares are the ones llmc computes, given to the job at build time (a
    # job that recomputed them from its normalised float shares rounded a half-millionth the other way for weights
    # such as 2.5 / 5 / 5 / 0.3, and from there took other documents)
    assert [s["val_parts"] for s in job.DATA_SOURCES] == validation_parts(srcs)
    odd = dict(data, sources=[dict(s, weight=w) for s, w in zip(data["sources"], (2.5, 5, 5, 0.3), strict=True)])
    c2 = compiled_for(model=TINY, plan=None, gpu="cpu", data=odd,
                      eval={"validation": {"fraction": 0.3, "seed": 2, "every_steps": 4, "max_batches": 1}})
    job2 = _import_job(write_build(c2, tmp_path / "b2"))
    assert [s["val_parts"] for s in job2.DATA_SOURCES] == mixture_parts([2.5, 5, 5, 0.3]) == [195312, 390625,
                                                                                              390625, 23438]


# ------------------------------------------------------------------------------------------ the job's reader


def _job_with_source(tmp_path, monkeypatch, path: Path):
    from test_torchtitan import OFFLINE, _import_job, make_assets, write_build
    from test_torchtitan_render import TINY, compiled_for

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    make_assets(tmp_path / "b" / "run", 600, n_docs=40, names=())
    data = {"seq_len": 16, "tokens": 1e6,
            "sources": [{"name": "web", "path": str(path), "format": "jsonl", "text_field": "text"}]}
    c = compiled_for(model=TINY, plan=None, gpu="cpu", data=data,
                     eval={"validation": {"fraction": 0.3, "seed": 1, "every_steps": 4, "max_batches": 1}})
    monkeypatch.setenv("LLMC_RUN_DIR", str(tmp_path / "b" / "run"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return _import_job(write_build(c, tmp_path / "b"))


def test_job_jsonl_reader_reads_a_bom_file_and_locates_a_bad_line(tmp_path, monkeypatch):
    """A UTF-8 BOM, blank lines and CRLF line ends: the job's documents (all, training part, held-out part)
    are llmc's; a malformed line stops it with one line naming file:line, what is wrong and a hint, worded as
    llmc's own reader words it (llmc.sources.jsonl_text), as a SystemExit (no traceback)."""
    pytest.importorskip("torchtitan")
    from llmc.runtime.stream import documents

    docs = [f"document {i} " + "ab " * (i % 5) for i in range(30)]
    good = tmp_path / "bom.jsonl"
    lines = [json.dumps({"text": d}) + ("\r\n\r\n" if i % 7 == 0 else "\r\n") for i, d in enumerate(docs)]
    good.write_bytes(b"\xef\xbb\xbf" + "".join(lines).encode())
    job = _job_with_source(tmp_path, monkeypatch, good)
    for part in (None, "train", "val"):
        ours = list(documents(SourceData("web", str(good), "jsonl", "text", 1.0,
                                         None if part is None else (part, 0.3, 1))))
        theirs = [r["text"] for r in job._source_dataset(job.DATA_SOURCES[0], part)]
        assert theirs == ours and (part is not None or theirs == docs), part

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n" + '{"text": "cut' + "\n")
    job = _job_with_source(tmp_path / "2", monkeypatch, bad)
    with pytest.raises(SystemExit) as e:
        list(job._source_dataset(job.DATA_SOURCES[0], None))
    msg = str(e.value.code)
    with pytest.raises(ValueError) as want:  # llmc's own reader on the same file
        list(documents(SourceData("web", str(bad), "jsonl", "text")))
    assert msg.endswith(str(want.value)) and "\n" not in msg, (msg, str(want.value))
    assert re.search(rf"{re.escape(str(bad))}:3: invalid JSON: .* hint: ", msg), msg


# ------------------------------------------------------------------------- torchtitan validates in its format


def _pack_by_hand(docs: list[str], tokenizer_dir: Path, seq_len: int, n_windows: int, shift: int = 0):
    """torchtitan 0.3.0's training format, built here from its description (hf_datasets/text_datasets.py
    HuggingFaceTextDataset.__iter__): each document encoded as BOS + text + EOS (special-token strings in the
    text are text, as the job's tokenizer reads them); inputs its tokens but the last, labels its tokens but
    the first, positions restarting at 0 at every document and at every window start; windows of seq_len in
    order, the first ``shift`` inputs and labels left out. (inputs, positions, labels, BOS id)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.encode_special_tokens = True
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    xs, ys = [], []
    for d in docs:
        t = [bos, *tok.encode(d, add_special_tokens=False).ids, eos]
        xs += t[:-1]
        ys += t[1:]
        if len(xs) >= n_windows * seq_len + shift:
            break
    x = torch.tensor(xs[shift:shift + n_windows * seq_len]).view(n_windows, seq_len)
    y = torch.tensor(ys[shift:shift + n_windows * seq_len]).view(n_windows, seq_len)
    # each input's distance from the latest document start (a BOS) or window start at or before it
    i = torch.arange(seq_len).expand_as(x)
    pos = i - torch.where((x == bos) | (i == 0), i, 0).cummax(dim=1).values
    return x, pos, y, bos


def _by_hand(run_dir: Path, name: str, fraction: float, seed: int, seq_len: int, n_windows: int,
             shift: int = 0):
    """The held-out documents of the run's JSONL source ``name`` (read from the file, split by the hash)
    packed in torchtitan's format (:func:`_pack_by_hand`)."""
    lines = [ln for ln in (run_dir / "data" / f"{name}.jsonl").read_text().splitlines() if ln.strip()]
    held = [json.loads(ln)["text"] for i, ln in enumerate(lines) if is_heldout(name, i, seed, fraction)]
    return _pack_by_hand(held, run_dir / "assets", seq_len, n_windows, shift)


@pytest.mark.slow
def test_torchtitan_validator_windows_are_its_training_format(tmp_path, monkeypatch):
    """The job's validation windows start with BOS, restart positions at every document, never label across a
    document, and are the held-out documents packed that way (built by hand), dealt to 2 data-parallel ranks
    as llmc deals its windows; the same number of windows as llmc's own validation set."""
    from test_validation import _titan_validation, _titan_windows
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from llmc.runtime.validation import build_validation_set

    c, cfg, assets = _titan_validation(tmp_path, monkeypatch)
    seq_len, mb = c.hyper.seq_len, c.plan.micro_batch
    run_dir = Path(assets.root)
    x, pos, y, bos = _by_hand(run_dir, "python-docs", 0.2, 5, seq_len, 2 * mb * 2)
    tok = HuggingFaceTokenizer(tokenizer_path=assets.tokenizer_dir)
    got = _titan_windows(cfg, tok, seq_len)
    assert len(got) == build_validation_set(assets, assets.tokenizer(), seq_len, mb, 2).batches == 2
    x0, p0, y0 = got[0]
    assert x0[0, 0] == bos and p0[0, 0] == 0 and (p0[x0 == bos] == 0).all()
    assert ((p0 == 0) == ((x0 == bos) | (torch.arange(seq_len) == 0))).all()  # restarts only at documents
    assert tok.eos_id in y0.flatten().tolist() and (y0 != bos).all()  # an EOS label ends a document; no BOS label
    assert torch.equal(torch.cat([b[0] for b in got]), x[:2 * mb]) and torch.equal(torch.cat([b[1] for b in got]),
                                                                                      pos[:2 * mb])
    assert torch.equal(torch.cat([b[2] for b in got]), y[:2 * mb])
    for r in range(2):  # batch b of rank r: windows (b * 2 + r) * mb ... + mb
        mine = _titan_windows(cfg, tok, seq_len, dp_rank=r, dp_size=2)
        want = torch.cat([x[(b * 2 + r) * mb:(b * 2 + r + 1) * mb] for b in range(2)])
        assert torch.equal(torch.cat([b[0] for b in mine]), want), r
