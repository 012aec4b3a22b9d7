"""Post-training runtime on a tiny model on CPU: chat masks, SFT, DPO, GRPO + sympy verifier."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from llmc.runtime.chat import IGNORE_INDEX, TemplateError, check_template, encode_chat  # noqa: E402
from llmc.runtime.dpo import Reference, dpo_loss, encode_pairs, sequence_logprobs, train_dpo  # noqa: E402
from llmc.runtime.grpo import (  # noqa: E402
    completion_logprobs,
    group_advantages,
    grpo_loss,
    kl_k3,
    sample_group,
    sample_groups,
    train_grpo,
)
from llmc.runtime.model import build_model  # noqa: E402
from llmc.runtime.reward import arithmetic_reward, extract_answer  # noqa: E402
from llmc.runtime.sft import encode_conversations, pad_batch, sft_loss, train_sft  # noqa: E402
from llmc.runtime.synthetic import (  # noqa: E402
    ByteTokenizer,
    arithmetic_prompts,
    chat_examples,
    format_examples,
    preference_pairs,
)
from llmc.spec.model import Architecture  # noqa: E402

torch.set_num_threads(1)
TOK = ByteTokenizer()
ARCH = Architecture(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                    vocab_size=TOK.vocab_size, max_seq_len=256)


def _model(seed=0):
    return build_model(ARCH, seed=seed)


# ----------------------------------------------------------------------------- chat templates


def test_llama3_template_text_and_mask():
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"}]
    ids, labels = encode_chat(conv, TOK, "llama3")
    assert len(ids) == len(labels)
    assert TOK.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nagain<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>")
    trained = TOK.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == "yo<|eot_id|>ok<|eot_id|>"  # assistant content + end token only
    _, last = encode_chat(conv, TOK, "llama3", mask="last_assistant")
    assert TOK.decode([t for t in last if t != IGNORE_INDEX]) == "ok<|eot_id|>"
    _, none = encode_chat(conv, TOK, "llama3", mask="none")
    assert none == ids
    # special tokens are single ids, never split into bytes
    assert ids.count(TOK.token_to_id("<|start_header_id|>")) == 5


def test_chatml_template_and_tokenizer_check():
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, labels = encode_chat(conv, TOK, "chatml")
    assert TOK.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert TOK.decode([t for t in labels if t != IGNORE_INDEX]) == "yo<|im_end|>"
    llama_only = ByteTokenizer(specials=("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>",
                                         "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    check_template(llama_only, "llama3")
    with pytest.raises(TemplateError, match="im_start"):
        check_template(llama_only, "chatml")
    with pytest.raises(TemplateError):
        encode_chat(conv, llama_only, "chatml")


@pytest.mark.parametrize("template", ["llama3", "chatml", "phi3", "phi4", "gemma"])
def test_encoding_equals_the_exported_jinja_through_transformers(template):
    """What llmc trains on is what the export's chat template gives: for every template, transformers'
    apply_chat_template on the Jinja form written into tokenizer_config.json (llmc.spec.chat) yields exactly the ids
    llmc's encoder builds (a character-level tokenizer with the template's special tokens, so the pieces llmc encodes
    one by one tokenise as the whole rendered string does), with and without the generation prompt; the trained
    labels are the assistant turns' content and end token (Phi-3: <|end|>, its released generation config's stop;
    Gemma: <end_of_turn>, the system message opening the first user turn, the assistant's turns named "model",
    surrounding whitespace trimmed)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from llmc.spec.chat import CHAT_TEMPLATES

    t = CHAT_TEMPLATES[template]
    chars = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]  # ByteLevel's space and newline symbols
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(t.specials))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=t.bos, chat_template=t.jinja)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3 + 3?"},
            {"role": "assistant", "content": "6, of course" + (" \n" if t.trim else "")}]
    ids, labels = encode_chat(conv, tok, template)
    assert ids == hf.apply_chat_template(conv, tokenize=True, return_dict=False)
    prompt = conv[:2]
    assert encode_chat(prompt, tok, template, add_generation_prompt=True)[0] == hf.apply_chat_template(
        prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
    trained = tok.decode([x for x in labels if x != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == f"4{t.end}6, of course{t.end}"


@pytest.mark.parametrize("kind", ["bpe_newline_merge", "sentencepiece_prepend", "metaspace_first"])
def test_training_ids_are_the_served_ids_for_real_tokenizers(kind, tmp_path):
    """The rendered conversation is tokenised in one call, as transformers' apply_chat_template and vLLM do: llmc's
    own byte-level BPE with a "\n\n" merge (encoded piece by piece, the llama3 header's "\n\n" and the content
    split differently), and SentencePiece-style tokenizers (a Prepend("▁") normaliser, or Metaspace with
    prepend_scheme "first") that gave every piece its own "▁". The trained tokens are still exactly the assistant
    content and end tokens, non-ASCII text included (character offsets)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    from llmc.runtime.tokenizer import TextTokenizer, train_bpe
    from llmc.spec.chat import CHAT_TEMPLATES

    template = "llama3" if kind == "bpe_newline_merge" else "phi3"
    t = CHAT_TEMPLATES[template]
    conv = [{"role": "user", "content": "Hello there, où?"}, {"role": "assistant", "content": "The answer is 4 ✓."},
            {"role": "user", "content": "Next"}, {"role": "assistant", "content": "ok"}]
    if kind == "bpe_newline_merge":
        texts = [f"Paragraph {i} talks about things.\n\n  Next {i}.\n\n\nEnd\n\n" for i in range(300)]
        texts += ["Hello there, où? The answer is 4 ✓.\n\n"] * 200
        path = train_bpe(texts, 600, tmp_path / "tok")
        tok = TextTokenizer(path)
        assert tok.tok.token_to_id("ĊĊ") is not None  # the merge that split differently piece by piece
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token=t.bos,
                                                  chat_template=t.jinja)
        raw = tok.tok
    else:
        chars = ["<unk>", "▁", "\n", "ù", "✓"] + [chr(c) for c in range(33, 127)]
        raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
        if kind == "sentencepiece_prepend":  # Llama-2 / Phi-3 style (legacy conversion)
            raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        else:
            raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
            raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        raw.add_special_tokens(list(t.specials))
        tok = raw
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=t.jinja)
    ids, labels = encode_chat(conv, tok, template)
    assert ids == hf.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert encode_chat(conv[:1], tok, template, add_generation_prompt=True)[0] == hf.apply_chat_template(
        conv[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    trained = raw.decode([x for x in labels if x != IGNORE_INDEX], skip_special_tokens=False)
    assert trained.replace(t.end, "|").replace(" ", "") == "The answer is 4 ✓.|ok|".replace(" ", "")


def test_chat_with_runtime_bpe_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    from llmc.runtime.tokenizer import TextTokenizer, train_bpe

    texts = [" ".join(m["content"] for m in c) for c in chat_examples(200)]
    tok = TextTokenizer(train_bpe(texts, 400, tmp_path / "tok"))
    conv = chat_examples(1, seed=3)[0]
    ids, labels = encode_chat(conv, tok, "llama3")
    assert ids[0] == tok.token_id("<|begin_of_text|>")
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]).replace("<|eot_id|>", "|") == \
        "".join(m["content"] + "|" for m in conv if m["role"] == "assistant")
    with pytest.raises(TemplateError):
        check_template(tok, "chatml")


# ----------------------------------------------------------------------------- SFT


def test_sft_loss_ignores_user_tokens():
    m = _model()
    conv = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    conv2 = [{"role": "user", "content": "What is 2+4?"}, {"role": "assistant", "content": "5"}]
    ids, lab = pad_batch([encode_chat(conv, TOK)], TOK.pad_id)
    ids2, lab2 = pad_batch([encode_chat(conv2, TOK)], TOK.pad_id)
    assert torch.equal(lab, lab2) and not torch.equal(ids, ids2)
    # the loss counts exactly the assistant tokens: equal to a hand-computed CE over those positions
    logits = m(ids)
    pos = (lab[0, 1:] != IGNORE_INDEX).nonzero().squeeze(-1)
    manual = torch.nn.functional.cross_entropy(logits[0, pos], lab[0, pos + 1])
    assert torch.allclose(sft_loss(m, ids, lab), manual)
    # changing a user token changes the context but not which tokens are scored: with the model's
    # attention blocked from the user turn (prefix-independent model), the loss is unchanged
    emb = m.tok_embeddings.weight.detach().clone()
    changed = (ids != ids2).nonzero()[0, 1].item()
    with torch.no_grad():
        m.tok_embeddings.weight[ids2[0, changed]] = emb[ids[0, changed]]  # make the two ids identical
    assert torch.allclose(sft_loss(m, ids, lab), sft_loss(m, ids2, lab2))
    # and under mask="none" the user token itself is a target, so the loss changes
    _, labn = pad_batch([encode_chat(conv, TOK, mask="none")], TOK.pad_id)
    _, labn2 = pad_batch([encode_chat(conv2, TOK, mask="none")], TOK.pad_id)
    assert not torch.allclose(sft_loss(m, ids, labn), sft_loss(m, ids2, labn2))


def test_chat_losses_in_slices_equal_the_whole_logits():
    """SFT loss, DPO sequence log-probs and GRPO completion log-probs computed in slices of the loss (the stage plan's
    ``loss_chunk_tokens``) equal the textbook forms on a plain forward's logits, gradients included."""
    F = torch.nn.functional
    conv = [{"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "42, of course"}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, lab = pad_batch([encode_chat(conv, TOK), encode_chat(short, TOK)], TOK.pad_id)
    whole, sliced = _model(), _model()
    logits = whole(ids)
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    tgt = lab[:, 1:]
    keep = tgt != IGNORE_INDEX
    per_tok = torch.gather(lp, 2, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    seq_ref = per_tok.sum(-1)
    sft_ref = F.cross_entropy(logits[:, :-1][keep], tgt[keep])
    (sft_ref + seq_ref.sum()).backward()
    seq = sequence_logprobs(sliced, ids, lab, loss_chunk=5)
    sft = sft_loss(sliced, ids, lab, loss_chunk=5)
    (sft + seq.sum()).backward()
    torch.testing.assert_close(sft, sft_ref)
    torch.testing.assert_close(seq, seq_ref)
    for (n, p), (_, q) in zip(whole.named_parameters(), sliced.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=n, rtol=1e-5, atol=1e-6 * float(p.grad.abs().max()))
    n0 = 6  # GRPO: the completion is everything after the prompt's n0 tokens
    ref = torch.gather(F.log_softmax(logits[:, n0 - 1:-1].float(), -1), 2, ids[:, n0:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(completion_logprobs(sliced, ids, n0, loss_chunk=3), ref.detach())


def test_sft_loss_falls():
    torch.manual_seed(0)
    m = _model()
    ex = encode_conversations(chat_examples(64, seed=1), TOK)
    ids, lab = pad_batch(ex[:16], TOK.pad_id)
    with torch.no_grad():
        before = float(sft_loss(m, ids, lab))
    losses = train_sft(m, ex, steps=60, lr=3e-3, batch_size=16, pad_id=TOK.pad_id)
    with torch.no_grad():
        after = float(sft_loss(m, ids, lab))
    assert before > 4.0  # ~ln(264) at init
    assert after < 0.5 * before and losses[-1] < losses[0]


def test_sft_lr_follows_the_stage_schedule():
    from llmc.runtime.job import lr_factor

    m = _model()
    ex = encode_conversations(chat_examples(8, seed=2), TOK)
    sched = dict(steps=6, warmup_steps=2, schedule="linear", min_ratio=0.1)
    seen: list[float] = []
    train_sft(m, ex, steps=6, lr=1e-3, batch_size=2, pad_id=TOK.pad_id,
              lr_factor=lambda s: lr_factor(s, **sched), log=lambda step, st: seen.append(st["lr"]))
    # warmup 0.5, 1.0; then linear from 1 to 0.1 over the 4 post-warmup steps: 1, 0.775, 0.55, 0.325
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3, 7.75e-4, 5.5e-4, 3.25e-4])


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_dpo_and_grpo_lr_follow_the_stage_schedule(kind, monkeypatch):
    """DPO and GRPO used to train at the constant peak LR whatever the stage's schedule; they follow it as SFT
    does. The LR each optimizer step ran with is read from AdamW itself, against the hand-computed schedule."""
    from llmc.runtime.job import lr_factor

    sched = dict(steps=6, warmup_steps=2, schedule="linear", min_ratio=0.1)
    stepped: list[float] = []
    orig = torch.optim.AdamW.step

    def spy(self, *a, **k):
        stepped.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    m, logged = _model(), []
    kw = dict(steps=6, lr=1e-3, pad_id=TOK.pad_id, lr_factor=lambda s: lr_factor(s, **sched),
              log=lambda step, st: logged.append(st["lr"]))
    if kind == "dpo":
        train_dpo(m, encode_pairs(preference_pairs(8, seed=2), TOK), batch_size=2, **kw)
    else:
        train_grpo(m, arithmetic_prompts(4, seed=2), TOK, reward_fn=lambda c, it: float(len(c) % 2), group_size=2,
                   prompts_per_step=1, max_new_tokens=2, inner_steps=2, **kw)
    want = [5e-4, 1e-3, 1e-3, 7.75e-4, 5.5e-4, 3.25e-4]  # as test_sft_lr_follows_the_stage_schedule
    assert stepped == pytest.approx([w for w in want for _ in range(2 if kind == "grpo" else 1)])  # mu = 2 updates
    assert logged == pytest.approx(want)


def _forward_batches(m):
    """Record the batch size of every forward of ``m`` (what one micro-step holds in memory)."""
    seen: list[int] = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(int(args[0].shape[0])))
    return seen


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_micro_batches_accumulate_to_the_one_pass_step(kind):
    """The stage plan sizes memory for ``micro_batch`` sequences (pairs for DPO) per forward and backward and
    accumulates the rest; the loops used to forward the whole share at once. Accumulated over micro-batches of 1
    and 3, the step (losses, trained weights) equals the one-pass step, and every forward holds at most that."""
    if kind == "sft":
        data = encode_conversations(chat_examples(16, seed=4), TOK)

        def run(micro):
            m = _model()
            seen = _forward_batches(m)
            out = train_sft(m, data, steps=3, lr=2e-3, batch_size=6, pad_id=TOK.pad_id, micro_batch=micro)
            return m, seen, out
    else:
        data = encode_pairs(preference_pairs(16, seed=4), TOK)

        def run(micro):
            m = _model()
            ref = Reference(_model())  # its own copy: only the policy's forwards are counted
            seen = _forward_batches(m)
            out = [h["loss"] for h in train_dpo(m, data, steps=3, lr=2e-3, batch_size=6, pad_id=TOK.pad_id,
                                                reference=ref, micro_batch=micro)]
            return m, seen, out

    one, seen1, base = run(None)
    per_seq = 2 if kind == "dpo" else 1
    assert seen1 == [6 * per_seq] * 3
    for micro in (1, 3):
        m, seen, got = run(micro)
        assert max(seen) == micro * per_seq and len(seen) == 3 * (6 // micro), seen
        assert got == pytest.approx(base, rel=1e-5, abs=1e-6)
        # summed in another order; AdamW's normalised update turns that float noise into up to ~3e-6 on weights of
        # ~0.05 where a gradient is near 0 (DPO's first step starts at the reference), hence atol 1e-5
        for (k, a), b in zip(m.state_dict().items(), one.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------- DPO


def test_dpo_loss_formula():
    pi_w, pi_l = torch.tensor([-3.0]), torch.tensor([-5.0])
    ref_w, ref_l = torch.tensor([-4.0]), torch.tensor([-4.0])
    loss, st = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1)
    # -log sigmoid(0.1 * ((-3+4) - (-5+4))) = -log sigmoid(0.2)
    assert math.isclose(float(loss), -math.log(1 / (1 + math.exp(-0.2))), rel_tol=1e-6)
    assert math.isclose(st["margin"], 0.2, rel_tol=1e-6)


def test_dpo_step0_is_log2_and_margin_grows():
    torch.manual_seed(0)
    m = _model()
    pairs = encode_pairs(preference_pairs(32, seed=2), TOK)
    hist = train_dpo(m, pairs, steps=30, lr=2e-3, beta=0.1, batch_size=8, pad_id=TOK.pad_id)
    assert math.isclose(hist[0]["loss"], math.log(2), abs_tol=1e-5)
    assert abs(hist[0]["margin"]) < 1e-5
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.1
    # every pair once per epoch of 4 steps: the last steps' batches are pairs last seen an epoch earlier (with draws
    # with replacement, as before, recent repeats lifted this mean above 0.5)
    early, late = (sum(h["margin"] for h in hs) / 5 for hs in (hist[:5], hist[-5:]))
    assert late > 0.25 and late > early + 0.2, (early, late)


def test_dpo_reference_is_frozen_copy_or_lora_base():
    from llmc.runtime.lora import apply_lora

    m = _model()
    pairs = encode_pairs(preference_pairs(8), TOK)
    ids, lab = pad_batch([p[0] for p in pairs], TOK.pad_id)
    ref = Reference(m)
    r0 = ref.logprobs(ids, lab)
    train_dpo(m, pairs, steps=3, lr=1e-2, reference=ref, pad_id=TOK.pad_id)
    assert torch.equal(ref.logprobs(ids, lab), r0)  # reference unchanged
    assert not torch.allclose(sequence_logprobs(m, ids, lab).detach(), r0)
    m2 = _model()
    base_lp = sequence_logprobs(m2, ids, lab).detach()
    apply_lora(m2, rank=4, alpha=8)
    ref2 = Reference(m2)
    assert ref2.shared  # no second copy of the weights
    train_dpo(m2, pairs, steps=3, lr=1e-2, reference=ref2, pad_id=TOK.pad_id)
    assert torch.allclose(ref2.logprobs(ids, lab), base_lp, atol=1e-5)


def test_dpo_drops_pairs_left_without_response_tokens(capsys):
    """A pair whose prompt fills seq_len keeps no response token once cut (margin 0, loss log 2, no gradient) and
    used to be averaged in silently: it is dropped with a count, and a run where no pair is left fails clearly."""
    from llmc.runtime.dpo import usable_pairs
    from llmc.runtime.sft import next_token_targets

    long_prompt = [{"role": "user", "content": "x" * 100}]
    good = encode_pairs(preference_pairs(6, seed=3), TOK)
    bad = encode_pairs([{"prompt": long_prompt, "chosen": "good answer", "rejected": "bad"}], TOK)
    # which sides keep a trained token, from the batch the loss sees (pad_batch, then the shifted targets)
    for max_len in (40, 64, 110, 112, 115, None):
        want = [all(bool((next_token_targets(pad_batch([side], TOK.pad_id, max_len)[1]) != IGNORE_INDEX).any())
                    for side in pair) for pair in good + bad]
        kept, dropped = usable_pairs(good + bad, max_len)
        assert kept == [p for p, w in zip(good + bad, want, strict=True) if w] and dropped == want.count(False)
    # the dropped pair changes nothing: the same run as on the usable pairs alone
    runs = []
    for pairs in (good + bad, good):
        m = _model()
        runs.append((train_dpo(m, pairs, steps=3, lr=2e-3, batch_size=4, pad_id=TOK.pad_id, max_len=64), m))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].parameters(), runs[1][1].parameters(), strict=True))
    assert "1 of 7 preference pairs dropped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no preference pair keeps a response token within seq_len 64"):
        train_dpo(_model(), bad, steps=1, lr=1e-3, pad_id=TOK.pad_id, max_len=64)


def test_conversational_preference_records_are_one_clear_error():
    rec = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": "5"}
    with pytest.raises(ValueError, match="preference record 0: 'chosen' is a list, not a string"):
        encode_pairs([rec], TOK)


# ----------------------------------------------------------------------------- reward


@pytest.mark.parametrize("text,expr,want", [
    ("5", "2+3", 1.0), ("The answer is 5.", "2+3", 1.0), ("2+3=5", "2+3", 1.0), ("\\boxed{5}", "2+3", 1.0),
    ("6", "2+3", 0.0), ("0.5", "1/2", 1.0), ("3/7", "6/14", 1.0), ("x = -4", "1-5", 1.0), ("-2/3", "4/(-6)", 1.0),
    # the answer is a number literal: echoing the question's expression (or an unreduced fraction of it) scores 0
    ("\\boxed{17*23}", "17*23", 0.0), ("\\boxed{391}", "17*23", 1.0), ("= 12 - 5", "12-5", 0.0),
    ("answer: 84 / 12", "84/12", 0.0), ("answer: 7", "84/12", 1.0), ("\\boxed{(37+45)}", "37+45", 0.0),
    ("2/4", "1/2", 0.0), ("4/1", "4", 0.0),
    ("", "2+3", 0.0), ("five", "2+3", 0.0), ("__import__('os')", "2+3", 0.0), ("9" * 500, "2+3", 0.0),
    ("5", "not an expression", 0.0), ("5", "", 0.0), ("1/0", "2+3", 0.0), ("2**999999", "2+3", 0.0),
])
def test_arithmetic_reward(text, expr, want):
    assert arithmetic_reward(text, expr) == want


def test_reward_never_crashes_on_junk():
    for junk in [None, 3, b"\xff", "((((", "=" * 100, "answer: ", "\\boxed{}", "1e999999", "nan", "-"]:
        assert arithmetic_reward(junk, "1+1") == 0.0  # type: ignore[arg-type]
    assert extract_answer("first 3 then 7") == "7"


# ----------------------------------------------------------------------------- GRPO


def test_group_advantages_known_vector():
    r = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0])  # 8 samples, 5 correct: (1 - 5/8) / std = 0.7246
    a = group_advantages(r)
    assert torch.allclose(a[:5], torch.full((5,), 0.7246), atol=1e-4)
    assert torch.allclose(a[5:], torch.full((3,), -1.2076), atol=1e-4)
    assert torch.equal(group_advantages(torch.ones(8)), torch.zeros(8))
    assert torch.equal(group_advantages(torch.zeros(2, 4))[1], torch.zeros(4))
    assert torch.equal(group_advantages(torch.tensor([1.0])), torch.zeros(1))


