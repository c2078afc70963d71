"""`crb sweep RECIPE [--grid KEY=V1,V2,...]... [--steps N] [--out DIR]`: the training guide's tuning
advice as a command. Stages run in order (default: the guide's space and order: learning rate, then
batch size, then LoRA rank); each stage tries its values with the best of the stages before, every
trial a short run through the same loop, ranked by eval loss; with several GPUs (or --parallel N) a
stage's trials run at once, one process per device. Trials the plan says will not fit the
GPU are skipped with the reason. Results go to OUT/sweep.json after every trial, so a sweep that
stopped goes on where it was; the best recipe is written to OUT/best.toml."""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from crb.errors import CrbError
from crb.recipe import schema as recipes
from crb.tasks import TASKS, get_task
from crb.units import GIB

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


def run_process(recipe_path: str, sets: list[str], folder: Path, choice: dict, slot: int, gpus: bool,
                stage: str | None = None) -> dict:
    """One trial as `python -m crb.run` on device `slot` (CUDA_VISIBLE_DEVICES); its result from run.json."""
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": str(slot)} if gpus else {})}
    cmd = [sys.executable, "-m", "crb.run", recipe_path, *[x for s in sets for x in ("--set", s)],
           *(["--stage", stage] if stage else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode or not (folder / "run.json").is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"choice": choice, "status": "skipped", "reason": f"exit {done.returncode}: {last}"}
    final = json.loads((folder / "run.json").read_text())["final"]
    return {"choice": choice, "status": "ok", "eval_loss": final.get("eval_loss"), "loss": final.get("loss")}


def sweep(recipe_path: str, overrides: list[str], grid: list[tuple[str, list]] | None, steps: int,
          out: Path, parallel: int = 0, stage: str | None = None) -> dict:
    """`parallel`: trials at once, each in its own process on its own GPU (default: one per GPU); `stage`:
    the [[stages]] entry to tune (CLaRa)."""
    import crb.run
    from crb.engine import hardware
    from crb.engine.plan import plan

    base = recipes.load(recipe_path, overrides, stage, TASKS)
    if base.stages and not stage:
        raise CrbError(f"{recipe_path}: crb sweep tunes one stage at a time: --stage NAME")
    if not (base.data.eval or base.data.eval_split > 0):
        raise CrbError(f"{recipe_path}: data.eval_split: a sweep ranks trials by eval loss: hold some data out")
    stages = grid or [(k, v) for k, v in GUIDE if k != "method.lora.r" or base.method.name in ("lora", "qlora")]
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"trials": {}}
    hw = hardware.detect()
    workers = parallel or max(1, len(hw.gpus))
    best: dict = {}
    lock = threading.Lock()

    def record(name: str, trial: dict) -> None:
        with lock:
            state["trials"][name] = trial
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, state_file)

    slots: queue.Queue[int] = queue.Queue()  # free devices
    for i in range(workers):
        slots.put(i)

    def trial_process(item: tuple[str, dict, list[str]]) -> None:
        name, choice, sets = item
        slot = slots.get()
        try:
            record(name, run_process(recipe_path, sets, out / name, choice, slot, bool(hw.gpus), stage))
        finally:
            slots.put(slot)

    for key, values in stages:
        todo = []  # (name, choice, sets) of this stage's trials that will run
        for value in values:
            choice = {**best, key: value}
            name = _name(choice)
            if state["trials"].get(name, {}).get("status") in ("ok", "skipped"):
                continue  # done before this sweep stopped
            sets = [*overrides, *_sets(choice), f"train.max_steps={steps}", "train.save_every=0",
                    f"output.dir={json.dumps(str(out / name))}"]
            if get_task(base.data.format).whole_batch and "train.batch_size" in choice:
                sets.append(f"train.micro_batch={choice['train.batch_size']}")
            try:
                r = recipes.load(recipe_path, sets, stage, TASKS)
                if isinstance(r.train.micro_batch, int) and r.train.batch_size % r.train.micro_batch:
                    sets.append(f"train.micro_batch={math.gcd(r.train.batch_size, r.train.micro_batch)}")
                    r = recipes.load(recipe_path, sets, stage, TASKS)
                p = plan(r, hw)
            except CrbError as e:
                record(name, {"choice": choice, "status": "skipped", "reason": str(e)})
                continue
            if p.fits is False:
                record(name, {"choice": choice, "status": "skipped",
                              "reason": f"does not fit: {p.total / GIB:.1f} GiB needed"})
                continue
            todo.append((name, choice, sets))
        if workers == 1:
            for name, choice, sets in todo:
                try:
                    final = crb.run.run(recipe_path, sets, None, stage)
                    record(name, {"choice": choice, "status": "ok", "eval_loss": final.get("eval_loss"),
                                  "loss": final.get("loss")})
                except CrbError as e:
                    record(name, {"choice": choice, "status": "skipped", "reason": str(e)})
        else:  # one trial per device at a time, each in its own process
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(trial_process, todo))
        ranked = [t for t in state["trials"].values() if t["status"] == "ok" and t.get("eval_loss") is not None
                  and t["choice"].get(key) is not None and {k: v for k, v in t["choice"].items() if k != key} == best]
        if ranked:
            best = min(ranked, key=lambda t: t["eval_loss"])["choice"]
    state["best"] = best
    state_file.write_text(json.dumps(state, indent=1))
    best_recipe = recipes.load(recipe_path, [*overrides, *_sets(best)], stage, TASKS)
    (out / "best.toml").write_text(recipes.dumps(best_recipe, TASKS))
    return state
