"""Byte-level BPE tokenizer: train offline with ``tokenizers``, save an HF-compatible directory, load it.

The directory holds ``tokenizer.json`` and ``tokenizer_config.json`` (bos/eos/pad), which is what
torchtitan's ``HuggingFaceTokenizer`` and ``transformers.AutoTokenizer`` read. Special tokens (Llama-3
names): ``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|pad|>``, ``<|start_header_id|>``,
``<|end_header_id|>``, ``<|eot_id|>``; they take ids 0..5.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT]

#: A Hugging Face tokenizer folder's files that llmc carries along (prepare copies them into assets/, an export into
#: its folder): the tokenizer, its config (bos/eos/pad, the legacy ``chat_template``), the special-token map, and the
#: chat template as transformers (>= 4.43) saves it, which takes priority over the config's
#: (transformers tokenization_utils_base: "chat template file(s) ... take priority over template entries in the
#: tokenizer config")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (256 byte symbols + specials + merges).

    Deterministic for the same texts. Writes ``out_dir/tokenizer.json`` and ``tokenizer_config.json``
    atomically and returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size {vocab_size} < {min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"tokenizer.json.tmp{os.getpid()}"
    tok.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False,  # as trained: documents are packed without BOS
        "model_max_length": 1_000_000_000,
        "additional_special_tokens": [START_HEADER, END_HEADER, EOT],
    }
    tmp = out / f"tokenizer_config.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "tokenizer_config.json")
    return out


class TextTokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the ids the trainers need."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        p = Path(path)
        self.dir = p if p.is_dir() else p.parent
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.exists():
            raise FileNotFoundError(f"{file}: no tokenizer.json (run `python -m llmc.runtime.entry prepare`)")
        self.tok = Tokenizer.from_file(str(file))
        # a document's text is text: "<|end_of_text|>" quoted in a web page is not the EOS that separates packed
        # documents (tokenizers otherwise reads every added token out of the text). Chat templates, which place
        # special tokens on purpose, encode with it off (llmc.runtime.chat).
        self.tok.encode_special_tokens = True
        cfg_file = self.dir / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}

        def tid(name: str | None, default: str | None) -> int | None:
            tok = name if isinstance(name, str) else (name or {}).get("content") if name else default
            return self.tok.token_to_id(tok) if tok else None

        self.bos_id = tid(cfg.get("bos_token"), BOS)
        self.eos_id = tid(cfg.get("eos_token"), EOS)
        self.pad_id = tid(cfg.get("pad_token"), PAD)
        if self.pad_id is None:
            self.pad_id = self.eos_id
        if self.eos_id is None:
            raise ValueError(f"{file}: tokenizer has no end-of-text token ({EOS})")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
