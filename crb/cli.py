"""crb run | validate | show | plan | lock | data | sweep | recipes | report | merge | verify | demo

Errors print as one line (`crb: error: ...`) with exit code 2; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from crb.errors import CrbError

if TYPE_CHECKING:
    from crb.recipe.schema import Recipe

DEMO_RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "demo"
# What each demo asks its result afterwards.
def load_recipe(path: str | Path, overrides: list[str] | None, stage: str | None = None) -> Recipe:
    """A recipe, checked by the schema and by its data format's agent (crb.tasks: every command passes them)."""
    from crb.recipe import schema
    from crb.tasks import TASKS

    return schema.load(path, overrides, stage, TASKS)


def cmd_run(args: argparse.Namespace) -> None:
    import os

    from crb.run import run

    if args.allow_pickle:
        os.environ["CRB_ALLOW_PICKLE"] = "1"

    run(args.recipe, args.overrides, args.resume, args.stage)


def cmd_validate(args: argparse.Namespace) -> int:
    r = load_recipe(args.recipe, args.overrides)
    head = f"{args.recipe}: ok ({r.method.name} {r.model.name}, {r.data.format} data"
    if args.quick:
        print(f"{head}, {len(r.data.train)} file(s))")
        return 0
    from crb.data import validate
    from crb.tasks import get_task

    parts = []
    for one in [load_recipe(args.recipe, args.overrides, stage["name"]) for stage in r.stages] or [r]:
        v = validate(one.data, one.clara, task=get_task(one.data.format))
        for severity, line in v.first:
            print(f"crb: {severity}: {line}", file=sys.stderr)
        if more := v.errors + v.skipped - len(v.first):
            severity = "error" if v.errors else "warning"
            print(f"crb: {severity}: ... and {more} more malformed record(s)", file=sys.stderr)
        if v.errors:
            return 2  # as crb run, which stops at this stage
        parts.append(f"stage {one.stage} {v.summary()}" if one.stage else v.summary())
    print(f"{head}: {'; '.join(parts)})")
    return 0


def cmd_lock(args: argparse.Namespace) -> None:
    from crb.engine import lock

    r = load_recipe(args.recipe, args.overrides)
    out = Path(args.out or Path(r.source).with_suffix(lock.SUFFIX).name)
    lock.write(r, out)
    print(f"{out}: {len(lock.make(r)['data'])} data file(s), model {r.model.name}; run it with: crb run {out}")


