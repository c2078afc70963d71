"""crb's translation recipe against transformers' Seq2SeqTrainer: same model, same token ids, one table.

    python benchmarks/translation.py --out /tmp/crb-bench/translation             # crb, then Seq2SeqTrainer
    python benchmarks/translation.py --out /tmp/crb-bench/translation --only hf   # one side
    python benchmarks/translation.py --out /tmp/crb-bench/check --tiny            # 2+2-layer model: runs on CPU

What it does, in order, each heavy part in its own process so that each side starts on a clean GPU:
1. builds once an NLLB-200-distilled-600M-shaped M2M100ForConditionalGeneration (d_model 1024, 12 + 12
   layers, 16 heads, FFN 4096, vocab 256206, scaled embeddings, tied output layer, no layerdrop) with random
   bf16 weights, made on the GPU, and an NLLB tokenizer made here (the recipe's 25 language tokens, a BPE
   trained on made-up words, each of them one token), into --model-dir (no hub needed; kept for later runs);
2. writes translation JSONL (eng_Latn -> hin_Deva, fra_Latn, tam_Taml, deu_Latn in turn) of random words,
   every source exactly --src-tokens and every target exactly --tgt-tokens tokens with the language token and
   </s> (256 + 256 by default: no truncation at max_length 512, no padding), and the same rows tokenized for
   Seq2SeqTrainer as crb tokenizes them (tokenizer.src_lang / tgt_lang, `tokenizer(src, text_target=tgt)`),
   checked against crb's data cache after its run;
3. crb: `python -m crb.run recipes/translation.toml --set ...` (full fine-tune, fp32 weights, bf16 autocast,
   AdamW), per-step time and peak memory from its metrics.jsonl;
4. transformers: Seq2SeqTrainer with the same settings read from the same recipe (fp32 weights, bf16, lr 2e-5,
   linear, warmup 3%, weight decay 0.01, adamw_torch), DataCollatorForSeq2Seq; each optimizer step timed by a
   callback between torch.cuda.synchronize() calls;
5. samples/s = batch / mean step time over the steps after the warm-up ones; peak GiB =
   torch.cuda.max_memory_allocated(). Prints a table; writes OUT/translation.json.

Each side's figures are also kept in OUT/sides/<side>.json: a run with --only adds its side to one already in
OUT for the same configuration, and translation.json holds both. `--json PATH` writes a copy of translation.json
elsewhere (e.g. benchmarks/results/translation.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "translation.toml"
SIDES = ("crb", "hf")
LABELS = {"crb": "crb", "hf": "Seq2SeqTrainer"}
SOURCE, TARGETS = "eng_Latn", ("hin_Deva", "fra_Latn", "tam_Taml", "deu_Latn")
TOKENIZER_VOCAB = 8000  # the tokenizer's; the model's vocabulary stays 256206, so the logits are full size


def m2m100_config(tiny: bool, tok):
    from transformers import M2M100Config

    shape = (dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128) if tiny else
             dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096))
    return M2M100Config(vocab_size=256206, max_position_embeddings=1024, scale_embedding=True,
                        activation_function="relu", dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
                        encoder_layerdrop=0.0, decoder_layerdrop=0.0, init_std=0.02, tie_word_embeddings=True,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.eos_token_id, **shape)


# ---------------------------------------------------------------- 1. model and tokenizer


def pseudo_words(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def make_tokenizer(seed: int):
    """NLLB's tokenizer class and special tokens (<s> 0, <pad> 1, </s> 2, <unk> 3, the language codes), its BPE
    trained on made-up words, enough merges that each word is one token."""
    from transformers import NllbTokenizer

    from crb.recipe.schema import LANGUAGES

    rng = random.Random(seed)
    words = pseudo_words(seed, 4000)
    corpus = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(5000)]
    base = NllbTokenizer(extra_special_tokens=list(LANGUAGES), src_lang=SOURCE, tgt_lang=TARGETS[0])
    return base.train_new_from_iterator(corpus, vocab_size=TOKENIZER_VOCAB)


def build_model_dir(path: Path, tiny: bool, seed: int) -> None:
    """Random weights in bf16, made on the GPU where there is one; written to a temp folder, then renamed."""
    from transformers import AutoModelForSeq2SeqLM

    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = make_tokenizer(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with device:
        model = AutoModelForSeq2SeqLM.from_config(m2m100_config(tiny, tok), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    print(f"build: {n / 1e6:.0f}M parameters on {device}; tokenizer of {len(tok)} tokens "
          f"(pad {tok.pad_token_id}, eos {tok.eos_token_id}); writing {tmp}", flush=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    os.replace(tmp, path)
    print(f"build: {path} in {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------- 2. data


def make_data(args: argparse.Namespace, text_file: Path, rows_file: Path) -> None:
    """Translation records of one-token words, and their token ids as crb makes them, for Seq2SeqTrainer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)  # as crb loads it
    words = pseudo_words(args.seed, 4000)
    counts = tok(words, add_special_tokens=False)["input_ids"]
    single = [w for w, ids in zip(words, counts, strict=True) if len(ids) == 1]
    rng = np.random.default_rng(args.seed)

    def text(n: int) -> str:
        return " ".join(single[i] for i in rng.integers(0, len(single), n))

    n = n_rows(args)
    records, src, tgt = [], np.zeros((n, args.src_tokens), np.int64), np.zeros((n, args.tgt_tokens), np.int64)
    for i in range(n):
        rec = {"source_lang": SOURCE, "target_lang": TARGETS[i % len(TARGETS)],
               "source_text": text(args.src_tokens - 2), "target_text": text(args.tgt_tokens - 2)}  # + lang, </s>
        tok.src_lang, tok.tgt_lang = rec["source_lang"], rec["target_lang"]
        enc = tok(rec["source_text"], text_target=rec["target_text"])
        if len(enc["input_ids"]) != args.src_tokens or len(enc["labels"]) != args.tgt_tokens:
            raise SystemExit(f"data: row {i} tokenizes to {len(enc['input_ids'])} + {len(enc['labels'])} tokens, "
                             f"expected {args.src_tokens} + {args.tgt_tokens}")
        records.append(rec)
        src[i], tgt[i] = enc["input_ids"], enc["labels"]
    text_file.parent.mkdir(parents=True, exist_ok=True)
    text_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    np.savez(rows_file, input_ids=src, labels=tgt)


