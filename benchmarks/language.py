"""crb's language recipe against TRL's SFTTrainer: same model, same rows, same settings, one table.

    python benchmarks/language.py --out /tmp/crb-bench/out                 # crb, TRL, TRL + Liger
    python benchmarks/language.py --out /tmp/crb-bench/out --only crb      # one side (or several: crb,trl)
    python benchmarks/language.py --out /tmp/crb-bench/check --tiny        # 2-layer model, ctx 256: runs on CPU

What it does, in order, each heavy part in its own process so that each side starts on a clean GPU:
1. builds once a Mistral-7B-shaped model (vocab 32768, hidden 4096, 32 layers, GQA 32/8 heads) with random
   bf16 weights, and a small byte-level BPE tokenizer, into --model-dir (no hub needed; kept for later runs);
2. writes (micro_batch x accum x (warmup + steps)) documents of random tokens, each longer than --ctx, as
   `text` JSONL, and the same rows tokenized and cut to exactly ctx tokens for TRL: both tools train on the
   same token ids (checked against crb's data cache after its run), every row full, no padding;
3. crb: `python -m crb.run recipes/language.toml --set ...` (QLoRA nf4, LoRA r64 on all 7 projections,
   paged 8-bit AdamW, gradient checkpointing, bf16), per-step time and peak memory from its metrics.jsonl;
4. TRL: SFTTrainer with the same settings read from the same recipe (`--only trl`), then with
   `use_liger_kernel=True` (`--only trl_liger`, skipped when liger_kernel is not installed); each optimizer
   step timed by a callback between torch.cuda.synchronize() calls;
5. tokens/s = micro_batch x accum x ctx / mean step time over the steps after the warm-up ones; peak GiB =
   torch.cuda.max_memory_allocated(). Prints a table; writes OUT/language.json.

Each side's figures are also kept in OUT/sides/<side>.json: a run with --only adds its sides to those
already in OUT for the same configuration (so the sides can be run one at a time), and language.json
holds them all. Everything else (data, crb's run folder, logs) stays under OUT too; `--json PATH` writes a
copy of language.json elsewhere (e.g. benchmarks/results/language.json).
"""

from __future__ import annotations

import argparse
import importlib.util
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
RECIPE = ROOT / "recipes" / "language.toml"
SIDES = ("crb", "trl", "trl_liger")
LABELS = {"crb": "crb", "trl": "TRL SFTTrainer", "trl_liger": "TRL + Liger"}
TOKENIZER_VOCAB = 8192  # the tokenizer's; the model's vocabulary stays 32768, so the logits are full size
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: Mistral's unk, bos, eos


def mistral_config(tiny: bool, layers: int | None = None):
    """Mistral-7B's shape (tiny: a 2-layer one); `layers` keeps that many of its decoder layers."""
    from transformers import MistralConfig

    shape = (dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if tiny else
             dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8))
    shape["num_hidden_layers"] = layers or shape["num_hidden_layers"]
    return MistralConfig(vocab_size=32768, max_position_embeddings=32768, rope_theta=1e6, sliding_window=None,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **shape)


# ---------------------------------------------------------------- 1. model and tokenizer


def build_model_dir(path: Path, tiny: bool, seed: int, layers: int | None = None) -> None:
    """Random weights in bf16, made on the GPU where there is one; written to a temp folder, then renamed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(mistral_config(tiny, layers), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    print(f"build: {n / 1e9:.2f}B parameters on {device}, writing {tmp}", flush=True)
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    del model
    os.replace(tmp, path)
    print(f"build: {path} in {time.perf_counter() - t0:.0f} s", flush=True)


def _corpus(seed: int, lines: int = 20000):
    """Pseudo-words from syllables: enough text for the BPE trainer to learn a few thousand merges."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    for _ in range(lines):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(4, 20))) + rng.choice(".,;!?") + "\n"


# ---------------------------------------------------------------- 2. data


