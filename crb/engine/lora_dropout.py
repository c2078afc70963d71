"""LoRA dropout once per input. peft gives every adapter its own dropout, so q, k and v (and gate and up), which
read the same tensor, each draw a mask and keep their own dropped copy for backward. Here the adapters of one
module share a dropout that runs once per input tensor: one mask, one kept copy, already in the dtype the
adapters compute in (so peft's per-adapter cast is skipped too)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crb.recipe.schema import Recipe


class SharedDropout(torch.nn.Module):
    """Dropout that returns the same dropped tensor while it is called again with the same input object. The
    model's SharedDropouts hold one (input, dropped copy) pair between them, so at most one pair outlives the
    call it was made in (also when checkpointing stops a recomputation early), and the model's forward hook
    drops it."""

    def __init__(self, p: float, weight: torch.Tensor, slot: dict) -> None:
        super().__init__()
        self.p, self.slot = p, slot
        object.__setattr__(self, "weight", weight)  # the adapters' dtype outside autocast; not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot.get("owner") is not self or self.slot.get("input") is not x:
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
            self.slot.update(owner=self, input=x, out=F.dropout(x, self.p, self.training).to(dtype))
        return self.slot["out"]


def share_dropouts(model: torch.nn.Module) -> int:
    """Give the LoRA layers under each module one SharedDropout per adapter; returns how many adapters now share
    one. Layers without dropout (p = 0: peft's Identity, no copy kept) are left alone."""
    from peft.tuners.lora import LoraLayer

    slot: dict = {}
    shared = 0
    for parent in model.modules():
        layers = [m for m in parent.children() if isinstance(m, LoraLayer)]
        groups: dict[str, SharedDropout] = {}
        for layer in layers if len(layers) > 1 else ():  # a lone adapter has nothing to share with
            for name, drop in layer.lora_dropout.items():
                if not isinstance(drop, torch.nn.Dropout) or drop.p == 0:
                    continue
                if name not in groups:
                    groups[name] = SharedDropout(drop.p, layer.lora_A[name].weight, slot)
                layer.lora_dropout[name] = groups[name]
                layer.cast_input_dtype_enabled = False  # the input stays the same tensor; SharedDropout casts
                shared += 1
    if shared:
        model.register_forward_hook(lambda *_: slot.clear())
    return shared


def shares(recipe: Recipe, checkpointed_layers: int) -> bool:
    """Whether a run shares its LoRA dropouts (build and plan ask here). Not in compiled layers with
    checkpointing on: a compiled StarCoder2-3B at ctx 8192 (H200) peaked 0.4 GiB higher with the shared dropout
    than with peft's, and ran out of memory under an 8 GiB cap where the recomputed layers shared too."""
    lora = recipe.method.lora
    return lora.shared_dropout and lora.dropout > 0 and not (recipe.train.compiled and checkpointed_layers > 0)
