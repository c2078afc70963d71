"""A recipe is data: it cannot turn on remote code, and pickled weights (which can run code when
loaded) are refused unless the user passes --allow-pickle. (A fetched recipe's paths:
tests/unit/test_sources.py.)"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crb.cli import main as cli


def test_pickled_weights_need_allow_pickle(chat_recipe, tiny_model, tmp_path, capsys):
    pickled = tmp_path / "pickled-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.save_pretrained(pickled)  # transformers 5 writes safetensors only: the .bin by hand
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(pickled)
    assert (pickled / "pytorch_model.bin").is_file() and not (pickled / "model.safetensors").exists()
    argv = ["run", str(chat_recipe), "--set", f"model.name='{pickled}'", "--set", "train.max_steps=1",
            "--set", f"output.dir='{tmp_path / 'out'}'"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"crb: error: model.name: {pickled} has no safetensors weights; pickled weights can run code "
                   "when loaded: convert them, or pass --allow-pickle if you trust them")
    assert cli([*argv, "--allow-pickle"]) == 0


def test_a_recipe_cannot_enable_remote_code(chat_recipe, capsys):
    chat_recipe.write_text(chat_recipe.read_text().replace("[model]\n", "[model]\ntrust_remote_code = true\n", 1))
    assert cli(["validate", str(chat_recipe)]) == 2
    assert "model.trust_remote_code: unknown key" in capsys.readouterr().err
