"""Retrieval records `instruction, query, positive, negative` -> rows of texts [query, positive,
negatives...] and the query's instruction; the encoder's own tokenizer runs per batch.

INSTRUCTOR's convention: the instruction goes in front of the query as a sentence-transformers prompt
("instruction" + a space), so that a model whose pooling leaves prompts out (sentence-transformers sets
that for hkunlp/instructor-*) pools the query's tokens alone; `data.document_instruction` does the same
for the documents. A prompt is one per batch: a batch whose rows carry different instructions gets each
instruction written into its query text instead (then pooled with it), and says so once."""

from __future__ import annotations

import functools

import numpy as np

from crb.data.reader import read_records
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
    return [data["query"], data["positive"], *negatives]


def instruction_of(data: dict) -> str:
    return str(data.get("instruction", "")).strip()


def row(texts: list[str], instruction: str = "") -> dict[str, np.ndarray]:
    return {"texts": np.asarray(texts), "instruction": np.asarray([instruction])}


def prompt(instruction: str) -> str | None:
    """An instruction as a sentence-transformers prompt: the text in front, then a space."""
    return f"{instruction} " if instruction else None


def anchors(rows: list[dict[str, np.ndarray]]) -> tuple[list[str], str | None]:
    """The rows' queries and the prompt to encode them with: their shared instruction; with different
    instructions, none (each instruction is then written into its query)."""
    instructions = [str(r["instruction"][0]) if "instruction" in r else "" for r in rows]
    queries = [str(r["texts"][0]) for r in rows]
    if len(set(instructions)) == 1:
        return queries, prompt(instructions[0])
    _say_mixed()
    return [f"{p} {q}" if p else q for p, q in zip(instructions, queries, strict=True)], None


@functools.cache  # said once per process
def _say_mixed() -> None:
    print("crb: warning: a batch holds queries with different instructions: each is written into its query "
          "and pooled with it (a sentence-transformers prompt is one per batch)")


def corpus(files: list[str], rows: list[dict[str, np.ndarray]]) -> list[str]:
    """The eval corpus: every positive and negative in `rows`, then the `data.corpus` files' texts."""
    seen: dict[str, None] = {}
    for r in rows:
        for text in r["texts"][1:]:
            seen[str(text)] = None
    for file in files:
        for rec in read_records(file):
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


def queries(rows: list[dict[str, np.ndarray]]) -> tuple[list[str], str | None, list[str]]:
    """(queries, their prompt, the positive of each) of the eval rows."""
    texts, query_prompt = anchors(rows)
    return texts, query_prompt, [str(r["texts"][1]) for r in rows]