def make_data(model_dir: Path, text_file: Path, rows_file: Path, ctx: int, n_rows: int, seed: int) -> None:
    """`text` JSONL of documents of random tokens (each > ctx tokens) and the (n_rows, ctx) token ids that crb
    makes of it (its tokenizer call, cut at ctx), for TRL."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)  # as crb loads it
    special = set(tok.all_special_ids)
    plain = [i for i in range(len(tok)) if i not in special and _plain(tok.decode([i]))]
    rng = np.random.default_rng(seed)
    texts, rows = [], np.zeros((n_rows, ctx), np.int64)
    for r in range(n_rows):
        ids = rng.choice(plain, size=int(ctx * 1.3) + 64).tolist()
        while True:
            text = tok.decode(ids)
            enc = tok(text)["input_ids"]
            if len(enc) > ctx:
                break
            ids += rng.choice(plain, size=ctx // 2 + 64).tolist()
        texts.append(text)
        rows[r] = enc[:ctx]
    text_file.parent.mkdir(parents=True, exist_ok=True)
    text_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    np.save(rows_file, rows)


def make_packed_data(model_dir: Path, text_file: Path, docs_file: Path, n_tokens: int, seed: int,
                     median: int = 600, sigma: float = 0.6) -> None:
    """Short documents (log-normal lengths, median `median` tokens, like short retail chats) of random tokens
    as `text` JSONL for crb, and the same documents as crb tokenizes them (EOS included) for TRL, until
    `n_tokens` tokens: docs_file holds their ids concatenated ("ids") and their lengths ("lengths")."""
    from transformers import AutoTokenizer

    from crb.data.text import tokenize_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    plain = [i for i in range(len(tok)) if i not in special and _plain(tok.decode([i]))]
    rng = np.random.default_rng(seed)
    texts, docs, total = [], [], 0
    while total < n_tokens:
        n = int(np.clip(rng.lognormal(np.log(median), sigma), 16, 8000))
        text = tok.decode(rng.choice(plain, size=n).tolist())
        ids, _ = tokenize_text(text, tok)
        texts.append(text)
        docs.append(ids)
        total += len(ids)
    text_file.parent.mkdir(parents=True, exist_ok=True)
    text_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    np.savez(docs_file, ids=np.concatenate([np.asarray(d, np.int64) for d in docs]),
             lengths=np.asarray([len(d) for d in docs], np.int64))


def _plain(s: str) -> bool:
    return bool(s.strip()) and s.isascii() and s.isprintable()


def check_crb_rows(cache_dir: Path, rows_file: Path) -> bool | None:
    """Whether crb's prepared rows (its data cache) are exactly the rows TRL gets."""
    caches = sorted(cache_dir.glob("*.npz"), key=lambda p: p.stat().st_mtime)
    if not caches:
        return None
    rows = np.load(rows_file)
    with np.load(caches[-1]) as z:
        lengths, ids = z["train.input_ids.len"], z["train.input_ids"]
    return bool(len(lengths) == len(rows) and (lengths == rows.shape[1]).all()
                and np.array_equal(ids.reshape(rows.shape), rows))


# ---------------------------------------------------------------- 3. crb


def crb_overrides(args: argparse.Namespace, text_file: Path) -> list[str]:
    q = json.dumps  # a JSON string is a TOML basic string
    out = Path(args.out)
    return [f"model.name={q(str(args.model_dir))}", f"data.train=[{q(str(text_file))}]", 'data.format="text"',
            "data.packing=true", f"data.max_length={args.ctx}", "data.eval_split=0",
            f"data.cache_dir={q(str(out / 'data' / 'crb-cache'))}", f"train.micro_batch={args.micro_batch}",
            f"train.batch_size={args.micro_batch * args.accum}", f"train.max_steps={args.warmup + args.steps}",
            "train.keep_checkpoints=0", "train.report_to=[]", f"output.dir={q(str(out / 'crb'))}"]


def run_crb(args: argparse.Namespace, text_file: Path, rows_file: Path) -> dict:
    out = Path(args.out)
    for stale in (out / "crb", out / "data" / "crb-cache"):  # so that what is read below is this run's
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [sys.executable, "-m", "crb.run", str(args.recipe)]
    for item in crb_overrides(args, text_file):
        cmd += ["--set", item]
    rc, wall = run_logged(cmd, out / "logs" / "crb.log", "crb")
    metrics = out / "crb" / "metrics.jsonl"
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [{"step": s["step"], "step_s": s["step_s"], "loss": s["loss"], "gpu_mem_gib": s.get("gpu_mem_gib"),
              "tokens": s["tokens"]} for s in lines if "step_s" in s]
    result = side_result("crb", args, steps, rc, wall, out / "logs" / "crb.log")
    result["rows_identical_to_trl"] = check_crb_rows(out / "data" / "crb-cache", rows_file)
    first = steps[0]["tokens"] if steps else None
    result["crb_tokens_per_step"] = first
    if result["status"] == "ok" and (first != tokens_per_step(args) or result["rows_identical_to_trl"] is False):
        result["status"] = "failed"
        result["note"] = (f"crb's rows differ from TRL's (tokens/step {first}, expected {tokens_per_step(args)}, "
                          f"identical rows: {result['rows_identical_to_trl']})")
    shutil.rmtree(out / "crb" / "final_adapter", ignore_errors=True)  # hundreds of MB, not needed here
    return result