def n_rows(args: argparse.Namespace) -> int:
    return args.batch * (args.warmup + args.steps)


def data_files(args: argparse.Namespace) -> tuple[Path, Path]:
    name, data = f"src{args.src_tokens}-tgt{args.tgt_tokens}-rows{n_rows(args)}", Path(args.out) / "data"
    return data / f"translation-{name}.jsonl", data / f"rows-{name}.npz"


def check_crb_rows(cache_dir: Path, rows_file: Path) -> bool | None:
    """Whether crb's prepared rows (its data cache, in file order) are exactly the rows Seq2SeqTrainer gets."""
    caches = sorted(cache_dir.glob("*.npz"), key=lambda p: p.stat().st_mtime)
    if not caches:
        return None
    with np.load(rows_file) as rows, np.load(caches[-1]) as z:
        if "train.input_ids" not in z.files:
            return None
        same = True
        for key in ("input_ids", "labels"):
            want = rows[key]
            lengths, ids = z[f"train.{key}.len"], z[f"train.{key}"]
            same = same and bool(len(lengths) == len(want) and (lengths == want.shape[1]).all()
                                 and np.array_equal(ids.reshape(want.shape), want))
    return same


# ---------------------------------------------------------------- 3. crb


def crb_overrides(args: argparse.Namespace, text_file: Path) -> list[str]:
    q = json.dumps  # a JSON string is a TOML basic string
    out = Path(args.out)
    return [f"model.name={q(str(args.model_dir))}", f"data.train=[{q(str(text_file))}]", "data.eval=[]",
            "data.eval_split=0.0", f"data.max_length={args.max_length}", f"data.source_lang={q(SOURCE)}",
            f"data.cache_dir={q(str(out / 'data' / 'crb-cache'))}", f"train.batch_size={args.batch}",
            f"train.micro_batch={args.batch}", f"train.max_steps={args.warmup + args.steps}",
            f"train.precision={q(args.precision)}", "train.keep_checkpoints=0", "train.report_to=[]",
            f"output.dir={q(str(out / 'crb'))}", *getattr(args, "crb_set", [])]


