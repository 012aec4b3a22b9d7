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
    """Remove documents sharing any ``ngram``-word sequence with a benchmark item.

    13-grams follow GPT-3's contamination analysis (Brown et al. 2020, arXiv:2005.14165,
    Appendix C: a document is dirty when it shares any N-gram with an eval example; lm-evaluation-harness
    uses N = 13 throughout, docs/decontamination.md). Words are lowercased ``\\w+`` runs, so whitespace
    and punctuation do not matter. ``benchmarks`` are local files: ``.jsonl`` (each line one item) or
    text (each non-empty line one item). An item's text is every string leaf of its record, at any
    depth (objects and arrays are walked: AI2's ARC ``question.stem`` and ``question.choices[].text``, the
    Hugging Face ARC ``choices.text`` list), or of the fields ``text_fields`` names (a top-level key or
    a dotted path such as ``question.stem``). Each leaf is matched on its own, so ids, choice labels
    and answer keys ("A", "Mercury_7175875") are shorter than ``ngram`` words and add nothing, while long
    answer options are indexed too -- broader than lm-evaluation-harness, whose ARC task
    decontaminates on the question only (``doc_to_decontamination_query: "Question: {{question}}..."``,
    lm_eval/tasks/arc/arc_easy.yaml), and in the spirit of Llama 2's analysis (Touvron et al. 2023,
    arXiv:2307.09288, Appendix A.6), which matches n-grams of the evaluation sample, not of one field.
    Items without an ``ngram``-word leaf are skipped and counted in the report.
    """

    benchmarks: tuple[str, ...] = ()
    ngram: int = 13
    text_fields: tuple[str, ...] | None = None


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
