"""Measure the two rates of llmc.compiler.quality_math's dedup cost model and print them.

    python scripts/bench_quality.py

Times datasketch ``MinHash.update_batch`` (the per-document signature work of the near-dup pass)
over word 5-gram shingles of random documents for several ``num_perm`` values and fits
seconds/shingle = 1/SHINGLE_HASHES_PER_S + num_perm/PERM_UPDATES_PER_S by least squares.
Nothing is asserted; copy the printed figures into quality_math.py when the machine class changes.
"""

from __future__ import annotations

import random
import time

import numpy as np
from datasketch import MinHash

from llmc.compiler import quality_math as q


def shingles(rng: random.Random, words: int = 300, n: int = 5) -> list[bytes]:
    toks = [f"w{rng.randrange(50_000)}" for _ in range(words)]
    return [" ".join(toks[i:i + n]).encode() for i in range(words - n + 1)]


def main() -> None:
    rng = random.Random(0)
    docs = [shingles(rng) for _ in range(300)]
    per_doc = len(docs[0])
    xs, ys = [], []
    for num_perm in (16, 64, 128, 256, 512):
        MinHash(num_perm=num_perm)  # warm-up: permutation generation is per-process, not per document
        t0 = time.perf_counter()
        for _ in MinHash.generator(docs, num_perm=num_perm):
            pass
        dt = time.perf_counter() - t0
        per_shingle = dt / (len(docs) * per_doc)
        xs.append(num_perm)
        ys.append(per_shingle)
        print(f"num_perm {num_perm:4d}: {per_shingle * 1e9:8.1f} ns/shingle  ({len(docs) / dt:8.0f} docs/s of {per_doc} shingles)")
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    print(f"fitted SHINGLE_HASHES_PER_S = {1 / intercept:.3g}   (quality_math: {q.SHINGLE_HASHES_PER_S:.3g})")
    print(f"fitted PERM_UPDATES_PER_S   = {1 / slope:.3g}   (quality_math: {q.PERM_UPDATES_PER_S:.3g})")
    est = q.dedup_cpu_seconds(len(docs), per_doc, 128)
    print(f"model for this corpus at num_perm 128: {est.core_seconds:.3f} core-seconds")


if __name__ == "__main__":
    main()
