"""Losses by name: a plain dict from the recipe's `[[losses]] name` to a function
`(model, batch, num_items, **options) -> loss tensor` (sum over items / num_items)."""

from __future__ import annotations

from collections.abc import Callable

from crb.losses.causal_lm import causal_lm
from crb.losses.clara import clara_generation, clara_mse_loss
from crb.losses.contrastive import cached_mnrl, mnrl
from crb.losses.rerank import rerank_bce, rerank_lambda, rerank_mnrl
from crb.losses.seq2seq import seq2seq

LOSSES: dict[str, Callable] = {"causal_lm": causal_lm, "seq2seq": seq2seq, "mnrl": mnrl, "cached_mnrl": cached_mnrl,
                               "clara_generation": clara_generation, "clara_mse": clara_mse_loss,
                               "rerank_mnrl": rerank_mnrl, "rerank_bce": rerank_bce,
                               "rerank_lambda": rerank_lambda}
