"""`crb sweep`: stages in order, each keeping the best of the one before, ranked by eval loss; the best
recipe written out; a stopped sweep goes on without rerunning finished trials."""

from __future__ import annotations

import json

import pytest

import crb.run
from crb.cli import main as cli
from crb.recipe import schema as recipes


def test_a_four_trial_sweep_picks_the_lowest_eval_loss_and_resumes(chat_recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["sweep", str(chat_recipe), "--grid", "train.lr=1e-5,3e-3", "--grid", "method.lora.r=4,8",
            "--steps", "4", "--out", str(out)]
    assert cli(argv) == 0
    state = json.loads((out / "sweep.json").read_text())
    trials = state["trials"]
    assert len(trials) == 4 and all(t["status"] == "ok" for t in trials.values())
    lr_stage = {t["choice"]["train.lr"]: t["eval_loss"] for t in trials.values() if len(t["choice"]) == 1}
    best_lr = min(lr_stage, key=lr_stage.get)
    assert lr_stage[best_lr] < max(lr_stage.values())  # the learning rate mattered
    r_stage = [t for t in trials.values() if len(t["choice"]) == 2]
    assert {t["choice"]["train.lr"] for t in r_stage} == {best_lr}  # stage 2 kept stage 1's best
    winner = min(r_stage, key=lambda t: t["eval_loss"])["choice"]
    assert state["best"] == winner
    best = recipes.load(out / "best.toml")
    assert best.train.lr == winner["train.lr"] and best.method.lora.r == winner["method.lora.r"]
    assert "best:" in capsys.readouterr().out

    state["trials"].pop(next(iter(state["trials"])))  # as if the sweep had stopped before its first trial ended
    (out / "sweep.json").write_text(json.dumps(state))
    calls = []
    real = crb.run.run
    monkeypatch.setattr(crb.run, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert cli(argv) == 0
    assert len(calls) == 1  # only the missing trial ran again


def test_the_recipe_sweep_table_sets_the_stages(chat_recipe, tmp_path):
    chat_recipe.write_text(chat_recipe.read_text() + '\n[sweep]\nsteps = 2\ngrid = { "train.lr" = [1e-5, 2e-3] }\n')
    assert cli(["sweep", str(chat_recipe), "--out", str(tmp_path / "s")]) == 0
    trials = json.loads((tmp_path / "s" / "sweep.json").read_text())["trials"]
    assert sorted(t["choice"]["train.lr"] for t in trials.values()) == [1e-5, 2e-3]


def test_parallel_trials_in_their_own_processes_match_sequential_ones(chat_recipe, tmp_path):
    """--parallel 2: a stage's trials run at once, each in a process (CUDA_VISIBLE_DEVICES per GPU when there
    are GPUs); the results equal the same trials run one after another."""
    common = ["--grid", "train.lr=1e-5,3e-3", "--steps", "3"]
    assert cli(["sweep", str(chat_recipe), *common, "--out", str(tmp_path / "seq")]) == 0
    assert cli(["sweep", str(chat_recipe), *common, "--out", str(tmp_path / "par"), "--parallel", "2"]) == 0
    seq = json.loads((tmp_path / "seq" / "sweep.json").read_text())
    par = json.loads((tmp_path / "par" / "sweep.json").read_text())
    assert par["trials"].keys() == seq["trials"].keys() and all(t["status"] == "ok" for t in par["trials"].values())
    for name, t in seq["trials"].items():
        assert par["trials"][name]["eval_loss"] == pytest.approx(t["eval_loss"], rel=1e-6)
    assert par["best"] == seq["best"]


def test_sweep_a_translation_recipe(translation_recipe, tmp_path):
    out = tmp_path / "t"
    argv = ["sweep", str(translation_recipe), "--grid", "train.lr=1e-4,1e-2", "--steps", "4", "--out", str(out)]
    assert cli(argv) == 0
    state = json.loads((out / "sweep.json").read_text())
    assert len(state["trials"]) == 2 and all(t["status"] == "ok" for t in state["trials"].values())
    assert recipes.load(out / "best.toml").train.lr == state["best"]["train.lr"]


def test_sweep_a_clara_stage(tmp_path, tiny_model):
    from tests.integration.test_clara import _recipe, _stage1

    recipe = _recipe(tmp_path, tiny_model, _stage1(tmp_path), "compression")
    recipe.write_text(recipe.read_text().replace("max_length = 256\n", "max_length = 256\neval_split = 0.25\n"))
    out = tmp_path / "c"
    assert cli(["sweep", str(recipe), "--grid", "train.lr=1e-4,2e-3", "--steps", "2", "--out", str(out)]) == 0
    state = json.loads((out / "sweep.json").read_text())
    assert all(t["status"] == "ok" and t["eval_loss"] is not None for t in state["trials"].values())
