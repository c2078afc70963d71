"""`crb sweep RECIPE [--grid KEY=V1,V2,...]... [--steps N] [--out DIR]`: the training guide's tuning
advice as a command. Stages run in order (default: the guide's space and order: learning rate, then
batch size, then LoRA rank); each stage tries its values with the best of the stages before, every
trial a short run through the same loop, ranked by eval loss. Trials the plan says will not fit the
GPU are skipped with the reason. Results go to OUT/sweep.json after every trial, so a sweep that
stopped goes on where it was; the best recipe is written to OUT/best.toml."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from crb.engine import recipe as recipes
from crb.errors import CrbError

GUIDE = [("train.lr", [1e-5, 5e-5, 1e-4, 2e-4]), ("train.batch_size", [4, 8, 16]), ("method.lora.r", [16, 32, 64])]


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    stages = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise CrbError(f"--grid {item}: expected KEY=V1,V2,... (e.g. train.lr=1e-5,1e-4)")
        stages.append((key.strip(), [_value(v) for v in values.split(",")]))
    return stages


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _sets(choice: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in choice.items()]


def _name(choice: dict) -> str:
    return "_".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in choice.items()) or "base"


def sweep(recipe_path: str, overrides: list[str], grid: list[tuple[str, list]] | None, steps: int,
          out: Path) -> dict:
    from crb.engine import hardware
    from crb.engine.plan import plan
    from crb.run import run

    base = recipes.load(recipe_path, overrides)
    if not (base.data.eval or base.data.eval_split > 0):
        raise CrbError(f"{recipe_path}: data.eval_split: a sweep ranks trials by eval loss: hold some data out")
    stages = grid or [(k, v) for k, v in GUIDE if k != "method.lora.r" or base.method.name in ("lora", "qlora")]
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"trials": {}}
    hw = hardware.detect()
    best: dict = {}
    for key, values in stages:
        for value in values:
            choice = {**best, key: value}
            name = _name(choice)
            if state["trials"].get(name, {}).get("status") in ("ok", "skipped"):
                continue  # done before this sweep stopped
            sets = [*overrides, *_sets(choice), f"train.max_steps={steps}", "train.save_every=0",
                    f"output.dir={json.dumps(str(out / name))}"]
            if base.data.format == "retrieval" and "train.batch_size" in choice:  # one pass holds the whole batch
                sets.append(f"train.micro_batch={choice['train.batch_size']}")
            trial = {"choice": choice}
            try:
                r = recipes.load(recipe_path, sets)
                if isinstance(r.train.micro_batch, int) and r.train.batch_size % r.train.micro_batch:
                    sets.append(f"train.micro_batch={math.gcd(r.train.batch_size, r.train.micro_batch)}")
                    r = recipes.load(recipe_path, sets)
                p = plan(r, hw)
                if p.fits is False:
                    trial |= {"status": "skipped", "reason": f"does not fit: {p.total / 2**30:.1f} GiB needed"}
                else:
                    final = run(recipe_path, sets)
                    trial |= {"status": "ok", "eval_loss": final.get("eval_loss"), "loss": final.get("loss")}
            except CrbError as e:
                trial |= {"status": "skipped", "reason": str(e)}
            state["trials"][name] = trial
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, state_file)
        ranked = [t for t in state["trials"].values() if t["status"] == "ok" and t.get("eval_loss") is not None
                  and t["choice"].get(key) is not None and {k: v for k, v in t["choice"].items() if k != key} == best]
        if ranked:
            best = min(ranked, key=lambda t: t["eval_loss"])["choice"]
    state["best"] = best
    state_file.write_text(json.dumps(state, indent=1))
    best_recipe = recipes.load(recipe_path, [*overrides, *_sets(best)])
    (out / "best.toml").write_text(recipes.dumps(best_recipe))
    return state
