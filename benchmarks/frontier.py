"""The speed frontier: crb as shipped against TRL's best configuration that fits, card size by card size.

    python benchmarks/frontier.py --out /tmp/crb-bench/frontier --json benchmarks/results/frontier.json
    python benchmarks/frontier.py --out OUT --recipes language --caps whole,80 --gpus 2   # rows on 2 GPUs at once
    python benchmarks/frontier.py --out /tmp/crb-bench/frontier-check --tiny --caps whole   # CPU: paths only

A row is (recipe, memory cap). Its sides run back to back on one GPU, each in its own process:
- crb: `python -m crb.run recipes/RECIPE.toml` with the benchmark's model, data and step count and nothing
  else: micro-batch, checkpointed layers, offload and kernels are the recipe's "auto", chosen by the plan;
- TRL: SFTTrainer (benchmarks/language.py's worker: the recipe's settings, gradient checkpointing on, as
  TRL documents it), micro-batch 4, 2 or 1 with accumulation keeping the 8 rows per step, with and without
  `use_liger_kernel`. Candidates are pruned with crb's plan (the largest micro-batch whose plan fits the cap
  for each liger setting); one that runs out of memory falls back to the next smaller micro-batch. TRL's
  figure is the fastest candidate that ran.
A cap is CRB_GPU_MEMORY_GB for crb and torch.cuda.set_per_process_memory_fraction for TRL ("whole": none).
Models are random-weight Mistral-7B and StarCoder2-3B shapes, built once on the GPU; rows are 8 full
8192-token rows of random tokens per step, the same token ids for both sides. With `--data packed` they
are short documents instead (log-normal lengths, median 600 tokens, like short retail chats) that each
side packs into 8192-token rows itself: crb greedily in order (its attention "auto": FlexAttention's
document block mask on CUDA), TRL with `packing=True` (best-fit decreasing, padding-free, micro-batch 1:
its collator flattens a micro-batch into one sequence); tokens/s counts the documents' tokens. Each row's result is kept
in OUT/rows/ as it finishes (a rerun skips finished rows); OUT/frontier.json holds them all.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import language  # benchmarks/ is on sys.path
import plan_accuracy

ROOT = Path(__file__).resolve().parents[1]
ROWS_PER_STEP = 8
q = json.dumps


def model_dir(args: argparse.Namespace, recipe: str) -> Path:
    name = {"language": "mistral-7b", "code": "starcoder2-3b"}[recipe]
    return Path(args.models) / (name + ("-tiny" if args.tiny else ""))


def build_models(args: argparse.Namespace) -> None:
    mistral = model_dir(args, "language")
    if not mistral.is_dir():
        language.build_model_dir(mistral, args.tiny, args.seed)
    if "code" in args.recipes and not model_dir(args, "code").is_dir():
        plan_accuracy.starcoder2_dir(model_dir(args, "code"), mistral, args.tiny)


def side_args(args: argparse.Namespace, recipe: str, row_out: Path, micro: int) -> argparse.Namespace:
    """What benchmarks/language.py's functions take."""
    return argparse.Namespace(out=row_out, ctx=args.ctx, micro_batch=micro, accum=ROWS_PER_STEP // micro,
                              steps=args.steps, warmup=args.warmup, tiny=args.tiny, seed=args.seed,
                              model_dir=model_dir(args, recipe), recipe=ROOT / "recipes" / f"{recipe}.toml",
                              packed=args.data == "packed", attn=None)


def data(args: argparse.Namespace, recipe: str) -> tuple[Path, Path]:
    """The row files (text for crb, token ids for TRL), made once per model."""
    a = side_args(args, recipe, Path(args.out) / "data" / recipe, ROWS_PER_STEP)
    text_file, rows_file = language.data_files(a)
    if not rows_file.is_file() and a.packed:
        rows = ROWS_PER_STEP * (args.warmup + args.steps)
        language.make_packed_data(a.model_dir, text_file, rows_file, int(rows * args.ctx * 1.25), args.seed)
    elif not rows_file.is_file():
        language.make_data(a.model_dir, text_file, rows_file, args.ctx, ROWS_PER_STEP * (args.warmup + args.steps),
                           args.seed)
    return text_file, rows_file


