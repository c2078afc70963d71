"""Packing: a packed document's loss equals its unpacked loss; no attention or label crosses documents."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from crb.data.collate import collate, count_targets
from crb.data.packing import one_per_row, pack
from crb.losses.causal_lm import causal_lm
from crb.units import IGNORE


def docs(lengths: list[int], vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(10, vocab, n).tolist()
        out.append((ids, list(ids)))
    return out


def test_pack_layout():
    rows = pack(docs([5, 4, 6, 3], 50), max_length=10)
    assert [len(r["input_ids"]) for r in rows] == [9, 9]
    assert rows[0]["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    labels = rows[0]["labels"].tolist()
    assert labels[0] == IGNORE and labels[5] == IGNORE  # no target across the boundary
    assert labels[1:5] == rows[0]["input_ids"][1:5].tolist()


def test_collate_pads_as_a_separate_document():
    rows = one_per_row(docs([3, 5], 50))
    b = collate(rows, pad_id=0)
    assert b["input_ids"][0].tolist()[3:] == [0, 0]
    assert b["labels"][0].tolist()[3:] == [IGNORE, IGNORE]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert count_targets(b) == 2 + 4


def test_packed_loss_equals_unpacked(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ds = docs([17, 9, 30, 12], model.config.vocab_size)
    one = torch.tensor(1.0)
    with torch.no_grad():
        unpacked = [causal_lm(model, collate([r], 0), one).item() for r in one_per_row(ds)]
        packed_rows = pack(ds, max_length=128)
        assert len(packed_rows) == 1
        packed = causal_lm(model, collate(packed_rows, 0), one).item()
        # per document: the packed row's token losses, split at the boundaries
        batch = collate(packed_rows, 0)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        token_loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="none",
                                                       ignore_index=IGNORE)
    n_targets = sum(len(ids) - 1 for ids, _ in ds)
    np.testing.assert_allclose(packed / n_targets, sum(unpacked) / n_targets, atol=1e-5, rtol=0)
    start = 0
    for (ids, _), ref in zip(ds, unpacked, strict=True):  # each document's mean loss, packed vs alone
        doc_loss = token_loss[start: start + len(ids) - 1].mean().item()
        np.testing.assert_allclose(doc_loss, ref / (len(ids) - 1), atol=1e-5, rtol=0)
        start += len(ids)


def test_padding_does_not_change_the_loss(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rows = one_per_row(docs([20, 7], model.config.vocab_size, seed=1))
    one = torch.tensor(1.0)
    with torch.no_grad():
        alone = causal_lm(model, collate(rows[1:], 0), one).item()
        both = causal_lm(model, collate(rows, 0), one).item()
        first = causal_lm(model, collate(rows[:1], 0), one).item()
    np.testing.assert_allclose(both, alone + first, rtol=1e-6)
