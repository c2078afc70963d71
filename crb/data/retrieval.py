"""Retrieval records `instruction, query, positive, negative` -> rows of texts
[instruction + query, positive, negatives...]; the encoder's own tokenizer runs per batch.

The instruction is prepended to the query as sentence-transformers' prompts are (text, then a
space); documents are encoded as they are."""

from __future__ import annotations

import numpy as np

from crb.data.reader import read_jsonl
from crb.errors import DataError


def check_triple(data: dict, where: str) -> list[str]:
    """[anchor, positive, negatives...] of a record, or a DataError naming the record and field."""
    for name in ("query", "positive"):
        if name not in data:
            raise DataError(f"{where}: missing field '{name}'")
        if not isinstance(data[name], str) or not data[name].strip():
            raise DataError(f"{where}: {name}: expected non-empty text")
    instruction = data.get("instruction", "")
    if not isinstance(instruction, str):
        raise DataError(f"{where}: instruction: expected text")
    negatives = data.get("negative", [])
    negatives = [negatives] if isinstance(negatives, str) else negatives
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise DataError(f"{where}: negative: expected text or a list of texts")
    anchor = f"{instruction.strip()} {data['query']}" if instruction.strip() else data["query"]
    return [anchor, data["positive"], *negatives]


def row(texts: list[str]) -> dict[str, np.ndarray]:
    return {"texts": np.asarray(texts)}


def corpus(files: list[str], rows: list[dict[str, np.ndarray]]) -> list[str]:
    """The eval corpus: every positive and negative in `rows`, then the `data.corpus` files' texts."""
    seen: dict[str, None] = {}
    for r in rows:
        for text in r["texts"][1:]:
            seen[str(text)] = None
    for file in files:
        for rec in read_jsonl(file):
            if isinstance(rec, DataError):
                raise rec
            seen[check_document(rec.data, rec.where())] = None
    return list(seen)


def check_document(data: dict, where: str) -> str:
    """The `text` of a `data.corpus` record, or a DataError."""
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: text: expected non-empty text")
    return text


def queries(rows: list[dict[str, np.ndarray]]) -> tuple[list[str], list[str]]:
    """(queries, the positive of each) of the eval rows."""
    return [str(r["texts"][0]) for r in rows], [str(r["texts"][1]) for r in rows]
