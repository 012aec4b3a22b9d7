"""Small offline datasets for post-training stages whose data has no path (``format: builtin``).

* ``chat_examples``: short instruction conversations (arithmetic, copy, upper-casing) for SFT.
* ``preference_pairs``: (prompt, chosen, rejected) with a correct vs a wrong answer, for DPO.
* ``arithmetic_prompts``: prompts ``"a+b="`` with the expression, for GRPO with the sympy verifier.
* ``ByteTokenizer``: 256 byte ids + the llmc special tokens, for fast unit tests without BPE training.

Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import random

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|im_start|>", "<|im_end|>")

SYSTEM = "You are a helpful assistant."
WORDS = ["cat", "dog", "sun", "tree", "code", "data", "lamp", "river", "stone", "cloud", "bird", "fish"]


class ByteTokenizer:
    """Bytes 0..255 are ids 0..255; special tokens follow. ``specials`` chooses which exist."""

    def __init__(self, specials: tuple[str, ...] = SPECIALS):
        self.specials = {s: 256 + i for i, s in enumerate(specials)}
        self.inv = {v: k for k, v in self.specials.items()}
        self.pad_id = self.specials.get("<|pad|>", 0)
        self.eos_id = self.specials.get("<|end_of_text|>", 0)
        self.bos_id = self.specials.get("<|begin_of_text|>")

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_to_id(self, tok: str) -> int | None:
        return self.specials.get(tok)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out += self.inv.get(i, "").encode()
        return out.decode("utf-8", errors="replace")


def _sum_problem(rng: random.Random, hi: int) -> tuple[str, int]:
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return f"{a}+{b}", a + b


def chat_examples(n: int, seed: int = 0, hi: int = 4) -> list[list[dict]]:
    """n conversations: arithmetic ('What is 2+3?' -> '5'), copy and upper-case tasks; some two-turn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            expr, val = _sum_problem(rng, hi)
            turns = [(f"What is {expr}?" if rng.random() < 0.5 else f"{expr}=", str(val))]
        elif kind == 1:
            w = rng.choice(WORDS)
            turns = [(f"Repeat: {w}", w)]
        else:
            w = rng.choice(WORDS)
            turns = [(f"Upper: {w}", w.upper())]
        if rng.random() < 0.3:
            w = rng.choice(WORDS)
            turns.append((f"Repeat: {w}", w))
        msgs = [{"role": "system", "content": SYSTEM}]
        for u, a in turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        out.append(msgs)
    return out


def preference_pairs(n: int, seed: int = 0, hi: int = 4) -> list[dict]:
    """n pairs {prompt: messages, chosen: str, rejected: str}: the right sum vs a wrong one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        expr, val = _sum_problem(rng, hi)
        wrong = val
        while wrong == val:
            wrong = rng.randint(0, 2 * hi)
        out.append({"prompt": [{"role": "user", "content": f"{expr}="}], "chosen": str(val),
                    "rejected": str(wrong)})
    return out


def arithmetic_prompts(n: int, seed: int = 0, hi: int = 4) -> list[dict]:
    """n prompts {prompt: messages, expression: 'a+b', answer: int}; answers in 0..2*hi."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        expr, val = _sum_problem(rng, hi)
        out.append({"prompt": [{"role": "user", "content": f"{expr}="}], "expression": expr, "answer": val})
    return out


def format_examples(n: int, seed: int = 0, hi: int = 4) -> list[list[dict]]:
    """Format-only warm start for GRPO: 'a+b=' answered with a *random* number in 0..2*hi.

    Teaches the answer format (a number then the end token) without the arithmetic, so the
    verifier's reward starts near chance and GRPO has something to learn.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        expr, _ = _sum_problem(rng, hi)
        out.append([{"role": "user", "content": f"{expr}="},
                    {"role": "assistant", "content": str(rng.randint(0, 2 * hi))}])
    return out
