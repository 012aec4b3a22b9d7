"""Chat templates: how SFT / DPO / GRPO lay out a conversation, declared once (data, no logic).

The runtime encodes conversations from these entries (:mod:`llmc.runtime.chat`), the compiler checks that the
tokenizer has their special tokens (T103, :mod:`llmc.compiler.stages`), and an export writes their ``jinja``
form into tokenizer_config.json (what transformers' ``apply_chat_template``, vLLM and SGLang read). A turn is
``header`` + content + ``end`` + ``after_end``; in ``header``, ``{role}`` alone is the role name as text, a
``<|...|>`` part is one special token (``{role}`` inside it names the role's own token, as Phi-3's ``<|user|>``),
any other part is text. The model learns each assistant turn's content and its ``end`` token (so it learns to stop).

Sources:
  * llama3: https://www.llama.com/docs/model-cards-and-prompt-formats/meta-llama-3/ (the real template puts "\\n\\n"
    after the header)
  * chatml (Qwen): https://github.com/openai/openai-python/blob/release-v0.28.0/chatml.md
  * phi3 (Phi-3-mini / Phi-3.5-mini instruct): https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/tokenizer_config.json
    (``<|{role}|>\\n{content}<|end|>\\n``; the template's trailing eos_token after a whole conversation is not
    trained: <|end|> is what the released generation config stops on)
  * phi4 (Phi-4): https://huggingface.co/microsoft/phi-4/blob/main/tokenizer_config.json
    (``<|im_start|>{role}<|im_sep|>{content}<|im_end|>``, no newlines)
  * gemma (Gemma 3 instruct): https://huggingface.co/google/gemma-3-1b-it/blob/main/tokenizer_config.json
    (``<bos><start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n...``: the assistant's role is
    "model", there is no system turn, a system message's content + "\n\n" opens the first user turn, every turn's
    content is trimmed; its generation config stops on <end_of_turn>). Gemma 2 instruct has the same turns
    (https://huggingface.co/google/gemma-2-2b-it/blob/main/tokenizer_config.json); its own template refuses a system
    message, which this one folds into the first user turn as Gemma 3's does
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    bos: str | None  # special token before the first turn (None: none)
    header: tuple[str, ...]  # the parts before a turn's content (module docstring)
    end: str  # special token closing every turn (trained on assistant turns)
    after_end: str  # text after the end token
    specials: tuple[str, ...]  # every special token the template needs from the tokenizer
    jinja: str  # the same layout for tokenizer_config.json (transformers apply_chat_template)
    roles: tuple[tuple[str, str], ...] = ()  # a role's name in the header where it is not the role (Gemma: model)
    system: Literal["turn", "first_user"] = "turn"  # a system message: a turn, or the first user turn's opening
    trim: bool = False  # each turn's content stripped of surrounding whitespace (Jinja's trim)


CHAT_TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (
    ChatTemplate(
        "llama3", "<|begin_of_text|>", ("<|start_header_id|>", "{role}", "<|end_header_id|>", "\n\n"), "<|eot_id|>", "",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
        "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    ChatTemplate(
        "chatml", None, ("<|im_start|>", "{role}", "\n"), "<|im_end|>", "\n", ("<|im_start|>", "<|im_end|>"),
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    ChatTemplate(
        "phi3", None, ("<|{role}|>", "\n"), "<|end|>", "\n", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    ChatTemplate(
        "phi4", None, ("<|im_start|>", "{role}", "<|im_sep|>"), "<|im_end|>", "",
        ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] "
        "+ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"),
    ChatTemplate(
        "gemma", "<bos>", ("<start_of_turn>", "{role}", "\n"), "<end_of_turn>", "\n",
        ("<bos>", "<start_of_turn>", "<end_of_turn>"),
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
        "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim "
        "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        roles=(("assistant", "model"),), system="first_user", trim=True),
)}

#: ``data.tokenizer.chat_template: tokenizer``: the tokenizer's own Jinja template (its chat_template.jinja, else
#: tokenizer_config.json's ``chat_template``), rendered by transformers (:mod:`llmc.runtime.chat`): what a model
#: whose format is none of the above ships (gpt-oss's harmony, Mistral's, DeepSeek's). The default for a tokenizer
#: that has one and whose special tokens fit none of the named templates.
OWN_TEMPLATE = "tokenizer"

__all__ = ["ChatTemplate", "CHAT_TEMPLATES", "OWN_TEMPLATE"]
