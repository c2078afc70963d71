"""How close `crb plan` comes to the real peak: for each of the guide's five recipes at its real model
shape (random weights, built on the GPU), at two or three settings, and for the 8 GB cap, the plan's
predicted peak against torch.cuda.max_memory_allocated (and reserved) over 3 real steps.

    python benchmarks/plan_accuracy.py --out /tmp/crb-bench/plan --json benchmarks/results/plan_accuracy.json
    python benchmarks/plan_accuracy.py --out /tmp/crb-bench/plan --only language,code     # some recipes
    python benchmarks/plan_accuracy.py --out /tmp/crb-bench/plan-check --tiny               # CPU: paths only

Each row runs `crb plan RECIPE --set ... --json` and `python -m crb.run RECIPE --set ...` with the same
overrides (and CRB_GPU_MEMORY_GB for the 8 GB rows), each in its own process. Every row's data fills
the planned lengths (rows of exactly data.max_length tokens), since the plan is a worst case. A run with
--only merges its rows into the --json file (else OUT/plan_accuracy.json), each row as it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import clara as clara_bench  # benchmarks/ is on sys.path
import language
import retrieval
import translation

ROOT = Path(__file__).resolve().parents[1]
q = json.dumps  # a JSON string is a TOML basic string


def starcoder2_dir(path: Path, mistral: Path, tiny: bool) -> None:
    """A StarCoder2-3B-shaped model (random bf16 weights, on the GPU) with the Mistral dir's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Starcoder2Config

    shape = (dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if tiny else
             dict(hidden_size=3072, intermediate_size=12288, num_hidden_layers=30, num_attention_heads=24,
                  num_key_value_heads=2))
    config = Starcoder2Config(vocab_size=49152, max_position_embeddings=16384, bos_token_id=1, eos_token_id=2,
                              **shape)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(mistral).save_pretrained(tmp)
    os.replace(tmp, path)


OFFLOAD_7B = "mistral-12-layers"  # the 7B shape with 12 of its 32 layers: its ZeRO-3 offload states fit 126 GiB


def build(kind: str, path: Path, args: argparse.Namespace) -> None:
    if (path / "config.json").is_file():
        return
    tokenizer = next((d for d in (args.models / "mistral", args.models / OFFLOAD_7B) if (d / "config.json").is_file()),
                     args.models / "mistral")  # the StarCoder2 shape takes a Mistral dir's tokenizer
    code = {"mistral": f"language.build_model_dir(Path({str(path)!r}), {args.tiny}, 0)",
            OFFLOAD_7B: f"language.build_model_dir(Path({str(path)!r}), {args.tiny}, 0, {1 if args.tiny else 12})",
            "starcoder2": f"starcoder2_dir(Path({str(path)!r}), Path({str(tokenizer)!r}), {args.tiny})",
            "nllb": f"translation.build_model_dir(Path({str(path)!r}), {args.tiny}, 0)",
            "t5": f"retrieval.build_model_dir(Path({str(path)!r}), {args.tiny}, 0)"}[kind]
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
           f"from pathlib import Path; from plan_accuracy import *; {code}"]
    rc, _ = language.run_logged(cmd, args.out / "logs" / f"build-{kind}.log", f"build {kind}")
    if rc:
        raise SystemExit(f"building the {kind} model failed (log {args.out / 'logs'})")


# ---------------------------------------------------------------- rows: (recipe, label, overrides, env, stage)


