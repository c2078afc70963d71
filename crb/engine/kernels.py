"""train.kernels: liger-kernel's or cut-cross-entropy's fused kernels on CUDA, the plain path elsewhere.

For the model types liger-kernel patches (Llama, Mistral, Qwen, Gemma, ...) its patch: fused RMSNorm,
RoPE, SwiGLU and linear + cross-entropy. For any other causal LM (StarCoder2, ...) and for seq2seq models
(NLLB's 256k vocabulary) its fused linear + cross-entropy alone: the model's forward hands the last
(decoder) hidden states to it instead of computing the vocabulary logits, so the (tokens x vocabulary)
logits are never held. The loss is the sum over labelled tokens, divided by `num_items_in_batch`.
"cce" does the same with cut-cross-entropy's kernel, which stays fast at a 256k vocabulary over a
1024-wide hidden state, where liger's chunks become thin matrix products (NLLB).

train.compile = "auto" is chosen here too (torch.compile per layer where it was measured faster), and
model.attn_implementation = "auto": FlexAttention for packed rows on CUDA (its block
mask skips the blocks between documents; SDPA would be handed a dense mask), SDPA otherwise."""

from __future__ import annotations

import importlib.util
import types

import torch

from crb.tasks import get_task
from crb.units import IGNORE


def resolve_attention(fmt: str, packing: bool, gpu: bool) -> tuple[str, str]:
    """model.attn_implementation = "auto" -> "flex_attention" or "sdpa", and why."""
    if packing and get_task(fmt).packable and gpu:
        return "flex_attention", "packed rows: FlexAttention's block mask skips the blocks between documents"
    return "sdpa", "packed rows on CUDA only take FlexAttention" if packing else "rows of one document each"


def resolve_kernels(fmt: str, gpu: bool) -> tuple[str, str]:
    """train.kernels = "auto" -> "liger", "cce" or "none", and why."""
    kernels = get_task(fmt).kernels
    if kernels == "none":
        return "none", f"no fused kernels for {fmt} models yet"
    if not gpu:
        return "none", "no CUDA GPU"
    if kernels == "cce":
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return "none", "cut-cross-entropy is not installed: pip install 'crb[gpu]'"
        return "cce", "a CUDA GPU and cut-cross-entropy (a 256k vocabulary)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "none", "liger-kernel is not installed: pip install 'crb[gpu]'"
    return "liger", "a CUDA GPU and liger-kernel"


# Where train.compile = "auto" compiles (a task's `compile`; H200, benchmarks/results/): StarCoder2-3B QLoRA 1.54x
# eager (25,846 vs 16,822 tok/s), Instructor-XL contrastive 1.56x SentenceTransformerTrainer. Not chat: liger's
# kernels already fuse Mistral's elementwise work (12,852 vs 12,771 tok/s); not CLaRa (not measured). NLLB-600M's
# step is bound by launching its small kernels (the GPU busy 47 of 93 ms): compiled alone it ran as eager, as CUDA
# graphs 1.54x eager (301 vs 195 samples/s) and 2.08x Seq2SeqTrainer.
def resolve_compile(fmt: str, gpu: bool, liger_patched: bool = False) -> tuple[bool | str, str]:
    """train.compile = "auto" -> True, "graphs" or False, and why."""
    if not gpu:
        return False, "no CUDA GPU"
    how = get_task(fmt).compile
    if not how:
        return False, f"not measured faster for {fmt} models"
    if liger_patched:  # measured on Mistral chat: 12,852 tokens/s compiled, 12,771 eager
        return False, "liger's kernels already fuse this model's elementwise work, and dynamo cannot trace them"
    if how == "graphs":
        return "graphs", "a CUDA GPU and a step bound by kernel launches: CUDA graphs"
    return True, "a CUDA GPU: fuses the elementwise work between matrix products"


def apply_kernels(model: torch.nn.Module, device: torch.device, kernels: str = "liger") -> str:
    """liger-kernel's (or cut-cross-entropy's) kernels in `model`, in place (before PEFT wraps it). Returns what
    was done, for the log."""
    if device.type != "cuda":
        return f"train.kernels = '{kernels}' needs a CUDA GPU: running without fused kernels"
    if kernels == "cce":
        if importlib.util.find_spec("cut_cross_entropy") is None:
            from crb.errors import CrbError

            raise CrbError("train.kernels: 'cce' needs cut-cross-entropy: pip install 'crb[gpu]'")
        model.forward = types.MethodType(fused_forward, model)
        model.crb_fused_loss = "cce"
        return f"cut-cross-entropy linear + cross-entropy on ({model.config.model_type})"
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
        model.forward = types.MethodType(fused_forward, model)
        model.crb_fused_loss = "liger"  # the seq2seq loss hands it labels instead of asking for logits
        return f"liger fused linear + cross-entropy on ({kind}: no other liger kernels for it)"
    return f"train.kernels: liger-kernel has nothing for model type {kind!r}: running without"


def fused_forward(self: torch.nn.Module, input_ids: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | None = None, **kwargs):
    """A causal or seq2seq LM's forward whose loss goes through a fused linear + cross-entropy (liger's, or
    cut-cross-entropy's: no logits). Without labels (generation), the model's own forward."""
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast, Seq2SeqLMOutput

    kwargs.pop("logits_to_keep", None)
    hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state  # seq2seq: the decoder's
    seq2seq = self.config.is_encoder_decoder  # labels align with the decoder inputs; causal: token t predicts t + 1
    target = labels if seq2seq else torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    head, device = self.lm_head, hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    x, w, y = hidden.reshape(-1, hidden.shape[-1]).to(dtype), head.weight.to(dtype), target.reshape(-1)
    if self.crb_fused_loss == "cce":
        from cut_cross_entropy import linear_cross_entropy

        if bias is not None:
            raise ValueError("train.kernels = 'cce': the output layer has a bias, which cut-cross-entropy lacks")
        loss = linear_cross_entropy(x, w, y.to(hidden.device), ignore_index=IGNORE, reduction="sum")
    else:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        loss = liger_fused_linear_cross_entropy(x, w, y.to(hidden.device), bias=bias, ignore_index=IGNORE,
                                                reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE).sum()
    return (Seq2SeqLMOutput if seq2seq else CausalLMOutputWithPast)(loss=loss / count)
