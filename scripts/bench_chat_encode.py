"""Time how fast post-training encodes conversations (``llmc.runtime.chat.encode_chat``: render, tokenise in one
call, label the trained tokens), for a named template and for the tokenizer's own (gpt-oss's harmony excerpt of
tests/fixtures/chat_templates, rendered by transformers), at growing conversation lengths. Every rank of an SFT /
DPO stage encodes its data before the first step, so this is start-up time per 1,000 conversations.

    .venv/bin/python scripts/bench_chat_encode.py

The tokenizer is llmc's own byte-level BPE trained on the demo corpus (its merges make token counts realistic),
with the harmony special tokens added.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HARMONY = ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"]


def main() -> None:
    from llmc.runtime import corpus
    from llmc.runtime.chat import encode_chat, load_tokenizer_template
    from llmc.runtime.tokenizer import TextTokenizer, train_bpe

    tmp = Path(tempfile.mkdtemp())
    corpus.write_corpus(tmp / "docs.jsonl", max_docs=2000)
    texts = [json.loads(line)["text"] for line in (tmp / "docs.jsonl").read_text().splitlines()]
    d = train_bpe(texts, 4096, tmp / "tok")
    tok = TextTokenizer(d)
    tok.tok.add_special_tokens(HARMONY)
    tok.tok.save(str(d / "tokenizer.json"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|return|>"}))
    (d / "chat_template.jinja").write_text((ROOT / "tests/fixtures/chat_templates/gpt-oss.jinja").read_text())
    tok = TextTokenizer(d)
    own = load_tokenizer_template(d)
    words = " ".join(texts)[:200_000]
    print("| template | tokens / conversation | ms / conversation (median of 20) |")
    print("|---|---:|---:|")
    for chars in (2_000, 8_000, 32_000):
        conv = [{"role": "user", "content": words[:chars // 2]},
                {"role": "assistant", "content": words[chars // 2:chars]}]
        for name, template in (("llama3", "llama3"), ("tokenizer (harmony)", own)):
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                ids, _ = encode_chat(conv, tok, template)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            print(f"| {name} | {len(ids):,} | {ms:.1f} |")


if __name__ == "__main__":
    main()