def rows(args: argparse.Namespace) -> list[dict]:
    t, d, m = args.tiny, args.out / "data", args.models
    out = []

    def row(recipe: str, label: str, sets: list[str], env: dict | None = None, stage: str | None = None,
            gpus: int = 1, model_layers: int | None = None) -> None:
        out.append({"recipe": recipe, "setting": label, "sets": sets, "env": env or {}, "stage": stage, "gpus": gpus}
                   | ({"model_layers": model_layers} if model_layers else {}))

    if "language" in args.only or "8gb" in args.only or "clara" in args.only:
        build("mistral", m / "mistral", args)
    for ctx, micro in ([(64, 1), (128, 2)] if t else [(2048, 1), (8192, 1), (8192, 4)]):
        if "language" in args.only:
            row("language", f"ctx {ctx}, micro-batch {micro}", text_sets(args, m / "mistral", ctx, micro, "language"))
    if "code" in args.only or ("8gb" in args.only and re.search(args.match, "code / 8 GB cap")):
        build("starcoder2", m / "starcoder2", args)
    for ctx, micro in ([(64, 1), (128, 2)] if t else [(4096, 1), (8192, 2)]):
        if "code" in args.only:
            row("code", f"ctx {ctx}, micro-batch {micro}", text_sets(args, m / "starcoder2", ctx, micro, "code"))
    if "translation" in args.only:
        build("nllb", m / "nllb", args)
        for batch in ([2, 4] if t else [8, 16]):
            n = 32 if t else 256
            row("translation", f"batch {batch}, {n} + {n} tokens", translation_sets(args, m / "nllb", batch))
    if "retrieval" in args.only:
        build("t5", m / "t5", args)
        n = 32 if t else 256
        for batch in ([4, 8] if t else [16, 64]):
            row("retrieval", f"batch {batch}, 3 x {n} tokens, cached_mnrl mini-batch 16",
                retrieval_sets(args, m / "t5", batch))
        for batch in ([2, 4] if t else [4, 16]):  # plain MNRL: every row's activations at once (16: the plan says no)
            row("retrieval", f"batch {batch}, 3 x {n} tokens, plain mnrl",
                [*retrieval_sets(args, m / "t5", batch), 'losses=[{name="mnrl", options={scale=20.0}}]'])
    if "clara" in args.only:
        for micro in ([1, 2] if t else [2, 8]):
            row("clara", f"stage 1, micro-batch {micro}", clara_sets(args, m / "mistral", micro), stage="compression")
        for phase, number in (("instruction", 2), ("end_to_end", 3)):  # each from a one-step stage 1 of its own
            for micro in ([1, 2] if t else [2, 8]):
                if re.search(args.match, label := f"stage {number}, micro-batch {micro}"):
                    row("clara", label, clara23_sets(args, m / "mistral", micro, phase), stage=phase)
    if "8gb" in args.only:
        cap = {"CRB_GPU_MEMORY_GB": "8"}
        ctx = 128 if t else 8192
        for name, model, short in (("language", "mistral", 2048), ("code", "starcoder2", 4096)):
            for c in ([ctx] if t else [ctx, short]):  # the guide's ctx, and the longest the plan fits in 8 GB
                if not re.search(args.match, f"{name} / 8 GB cap, ctx {c},"):
                    continue
                row(name, f"8 GB cap, ctx {c}, micro-batch 1", text_sets(args, m / model, c, 1, name), cap)
    if "2gpu" in args.only:  # per-GPU peaks of --gpus processes (plain data parallel, and the 7B fully fine-tuned)
        build("mistral", m / "mistral", args)
        ctx, n = 128 if t else 8192, args.gpus
        gpus = f"{n} GPU{'s' * (n > 1)}"
        sets = [x for x in text_sets(args, m / "mistral", ctx, 4, "language") if not x.startswith("train.batch_size")]
        row("language", f"{gpus}, ctx {ctx}, micro-batch 4", [*sets, f"train.batch_size={4 * n}"], gpus=n)
        ctx = 128 if t else 4096
        full = [x for x in text_sets(args, m / "mistral", ctx, 1, "language") if not x.startswith("train.batch_size")]
        full += [f"train.batch_size={n}", 'method.name="full"', 'train.optimizer="adamw"',
                 "train.gradient_checkpointing=true"]
        for profile in ("zero2", "zero3", "zero3-offload", "auto"):  # auto: the plan's pick for n GPUs
            row("language", f"{gpus}, full fine-tune, ctx {ctx}, {profile}", [*full, f'hardware.profile="{profile}"'],
                gpus=n)
    if "offload" in args.only:  # ZeRO-3 offload on one GPU, at two lengths: what the per-GPU plan of the 7B on 2 GPUs
        build(OFFLOAD_7B, m / OFFLOAD_7B, args)  # rests on (the whole 7B's CPU states need 190 GiB; this machine 126)
        build("starcoder2", m / "starcoder2", args)
        offload = ['method.name="full"', 'train.optimizer="adamw"',
                   "train.gradient_checkpointing=true", 'hardware.profile="zero3-offload"']
        for name, model, ctx, micro in (("code", "starcoder2", 4096, 1), ("language", OFFLOAD_7B, 4096, 1),
                                        ("language", OFFLOAD_7B, 8192, 1), ("code", "starcoder2", 8192, 1),
                                        ("code", "starcoder2", 2048, 1), ("language", OFFLOAD_7B, 2048, 1),
                                        ("language", OFFLOAD_7B, 4096, 2)):
            ctx, layers = 128 if t else ctx, (1 if t else 12) if model == OFFLOAD_7B else None
            sets = [x for x in text_sets(args, m / model, ctx, micro, name) if not x.startswith("train.batch_size")]
            label = (f"1 GPU, {f'{layers} of 32 layers, ' if layers else ''}full fine-tune, ctx {ctx}, "
                     f"{f'micro-batch {micro}, ' if micro > 1 else ''}zero3-offload")
            if re.search(args.match, f"{name} / {label}"):
                row(name, label, [*sets, *offload, f"train.batch_size={micro}"], model_layers=layers)
    del d
    return out


