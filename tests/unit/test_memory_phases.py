"""benchmarks/memory_peak.py --phases: the windows it measures the plan's offload moments by are the layers' forward
in order, the loss, each checkpointed layer's recompute and backward in reverse order, then the optimizer step,
once per training step (on the CPU the bytes are 0: the order is what is checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MistralConfig

ROOT = Path(__file__).resolve().parents[2]


def phases_class() -> type:
    spec = importlib.util.spec_from_file_location("memory_peak", ROOT / "benchmarks" / "memory_peak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Phases


def test_phases_mark_each_layer_forward_and_backward_and_the_step_once_per_step():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters())
    phases = phases_class()()
    handles = phases.install()
    try:
        for _ in range(2):
            ids = torch.randint(0, 64, (1, 8))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.step()  # DeepSpeed steps its CPU optimizer once per sub-group: still one window
            optimizer.zero_grad()
            with torch.no_grad():  # an eval pass marks nothing
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    windows = [(w[0], w[1]) for w in phases.summary()["windows"]]
    one_step = ["forward (embeddings)", "forward layer 0", "forward layer 1", "forward layer 2",
                "loss and backward until the first recompute", "backward layer 2", "backward layer 1",
                "backward layer 0", "optimizer step"]
    assert windows == [(0, "start"), *[(0, w) for w in one_step], *[(1, w) for w in one_step]]
