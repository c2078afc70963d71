"""On a GPU: the real QLoRA path (bf16 compute, paged 8-bit AdamW, gradient checkpointing) trains and
reports GPU memory. Skipped where there is no CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from crb.run import run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qlora_bf16_trains_on_gpu(chat_recipe, tmp_path):
    out = tmp_path / "gpu"
    run(str(chat_recipe), ["method.name='qlora'", "train.optimizer='paged_adamw_8bit'", "train.precision='bf16'",
                           "train.gradient_checkpointing=true", "train.max_steps=12", "train.lr=3e-3",
                           f"output.dir='{out}'"])
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    assert all(r["gpu_mem_gib"] > 0 for r in rows if "loss" in r)
    assert (out / "final_adapter" / "adapter_model.safetensors").is_file()


def test_the_automatic_configuration_trains_like_the_plain_one(chat_recipe, tmp_path):
    """Issue 14's check: the plan's choice (micro-batch, checkpointed layers, liger kernels where installed) gives
    the same first 5 losses as the plain configuration (every layer checkpointed, micro-batch 1, no fused
    kernels) on the same rows, within 1e-3 relative."""
    runs = {}
    for name, sets in {"auto": ['train.micro_batch="auto"', 'train.gradient_checkpointing="auto"',
                                'train.kernels="auto"'],
                       "plain": ["train.micro_batch=1", "train.gradient_checkpointing=true", 'train.kernels="none"']
                       }.items():
        out = tmp_path / name
        run(str(chat_recipe), ["method.name='qlora'", "train.precision='bf16'", "train.max_steps=5",
                               "method.lora.dropout=0.0", *sets, f"output.dir='{out}'"])  # no dropout: same math
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in rows if "loss" in r]
    assert runs["auto"] == pytest.approx(runs["plain"], rel=1e-3)
