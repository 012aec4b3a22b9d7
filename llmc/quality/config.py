"""Typed configuration of the data-quality pipeline (plain dataclasses; the spec layer maps YAML onto them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmc.compiler.quality_math import Banding, banding, optimal_bands
from llmc.sources import SourceRef

#: One local source (``text`` / ``jsonl`` / ``parquet`` / ``hf`` save_to_disk), the runtime's source reference.
QualitySource = SourceRef


@dataclass(frozen=True)
class NearDupConfig:
    """MinHash near-duplicate removal (datasketch ``MinHash`` + ``MinHashLSH``).

    Defaults are datatrove's ``MinhashConfig`` (word 5-grams, 14 buckets x 8 hashes = 112
    permutations; https://github.com/huggingface/datatrove, ``pipeline/dedup/minhash.py``), the
    setting of FineWeb (Penedo et al. 2024, arXiv:2406.17557): its S-curve passes 1/2 at Jaccard
    0.685, the MMDS estimate (1/b)^(1/r) is 0.72, and a pair at 0.8 is caught with probability
    0.924. ``bands``/``rows`` = None picks them with
    :func:`llmc.compiler.quality_math.optimal_bands` for ``threshold`` (datasketch's own rule);
    given explicitly, they set which pairs become LSH candidates (the reported false-positive/negative
    areas are at ``threshold``). Every candidate pair is then checked: it is a near duplicate only when
    its estimated Jaccard (MinHash signature agreement) is at least ``threshold``.
    Word 5-grams follow Lee et al. 2022 ("Deduplicating Training Data Makes Language Models
    Better", arXiv:2107.06499, section 4.2), who used 9,000 permutations in 450 bands of 20 rows
    at Jaccard 0.8 (``NearDupConfig(threshold=0.8, num_perm=9000, bands=450, rows=20)``).
    """

    threshold: float = 0.75
    num_perm: int = 112
    ngram: int = 5
    bands: int | None = 14
    rows: int | None = 8
    seed: int = 1
    fp_weight: float = 0.5
    fn_weight: float = 0.5

    def banding(self) -> Banding:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"near_dup.threshold must be in (0, 1), got {self.threshold}")
        if self.ngram < 1 or self.num_perm < 2:
            raise ValueError("near_dup.ngram must be >= 1 and near_dup.num_perm >= 2")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("near_dup.bands and near_dup.rows must be given together (or both omitted)")
        if self.bands is None or self.rows is None:
            return optimal_bands(self.threshold, self.num_perm, self.fp_weight, self.fn_weight)
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"near_dup.bands x rows = {self.bands * self.rows} > num_perm {self.num_perm}")
        return banding(self.threshold, self.bands, self.rows)


@dataclass(frozen=True)
class DecontamConfig:
    """Remove documents that contain a benchmark item: any ``ngram``-word sequence of it, or, for an item
    shorter than ``ngram`` words but of ``min_words`` or more, its whole word sequence.

    13-grams follow GPT-3's contamination analysis (Brown et al. 2020, arXiv:2005.14165, Appendix C: a
    document is dirty when it shares any N-gram with an eval example; lm-evaluation-harness uses N = 13
    throughout, docs/decontamination.md). Short items follow the same paper: section 4 also flags an example
    "shorter than 13-grams" that a training document overlaps as a whole, and Appendix C sets N per dataset to
    the 5th percentile example length with a minimum of 8 on non-synthetic tasks "due to spurious collisions
    at lower values of N" (N = 8 for PIQA, OpenBookQA and WebQs in its Table C.1); examples under 8 words were
    ignored. So ``min_words`` = 8: an item of 8 to 12 words is matched whole, a shorter one is never matched
    and is counted in the report's ``skipped_short``.

    Words are lowercased ``\\w+`` runs, so whitespace and punctuation do not matter. ``benchmarks`` are local
    files: ``.jsonl`` (each line one item) or text (each non-empty line one item). An item's text is its
    pieces joined in order, one space between them (:func:`llmc.quality.text.benchmark_items`): every string
    leaf of its record, at any depth (objects and arrays are walked: AI2's ARC ``question.stem`` and
    ``question.choices[].text``, the Hugging Face ARC ``choices.text`` list), or of the fields ``text_fields``
    names, in that order (a top-level key or a dotted path such as ``question.stem``). Joined, an n-gram may
    run from the question into the answer, as on a quiz or flash-card page that leaks a test item (the
    question, then its answer); every n-gram of a single field is still one of the join. Words a page puts
    between the two ("Answer:") break that run, so such a page is found through a question of ``ngram`` words
    or more, not through a shorter one. Ids, choice labels and answer keys ("Mercury_7175875", "A") stay in
    the join, where they only break the n-grams that cross them; a short record with an id leaf is therefore
    matched whole only with its id, so name its text fields (``text_fields=("question", "answer")``). A
    multiple-choice record that names its gold choice (``answerKey`` = a choice's ``label``, or an integer
    ``answer`` into ``choices``; :func:`llmc.quality.text.gold_choice`) is also matched by its question joined
    with the gold answer, the way a page that answers it reads. Broader than lm-evaluation-harness, whose ARC
    task decontaminates on the question only (``doc_to_decontamination_query: "Question: {{question}}..."``,
    lm_eval/tasks/arc/arc_easy.yaml), and in the spirit of Llama 2's analysis (Touvron et al. 2023,
    arXiv:2307.09288, Appendix A.6), which matches n-grams of the evaluation sample, not of one field.
    """

    benchmarks: tuple[str, ...] = ()
    ngram: int = 13
    text_fields: tuple[str, ...] | None = None
    min_words: int = 8


@dataclass(frozen=True)
class QualityConfig:
    """What the pipeline removes, and how it is parallelised.

    ``workers`` processes work on ``shards`` shards per source (default: ``workers``); shard i of
    n holds the documents whose index in the source is i mod n. Neither changes the result: the
    cleaned sources keep their documents' order and are the same bytes for any ``workers`` / ``shards``.
    """

    exact: bool = True
    near_dup: NearDupConfig | None = field(default_factory=NearDupConfig)
    decontaminate: DecontamConfig | None = None
    workers: int = 1
    shards: int | None = None
    max_examples: int = 10

    def num_shards(self) -> int:
        n = self.shards if self.shards is not None else self.workers
        if n < 1 or self.workers < 1:
            raise ValueError("workers and shards must be >= 1")
        return n
