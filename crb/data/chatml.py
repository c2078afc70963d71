"""ChatML `messages` records -> token ids with labels on the assistant turns only.

The conversation is rendered by the tokenizer's own chat template (ChatML where it has none);
each assistant turn's tokens, with their end-of-turn token, are found by character offsets in
the rendering, so any template that writes the content verbatim works."""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase

from crb.errors import DataError
from crb.units import IGNORE

ROLES = ("system", "user", "assistant")

# ChatML, with {% generation %} markers so transformers can also return assistant masks.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chat_template(tokenizer: PreTrainedTokenizerBase, choice: str) -> str:
    """The template crb renders with: the tokenizer's own, or ChatML (choice 'chatml' or none)."""
    own = getattr(tokenizer, "chat_template", None)
    return own if choice == "tokenizer" and isinstance(own, str) and own else CHATML_TEMPLATE


def end_of_turn(template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    return "<|im_end|>" if "<|im_end|>" in template else (tokenizer.eos_token or "")


def check_messages(messages: object, where: str) -> list[dict[str, str]]:
    """The messages, or a DataError naming the record and what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages: expected a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}]: expected an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role: expected one of {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise DataError(f"{where}: messages[{i}].content: expected non-empty text")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: messages: no assistant turn to learn from")
    return messages


def render(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: str,
           add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def tokenize_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: str,
                  where: str = "") -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are the ids on assistant content + end-of-turn, else -100."""
    text = render(messages, tokenizer, template)
    eot = end_of_turn(template, tokenizer)
    spans, cursor = [], 0
    for turn, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"].strip()
        start = text.find(content, cursor)
        if start >= 0 and text.find(content, start + 1) >= 0:
            # more than one candidate: the chat rendered up to this turn ends with its content, so take the last
            # occurrence there (an answer quoted earlier, "yes or no?", must not take the labels), where that
            # rendering is a prefix of the whole
            upto = render(messages[: turn + 1], tokenizer, template)
            last = upto.rfind(content) if text.startswith(upto) else -1
            start = last if last >= cursor else start
        if start < 0:
            raise DataError(f"{where}: the chat template does not write the assistant content verbatim")
        end = start + len(content)
        stop = text.find(eot, end) if eot else -1
        if stop >= 0 and not text[end:stop].strip():
            end = stop + len(eot)
        spans.append((start, end))
        cursor = end
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    learned = np.zeros(len(ids), bool)  # a token overlapping an assistant span
    for span_start, span_end in spans:
        learned |= (offsets[:, 0] < span_end) & (offsets[:, 1] > span_start)
    return ids, np.where(learned, ids, IGNORE).tolist()
