"""Supervised fine-tuning: next-token cross-entropy on the chat template's trained tokens only."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmc.runtime.chat import IGNORE_INDEX, encode_chat


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
        return bool(self.sum(0.0 if flag else 1.0) == 0)


def clip_grads(params: list, max_norm: float | None) -> None:
    if max_norm:
        from llmc.runtime.train import clip_grad_norm  # plain tensors and FSDP/TP DTensor shards alike

        clip_grad_norm(params, max_norm)


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


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE of logits[:, t] against labels[:, t+1] over labels != -100 (labels aligned with ids)."""
    lg = logits[:, :-1].float().flatten(0, 1)
    lb = labels[:, 1:].flatten()
    return F.cross_entropy(lg, lb, ignore_index=IGNORE_INDEX)


def sft_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return masked_lm_loss(model(ids), labels)


def sft_loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed CE over the trained tokens, their count): the pieces of :func:`masked_lm_loss`."""
    lg = model(ids)[:, :-1].float().flatten(0, 1)
    lb = labels[:, 1:].flatten()
    return F.cross_entropy(lg, lb, ignore_index=IGNORE_INDEX, reduction="sum"), int((lb != IGNORE_INDEX).sum())


def encode_conversations(convs: list[list[dict]], tok, template: str = "llama3", mask: str = "assistant"
                         ) -> list[tuple[list[int], list[int]]]:
    return [encode_chat(c, tok, template, mask) for c in convs]


def train_sft(model: nn.Module, examples: list[tuple[list[int], list[int]]], *, steps: int, lr: float,
              batch_size: int = 8, pad_id: int = 0, max_len: int | None = None, weight_decay: float = 0.0,
              grad_clip: float | None = 1.0, lr_factor: Callable[[int], float] | None = None, seed: int = 0,
              log: Callable[[int, dict], None] | None = None, shard: DataShard | None = None,
              device: torch.device | None = None) -> list[float]:
    """AdamW over the trainable params, LR = lr * lr_factor(step) (the stage's schedule, ``TrainJob.lr_factor``;
    constant when None); returns per-step losses (the mean over the global batch's trained tokens).

    ``shard``: this data-parallel rank's share of each step's batch (every rank draws the same batch)."""
    shard = shard or DataShard()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    rng = random.Random(seed)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        lr_t = lr * (lr_factor(step) if lr_factor else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_t
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        mine, w = shard.split(batch)
        ids, labels = pad_batch(mine, pad_id, max_len)
        if w[0] == 0.0:
            labels.fill_(IGNORE_INDEX)
        if device is not None:
            ids, labels = ids.to(device), labels.to(device)
        loss_sum, n_tok = sft_loss_sum(model, ids, labels)
        n_all = max(float(shard.sum(n_tok)), 1.0)
        opt.zero_grad(set_to_none=True)
        (loss_sum * (shard.size / n_all)).backward()
        clip_grads(params, grad_clip)
        opt.step()
        losses.append(float(shard.sum(loss_sum)) / n_all)
        if log:
            log(step, {"loss": losses[-1], "lr": lr_t})
    return losses