def test_grpo_loss_clip_and_kl():
    mask = torch.ones(1, 3)
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    # ratios 0.5, 1.0, 1.5 with positive advantage: the 1.5 token is clipped to 1.2, gradient 0 there
    logp = (old + torch.log(torch.tensor([[0.5, 1.0, 1.5]]))).requires_grad_(True)
    loss, st = grpo_loss(logp, old, torch.tensor([1.0]), mask, None, clip_eps=0.2, kl_coef=0.0)
    assert math.isclose(st["clip_frac"], 2 / 3, rel_tol=1e-6)
    assert math.isclose(float(loss.detach()), -(0.5 + 1.0 + 1.2) / 3, rel_tol=1e-6)
    loss.backward()
    g = logp.grad[0]
    assert g[2] == 0 and g[0] < 0 and g[1] < 0  # ratio 0.5 with A>0 is not clipped (min picks it)
    # negative advantage: now the low ratio is clipped (min(-0.5, -0.8) = -0.8) and the high one is not
    logp2 = logp.detach().clone().requires_grad_(True)
    loss2, _ = grpo_loss(logp2, old, torch.tensor([-1.0]), mask, None, clip_eps=0.2, kl_coef=0.0)
    assert math.isclose(float(loss2.detach()), (0.8 + 1.0 + 1.5) / 3, rel_tol=1e-6)
    loss2.backward()
    assert logp2.grad[0, 0] == 0 and logp2.grad[0, 2] > 0
    # KL: zero when policy == reference, positive otherwise (k3 >= 0)
    x = torch.randn(2, 5)
    assert torch.equal(kl_k3(x, x), torch.zeros(2, 5))
    assert bool((kl_k3(x, x + torch.randn(2, 5)) >= 0).all())
    _, st = grpo_loss(x, x, torch.zeros(2), torch.ones(2, 5), ref_logp=x, kl_coef=0.04)
    assert st["kl"] == 0.0 and st["clip_frac"] == 0.0
    # padded tokens do not count
    l_a, _ = grpo_loss(x, x, torch.ones(2), torch.tensor([[1, 1, 0, 0, 0]] * 2), ref_logp=x + 1)
    l_b, _ = grpo_loss(x[:, :2], x[:, :2], torch.ones(2), torch.ones(2, 2), ref_logp=x[:, :2] + 1)
    assert torch.allclose(l_a, l_b)


