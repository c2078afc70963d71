"""Where a crb run's peak GPU memory goes: runs a recipe in-process with PyTorch's allocator history on,
replays the allocation trace to its peak, and prints what is live there, grouped by the line of Python
that allocated it (the evidence behind the coefficients of crb/engine/plan.py; docs/plan.md).

    python benchmarks/memory_peak.py RECIPE --set train.max_steps=2 ... --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]


def where(frames: list[dict]) -> str:
    """The innermost frame outside torch itself (the model, peft, bitsandbytes or crb line)."""
    for f in frames:
        name = f.get("filename", "")
        if name.endswith(".py") and "/torch/" not in name:
            short = name.split("site-packages/")[-1].split("/work/main/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "(no Python frame: autograd backward)"


def replay(trace: list[dict]) -> tuple[int, dict[int, tuple[int, list]]]:
    """The peak of allocated bytes over the trace and the blocks live at it."""
    sizes: dict[int, int] = {}
    total = peak = peak_at = 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            sizes[e["addr"]] = e["size"]
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
        elif e["action"] == "free_completed" and e["addr"] in sizes:
            total -= sizes.pop(e["addr"])
    live: dict[int, tuple[int, list]] = {}
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    return peak, live


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("--stage", default=None)
    p.add_argument("--json", required=True)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from crb.run import run

    if not torch.cuda.is_available():  # CPU: the run alone (checks the paths)
        run(args.recipe, args.sets, None, args.stage)
        Path(args.json).write_text(json.dumps({"recipe": args.recipe, "live_at_peak": []}))
        return 0
    torch.cuda.memory._record_memory_history(max_entries=3_000_000, stacks="python")
    run(args.recipe, args.sets, None, args.stage)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, live = replay(snap["device_traces"][0])
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, frames in live.values():
        g = groups[where(frames)]
        g[0] += size
        g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    result = {"recipe": args.recipe, "sets": args.sets, "replayed_peak_gib": round(peak / GIB, 3),
              "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
              "live_at_peak": [{"where": k, "gib": round(v[0] / GIB, 4), "blocks": v[1]} for k, v in rows]}
    print(f"peak {peak / GIB:.2f} GiB (max_memory_allocated {torch.cuda.max_memory_allocated() / GIB:.2f} GiB)")
    for k, (size, n) in rows[:args.top]:
        print(f"{size / GIB:8.3f} GiB {n:6d}  {k}")
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
