"""train.compile: each transformer layer compiled by torch.compile trains like the eager model."""

from __future__ import annotations

import json

import pytest

from crb.run import run


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_compiled_layers_give_the_eager_losses(chat_recipe, tmp_path, capsys):
    runs = {}
    for compiled in (True, False):
        out = tmp_path / str(compiled)
        run(str(chat_recipe), [f"train.compile={str(compiled).lower()}", "train.max_steps=3",
                               "train.eval_every=0", f"output.dir='{out}'"])
        runs[compiled] = losses(out)
    assert "torch.compile on 2 layers" in capsys.readouterr().out
    assert len(runs[True]) == 3 and runs[True] == pytest.approx(runs[False], rel=1e-4)
