"""Batches: right-pad rows to the longest; the padding is a document of its own (fresh position
ids, labels ignored), so no attention mask is needed and real tokens never attend to it."""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


def collate(rows: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for r in rows:
        n = width - len(r["input_ids"])
        out["input_ids"].append(np.concatenate([r["input_ids"], np.full(n, pad_id, np.int64)]))
        out["labels"].append(np.concatenate([r["labels"], np.full(n, IGNORE, np.int64)]))
        out["position_ids"].append(np.concatenate([r["position_ids"], np.arange(n, dtype=np.int64)]))
    return {k: torch.from_numpy(np.stack(v)) for k, v in out.items()}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labels after the causal shift that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
