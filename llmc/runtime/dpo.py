"""Direct Preference Optimisation (Rafailov et al. 2023).

    L = -log sigma( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

with sequence log-probs summed over the response tokens (labels != -100), not averaged
(as TRL's DPOTrainer, https://huggingface.co/docs/trl/dpo_trainer). The reference is the frozen
init model: a deep copy for full fine-tuning, or the same model with LoRA adapters disabled.
At step 0 policy == reference, so the margin is 0 and L = log 2.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmc.runtime.chat import IGNORE_INDEX, TemplateError, encode_prompt_response
from llmc.runtime.lora import disable_adapters, lora_modules, matmul_only_weights
from llmc.runtime.records import response_problem
from llmc.runtime.sft import (
    DataShard,
    EpochOrder,
    LoopState,
    adamw,
    clip_grads,
    next_token_targets,
    pad_batch,
)
from llmc.runtime.stage_tokens import announce, row_figures, stage_token_use


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, loss_chunk: int = 0) -> torch.Tensor:
    """Sum over t of log p(labels[t+1] | ids[:t+1]) where labels != -100; returns (B,). The per-token losses in
    slices of ``loss_chunk`` tokens (``model.token_losses``)."""
    return -model(ids, targets=next_token_targets(labels), loss_chunk=loss_chunk).nll.sum(-1)


def dpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Mean DPO loss over the batch and its implicit rewards beta*(log pi - log pi_ref)."""
    chosen = beta * (pi_w - ref_w)
    rejected = beta * (pi_l - ref_l)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    d = {"chosen": chosen.detach(), "rejected": rejected.detach(), "margin": margin.detach()}
    return loss, {"loss": loss.item(), "chosen_reward": float(d["chosen"].mean()),
                  "rejected_reward": float(d["rejected"].mean()), "margin": float(d["margin"].mean()),
                  "accuracy": float((d["margin"] > 0).float().mean())}


def encode_pairs(pairs: list[dict], tok, template: str = "llama3", wheres: list[str] | None = None
                 ) -> list[tuple[tuple, tuple]]:
    """[(chosen (ids, labels), rejected (ids, labels))] from {prompt, chosen, rejected} dicts; chosen / rejected are
    the response texts (ValueError, one line, for anything else, e.g. TRL's conversational message lists).
    ``wheres``: where each record came from (``file:line``), which an error names first."""
    out = []
    for i, p in enumerate(pairs):
        at = f"{wheres[i]}: " if wheres is not None else ""
        why = response_problem(p)  # (the stage's reader checked its records with it already: llmc.runtime.records)
        if why:
            raise ValueError(f"{at}preference record {i}: {why}")
        try:
            out.append(tuple(encode_prompt_response(p["prompt"], p[k], tok, template,
                                                    where=f"preference record {i} ({k})")
                             for k in ("chosen", "rejected")))
        except TemplateError as e:
            if wheres is None:
                raise
            raise TemplateError(f"{at}{e}") from None
    return out


