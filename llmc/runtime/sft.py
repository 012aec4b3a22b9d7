"""Supervised fine-tuning: next-token cross-entropy on the chat template's trained tokens only."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmc.runtime.chat import IGNORE_INDEX, encode_chat


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


def encode_conversations(convs: list[list[dict]], tok, template: str = "llama3", mask: str = "assistant"
                         ) -> list[tuple[list[int], list[int]]]:
    return [encode_chat(c, tok, template, mask) for c in convs]


def train_sft(model: nn.Module, examples: list[tuple[list[int], list[int]]], *, steps: int, lr: float,
              batch_size: int = 8, pad_id: int = 0, max_len: int | None = None, weight_decay: float = 0.0,
              grad_clip: float | None = 1.0, lr_factor: Callable[[int], float] | None = None, seed: int = 0,
              log: Callable[[int, dict], None] | None = None) -> list[float]:
    """AdamW over the trainable params, LR = lr * lr_factor(step) (the stage's schedule, ``TrainJob.lr_factor``;
    constant when None); returns per-step losses."""
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
        ids, labels = pad_batch(batch, pad_id, max_len)
        loss = sft_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        losses.append(loss.item())
        if log:
            log(step, {"loss": losses[-1], "lr": lr_t})
    return losses
