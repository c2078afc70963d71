"""train.kernels: liger-kernel's fused kernels on CUDA, the plain path elsewhere.

For the model types liger-kernel patches (Llama, Mistral, Qwen, Gemma, ...) its patch: fused RMSNorm,
RoPE, SwiGLU and linear + cross-entropy. For any other causal LM (StarCoder2, ...) its fused linear +
cross-entropy alone: the model's forward hands the last hidden states to it instead of computing the
vocabulary logits, so the (tokens x vocabulary) logits are never held. The loss is transformers' own:
the sum over labelled tokens, divided by `num_items_in_batch`."""

from __future__ import annotations

import importlib.util
import types

import torch

CAUSAL_FORMATS = ("chatml", "text")


def resolve_kernels(fmt: str, gpu: bool) -> tuple[str, str]:
    """train.kernels = "auto" -> "liger" or "none", and why."""
    if fmt not in CAUSAL_FORMATS:
        return "none", f"no fused kernels for {fmt} models yet"
    if not gpu:
        return "none", "no CUDA GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "none", "liger-kernel is not installed: pip install 'crb[gpu]'"
    return "liger", "a CUDA GPU and liger-kernel"


def apply_kernels(model: torch.nn.Module, device: torch.device) -> str:
    """liger-kernel's kernels in `model`, in place (before PEFT wraps it). Returns what was done, for the log."""
    if device.type != "cuda":
        return "train.kernels = 'liger' needs a CUDA GPU: running without fused kernels"
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError as e:
        from crb.errors import CrbError

        raise CrbError("train.kernels: 'liger' needs liger-kernel: pip install 'crb[gpu]'") from e
    kind = model.config.model_type
    if kind in MODEL_TYPE_TO_APPLY_LIGER_FN:
        _apply_liger_kernel_to_instance(model=model)
        return f"liger kernels on ({kind}: RMSNorm, RoPE, SwiGLU, fused linear + cross-entropy)"
    if hasattr(model, "lm_head") and hasattr(model, "model"):
        model.forward = types.MethodType(fused_causal_forward, model)
        return f"liger fused linear + cross-entropy on ({kind}: no other liger kernels for it)"
    return f"train.kernels: liger-kernel has nothing for model type {kind!r}: running without"


def fused_causal_forward(self: torch.nn.Module, input_ids: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | None = None,
                         **kwargs):
    """A causal LM's forward whose loss goes through liger's fused linear + cross-entropy (no logits). Without
    labels (generation), the model's own forward."""
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, **kwargs)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]  # token t predicts t + 1
    head, device = self.lm_head, hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    loss = liger_fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]).to(dtype), head.weight.to(dtype),
                                            target.reshape(-1).to(hidden.device), bias=bias, ignore_index=-100,
                                            reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum()
    return CausalLMOutputWithPast(loss=loss / count)
