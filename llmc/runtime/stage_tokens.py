"""What a chat stage's steps read of its data (sft / dpo / grpo), measured when the stage starts.

The plan sizes a chat stage by ``tokens``: steps = tokens / global_batch_tokens, a step holding global_batch_tokens /
seq_len records (``llmc.compiler.stages.stage_examples``). llmc's chat trainers do not pack: each conversation (SFT),
each side of a preference pair (DPO: chosen, rejected) is its own row, right-padded to the batch's longest and cut at
seq_len (``llmc.runtime.sft.pad_batch``). So ``tokens`` counts every row as full, an upper bound on what the stage
trains: the reviewer's 1,000 conversations of ~68 tokens (~27 of them the assistant's) at seq_len 128 fill half the
rows the plan counts and train a fifth of its tokens. :func:`stage_token_use` (pure, no torch) takes the records' rows
as the trainer encoded them and says, in one line: the records available, the records the steps read (steps x per
step, as epochs of the available ones), the tokens those rows hold (whole rows, and the trained ones: labels that are
not -100, the assistant mask where it applies) against the declared tokens. Its ``warnings`` are the
``warning[R013]`` lines (standard error, the run goes on): the tokens the steps train (the trained ones; the rows'
where those are not known) are less than :data:`LOW_FILL` of the declared tokens -- with the steps that would train
them at the measured mean, capped at :data:`llmc.compiler.checks.MAX_EPOCHS` epochs of the data, or a shorter
seq_len --, or the steps read the records more than MAX_EPOCHS times. A DPO pair is 2 rows (chosen, rejected) that
the declared tokens count as one: its figures are compared per row. The tokens the steps read are expectations at
the records' mean (the draws are a fresh permutation per epoch, ``llmc.runtime.sft.EpochOrder``: whole epochs are
exact).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# MAX_EPOCHS: Muennighoff et al. 2023 (arXiv:2305.16264), ~4 epochs of repeated data are almost as good as new
from llmc.compiler.checks import MAX_EPOCHS
from llmc.runtime.chat import IGNORE_INDEX

#: R013 when the tokens the steps train are less than this share of the stage's declared tokens (llmc's threshold:
#: the plan's time and cost, priced at full rows, are then more than twice what the stage trains)
LOW_FILL = 0.5
#: the seq_len R013 suggests covers this share of the rows whole (nearest-rank percentile of their lengths)
ROW_QUANTILE = 0.99


@dataclass(frozen=True)
class StageTokenUse:
    """A chat stage's records against its steps (:func:`stage_token_use`). Token figures are None where the rows'
    tokens are not known before training (GRPO's completions are sampled)."""

    stage: str
    unit: str  # conversations / pairs / prompts
    available: int  # records the stage's data holds
    steps: int
    per_step: int  # records per step
    read: int  # steps x per_step
    epochs: float  # read / available
    rows_per_record: int  # 1 (sft), 2 (dpo), the group size (grpo)
    seq_len: int | None  # the rows' cut (None: not cut)
    declared_tokens: float | None  # the plan's tokens: a record counted as one full row of seq_len
    mean_tokens: float | None = None  # a record's rows' tokens (each cut at seq_len), mean over the available ones
    mean_trained: float | None = None  # a record's trained tokens within seq_len, mean
    read_tokens: float | None = None  # read x mean_tokens: what the steps' rows hold
    read_trained: float | None = None  # read x mean_trained
    fill: float | None = None  # read_tokens / (read x rows_per_record x seq_len): how full the rows are
    longest_row: int | None = None  # the longest row (cut at seq_len)
    line: str = ""  # the figures in one line
    warnings: list[str] = field(default_factory=list)  # R013 messages (without the located prefix)


def row_figures(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int | None
                ) -> tuple[list[int], list[int]]:
    """(tokens, trained tokens) of each (ids, labels) row as the trainer sees it: cut to its first ``seq_len``
    tokens (``pad_batch``); trained = labels[1:seq_len] that are not -100 (the targets the loss counts,
    ``llmc.runtime.sft.next_token_targets``)."""
    cut = seq_len or None
    return ([len(ids[:cut]) for ids, _ in seqs],
            [len(t) - t.count(IGNORE_INDEX) for t in (lab[1:cut] for _, lab in seqs)])


def _percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile: the smallest value at least ``q`` of ``values`` are at or below."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def stage_token_use(stage: str, unit: str, *, available: int, steps: int, per_step: int, seq_len: int | None,
                    rows: Sequence[Sequence[int]] | None = None, trained: Sequence[int] | None = None,
                    rows_per_record: int = 1, declared_tokens: float | None = None,
                    max_epochs: float = MAX_EPOCHS) -> StageTokenUse:
    """The figures of a chat stage's start and its R013 warnings.

    ``rows``: per record, the tokens of each of its rows uncut (SFT: one, DPO: chosen and rejected); None when not
    known (GRPO). ``trained``: per record, its trained tokens within seq_len. ``declared_tokens``: the plan's
    tokens for these steps; default steps x per_step x seq_len (the plan's steps x global_batch_tokens, a record
    counted as one full row: for DPO a pair, whose 2 rows hold up to twice that)."""
    read = steps * per_step
    epochs = read / available if available else math.inf
    if declared_tokens is None and seq_len:
        declared_tokens = float(read * seq_len)
    base = dict(stage=stage, unit=unit, available=available, steps=steps, per_step=per_step, read=read, epochs=epochs,
                rows_per_record=rows_per_record, seq_len=seq_len, declared_tokens=declared_tokens)
    head = f"stage {stage}: {available:,} {unit}; {steps:,} steps x {per_step:,} read {read:,} ({epochs:.2f} epochs)"
    warnings: list[str] = []
    if epochs > max_epochs:
        cap = max(1, math.floor(max_epochs * available / per_step))
        warnings.append(f"{steps:,} steps x {per_step:,} {unit} read the {available:,} {unit} {epochs:.1f} times, more "
                        f"than {max_epochs:g} epochs (repeated data loses value: Muennighoff et al. 2023, "
                        f"arXiv:2305.16264); hint: add data, or set the stage's steps to {cap:,} ({max_epochs:g} epochs)")
    if rows is None or not available:
        return StageTokenUse(**base, line=head, warnings=warnings)

    flat = [min(n, seq_len) if seq_len else n for r in rows for n in r]
    mean_tokens = sum(flat) / available
    mean_trained = sum(trained) / available if trained is not None else None
    read_tokens = read * mean_tokens
    read_trained = read * mean_trained if mean_trained is not None else None
    nrows = read * rows_per_record
    fill = read_tokens / (nrows * seq_len) if seq_len and read else None
    trained_s = f" (~{read_trained:,.0f} trained)" if read_trained is not None else ""
    line = f"{head}; their {nrows:,} rows hold ~{read_tokens:,.0f} tokens{trained_s}"
    if fill is not None:
        line += f", {fill:.0%} of {nrows:,} rows x seq_len {seq_len:,}"
    if declared_tokens:
        line += (f"; declared {declared_tokens:,.0f} tokens" + (f", a {unit[:-1]} counted as one row"
                                                                  if rows_per_record > 1 else ""))
    use = StageTokenUse(**base, mean_tokens=mean_tokens, mean_trained=mean_trained, read_tokens=read_tokens,
                        read_trained=read_trained, fill=fill, longest_row=max(flat, default=0),
                        line=line + " (rows padded, not packed)", warnings=warnings)
    # what the stage trains: the tokens in the loss (the rows' own when not known); the declared tokens count a
    # record as one row of seq_len, so a record's figure is per row (a DPO pair's 2 rows: half of it)
    per_row = (mean_trained if mean_trained is not None else mean_tokens) / rows_per_record
    if not declared_tokens or not seq_len or not per_row or read * per_row >= LOW_FILL * declared_tokens:
        return use
    what = "trained" if mean_trained is not None else "held"
    need = math.ceil(declared_tokens / (per_step * per_row))
    cap = max(1, math.floor(max_epochs * available / per_step))
    if need <= cap:
        more = (f"set the stage's steps to {need:,} to train the declared tokens at this mean "
                f"({need * per_step / available:.1f} epochs of the {available:,} {unit})")
    else:
        more = (f"the {available:,} {unit} hold only ~{available * per_row * rows_per_record:,.0f} {what} tokens: "
                f"at most {cap:,} steps ({max_epochs:g} epochs) before they repeat too often, or add data")
    fit = _percentile(flat, ROW_QUANTILE)
    if 0 < fit < seq_len:
        wider = per_step * seq_len // fit
        more += (f"; or seq_len {fit:,} ({ROW_QUANTILE:.0%} of the rows fit whole), which at the same "
                 f"global_batch_tokens holds {wider:,} {unit} a step: ~{steps * wider * per_row * rows_per_record:,.0f}"
                 f" {what} tokens in the same steps")
    row = "a row" if rows_per_record > 1 else f"a {unit[:-1]}"
    held = f", ~{read_trained:,.0f} of them trained" if read_trained is not None else ""
    if rows_per_record > 1:  # (DPO) what the declared tokens count: one row's worth per pair
        held += f", ~{read * per_row:,.0f} per side"
    warnings.append(f"the {read:,} {unit} its {steps:,} steps read hold ~{read_tokens:,.0f} tokens in {nrows:,} rows"
                    f"{held}: {read * per_row / declared_tokens:.0%} of the declared {declared_tokens:,.0f} "
                    f"(read as {nrows if rows_per_record == 1 else read:,} x seq_len {seq_len:,}"
                    f"{f', a {unit[:-1]} as one row' if rows_per_record > 1 else ''}); {row} averages "
                    f"{mean_tokens / rows_per_record:,.1f} tokens"
                    f"{f', {per_row:,.1f} trained' if mean_trained is not None else ''}, padded, not packed; "
                    f"hint: {more}")
    return use


def announce(use: StageTokenUse, say: Callable[[str], None] | None = None,
             warn: Callable[[str], None] | None = None) -> None:
    """Say ``use`` once at the stage's start: its line on standard output, each warning as a located
    ``stage NAME: warning[R013] ...`` line on standard error (the run goes on)."""
    (say or (lambda m: print(m, flush=True)))(use.line)
    for w in use.warnings:
        (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(f"stage {use.stage}: warning[R013] {w}")


__all__ = ["StageTokenUse", "stage_token_use", "row_figures", "announce", "LOW_FILL", "ROW_QUANTILE"]