def _sampling_arch(kind: str) -> Architecture:
    """The sampler tests' models: grouped-query attention, with a 4-token sliding window, with no RoPE in layer 1
    (SmolLM3's NoPE), OLMo 3's block with the window in layer 0 only and YaRN in layer 1 only, Gemma 3's block (the
    window in layer 0 at its own RoPE base), Gemma 2's (soft-capped scores and logits: no fused kernel, its own masks)
    and MLA with MoE blocks (DeepSeek-V3's shape)."""
    from llmc.spec.model import MLA, MoE, RopeScaling

    if kind == "gemma3":
        return ARCH.model_copy(update={"qk_norm": True, "norm_placement": "sandwich", "norm_unit_offset": True,
                                       "activation": "gelu_tanh", "embedding_scale": True, "sliding_window": 4,
                                       "full_attention_layers": (1,), "sliding_rope_theta": 100.0})
    if kind == "gemma2":  # small caps, so that they bind on the small initial scores and logits
        return ARCH.model_copy(update={"norm_placement": "sandwich", "norm_unit_offset": True, "activation": "gelu_tanh",
                                       "embedding_scale": True, "sliding_window": 4, "full_attention_layers": (1,),
                                       "attn_logit_softcap": 0.02, "final_logit_softcap": 0.5})
    if kind == "olmo3":
        return ARCH.model_copy(update={"qk_norm": True, "qk_norm_scope": "projection", "norm_placement": "post",
                                       "sliding_window": 4, "full_attention_layers": (1,), "rope_scaling":
                                       RopeScaling(type="yarn", factor=4.0, original_max_position=64)})
    if kind != "mla_moe":
        return ARCH.model_copy(update={"gqa": {}, "gqa_window": {"sliding_window": 4},
                                       "gqa_nope": {"nope_layers": (1,)}}[kind])
    return Architecture(
        name="t", n_layers=3, d_model=48, n_heads=4, d_ff=64, vocab_size=TOK.vocab_size, max_seq_len=256,
        mla=MLA(q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=10),
        moe=MoE(num_experts=4, top_k=2, num_shared_experts=1, expert_d_ff=24, dense_layers=1))


