"""Rows for causal LM training: one document per row, or documents packed into max_length rows.

Every row carries position ids that restart at each document; with no attention mask,
transformers then confines attention to each document (a block-diagonal causal mask), so a
packed document's loss equals its unpacked loss. The first label of each document is masked:
no token learns to predict across a document boundary."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import numpy as np

from crb.units import IGNORE

Doc = tuple[list[int], list[int]]  # (input_ids, labels)


def _doc_row(ids: list[int], labels: list[int]) -> tuple[list[int], list[int], list[int]]:
    return ids, [IGNORE, *labels[1:]], list(range(len(ids)))


def one_per_row(docs: Iterable[Doc]) -> list[dict[str, np.ndarray]]:
    return [_to_arrays(*_doc_row(ids, labels)) for ids, labels in docs]


def pack(docs: Iterable[Doc], max_length: int) -> list[dict[str, np.ndarray]]:
    """Greedy in-order packing: a document goes into the current row while it fits."""
    docs = list(docs)
    rows = []
    for group in pack_groups([len(ids) for ids, _ in docs], max_length):
        parts = [_doc_row(*docs[i]) for i in group]
        rows.append(_to_arrays(*(list(chain.from_iterable(p[k] for p in parts)) for k in range(3))))
    return rows


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


def _to_arrays(ids: list[int], labels: list[int], pos: list[int]) -> dict[str, np.ndarray]:
    return {"input_ids": np.asarray(ids, np.int64), "labels": np.asarray(labels, np.int64),
            "position_ids": np.asarray(pos, np.int64)}