def common(args: argparse.Namespace, model: Path, micro: int, batch: int | None = None) -> list[str]:
    return [f"model.name={q(str(model))}", "data.eval_split=0", "data.eval=[]",
            f"data.cache_dir={q(str(args.out / 'data' / 'cache'))}", f"train.micro_batch={micro}",
            f"train.batch_size={batch or micro}", "train.max_steps=3", "train.keep_checkpoints=0",
            "train.report_to=[]", "train.warmup_ratio=0.0"]


def text_sets(args: argparse.Namespace, model: Path, ctx: int, micro: int, name: str) -> list[str]:
    """Documents longer than ctx, packed: every row exactly ctx tokens."""
    file = args.out / "data" / f"text-{name}-{ctx}-{micro}.jsonl"
    if not file.is_file():
        language.make_data(model, file, file.with_suffix(".npy"), ctx, micro * 3, 0)
    return common(args, model, micro) + [f"data.train=[{q(str(file))}]", 'data.format="text"', "data.packing=true",
                                         f"data.max_length={ctx}"]


def translation_sets(args: argparse.Namespace, model: Path, batch: int) -> list[str]:
    n = 32 if args.tiny else 256
    a = SimpleNamespace(model_dir=model, seed=0, src_tokens=n, tgt_tokens=n, batch=batch, warmup=0, steps=3)
    file = args.out / "data" / f"translation-{batch}.jsonl"
    if not file.is_file():
        translation.make_data(a, file, file.with_suffix(".npz"))
    return common(args, model, batch) + [f"data.train=[{q(str(file))}]", "data.eval=[]", f"data.max_length={n}"]


def retrieval_sets(args: argparse.Namespace, model: Path, batch: int) -> list[str]:
    words = 31 if args.tiny else 255  # + 1 token each: query, positive and negative all at max_length
    a = SimpleNamespace(model_dir=model, seed=0, query_words=words, doc_words=words, batch=batch, warmup=0, steps=3,
                        big_batch=0, out=args.out)
    file = args.out / "data" / f"retrieval-{batch}.jsonl"
    if not file.is_file():
        retrieval.make_data(a, file)
    return common(args, model, batch) + [f"data.train=[{q(str(file))}]", "data.corpus=[]",
                                         f"data.max_length={words + 1}"]


def clara_sets(args: argparse.Namespace, model: Path, micro: int) -> list[str]:
    length = 384 if args.tiny else 512
    file = args.out / "data" / f"clara-{micro}.jsonl"
    if not file.is_file():  # answers longer than the decoder's max_length: every row cut to it
        clara_bench.make_data(file, micro * 3, doc_words=600, answer_words=length, seed=0)
    return common(args, model, micro) + [f"data.train=[{q(str(file))}]", f"data.max_length={length}",
                                         'data.overlong="truncate"']


def clara23_sets(args: argparse.Namespace, model: Path, micro: int, phase: str) -> list[str]:
    """Stages 2 and 3 (N = 20 candidates, k = 5 read by the decoder): every document longer than the encoder reads,
    every answer longer than the decoder's max_length. They start from the adapters of one stage-1 step."""
    length = 384 if args.tiny else 1024
    file = args.out / "data" / f"clara23-{micro}.jsonl"
    if not file.is_file():
        clara_bench.make_stage23_data(file, micro * 3, 20, doc_words=300, answer_words=length, seed=0)
    init = args.out / "clara-init"
    if not (init / "compression" / "final_adapter").is_dir():  # what stage 1 leaves for the next stage
        stage1 = [*clara_sets(args, model, 1), "train.max_steps=1", f"output.dir={q(str(init))}"]
        language.run_logged([sys.executable, "-m", "crb.run", str(ROOT / "recipes" / "clara.toml"),
                             *[x for s in stage1 for x in ("--set", s)], "--stage", "compression"],
                            args.out / "logs" / "clara-init.log", "clara-init")
    return common(args, model, micro) + [f"data.train=[{q(str(file))}]", f"data.max_length={length}",
                                         'data.overlong="truncate"', f"clara.init_from={q(str(init / 'compression'))}"]