@pytest.mark.parametrize("kind", ["gqa", "gqa_window", "gqa_nope", "olmo3", "gemma3", "gemma2", "mla_moe"])
def test_kv_cache_sampling_equals_rerunning_the_sequence(kind):
    """The sampler runs the prompt once into a KV cache, then one position per new token; re-running the whole
    sequence per token (the plain forward) must give the same logits, hence the same tokens from the same
    generator: grouped-query attention (also with a 4-token sliding window, shorter than the prompt, or with no RoPE
    in one layer), and MLA with MoE blocks (DeepSeek-V3's shape, rope keys cached)."""
    from llmc.runtime.model import KVCache

    arch = _sampling_arch(kind)
    m = build_model(arch, seed=3)
    from llmc.runtime.chat import encode_prompt

    p = encode_prompt([{"role": "user", "content": "12+30="}], TOK)
    stop = TOK.token_to_id("<|eot_id|>")
    ids = torch.tensor(p).repeat(3, 1)
    with torch.no_grad():  # the cache's logits, position by position, against the full forward's
        cache = KVCache()
        got = [m(ids[:, :5], cache=cache)[:, -1]] + [m(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(5, len(p))]
        full = m(ids)[:, 4:]
    torch.testing.assert_close(torch.stack(got, 1), full, rtol=1e-4, atol=1e-5)
    for temp in (0.0, 1.0):
        a = sample_group(m, p, 4, 12, stop, TOK.pad_id, temp, torch.Generator().manual_seed(1))
        b = sample_group(m, p, 4, 12, stop, TOK.pad_id, temp, torch.Generator().manual_seed(1), kv_cache=False)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kind", ["gqa", "gqa_window", "gqa_nope", "olmo3", "gemma3", "gemma2", "mla_moe"])
def test_groups_sampled_in_one_batch_equal_each_group_alone(kind):
    """The sampler samples a rank's groups in one batch (one decoding forward reads the weights once for all of
    them): prompts of different lengths are left-padded, each row keeps its own RoPE positions and no query sees a
    padding key (also in a NoPE layer, where only that mask keeps the padding out). Each row's logits must equal those of its prompt run alone, step by step, and greedy samples must
    equal each group's own (re-running the whole sequence per token, no cache, no padding)."""
    from llmc.runtime.chat import encode_prompt
    from llmc.runtime.model import KVCache

    arch = _sampling_arch(kind)
    m = build_model(arch, seed=5).eval()
    prompts = [encode_prompt([{"role": "user", "content": q}], TOK) for q in ("7+5=", "123+456=", "12*34*56*78=")]
    assert len({len(p) for p in prompts}) == 3
    L = max(len(p) for p in prompts)
    nxt = torch.tensor([[11], [12], [13]])
    with torch.no_grad():
        x = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
        cache = KVCache(pad=torch.tensor([L - len(p) for p in prompts]))
        batched = [m(x, cache=cache)[:, -1], m(nxt, cache=cache)[:, -1], m(nxt + 1, cache=cache)[:, -1]]
        for i, p in enumerate(prompts):
            alone = m(torch.tensor([p + [11 + i, 12 + i]]))[0, -3:]
            torch.testing.assert_close(torch.stack([b[i] for b in batched]), alone, rtol=1e-4, atol=1e-5)
    stop = TOK.token_to_id("<|eot_id|>")
    together = sample_groups(m, prompts, 2, 10, stop, TOK.pad_id, 0.0)
    for p, (full, mask) in zip(prompts, together, strict=True):
        ref_full, ref_mask = sample_group(m, p, 2, 10, stop, TOK.pad_id, 0.0, kv_cache=False)
        assert torch.equal(full, ref_full) and torch.equal(mask, ref_mask)


def test_sampling_stops_and_masks():
    m = _model()
    from llmc.runtime.chat import encode_prompt

    p = encode_prompt([{"role": "user", "content": "1+1="}], TOK)
    stop = TOK.token_to_id("<|eot_id|>")
    full, mask = sample_group(m, p, 4, 6, stop, TOK.pad_id, 1.0, torch.Generator().manual_seed(0))
    assert full.shape[0] == 4 and full.shape[1] == len(p) + mask.shape[1]
    for row, mr in zip(full[:, len(p):], mask, strict=True):
        hits = (row == stop).nonzero()
        if len(hits):
            k = int(hits[0])
            assert mr[: k + 1].all() and not mr[k + 1:].any()
    lp = completion_logprobs(m, full, len(p))
    assert lp.shape == mask.shape and bool((lp <= 0).all())


def test_sampling_stops_on_eos_as_serving_does():
    """A rollout ends on the turn's end token or on EOS (the exported generation config stops serving on both);
    stopping only on the turn's end trained GRPO on tokens sampled after an EOS. Greedy rows whose first token is
    made a stop token end there, mask 1 on it and nothing after."""
    from llmc.runtime.chat import encode_prompt

    m = _model()
    p = encode_prompt([{"role": "user", "content": "1+1="}], TOK)
    eot = TOK.token_to_id("<|eot_id|>")
    full, mask = sample_group(m, p, 2, 6, eot, TOK.pad_id, 0.0)
    first = int(full[0, len(p)])
    assert first != eot and mask.shape[1] > 1  # the greedy rollout goes on past its first token ...
    full, mask = sample_group(m, p, 2, 6, (eot, first), TOK.pad_id, 0.0)
    assert mask.tolist() == [[1], [1]] and full[:, len(p):].tolist() == [[first], [first]]  # ... unless it stops


def _p_correct(m, prompts):
    """Mean probability the policy assigns to the exactly-correct completion 'answer<|eot_id|>'."""
    from llmc.runtime.chat import encode_prompt

    stop = TOK.token_to_id("<|eot_id|>")
    out = []
    with torch.no_grad():
        for it in prompts:
            p = encode_prompt(it["prompt"], TOK)
            full = torch.tensor([p + TOK.encode(str(it["answer"])) + [stop]])
            out.append(float(completion_logprobs(m, full, len(p)).sum().exp()))
    return sum(out) / len(out)


def test_grpo_micro_batches_equal_the_whole_group_update():
    """The stage plan sizes GRPO's memory for ``micro_batch`` completions per forward and backward; the update used
    to take a whole group at once. Sliced into parts of a group, the step (losses, KL, trained weights) equals the
    whole-group step, and no forward with gradients holds more than the slice (sampling still runs whole groups)."""
    prompts = arithmetic_prompts(20, seed=3, hi=2)

    def run(micro, groups=None):
        torch.manual_seed(0)
        m = _model()
        seen: list[tuple[int, bool]] = []
        m.register_forward_pre_hook(lambda mod, args: seen.append((int(args[0].shape[0]), torch.is_grad_enabled())))
        hist = train_grpo(m, prompts, TOK, steps=2, lr=1e-3, reward_fn=lambda c, it: arithmetic_reward(c, it["expression"]),
                          group_size=4, prompts_per_step=3, max_new_tokens=4, kl_coef=0.04, pad_id=TOK.pad_id,
                          seed=2, reference=Reference(_model()), micro_batch=micro, sampling_groups=groups)
        return m, seen, hist

    one, seen1, base = run(None)
    assert max(b for b, grad in seen1 if grad) == 4
    for micro in (1, 2):
        m, seen, hist = run(micro)
        assert max(b for b, grad in seen if grad) == micro
        assert max(b for b, grad in seen if not grad) == 12  # the step's 3 groups are sampled in one batch
        for h, h1 in zip(hist, base, strict=True):
            assert (h["loss"], h["kl"], h["reward_mean"]) == pytest.approx((h1["loss"], h1["kl"], h1["reward_mean"]),
                                                                            rel=1e-4, abs=1e-6)
        for (k, a), b in zip(m.state_dict().items(), one.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    # the plan's sampling batch (groups whose KV caches fit at once): 2 groups, then the third
    _, seen2, _ = run(None, groups=2)
    assert {b for b, grad in seen2 if not grad} >= {8, 4} and max(b for b, grad in seen2 if not grad) == 8


def test_grpo_improves_reward_on_easy_arithmetic():
    """Format-only SFT warm start (random answers), then GRPO with the sympy verifier on a+b, a,b in 0..2."""
    torch.manual_seed(0)
    m = _model()
    train_sft(m, encode_conversations(format_examples(300, hi=2), TOK), steps=120, lr=3e-3, batch_size=16,
              pad_id=TOK.pad_id)
    evalset = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": a + b}
               for a in range(3) for b in range(3)]
    before = _p_correct(m, evalset)
    hist = train_grpo(m, arithmetic_prompts(100, seed=5, hi=2), TOK, steps=40, lr=1e-3,
                      reward_fn=lambda c, it: arithmetic_reward(c, it["expression"]), group_size=8,
                      prompts_per_step=6, max_new_tokens=4, kl_coef=0.04, pad_id=TOK.pad_id, seed=1)
    after = _p_correct(m, evalset)
    first = sum(h["reward_mean"] for h in hist[:5]) / 5
    last = sum(h["reward_mean"] for h in hist[-10:]) / 10
    assert before < 0.35  # format learned, arithmetic not
    assert after > before + 0.08, (before, after)  # seeds 0-2: +0.13 .. +0.43
    assert last > first, (first, last)
    assert all(h["kl"] >= 0 for h in hist)


def test_grpo_ratio_is_one_on_the_first_update_with_lora_dropout(monkeypatch):
    """LoRA dropout (0.05 by default) used to draw a new mask in the 'old' log-prob pass and in the training pass,
    so with one update per batch (policy == old policy) the ratio was not 1 and clipping fired. Dropout is off in
    GRPO's policy passes: the ratio exp(logp - old) is exactly 1, nothing is clipped, and the model's dropout is
    back afterwards."""
    import llmc.runtime.grpo as grpo
    from llmc.runtime.lora import apply_lora, lora_modules

    torch.manual_seed(0)
    m = _model()
    apply_lora(m, rank=8, alpha=16, dropout=0.5)
    with torch.no_grad():
        for mod in lora_modules(m):
            mod.lora_B.normal_(0, 0.2)  # trained adapters: dropout changes the output
    m.train()
    full = torch.randint(0, 256, (2, 12))
    with torch.no_grad():  # the setup can fail the test: two train-mode passes differ under dropout
        assert not torch.equal(completion_logprobs(m, full, 6), completion_logprobs(m, full, 6))
    seen = []
    real = grpo.grpo_loss

    def spy(logp, old_logp, *a, **k):
        seen.append(torch.exp(logp.detach() - old_logp))
        return real(logp, old_logp, *a, **k)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    hist = train_grpo(m, arithmetic_prompts(4, seed=0), TOK, steps=2, lr=1e-3,
                      reward_fn=lambda t, it: float(len(t) % 2), group_size=4, prompts_per_step=2, max_new_tokens=6, inner_steps=1, grad_clip=None,
                      pad_id=TOK.pad_id)
    assert len(seen) == 4 and all(torch.equal(r, torch.ones_like(r)) for r in seen)
    assert [h["clip_frac"] for h in hist] == [0.0, 0.0]
    assert {mod.dropout.p for mod in lora_modules(m)} == {0.5}


def _forward_rows(m):
    """Record the first row of every forward of ``m`` (the first: the sampled prompt)."""
    seen: list[list[int]] = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0].tolist()))
    return seen


