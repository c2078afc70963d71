"""Seq2seq (translation) cross-entropy over the labelled target tokens, summed and divided by
`num_items` (the optimizer step's labelled tokens, as in causal_lm), so accumulation and process
count don't change the gradient. The batch carries decoder inputs. A model with a fused linear +
cross-entropy (train.kernels, crb.engine.kernels) computes that loss itself without vocabulary logits;
otherwise the logits come back and the loss is taken here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel

from crb.units import IGNORE


def seq2seq(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_items: torch.Tensor) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "decoder_input_ids": batch["decoder_input_ids"], "use_cache": False}
    if getattr(extract_model_from_parallel(model), "crb_fused_loss", False):
        return model(**inputs, labels=batch["labels"], num_items_in_batch=num_items).loss
    logits = model(**inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss / num_items
