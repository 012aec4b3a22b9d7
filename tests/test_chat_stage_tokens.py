"""A chat stage's ``tokens`` and its steps: the plan says what a step reads in conversations / pairs / prompts (a
stage note and the typed ``examples`` of the stage's JSON), and the trainers measure at the stage's start what the
steps read of the data and the tokens those rows hold, with a ``warning[R013]`` when the stage trains less than half
its declared tokens or repeats its data more than 4 times (``llmc.runtime.stage_tokens``). The reviewer's case: 1,000
short two-turn conversations, tokens 100K at seq_len 128 and global_batch_tokens 2,048 -> 49 steps of 16 read 784
conversations holding ~21K trained tokens, with no word of it. Figures are checked against arithmetic on the spec's
and the test data's own numbers, and the trained-token count against the trainer's own batch (``pad_batch``)."""

from __future__ import annotations

import json
import math

import pytest

from llmc.compiler.compile import compile_spec
from llmc.runtime.stage_tokens import LOW_FILL, ROW_QUANTILE, row_figures, stage_token_use
from llmc.spec.load import loads_spec

SFT_GBT, SFT_SEQ, SFT_TOKENS = 3000, 128, 100_000  # 3000 / 128 = 23.4: the plan rounds to whole sequences
DPO_GBT, DPO_SEQ, DPO_TOKENS = 4096, 256, 50_000
GRPO_PROMPTS, GRPO_G, GRPO_STEPS, GRPO_PROMPT, GRPO_NEW = 6, 4, 7, 64, 32

SPEC = f"""\
name: t
model: tiny
hardware: {{gpu: cpu, count: 1}}
data:
  sources: [{{name: python-docs, format: builtin}}]
  seq_len: 128
  tokens: 300K
training: {{precision: fp32, global_batch_tokens: 4096}}
stages:
  - name: pre
    kind: pretrain
  - name: sft
    kind: sft
    init_from: pre
    global_batch_tokens: {SFT_GBT}
    data:
      sources: [{{name: c, kind: chat, format: builtin}}]
      seq_len: {SFT_SEQ}
      tokens: {SFT_TOKENS}
  - name: dpo
    kind: dpo
    init_from: sft
    global_batch_tokens: {DPO_GBT}
    data:
      sources: [{{name: p, kind: preference, format: builtin}}]
      seq_len: {DPO_SEQ}
      tokens: {DPO_TOKENS}
  - name: grpo
    kind: grpo
    init_from: dpo
    prompts_per_step: {GRPO_PROMPTS}
    grpo_group_size: {GRPO_G}
    max_prompt_tokens: {GRPO_PROMPT}
    max_new_tokens: {GRPO_NEW}
    steps: {GRPO_STEPS}
    data:
      sources: [{{name: q, kind: prompts, format: builtin}}]
      seq_len: {GRPO_PROMPT + GRPO_NEW}
      tokens: 50K
"""


@pytest.fixture(scope="module")
def compiled():
    run, lines = loads_spec(SPEC, file="t.yaml")
    return compile_spec(run, "t.yaml", lines)


def _expected():
    """(unit, per step, rows per record, steps, row tokens) of each chat stage, from the spec's numbers: a step of
    global_batch_tokens / seq_len records (sft, dpo), prompts_per_step prompts x G completions (grpo); steps =
    tokens / global_batch_tokens rounded up, GRPO's pinned."""
    return {
        "sft": ("conversations", round(SFT_GBT / SFT_SEQ), 1, math.ceil(SFT_TOKENS / SFT_GBT), SFT_SEQ),
        "dpo": ("pairs", round(DPO_GBT / DPO_SEQ), 2, math.ceil(DPO_TOKENS / DPO_GBT), DPO_SEQ),
        "grpo": ("prompts", GRPO_PROMPTS, GRPO_G, GRPO_STEPS, GRPO_PROMPT + GRPO_NEW),
    }


