"""Contrastive losses for embedding models: sentence-transformers' MultipleNegativesRankingLoss
(in-batch and hard negatives) and its gradient-cached form (GradCache: batch 1024 in the memory
of a mini-batch), used as they are inside crb's loop.

sentence-transformers returns the mean over the batch's queries; crb's losses return a sum over
items / num_items, so the value is rescaled by the batch's query count. Across processes the
negatives are gathered from every process (in-batch negatives of the whole batch)."""

from __future__ import annotations

import torch
from accelerate import PartialState

_made: dict[tuple, torch.nn.Module] = {}


def _loss(kind: str, model: torch.nn.Module, options: dict) -> torch.nn.Module:
    """The sentence-transformers loss object for `model` (made once; it holds the model)."""
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # sentence-transformers before 6.1
        from sentence_transformers import losses

    key = (kind, id(model), tuple(sorted(options.items())))
    if key not in _made:
        if PartialState().num_processes > 1:
            options = {"gather_across_devices": True, **options}
        cls = losses.CachedMultipleNegativesRankingLoss if kind == "cached" else losses.MultipleNegativesRankingLoss
        _made[key] = cls(model, **options)
    return _made[key]


def mnrl(model: torch.nn.Module, batch: dict, num_items: torch.Tensor, **options) -> torch.Tensor:
    """Options: sentence-transformers' (scale, ...)."""
    value = _loss("plain", model, options)(batch["features"], None)
    return value * batch["n_rows"] / num_items


def cached_mnrl(model: torch.nn.Module, batch: dict, num_items: torch.Tensor, **options) -> torch.Tensor:
    """Options: mini_batch_size (rows per forward pass; default 32), scale, ..."""
    options.setdefault("mini_batch_size", 32)
    value = _loss("cached", model, options)(batch["features"], None)
    return value * batch["n_rows"] / num_items
