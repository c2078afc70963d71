"""Batches, one builder per kind of model, and what each batch counts.

Causal LM rows are right-padded to the longest; the padding is a document of its own (fresh
position ids, labels ignored), so no attention mask is needed and real tokens never attend to
it. Seq2seq rows pad with an attention mask, and carry the decoder inputs (labels shifted right).
Retrieval rows are texts that the encoder's own preprocessing tokenizes, one column at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crb.units import IGNORE

Row = dict[str, np.ndarray]


@dataclass(frozen=True)
class Batcher:
    collate: Callable[[list[Row]], dict[str, Any]]
    count: Callable[[dict[str, Any]], int]  # the items the loss averages over: target tokens, or queries
    tokens: Callable[[dict[str, Any]], int]  # input tokens that are not padding (throughput)


def _pad(arrays: list[np.ndarray], value: int, width: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.concatenate([a, np.full(width - len(a), value, np.int64)]) for a in arrays]))


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Causal LM rows -> input_ids, labels, position_ids."""
    width = max(len(r["input_ids"]) for r in rows)
    positions = [np.concatenate([r["position_ids"], np.arange(width - len(r["position_ids"]), dtype=np.int64)])
                 for r in rows]
    return {"input_ids": _pad([r["input_ids"] for r in rows], pad_id, width),
            "labels": _pad([r["labels"] for r in rows], IGNORE, width),
            "position_ids": torch.from_numpy(np.stack(positions)),
            "n_tokens": sum(len(r["input_ids"]) for r in rows)}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labels after the causal shift that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def causal_batcher(pad_id: int) -> Batcher:
    return Batcher(lambda rows: collate(rows, pad_id), count_targets, lambda b: b["n_tokens"])


def seq2seq_batcher(pad_id: int, decoder_start_id: int, multiple: int = 1) -> Batcher:
    """Source ids + attention mask; labels; decoder inputs = [decoder start] + labels[:-1]. Both widths padded
    up to a `multiple` (few distinct shapes, for CUDA graphs)."""

    def make(rows: list[Row]) -> dict[str, Any]:
        src = -(-max(len(r["input_ids"]) for r in rows) // multiple) * multiple
        tgt = -(-max(len(r["labels"]) for r in rows) // multiple) * multiple
        labels = _pad([r["labels"] for r in rows], IGNORE, tgt)
        decoder = torch.cat([torch.full((len(rows), 1), decoder_start_id), labels[:, :-1]], dim=1)
        return {"input_ids": _pad([r["input_ids"] for r in rows], pad_id, src),
                "attention_mask": _pad([np.ones(len(r["input_ids"]), np.int64) for r in rows], 0, src),
                "decoder_input_ids": decoder.masked_fill(decoder == IGNORE, pad_id), "labels": labels}

    return Batcher(make, lambda b: int((b["labels"] != IGNORE).sum()),
                   lambda b: int(b["attention_mask"].sum() + (b["labels"] != IGNORE).sum()))


def retrieval_batcher(preprocess: Callable[..., dict], hard_negatives: int, document_prompt: str | None = None
                      ) -> Batcher:
    """Columns [anchor, positive, negatives...] each through the encoder's preprocessing (sentence-transformers'
    `preprocess(texts, prompt=...)`: the queries with their instruction as the prompt, the documents with
    `document_prompt`); a batch keeps as many hard negatives as its poorest record has (at most
    `hard_negatives`)."""
    from crb.data.retrieval import anchors

    def make(rows: list[Row]) -> dict[str, Any]:
        columns = 2 + min(hard_negatives, *(len(r["texts"]) - 2 for r in rows))
        queries, query_prompt = anchors(rows)
        features = [preprocess(queries, prompt=query_prompt)]
        features += [preprocess([str(r["texts"][c]) for r in rows], prompt=document_prompt) for c in range(1, columns)]
        return {"features": features, "n_rows": len(rows)}

    def tokens(batch: dict[str, Any]) -> int:
        return int(sum(f["attention_mask"].sum() for f in batch["features"] if "attention_mask" in f))

    return Batcher(make, lambda b: b["n_rows"], tokens)


def clara_batcher(pad_id: int, doc_length: int) -> Batcher:
    """CLaRa rows: documents stacked (rows x documents, doc_length); the decoder prompt right-padded
    with an attention mask; stage 3 adds the question (as a document) and the gold documents."""

    def make(rows: list[Row]) -> dict[str, Any]:
        width = max(len(r["dec_ids"]) for r in rows)
        batch = {"doc_ids": torch.from_numpy(np.concatenate([r["doc_ids"] for r in rows]).reshape(-1, doc_length)),
                 "doc_mask": torch.from_numpy(np.concatenate([r["doc_mask"] for r in rows]).reshape(-1, doc_length)),
                 "dec_ids": _pad([r["dec_ids"] for r in rows], pad_id, width),
                 "dec_mask": _pad([np.ones(len(r["dec_ids"]), np.int64) for r in rows], 0, width),
                 "dec_labels": _pad([r["dec_labels"] for r in rows], IGNORE, width),
                 "gold": [r["gold"].tolist() for r in rows]}
        if "query_ids" in rows[0]:
            batch["query_ids"] = torch.from_numpy(np.stack([r["query_ids"] for r in rows]))
            batch["query_mask"] = torch.from_numpy(np.stack([r["query_mask"] for r in rows]))
        return batch

    return Batcher(make, count_targets_of("dec_labels"),
                   lambda b: int(b["doc_mask"].sum() + b["dec_mask"].sum()))


def count_targets_of(key: str) -> Callable[[dict[str, Any]], int]:
    return lambda b: int((b[key][:, 1:] != IGNORE).sum())
