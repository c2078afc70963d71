"""Seq2seq (translation) cross-entropy over the labelled target tokens, summed and divided by
`num_items` (the optimizer step's labelled tokens, as in causal_lm), so accumulation and process
count don't change the gradient. The batch carries decoder inputs, so the model computes no loss
of its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def seq2seq(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"], use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    return loss / num_items
