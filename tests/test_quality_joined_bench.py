"""Decontamination matches a benchmark item's fields joined (a question running into its answer, a question
followed by its gold choice) and, for an item shorter than the n-gram but of ``min_words`` words or more, the
item as a whole (GPT-3, arXiv:2005.14165: section 4 flags an example shorter than 13-grams that a document
overlaps whole; Appendix C uses N >= 8 on non-synthetic tasks, and N = 11 / 12 for ARC, its Table C.1)."""

from __future__ import annotations

import json
import random
import re

import pytest

pytest.importorskip("datasketch")

from llmc.quality import DecontamConfig, QualityConfig, QualitySource, run_quality  # noqa: E402
from llmc.quality.pipeline import build_benchmark_index  # noqa: E402
from llmc.quality.text import ngram_hash  # noqa: E402

# GSM8K-style items ({"question", "answer"}) with a bare numeric answer: 12 question words + 1 answer word (13
# words joined: exactly one 13-gram, which spans question -> answer) and 9 + 1 (10 words joined: a whole short
# item)
Q13 = "A baker makes 12 muffins an hour. How many in 5 hours?"
Q10 = "Tom has 3 red pens and 4 blue pens."
# an ARC-style item (made up, both layouts) whose 11-word question with its 1-word gold choice is 12 words
ARC_Q = "Which form of energy is produced when a rubber band vibrates?"
ARC_OPTIONS = ["chemical", "light", "electrical", "sound"]
ARC_AI2 = {"id": "Example_0001",
           "question": {"stem": ARC_Q, "choices": [{"text": t, "label": lab}
                                                   for t, lab in zip(ARC_OPTIONS, "ABCD", strict=True)]},
           "answerKey": "D"}
ARC_HF = {"id": "Example_0001", "question": ARC_Q, "choices": {"text": ARC_OPTIONS, "label": list("ABCD")},
          "answerKey": "D"}


def _words(text: str) -> list[str]:
    """Lowercased letter/digit runs, written independently of llmc.quality.text.words (ASCII test text)."""
    return re.findall(r"[a-z0-9_]+", text.lower())


def _filler(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) + str(rng.randrange(99))
                    for _ in range(n))


def _run(tmp_path, docs: list[str], bench_lines: list[str], name: str = "bench.jsonl", **dc):
    data = tmp_path / f"train-{name}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    bench = tmp_path / name
    bench.write_text("".join(line + "\n" for line in bench_lines))
    dcfg = DecontamConfig(benchmarks=(str(bench),), **dc)
    cfg = QualityConfig(exact=False, near_dup=None, decontaminate=dcfg)
    res = run_quality([QualitySource("train", str(data))], cfg, tmp_path / f"out-{name}")
    cont = res.sources["train"].removed["contaminated"]
    return res, {int(ex["id"].split("/")[1]): ex for ex in cont.examples}


def _qa_docs() -> list[str]:
    assert (len(_words(Q13)), len(_words(Q10)), len(_words(ARC_Q))) == (12, 9, 11)  # each under 13 alone
    rng = random.Random(3)
    docs = [_filler(rng, 40) for _ in range(8)]
    # a quiz / flash-card page: each question straight followed by its answer
    docs[1] = _filler(rng, 20) + f"\n{Q13}\n60 muffins.\n" + _filler(rng, 20)  # a 13-gram across the fields
    docs[3] = _filler(rng, 20) + f" {Q10.upper()} 7 pens in all. " + _filler(rng, 20)  # the whole 10 words
    docs[5] = _filler(rng, 15) + f" {ARC_Q}\nSound.\n" + _filler(rng, 15)  # question + gold choice
    # the questions and their answers, but not contiguous: other words come between
    docs[6] = _filler(rng, 10) + f" {Q13} {_filler(rng, 3)} A: 60 {Q10} {_filler(rng, 2)} 7"
    # the ARC question followed by a choice that is not the gold one
    docs[7] = _filler(rng, 10) + f" {ARC_Q} Answer: electrical " + _filler(rng, 10)
    return docs


def test_short_question_followed_by_its_answer_is_contamination(tmp_path):
    """GSM8K-style {"question", "answer"}: the 13-gram that crosses into the answer, and a 10-word item whole."""
    docs = _qa_docs()
    gsm = [json.dumps({"question": Q13, "answer": "60"}), json.dumps({"question": Q10, "answer": "7"})]
    res, hits = _run(tmp_path, docs, gsm, "gsm.jsonl")
    assert sorted(hits) == [1, 3]
    assert hits[1]["benchmark_item"] == "gsm.jsonl:1" and hits[1]["ngram"] == " ".join(_words(Q13) + ["60"])
    assert hits[3]["benchmark_item"] == "gsm.jsonl:2" and hits[3]["ngram"] == " ".join(_words(Q10) + ["7"])
    assert res.benchmarks["skipped_short"] == 0 and res.benchmarks["short_items"] == 1
    assert res.benchmarks["min_words"] == 8


def test_short_question_followed_by_its_gold_choice_is_contamination(tmp_path):
    """ARC in AI2's and Hugging Face's layouts (``answerKey`` naming a choice's ``label``) and MMLU's (an
    integer ``answer`` into ``choices``): the question with the gold choice, 12 words, is matched whole."""
    docs = _qa_docs()
    mmlu = {"question": ARC_Q, "subject": "physics", "choices": ARC_OPTIONS, "answer": 3}
    for name, rec in (("ARC-Easy-Test.jsonl", ARC_AI2), ("arc_hf.jsonl", ARC_HF), ("mmlu.jsonl", mmlu)):
        res, hits = _run(tmp_path, docs, [json.dumps(rec)], name)
        assert sorted(hits) == [5], name
        assert hits[5]["benchmark_item"] == f"{name}:1"
        assert hits[5]["ngram"] == " ".join(_words(ARC_Q) + ["sound"])
        assert res.sources["train"].kept_documents == len(docs) - 1


