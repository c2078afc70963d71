"""train.compile: each transformer layer compiled by torch.compile trains like the eager model."""

from __future__ import annotations

import json

import pytest

from crb.run import run
from tests.conftest import losses


def test_compiled_layers_give_the_eager_losses(chat_recipe, tmp_path, capsys):
    """LoRA dropout on and shared (method.lora.shared_dropout): the compiled layers draw the eager masks and share
    them the same way (unshared masks would change the losses)."""
    runs = {}
    for compiled in (True, False):
        out = tmp_path / str(compiled)
        run(str(chat_recipe), [f"train.compile={str(compiled).lower()}", "train.max_steps=3",
                               "method.lora.dropout=0.2", "train.eval_every=0", f"output.dir='{out}'"])
        runs[compiled] = losses(out)
    assert "torch.compile on 2 layers" in capsys.readouterr().out
    assert len(runs[True]) == 3 and runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_graphs_mode_trains_translation_like_eager_and_evaluates(translation_recipe, tmp_path, capsys):
    """train.compile = "graphs" (CUDA graphs where there is CUDA; here the compiled layers alone): the eager
    losses with rows padded to multiples of 64 (padding carries no loss), and the eval's generation runs eager.
    Compiled without the padding, the losses are the eager ones to the last digit."""
    runs = {}
    for mode in ("graphs", "false"):
        out = tmp_path / mode
        run(str(translation_recipe), [f"train.compile={mode if mode in ('false', 'true') else repr(mode)}",
                                      "train.max_steps=3", "train.log_every=1", "train.eval_every=3",
                                      f"output.dir='{out}'"])
        runs[mode] = losses(out)
        evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "bleu" in r]
        assert evals and evals[-1]["step"] == 3
    assert "torch.compile on 4 layers, 4 as CUDA graphs" in capsys.readouterr().out
    assert len(runs["graphs"]) == 3
    assert runs["graphs"][0] == pytest.approx(runs["false"][0], rel=1e-4)  # the same weights: padding changes nothing
    assert runs["graphs"] == pytest.approx(runs["false"], rel=2e-3)  # but the sums' order (lr 1e-2 amplifies it)
