"""Reranking losses for cross-encoders: sentence-transformers' CrossEncoder losses, used as they are inside crb's
loop. A rerank batch holds texts: `queries` and, for each, its `docs` (the positive first, then as many negatives as
every other query has); the loss object pairs and tokenizes them itself.

- rerank_mnrl: MultipleNegativesRankingLoss, cross-entropy of the positive's score against its negatives' and
  `num_negatives` (default 4) other queries' documents: learns fastest from a fresh score head (the demo's).
- rerank_bce: BinaryCrossEntropyLoss on every (query, document) pair, label 1 for the positive and 0 for each
  negative: the library's recommendation for reranking with mined hard negatives.
- rerank_lambda: LambdaLoss (NDCGLoss2++ weighting), listwise: each query's documents with labels 1, 0, 0, ...

sentence-transformers returns a mean over the batch; crb's losses return a sum over items / num_items, so the
value is rescaled by the batch's query count."""

from __future__ import annotations

import torch

_made: dict[tuple, torch.nn.Module] = {}


def _loss(name: str, model: torch.nn.Module, options: dict) -> torch.nn.Module:
    """The sentence-transformers loss object `name` for `model` (made once; it holds the model)."""
    from sentence_transformers.cross_encoder import losses

    key = (name, id(model), tuple(sorted(options.items())))
    if key not in _made:
        if isinstance(options.get("pos_weight"), (int, float)):  # a TOML number; the library takes a tensor
            options = {**options, "pos_weight": torch.tensor(float(options["pos_weight"]))}
        _made[key] = getattr(losses, name)(model, **options)
    return _made[key]


def rerank_mnrl(model: torch.nn.Module, batch: dict, num_items: torch.Tensor, **options) -> torch.Tensor:
    """Options: num_negatives (in-batch documents per query; default 4), scale, ..."""
    columns = [list(column) for column in zip(*batch["docs"], strict=True)]  # positives, then each negative
    value = _loss("MultipleNegativesRankingLoss", model, options)([batch["queries"], *columns], None)
    return value * batch["n_rows"] / num_items


def rerank_bce(model: torch.nn.Module, batch: dict, num_items: torch.Tensor, **options) -> torch.Tensor:
    """Options: pos_weight (the positives' weight: the negatives per positive balances the classes), ..."""
    queries = [q for q, docs in zip(batch["queries"], batch["docs"], strict=True) for _ in docs]
    docs = [d for group in batch["docs"] for d in group]
    labels = torch.tensor([float(i == 0) for group in batch["docs"] for i in range(len(group))], device=model.device)
    value = _loss("BinaryCrossEntropyLoss", model, options)([queries, docs], labels)
    return value * batch["n_rows"] / num_items


def rerank_lambda(model: torch.nn.Module, batch: dict, num_items: torch.Tensor, **options) -> torch.Tensor:
    """Options: k (nDCG@k optimised), mini_batch_size (pairs per forward pass), sigma, ..."""
    labels = [torch.tensor([1.0] + [0.0] * (len(group) - 1)) for group in batch["docs"]]
    value = _loss("LambdaLoss", model, options)([batch["queries"], batch["docs"]], labels)
    return value * batch["n_rows"] / num_items
