"""python -m crb.run RECIPE [--set key=value ...] [--resume [CHECKPOINT]]

The whole flow, top-down: recipe -> hardware -> data -> build -> loop -> artifacts.
The same code runs under `python`, `accelerate launch` and `torchrun`."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed

from crb import console
from crb.data.collate import Batcher
from crb.engine import checkpoint, hardware, lock
from crb.engine.build import (
    build_model,
    build_optimizer,
    build_scheduler,
    build_tokenizer,
    count_parameters,
    resolve_precision,
)
from crb.engine.loop import train
from crb.engine.metrics import task_metrics
from crb.engine.plan import DataFacts, auto_config, data_facts, plan
from crb.engine.profiles import PROFILES, deepspeed_plugin, launched_with_deepspeed, one_process_group
from crb.engine.schedule import make_schedule
from crb.errors import CrbError
from crb.recipe import schema as recipes
from crb.tasks import LOSSES, TASKS, get_task, prepare, stream
from crb.units import GIB


def run(recipe_path: str, overrides: list[str] | None = None, resume: str | None = None,
        stage: str | None = None) -> dict:
    console.quiet()  # library noise to OUT/crb.log, once the run knows OUT
    if lock.is_lock(recipe_path):  # a lock file: its recipe, after checking what it pinned
        recipe, drift = lock.load(recipe_path, overrides)
        for line in drift:
            PartialState().print(f"crb: warning: package drift since the lock: {line}")
    else:
        recipe = recipes.load(recipe_path, overrides, stage, TASKS)
    if recipe.stages and stage is None:
        return run_stages(recipe_path, overrides, resume, [s["name"] for s in recipe.stages])
    # Before CUDA starts: growable segments keep the allocator's reserve close to what is allocated.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    hw = hardware.detect()
    cpu = not torch.cuda.is_available()  # so torchrun on CPU becomes gloo data parallel
    state = PartialState(cpu=cpu)
    out = Path(recipe.output.dir)
    console.attach(out, state.process_index)
    say = state.print
    say(f"crb: {recipe.source}{f' stage {recipe.stage}' if recipe.stage else ''} -> {out}\ncrb: {hw.describe()}")
    capped = hardware.cap_memory(state.device)
    if capped:
        say(f"crb: GPU memory capped at {capped:.1f} GiB (CRB_GPU_MEMORY_GB)")
    tokenizer = build_tokenizer(recipe)
    # The first process prepares; then the first of each node (its cache folder may not be shared); the others
    # memory-map the cache they wrote (every process passes the same two barriers).
    streaming, t = recipe.data.streaming, recipe.train
    with state.main_process_first(), state.local_main_process_first():
        if streaming:  # rows made as training reads them; every process reads the stream
            # The tokenizer then works in a thread beside the step: serial, as parallel it made a streamed run
            # differ from itself by an ulp in 9 of 73 runs (tests/integration/test_streaming.py; 0 of 32 serial)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            train_rows, eval_rows, report = stream(recipe.data, tokenizer, t.seed, recipe.clara,
                                                   t.max_steps * t.batch_size, keep=2 * t.batch_size)
        else:
            train_rows, eval_rows, report = prepare(recipe.data, tokenizer, t.seed, recipe.clara)
    say(f"crb: data: {report.summary()}" if not streaming else
        f"crb: data: streaming {', '.join(recipe.data.train)} ({t.max_steps} steps of {t.batch_size} rows); "
        f"{len(eval_rows)} eval rows")
    facts = None if streaming else data_facts(train_rows + eval_rows, recipe.data.format)
    profile, plugin, trainable = choose_profile(recipe, hw, out, facts)

    set_seed(recipe.train.seed)
    mixed = resolve_precision(recipe.train.precision, state.device)
    sched = make_schedule(recipe, len(train_rows), state.num_processes)
    if state.is_main_process:
        checkpoint.check_space(out, checkpoint.bytes_needed(recipe.train, trainable, sched))
    say(f"crb: {sched.total_steps} steps of {recipe.train.batch_size} rows (micro-batch {sched.micro} "
        f"x accumulation {sched.accum} x {state.num_processes} process(es)), precision {mixed}")

    trackers = [t for t in recipe.train.report_to if t != "wandb" or _has("wandb")]
    deepspeed = plugin is not None or launched_with_deepspeed()
    if plugin:
        one_process_group()  # when no launcher started this process
    # cpu=True would drop DeepSpeed silently; DeepSpeed runs on the CPU through its own CPU accelerator.
    accelerator = Accelerator(cpu=cpu and not deepspeed, mixed_precision=mixed,
                              gradient_accumulation_steps=sched.accum,
                              log_with=trackers or None, project_dir=str(out),
                              deepspeed_plugin=plugin(sched.accum) if plugin else None)
    if (ds := accelerator.state.deepspeed_plugin) is not None:  # crb feeds its own batches: tell DeepSpeed
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=sched.micro, gradient_accumulation_steps=sched.accum,
                                   train_batch_size=sched.micro * sched.accum * accelerator.num_processes,
                                   gradient_clipping=recipe.train.max_grad_norm)
    checkpoint.keep_trainable_only(accelerator)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.resolved.toml").write_text(recipes.dumps(recipe, TASKS))
        lock.write(recipe, out / "crb.lock.json")

    model = build_model(recipe, mixed, accelerator.device)
    trainable, total = count_parameters(model)
    say(f"crb: {recipe.method.name}: {trainable:,} of {total:,} parameters train")
    optimizer = build_optimizer(recipe, model)
    scheduler = build_scheduler(recipe, optimizer, sched.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by the loop once per optimizer step
    accelerator.init_trackers("crb", config=_flat(recipes.to_dict(recipe, TASKS)))
    losses = ([(x.name, LOSSES[x.name], x.weight, x.options) for x in recipe.losses]
              or [(name, LOSSES[name], 1.0, {}) for name in get_task(recipe.data.format).default_losses])

    start = _resume_point(resume, out)
    final = train(recipe, accelerator, model, optimizer, scheduler, losses, train_rows, eval_rows,
                  make_batcher(recipe, tokenizer, accelerator.unwrap_model(model)), sched, out, start,
                  task_metrics(recipe, tokenizer, [] if streaming else train_rows, eval_rows), report.train_sources)
    check_finite(accelerator, model, final, out)
    artifact = save_final(accelerator, model, tokenizer, out)
    if accelerator.is_main_process:
        data = {k: v for k, v in report.__dict__.items() if k != "train_sources"}  # one per row: read when needed
        summary = {"final": final, "data": data, "trainable_params": trainable, "total_params": total,
                   "profile": profile,
                   "artifact": str(artifact)}
        (out / "run.json").write_text(json.dumps(summary, indent=1))
    accelerator.end_training()
    if final.get("baseline"):
        say("crb: held-out " + ", ".join(f"{k} {v:.4f} -> {final.get(k, float('nan')):.4f}"
                                         for k, v in final["baseline"].items()) + " (before -> after)")
    say(f"crb: done: {artifact}")
    return final


def run_stages(recipe_path: str, overrides: list[str] | None, resume: str | None, names: list[str]) -> dict:
    """Every stage in order, each a run of its own that starts from the previous stage's output; with --resume,
    a stage that finished before is kept. Returns each stage's final metrics by name."""
    finals = {}
    for name in names:
        done = Path(recipes.load(recipe_path, overrides, name, TASKS).output.dir) / "run.json"
        if resume and done.is_file():
            PartialState().print(f"crb: stage {name}: already finished ({done.parent})")
            finals[name] = json.loads(done.read_text())["final"]
        else:
            finals[name] = run(recipe_path, overrides, resume, name)
    return finals