def test_the_plan_says_what_a_step_reads_in_records(compiled):
    stages = {s.name: s for s in compiled.stages}
    assert stages["pre"].examples is None  # pre-training packs documents into full rows
    for name, (unit, per_step, rows, steps, row_tokens) in _expected().items():
        s = stages[name]
        ex = s.examples
        assert s.steps == steps, name
        assert (ex.unit, ex.per_step, ex.rows_per_record, ex.rows_per_step) == (unit, per_step, rows, per_step * rows)
        assert ex.total == steps * per_step and ex.row_tokens == row_tokens
        assert ex.max_row_tokens == steps * per_step * rows * row_tokens
        note = next(n for n in s.notes if n.startswith("a step: "))
        assert f"{steps:,} steps read {steps * per_step:,} {unit}" in note, note
        assert "upper bound" in note and "R013" in note
    sft_note = next(n for n in stages["sft"].notes if n.startswith("a step: "))
    assert sft_note.startswith(f"a step: {round(SFT_GBT / SFT_SEQ)} conversations (global_batch_tokens {SFT_GBT:,} / "
                               f"seq_len {SFT_SEQ}; one per row, padded, not packed)")
    assert "rows x seq_len" in sft_note
    dpo_note = next(n for n in stages["dpo"].notes if n.startswith("a step: "))
    assert "each 2 rows, chosen and rejected" in dpo_note and "pairs x seq_len" in dpo_note
    grpo_note = next(n for n in stages["grpo"].notes if n.startswith("a step: "))
    assert grpo_note.startswith(f"a step: {GRPO_PROMPTS} prompts x {GRPO_G} completions = {GRPO_PROMPTS * GRPO_G} rows "
                                f"of up to {GRPO_PROMPT + GRPO_NEW} tokens")


def test_the_stage_json_has_the_examples_field(compiled):
    doc = json.loads(json.dumps(compiled.to_json()))
    by_name = {s["name"]: s for s in doc["stages"]}
    assert by_name["pre"]["examples"] is None
    for name, (unit, per_step, rows, steps, row_tokens) in _expected().items():
        assert by_name[name]["examples"] == {
            "unit": unit, "per_step": per_step, "rows_per_record": rows, "rows_per_step": per_step * rows,
            "row_tokens": row_tokens, "total": steps * per_step, "max_row_tokens": float(steps * per_step * rows
                                                                                       * row_tokens)}


# ----------------------------------------------------------------------------- the runtime's figures


def _nearest_rank(values, q):
    s = sorted(values)
    return s[math.ceil(q * len(s)) - 1]


