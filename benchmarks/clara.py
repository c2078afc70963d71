"""CLaRa stage 1 (compression pretraining) on a Mistral-7B-shaped model: step time and peak memory.

    python benchmarks/clara.py --out /tmp/crb-bench/clara                       # GPU: the 7B shape
    python benchmarks/clara.py --out /tmp/crb-bench/clara-check --tiny          # 2-layer model: runs on CPU

What it does:
1. builds once a Mistral-7B-shaped model with random bf16 weights and a small BPE tokenizer (as
   benchmarks/language.py does), into --model-dir;
2. writes stage-1 records of pseudo-words: one document of more than --doc tokens (cut there by crb), one
   question and one answer of about --answer-words words;
3. runs `python -m crb.run recipes/clara.toml --stage compression` on them: the recipe's LoRA r16 encoder and
   decoder adapters on the bf16 base, generation + 0.1 x MSE, compress rate --compress; two sides, one after
   the other: "auto", the shipped recipe (--batch records per step, the guide's 128, micro-batch "auto": the
   plan's choice for this card and these rows), and "micro2", the recipe as it was (micro-batch 2);
4. step time = the mean of metrics.jsonl's step_s after the warm-up steps; samples/s = records per step / step
   time; peak GiB = the largest gpu_mem_gib (torch.cuda.max_memory_allocated). Prints a table; writes
   OUT/clara.json (and --json PATH).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from language import _corpus, _git_commit, build_model_dir, run_logged  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "clara.toml"


def _words(seed: int) -> Callable[[int], str]:
    """n seeded pseudo-words at each call."""
    words = " ".join(_corpus(seed, 3000)).split()
    rng = random.Random(seed)
    return lambda n: " ".join(rng.choice(words) for _ in range(n))


def make_data(path: Path, rows: int, doc_words: int, answer_words: int, seed: int) -> None:
    text = _words(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"data_type": "qa", "question": [text(12) + "?"], "answers": [text(answer_words)],
                                "docs": [text(doc_words)]}) + "\n")


def make_stage23_data(path: Path, rows: int, n_docs: int, doc_words: int, answer_words: int, seed: int) -> None:
    """Stage 2 and 3 records: a question, N candidate documents (the first one gold) and an answer."""
    text = _words(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"question": text(12) + "?", "docs": [text(doc_words) for _ in range(n_docs)],
                                "answer": text(answer_words), "pos_index": [0]}) + "\n")


def run_side(args: argparse.Namespace, out: Path, model_dir: Path, name: str, batch: int, micro: str,
             steps: int, warmup: int) -> dict:
    """One crb run of stage 1: `steps` timed optimizer steps of `batch` records after `warmup` untimed ones."""
    n_steps = warmup + steps
    train = out / "data" / f"stage1-{batch}x{n_steps}.jsonl"
    make_data(train, batch * n_steps, doc_words=args.doc * 2, answer_words=args.answer_words, seed=args.seed)
    run_dir = out / "run" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"model.name={model_dir}", f'data.train=["{train}"]', "data.eval_split=0.0",
            f"data.cache_dir={out / 'data' / 'cache'}", f"output.dir={run_dir}",
            f"clara.doc_max_length={args.doc}", f"clara.compress_rate={args.compress}",
            f"train.micro_batch={micro}", f"train.batch_size={batch}",
            f"train.max_steps={n_steps}", "train.report_to=[]", "train.save_every=100000",
            "hardware.profile=plain"]
    cmd = [sys.executable, "-m", "crb.run", str(RECIPE), "--stage", "compression"]
    for s in sets:
        cmd += ["--set", s]
    rc, wall = run_logged(cmd, out / "logs" / f"{name}.log", name)
    stage_out = run_dir / "compression"
    rows = [json.loads(ln) for ln in (stage_out / "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
    done = [r for r in rows if "step_s" in r]
    timed = done[warmup:]
    ok = rc == 0 and len(done) == n_steps
    step_s = sum(r["step_s"] for r in timed) / len(timed) if ok else None
    mems = [r["gpu_mem_gib"] for r in done if "gpu_mem_gib" in r]
    profile = stage_out / "profile.json"
    chosen = json.loads(profile.read_text()) if profile.is_file() else {}
    shutil.rmtree(stage_out / "final_adapter", ignore_errors=True)
    return {"batch": batch, "micro_batch": chosen.get("micro_batch", micro), "choices": chosen.get("choices"),
            "plan_gib": chosen.get("plan_gib"), "step_s": step_s, "samples_per_s": batch / step_s if step_s else None,
            "peak_gib": max(mems) if ok and mems else None,
            "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed) if ok else None,
            "losses": [r["loss"] for r in done],
            "components": {k: [r.get(k) for r in done] for k in ("loss_clara_generation", "loss_clara_mse")},
            "status": "ok" if ok else f"failed (exit {rc}, {len(done)} of {n_steps} steps; log {out / 'logs'})",
            "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CLaRa stage 1 on a Mistral-7B shape: step time and peak memory")
    p.add_argument("--out", required=True)
    p.add_argument("--model-dir", default=None, help="default /tmp/crb-bench/mistral-7b (or mistral-tiny)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-128 model: checks on CPU")
    p.add_argument("--batch", type=int, default=128, help="records per optimizer step (the guide's 128)")
    p.add_argument("--doc", type=int, default=256, help="document tokens the encoder reads (clara.doc_max_length)")
    p.add_argument("--compress", type=int, default=32, help="clara.compress_rate")
    p.add_argument("--answer-words", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sides", default="micro2,auto", help="micro2: the old fixed micro-batch 2; auto: the recipe's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write clara.json here")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    model_dir = Path(args.model_dir or f"/tmp/crb-bench/{'mistral-tiny' if args.tiny else 'mistral-7b'}").resolve()
    if args.build_only:
        build_model_dir(model_dir, args.tiny, args.seed)
        return 0
    if not (model_dir / "config.json").is_file():  # in its own process: the GPU is clean for the run
        rc, _ = run_logged([sys.executable, __file__, "--out", str(out), "--model-dir", str(model_dir),
                            "--build-only", "--seed", str(args.seed)] + (["--tiny"] if args.tiny else []),
                           out / "logs" / "build.log", "build")
        if rc:
            return rc
    sides = {}
    for name in args.sides.split(","):
        if name == "micro2":  # how the recipe ran before: micro-batch 2, one micro-batch per step (per-record
            # speed does not depend on accumulation), so a few steps suffice
            sides[name] = run_side(args, out, model_dir, name, 2, "2", steps=8, warmup=2)
        else:  # the shipped recipe: the guide's batch, micro-batch "auto" chosen by the plan
            sides[name] = run_side(args, out, model_dir, name, args.batch, '"auto"', args.steps, args.warmup)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    a, b = sides.get("auto", {}), sides.get("micro2", {})
    summary = {
        "device": device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"model": "mistral-tiny (2 layers, hidden 128)" if args.tiny else
                   "Mistral-7B shape (32 layers, hidden 4096, GQA 32/8, vocab 32768), random bf16 weights",
                   "stage": "compression", "lora": "r16/alpha32 all-linear, encoder + decoder adapters",
                   "precision": "bf16", "batch": args.batch, "doc_max_length": args.doc,
                   "compress_rate": args.compress, "memory_tokens": args.doc // args.compress,
                   "steps": args.steps, "warmup": args.warmup},
        "metrics": {"stage1_samples_per_s": a.get("samples_per_s"), "stage1_step_s": a.get("step_s"),
                    "stage1_peak_gib": a.get("peak_gib"), "stage1_micro_batch": a.get("micro_batch"),
                    "micro2_samples_per_s": b.get("samples_per_s"), "micro2_peak_gib": b.get("peak_gib"),
                    "auto_vs_micro2": a["samples_per_s"] / b["samples_per_s"]
                    if a.get("samples_per_s") and b.get("samples_per_s") else None,
                    "doc_max_length": args.doc, "compress_rate": args.compress},
        "sides": sides, "crb_commit": _git_commit(),
    }
    text = json.dumps(summary, indent=1)
    (out / "clara.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(f"\nCLaRa stage 1 on {device}, doc {args.doc}, compress {args.compress}")
    print("| side | batch | micro-batch | step s | samples/s | peak GiB | plan GiB |\n|---|---|---|---|---|---|---|")
    for name, r in sides.items():
        print(f"| {name} | {r['batch']} | {r['micro_batch']} | {r['step_s'] or 0:.3f} | {r['samples_per_s'] or 0:.2f} "
              f"| {r['peak_gib'] or 0:.1f} | {r['plan_gib']} |  {r['status']}")
    return 0 if all(r["status"] == "ok" for r in sides.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