# ---------------------------------------------------------------- 4. TRL (a worker process)


def trl_worker(args: argparse.Namespace, liger: bool) -> None:
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.trainer_utils import set_seed
    from trl import SFTConfig, SFTTrainer

    from crb.recipe import schema as recipes

    out = Path(args.out)
    side = "trl_liger" if liger else "trl"
    text_file, rows_file = data_files(args)
    packed = getattr(args, "packed", False)
    if packed:  # short documents that TRL packs itself (best-fit decreasing, padding-free)
        with np.load(rows_file) as z:
            rows = np.split(z["ids"], np.cumsum(z["lengths"])[:-1])
    else:
        rows = np.load(rows_file)
    # The settings come from the recipe that crb runs (with the benchmark's overrides).
    r = recipes.load(args.recipe, crb_overrides(args, text_file))
    m, q, t = r.method, r.method.quant, r.train
    assert m.name == "qlora" and q.bits == 4, "the recipe is QLoRA 4-bit"
    gc = t.gradient_checkpointing if isinstance(t.gradient_checkpointing, bool) else True  # TRL's documented setting
    gpu = torch.cuda.is_available()
    if gpu and os.environ.get("CRB_GPU_MEMORY_GB"):  # the same cap crb's side runs under
        cap = float(os.environ["CRB_GPU_MEMORY_GB"]) * 2**30 / torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap), 0)
    half = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else (torch.float16 if gpu else torch.float32)
    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(q.compute_dtype,
                                                                                                  half)
    set_seed(t.seed)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                             bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute)
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=bnb, dtype=half,
                                                 device_map={"": device},
                                                 attn_implementation=getattr(args, "attn", None) or "sdpa")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                      target_modules=m.lora.target_modules, bias=m.lora.bias, task_type="CAUSAL_LM")
    total_steps = args.warmup + args.steps
    optim = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
    config = SFTConfig(
        output_dir=str(out / side), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.accum, max_steps=total_steps, learning_rate=t.lr,
        lr_scheduler_type=t.scheduler, warmup_steps=math.ceil(total_steps * t.warmup_ratio),  # = crb's count
        optim=optim[t.optimizer], weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
        adam_epsilon=t.eps, max_grad_norm=t.max_grad_norm, gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=half == torch.bfloat16,
        fp16=half == torch.float16, max_length=args.ctx, packing=packed, logging_steps=1, report_to="none",
        include_num_input_tokens_seen=packed,
        save_strategy="no", seed=t.seed, data_seed=t.seed, use_liger_kernel=liger, disable_tqdm=True,
        dataloader_num_workers=0)
    timer = StepTimer(gpu)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": [
        x.tolist() for x in rows]}), processing_class=tok, peft_config=lora, callbacks=[timer])
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    if not packed and (len(lengths) != len(rows) or set(lengths) != {args.ctx}):
        raise SystemExit(f"{side}: TRL's prepared rows are not {len(rows)} x {args.ctx} tokens")
    trainer.train()
    steps = timer.steps
    for s, loss in zip(steps, timer.losses, strict=False):
        s["loss"] = loss
    Path(args.worker_result).write_text(json.dumps({"steps": steps}))


