"""Data preparation at scale, crb against TRL, on the CPU (issue 19).

N synthetic retail chats (about 1,000 tokens each with the shipped tiny tokenizer) are written once as JSONL;
then, each side in its own process, timed and with the peak memory (PSS) of its whole process tree sampled:
- crb: the demo language recipe's data path (crb.tasks.prepare: datasets.map over the records, an Arrow cache
  memory-mapped for training), max_length 2048, data.num_proc 2; then again from its cache ("cached start").
- TRL: SFTTrainer's dataset preparation (its __init__ tokenizes: dataset_num_proc 2, max_length 2048, the same
  ChatML template, assistant_only_loss) on the same file, with a tiny model.

    python benchmarks/data_prep.py --records 100000,1000000 --json benchmarks/results/data_prep.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo" / "language.toml"
MODEL = ROOT / "crb" / "demo_data" / "tiny-mistral"
ITEMS = ["navy suit", "white shirt", "running shoes", "red dress", "leather belt", "wool coat", "silk scarf"]

CRB = """
import sys
from crb.engine.build import build_tokenizer
from crb.recipe.schema import load
from crb.tasks import prepare
r = load(sys.argv[1], sys.argv[2:])
train, _, report = prepare(r.data, build_tokenizer(r), r.train.seed)
print(len(train), "rows")
"""

TRL = """
import sys, torch
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from crb.data.chatml import CHATML_TEMPLATE
path, model_dir, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(model_dir)
tok.chat_template, tok.pad_token = CHATML_TEMPLATE, tok.pad_token or tok.eos_token
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
data = load_dataset("json", data_files=path, split="train")
args = SFTConfig(output_dir=out, max_length=2048, dataset_num_proc=2, assistant_only_loss=True, report_to=[],
                 use_cpu=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
print(len(trainer.train_dataset), "rows")
"""


def write_records(path: Path, n: int, seed: int = 0) -> None:
    """n chats of a few turns, about 1,000 tokens each with the tiny tokenizer (deterministic)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": "You are a helpful retail assistant."}]
            for _ in range(rng.randint(4, 8)):
                item = rng.choice(ITEMS)
                words = " ".join(rng.choice(ITEMS) for _ in range(rng.randint(10, 40)))
                msgs += [{"role": "user", "content": f"Do you have the {item} in size {rng.randint(30, 50)}? {words}"},
                         {"role": "assistant", "content": f"Yes, the {item} costs {rng.randint(20, 300)} dollars. "
                                                          f"{words}"}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def anon_pss(pid: int) -> int:
    """Bytes of the process's PSS that are not file pages: what it holds itself (Pss_Anon + Pss_Shmem); the pages
    of memory-mapped files (Arrow tables read) are page cache the kernel can drop."""
    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields.get(k, "0 kB").split()[0]) * 1024 for k in ("Pss_Anon", "Pss_Shmem"))


def measure(cmd: list[str], hf_cache: Path) -> dict:
    """Wall time and two peaks of the process and its children, sampled every 100 ms: summed PSS (shared pages
    split between the processes that map them, so shared libraries and a file mapped by several count once;
    memory-mapped files' pages count as they are read), and summed PSS without file pages (anonymous memory)."""
    shutil.rmtree(hf_cache, ignore_errors=True)  # an empty datasets cache: nothing prepared before is reused
    env = {**os.environ, "HF_DATASETS_CACHE": str(hf_cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, anon, done = 0, 0, threading.Event()

    def sample() -> None:
        nonlocal peak, anon
        top = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [top, *top.children(recursive=True)]
                peak = max(peak, sum(p.memory_full_info().pss for p in tree))
                anon = max(anon, sum(anon_pss(p.pid) for p in tree))
            except (psutil.Error, OSError):
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed:\n{out[-3000:]}")
    return {"s": round(wall, 1), "peak_gb": round(peak / 1e9, 2), "anon_peak_gb": round(anon / 1e9, 2),
            "log": out.strip().splitlines()[-1:]}


def run(n: int, work: Path) -> dict:
    data = work / f"chats-{n}.jsonl"
    if not data.exists():
        write_records(data, n)
    cache = work / f"cache-{n}"
    sets = [f"data.train=['{data}']", "data.max_length=2048", "data.eval_split=0", "data.num_proc=2",
            f"data.cache_dir='{cache}'", f"output.dir='{work / 'out'}'"]
    shutil.rmtree(cache, ignore_errors=True)
    hf = work / "hf-datasets-cache"
    crb = measure([sys.executable, "-c", CRB, str(RECIPE), *sets], hf)
    cached = measure([sys.executable, "-c", CRB, str(RECIPE), *sets], hf)  # crb's own cache only
    trl = measure([sys.executable, "-c", TRL, str(data), str(MODEL), str(work / "trl")], hf)
    return {"records": n, "jsonl_mb": round(data.stat().st_size / 1e6), "crb_s": crb["s"],
            "crb_peak_gb": crb["peak_gb"], "crb_cached_start_s": cached["s"], "crb_cached_peak_gb": cached["peak_gb"],
            "trl_s": trl["s"], "trl_peak_gb": trl["peak_gb"], "crb_anon_peak_gb": crb["anon_peak_gb"],
            "trl_anon_peak_gb": trl["anon_peak_gb"], "crb_rows": crb["log"], "trl_rows": trl["log"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", default="100000")
    p.add_argument("--work", default="/tmp/crb-bench/data_prep")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| records | JSONL MB | crb s | crb peak GB (anonymous) | crb cached start s | TRL s "
          "| TRL peak GB (anonymous) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in map(int, args.records.split(",")):
        r = run(n, work)
        rows.append(r)
        print(f"| {n:,} | {r['jsonl_mb']} | {r['crb_s']} | {r['crb_peak_gb']} ({r['crb_anon_peak_gb']}) | "
              f"{r['crb_cached_start_s']} | {r['trl_s']} | {r['trl_peak_gb']} ({r['trl_anon_peak_gb']}) |", flush=True)
    if args.json:
        import platform

        import datasets
        import transformers
        import trl

        result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": f"{psutil.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                             f"{platform.platform()}",
                  "versions": {"datasets": datasets.__version__, "transformers": transformers.__version__,
                               "trl": trl.__version__},
                  "metrics": rows[-1], "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
