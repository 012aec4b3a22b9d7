"""Decontamination indexes every string leaf of a benchmark record, joined: nested layouts (AI2's ARC jsonl,
the Hugging Face ARC rows) are matched like flat ones."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("datasketch")

from llmc.quality import DecontamConfig, QualityConfig, QualitySource, run_quality  # noqa: E402
from llmc.quality.pipeline import build_benchmark_index  # noqa: E402

# ARC-Challenge test item Mercury_7175875, as AI2 ships it (ARC-V1-Feb2018, ARC-Challenge-Test.jsonl) and as
# the Hugging Face ``allenai/ai2_arc`` rows hold it (choices as parallel text / label lists)
STEM = ("An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely "
        "effect of this increase in rotation?")
OPTIONS = ["Planetary density will decrease.", "Planetary years will become longer.",
           "Planetary days will become shorter.", "Planetary gravity will become stronger."]
AI2 = {"id": "Mercury_7175875",
       "question": {"stem": STEM, "choices": [{"text": t, "label": lab} for t, lab in zip(OPTIONS, "ABCD", strict=True)]},
       "answerKey": "C"}
HF = {"id": "Mercury_7175875", "question": STEM, "choices": {"text": OPTIONS, "label": list("ABCD")},
      "answerKey": "C"}
STEM_WORDS = 23  # An astronomer observes ... in rotation (counted by hand)


def _filler(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) + str(rng.randrange(99))
                    for _ in range(n))


def _w(text: str) -> list[str]:
    """The item's words split by hand (its only punctuation is ". " and "?")."""
    return text.lower().replace(".", " ").replace("?", " ").split()


def _grams(seqs: list[list[str]], n: int) -> set[tuple[str, ...]]:
    return {tuple(w[i:i + n]) for w in seqs for i in range(len(w) - n + 1)}


def test_arc_item_ngrams_are_indexed(tmp_path):
    """An item is indexed as its string leaves joined in record order (AI2: each option followed by its label;
    HF: the options, then the labels), plus its stem followed by the gold option (``answerKey`` "C")."""
    assert len(_w(STEM)) == STEM_WORDS
    gold = _w(STEM + " " + OPTIONS[2])
    labelled = [f"{t} {lab}" for t, lab in zip(OPTIONS, "ABCD", strict=True)]
    joins = {"ai2.jsonl": _w(" ".join(["Mercury_7175875", STEM, *labelled, "C"])),
             "hf.jsonl": _w(" ".join(["Mercury_7175875", STEM, *OPTIONS, "A B C D", "C"]))}
    for name, rec in (("ai2.jsonl", AI2), ("hf.jsonl", HF)):
        (tmp_path / name).write_text(json.dumps(rec) + "\n")
        # 1 id + 23 stem + 19 option words + 4 labels + 1 key = 48 words joined
        assert len(joins[name]) == 48
        idx = build_benchmark_index(DecontamConfig(benchmarks=(str(tmp_path / name),), ngram=13))
        # the stem + gold option (28 words, 16 13-grams) shares with the join the stem's 11 13-grams and the
        # one ending in "planetary" (option A starts "Planetary" too); its 4 reaching into option C are new
        expect = _grams([joins[name], gold], 13)
        assert len(expect) == (48 - 12) + (len(gold) - 12) - 12
        assert (len(idx.grams), idx.items, idx.skipped_short) == (len(expect), [f"{name}:1"], 0)
        assert idx.whole == {}
        idx4 = build_benchmark_index(DecontamConfig(benchmarks=(str(tmp_path / name),), ngram=4))
        assert len(idx4.grams) == len(_grams([joins[name], gold], 4))
    # text_fields: a top-level key or a dotted path into the nested record, joined in text_fields order; no
    # gold text (the fields named are the item)
    q_ai2 = _w(" ".join([STEM, *labelled]))
    for fields, seq in ((("question.stem",), _w(STEM)), (("question",), q_ai2), (("answerKey", "id"), []),
                        (("question.choices.text",), _w(" ".join(OPTIONS)))):
        idx = build_benchmark_index(DecontamConfig(benchmarks=(str(tmp_path / "ai2.jsonl"),), text_fields=fields))
        assert len(idx.grams) == len(_grams([seq], 13)), fields
        assert idx.skipped_short == (fields == ("answerKey", "id")), fields  # 2 words, under min_words = 8
    idx = build_benchmark_index(DecontamConfig(benchmarks=(str(tmp_path / "hf.jsonl"),), ngram=4,
                                               text_fields=("choices.text",)))
    assert len(idx.grams) == len(_grams([_w(" ".join(OPTIONS))], 4)) == 19 - 3


def test_training_doc_quoting_an_arc_stem_is_removed(tmp_path):
    rng = random.Random(0)
    docs = [_filler(rng, 80) for _ in range(6)]
    # doc 2 quotes the stem in a quiz page (other case, line breaks, an option list after it)
    docs[2] = (_filler(rng, 30) + "\nQuiz 4. " + STEM.replace(" planet ", "\nplanet ").upper() + "\n(A) "
               + "\n(B) ".join(OPTIONS) + " " + _filler(rng, 20))
    # doc 4 holds only the short options and labels: no 13 consecutive words of the item
    docs[4] = _filler(rng, 20) + " A. " + " C. ".join(OPTIONS) + " answer C Mercury_7175875 " + _filler(rng, 20)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    for name, rec in (("ARC-Challenge-Test.jsonl", AI2), ("arc_hf.jsonl", HF)):
        bench = tmp_path / name
        bench.write_text(json.dumps(rec) + "\n")
        cfg = QualityConfig(exact=True, near_dup=None, decontaminate=DecontamConfig(benchmarks=(str(bench),)))
        res = run_quality([QualitySource("train", str(data))], cfg, tmp_path / f"out-{name}")
        cont = res.sources["train"].removed["contaminated"]
        assert cont.documents == 1 and cont.characters == len(docs[2]), name
        ex = cont.examples[0]
        assert ex["id"] == "train/2" and ex["benchmark_item"] == f"{name}:1"
        assert ex["ngram"] in " ".join(STEM.lower().replace(".", "").replace("?", "").split())
        assert res.sources["train"].kept_documents == 5


def test_string_leaves_walks_any_depth_in_document_order():
    """Every string of an item in document order (object values, array items; keys and numbers are not text), at a
    nesting depth past Python's recursion limit (a hostile benchmark file is not a traceback)."""
    import sys

    from llmc.quality.text import string_leaves

    assert list(string_leaves({"id": "a1", "q": {"stem": "x", "choices": [{"text": "y", "n": 1}, "z"]}, "k": ["w"]})) \
        == ["a1", "x", "y", "z", "w"]
    deep: object = "leaf"
    for _ in range(sys.getrecursionlimit() * 2):
        deep = [deep]
    assert list(string_leaves(deep)) == ["leaf"]
