"""Raw `text` records (code, prose): token ids with EOS per document; every token is a label."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from crb.errors import DataError


def check_text(text: object, where: str, field: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: {field}: expected non-empty text")
    return text


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    ids = tokenizer(text)["input_ids"]  # the tokenizer's own special tokens (BOS where it adds one)
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = [*ids, tokenizer.eos_token_id]
    return ids, list(ids)