def test_grpo_left_truncates_long_prompts(capsys):
    """A prompt longer than max_prompt_tokens (or than the model's context less max_new_tokens) used to crash the
    stage mid-sampling; it keeps its last tokens (TRL's left truncation of GRPO prompts)."""
    from llmc.runtime.chat import encode_prompt

    item = {"prompt": [{"role": "user", "content": "7" * 110 + "+1="}], "expression": "1+1"}
    full_prompt = encode_prompt(item["prompt"], TOK)
    small = Architecture(name="t", n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64,
                         vocab_size=TOK.vocab_size, max_seq_len=128)
    assert len(full_prompt) + 16 > 128  # the context the forward refuses
    for limit, want in ((20, 20), (None, 128 - 16)):
        m = build_model(small, seed=0)
        prompts_seen = _forward_rows(m)
        train_grpo(m, [item], TOK, steps=1, lr=1e-3, reward_fn=lambda t, it: 0.0, group_size=2, prompts_per_step=1,
                   max_new_tokens=16, pad_id=TOK.pad_id, max_prompt_tokens=limit)
        assert prompts_seen[0] == full_prompt[-want:]
        assert f"1 of 1 prompts longer than {want} tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        train_grpo(build_model(small, seed=0), [item], TOK, steps=1, lr=1e-3, reward_fn=lambda t, it: 0.0,
                   group_size=2, prompts_per_step=1, max_new_tokens=128, pad_id=TOK.pad_id)