def test_short_items_match_whole_and_only_whole(tmp_path):
    long_item = "the quick brown fox jumps over the lazy dog near the old mill pond today"  # 15 words
    ten = "seven blind mice walked slowly across the wide green meadow"  # 10 words
    seven = "purple elephants rarely dance under silver moons"  # 7 words: under min_words
    # same first 8 words as `ten`, 12 words: two whole lengths behind one prefix
    twelve = "seven blind mice walked slowly across the wide river toward the farm"
    assert [len(_words(t)) for t in (long_item, ten, seven, twelve)] == [15, 10, 7, 12]
    rng = random.Random(5)
    docs = [_filler(rng, 30) for _ in range(9)]
    docs[0] = _filler(rng, 10) + " " + ten.title() + ". " + _filler(rng, 10)  # verbatim (other case): removed
    docs[1] = _filler(rng, 10) + " " + seven + " " + _filler(rng, 10)  # under min_words: kept
    docs[2] = _filler(rng, 10) + " " + " ".join(_words(ten)[:9])  # 9 of the 10 words, at the end: kept
    docs[3] = _filler(rng, 10) + " " + " ".join(_words(ten)[1:]) + " " + _filler(rng, 5)  # the last 9: kept
    docs[4] = _filler(rng, 10) + " " + ten.replace("across", "across all of")  # words interleaved: kept
    docs[5] = _filler(rng, 10) + " " + twelve  # the 12-word item at the very end of the document: removed
    docs[6] = _filler(rng, 10) + " " + " ".join(_words(long_item)[:12]) + " " + _filler(rng, 5)  # 12 of 15
    docs[7] = " ".join(_words(long_item)[2:]) + " " + _filler(rng, 5)  # a 13-gram of the long item: removed
    docs[8] = "Seven blind mice walked slowly across the wide " + _filler(rng, 10)  # the shared prefix: kept
    bench = [json.dumps({"text": t}) for t in (long_item, ten, seven, twelve)]
    res, hits = _run(tmp_path, docs, bench, "short.jsonl")
    assert sorted(hits) == [0, 5, 7]
    assert hits[0]["benchmark_item"] == "short.jsonl:2" and hits[0]["ngram"] == ten
    assert hits[5]["benchmark_item"] == "short.jsonl:4" and hits[5]["ngram"] == twelve
    assert hits[7]["benchmark_item"] == "short.jsonl:1"
    # the 7-word item is the one skipped; 2 items are matched whole (10 and 12 words)
    b = res.benchmarks
    assert (b["items"], b["skipped_short"], b["short_items"]) == (4, 1, 2)
    # min_words 7 matches the 7-word item too; min_words 11 leaves the 10-word one out
    _, hits = _run(tmp_path, docs, bench, "short7.jsonl", min_words=7)
    assert sorted(hits) == [0, 1, 5, 7]
    res, hits = _run(tmp_path, docs, bench, "short11.jsonl", min_words=11)
    assert sorted(hits) == [5, 7] and res.benchmarks["skipped_short"] == 2
    # text benchmark files (one item per line) take the same route
    res, hits = _run(tmp_path, docs, [long_item, ten, seven, twelve], "short.txt")
    assert sorted(hits) == [0, 5, 7] and res.benchmarks["skipped_short"] == 1


def test_join_indexes_ngrams_across_fields(tmp_path):
    """The index holds the n-grams of the fields joined, computed here from hand-split words: a superset of
    the per-field n-grams (each field's words stay contiguous in the join)."""
    q = "one two three four five six seven eight nine ten"
    a = "eleven twelve thirteen fourteen"
    (tmp_path / "b.jsonl").write_text(json.dumps({"q": q, "a": a, "id": "x_1"}) + "\n")

    def hashes(seq: list[str], n: int) -> set[int]:
        return {ngram_hash(seq[i:i + n]) for i in range(len(seq) - n + 1)}

    joined = _words(q) + _words(a) + ["x_1"]
    for n in (4, 13):
        idx = build_benchmark_index(DecontamConfig(benchmarks=(str(tmp_path / "b.jsonl"),), ngram=n))
        assert set(idx.grams) == hashes(joined, n) and idx.skipped_short == 0
        assert hashes(_words(q), n) | hashes(_words(a), n) <= set(idx.grams)
    # text_fields order sets the join's order: a then q, 14 words without the id
    idx = build_benchmark_index(DecontamConfig(benchmarks=(str(tmp_path / "b.jsonl"),), ngram=13,
                                               text_fields=("a", "q")))
    assert set(idx.grams) == hashes(_words(a) + _words(q), 13) and len(idx.grams) == 2 and idx.whole == {}


def test_spec_min_words_reaches_the_pipeline_config():
    from llmc.runtime.quality_prepare import quality_config
    from llmc.spec.schema import Quality

    q = Quality.model_validate({"decontaminate": {"benchmarks": ["a.jsonl"], "min_words": 5}})
    assert quality_config(q).decontaminate.min_words == 5
    default = Quality.model_validate({"decontaminate": {"benchmarks": []}})
    assert quality_config(default).decontaminate.min_words == 8
    with pytest.raises(ValueError, match="min_words"):
        build_benchmark_index(DecontamConfig(min_words=0))
