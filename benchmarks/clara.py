"""CLaRa stage 1 (compression pretraining) on a Mistral-7B-shaped model: step time and peak memory.

    python benchmarks/clara.py --out /tmp/crb-bench/clara                       # GPU: the 7B shape
    python benchmarks/clara.py --out /tmp/crb-bench/clara-check --tiny          # 2-layer model: runs on CPU

What it does:
1. builds once a Mistral-7B-shaped model with random bf16 weights and a small BPE tokenizer (as
   benchmarks/language.py does), into --model-dir;
2. writes stage-1 records of pseudo-words: one document of more than --doc tokens (cut there by crb), one
   question and one answer of about --answer-words words;
3. runs `python -m crb.run recipes/clara.toml --stage compression` on them: the recipe's LoRA r16 encoder and
   decoder adapters on the bf16 base, generation + 0.1 x MSE, compress rate --compress, micro-batch
   --micro-batch, one micro-batch per optimizer step;
4. step time = the mean of metrics.jsonl's step_s after --warmup steps; peak GiB = the largest gpu_mem_gib
   (torch.cuda.max_memory_allocated). Prints a table; writes OUT/clara.json (and --json PATH).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from language import _corpus, _git_commit, build_model_dir, run_logged  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "clara.toml"


def make_data(path: Path, rows: int, doc_words: int, answer_words: int, seed: int) -> None:
    words = " ".join(_corpus(seed, 3000)).split()
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"data_type": "qa", "question": [text(12) + "?"], "answers": [text(answer_words)],
                                "docs": [text(doc_words)]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CLaRa stage 1 on a Mistral-7B shape: step time and peak memory")
    p.add_argument("--out", required=True)
    p.add_argument("--model-dir", default=None, help="default /tmp/crb-bench/mistral-7b (or mistral-tiny)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-128 model: checks on CPU")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--doc", type=int, default=256, help="document tokens the encoder reads (clara.doc_max_length)")
    p.add_argument("--compress", type=int, default=32, help="clara.compress_rate")
    p.add_argument("--answer-words", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3)
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
    n_steps = args.warmup + args.steps
    train = out / "data" / "stage1.jsonl"
    make_data(train, args.micro_batch * n_steps, doc_words=args.doc * 2, answer_words=args.answer_words,
              seed=args.seed)
    shutil.rmtree(out / "run", ignore_errors=True)
    sets = [f"model.name={model_dir}", f'data.train=["{train}"]', "data.eval_split=0.0",
            f"data.cache_dir={out / 'data' / 'cache'}", f"output.dir={out / 'run'}",
            f"clara.doc_max_length={args.doc}", f"clara.compress_rate={args.compress}",
            f"train.micro_batch={args.micro_batch}", f"train.batch_size={args.micro_batch}",
            f"train.max_steps={n_steps}", "train.report_to=[]", "train.save_every=100000",
            "hardware.profile=plain"]
    cmd = [sys.executable, "-m", "crb.run", str(RECIPE), "--stage", "compression"]
    for s in sets:
        cmd += ["--set", s]
    rc, wall = run_logged(cmd, out / "logs" / "crb.log", "crb")
    stage_out = out / "run" / "compression"
    rows = [json.loads(ln) for ln in (stage_out / "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
    steps = [r for r in rows if "step_s" in r]
    timed = steps[args.warmup:]
    ok = rc == 0 and len(steps) == n_steps
    step_s = sum(r["step_s"] for r in timed) / len(timed) if ok else None
    mems = [r["gpu_mem_gib"] for r in steps if "gpu_mem_gib" in r]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary = {
        "device": device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"model": "mistral-tiny (2 layers, hidden 128)" if args.tiny else
                   "Mistral-7B shape (32 layers, hidden 4096, GQA 32/8, vocab 32768), random bf16 weights",
                   "stage": "compression", "lora": "r16/alpha32 all-linear, encoder + decoder adapters",
                   "precision": "bf16", "micro_batch": args.micro_batch, "doc_max_length": args.doc,
                   "compress_rate": args.compress, "memory_tokens": args.doc // args.compress,
                   "steps": args.steps, "warmup": args.warmup},
        "metrics": {"stage1_step_s": step_s, "stage1_peak_gib": max(mems) if ok and mems else None,
                    "stage1_samples_per_s": args.micro_batch / step_s if step_s else None,
                    "stage1_tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed) if ok else None,
                    "micro_batch": args.micro_batch, "doc_max_length": args.doc, "compress_rate": args.compress},
        "losses": {"crb": [r["loss"] for r in steps]},
        "components": {k: [r.get(k) for r in steps] for k in ("loss_clara_generation", "loss_clara_mse")},
        "status": "ok" if ok else f"failed (exit {rc}, {len(steps)} of {n_steps} steps; log {out / 'logs'})",
        "wall_s": wall, "crb_commit": _git_commit(),
    }
    shutil.rmtree(stage_out / "final_adapter", ignore_errors=True)
    text = json.dumps(summary, indent=1)
    (out / "clara.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    m = summary["metrics"]
    print(f"\nCLaRa stage 1 on {device}: {summary['status']}")
    if ok:
        print(f"| micro-batch | doc | compress | step s | samples/s | peak GiB |\n|---|---|---|---|---|---|\n"
              f"| {args.micro_batch} | {args.doc} | {args.compress} | {step_s:.3f} | {m['stage1_samples_per_s']:.2f} "
              f"| {m['stage1_peak_gib'] or 0:.1f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