def test_grpo_without_kl_runs_no_reference_forward():
    """kl_coef 0: the reference's log-probs were computed and thrown away; no reference pass runs now."""
    ref_model = _model()
    calls: list[int] = []
    ref_model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    train_grpo(_model(), arithmetic_prompts(4, seed=0), TOK, steps=1, lr=1e-3, reward_fn=lambda t, it: 0.0,
               group_size=2, prompts_per_step=1, max_new_tokens=2, kl_coef=0.0, pad_id=TOK.pad_id,
               reference=Reference(ref_model))
    assert calls == []
    train_grpo(_model(), arithmetic_prompts(4, seed=0), TOK, steps=1, lr=1e-3, reward_fn=lambda t, it: 0.0,
               group_size=2, prompts_per_step=1, max_new_tokens=2, kl_coef=0.04, pad_id=TOK.pad_id,
               reference=Reference(ref_model))
    assert calls  # the hook sees the reference's forwards when there is a KL term


def test_post_training_forwards_run_under_pretrainings_bf16_autocast():
    """Post-training ran its forwards in fp32 whatever the precision (pre-training autocasts to bf16 on CUDA, and the
    stage plans assume bf16 compute). bf16_forwards puts a module's forward under the same autocast (CPU: only with
    cpu_bf16, as pre-training), the backward outside it; a deepcopy (DPO's frozen reference) computes with its own
    weights."""
    import copy

    from llmc.runtime.posttrain import bf16_forwards
    from llmc.runtime.train import _autocast

    class Job:
        precision = "bf16"

    m = _model()
    ids = torch.randint(0, 50, (2, 8))
    assert m(ids).dtype == torch.float32
    assert bf16_forwards(m, Job, torch.device("cpu")) is m and m(ids).dtype == torch.float32  # CPU: fp32 by default
    bf16_forwards(m, Job, torch.device("cpu"), cpu_bf16=True)
    out = m(ids)
    assert out.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
    with _autocast(Job, torch.device("cpu"), True):
        ref = _model()(ids)  # the same weights (seeded), the same autocast by hand
    assert torch.equal(out, ref)
    out.float().sum().backward()  # the backward outside autocast, grads in the parameters' fp32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in m.parameters())
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert twin(ids).dtype == torch.bfloat16 and not torch.equal(twin(ids), m(ids))
    Job.precision = "fp32"
    plain = _model()
    assert bf16_forwards(plain, Job, torch.device("cpu"), cpu_bf16=True)(ids).dtype == torch.float32


