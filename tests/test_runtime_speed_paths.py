"""The runtime's data paths do each rank's own work only, and read what they read exactly as before.

* ``hf`` sources (a ``datasets`` ``save_to_disk`` folder): a rank's rows are those that ``datasets`` itself deals
  (``split_dataset_by_node`` over ``Dataset.to_iterable_dataset(num_shards)``, run here as the reference), computed
  without building the ``world`` shards in every sequence slot.
* ``parquet`` with fewer row groups than ranks (rows dealt ``i % world``): only the rank's rows become Python
  strings; the reference reads the whole table with ``pyarrow.parquet.read_table``.
* ``parquet`` footers are read once per process, not once per sequence slot at every epoch and resume.

No timings here: ``scripts/bench_data_paths.py`` measures them.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("torch")

import llmc.runtime.stream as stream  # noqa: E402
from llmc.runtime.data import SourceData  # noqa: E402
from llmc.runtime.stream import SourceRef, deal_row_groups, documents  # noqa: E402
from llmc.runtime.validation import is_heldout  # noqa: E402


def text(i: int) -> str:
    return f"doc {i} " + "words " * (i % 7)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return datasets


def library_rows(datasets, path: Path, rank: int, world: int) -> list:
    """What ``datasets`` deals rank ``rank`` of ``world``: the library's own split of its own iterable dataset."""
    from datasets.distributed import split_dataset_by_node

    ds = datasets.load_from_disk(str(path))
    ids = ds.to_iterable_dataset(num_shards=world if len(ds) >= world else 1)
    return [r["text"] for r in split_dataset_by_node(ids, rank=rank, world_size=world)]


