"""Supervised fine-tuning: next-token cross-entropy on the chat template's trained tokens only."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmc.runtime.chat import IGNORE_INDEX, TemplateError, encode_chat
from llmc.runtime.errors import NonFiniteStep
from llmc.runtime.model import DEFAULT_NO_DECAY, mean_token_loss, param_groups
from llmc.runtime.stage_tokens import announce, row_figures, stage_token_use


@dataclass(frozen=True)
class DataShard:
    """This rank's share of every step's global batch: examples ``rank, rank + size, ...`` of it, so each
    example is seen by exactly one data-parallel rank. Losses are sums over the local share divided by the
    global count, times ``size`` (FSDP2/DDP average gradients over the ranks), so the gradient and the
    logged value equal the single-process mean over the whole batch."""

    rank: int = 0
    size: int = 1

    def split(self, batch: list, equal: bool = False) -> tuple[list, list[float]]:
        """(local items, weights): a rank whose share is empty gets the batch's first item with weight 0,
        so every rank runs the same forward/backward calls (FSDP's collectives); ``equal``: every rank gets
        ceil(len / size) items, topped up the same way (for loops with one forward per item)."""
        mine = batch[self.rank::self.size]
        n = -(-len(batch) // self.size) if equal else max(1, len(mine))
        return mine + batch[:1] * (n - len(mine)), [1.0] * len(mine) + [0.0] * (n - len(mine))

    def sum(self, x: torch.Tensor | float) -> torch.Tensor:
        """Sum over the data-parallel ranks (a copy; the input is left as it is)."""
        t = (x.detach().clone() if torch.is_tensor(x) else torch.tensor(float(x))).float()
        if self.size > 1:
            import torch.distributed as dist

            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
            t = t.to(dev)
            dist.all_reduce(t)
        return t.cpu()

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective every rank runs)."""
        from llmc.runtime.preempt import any_across

        return not any_across(not flag)


class EpochOrder:
    """Which example a post-training loop draws: the run's ``k``-th draw is ``order(k)``, epoch after epoch, each
    epoch a fresh permutation of the ``n`` examples (seeded by the run's seed and the epoch), so every example is
    trained once per epoch, as torch's ``DataLoader(shuffle=True)`` / transformers' Trainer reshuffle each epoch
    (https://pytorch.org/docs/stable/data.html, RandomSampler without replacement). A draw depends on ``k`` alone,
    so a resumed loop (``k = step x draws per step + j``) draws what the uninterrupted one would have."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, list(range(n))

    def __call__(self, k: int) -> int:
        if self.n < 1:
            raise ValueError("no examples to draw from")
        epoch, i = divmod(k, self.n)
        if epoch != self._epoch:  # (str seeds are hashed with SHA-512: the same on every platform and run)
            self._perm = list(range(self.n))
            random.Random(f"llmc-epoch:{self.seed}:{epoch}").shuffle(self._perm)
            self._epoch = epoch
        return self._perm[i]

    def draws(self, step: int, count: int) -> list[int]:
        """The ``count`` draws of 0-based step ``step`` of a loop that draws ``count`` per step."""
        return [self(step * count + j) for j in range(count)]


@dataclass
class LoopState:
    """Where a post-training loop (:func:`train_sft`, :func:`llmc.runtime.dpo.train_dpo`,
    :func:`llmc.runtime.grpo.train_grpo`) starts and stops, and its mid-stage checkpoints.

    The default (no ``folder``) runs every step and saves nothing. With a ``folder``, a checkpoint
    (:func:`llmc.runtime.checkpoint.save_checkpoint`, DCP shards when ``sharded``) is written after every
    ``interval``-th step before the last and where the run stops early (``stop_after`` steps in total,
    ``max_seconds`` of wall time, or a SIGTERM / SIGUSR1 on any rank while :func:`llmc.runtime.preempt.handlers`
    is installed: ``preempted``): the trainable parameters only (a LoRA run's adapters, unmerged), the
    optimizer, the global RNGs, the loop's batch-sampling ``random.Random`` and, per rank, the sampling
    generator (GRPO), the per-step ``history`` and ``meta`` (which stage wrote it). ``resume_from``: such a
    checkpoint, loaded by :meth:`begin` once the loop has built its optimizer (and its frozen reference), so
    the remaining steps are those of an uninterrupted run."""

    folder: Path | None = None
    interval: int = 0
    keep_latest: int | None = None
    sharded: bool = False
    meta: dict = field(default_factory=dict)
    resume_from: Path | None = None
    stop_after: int | None = None
    max_seconds: float | None = None
    preempted: bool = False  # a signal stopped the run (llmc.runtime.preempt)
    history: list = field(default_factory=list)
    step: int = 0
    steps: int = 0
    t0: float = field(default_factory=time.time)
    # (time.perf_counter) where the next step's training time starts: after begin()'s resume load and after each
    # end_step()'s checkpoint save (posttrain._Log's step_s counts from here)
    step_began: float = field(default_factory=time.perf_counter)

    def begin(self, model: nn.Module, opt: torch.optim.Optimizer, steps: int, rng: random.Random,
              gen: torch.Generator | None = None) -> range:
        """Restore ``resume_from`` (if any) into the model, optimizer and samplers; the steps left to run."""
        self.steps = steps
        if self.resume_from is not None:
            from llmc.runtime.checkpoint import load_checkpoint

            st = load_checkpoint(self.resume_from, model, opt, trainable_only=True)
            rs = st.get("rank_state") or {}
            rng.setstate(rs["batch_rng"])
            if gen is not None:
                gen.set_state(rs["generator"])
            self.step, self.history = int(st["step"]), list(st["history"])
        stop = min(steps, self.stop_after) if self.stop_after else steps
        self.step_began = time.perf_counter()
        return range(self.step, max(stop, self.step))

    def end_step(self, step: int, model: nn.Module, opt: torch.optim.Optimizer, rng: random.Random,
                 gen: torch.Generator | None = None) -> bool:
        """After step ``step`` (0-based): checkpoint when due; True when the run must stop now (time, or a
        preemption signal on any rank: :func:`llmc.runtime.preempt.stop_now`, one collective every rank runs)."""
        from llmc.runtime import preempt

        self.step = step + 1
        # every rank: one all-reduce (time limit and signal together)
        late, self.preempted = preempt.stop_now(
            None if self.max_seconds is None else time.time() - self.t0 > self.max_seconds, self.step < self.steps)
        late = late or self.preempted
        last = late or self.step == self.stop_after
        if self.folder is not None and self.step < self.steps and (self.step % max(self.interval, 1) == 0 or last):
            from llmc.runtime.checkpoint import save_checkpoint
            from llmc.runtime.train import weights_finite

            # (collective) no checkpoint holds a non-finite weight: an update can overflow where the loss and the
            # gradient norm were finite
            if not weights_finite([p for p in model.parameters() if p.requires_grad]):
                raise nonfinite_stop(self, self.step, "non-finite weights after the update", taken=True)

            mine = {"batch_rng": rng.getstate(), "generator": None if gen is None else gen.get_state()}
            save_checkpoint(self.folder, self.step, model, opt, {**self.meta, "history": self.history},
                            keep_latest=self.keep_latest, sharded=self.sharded, rank_state=mine, trainable_only=True)
        self.step_began = time.perf_counter()
        return late

    @property
    def stopped(self) -> bool:
        """The loop ended before its last step (stop_after / max_seconds / preempted)."""
        return self.step < self.steps

    @property
    def last_saved(self) -> Path | None:
        return None if self.folder is None else self.folder / f"step-{self.step:08d}"


def clip_grads(params: list, max_norm: float | None, loss: torch.Tensor | None = None,
               state: LoopState | None = None, step: int = 0) -> None:
    """Clip the gradients to ``max_norm`` (when set) and, before the caller's ``opt.step()``, stop a step whose
    ``loss`` (this rank's, any scale) or gradient norm is not finite on any rank: :class:`llmc.runtime.errors.
    NonFiniteStep` (error[R014]) on every rank together (:func:`llmc.runtime.train.step_stats`, one all-reduce),
    so the step is not taken and nothing of it is saved, as in llmc's pre-training trainer."""
    from llmc.runtime.train import (  # plain tensors and FSDP/TP DTensor shards alike
        clip_grad_norm,
        step_stats,
    )

    norm = clip_grad_norm(params, max_norm or None)
    if loss is None:
        return
    mean, own_norm, ok = step_stats(loss.detach().float().to(norm.device), norm)
    if not ok:
        what = "non-finite loss" if not math.isfinite(mean) else "non-finite gradient norm"
        # (the loss is this rank's sum at any scale: named only when it is the non-finite figure)
        raise nonfinite_stop(state, step + 1, what, loss=None if math.isfinite(mean) else mean, norm=own_norm)


def nonfinite_stop(state: LoopState | None, step: int, what: str, *, loss: float | None = None,
                   norm: float | None = None, taken: bool = False) -> NonFiniteStep:
    """The error[R014] a post-training stage stops with (:func:`llmc.runtime.train.nonfinite_reason`), naming the
    newest mid-stage checkpoint of ``state`` (:func:`llmc.runtime.checkpoint.list_checkpoints`), whose weights are
    finite."""
    from llmc.runtime.checkpoint import list_checkpoints
    from llmc.runtime.train import nonfinite_reason

    saved = list_checkpoints(state.folder) if state is not None and state.folder is not None else []
    return NonFiniteStep(nonfinite_reason(step, what, loss, norm, str(saved[-1][1]) if saved else None, taken,
                                          hint="lower the stage's lr"))


def pad_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int, max_len: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) pairs to one (B, T) batch; padding gets label -100. Truncates to max_len."""
    T = max(len(ids) for ids, _ in seqs)
    if max_len:
        T = min(T, max_len)
    ids_t = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    lab_t = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        n = min(len(ids), T)
        ids_t[i, :n] = torch.tensor(ids[:n])
        lab_t[i, :n] = torch.tensor(lab[:n])
    return ids_t, lab_t


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with ids (labels[:, t] belongs to ids[:, t]) -> what each position predicts: labels[:, t+1],
    -100 at the last position (the ``targets`` of ``Transformer.forward``)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def sft_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, loss_chunk: int = 0) -> torch.Tensor:
    """Mean CE of position t's logits against labels[:, t+1] over labels != -100 (labels aligned with ids); the loss in
    slices of ``loss_chunk`` tokens (``model.token_losses``)."""
    targets = next_token_targets(labels)
    return mean_token_loss(model(ids, targets=targets, loss_chunk=loss_chunk), targets)


def sft_loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                 loss_chunk: int = 0) -> tuple[torch.Tensor, int]:
    """(summed CE over the trained tokens, their count): the pieces of :func:`sft_loss`."""
    targets = next_token_targets(labels)
    return model(ids, targets=targets, loss_chunk=loss_chunk).nll.sum(), int((targets != IGNORE_INDEX).sum())


def encode_conversations(convs: list[list[dict]], tok, template: str = "llama3", mask: str = "assistant",
                         wheres: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each conversation (:func:`llmc.runtime.chat.encode_chat`); ``wheres``: where each came from
    (``file:line``), which an encoding error names first."""
    out = []
    for i, c in enumerate(convs):
        try:
            out.append(encode_chat(c, tok, template, mask, where=f"conversation {i}"))
        except TemplateError as e:
            if wheres is None:
                raise
            raise TemplateError(f"{wheres[i]}: {e}") from None
    return out


@contextlib.contextmanager
def dropout_off(model: nn.Module):
    """Every dropout of ``model`` at p = 0 inside the context (TRL's ``disable_dropout_in_model``; its DPO and GRPO trainers disable dropout by default), restored after."""
    mods = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    prev = [m.p for m in mods]
    for m in mods:
        m.p = 0.0
    try:
        yield model
    finally:
        for m, p in zip(mods, prev, strict=True):
            m.p = p


def adamw(model: nn.Module, lr: float, optimizer: dict | None, betas: tuple[float, float] = (0.9, 0.95)
          ) -> torch.optim.AdamW:
    """A post-training stage's AdamW over ``model``'s trainable parameters: ``optimizer`` is the stage plan's (the
    lock's stage ``hyper["optimizer"]``: betas, eps, weight_decay, no_decay); a lock without it keeps what llmc used
    before (``betas``, eps 1e-8, no decay). With weight decay, the parameters the rule ``no_decay`` leaves out
    (:func:`llmc.runtime.model.param_groups`, pre-training's rule; a plan without the key: the default rule) are not
    decayed; without (weight_decay 0, post-training's default) every one is in one group, as before the rule."""
    o = optimizer or {}
    wd = float(o.get("weight_decay", 0.0))
    groups = (param_groups(model, wd, str(o.get("no_decay", DEFAULT_NO_DECAY))) if wd
              else [p for p in model.parameters() if p.requires_grad])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.get("betas", betas)), eps=float(o.get("eps", 1e-8)),
                             weight_decay=wd)


def train_sft(model: nn.Module, examples: list[tuple[list[int], list[int]]], *, steps: int, lr: float,
              batch_size: int = 8, pad_id: int = 0, max_len: int | None = None, optimizer: dict | None = None,
              grad_clip: float | None = 1.0, lr_factor: Callable[[int], float] | None = None, seed: int = 0,
              log: Callable[[int, dict], None] | None = None, shard: DataShard | None = None,
              device: torch.device | None = None, state: LoopState | None = None,
              micro_batch: int | None = None, loss_chunk: int = 0) -> list[float]:
    """AdamW over the trainable params, LR = lr * lr_factor(step) (the stage's schedule, ``TrainJob.lr_factor``;
    constant when None); returns per-step losses (the mean over the global batch's trained tokens). ``log(step,
    {loss, lr, trained_tokens})``: trained_tokens is the step's count of tokens in the loss, over every rank. At the
    start rank 0 says what the ``steps`` x ``batch_size`` conversations read of ``examples`` and the tokens their rows
    hold against steps x batch_size x max_len, the plan's tokens (a ``warning[R013]`` line when they train under half
    of it, or past 4 epochs: :func:`llmc.runtime.stage_tokens.stage_token_use`; the stage named by ``log.stage``
    where it has one).

    ``shard``: this data-parallel rank's share of each step's batch (every rank draws the same batch).
    ``state``: resume / stop / mid-stage checkpoints (:class:`LoopState`). ``micro_batch``: sequences per forward
    and backward (the stage plan's, what its memory was sized with), the rank's share accumulated over
    ceil(share / micro_batch) of them; None: the whole share at once. Every rank runs as many (FSDP's
    collectives): shares are topped up with weight-0 sequences whose tokens train nothing. ``loss_chunk``: tokens per
    slice of the loss (the stage plan's, ``model.token_losses``; 0 = whole)."""
    shard = shard or DataShard()
    state = state or LoopState()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(model, lr, optimizer)
    rng = random.Random(seed)  # (kept in the checkpoints' rank state; the draws come from ``order``)
    order = EpochOrder(len(examples), seed)
    if shard.rank == 0:  # what the steps read of the data, said once (R013: llmc.runtime.stage_tokens)
        toks, trained = row_figures(examples, max_len)
        announce(stage_token_use(getattr(log, "stage", None) or "sft", "conversations", available=len(examples),
                                 steps=steps, per_step=batch_size, seq_len=max_len, rows=[[n] for n in toks],
                                 trained=trained))
    model.train()
    todo = state.begin(model, opt, steps, rng)
    losses: list[float] = state.history
    for step in todo:
        lr_t = lr * (lr_factor(step) if lr_factor else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_t
        batch = [examples[i] for i in order.draws(step, batch_size)]
        mine, w = shard.split(batch, equal=micro_batch is not None)
        micro = max(1, micro_batch or len(mine))
        chunks = []
        for i in range(0, len(mine), micro):
            ids, labels = pad_batch(mine[i:i + micro], pad_id, max_len)
            for j, wj in enumerate(w[i:i + micro]):
                if wj == 0.0:  # a placeholder: it runs the forward and backward, and trains nothing
                    labels[j].fill_(IGNORE_INDEX)
            chunks.append((ids, labels))
        # the global count of trained tokens first (sft_loss's: labels[:, 1:] != -100), so that every chunk's
        # gradient is scaled as in one pass over the whole batch
        n_trained = int(shard.sum(sum(int((lb[:, 1:] != IGNORE_INDEX).sum()) for _, lb in chunks)))
        n_all = max(float(n_trained), 1.0)
        opt.zero_grad(set_to_none=True)
        loss_total = torch.zeros(())
        for ids, labels in chunks:
            if device is not None:
                ids, labels = ids.to(device), labels.to(device)
            loss_sum, _ = sft_loss_sum(model, ids, labels, loss_chunk)
            (loss_sum * (shard.size / n_all)).backward()
            loss_total = loss_total + loss_sum.detach().float().cpu()
        clip_grads(params, grad_clip, loss_total, state, step)
        opt.step()
        losses.append(float(shard.sum(loss_total)) / n_all)
        if log:
            log(step, {"loss": losses[-1], "lr": lr_t, "trained_tokens": n_trained})
        if state.end_step(step, model, opt, rng):
            break
    return losses