def test_short_conversations_warn_with_the_steps_that_would_train_the_declared_tokens():
    """40 conversations of 30..110 tokens and some past seq_len, a third of each trained, 5 steps of 4 at seq_len
    128: half an epoch, the rows ~55% full, a fifth of the declared tokens trained."""
    seq_len, steps, per_step = 128, 5, 4
    lengths = [30, 40, 50, 60, 70, 80, 90, 100, 110, 200] * 4
    n = len(lengths)
    cut = [min(x, seq_len) for x in lengths]
    trained = [x // 3 for x in cut]
    use = stage_token_use("s", "conversations", available=n, steps=steps, per_step=per_step, seq_len=seq_len,
                          rows=[[x] for x in lengths], trained=trained)
    read = steps * per_step
    mean, mean_trained = sum(cut) / n, sum(trained) / n
    declared = read * seq_len
    assert (use.read, use.epochs, use.declared_tokens) == (read, read / n, declared)
    assert use.read_tokens == pytest.approx(read * mean) and use.read_trained == pytest.approx(read * mean_trained)
    assert use.fill == pytest.approx(read * mean / declared) and use.longest_row == seq_len
    assert read * mean >= LOW_FILL * declared > read * mean_trained  # the rows half full; the trained tokens not
    assert len(use.warnings) == 1
    w = use.warnings[0]
    need = math.ceil(declared / (per_step * mean_trained))
    assert need <= 4 * n // per_step  # within 4 epochs: the steps that train the declared tokens
    assert f"set the stage's steps to {need:,}" in w and f"{read * mean_trained / declared:.0%} of the declared" in w
    assert f"({need * per_step / n:.1f} epochs of the {n} conversations)" in w
    assert _nearest_rank(cut, ROW_QUANTILE) == seq_len and "or seq_len" not in w  # 10% of the rows fill seq_len
    assert f"{n} conversations; {steps} steps x {per_step} read {read} ({read / n:.2f} epochs)" in use.line
    assert f"~{read * mean:,.0f} tokens (~{read * mean_trained:,.0f} trained)" in use.line


def test_more_steps_than_4_epochs_allow_are_capped_and_a_shorter_seq_len_is_offered():
    seq_len, steps, per_step, n = 512, 20, 8, 50
    lengths = [40 + (i % 7) for i in range(n)]
    use = stage_token_use("s", "conversations", available=n, steps=steps, per_step=per_step, seq_len=seq_len,
                          rows=[[x] for x in lengths], trained=[x - 10 for x in lengths])
    epochs = steps * per_step / n
    cap = math.floor(4 * n / per_step)
    assert epochs == 3.2 and not any("times" in w for w in use.warnings)
    need = math.ceil(steps * per_step * seq_len / (per_step * (sum(lengths) - 10 * n) / n))
    assert need > cap
    w = use.warnings[0]
    assert f"at most {cap:,} steps (4 epochs)" in w
    fit = _nearest_rank(lengths, ROW_QUANTILE)
    assert f"or seq_len {fit:,}" in w and f"holds {per_step * seq_len // fit:,} conversations a step" in w


def test_more_than_4_epochs_is_an_r013_on_its_own():
    use = stage_token_use("s", "prompts", available=3, steps=10, per_step=2, seq_len=None, rows_per_record=8)
    assert use.epochs == pytest.approx(20 / 3) and use.read_tokens is None and len(use.warnings) == 1
    assert "6.7 times" in use.warnings[0] and "steps to 6 (4 epochs)" in use.warnings[0]  # floor(4 x 3 / 2)


def test_full_rows_say_nothing():
    use = stage_token_use("s", "conversations", available=8, steps=4, per_step=4, seq_len=64,
                          rows=[[60]] * 8, trained=[40] * 8)
    assert use.warnings == [] and use.fill == pytest.approx(60 / 64)


def test_a_dpo_pair_is_two_rows_that_the_declared_tokens_count_as_one():
    """Pairs of 2 rows: the rows' fill over 2 x seq_len per pair; the trained tokens compared per row."""
    seq_len, steps, per_step = 100, 3, 4
    rows = [(30, 50)] * 20
    trained = [20 + 40] * 20
    use = stage_token_use("s", "pairs", available=20, steps=steps, per_step=per_step, seq_len=seq_len, rows=rows,
                          trained=trained, rows_per_record=2)
    read = steps * per_step
    assert use.read_tokens == read * 80 and use.fill == pytest.approx(read * 80 / (read * 2 * seq_len))
    per_row_trained = 60 / 2  # 30 of the 100 a pair counts as in the declared tokens
    assert per_row_trained < LOW_FILL * seq_len and len(use.warnings) == 1
    need = math.ceil(read * seq_len / (per_step * per_row_trained))
    assert f"steps to {need:,}" in use.warnings[0] and f"in {2 * read:,} rows" in use.warnings[0]


def test_row_figures_count_what_the_trainer_trains():
    """row_figures' trained tokens = the targets the trainer's batch holds (pad_batch, next_token_targets)."""
    torch = pytest.importorskip("torch")
    from llmc.runtime.chat import IGNORE_INDEX
    from llmc.runtime.sft import next_token_targets, pad_batch

    seqs = [(list(range(10)), [IGNORE_INDEX] * 4 + list(range(4, 10))),
            (list(range(20)), [IGNORE_INDEX] * 5 + list(range(5, 12)) + [IGNORE_INDEX] * 3 + list(range(15, 20)))]
    for seq_len in (8, 12, 64, None):
        toks, trained = row_figures(seqs, seq_len)
        for (ids, lab), n, t in zip(seqs, toks, trained, strict=True):
            _, labels = pad_batch([(ids, lab)], 0, seq_len)
            assert n == labels.shape[1]
            assert t == int((next_token_targets(labels) != IGNORE_INDEX).sum()), (seq_len, t)
    assert torch is not None


def test_train_sft_says_r013_at_the_stage_start(capsys):
    """The call site: train_sft on short conversations prints the line and the located R013 on standard error, and
    logs the figures as a ``stage_tokens`` event."""
    torch = pytest.importorskip("torch")
    from llmc.runtime.model import build_model
    from llmc.runtime.sft import encode_conversations, train_sft
    from llmc.runtime.synthetic import ByteTokenizer, chat_examples
    from llmc.spec.model import Architecture

    torch.manual_seed(0)
    tok = ByteTokenizer()
    arch = Architecture(name="t", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64,
                        vocab_size=tok.vocab_size, max_seq_len=512)
    ex = encode_conversations(chat_examples(12, seed=1), tok)
    seq_len = 512
    assert max(len(ids) for ids, _ in ex) < seq_len // 2  # conversations far shorter than the rows

    class Log:  # the stage's metrics logger (llmc.runtime.posttrain._Log): it names the stage
        stage = "mysft"

        def __call__(self, step, stats):
            pass

    train_sft(build_model(arch, seed=0), ex, steps=2, lr=1e-3, batch_size=4, pad_id=tok.pad_id, max_len=seq_len,
              log=Log())
    out, err = capsys.readouterr()
    read, trained = 2 * 4, sum(sum(t != -100 for t in lab[1:]) for _, lab in ex)
    whole = sum(len(ids) for ids, _ in ex)
    assert (f"stage mysft: 12 conversations; 2 steps x 4 read {read} ({read / 12:.2f} epochs); their {read} rows hold "
            f"~{read * whole / 12:,.0f} tokens (~{read * trained / 12:,.0f} trained)") in out
    lines = [ln for ln in err.splitlines() if "R013" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"stage mysft: warning[R013] the {read} conversations"), err
    assert f"of the declared {2 * 4 * seq_len:,}" in lines[0] and torch is not None
