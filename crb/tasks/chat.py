"""The chat agent (data.format "chatml"): the text agent's causal LM on `messages` records rendered by the chat
template, with labels on the assistant turns only."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from crb.data.chatml import check_messages, tokenize_chat
from crb.data.packing import Doc
from crb.recipe.schema import ClaraConfig, DataConfig
from crb.tasks.base import strings
from crb.tasks.text import Text


class Chat(Text):
    format = "chatml"
    chat = True
    compile = False  # liger's kernels already fuse Mistral's elementwise work: 12,852 tokens/s compiled, 12,771 eager
    field = "messages"
    demo_prompt = "Do you have the navy suit in size 40?"

    def check_field(self, value: object, where: str, name: str) -> Any:
        return check_messages(value, where)

    def make_row(self, checked: Any, where: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
                 clara_cfg: ClaraConfig | None) -> tuple[Doc, int]:
        doc = tokenize_chat(checked, tokenizer, template, where)
        return doc, len(doc[0])

    def texts(self, record: dict) -> dict[str, list[str]]:
        msgs = record.get("messages") if isinstance(record.get("messages"), list) else []
        return {f"messages[{i}].content": strings(m.get("content")) for i, m in enumerate(msgs) if isinstance(m, dict)}

    def problems(self, record: dict) -> list[str]:
        msgs = [m for m in record.get("messages", []) if isinstance(m, dict)]
        if msgs and msgs[-1].get("role") != "assistant":
            return ["the last turn is not the assistant's: nothing to learn after it"]
        return []

    def describe(self, records: list[dict]) -> dict[str, dict]:
        roles, turns = Counter(), []
        for d in records:
            msgs = [m for m in d.get("messages", []) if isinstance(m, dict)]
            roles.update(m.get("role") for m in msgs)
            turns.append(sum(m.get("role") == "user" for m in msgs))
        return {"roles": dict(roles), "user_turns": {"median": float(np.median(turns)), "max": int(max(turns))}}

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
        """`prompt` as a user turn, rendered as training renders chats, up to the assistant's answer."""
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


TASK = Chat()
