"""Next-token cross-entropy over the labelled tokens.

`num_items` is the count of labelled tokens that the returned value is divided by; the loop
passes the whole optimizer step's count (all micro-batches, all processes) so that the
gradient is the token-mean over the effective batch, whatever the accumulation and process
count. transformers computes the loss itself (sum over tokens / num_items)."""

from __future__ import annotations

import torch


def causal_lm(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                num_items_in_batch=num_items, use_cache=False)
    return out.loss