@pytest.mark.parametrize("n", [5, 64, 97])
def test_hf_rows_are_the_ones_split_dataset_by_node_deals(n, tmp_path, hf_cache):
    datasets = hf_cache
    d = tmp_path / "hf"
    texts = [text(i) if i % 13 else None for i in range(n)]  # a null row is the empty document
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(d), num_shards=3)
    src = SourceRef("h", str(d), "hf")
    for world in (1, 2, 3, 8, 64):
        for rank in (range(world) if world < 64 else (0, 1, 32, 33, 63)):
            want = ["" if t is None else t for t in library_rows(datasets, d, rank, world)]
            assert list(documents(src, rank, world)) == want, (world, rank)
            for start in (1, len(want) // 2, len(want), len(want) + 3):  # resume positions
                assert list(documents(src, rank, world, start)) == want[start:], (world, rank, start)


def test_hf_opening_a_rank_does_not_build_every_ranks_shard(tmp_path, hf_cache, monkeypatch):
    """Each of a rank's sequence slots opens its stream (at start, every epoch, every resume): building all
    ``world`` shards there made a stage's start O(world^2) ``Dataset.shard`` calls per rank."""
    datasets = hf_cache
    d = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": [text(i) for i in range(200)]}).save_to_disk(str(d))
    world = 16
    want = [library_rows(datasets, d, r, world)[3] for r in range(world)]
    calls = []
    real = datasets.Dataset.shard
    monkeypatch.setattr(datasets.Dataset, "shard", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    assert [next(documents(SourceRef("h", str(d), "hf"), r, world, 3)) for r in range(world)] == want
    assert len(calls) <= world, f"{len(calls)} Dataset.shard calls to open {world} ranks"


def write_one_group_files(d: Path, n: int, files: int) -> list[str]:
    d.mkdir(parents=True)
    per = -(-n // files)
    for f in range(files):
        pq.write_table(pa.table({"text": [text(i) for i in range(f * per, min(n, (f + 1) * per))]}),
                       d / f"p{f}.parquet", row_group_size=1000)  # one row group per file
    return [text(i) for i in range(n)]


@pytest.mark.parametrize("holdout", [None, ("train", 0.2, 3), ("val", 0.2, 3)])
def test_parquet_fewer_row_groups_than_ranks_reads_rows_i_mod_world(holdout, tmp_path):
    d = tmp_path / "pq"
    write_one_group_files(d, 130, files=3)
    src = SourceData("few", str(d), "parquet", "text", 1.0, holdout)
    rows = pq.read_table(sorted(d.glob("*.parquet"))[0]).column("text").to_pylist()
    for f in sorted(d.glob("*.parquet"))[1:]:
        rows += pq.read_table(f).column("text").to_pylist()

    def kept(i: int) -> bool:
        return holdout is None or is_heldout("few", i, holdout[2], holdout[1]) == (holdout[0] == "val")

    for world in (4, 7):
        for rank in range(world):
            want = [rows[i] for i in range(len(rows)) if i % world == rank and kept(i)]
            assert list(documents(src, rank, world)) == want
            for start in (1, 5, 11, len(want), len(want) + 2):
                assert list(documents(src, rank, world, start)) == want[start:], (world, rank, start)


def test_parquet_fewer_row_groups_than_ranks_converts_only_the_ranks_rows(tmp_path, monkeypatch):
    d = tmp_path / "pq"
    write_one_group_files(d, 300, files=2)
    converted = []
    real = stream.doc_text
    monkeypatch.setattr(stream, "doc_text", lambda v, *a: converted.append(v) or real(v, *a))
    docs = list(islice(documents(SourceRef("few", str(d), "parquet"), 3, 8), 10))
    assert docs == [text(3 + 8 * k) for k in range(10)]
    assert len(converted) == 10, f"{len(converted)} rows converted to read 10 documents"
    converted.clear()
    assert list(documents(SourceRef("few", str(d), "parquet"), 3, 8, 30)) == [text(i) for i in range(243, 300, 8)]
    assert len(converted) == 8, f"{len(converted)} rows converted to resume at document 30 and read 8"


def test_parquet_footers_are_read_once_per_process(tmp_path, monkeypatch):
    """Every sequence slot lists the source's row groups when its stream opens; the footers are read once."""
    d = tmp_path / "pq"
    d.mkdir()
    n, files, group = 600, 3, 25
    for f in range(files):
        pq.write_table(pa.table({"text": [text(i) for i in range(f * 200, (f + 1) * 200)]}), d / f"p{f}.parquet",
                       row_group_size=group)
    opened = []
    real = pq.ParquetFile

    class Counting(real):
        def __init__(self, *a, **k):
            opened.append(a[0])
            super().__init__(*a, **k)

    monkeypatch.setattr(pq, "ParquetFile", Counting)
    getattr(stream, "_parquet_row_groups", None) and stream._parquet_row_groups.cache_clear()
    world = 16
    src = SourceRef("pq", str(d), "parquet")
    groups = deal_row_groups([group] * (n // group), world)  # 24 groups of 25 rows, in source order
    first = [next(documents(src, r, world)) for r in range(world)]
    assert first == [text(groups[r][0] * group) for r in range(world)]
    # the footers once (3 files), then one open file per slot reading its first row group
    assert len(opened) <= files + world, f"{len(opened)} ParquetFile opens for {world} slots over {files} files"
    # a file that changes is listed again
    pq.write_table(pa.table({"text": [text(i) for i in range(400, 500)]}), d / "p2.parquet", row_group_size=10)
    rows = pq.read_table(d / "p0.parquet").column("text").to_pylist() + \
        pq.read_table(d / "p1.parquet").column("text").to_pylist() + [text(i) for i in range(400, 500)]
    sizes = [25] * 16 + [10] * 10
    firsts = [sum(sizes[:g]) for g in range(len(sizes))]
    for r in range(world):
        want = [rows[i] for g in deal_row_groups(sizes, world)[r] for i in range(firsts[g], firsts[g] + sizes[g])]
        assert list(documents(src, r, world)) == want
        assert list(documents(src, r, world, 7)) == want[7:]
