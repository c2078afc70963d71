"""Data-parallel scaling: the language and code recipes as shipped on 1 GPU and on 2 GPUs, in one run.

    python benchmarks/scaling.py --out /tmp/crb-bench/scaling --json benchmarks/results/scaling.json
    python benchmarks/scaling.py --out /tmp/crb-bench/scaling-check --tiny     # CPU: 1 and 2 processes (gloo)
    python benchmarks/scaling.py --out OUT --recipes none --full-7b             # only the 7B full fine-tune rows

Each recipe runs as benchmarks/frontier.py's crb side (the same random-weight Mistral-7B and StarCoder2-3B shapes,
8 full ctx-8192 rows per optimizer step, every "auto" left to the plan) twice: one process on GPU 0, then
`accelerate launch --multi_gpu --num_processes 2` on GPUs 0 and 1 (on CPU, --tiny: torchrun with 2 processes).
The effective batch stays 8 rows: each of 2 processes takes 4. tokens/s counts every process's tokens (crb logs
the step's tokens summed over processes). Writes OUT/scaling.json: metrics.<recipe> = {gpus_1_tokens_per_s,
gpus_2_tokens_per_s, speedup}, and each side's losses, chosen configuration and peak.

--sweep adds `crb sweep` of the code recipe (two learning rates, --steps steps each, 12.5 % of the rows held out
for the eval that ranks them) with --parallel 1 and then --parallel 2 (a trial per GPU): metrics.sweep =
{trials, serial_s, parallel_s, speedup}, wall time of the whole sweep command.

--full-7b adds what outgrows a GPU: the Mistral-7B shape fully fine-tuned (fp32 master weights, AdamW, ctx 4096,
micro-batch 1 and one row per GPU per step, every layer checkpointed) on 2 GPUs, with the profile the plan picks for
2 GPUs and forced to ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload: metrics.full_7b.<profile> = {tokens_per_s, peak_gib,
plan_gib, profile} (per GPU, from rank 0); --profiles picks some of them. These are benchmarks/plan_accuracy.py's
2gpu rows, run by it (its --json: --plan-json) with --phases (each row's peak per window between layers, rank 0),
so one run measures the speed and checks the plan, and a miss can be traced.
Each part is written as it ends, merged into an earlier run's file (--json, else OUT/scaling.json), so the parts
can run as separate commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import frontier  # benchmarks/ is on sys.path


def launcher(processes: int, tiny: bool, port: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    if tiny:  # Accelerate starts one process on a CPU; torchrun starts several (gloo)
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(port)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(port)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--recipes", default="language,code")
    p.add_argument("--ctx", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--models", default="/tmp/crb-bench/models")
    p.add_argument("--json", default=None, help="also write scaling.json here")
    p.add_argument("--sweep", action="store_true", help="also crb sweep --parallel 1 against --parallel 2")
    p.add_argument("--full-7b", action="store_true", help="also the 7B full fine-tune on 2 GPUs (auto, zero2, "
                   "zero3, zero3-offload)")
    p.add_argument("--profiles", default="auto,zero2,zero3,zero3-offload", help="--full-7b's profiles")
    p.add_argument("--plan-json", default=None, help="--full-7b: plan_accuracy.py's --json (its rows merge there)")
    args = p.parse_args(argv)
    args.ctx = args.ctx or (256 if args.tiny else 8192)
    args.recipes, args.crb_set, args.data = [r for r in args.recipes.split(",") if r != "none"], [], "full"
    if args.recipes:
        frontier.build_models(args)
    out = Path(args.out)
    metrics, sides = {}, {}
    if args.full_7b:
        metrics["full_7b"], sides["full_7b"] = full_7b(args, out)
        save(args, out, metrics, sides)
    if args.sweep:
        metrics["sweep"], sides["sweep"] = sweep(args, out)
        save(args, out, metrics, sides)
    for i, recipe in enumerate(args.recipes):
        runs = {}
        for n in (1, 2):
            gpus = None if args.tiny else ",".join(str(g) for g in range(n))
            runs[n] = frontier.crb_side(args, recipe, "whole", gpus, out / recipe / f"gpus{n}",
                                        launcher(n, args.tiny, 29550 + 2 * i + n))
            rate = runs[n]["tokens_per_s"] or 0
            print(f"{recipe}, {n} GPU(s): {runs[n]['status']}, {rate:,.0f} tokens/s", flush=True)
        one, two = runs[1]["tokens_per_s"], runs[2]["tokens_per_s"]
        metrics[recipe] = {"gpus_1_tokens_per_s": one, "gpus_2_tokens_per_s": two,
                           "speedup": two / one if one and two else None}
        sides[recipe] = {f"gpus_{n}": {k: r.get(k) for k in ("status", "note", "tokens_per_s", "step_s", "peak_gib",
                                                             "losses", "chosen", "wall_s")} for n, r in runs.items()}
        save(args, out, metrics, sides)
    metrics = json.loads((out / "scaling.json").read_text())["metrics"]  # with the parts of earlier runs
    print(f"\n{'recipe':10} {'1 GPU tok/s':>12} {'2 GPUs tok/s':>13} {'speed-up':>9}")
    for recipe, m in metrics.items():
        if recipe in ("full_7b", "sweep"):
            continue
        one, two, up = m["gpus_1_tokens_per_s"], m["gpus_2_tokens_per_s"], m["speedup"]
        print(f"{recipe:10} {one or 0:>12,.0f} {two or 0:>13,.0f} {f'{up:.2f}x' if up else '-':>9}")
    for profile, m in metrics.get("full_7b", {}).items():
        print(f"7B full fine-tune, 2 GPUs, {profile}: {m['tokens_per_s'] or 0:,.0f} tokens/s, "
              f"{m['peak_gib'] or 0:.1f} GiB per GPU")
    if "sweep" in metrics:
        m = metrics["sweep"]
        print(f"crb sweep, {m['trials']} trials: {m['serial_s']:.0f} s one after another, {m['parallel_s']:.0f} s "
              f"two at once ({m['speedup'] or 0:.2f}x)")
    return 0 if all(m.get("speedup") for m in metrics.values() if "speedup" in m) else 1


def save(args: argparse.Namespace, out: Path, metrics: dict, sides: dict) -> None:
    """Write OUT/scaling.json (and --json) as each part ends, merged into what an earlier run measured (the --json
    file, else OUT's): a part at a time fits the device's limit per command (`--full-7b --profiles zero3`, ...)."""
    base = Path(args.json) if args.json and Path(args.json).is_file() else out / "scaling.json"
    old = json.loads(base.read_text()) if base.is_file() else {}
    merged_metrics, merged_sides = old.get("metrics", {}), old.get("sides", {})
    for name in metrics:
        if name == "full_7b" and isinstance(merged_metrics.get(name), dict):  # profile by profile
            merged_metrics[name] |= metrics[name]
            merged_sides[name] = (merged_sides.get(name) or {}) | sides[name]
        else:
            merged_metrics[name], merged_sides[name] = metrics[name], sides[name]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": frontier_device(args),
              "config": {"rows_per_step": frontier.ROWS_PER_STEP, "ctx": args.ctx, "steps": args.steps,
                         "warmup": args.warmup, "tiny": args.tiny}, "metrics": merged_metrics, "sides": merged_sides}
    text = json.dumps(result, indent=1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)


def sweep(args: argparse.Namespace, out: Path) -> tuple[dict, dict]:
    """`crb sweep` of the code recipe over two learning rates, one trial after the other, then one per GPU."""
    import time

    frontier.build_models(argparse.Namespace(**{**vars(args), "recipes": ["code"]}))
    text_file, _ = frontier.data(args, "code")
    a = frontier.side_args(args, "code", out, frontier.ROWS_PER_STEP)
    sets = [f"model.name={frontier.q(str(a.model_dir))}", f"data.train=[{frontier.q(str(text_file))}]",
            'data.format="text"', "data.packing=true", f"data.max_length={args.ctx}", "data.eval_split=0.125",
            "train.batch_size=4", "train.report_to=[]"]
    runs = {}
    for n in (1, 2):
        folder = out / "sweep" / f"parallel{n}"
        cmd = [sys.executable, "-m", "crb.cli", "sweep", str(a.recipe), "--grid", "train.lr=1e-4,2e-4", "--steps",
               str(args.steps), "--parallel", str(n), "--out", str(folder), *[x for s in sets for x in ("--set", s)]]
        t0 = time.perf_counter()
        rc, _ = frontier.run(cmd, out / "sweep" / f"parallel{n}.log", frontier.env_for(None if n == 2 else 0,
                                                                                        "whole"))
        state = folder / "sweep.json"
        trials = json.loads(state.read_text())["trials"] if state.is_file() else {}
        runs[n] = {"rc": rc, "wall_s": time.perf_counter() - t0,
                   "trials": {k: v.get("status") for k, v in trials.items()}}
        print(f"sweep --parallel {n}: rc {rc}, {runs[n]['wall_s']:.0f} s, {runs[n]['trials']}", flush=True)
    ok = all(r["rc"] == 0 and list(r["trials"].values()) == ["ok", "ok"] for r in runs.values())
    one, two = runs[1]["wall_s"], runs[2]["wall_s"]
    return {"trials": 2, "serial_s": one, "parallel_s": two, "speedup": one / two if ok else None}, runs


def full_7b(args: argparse.Namespace, out: Path) -> tuple[dict, dict]:
    """The language recipe's model fully fine-tuned on 2 GPUs under each profile: plan_accuracy.py's 2gpu rows."""
    import re

    import plan_accuracy

    profiles = args.profiles.split(",")
    plan_json = Path(args.plan_json or out / "plan_accuracy.json")
    plan_accuracy.main(["--out", str(out / "full_7b"), "--only", "2gpu", "--gpus", "2", "--json", str(plan_json),
                        "--match", f"full fine-tune, ctx \\d+, ({'|'.join(map(re.escape, profiles))})$", "--phases",
                        *["--tiny"] * args.tiny])
    rows = {r["setting"].rsplit(", ", 1)[-1]: r for r in json.loads(plan_json.read_text())["rows"]
            if r["recipe"] == "language" and r["setting"].startswith("2 GPUs, full fine-tune")}
    metrics, sides = {}, {}
    for profile in profiles:
        r = rows.get(profile, {})
        metrics[profile] = {"tokens_per_s": r.get("tokens_per_s"), "peak_gib": r.get("measured_gib"),
                            "plan_gib": r.get("predicted_gib"), "profile": r.get("run_profile")}
        sides[profile] = {k: r.get(k) for k in ("setting", "status", "note", "tokens_per_s", "measured_gib",
                                                "predicted_gib", "host_predicted_gib", "host_measured_gib", "chosen",
                                                "wall_s")}
    return metrics, sides


def frontier_device(args: argparse.Namespace) -> str:
    import torch

    return "CPU (--tiny: paths only)" if args.tiny or not torch.cuda.is_available() else \
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


if __name__ == "__main__":
    sys.exit(main())
