"""Losses by name: a plain dict from the recipe's `[[losses]] name` to a function
`(model, batch, num_items) -> loss tensor` (sum over items / num_items)."""

from __future__ import annotations

from collections.abc import Callable

from crb.losses.causal_lm import causal_lm

LOSSES: dict[str, Callable] = {"causal_lm": causal_lm}
