"""Translation records `source_lang, target_lang, source_text, target_text` -> seq2seq rows.

The tokenizer places the language tokens (NLLB: `[src_lang] text </s>` for the source, `[tgt_lang]
text </s>` for the labels); generation later forces the target language as the first token."""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase

from crb.errors import DataError
from crb.recipe.schema import DataConfig

FIELDS = ("source_lang", "target_lang", "source_text", "target_text")


def check_pair(data: dict, where: str, cfg: DataConfig) -> dict[str, str]:
    """The record's four fields, or a DataError naming the record and the field or code at fault."""
    for name in FIELDS:
        if name not in data:
            raise DataError(f"{where}: missing field '{name}'")
        if not isinstance(data[name], str) or not data[name].strip():
            raise DataError(f"{where}: {name}: expected non-empty text")
    for name in ("source_lang", "target_lang"):
        if data[name] not in cfg.languages:
            raise DataError(f"{where}: {name}: unsupported language code '{data[name]}' (supported: data.languages)")
    return {k: data[k] for k in FIELDS}


def check_language_tokens(pair: dict[str, str], where: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """A DataError when the tokenizer has no token for one of the pair's language codes."""
    for name in ("source_lang", "target_lang"):
        if tokenizer.convert_tokens_to_ids(pair[name]) in (None, tokenizer.unk_token_id):
            raise DataError(f"{where}: {name}: the tokenizer has no language token '{pair[name]}'")


def in_directions(pair: dict[str, str], cfg: DataConfig) -> bool:
    """Whether the recipe trains this record's direction (source_lang / target_langs)."""
    return ((not cfg.source_lang or pair["source_lang"] == cfg.source_lang)
            and (not cfg.target_langs or pair["target_lang"] in cfg.target_langs))


def tokenize_pair(pair: dict[str, str], tokenizer: PreTrainedTokenizerBase) -> dict[str, np.ndarray]:
    tokenizer.src_lang, tokenizer.tgt_lang = pair["source_lang"], pair["target_lang"]
    enc = tokenizer(pair["source_text"], text_target=pair["target_text"])
    return {"input_ids": np.asarray(enc["input_ids"], np.int64), "labels": np.asarray(enc["labels"], np.int64),
            "target_lang": np.asarray([tokenizer.convert_tokens_to_ids(pair["target_lang"])], np.int64),
            "target_text": np.asarray([pair["target_text"]])}


def truncate(row: dict[str, np.ndarray], max_length: int) -> dict[str, np.ndarray]:
    """Cut source and labels to max_length, keeping each one's final </s>."""
    out = dict(row)
    for key in ("input_ids", "labels"):
        ids = row[key]
        if len(ids) > max_length:
            out[key] = np.concatenate([ids[: max_length - 1], ids[-1:]])
    return out
