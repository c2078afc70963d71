"""Rows for causal LM training: one document per row, or documents packed into max_length rows.

Every row carries position ids that restart at each document; with no attention mask,
transformers then confines attention to each document (a block-diagonal causal mask), so a
packed document's loss equals its unpacked loss. The first label of each document is masked:
no token learns to predict across a document boundary."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from crb.units import IGNORE

Doc = tuple[list[int], list[int]]  # (input_ids, labels)


def packed_row(docs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, np.ndarray]:
    """Documents (input ids, labels) as one row: position ids restart at each document, whose first label is masked
    (no token learns to predict across a document boundary)."""
    ids = [np.asarray(i, np.int64) for i, _ in docs]
    labels = [np.asarray(lab, np.int64).copy() for _, lab in docs]
    for lab in labels:
        lab[:1] = IGNORE
    return {"input_ids": np.concatenate(ids), "labels": np.concatenate(labels),
            "position_ids": np.concatenate([np.arange(len(i), dtype=np.int64) for i in ids])}


def one_per_row(docs: Iterable[Doc]) -> list[dict[str, np.ndarray]]:
    return [packed_row([doc]) for doc in docs]


def pack(docs: Iterable[Doc], max_length: int) -> list[dict[str, np.ndarray]]:
    """Greedy in-order packing: a document goes into the current row while it fits."""
    docs = list(docs)
    return [packed_row([docs[i] for i in group]) for group in pack_groups([len(ids) for ids, _ in docs], max_length)]


def pack_groups(lengths: list[int], max_length: int) -> list[list[int]]:
    """Which documents (indices) each packed row holds."""
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if groups and groups[-1] and used + n <= max_length:
            groups[-1].append(i)
            used += n
        else:
            groups.append([i])
            used = n
    return groups