def run_crb(args: argparse.Namespace, text_file: Path, rows_file: Path) -> dict:
    out = Path(args.out)
    for stale in (out / "crb", out / "data" / "crb-cache"):  # so that what is read below is this run's
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [sys.executable, "-m", "crb.run", str(RECIPE)]
    for item in crb_overrides(args, text_file):
        cmd += ["--set", item]
    log = out / "logs" / "crb.log"
    rc, wall = run_logged(cmd, log, "crb")
    metrics = out / "crb" / "metrics.jsonl"
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [{"step": s["step"], "step_s": s["step_s"], "loss": s["loss"], "gpu_mem_gib": s.get("gpu_mem_gib")}
             for s in lines if "step_s" in s]
    result = side_result("crb", args, steps, rc, wall, log)
    result["rows_identical_to_hf"] = check_crb_rows(out / "data" / "crb-cache", rows_file)
    if result["status"] == "ok" and result["rows_identical_to_hf"] is False:
        result["status"] = "failed"
        result["note"] = "crb's tokenized rows differ from Seq2SeqTrainer's"
    for big in ("final_model", "checkpoints"):  # GBs, not needed here
        shutil.rmtree(out / "crb" / big, ignore_errors=True)
    return result


# ---------------------------------------------------------------- 4. Seq2SeqTrainer (a worker process)


def hf_worker(args: argparse.Namespace) -> None:
    from datasets import Dataset
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )
    from transformers.trainer_utils import set_seed

    from crb.recipe import schema as recipes

    out = Path(args.out)
    text_file, rows_file = data_files(args)
    # The settings come from the recipe that crb runs (with the benchmark's overrides).
    r = recipes.load(RECIPE, crb_overrides(args, text_file))
    t = r.train
    assert r.method.name == "full", "the translation recipe is a full fine-tune"
    gpu = torch.cuda.is_available()
    set_seed(t.seed)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model_dir, dtype=torch.float32,  # crb's: fp32 for full
                                                  attn_implementation="sdpa")  # transformers' default
    model.config.use_cache = False
    with np.load(rows_file) as rows:
        src, tgt = rows["input_ids"], rows["labels"]
    data = Dataset.from_dict({"input_ids": src.tolist(), "attention_mask": np.ones_like(src).tolist(),
                              "labels": tgt.tolist()})
    total = args.warmup + args.steps
    config = Seq2SeqTrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=args.batch, max_steps=total, learning_rate=t.lr,
        lr_scheduler_type=t.scheduler, warmup_steps=math.ceil(total * t.warmup_ratio),  # = crb's count
        optim="adamw_torch", weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
        adam_epsilon=t.eps, max_grad_norm=t.max_grad_norm, bf16=t.precision == "bf16", logging_steps=1,
        report_to="none", save_strategy="no", seed=t.seed, data_seed=t.seed, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not gpu)
    timer = StepTimer(gpu)
    trainer = Seq2SeqTrainer(model=model, args=config, train_dataset=data,
                             data_collator=DataCollatorForSeq2Seq(tok, model=model), processing_class=tok,
                             callbacks=[timer])
    trainer.train()
    for s, loss in zip(timer.steps, timer.losses, strict=False):
        s["loss"] = loss
    Path(args.worker_result).write_text(json.dumps({"steps": timer.steps}))


