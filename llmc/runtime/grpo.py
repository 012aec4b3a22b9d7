"""Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath) with verifiable rewards.

Per prompt: sample G completions, score them with a verifier, advantage
A_i = (r_i - mean(r)) / (std(r) + eps) with the *sample* std (ddof=1, torch.std default, as TRL),
shared by every token of completion i (8 samples, 5 correct -> +0.7246 / -1.2076; a group with
equal rewards has zero advantage and teaches nothing).

Per token: ratio = exp(logp - logp_old); surrogate min(ratio*A, clip(ratio, 1-eps, 1+eps)*A);
KL to the frozen reference by the k3 estimator exp(ref - logp) - (ref - logp) - 1 (Schulman 2020),
which is >= 0 and exactly 0 when policy == reference. Loss = -(surrogate - beta*KL), averaged over
all completion tokens of the batch ((x*mask).sum()/mask.sum()).

Prompts longer than ``max_prompt_tokens`` (or than the model's context less ``max_new_tokens``) keep their last
tokens, as TRL's GRPO truncates prompts from the left to ``max_prompt_length``
(https://huggingface.co/docs/trl/grpo_trainer, GRPOConfig).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import nn

from llmc.runtime.chat import IGNORE_INDEX, TemplateError, TokAdapter, encode_prompt, end_token_id
from llmc.runtime.dpo import Reference
from llmc.runtime.sft import DataShard, EpochOrder, LoopState, adamw, clip_grads, dropout_off
from llmc.runtime.stage_tokens import announce, stage_token_use


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(..., G) rewards -> advantages normalised within each group (sample std, ddof=1)."""
    r = rewards.float()
    if r.shape[-1] < 2:
        return torch.zeros_like(r)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True, unbiased=True)
    return (r - mean) / (std + eps)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi: e^(ref-logp) - (ref-logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, clip_eps: float = 0.2, kl_coef: float = 0.04
              ) -> tuple[torch.Tensor, dict]:
    """logp/old_logp/ref_logp/mask: (B, T) over completion tokens; adv: (B,). Returns (loss, stats)."""
    mask = mask.float()
    a = adv.float()[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a
    surr = torch.minimum(unclipped, clipped)
    per_tok = -surr
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef > 0:
        kl = kl_k3(logp, ref_logp)
        per_tok = per_tok + kl_coef * kl
    denom = mask.sum().clamp_min(1.0)
    loss = (per_tok * mask).sum() / denom
    clip_active = ((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).float()
    with torch.no_grad():
        stats = {"loss": loss.item(), "kl": float((kl * mask).sum() / denom),
                 "clip_frac": float((clip_active * mask).sum() / denom),
                 "ratio_mean": float((ratio * mask).sum() / denom)}
    return loss, stats


def completion_logprobs(model: nn.Module, full: torch.Tensor, n_prompt: int, loss_chunk: int = 0) -> torch.Tensor:
    """log p(full[:, t] | full[:, :t]) for the completion positions t >= n_prompt; (B, T - n_prompt). The per-token
    losses in slices of ``loss_chunk`` tokens (``model.token_losses``)."""
    targets = full.new_full(full.shape, IGNORE_INDEX)
    targets[:, n_prompt - 1:-1] = full[:, n_prompt:]  # position t predicts token t + 1; the prompt's predict nothing
    return -model(full, targets=targets, loss_chunk=loss_chunk).nll[:, n_prompt - 1:-1]


def sample_group(model: nn.Module, prompt_ids: list[int], G: int, max_new_tokens: int, stop_id: int | tuple[int, ...],
                 pad_id: int = 0, temperature: float = 1.0, generator: torch.Generator | None = None,
                 all_done: Callable[[bool], bool] | None = None, device: torch.device | None = None,
                 kv_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """G temperature samples of one prompt: :func:`sample_groups` of one group."""
    return sample_groups(model, [prompt_ids], G, max_new_tokens, stop_id, pad_id, temperature, generator, all_done,
                         device, kv_cache)[0]


@torch.no_grad()
def sample_groups(model: nn.Module, prompts: list[list[int]], G: int, max_new_tokens: int, stop_id: int | tuple[int, ...],
                  pad_id: int = 0, temperature: float = 1.0, generator: torch.Generator | None = None,
                  all_done: Callable[[bool], bool] | None = None, device: torch.device | None = None,
                  kv_cache: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """G temperature samples of each prompt, every group in one batch. Returns per group (full ids (G, T0+n),
    completion mask (G, n)), T0 that prompt's length.

    The prompts run once (G copies each, left-padded to the longest: :class:`llmc.runtime.model.KVCache` ``pad``),
    filling a KV cache; each new token then runs one position of every row against it, so a decoding forward
    reads (and, sharded, gathers) the weights once for all the groups. ``kv_cache=False`` re-runs the whole
    sequence per token instead (prompts of one length only; the reference the cached path is tested against).

    ``stop_id``: the token(s) a sequence ends on (the turn's end and the tokenizer's EOS: what the exported
    generation config stops serving on). Tokens after a sequence's stop token are padding with mask 0; the stop
    token itself is kept (mask 1),
    so the policy is also trained on when to stop. A group's columns end at its last sampled token. ``all_done
    (local_done)``: whether to stop now; the sharded runs pass a cross-rank AND, so every rank makes the same number
    of forward calls (FSDP2). Sampling draws on the CPU from ``generator``.
    """
    from llmc.runtime.model import KVCache

    lens = [len(p) for p in prompts]
    L = max(lens)
    if not kv_cache and min(lens) != L:
        raise ValueError("sampling without a KV cache takes prompts of one length")
    was = model.training
    model.eval()
    rows = [[pad_id] * (L - len(p)) + list(p) for p in prompts for _ in range(G)]
    x = torch.tensor(rows, dtype=torch.long, device=device)
    pad = torch.tensor([L - n for n in lens for _ in range(G)], dtype=torch.long)
    done = torch.zeros(len(rows), dtype=torch.bool)
    stops = torch.tensor(sorted({stop_id} if isinstance(stop_id, int) else set(stop_id)), dtype=torch.long)
    masks = []
    cache = (KVCache(pad=pad if int(pad.max()) > 0 else None)) if kv_cache else None
    for _ in range(max_new_tokens):
        if cache is None:
            logits = model(x)[:, -1].float().cpu()
        else:  # the prompts first, then the last token against the cache
            logits = model(x if cache.length == 0 else x[:, -1:], cache=cache)[:, -1].float().cpu()
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        masks.append((~done).long())
        x = torch.cat([x, nxt[:, None].to(x.device)], dim=1)
        done = done | torch.isin(nxt, stops)
        if (all_done or bool)(bool(done.all())):
            break
    model.train(was)
    mask = torch.stack(masks, dim=1)
    out = []
    for g, n in enumerate(lens):
        r = slice(g * G, (g + 1) * G)
        cols = mask[r].any(0).nonzero()
        n_new = int(cols[-1]) + 1 if len(cols) else 0
        out.append((x[r, L - n:L + n_new], mask[r, :n_new]))
    return out


def truncate_prompts(encoded: list[list[int]], limit: int | None) -> tuple[list[list[int]], int]:
    """(prompts cut to their last ``limit`` tokens, how many were cut): TRL's left truncation of GRPO prompts."""
    if limit is None:
        return encoded, 0
    return [p[-limit:] for p in encoded], sum(len(p) > limit for p in encoded)


def _encode_item(item: dict, i: int, tok, template) -> list[int]:
    """The prompt of ``item`` encoded for generation; an encoding error names where it came from (``item["where"]``:
    ``file:line``, else its position)."""
    try:
        return encode_prompt(item["prompt"], tok, template)
    except TemplateError as e:
        raise TemplateError(f"{item.get('where') or f'prompt {i}'}: {e}") from None


def train_grpo(model: nn.Module, prompts: list[dict], tok, *, steps: int, lr: float,
               reward_fn: Callable[[str, dict], float], template: str = "llama3", group_size: int = 8,
               prompts_per_step: int = 4, max_new_tokens: int = 8, kl_coef: float = 0.04, clip_eps: float = 0.2,
               temperature: float = 1.0, inner_steps: int = 2, grad_clip: float | None = 1.0, pad_id: int = 0,
               seed: int = 0, reference: Reference | None = None,
               log: Callable[[int, dict], None] | None = None, shard: DataShard | None = None,
               device: torch.device | None = None, state: LoopState | None = None,
               micro_batch: int | None = None, sampling_groups: int | None = None, loss_chunk: int = 0,
               lr_factor: Callable[[int], float] | None = None, max_prompt_tokens: int | None = None,
               optimizer: dict | None = None, on_prompts: Callable[[dict], None] | None = None) -> list[dict]:
    """GRPO on ``prompts`` ({prompt: messages, ...}); ``reward_fn(completion_text, item)``. Returns stats per step
    (loss, kl, clip_frac, reward_mean, reward_std, lr, trained_tokens: the step's completion tokens in the loss).

    ``shard``: each step's prompts are split over the data-parallel ranks (each rank samples its groups with
    its own generator); the loss stays the token-level mean over the whole step's completions. ``state``:
    resume / stop / mid-stage checkpoints (:class:`llmc.runtime.sft.LoopState`; the generator is saved too).
    ``micro_batch``: completions per forward and backward (the stage plan's; None = a whole group). A group is
    sampled and scored whole (its advantages are normalised within it); its log-probs and its update then run
    in slices of ``micro_batch`` rows, the same step as one pass over the group. ``sampling_groups``: groups sampled
    in one batch (:func:`sample_groups`; the stage plan's ``memory.sampling_groups``, what its KV cache memory was
    sized for; None = all of the rank's groups of a step at once). ``loss_chunk``: tokens per slice of the log-probs
    (the stage plan's, ``model.token_losses``; 0 = whole). ``lr_factor``: LR = lr * lr_factor(step), the stage's
    schedule (``TrainJob.lr_factor``, as :func:`llmc.runtime.sft.train_sft`; constant when None).
    ``max_prompt_tokens``: longer prompts keep their last tokens (TRL's left truncation), also cut to the model's
    context less ``max_new_tokens``; how many were cut is printed once and given to ``on_prompts`` (called once,
    before the first step, with ``records``, ``limit``, ``truncated`` and ``prompt_tokens_cut``: the tokens the
    cut prompts lose from their start). Rank 0 then says how many of the prompts the steps read
    (:func:`llmc.runtime.stage_tokens.stage_token_use`; a ``warning[R013]`` line past 4 epochs).

    Dropout is off (p = 0) in every policy pass of the stage, the "old" log-probs and the training passes alike (LoRA
    adapters default to dropout 0.05): the importance ratio pi/pi_old must be exactly 1 before any update
    (DeepSeekMath Alg. 1 with one update per batch; TRL takes old = logp.detach()), which two passes under different
    dropout masks are not."""
    shard = shard or DataShard()
    state = state or LoopState()
    if group_size < 2:
        raise ValueError("GRPO needs group_size >= 2 (one sample always has zero advantage)")
    a = TokAdapter(tok)
    eos = getattr(tok, "eos_id", None)  # serving stops on the turn's end and on EOS (hf_io's generation config)
    stop = tuple(sorted({end_token_id(tok, template), *([int(eos)] if eos is not None else [])}))
    ref = None if kl_coef <= 0 else reference if reference is not None else Reference(model)  # KL 0: no ref passes
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(model, lr, optimizer, betas=(0.9, 0.99))  # optimizer: the stage plan's (sft.adamw)
    rng = random.Random(seed)  # (kept in the checkpoints' rank state; the prompts come from ``order``)
    order = EpochOrder(len(prompts), seed)
    gen = torch.Generator().manual_seed(seed + 1_000_003 * shard.rank)
    ctx = getattr(getattr(model, "arch", None), "max_seq_len", None)
    limit = max_prompt_tokens
    if ctx:  # prompt + completion within the model's context (the forward refuses more)
        limit = min(limit or ctx, ctx - max_new_tokens)
    if limit is not None and limit < 1:
        raise ValueError(f"GRPO: max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {ctx} tokens; lower max_new_tokens")
    full = [_encode_item(p, i, tok, template) for i, p in enumerate(prompts)]
    encoded, cut = truncate_prompts(full, limit)
    if on_prompts is not None:
        on_prompts({"records": len(full), "limit": limit, "truncated": cut,
                    "prompt_tokens_cut": sum(max(0, len(p) - limit) for p in full) if limit is not None else 0})
    if cut and shard.rank == 0:
        print(f"GRPO: {cut} of {len(encoded)} prompts longer than {limit} tokens keep their last {limit} "
              "(left truncation, as TRL's max_prompt_length)", flush=True)
    if shard.rank == 0:  # the prompts the steps read, said once (R013 past 4 epochs: llmc.runtime.stage_tokens)
        announce(stage_token_use(getattr(log, "stage", None) or "grpo", "prompts", available=len(prompts),
                                 steps=steps, per_step=prompts_per_step, seq_len=None, rows_per_record=group_size))
    with dropout_off(model):  # see the docstring: pi/pi_old is exactly 1 before an update
        todo = state.begin(model, opt, steps, rng, gen)
        hist: list[dict] = state.history
        micro = max(1, micro_batch or group_size)
        for step in todo:
            lr_t = lr * (lr_factor(step) if lr_factor else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr_t
            batch = []
            rewards_all = []
            picks, weights = shard.split(order.draws(step, prompts_per_step), equal=True)
            per = max(1, sampling_groups or len(picks))  # every rank has as many picks (equal=True): as many batches
            sampled = []
            for b0 in range(0, len(picks), per):
                sampled += sample_groups(model, [encoded[j] for j in picks[b0:b0 + per]], group_size, max_new_tokens,
                                         stop, pad_id, temperature, gen, all_done=shard.all_true, device=device)
            for j, wt, (full, cmask) in zip(picks, weights, sampled, strict=True):
                n0 = len(encoded[j])
                texts = [a.decode([t for t, m in zip(row[n0:].tolist(), mrow.tolist(), strict=True) if m])
                         for row, mrow in zip(full, cmask, strict=True)]
                r = torch.tensor([float(reward_fn(t, prompts[j])) for t in texts])
                if wt:
                    rewards_all.append(r)
                adv = group_advantages(r).to(full.device)
                cmask = cmask.to(full.device) * int(wt)  # a placeholder group (weight 0) trains nothing
                for r0 in range(0, full.shape[0], micro):
                    rows = slice(r0, r0 + micro)
                    with torch.no_grad():
                        old = completion_logprobs(model, full[rows], n0, loss_chunk)
                        ref_lp = None
                        if ref is not None:
                            with ref.as_module() as rm:
                                ref_lp = completion_logprobs(rm, full[rows], n0, loss_chunk)
                    batch.append((full[rows], n0, cmask[rows], adv[rows], old, ref_lp))
            stats: dict = {}
            tot_tokens = float(shard.sum(sum(float(b[2].sum()) for b in batch)))
            for _ in range(inner_steps):
                opt.zero_grad(set_to_none=True)
                agg = torch.zeros(3)
                for full, n0, cmask, adv, old, ref_lp in batch:
                    lp = completion_logprobs(model, full, n0, loss_chunk)
                    loss, st = grpo_loss(lp, old, adv, cmask, ref_lp, clip_eps, kl_coef)
                    w = float(cmask.sum()) / max(tot_tokens, 1.0)  # token-level mean over the whole step's batch
                    (loss * (w * shard.size)).backward()
                    agg += torch.tensor([st["loss"], st["kl"], st["clip_frac"]]) * w
                clip_grads(params, grad_clip, agg[0], state, step)
                opt.step()
                stats = dict(zip(("loss", "kl", "clip_frac"), map(float, shard.sum(agg)), strict=True))
            rw = torch.cat(rewards_all) if rewards_all else torch.zeros(0)
            n, s1, s2 = (float(v) for v in shard.sum(torch.tensor([rw.numel(), rw.sum(), (rw**2).sum()],
                                                                   dtype=torch.float64)))
            mean = s1 / max(n, 1.0)
            var = (s2 - n * mean**2) / (n - 1) if n > 1 else 0.0  # sample variance, as torch.std
            stats.update(reward_mean=mean, reward_std=max(var, 0.0) ** 0.5, lr=lr_t, trained_tokens=int(tot_tokens))
            hist.append(stats)
            if log:
                log(step, stats)
            if state.end_step(step, model, opt, rng, gen):
                break
    return hist