def test_document_text_quoting_special_tokens_stays_text_while_templates_place_theirs(tmp_path):
    """A web page quoting "<|end_of_text|>" encoded to the EOS id (tokenizers reads added tokens out of any text), a
    fake document boundary in the packed stream; a chat turn could forge a turn end. llmc's tokenizer reads document
    text as text (an exact round trip, no special id), while a chat template's own special tokens are still single
    ids, equal to transformers' apply_chat_template. Its config no longer claims a BOS that pre-training never saw."""
    import json

    transformers = pytest.importorskip("transformers")
    from llmc.runtime.tokenizer import TextTokenizer, train_bpe
    from llmc.spec.chat import CHAT_TEMPLATES

    path = train_bpe(["the quick brown fox jumps over the lazy dog " * 3] * 50, 400, tmp_path / "tok")
    tok = TextTokenizer(path)
    specials = {tok.token_id(s) for s in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")}
    doc = "a page quoting <|end_of_text|> and <|eot_id|> and <|begin_of_text|> literally"
    ids = tok.encode(doc)
    assert not specials & set(ids) and tok.decode(ids) == doc
    conv = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "the dog"}]
    t = CHAT_TEMPLATES["llama3"]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token=t.bos,
                                              chat_template=t.jinja)
    got, _ = encode_chat(conv, tok, "llama3")
    assert got == hf.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert got.count(tok.token_id("<|eot_id|>")) == 2 and tok.tok.encode_special_tokens is True  # restored
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False
    auto = transformers.AutoTokenizer.from_pretrained(str(path))
    assert auto("the fox")["input_ids"] == tok.encode("the fox")  # no BOS, as pre-training packed it