class StepTimer(TrainerCallback):
    """The time of each optimizer step, between synchronized points, and the peak GPU memory after it."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu
        self.steps: list[dict] = []
        self.losses: list[float] = []
        self.t0 = self.last_end = 0.0

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kw):
        self.sync()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.sync()
        now = time.perf_counter()
        self.steps.append({"step": state.global_step, "step_s": now - self.t0,
                           "interval_s": now - self.last_end if self.steps else None,  # with data + logging
                           "gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.gpu else None})
        self.last_end = now

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def run_hf(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    log = out / "logs" / "hf.log"
    result_file = out / "sides" / ".hf.worker.json"
    result_file.unlink(missing_ok=True)
    rc, wall = run_logged(worker_cmd(args, "hf", result_file), log, "hf")
    steps = json.loads(result_file.read_text())["steps"] if rc == 0 and result_file.is_file() else []
    shutil.rmtree(out / "hf", ignore_errors=True)
    return side_result("hf", args, steps, rc, wall, log)


# ---------------------------------------------------------------- 5. figures


def side_result(side: str, args: argparse.Namespace, steps: list[dict], rc: int, wall: float,
                log: Path | None) -> dict:
    timed = steps[args.warmup:]
    ok = rc == 0 and len(steps) == args.warmup + args.steps
    step_s = sum(s["step_s"] for s in timed) / len(timed) if ok else None
    gaps = [s["interval_s"] for s in timed if s.get("interval_s") is not None]  # Trainer sides: step end to end
    mems = [s["gpu_mem_gib"] for s in steps if s.get("gpu_mem_gib") is not None]
    note, tail = None, []
    if not ok:
        tail = log.read_text(errors="replace").strip().splitlines()[-20:] if log and log.is_file() else []
        note = f"exit {rc}, {len(steps)} of {args.warmup + args.steps} steps: {tail[-1] if tail else ''} (log: {log})"
    return {"side": side, "status": "ok" if ok else "failed", "note": note, "log_tail": tail, "config": config_of(args),
            "samples_per_s": args.batch / step_s if step_s else None, "step_s": step_s,
            "interval_s": sum(gaps) / len(gaps) if ok and gaps else None,
            "peak_gib": max(mems) if ok and mems else None, "wall_s": wall,
            "losses": [s.get("loss") for s in steps], "steps": steps}


def config_of(args: argparse.Namespace) -> dict:
    return {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "src_tokens": args.src_tokens,
            "tgt_tokens": args.tgt_tokens, "max_length": args.max_length, "precision": args.precision,
            "directions": [f"{SOURCE}->{t}" for t in TARGETS],
            "model": ("m2m100-tiny (2+2 layers, d_model 64, vocab 256206)" if args.tiny else
                      "NLLB-200-distilled-600M shape (M2M100, 12+12 layers, d_model 1024, vocab 256206), "
                      "random weights")}


def report(args: argparse.Namespace, results: dict[str, dict], probe: dict) -> dict:
    metrics: dict = {}
    for side in SIDES:
        r = results.get(side) or {}
        metrics[f"{side}_samples_per_s"] = r.get("samples_per_s")
        metrics[f"{side}_peak_gib"] = r.get("peak_gib")
        metrics[f"{side}_step_s"] = r.get("step_s")
    metrics["hf_interval_s"] = (results.get("hf") or {}).get("interval_s")  # step end to step end, with the data
    a, b = metrics["crb_samples_per_s"], metrics["hf_samples_per_s"]
    metrics["crb_vs_hf"] = a / b if a and b else None
    metrics.update(batch=args.batch, src_tokens=args.src_tokens, tgt_tokens=args.tgt_tokens, steps=args.steps)
    return {"device": probe["device"], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config_of(args), "metrics": metrics,
            "losses": {s: results[s]["losses"] for s in SIDES if s in results},
            "per_step": {s: results[s]["steps"] for s in SIDES if s in results},
            "status": {s: results[s]["status"] for s in SIDES if s in results},
            "notes": {s: results[s]["note"] for s in SIDES if s in results and results[s]["note"]},
            "rows_identical": (results.get("crb") or {}).get("rows_identical_to_hf"),
            "versions": probe["versions"], "crb_commit": _git_commit()}


def table(summary: dict) -> str:
    m = summary["metrics"]
    rows = [("tool", "samples/s", "step s", "peak GiB", "vs HF")]
    for side in SIDES:
        sps, ref = m[f"{side}_samples_per_s"], m["hf_samples_per_s"]
        status = summary["status"].get(side, "not run")
        if sps is None:
            rows.append((LABELS[side], status, "-", "-", "-"))
            continue
        peak = m[f"{side}_peak_gib"]
        rows.append((LABELS[side], f"{sps:,.1f}", f"{m[f'{side}_step_s']:.3f}", "-" if peak is None else f"{peak:.1f}",
                     f"{sps / ref:.2f}x" if ref else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    c = summary["config"]
    head = (f"{summary['device']}: {c['model']}; batch {c['batch']}, source {c['src_tokens']} + target "
            f"{c['tgt_tokens']} tokens per row, {c['precision']}; mean of {c['steps']} steps after {c['warmup']} "
            f"warm-up; same token ids: {summary['rows_identical']}")
    notes = [f"{LABELS[s]}: {n[:300]}" for s, n in summary["notes"].items()]
    return "\n".join([head, *lines, *notes])


# ---------------------------------------------------------------- plumbing


def run_logged(cmd: list[str], log: Path, tag: str) -> tuple[int, float]:
    """Run `cmd` from the repo root, echoing its output with a tag and keeping it in `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # crb, installed or not
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    print(f"[{tag}] $ {' '.join(cmd)}", flush=True)
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True, errors="replace") as p:
        for line in p.stdout:
            f.write(line)
            print(f"[{tag}] {line}", end="", flush=True)
        rc = p.wait()
    return rc, time.perf_counter() - t0


def worker_cmd(args: argparse.Namespace, worker: str, result_file: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--worker-result", str(result_file),
           "--out", str(args.out), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--src-tokens", str(args.src_tokens), "--tgt-tokens", str(args.tgt_tokens),
           "--max-length", str(args.max_length), "--model-dir", str(args.model_dir), "--seed", str(args.seed)]
    return cmd + (["--tiny"] if args.tiny else [])


def probe_worker(args: argparse.Namespace) -> None:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    Path(args.worker_result).write_text(json.dumps({"device": device, "versions": versions}))


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="crb vs transformers' Seq2SeqTrainer on the translation recipe "
                                            "(NLLB-200-distilled-600M shape)")
    p.add_argument("--out", required=True, help="folder for translation.json, per-side figures, data, logs")
    p.add_argument("--batch", type=int, default=None, help="rows per optimizer step (default 16; 4 with --tiny)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--src-tokens", type=int, default=None, help="tokens per source, with its language token and "
                   "</s> (default 256; 32 with --tiny)")
    p.add_argument("--tgt-tokens", type=int, default=None, help="tokens per target, likewise (default 256; 32)")
    p.add_argument("--max-length", type=int, default=512, help="the recipe's data.max_length")
    p.add_argument("--tiny", action="store_true", help="a 2+2-layer, d_model-64 model, short rows: checks on CPU")
    p.add_argument("--only", default=",".join(SIDES), help=f"comma-separated sides to run, of {', '.join(SIDES)}")
    p.add_argument("--model-dir", default=None, help="where the random model is built once "
                   "(default /tmp/crb-bench/nllb-600m-shape, or m2m100-tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's weights and the data")
    p.add_argument("--json", default=None, help="also write translation.json here")
    p.add_argument("--crb-set", action="append", default=[], help="extra crb override (experiments)")
    p.add_argument("--worker", choices=["build", "probe", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.tiny else 16)
    args.src_tokens = args.src_tokens or (32 if args.tiny else 256)
    args.tgt_tokens = args.tgt_tokens or (32 if args.tiny else 256)
    args.model_dir = Path(args.model_dir or
                          f"/tmp/crb-bench/{'m2m100-tiny' if args.tiny else 'nllb-600m-shape'}").resolve()
    args.out = Path(args.out).resolve()
    args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SIDES]
    if bad:
        p.error(f"--only: unknown side(s) {', '.join(bad)} (of {', '.join(SIDES)})")
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        p.error("--batch and --steps must be >= 1, --warmup >= 0")
    if not 3 <= min(args.src_tokens, args.tgt_tokens) <= max(args.src_tokens, args.tgt_tokens) <= args.max_length:
        p.error("--src-tokens / --tgt-tokens: between 3 and --max-length")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "build":
        build_model_dir(args.model_dir, args.tiny, args.seed)
        return 0
    if args.worker == "probe":
        probe_worker(args)
        return 0
    if args.worker == "hf":
        hf_worker(args)
        return 0

    out = args.out
    (out / "sides").mkdir(parents=True, exist_ok=True)
    probe_file = out / "sides" / ".probe.json"
    rc, _ = run_logged(worker_cmd(args, "probe", probe_file), out / "logs" / "probe.log", "probe")
    if rc:
        return rc
    probe = json.loads(probe_file.read_text())
    if not args.model_dir.is_dir():
        rc, _ = run_logged(worker_cmd(args, "build", out / "sides" / ".build.json"), out / "logs" / "build.log",
                           "build")
        if rc:
            print(f"translation: building the model failed (log: {out / 'logs' / 'build.log'})", file=sys.stderr)
            return rc
    else:
        print(f"[build] {args.model_dir} exists: reused")
    text_file, rows_file = data_files(args)
    make_data(args, text_file, rows_file)
    print(f"[data] {n_rows(args)} rows of {args.src_tokens} + {args.tgt_tokens} tokens: {text_file} (crb), "
          f"{rows_file} (Seq2SeqTrainer)", flush=True)

    for side in SIDES:
        if side not in args.only:
            continue
        result = run_crb(args, text_file, rows_file) if side == "crb" else run_hf(args)
        result["device"] = probe["device"]
        (out / "sides" / f"{side}.json").write_text(json.dumps(result, indent=1))

    results = {}
    for side in SIDES:  # sides run now, and those of earlier runs into this folder with the same configuration
        f = out / "sides" / f"{side}.json"
        r = json.loads(f.read_text()) if f.is_file() else None
        if r and r["config"] == config_of(args) and r.get("device") == probe["device"]:
            results[side] = r
            if side not in args.only:
                print(f"[{side}] figures kept from an earlier run: {f}")
    summary = report(args, results, probe)
    text = json.dumps(summary, indent=1)
    (out / "translation.json").write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print("\n" + table(summary) + f"\n\nwritten: {out / 'translation.json'}" + (f", {args.json}" if args.json else ""))
    return 1 if any(results[s]["status"] == "failed" for s in args.only if s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