class StepTimer(TrainerCallback):
    """The time of each optimizer step, between synchronized points, and the peak GPU memory after it."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu
        self.steps: list[dict] = []
        self.losses: list[float] = []
        self.t0 = self.last_end = 0.0
        self.seen = 0

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kw):
        self.sync()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.sync()
        now = time.perf_counter()
        seen = state.num_input_tokens_seen  # counted only when asked for (packed rows)
        self.steps.append({"step": state.global_step, "step_s": now - self.t0,
                           "step_tokens": seen - self.seen if seen else None,
                           "interval_s": now - self.last_end if self.steps else None,  # with data + logging
                           "gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.gpu else None})
        self.last_end, self.seen = now, seen

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def run_trl(args: argparse.Namespace, side: str) -> dict:
    out = Path(args.out)
    log = out / "logs" / f"{side}.log"
    if side == "trl_liger" and importlib.util.find_spec("liger_kernel") is None:
        result = side_result(side, args, [], 0, 0.0, None)
        result.update(status="skipped", note="liger_kernel is not importable (pip install liger-kernel)")
        return result
    result_file = out / "sides" / f".{side}.worker.json"
    result_file.unlink(missing_ok=True)
    rc, wall = run_logged(worker_cmd(args, side, result_file), log, side)
    steps = json.loads(result_file.read_text())["steps"] if rc == 0 and result_file.is_file() else []
    return side_result(side, args, steps, rc, wall, log)


# ---------------------------------------------------------------- 5. figures


def tokens_per_step(args: argparse.Namespace) -> int:
    return args.micro_batch * args.accum * args.ctx


def side_result(side: str, args: argparse.Namespace, steps: list[dict], rc: int, wall: float,
                log: Path | None) -> dict:
    timed = steps[args.warmup:]
    ok = rc == 0 and len(steps) == args.warmup + args.steps
    step_s = sum(s["step_s"] for s in timed) / len(timed) if ok else None
    counted = ok and all(s.get("step_tokens") for s in timed)  # packed rows: tokens differ from step to step
    rate = (sum(s["step_tokens"] for s in timed) / sum(s["step_s"] for s in timed) if counted else
            tokens_per_step(args) / step_s if step_s else None)
    mems = [s["gpu_mem_gib"] for s in steps if s.get("gpu_mem_gib") is not None]
    note, tail = None, []
    if not ok:
        tail = log.read_text(errors="replace").strip().splitlines()[-20:] if log and log.is_file() else []
        note = f"exit {rc}, {len(steps)} of {args.warmup + args.steps} steps: {tail[-1] if tail else ''} (log: {log})"
    return {"side": side, "status": "ok" if ok else "failed", "note": note, "log_tail": tail, "config": config_of(args),
            "tokens_per_s": rate, "step_s": step_s,
            "peak_gib": max(mems) if ok and mems else None, "wall_s": wall,
            "losses": [s.get("loss") for s in steps], "steps": steps}


def config_of(args: argparse.Namespace) -> dict:
    return {"ctx": args.ctx, "micro_batch": args.micro_batch, "accum": args.accum, "steps": args.steps,
            "warmup": args.warmup, "tokens_per_step": tokens_per_step(args),
            "model": "mistral-tiny (2 layers, hidden 128)" if args.tiny else "mistral-7b shape, random weights"}


def report(args: argparse.Namespace, results: dict[str, dict], probe: dict) -> dict:
    metrics: dict = {}
    for side in SIDES:
        r = results.get(side) or {}
        metrics[f"{side}_tokens_per_s"] = r.get("tokens_per_s")
        metrics[f"{side}_peak_gib"] = r.get("peak_gib")
        metrics[f"{side}_step_s"] = r.get("step_s")
    for base in ("trl", "trl_liger"):
        a, b = metrics["crb_tokens_per_s"], metrics[f"{base}_tokens_per_s"]
        metrics[f"crb_vs_{base}"] = a / b if a and b else None
    metrics.update(ctx=args.ctx, micro_batch=args.micro_batch, accum=args.accum, steps=args.steps,
                   tokens_per_step=tokens_per_step(args))
    return {"device": probe["device"], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config_of(args), "metrics": metrics,
            "losses": {s: results[s]["losses"] for s in SIDES if s in results},
            "per_step": {s: results[s]["steps"] for s in SIDES if s in results},
            "status": {s: results[s]["status"] for s in SIDES if s in results},
            "notes": {s: results[s]["note"] for s in SIDES if s in results and results[s]["note"]},
            "rows_identical": (results.get("crb") or {}).get("rows_identical_to_trl"),
            "versions": probe["versions"], "crb_commit": _git_commit()}


def table(summary: dict) -> str:
    m = summary["metrics"]
    rows = [("tool", "tokens/s", "step s", "peak GiB", "vs TRL")]
    for side in SIDES:
        tps, ref = m[f"{side}_tokens_per_s"], m["trl_tokens_per_s"]
        status = summary["status"].get(side, "not run")
        if tps is None:
            rows.append((LABELS[side], status, "-", "-", "-"))
            continue
        peak = m[f"{side}_peak_gib"]
        rows.append((LABELS[side], f"{tps:,.0f}", f"{m[f'{side}_step_s']:.2f}", "-" if peak is None else f"{peak:.1f}",
                     f"{tps / ref:.2f}x" if ref else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    c = summary["config"]
    head = (f"{summary['device']}: {c['model']}, ctx {c['ctx']}, micro-batch {c['micro_batch']} x accum {c['accum']}"
            f" ({c['tokens_per_step']:,} tokens/step), mean of {c['steps']} steps after {c['warmup']} warm-up")
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
           "--out", str(args.out), "--ctx", str(args.ctx), "--micro-batch", str(args.micro_batch),
           "--accum", str(args.accum), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--model-dir", str(args.model_dir), "--seed", str(args.seed), "--recipe", str(args.recipe)]
    cmd += ["--packed"] if getattr(args, "packed", False) else []
    cmd += ["--attn", args.attn] if getattr(args, "attn", None) else []
    return cmd + (["--tiny"] if args.tiny else [])


def data_files(args: argparse.Namespace) -> tuple[Path, Path]:
    n, data = args.micro_batch * args.accum * (args.warmup + args.steps), Path(args.out) / "data"
    if getattr(args, "packed", False):  # short documents for n rows, with room for crb's greedy packing
        return data / f"packed-ctx{args.ctx}-rows{n}.jsonl", data / f"packed-ctx{args.ctx}-rows{n}.npz"
    return data / f"text-ctx{args.ctx}-rows{n}.jsonl", data / f"rows-ctx{args.ctx}-rows{n}.npy"


def probe_worker(args: argparse.Namespace) -> None:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "bitsandbytes", "datasets", "liger-kernel"):
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
    p = argparse.ArgumentParser(description="crb vs TRL SFTTrainer on the language recipe (QLoRA, Mistral-7B shape)")
    p.add_argument("--out", required=True, help="folder for language.json, per-side figures, data, logs")
    p.add_argument("--ctx", type=int, default=None, help="tokens per row (default 8192; 256 with --tiny)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-128 model at ctx 256: checks on CPU")
    p.add_argument("--only", default=",".join(SIDES), help=f"comma-separated sides to run, of {', '.join(SIDES)}")
    p.add_argument("--model-dir", default=None, help="where the random model is built once "
                   "(default /tmp/crb-bench/mistral-7b, or mistral-tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's weights and the data")
    p.add_argument("--json", default=None, help="also write language.json here")
    p.add_argument("--recipe", default=str(RECIPE), help="the QLoRA recipe both sides read their settings from")
    p.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)  # frontier.py's short documents
    p.add_argument("--attn", default=None, help=argparse.SUPPRESS)  # TRL's attention (default sdpa)
    p.add_argument("--worker", choices=["build", "probe", "trl", "trl_liger"], help=argparse.SUPPRESS)
    p.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ctx = args.ctx or (256 if args.tiny else 8192)
    args.model_dir = Path(args.model_dir or f"/tmp/crb-bench/{'mistral-tiny' if args.tiny else 'mistral-7b'}").resolve()
    args.out = Path(args.out).resolve()
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SIDES]
    if bad:
        p.error(f"--only: unknown side(s) {', '.join(bad)} (of {', '.join(SIDES)})")
    if min(args.ctx, args.micro_batch, args.accum, args.steps) < 1 or args.warmup < 0:
        p.error("--ctx, --micro-batch, --accum and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "build":
        build_model_dir(args.model_dir, args.tiny, args.seed)
        return 0
    if args.worker == "probe":
        probe_worker(args)
        return 0
    if args.worker in ("trl", "trl_liger"):
        trl_worker(args, liger=args.worker == "trl_liger")
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
            print(f"language: building the model failed (log: {out / 'logs' / 'build.log'})", file=sys.stderr)
            return rc
    else:
        print(f"[build] {args.model_dir} exists: reused")
    n_rows = args.micro_batch * args.accum * (args.warmup + args.steps)
    text_file, rows_file = data_files(args)
    make_data(args.model_dir, text_file, rows_file, args.ctx, n_rows, args.seed)
    print(f"[data] {n_rows} rows x {args.ctx} tokens: {text_file} (crb), {rows_file} (TRL)", flush=True)

    for side in SIDES:
        if side not in args.only:
            continue
        result = run_crb(args, text_file, rows_file) if side == "crb" else run_trl(args, side)
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
    (out / "language.json").write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print("\n" + table(summary) + f"\n\nwritten: {out / 'language.json'}" + (f", {args.json}" if args.json else ""))
    return 1 if any(results[s]["status"] == "failed" for s in args.only if s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