def check_finite(accelerator: Accelerator, model: torch.nn.Module, final: dict, out: Path) -> None:
    """A run whose weights or last eval loss are not finite is not done: no final model, the last good
    checkpoint named."""
    bad = [k for k, v in final.items() if "loss" in k and isinstance(v, float) and not math.isfinite(v)]
    if not checkpoint.weights_finite(accelerator, model):
        bad.insert(0, "weights")
    if bad:
        good = checkpoint.latest_good(out / "checkpoints")
        raise CrbError(f"training diverged: {', '.join(bad)} not finite; no final model written; last good "
                       f"checkpoint: {good or 'none'} (lower train.lr, or resume from it with --resume)")


def choose_profile(recipe: recipes.Recipe, hw: hardware.Hardware, out: Path, data: DataFacts | None):
    """The plan's profile and every "auto" (attention, kernels, micro-batch, checkpointing, offload) for this
    card and these rows, said and written to OUT/profile.json; returns the profile name, a maker of its
    DeepSpeed plugin (None: plain, or a launcher that set DeepSpeed itself) and the trainable parameters."""
    say = PartialState().print
    resolved, choices = auto_config(recipe, hw, data)
    recipe.train, recipe.model = resolved.train, resolved.model
    for line in choices:
        say(f"crb: {line}")
    p = plan(recipe, hw, data=data)
    launched = launched_with_deepspeed()
    name, reason = (p.profile, p.reason) if not launched else ("launcher", "DeepSpeed set by the accelerate config")
    say(f"crb: profile {name}: {reason}")
    if p.fits is False and not launched:
        say("crb: warning: the plan does not fit this card; it may run out of memory. " + "; ".join(p.advice))
    if PartialState().is_main_process:
        checkpoint.check_space(out, 0)  # writable; the room for checkpoints is checked once the schedule is known
        (out / "profile.json").write_text(json.dumps(
            {"profile": name, "reason": reason, "micro_batch": recipe.train.micro_batch,
             "gradient_checkpointing": recipe.train.gradient_checkpointing, "checkpointed_layers":
                 p.notes["checkpointed_layers"], "layers": p.notes["layers"], "choices": choices,
             "offload_activations": recipe.train.offload_activations, "kernels": recipe.train.kernels,
             "compile": recipe.train.compile, "shared_dropout": recipe.method.lora.shared_dropout,
             "attention": recipe.model.attn_implementation,
             "plan_gib": round(p.total / GIB, 3), "capacity_gib": p.capacity and round(p.capacity / GIB, 3),
             "profiles_gib": {k: round(v / GIB, 3) for k, v in p.profiles.items()}}, indent=1))
    prof = PROFILES.get(name)
    if launched or prof is None or prof.deepspeed_json is None:
        return name, None, p.notes["trainable"]
    return name, lambda accum: deepspeed_plugin(prof, accum, recipe.train.max_grad_norm), p.notes["trainable"]


