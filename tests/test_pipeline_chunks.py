"""Pinned pipeline chunks per rank (``parallelism.pp_virtual_stages``) and chunks of only the embedding or only the
norm and head (up to n_layers + 2 chunks, Megatron-LM's embedding / loss accounting in the pipeline split).

Checked against: torchtitan's own module split (the emitted job's module lists, split by torchtitan's
``_split_module``) and the plan the spec pins, through ``compile_spec`` and the lock.
"""

from __future__ import annotations

import pytest
from test_build_fakes import compile_text

SPEC = """name: t
model: llama3-8b
hardware: {gpu: h100-sxm, count: 16}
data: {seq_len: 4096, tokens: 20B}
training: {global_batch_tokens: 4194304}
parallelism: PINS
"""


def _compile(pins: str):
    return compile_text(SPEC.replace("PINS", pins))


def _errors(c) -> list:
    return [d for d in c.diagnostics if d.severity == "error"]


def test_pinned_chunks_per_rank_reach_the_plan_and_the_lock():
    from llmc.emit.lock import lock_dict

    c = _compile("{pp: 4, pp_schedule: Interleaved1F1B, pp_virtual_stages: 4}")
    assert not _errors(c), _errors(c)
    assert (c.plan.pp, c.plan.pp_schedule, c.plan.pp_virtual_stages) == (4, "Interleaved1F1B", 4)
    assert lock_dict(c)["plan"]["pp_virtual_stages"] == 4
    # without a schedule pin, 1 chunk per rank is 1F1B (when a pipeline is searched) and more is interleaved
    c = _compile("{pp: 2, pp_virtual_stages: 8}")
    assert (c.plan.pp_schedule, c.plan.pp_virtual_stages) == ("Interleaved1F1B", 8)
    c = _compile("{pp: 2, pp_virtual_stages: 1}")
    assert (c.plan.pp_schedule, c.plan.pp_virtual_stages) == ("1F1B", 1)


def test_up_to_two_chunks_more_than_blocks_and_the_torchtitan_split():
    """32 blocks over pp 2 x 17 chunks = 34: chunk 0 is the embedding alone, chunk 33 the norm and head alone; the
    job's module lists split the real torchtitan model into exactly those chunks."""
    pytest.importorskip("torchtitan")
    from llmc.compiler.memory import pipeline_chunks, pipeline_layout
    from llmc.emit.torchtitan import torchtitan_values

    c = _compile("{pp: 2, pp_schedule: Interleaved1F1B, pp_virtual_stages: 17}")
    assert not _errors(c), _errors(c)
    assert c.plan.pp_virtual_stages == 17
    chunks = pipeline_chunks(32, 2, "Interleaved1F1B", 17)
    assert chunks[0] == () and chunks[-1] == () and [len(x) for x in chunks[1:-1]] == [1] * 32
    # rank 0 holds chunks 0, 2, ..., 32 (the embedding, 16 blocks), rank 1 chunks 1, ..., 33 (16 blocks, the head)
    assert [(len(b), e, h) for b, e, h in pipeline_layout(32, 2, "Interleaved1F1B", 17)] == [(16, True, False),
                                                                                         (16, False, True)]
    fqns = torchtitan_values(c).ctx["pp_module_fqns"]
    assert fqns[0] == ["tok_embeddings"] and fqns[-1] == ["norm", "lm_head"] and len(fqns) == 34
    c = _compile("{pp: 2, pp_schedule: Interleaved1F1B, pp_virtual_stages: 18}")  # 36 chunks
    assert [(d.code, d.path) for d in _errors(c)] == [("P014", "parallelism.pp_virtual_stages")]
    assert "at most 17 chunks per rank" in _errors(c)[0].hint


@pytest.mark.parametrize("pins, says", [
    ("{pp: 2, pp_schedule: 1F1B, pp_virtual_stages: 2}", "which runs 1 chunk(s) per rank"),
    ("{pp: 2, pp_schedule: ZBVZeroBubble, pp_virtual_stages: 4}", "which runs 2 chunk(s) per rank"),
    ("{pp: 1, pp_virtual_stages: 2}", "without a pipeline"),
])  # fmt: skip
def test_chunk_counts_a_schedule_cannot_run_are_one_located_error(pins, says):
    errs = _errors(_compile(pins))
    assert [(d.code, d.path) for d in errs] == [("P014", "parallelism.pp_virtual_stages")], errs
    assert says in errs[0].message and errs[0].hint


def test_searched_chunk_count_stays_within_blocks_plus_two():
    """Unpinned: the search offers 2, 4 or 8 chunks per rank wherever pp x v <= n_layers + 2 (Llama 3.1 405B: 126
    blocks, so pp 16 x 8 = 128 is a candidate, pp 32 x 8 is not)."""
    from llmc.compiler.search import _schedules
    from llmc.spec.schema import Parallelism

    free = Parallelism()
    assert ("Interleaved1F1B", 8) in _schedules(16, 126, free)
    assert ("Interleaved1F1B", 8) not in _schedules(32, 126, free)
    assert _schedules(64, 126, Parallelism(pp_schedule="ZBVZeroBubble")) == [("ZBVZeroBubble", 2)]
    assert _schedules(2, 126, Parallelism(pp_virtual_stages=3)) == [("Interleaved1F1B", 3)]
