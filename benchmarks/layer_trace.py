"""Bytes a model's layers save for backward, per token, traced on the CPU: a few layers of the real
shape (random weights, no download) run forward under bf16 autocast inside saved-tensor hooks, at
two sequence lengths, so the per-token cost splits into a constant and a part that grows with the
sequence (attention scores). This is where crb.engine.plan's T5 coefficients come from.

    python benchmarks/layer_trace.py t5            # Instructor-XL's T5-XL encoder block
    python benchmarks/layer_trace.py t5 --lengths 128 512 --layers 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def t5_encoder(layers: int) -> torch.nn.Module:
    from retrieval import t5_config
    from transformers.models.t5.modeling_t5 import T5EncoderModel

    config = t5_config(tiny=False)
    config.num_layers = layers
    return T5EncoderModel(config).train()


MODELS = {"t5": t5_encoder}


def saved_per_token(model: torch.nn.Module, length: int) -> float:
    """Bytes of distinct storages saved for backward (weights and autocast's weight copies left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    ids = torch.randint(0, model.config.vocab_size - 1, (1, length))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    copies = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))  # autocast's
    total = sum(v for k, v in saved.items() if k not in params)
    return (total - copies) / length


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=list(MODELS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs=2, default=[128, 512])
    a = ap.parse_args()
    model = MODELS[a.model](a.layers)
    (t1, t2) = a.lengths
    b1, b2 = (saved_per_token(model, t) for t in (t1, t2))
    slope = (b2 - b1) / (t2 - t1)  # bytes per token per key position, all layers
    const = b1 - slope * t1
    print(f"| model | per token per layer | per token per layer per key | at {t1} | at {t2} |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {a.model} | {const / a.layers:,.0f} B | {slope / a.layers:,.1f} B | {b1 / a.layers:,.0f} B "
          f"| {b2 / a.layers:,.0f} B |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