def env_for(gpu: int | str | None, cap: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CRB_GPU_MEMORY_GB", None)
    if cap != "whole":
        env["CRB_GPU_MEMORY_GB"] = cap
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def run(cmd: list[str], log: Path, env: dict) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def crb_side(args: argparse.Namespace, recipe: str, cap: str, gpu: int | str | None, out: Path,
             launcher: list[str] | None = None) -> dict:
    """crb as shipped on one row; `launcher` starts it (default: one process, `python -m crb.run`)."""
    text_file, rows_file = data(args, recipe)
    a = side_args(args, recipe, out, ROWS_PER_STEP)
    sets = [f"model.name={q(str(a.model_dir))}", f"data.train=[{q(str(text_file))}]", 'data.format="text"',
            "data.packing=true", f"data.max_length={args.ctx}", "data.eval_split=0",
            f"data.cache_dir={q(str(out / 'crb-cache'))}", f"train.batch_size={ROWS_PER_STEP}",
            f"train.max_steps={args.warmup + args.steps}", "train.keep_checkpoints=0", "train.report_to=[]",
            f"output.dir={q(str(out / 'crb'))}", *args.crb_set]
    cmd = (launcher or [sys.executable]) + ["-m", "crb.run", str(a.recipe)] + [x for s in sets for x in ("--set", s)]
    rc, wall = run(cmd, out / "crb.log", env_for(gpu, cap))
    metrics = out / "crb" / "metrics.jsonl"
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.is_file() else []
    lines = [s for s in lines if "step_s" in s]
    seen = [0] + [s["tokens"] for s in lines]  # crb logs the tokens seen so far
    steps = [{"step": s["step"], "step_s": s["step_s"], "loss": s["loss"], "gpu_mem_gib": s.get("gpu_mem_gib"),
              "step_tokens": seen[i + 1] - seen[i]} for i, s in enumerate(lines)]
    result = language.side_result("crb", a, steps, rc, wall, out / "crb.log")
    profile = out / "crb" / "profile.json"
    result["chosen"] = json.loads(profile.read_text()) if profile.is_file() else None
    result["rows_identical_to_trl"] = None if a.packed else language.check_crb_rows(out / "crb-cache", rows_file)
    if result["rows_identical_to_trl"] is False:
        result["status"], result["note"] = "failed", "crb's rows differ from TRL's"
    return result


def trl_candidates(args: argparse.Namespace, recipe: str, cap: str) -> dict[bool, list[int]]:
    """For TRL without and with Liger: the micro-batches to try, largest first, from the largest that crb's
    plan (gradient checkpointing on, nothing offloaded, plain profile) fits in the cap."""
    from crb.engine import hardware, plan
    from crb.recipe import schema as recipes

    out: dict[bool, list[int]] = {}
    for liger in (False, True):
        micros = [m for m in (4, 2, 1) if ROWS_PER_STEP % m == 0]
        if args.data == "packed":  # TRL flattens a micro-batch into one sequence: one 8192-token row per pass
            micros = [1]
        if cap != "whole" and not args.tiny:
            hw = hardware.Hardware([hardware.Gpu("cap", float(cap), float(cap), (9, 0))], True, 64, 1)
            fits = []
            for m in micros:
                r = recipes.load(ROOT / "recipes" / f"{recipe}.toml", [
                    f"model.name={q(str(model_dir(args, recipe)))}", f"data.max_length={args.ctx}",
                    f"train.batch_size={ROWS_PER_STEP}", f"train.micro_batch={m}", "train.gradient_checkpointing=true",
                    "train.offload_activations=false", f"train.kernels={q('liger' if liger else 'none')}",
                    'hardware.profile="plain"'])
                p = plan.plan(r, hw, advise=False)
                if p.total <= float(cap) * 2**30 * 1.05:  # a little slack: TRL's own peak may differ from crb's
                    fits.append(m)
            micros = fits
        out[liger] = micros
    return out


def trl_side(args: argparse.Namespace, recipe: str, cap: str, gpu: int | None, out: Path, liger: bool,
             micros: list[int]) -> dict:
    side = "trl_liger" if liger else "trl"
    tried = []
    for m in micros:
        a = side_args(args, recipe, Path(args.out) / "data" / recipe, m)
        a.out = Path(args.out) / "data" / recipe  # the worker reads the rows from there
        result_file = out / f".{side}-m{m}.json"
        result_file.unlink(missing_ok=True)
        cmd = language.worker_cmd(a, side, result_file)
        rc, wall = run(cmd, out / f"{side}-m{m}.log", env_for(gpu, cap))
        steps = json.loads(result_file.read_text())["steps"] if rc == 0 and result_file.is_file() else []
        r = language.side_result(side, a, steps, rc, wall, out / f"{side}-m{m}.log")
        r["micro_batch"] = m
        tried.append({k: r[k] for k in ("micro_batch", "status", "tokens_per_s", "peak_gib", "note")})
        if r["status"] == "ok":
            r["tried"] = tried
            return r
    return {"side": side, "status": "does not fit" if micros else "does not fit by the plan", "tokens_per_s": None,
            "peak_gib": None, "tried": tried}


def row_name(args: argparse.Namespace, recipe: str, cap: str) -> str:
    return f"{recipe}-{cap}" + ("-packed" if args.data == "packed" else "") + (f"-{args.label}" if args.label else "")


def run_row(args: argparse.Namespace, recipe: str, cap: str, gpu: int | None) -> dict:
    name = row_name(args, recipe, cap)
    out = Path(args.out) / "rows" / name
    out.mkdir(parents=True, exist_ok=True)
    done = Path(args.out) / "rows" / f"{name}.json"
    skipped = {"status": "not run", "tokens_per_s": None, "peak_gib": None}
    row: dict = json.loads(done.read_text()) if done.is_file() and not args.redo else \
        {"crb": dict(skipped), "trl": dict(skipped), "trl_liger": dict(skipped)}
    row.update(recipe=recipe, cap=cap, gpu=gpu, label=args.label, data=args.data)

    def due(side: str) -> bool:  # asked for, and not done yet
        return side in args.sides.split(",") and row[side].get("status") != "ok"

    if due("crb"):
        row["crb_set"] = args.crb_set
        print(f"[{name}] gpu {gpu}: crb", flush=True)
        row["crb"] = crb_side(args, recipe, cap, gpu, out)
    candidates = trl_candidates(args, recipe, cap)
    for liger in (False, True):
        side = "trl_liger" if liger else "trl"
        if due(side):
            print(f"[{name}] gpu {gpu}: {side} micro-batches {candidates[liger]}", flush=True)
            row[side] = trl_side(args, recipe, cap, gpu, out, liger, candidates[liger])
        row[side].pop("log_tail", None)
    (Path(args.out) / "rows" / f"{name}.json").write_text(json.dumps(row, indent=1))
    print(f"[{name}] {summary_line(row)}", flush=True)
    return row


def summary_line(row: dict) -> str:
    def fmt(side: str) -> str:
        r = row[side]
        if not r.get("tokens_per_s"):
            return f"{side} {r.get('status')}"
        return f"{side} {r['tokens_per_s']:,.0f} tok/s {r.get('peak_gib') or 0:.1f} GiB"
    return "; ".join(fmt(s) for s in ("crb", "trl", "trl_liger"))


def summarize(args: argparse.Namespace, probe: dict) -> dict:
    metrics: dict = {}
    rows = []
    for f in sorted((Path(args.out) / "rows").glob("*.json")):
        rows.append(json.loads(f.read_text()))
    metrics["experiments"] = [{"row": f"{r['recipe']}-{r['cap']}-{r.get('data', 'full')}-{r['label']}",
                               "crb_set": r.get("crb_set"),
                               **{f"{side}_{k}": r[side].get(k) for side in ("crb", "trl", "trl_liger")
                                  for k in ("tokens_per_s", "peak_gib")}, "crb_config": _chosen(r["crb"])}
                              for r in rows if r.get("label")]
    packed = [r for r in rows if r.get("data") == "packed" and not r.get("label")]
    if packed:
        metrics["packed"] = {f"{r['recipe']}_{r['cap']}": _packed(r) for r in packed}
    for recipe in ("language", "code"):
        mine = [r for r in rows if r["recipe"] == recipe and not r.get("label") and r.get("data", "full") == "full"]
        if not mine:
            continue
        m: dict = {"caps": []}
        for r in mine:
            c, t, tl = r["crb"], r["trl"], r["trl_liger"]
            trls = [x for x in (t, tl) if x.get("tokens_per_s")]
            best = max(trls, key=lambda x: x["tokens_per_s"]) if trls else None
            entry = {"cap_gib": None if r["cap"] == "whole" else float(r["cap"]),
                     "crb_tokens_per_s": c.get("tokens_per_s"), "crb_peak_gib": c.get("peak_gib"),
                     "crb_config": _chosen(c), "trl_best_tokens_per_s": best and best["tokens_per_s"],
                     "trl_best_peak_gib": best and best["peak_gib"],
                     "trl_best_config": best and {"micro_batch": best["micro_batch"],
                                                  "accumulation": ROWS_PER_STEP // best["micro_batch"],
                                                  "liger": best["side"] == "trl_liger",
                                                  "gradient_checkpointing": True},
                     "crb_vs_trl_best": c.get("tokens_per_s") / best["tokens_per_s"]
                     if best and c.get("tokens_per_s") else None}
            if r["cap"] == "whole":
                m["whole_card"] = {"crb_tokens_per_s": c.get("tokens_per_s"), "trl_tokens_per_s": t.get("tokens_per_s"),
                                   "trl_liger_tokens_per_s": tl.get("tokens_per_s"), "crb_peak_gib": c.get("peak_gib"),
                                   "trl_peak_gib": t.get("peak_gib"), "trl_liger_peak_gib": tl.get("peak_gib"),
                                   "crb_config": _chosen(c),
                                   "crb_vs_trl": _ratio(c, t), "crb_vs_trl_liger": _ratio(c, tl)}
            else:
                m["caps"].append(entry)
        m["caps"].sort(key=lambda e: e["cap_gib"])
        metrics[recipe] = m
    return {"device": probe["device"], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {"ctx": args.ctx, "rows_per_step": ROWS_PER_STEP, "steps": args.steps, "warmup": args.warmup,
                       "data": "full rows of random tokens; packed rows: see metrics.packed",
                       "model": "random weights, real shapes"},
            "metrics": metrics, "versions": probe["versions"], "crb_commit": language._git_commit(), "rows": rows}


def _packed(r: dict) -> dict:
    c, t, tl = r["crb"], r["trl"], r["trl_liger"]
    best = max([x for x in (t, tl) if x.get("tokens_per_s")], key=lambda x: x["tokens_per_s"], default={})
    return {"recipe": r["recipe"], "cap_gib": None if r["cap"] == "whole" else float(r["cap"]),
            "data": "short documents (log-normal, median 600 tokens) packed into 8192-token rows",
            "crb_tokens_per_s": c.get("tokens_per_s"), "crb_peak_gib": c.get("peak_gib"), "crb_config": _chosen(c),
            "trl_tokens_per_s": t.get("tokens_per_s"), "trl_liger_tokens_per_s": tl.get("tokens_per_s"),
            "trl_peak_gib": t.get("peak_gib"), "trl_liger_peak_gib": tl.get("peak_gib"),
            "trl_config": "packing=True (bfd, padding-free), sdpa, micro-batch 1 x accumulation 8, gradient "
                          "checkpointing", "crb_vs_trl_best": _ratio(c, best)}


def _ratio(a: dict, b: dict) -> float | None:
    return a["tokens_per_s"] / b["tokens_per_s"] if a.get("tokens_per_s") and b.get("tokens_per_s") else None


def _chosen(c: dict) -> dict | None:
    p = c.get("chosen")
    if not p:
        return None
    return {k: p.get(k) for k in ("profile", "micro_batch", "checkpointed_layers", "layers", "offload_activations",
                                  "kernels", "compile", "attention", "plan_gib", "shared_dropout")}


def table(summary: dict) -> str:
    lines = [f"{summary['device']}: ctx {summary['config']['ctx']}, {ROWS_PER_STEP} rows per step",
             f"{'recipe':9} {'cap':>6} {'crb tok/s':>10} {'GiB':>6} {'TRL best':>10} {'GiB':>6} {'ratio':>6}  "
             "crb config / TRL config"]
    for recipe, m in summary["metrics"].items():
        if recipe == "packed":
            for name, e in m.items():
                cfg = e.get("crb_config") or {}
                lines.append(f"{name + ' packed':16} crb {e['crb_tokens_per_s'] or 0:,.0f} tok/s "
                             f"{e['crb_peak_gib'] or 0:.1f} GiB ({cfg.get('attention')}, "
                             f"micro {cfg.get('micro_batch')}); TRL {e['trl_tokens_per_s'] or 0:,.0f}; "
                             f"TRL+Liger {e['trl_liger_tokens_per_s'] or 0:,.0f}; "
                             f"ratio {e['crb_vs_trl_best'] or 0:.2f}")
            continue
        if recipe == "experiments":
            for e in m:
                cfg = e.get("crb_config") or {}
                lines.append(f"{e['row']:24} crb {e['crb_tokens_per_s'] or 0:,.0f} tok/s {e['crb_peak_gib'] or 0:.1f} "
                             f"GiB (plan {cfg.get('plan_gib')}); TRL {e['trl_tokens_per_s'] or 0:,.0f} "
                             f"{e['trl_peak_gib'] or 0:.1f}; TRL+Liger {e['trl_liger_tokens_per_s'] or 0:,.0f} "
                             f"{e['trl_liger_peak_gib'] or 0:.1f}  {' '.join(e['crb_set'] or [])}")
            continue
        entries = ([{"cap_gib": "whole", **m["whole_card"], "trl_best_tokens_per_s": max(
            [x for x in (m["whole_card"]["trl_tokens_per_s"], m["whole_card"]["trl_liger_tokens_per_s"]) if x],
            default=None)}] if "whole_card" in m else []) + m["caps"]
        for e in entries:
            c, t = e.get("crb_tokens_per_s"), e.get("trl_best_tokens_per_s")
            cfg = e.get("crb_config") or {}
            lines.append(f"{recipe:9} {e['cap_gib']!s:>6} {c or 0:>10,.0f} {e.get('crb_peak_gib') or 0:>6.1f} "
                         f"{t or 0:>10,.0f} {e.get('trl_best_peak_gib') or e.get('trl_peak_gib') or 0:>6.1f} "
                         f"{(c / t if c and t else 0):>6.2f}  micro {cfg.get('micro_batch')} ckpt "
                         f"{cfg.get('checkpointed_layers')}/{cfg.get('layers')} {cfg.get('kernels')} "
                         f"{'compiled ' if cfg.get('compile') else ''}"
                         f"{cfg.get('profile')} / {e.get('trl_best_config')}")
    return "\n".join(lines)


def main_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="crb as shipped vs TRL's best configuration that fits, per memory cap")
    p.add_argument("--out", required=True)
    p.add_argument("--recipes", default="language,code")
    p.add_argument("--caps", default="whole,80,48,24,16,8", help="GiB caps, or 'whole' for the whole card")
    p.add_argument("--gpus", type=int, default=1, help="rows run at once, one per GPU")
    p.add_argument("--ctx", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--models", default="/tmp/crb-bench/models")
    p.add_argument("--json", default=None)
    p.add_argument("--redo", action="store_true", help="rerun rows that already have a result")
    p.add_argument("--crb-set", action="append", default=[], help="extra crb override (experiments)")
    p.add_argument("--label", default="", help="an experiment's name: its rows stay out of the frontier table")
    p.add_argument("--sides", default="crb,trl,trl_liger")
    p.add_argument("--data", choices=["full", "packed"], default="full",
                   help="full 8192-token rows, or short documents packed into them")
    args = p.parse_args(argv)
    args.ctx = args.ctx or (256 if args.tiny else 8192)
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.out = Path(args.out).resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = main_args(argv)
    (args.out / "rows").mkdir(parents=True, exist_ok=True)
    probe_file = args.out / ".probe.json"
    a = side_args(args, "language", args.out, ROWS_PER_STEP)
    run(language.worker_cmd(a, "probe", probe_file), args.out / "probe.log", env_for(None, "whole"))
    probe = json.loads(probe_file.read_text())
    build_models(args)
    for recipe in args.recipes:
        data(args, recipe)
    todo = queue.Queue()
    for recipe in args.recipes:
        for cap in args.caps.split(","):
            todo.put((recipe, cap))

    def worker(gpu: int | None) -> None:
        while True:
            try:
                recipe, cap = todo.get_nowait()
            except queue.Empty:
                return
            try:
                run_row(args, recipe, cap, gpu)
            except Exception as e:  # one broken row must not stop the others
                print(f"[{recipe}-{cap}] failed: {e!r}", flush=True)

    gpus = list(range(args.gpus)) if args.gpus > 1 else [None]
    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = summarize(args, probe)
    text = json.dumps(summary, indent=1)
    (args.out / "frontier.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    print("\n" + table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