def make_batcher(recipe: recipes.Recipe, tokenizer, model: torch.nn.Module) -> Batcher:
    """How rows become batches for this recipe's task."""
    return get_task(recipe.data.format).batcher(recipe, tokenizer, model)


def _resume_point(resume: str | None, out: Path) -> Path | None:
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / checkpoint.STATE_FILE).is_file():
            raise CrbError(f"--resume {resume}: not a complete crb checkpoint")
        return path
    found = checkpoint.latest(out / "checkpoints")
    if found is None:
        PartialState().print(f"crb: no checkpoint under {out / 'checkpoints'}: starting fresh")
    return found


def save_final(accelerator: Accelerator, model: torch.nn.Module, tokenizer, out: Path) -> Path:
    """`final_adapter/` (PEFT) or `final_model/`, with the tokenizer; written then renamed."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    encoder = type(unwrapped).__module__.startswith("sentence_transformers")  # a bi- or cross-encoder: its layout
    clara = hasattr(unwrapped, "adapters")  # CLaRa: every adapter, the added tokens and their embedding rows
    # Under ZeRO-3 a weight is an empty shard outside a forward: get_state_dict gathers it; a model that writes
    # itself (an encoder, CLaRa) reads its weights gathered whole on every process
    state_dict = None if encoder or clara else accelerator.get_state_dict(model)
    dest = out / ("final_adapter" if clara or hasattr(unwrapped, "peft_config") else "final_model")
    with gathered(accelerator, unwrapped) if encoder or clara else contextlib.nullcontext():
        if accelerator.is_main_process:
            tmp = out / f".tmp-{dest.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            if encoder:
                unwrapped.save(str(tmp))
            elif clara:
                unwrapped.save(tmp)
                tokenizer.save_pretrained(tmp)
            else:
                unwrapped.save_pretrained(tmp, state_dict=state_dict)
                tokenizer.save_pretrained(tmp)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
    accelerator.wait_for_everyone()
    return dest


def gathered(accelerator: Accelerator, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Every weight of `model` whole on every process while the context lasts (ZeRO-3; nothing to do otherwise)."""
    ds = accelerator.state.deepspeed_plugin
    if ds is None or ds.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _flat(d: dict, prefix: str = "") -> dict:
    """Recipe as flat scalars, for trackers' hyperparameter tables."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="crb run", description="Train what a recipe says.")
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint folder, or the run's latest when no folder is given")
    p.add_argument("--stage", default=None, help="run only this [[stages]] entry (default: all, in order)")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled (.bin) model weights too")
    p.add_argument("--debug", action="store_true", help="show tracebacks and the libraries' console output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.debug:
        os.environ["CRB_DEBUG"] = "1"  # the libraries' own console output too
    if args.allow_pickle:
        os.environ["CRB_ALLOW_PICKLE"] = "1"
    try:
        run(args.recipe, args.overrides, args.resume, args.stage)
    except CrbError as e:
        if args.debug:
            raise
        print(f"crb: {e.label}: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