def cmd_data(args: argparse.Namespace) -> int:
    import json

    from crb import quality

    r = load_recipe(args.recipe, args.overrides)
    if args.action == "inspect":
        from crb.engine.build import build_tokenizer

        rep = quality.inspect(r, build_tokenizer(r))
        png = Path(args.out or f"{Path(r.source).stem}-lengths.png")
        quality.histogram(rep, png)
        if args.json:
            print(json.dumps({k: v for k, v in rep.items() if k != "lengths"}, indent=1))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"crb data inspect: {rep['records']} {rep['format']} records ({rep['malformed']} malformed)")
        t.add_column("measure")
        t.add_column("value", justify="right")
        for k, v in rep["tokens"].items():
            t.add_row(f"tokens per record: {k}", f"{v:,.0f}")
        t.add_row(f"over data.max_length ({rep['max_length']})", str(rep["over_max_length"]))
        for group in ("roles", "user_turns", "language_pairs", "per_record"):
            for k, v in rep.get(group, {}).items():
                t.add_row(f"{group.replace('_', ' ')}: {k}", f"{v:,.4g}" if isinstance(v, float) else str(v))
        Console().print(t)
        print(f"length histogram: {png}")
    elif args.action == "check":
        res = quality.check(r)
        if args.json:
            print(json.dumps({"records": res.records, "errors": res.errors,
                              "findings": [vars(f) for f in res.findings]}, indent=1))
        else:
            for f in res.findings:
                print(f"{f.where}: {f.severity}: {f.what}")
            print(f"{res.records} records: {res.errors} errors, {len(res.findings) - res.errors} warnings")
        return 1 if res.errors else 0
    else:
        if not args.out:
            raise CrbError("crb data clean: --out DIR is required (the input is never changed)")
        counts = quality.clean(r, Path(args.out))
        print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def cmd_sweep(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from crb.sweep import parse_grid, sweep

    r = load_recipe(args.recipe, args.overrides, args.stage)
    out = Path(args.out or r.output.dir + "-sweep")
    grid = parse_grid(args.grid) or list(r.sweep.grid.items()) or None  # command line, recipe, guide
    state = sweep(args.recipe, args.overrides, grid, args.steps or r.sweep.steps, out, args.parallel, args.stage)
    t = Table(title=f"crb sweep: {len(state['trials'])} trials, ranked by eval loss")
    for col in ("trial", "eval loss", "train loss", "status"):
        t.add_column(col)
    for name, tr in sorted(state["trials"].items(), key=lambda kv: kv[1].get("eval_loss") or float("inf")):
        t.add_row(name, f"{tr['eval_loss']:.4f}" if tr.get("eval_loss") is not None else "",
                  f"{tr['loss']:.4f}" if tr.get("loss") is not None else "", tr["status"] + (
                      f": {tr['reason']}" if tr.get("reason") else ""))
    Console().print(t)
    print(f"best: {state['best']} -> {out / 'best.toml'}; results: {out / 'sweep.json'}")


def cmd_report(args: argparse.Namespace) -> None:
    from crb.report import report

    png, page = report([Path(o) for o in args.outputs], Path(args.out) if args.out else None)
    print(f"{png}\n{page}")


def cmd_recipes(_args: argparse.Namespace) -> None:
    from crb.recipe.sources import bundled

    for name, path in bundled().items():
        first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        print(f"{name:22} {first}")


def cmd_show(args: argparse.Namespace) -> None:
    from crb.recipe import schema as recipe
    from crb.tasks import TASKS

    print(recipe.dumps(load_recipe(args.recipe, args.overrides), TASKS), end="")


def cmd_plan(args: argparse.Namespace) -> None:
    import json

    from crb.engine import hardware, plan

    r = load_recipe(args.recipe, args.overrides, args.stage)
    hw = hardware.detect(args.gpu_memory)
    if args.gpus:  # plan for N processes of data parallel, one per GPU of this (or the --gpu-memory) card
        hw.processes, hw.gpus = args.gpus, hw.gpus[:1] * args.gpus
    if args.stage or not r.stages:
        p = plan.plan(r, hw)
        print(p.to_json() if args.json else p.table())
        return
    plans = {s["name"]: plan.plan(load_recipe(args.recipe, args.overrides, s["name"]), hw) for s in r.stages}
    if args.json:  # each stage's plan, by name
        print(json.dumps({name: p.to_dict() for name, p in plans.items()}, indent=1))
        return
    for name, p in plans.items():
        print(f"stage {name}:\n{p.table()}")


def cmd_merge(args: argparse.Namespace) -> None:
    from crb.artifacts import merge

    print(f"crb: merged model written to {merge(Path(args.output), args.out)}")


def cmd_verify(args: argparse.Namespace) -> None:
    from crb.artifacts import verify

    print(verify(Path(args.output), args.prompt, args.max_new_tokens, args.target_lang, args.source_lang, args.docs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crb", description="Train the Cognitive Retail Brain's models from TOML recipes.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors and the libraries' console output")
    sub = p.add_subparsers(dest="command", required=True)

    def with_recipe(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", help="recipe: a TOML file, a bundled recipe's name (crb recipes), or a pinned URL")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")
        return s

    s = with_recipe("run", "train what the recipe says")
    s.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint folder, or the run's latest when none is given")
    s.add_argument("--stage", default=None, help="run only this [[stages]] entry (default: all, in order)")
    s.add_argument("--allow-pickle", action="store_true",
                   help="load pickled (.bin) model weights too (they can run code: only ones you trust)")
    s.set_defaults(func=cmd_run)
    s = with_recipe("validate", "check a recipe and every record of its data files as training does (no model loads)")
    s.add_argument("--quick", action="store_true", help="check the recipe only, not the data files' records")
    s.set_defaults(func=cmd_validate)
    with_recipe("show", "print the resolved recipe (extends and --set applied) as TOML").set_defaults(func=cmd_show)
    s = with_recipe("plan", "estimate the memory a recipe needs, before any GPU work")
    s.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="plan for a card of this size")
    s.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="plan per GPU for N processes (data parallel; ZeRO shards over them); default: the launch's")
    s.add_argument("--stage", default=None, help="plan only this [[stages]] entry (default: each, in order)")
    s.add_argument("--json", action="store_true", help="print JSON (with [[stages]] and no --stage: by stage name)")
    s.set_defaults(func=cmd_plan)
    s = with_recipe("lock", "pin the resolved recipe, package versions, model revision and data sha256 to a file")
    s.add_argument("--out", default=None, help="the lock file (default: RECIPE_NAME.lock.json here)")
    s.set_defaults(func=cmd_lock)
    s = with_recipe("data", "inspect, check or clean the recipe's data files")
    s.add_argument("action", choices=["inspect", "check", "clean"])
    s.add_argument("--json", action="store_true", help="print JSON (inspect, check)")
    s.add_argument("--out", default=None, help="clean: the folder for the cleaned copies; inspect: the histogram PNG")
    s.set_defaults(func=cmd_data)
    s = with_recipe("sweep", "tune: learning rate, then batch size, then LoRA rank (or --grid stages), by eval loss")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a stage of the search, in order (default: the training guide's space)")
    s.add_argument("--steps", type=int, default=0, help="optimizer steps per trial (default: sweep.steps, 50)")
    s.add_argument("--out", default=None, help="the sweep's folder (default: output.dir + '-sweep')")
    s.add_argument("--stage", default=None, help="the [[stages]] entry to tune (CLaRa)")
    s.add_argument("--parallel", type=int, default=0, metavar="N",
                   help="trials at once, one process per GPU (default: the GPU count; 1 without GPUs)")
    s.set_defaults(func=cmd_sweep)
    s = sub.add_parser("report", help="a PNG and an HTML page of one run, or several overlaid")
    s.add_argument("outputs", nargs="+", help="run folders (output.dir)")
    s.add_argument("--out", default=None, help="where report.png/report.html go (default: the run's folder)")
    s.set_defaults(func=cmd_report)
    sub.add_parser("recipes", help="list the recipes bundled with crb (usable by name)").set_defaults(
        func=cmd_recipes)
    s = sub.add_parser("merge", help="merge a run's final adapter into its base model")
    s.add_argument("output", help="the run's output folder")
    s.add_argument("--out", default=None, help="where to write (default OUTPUT/merged_model)")
    s.set_defaults(func=cmd_merge)
    s = sub.add_parser("verify", help="load a run's result and generate from a prompt")
    s.add_argument("output", help="the run's output folder")
    s.add_argument("--prompt", required=True, help="user message (chat recipes) or text to continue")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--target-lang", default=None, help="translation: the language to translate into (FLORES-200)")
    s.add_argument("--source-lang", default=None, help="translation: the prompt's language (default the recipe's)")
    s.add_argument("--doc", dest="docs", action="append", default=[], metavar="TEXT",
                   help="CLaRa: a document to answer from (repeatable); the prompt is the question")
    s.set_defaults(func=cmd_verify)
    s = sub.add_parser("demo", help="train a CPU demo recipe (recipes/demo/), show held-out metrics before and "
                                    "after, and try the result")
    s.add_argument("agent", nargs="?", default="retrieval", choices=sorted(p.stem for p in DEMO_RECIPES.glob("*.toml")),
                   help="which demo (default retrieval: fine-tunes the pretrained all-MiniLM-L6-v2)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=cmd_demo)

    args = p.parse_args(argv)
    if args.debug:
        import os

        os.environ["CRB_DEBUG"] = "1"  # the libraries' own console output too (crb.console)
    try:
        code = args.func(args)
    except CrbError as e:
        if args.debug:
            raise
        print(f"crb: {e.label}: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    return code or 0


def cmd_demo(args: argparse.Namespace) -> None:
    from crb.artifacts import verify
    from crb.run import run
    from crb.tasks import get_task

    path = DEMO_RECIPES / f"{args.agent}.toml"
    recipe = load_recipe(path, args.overrides)
    task = get_task(recipe.data.format)
    if task.kind == "clara":  # three stages; it answers its own held-out questions
        return demo_clara(path, args.overrides)
    final = run(str(path), args.overrides)
    out = Path(recipe.output.dir)
    before, after = final.get("baseline", {}), final
    print(f"\ncrb demo ({args.agent}): held-out metrics, before training -> after (result in {out})")
    width = max([10, *map(len, before)])  # the reranker's retrieval_ndcg@10 is longer
    for key, value in before.items():
        print(f"  {key:<{width}} {value:8.4f} -> {after.get(key, float('nan')):8.4f}")
    prompt, target = task.demo_prompt, task.demo_target
    print(f"\n{prompt}{f' -> {target}' if target else ''}:\n{verify(out, prompt, 40, target)}")


def demo_clara(path: Path, overrides: list[str]) -> None:
    """CLaRa's three stages on a tiny random Mistral (written once, seeded, beside the runs: every stage loads
    the same base), then stage 3's held-out recall@k before and after, and an answer from candidate documents."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from crb.artifacts import verify
    from crb.run import run

    base = DEMO_RECIPES.parent.parent / "runs" / "demo-clara" / "tiny-mistral"  # the demo recipe's model.name
    if not (base / "model.safetensors").is_file():
        torch.manual_seed(0)
        tiny = Path(__file__).resolve().parent / "demo_data" / "tiny-mistral"
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny)).save_pretrained(base)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(base)
    stage3 = run(str(path), overrides)["end_to_end"]
    r = load_recipe(path, overrides, "end_to_end")
    out = Path(r.output.dir)
    print(f"\ncrb demo (clara): held-out questions of stage 3, before training -> after (result in {out})")
    for key, value in stage3.get("baseline", {}).items():
        print(f"  {key:<10} {value:8.4f} -> {stage3.get(key, float('nan')):8.4f}")
    record = json.loads(Path(r.data.train[0]).read_text().splitlines()[0])
    n = len(record["docs"])
    print(f"  (chance: {r.clara.top_k} of {n} candidates = {r.clara.top_k / n:.4f})")
    docs = [record["docs"][i] for i in record["pos_index"]]
    print(f"\n{record['question']} (from its document):\n{verify(out, record['question'], 40, docs=docs)}")

if __name__ == "__main__":
    sys.exit(main())
