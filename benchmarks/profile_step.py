"""Where a training step's GPU time goes: crb's `train.trace_steps` under a few settings, kernels grouped.

    python benchmarks/profile_step.py --out /tmp/crb-bench/profile --recipes language,code \
        --json benchmarks/results/profile.json
    python benchmarks/profile_step.py --out OUT --variant 'no dropout=method.lora.dropout=0'

Each variant is one crb run of the frontier benchmark's shapes (benchmarks/frontier.py: random-weight
Mistral-7B / StarCoder2-3B, 8 full 8192-token rows per step, the whole card, the recipe's "auto" choices)
with extra `--set`s; steps 2 and 3 are traced (the first allocates and compiles). Kernel device time is summed
into groups by name (GROUPS below, first match wins); the table shows each group's share of the traced time
and the milliseconds per optimizer step, so a change's effect reads off one row.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import frontier  # benchmarks/ is on sys.path
import language

ROOT = Path(__file__).resolve().parents[1]
# (group, regex over the kernel name), first match wins
GROUPS = [
    ("4-bit dequantize", r"dequant|kDequantize|gemv_4bit"),
    ("optimizer", r"Optimizer|optimizer|adam|kPreconditionOptimizer"),
    ("attention", r"flash|fmha|attention|flex|sdpa"),
    ("loss (fused linear + CE)", r"liger|cross_entropy|cce_|_cce|nll_loss|log_softmax|logsumexp"),
    ("matrix products", r"gemm|nvjet|cutlass|sm\d\d_xmma|cublas|wgmma|matmul|aten::(add|b)?mm$"),
    ("compiled (fused elementwise)", r"^triton_"),
    ("dropout", r"dropout|bernoulli|masked_scale|philox|uniform"),
    ("norms", r"layer_norm|rms_norm|LayerNorm|RMSNorm|_norm_"),
    ("dtype conversion copies", r"copy|Memcpy|to_copy|cast"),
    ("other elementwise", r"elementwise|vectorized|unrolled|reduce|Reduce|pow|mul|add|silu|gelu|act"),
]


OP = re.compile(r"^(\w+::\w|Command Buffer Full|CompiledFunction|Torch-Compiled|## )")


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def grouped(kernels: dict) -> dict:
    steps = kernels["steps"] or 1
    sums: dict[str, float] = {}
    seen = set()
    for k in kernels["kernels"]:
        if kernels["device"] == "cuda" and (OP.match(k["name"]) or (k["name"], k["ms"]) in seen):
            continue  # an op's (or a compiled region's) own record of its kernels' time: counted once
        seen.add((k["name"], k["ms"]))
        g = group_of(k["name"])
        sums[g] = sums.get(g, 0.0) + k["ms"]
    total = sum(sums.values())
    return {"total_ms_per_step": total / steps,
            "groups": {g: {"ms_per_step": v / steps, "share": v / total if total else 0}
                       for g, v in sorted(sums.items(), key=lambda kv: -kv[1])}}


def table(results: dict) -> str:
    lines = []
    for recipe, variants in results.items():
        names = list(variants)
        groups = sorted({g for v in variants.values() if v.get("profile") for g in v["profile"]["groups"]},
                        key=lambda g: -max(v["profile"]["groups"].get(g, {}).get("ms_per_step", 0)
                                           for v in variants.values() if v.get("profile")))
        lines.append(f"\n{recipe}: ms per optimizer step (share)")
        lines.append(f"{'kernel group':30}" + "".join(f"{n[:22]:>24}" for n in names))
        for g in groups + ["total", "tokens/s"]:
            cells = []
            for n in names:
                v = variants[n]
                if not v.get("profile"):
                    cells.append(f"{v.get('status', '-'):>24}")
                elif g == "total":
                    cells.append(f"{v['profile']['total_ms_per_step']:>24,.0f}")
                elif g == "tokens/s":
                    cells.append(f"{v.get('tokens_per_s') or 0:>24,.0f}")
                else:
                    e = v["profile"]["groups"].get(g)
                    cells.append(f"{e['ms_per_step']:>16,.0f} ({e['share']:4.0%})" if e else f"{'-':>24}")
            lines.append(f"{g:30}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--recipes", default="language,code")
    p.add_argument("--cap", default="whole", help="a GiB cap for every run, or 'whole'")
    p.add_argument("--variant", action="append", default=[],
                   help="'label=key=value;key=value' (default: as shipped, no LoRA dropout, train.compile)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: checks the paths on CPU")
    p.add_argument("--models", default="/tmp/crb-bench/models")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = args.variant or ["as shipped=", "no LoRA dropout=method.lora.dropout=0", "compile=train.compile=true"]
    fargs = frontier.main_args(["--out", args.out, "--recipes", args.recipes, "--models", args.models,
                                "--steps", "2", "--warmup", "1"] + (["--tiny"] if args.tiny else []))
    frontier.build_models(fargs)
    results: dict = {}
    for recipe in fargs.recipes:
        frontier.data(fargs, recipe)
        results[recipe] = {}
        for v in variants:
            label, _, sets = v.partition("=")
            fargs.crb_set = [s for s in sets.split(";") if s] + ["train.trace_steps=2"]
            out = Path(args.out) / "profile" / recipe / re.sub(r"\W+", "-", label)
            print(f"[{recipe}] {label}: {' '.join(fargs.crb_set)}", flush=True)
            r = frontier.crb_side(fargs, recipe, args.cap, None, out)
            kernels = out / "crb" / "trace" / "kernels.json"
            results[recipe][label] = {
                "sets": fargs.crb_set[:-1], "status": r["status"], "tokens_per_s": r.get("tokens_per_s"),
                "peak_gib": r.get("peak_gib"), "chosen": frontier._chosen(r),
                "profile": grouped(json.loads(kernels.read_text())) if kernels.is_file() else None,
                "top_kernels": json.loads(kernels.read_text())["kernels"][:25] if kernels.is_file() else None}
    print(table(results))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary = {"device": device, "cap": args.cap, "results": results,
               "crb_commit": language._git_commit()}
    Path(args.out, "profile.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
