"""The text agent (data.format "text"): a causal LM continued on raw documents (code, prose); every token is a
label. Rows pack (data.packing); liger's fused kernels on CUDA."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from crb.data.collate import Batcher, causal_batcher
from crb.data.packing import Doc
from crb.data.reader import Record
from crb.data.text import check_text, tokenize_text
from crb.errors import DataError
from crb.losses.causal_lm import causal_lm
from crb.recipe.schema import ClaraConfig, DataConfig, Recipe
from crb.tasks.base import Loader, Task, generate, strings


class Text(Task):
    format = "text"
    kind = "causal"
    auto_class = AutoModelForCausalLM
    losses = {"causal_lm": causal_lm}
    default_losses = ("causal_lm",)
    packable = True
    label_shift = 1
    offloadable = True
    kernels = "liger"
    compile = True  # StarCoder2-3B QLoRA on an H200: 25,846 tokens/s compiled, 16,822 eager (1.54x)
    field = "text"  # the record's field when data.field is empty
    demo_prompt = "def total_price("

    @property
    def fields(self) -> frozenset[str]:  # data.columns' targets: the record's one field
        return frozenset({self.field})

    def check(self, rec: Record, cfg: DataConfig, clara_cfg: ClaraConfig | None) -> Any:
        name = cfg.field or self.field
        if name not in rec.data:
            raise DataError(f"{rec.where()}: missing field '{name}'")
        return self.check_field(rec.data[name], rec.where(), name)

    def check_field(self, value: object, where: str, name: str) -> Any:
        return check_text(value, where, name)

    def make_row(self, checked: Any, where: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
                 clara_cfg: ClaraConfig | None) -> tuple[Doc, int]:
        doc = tokenize_text(checked, tokenizer)
        return doc, len(doc[0])

    def truncate(self, item: Doc, max_length: int) -> Doc:
        ids, labels = item
        return ids[:max_length], labels[:max_length]

    def labels(self, item: Doc) -> Any:
        return item[1]

    def texts(self, record: dict) -> dict[str, list[str]]:
        return {"text": strings(record["text"])} if "text" in record else {}

    def batcher(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> Batcher:
        return causal_batcher(tokenizer.pad_token_id)

    def verify(self, load: Loader, recipe: dict, prompt: str, max_new_tokens: int, target_lang: str | None = None,
               source_lang: str | None = None, docs: list[str] | None = None) -> str:
        """The model's continuation of `prompt`."""
        model, tokenizer = load()
        return generate(model, tokenizer, self.prompt_ids(tokenizer, prompt), max_new_tokens)

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]


TASK = Text()