def usable_pairs(pairs: list[tuple[tuple, tuple]], max_len: int | None) -> tuple[list[tuple[tuple, tuple]], int]:
    """(the pairs both of whose sides keep a trained token once cut to ``max_len`` -- labels[1:max_len], what
    :func:`sequence_logprobs` sums over --, how many were dropped)."""
    def trained(side: tuple) -> bool:
        return any(t != IGNORE_INDEX for t in side[1][1:max_len])

    kept = [p for p in pairs if trained(p[0]) and trained(p[1])]
    return kept, len(pairs) - len(kept)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` for a frozen reference. When ``model``'s forwards run under bf16 autocast (marked
    ``bf16_autocast`` by :func:`llmc.runtime.posttrain.bf16_forwards`) the weights only its matmuls read
    (:func:`llmc.runtime.lora.matmul_only_weights`) are copied straight to bf16: autocast rounds them so before each
    matmul, so the reference computes the same bits with 2 bytes per parameter instead of 4, and no fp32 copy of
    them is made first (deepcopy takes the bf16 ones from its memo)."""
    memo: dict = {}
    if getattr(model, "bf16_autocast", False):
        with torch.no_grad():
            for mod, name in matmul_only_weights(model, frozen_only=False):
                p = mod._parameters[name]
                memo[id(p)] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
    return copy.deepcopy(model, memo)


class Reference:
    """The frozen reference policy: the adapters-off base for LoRA models, else a frozen copy (``frozen``:
    one built and sharded like the policy, as the sharded runs pass it; default :func:`frozen_copy`)."""

    def __init__(self, model: nn.Module, frozen: nn.Module | None = None):
        self.model = model
        self.shared = any(True for _ in lora_modules(model))
        if not self.shared:
            self.copy = (frozen if frozen is not None else frozen_copy(model)).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, ids: torch.Tensor, labels: torch.Tensor, loss_chunk: int = 0) -> torch.Tensor:
        if self.shared:
            was = self.model.training
            self.model.eval()
            with disable_adapters(self.model):
                out = sequence_logprobs(self.model, ids, labels, loss_chunk)
            self.model.train(was)
            return out
        return sequence_logprobs(self.copy, ids, labels, loss_chunk)

    @contextlib.contextmanager
    def as_module(self):
        """The reference as a callable module (context: adapters disabled for the LoRA case)."""
        if self.shared:
            with disable_adapters(self.model):
                yield self.model
        else:
            yield self.copy


def train_dpo(model: nn.Module, pairs: list[tuple[tuple, tuple]], *, steps: int, lr: float, beta: float = 0.1,
              batch_size: int = 8, pad_id: int = 0, max_len: int | None = None, grad_clip: float | None = 1.0,
              seed: int = 0, reference: Reference | None = None,
              log: Callable[[int, dict], None] | None = None, shard: DataShard | None = None,
              device: torch.device | None = None, state: LoopState | None = None,
              micro_batch: int | None = None, loss_chunk: int = 0,
              lr_factor: Callable[[int], float] | None = None, optimizer: dict | None = None) -> list[dict]:
    """DPO with AdamW (``optimizer``: the stage plan's settings, :func:`llmc.runtime.sft.adamw`), LR = lr * lr_factor(step) (the stage's schedule, ``TrainJob.lr_factor``, as
    :func:`llmc.runtime.sft.train_sft`; constant when None); returns per-step stats (loss, margin, rewards,
    accuracy, lr), means over the global batch of pairs, and trained_tokens, the step's response tokens (chosen and
    rejected) the log-probs sum over; ``shard``: this data-parallel rank's share of each step's
    pairs; ``state``: resume / stop / mid-stage checkpoints (:class:`llmc.runtime.sft.LoopState`); ``micro_batch``:
    pairs per forward and backward (the stage plan's), the share accumulated over ceil(share / micro_batch) of them,
    the same number on every rank (weight-0 pairs top shares up); None: the whole share at once. ``loss_chunk``:
    tokens per slice of the log-probs (the stage plan's, ``model.token_losses``; 0 = whole). Pairs with a side left
    without a response token once cut to ``max_len`` (a prompt that fills it: margin 0, loss log 2, no gradient) are
    dropped, their count printed once; ValueError when none is left. At the start rank 0 says what the steps read of the
    pairs left (:func:`llmc.runtime.stage_tokens.stage_token_use`: a pair is 2 rows; R013 when they train under half
    of steps x batch_size x max_len per row, the plan's tokens, or past 4 epochs)."""
    shard = shard or DataShard()
    state = state or LoopState()
    pairs, dropped = usable_pairs(pairs, max_len)
    if not pairs:
        raise ValueError(f"DPO: no preference pair keeps a response token within seq_len {max_len} (the prompts of "
                         f"all {dropped} fill it); raise the stage's seq_len or shorten the prompts")
    if dropped and shard.rank == 0:
        print(f"DPO: {dropped} of {dropped + len(pairs)} preference pairs dropped: a response has no token within "
              f"seq_len {max_len}", flush=True)
    if shard.rank == 0:  # what the steps read of the pairs, said once (R013: llmc.runtime.stage_tokens)
        toks, trained = row_figures([side for p in pairs for side in p], max_len)
        announce(stage_token_use(getattr(log, "stage", None) or "dpo", "pairs", available=len(pairs), steps=steps,
                                 per_step=batch_size, seq_len=max_len,
                                 rows=list(zip(toks[::2], toks[1::2], strict=True)),
                                 trained=[a + b for a, b in zip(trained[::2], trained[1::2], strict=True)],
                                 rows_per_record=2))
    ref = reference or Reference(model)  # before a resume loads trained weights: the reference is the start
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(model, lr, optimizer)
    rng = random.Random(seed)  # (kept in the checkpoints' rank state; the draws come from ``order``)
    order = EpochOrder(len(pairs), seed)
    model.train()
    todo = state.begin(model, opt, steps, rng)
    hist = state.history
    for step in todo:
        lr_t = lr * (lr_factor(step) if lr_factor else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_t
        batch = [pairs[i] for i in order.draws(step, batch_size)]
        mine, w = shard.split(batch, equal=micro_batch is not None)
        micro = max(1, micro_batch or len(mine))
        opt.zero_grad(set_to_none=True)
        parts = torch.zeros(6)  # loss, chosen, rejected, margin, accuracy sums over this rank's pairs; trained tokens
        for i in range(0, len(mine), micro):
            sub = mine[i:i + micro]
            ids, labels = pad_batch([b[0] for b in sub] + [b[1] for b in sub], pad_id, max_len)
            if device is not None:
                ids, labels = ids.to(device), labels.to(device)
            ref_lp = ref.logprobs(ids, labels, loss_chunk)
            pol_lp = sequence_logprobs(model, ids, labels, loss_chunk)
            n = len(sub)
            wt = torch.tensor(w[i:i + micro], device=pol_lp.device)
            # dpo_loss's terms, summed over these pairs (weight 0: a placeholder pair)
            chosen, rejected = beta * (pol_lp[:n] - ref_lp[:n]), beta * (pol_lp[n:] - ref_lp[n:])
            margin = chosen - rejected
            loss_sum = -(F.logsigmoid(margin) * wt).sum()
            (loss_sum * (shard.size / len(batch))).backward()
            d = margin.detach()
            toks = (labels[:, 1:] != IGNORE_INDEX).sum(-1).float()  # (what sequence_logprobs sums over)
            parts = parts + torch.stack([loss_sum.detach(), (chosen.detach() * wt).sum(),
                                         (rejected.detach() * wt).sum(), (d * wt).sum(),
                                         ((d > 0).float() * wt).sum(),
                                         ((toks[:n] + toks[n:]) * wt).sum()]).float().cpu()
        clip_grads(params, grad_clip, parts[0], state, step)
        opt.step()
        total = shard.sum(parts)
        stats = dict(zip(("loss", "chosen_reward", "rejected_reward", "margin", "accuracy"),
                         map(float, total[:5] / len(batch)), strict=True), lr=lr_t, trained_tokens=int(total[5]))
        hist.append(stats)
        if log:
            log(step, stats)
        if state.end_step(step, model, opt, rng):
            break
    return hist