# ---------------------------------------------------------------- measuring a row

# paths on the measuring machine
MACHINE_KEYS = {"model.name", "data.train", "data.cache_dir", "output.dir", "clara.init_from"}
CHOSEN = ("profile", "micro_batch", "checkpointed_layers", "layers", "offload_activations", "kernels", "compile",
          "attention", "shared_dropout")


class HostMemory(threading.Thread):
    """The machine's CPU memory in use (MemTotal - MemAvailable) sampled every 0.2 s while a run lasts: its peak
    above the start, in GiB (what an offload profile holds; the process's RSS counts pinned pages twice)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done, self.start_bytes, self.peak = threading.Event(), self.used(), 0

    @staticmethod
    def used() -> int:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.peak = max(self.peak, self.used() - self.start_bytes)

    def __enter__(self) -> HostMemory:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()
        self.peak_gib = round(self.peak / 2**30, 2)


def measure(args: argparse.Namespace, r: dict, i: int) -> dict:
    recipe = str(ROOT / "recipes" / f"{r['recipe']}.toml")
    run_dir = args.out / "runs" / f"{i:02d}-{r['recipe']}"
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [*r["sets"], *args.sets, f"output.dir={q(str(run_dir))}"]
    flags = [x for s in sets for x in ("--set", s)]
    env = {**os.environ, **r["env"], "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0, gpus = time.perf_counter(), r.get("gpus", 1)
    stage = ["--stage", r["stage"]] if r["stage"] else []
    planned = subprocess.run([sys.executable, "-m", "crb.cli", "plan", recipe, *flags, *stage, "--gpus", str(gpus),
                              "--json"], cwd=ROOT, env=env, capture_output=True, text=True)
    result = {k: r[k] for k in ("recipe", "setting", "model_layers") if k in r} | {"env": r["env"], "gpus": gpus}
    if planned.returncode:
        return result | {"status": "plan failed", "note": planned.stderr.strip().splitlines()[-1:]}
    p = json.loads(planned.stdout)
    result |= {"predicted_gib": p["allocated_gib"], "card_gib": p["total_gib"], "fits": p["fits"],
               "profile": p["profile"], "components_gib": p["components_gib"]}
    os.environ.update(r["env"])
    try:
        peaks = args.peaks or args.phases
        runner = ([str(ROOT / "benchmarks" / "memory_peak.py"), *["--phases"] * args.phases] if peaks else
                  ["-m", "crb.run"])
        if gpus > 1:  # rank 0 logs its own GPU's peak (on CPU, --tiny: torchrun's processes, gloo)
            import torch

            runner = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
                      "--main_process_port", "29580", *runner] if torch.cuda.is_available() else \
                ["-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port", "29580", *runner]
        peak_json = ["--json", str(run_dir / "peak.json")] if peaks else []
        with HostMemory() as host:
            rc, wall = language.run_logged([sys.executable, *runner, recipe, *flags, *peak_json, *stage],
                                           args.out / "logs" / f"{i:02d}-{r['recipe']}.log", r["recipe"])
    finally:
        for k in r["env"]:
            os.environ.pop(k, None)
    folder = run_dir / r["stage"] if r["stage"] else run_dir
    lines = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()] \
        if (folder / "metrics.jsonl").is_file() else []
    mem = [x["gpu_mem_gib"] for x in lines if "gpu_mem_gib" in x]
    reserved = [x["gpu_reserved_gib"] for x in lines if "gpu_reserved_gib" in x]
    chosen = json.loads((folder / "profile.json").read_text()) if (folder / "profile.json").is_file() else {}
    # What the test replans the row with: the overrides that are not this machine's paths, and every "auto"
    # as the run resolved it (so a CPU without liger or a GPU plans the same configuration).
    result["sets"] = [x for x in r["sets"] + args.sets if x.split("=", 1)[0] not in MACHINE_KEYS]
    result["chosen"] = {k: chosen.get(k) for k in CHOSEN}
    result["stage"] = r["stage"]
    speed = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x][1:]  # the first step warms up
    result |= {"host_predicted_gib": round(sum(p.get("host_gib", {}).values()), 2), "host_measured_gib": host.peak_gib,
               "run_profile": chosen.get("profile"),
               "steps": len([x for x in lines if "loss" in x]),
               "tokens_per_s": round(sum(speed) / len(speed)) if speed else None,
               "wall_s": round(wall, 1), "elapsed_s": round(time.perf_counter() - t0, 1)}
    if rc:
        log = (args.out / "logs" / f"{i:02d}-{r['recipe']}.log").read_text(errors="replace").strip().splitlines()
        return result | {"status": f"run failed (exit {rc})", "note": log[-3:]}
    if not mem:
        return result | {"status": "no GPU", "measured_gib": None}
    measured = max(mem)
    if (run_dir / "peak.json").is_file():  # --peaks: what is live at the peak, by allocating line
        peak = json.loads((run_dir / "peak.json").read_text())
        result["live_at_peak"] = peak["live_at_peak"][:15]
        if "phases" in peak:  # --phases resets the allocator's peak at each mark: the run's own log reads windows
            ph = peak["phases"]  # the step of the peak, a window a line: "label: start -> peak GiB"
            result["phases"] = {"peak_window": ph["peak_window"], "step_of_peak": [
                f"{w['window']}: {w['start_gib']:.3f} -> {w['peak_gib']:.3f}" for w in ph["step_of_peak"]]}
            measured = ph["peak_gib"]
    shutil.rmtree(folder / "final_adapter", ignore_errors=True)
    shutil.rmtree(folder / "final_model", ignore_errors=True)
    return result | {"status": "ok", "measured_gib": round(measured, 3), "reserved_gib": round(max(reserved), 3),
                     "error_pct": round(100 * (p["allocated_gib"] - measured) / measured, 1)}


def table(rows_: list[dict]) -> str:
    lines = ["| recipe | setting | profile | predicted GiB | measured GiB | reserved GiB | error % |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows_:
        v = {k: "" if r.get(k) is None else f"{r[k]:.1f}" for k in ("predicted_gib", "measured_gib", "reserved_gib",
                                                                     "error_pct")}
        lines.append(f"| {r['recipe']} | {r['setting']} | {r.get('profile', '')} | {v['predicted_gib']} | "
                     f"{v['measured_gib']} | {v['reserved_gib']} | {v['error_pct'] or r.get('status', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description="crb plan's predicted peak GPU memory against measured runs")
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="language,code,translation,retrieval,clara,8gb",
                   help="row groups; also 2gpu (per-GPU peaks of --gpus processes: run on a machine with that many) "
                        "and offload (ZeRO-3 offload on one GPU at two lengths)")
    p.add_argument("--gpus", type=int, default=2, help="processes of the 2gpu rows (1: ZeRO's terms on one GPU)")
    p.add_argument("--models", default=None, help="model dirs (default /tmp/crb-bench/plan-models[-tiny])")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and lengths: runs every path on CPU")
    p.add_argument("--json", default=None)
    p.add_argument("--match", default="", help="regex over 'recipe / setting': run only the rows it finds")
    p.add_argument("--peaks", action="store_true", help="record allocator history: what is live at each peak")
    p.add_argument("--phases", action="store_true", help="peak per window between layer marks (memory_peak.py "
                   "--phases: where the history fails, as under ZeRO-3)")
    p.add_argument("--set", action="append", default=[], dest="sets",
                   help="a recipe override added to every row (e.g. train.kernels=\"liger\")")
    args = p.parse_args(argv)
    args.out = Path(args.out).resolve()
    args.models = Path(args.models or f"/tmp/crb-bench/plan-models{'-tiny' if args.tiny else ''}")
    args.only = args.only.split(",")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    result_file = args.out / "plan_accuracy.json"
    base = Path(args.json) if args.json and Path(args.json).is_file() else result_file  # rows measured before
    old = json.loads(base.read_text()) if base.is_file() else {"rows": []}
    done = {(r["recipe"], r["setting"]): r for r in old["rows"]}
    for i, r in enumerate(x for x in rows(args) if re.search(args.match, f"{x['recipe']} / {x['setting']}")):
        r["setting"] += "".join(f", {s}" for s in args.sets)
        row = measure(args, r, i)
        print(f"[plan] {row['recipe']} / {row['setting']}: {row['status']} {row.get('predicted_gib')} vs "
              f"{row.get('measured_gib')} GiB ({row.get('elapsed_s')} s)", flush=True)
        done[(row["recipe"], row["setting"])] = row
        summary = {**old, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                   "device_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
                   if torch.cuda.is_available() else None,
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": list(done.values()),
                   "crb_commit": language._git_commit()}
        errors = [abs(x["error_pct"]) for x in summary["rows"] if x.get("error_pct") is not None]
        summary["max_abs_error_pct"] = max(errors) if errors else None
        result_file.write_text(json.dumps(summary, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(table(list(done.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
