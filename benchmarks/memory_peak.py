"""Where a crb run's peak GPU memory goes: runs a recipe in-process with PyTorch's allocator history on,
replays the allocation trace to its peak, and prints what is live there, grouped by the line of Python
that allocated it (the evidence behind the coefficients of crb/engine/plan.py; docs/plan.md).

    python benchmarks/memory_peak.py RECIPE --set train.max_steps=2 ... --json OUT.json
    python benchmarks/memory_peak.py RECIPE ... --json OUT.json --phases   # peak per window between layers

--phases is for runs where the allocator history cannot be taken (DeepSpeed ZeRO-3's linear with checkpointing
ends it in a SystemError): hooks mark every decoder layer's forward, its recompute in the backward, the end of the
model's forward and the optimizer's step, and each window between two marks records the memory allocated when it
starts and its peak. The window that holds the peak says which moment it is; the starts say what stays live.
"""

from __future__ import annotations

import argparse
import json
import os
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


class Phases:
    """Allocated bytes at each mark and the peak since the mark before (global module and optimizer hooks)."""

    LAYER = ("DecoderLayer", "Block")  # transformers' decoder layers (Mistral, Starcoder2, ...), T5's blocks

    def __init__(self) -> None:
        self.windows: list[dict] = []
        self.label, self.step, self.start = "start", 0, 0
        self.order: dict[int, int] = {}  # decoder layer -> its place
        self.children: dict[int, int] = {}  # a layer's part -> the layer's place
        self.cuda = torch.cuda.is_available()

    def mark(self, label: str) -> None:
        at = torch.cuda.memory_allocated() if self.cuda else 0
        peak = torch.cuda.max_memory_allocated() if self.cuda else 0
        self.windows.append({"step": self.step, "window": self.label, "start_gib": round(self.start / GIB, 3),
                             "peak_gib": round(peak / GIB, 3)})
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.label, self.start = label, at

    def install(self) -> list:
        """Registers the hooks; returns their handles (`.remove()` each to stop)."""
        from torch.nn.modules import module
        from torch.optim import optimizer

        def pre(m: torch.nn.Module, _args: tuple) -> None:
            name = type(m).__name__
            if name.endswith(self.LAYER) and torch.is_grad_enabled() and id(m) not in self.order:
                self.order[id(m)] = len(self.order)
                self.children.update({id(c): self.order[id(m)] for c in m.children()})
            i = self.order.get(id(m), self.children.get(id(m)))
            if i is not None and torch.is_grad_enabled():
                # in the backward: a checkpointed layer recomputed (transformers checkpoints either the layer's call
                # or its forward alone: then only its parts' hooks run again)
                backward = torch._C._current_graph_task_id() != -1
                label = f"{'backward' if backward else 'forward'} layer {i}"
                if label != self.label:
                    self.mark(label)
            elif name.endswith(("ForCausalLM", "ForConditionalGeneration")) and torch.is_grad_enabled():
                stepped = self.label == "optimizer step"
                self.mark("forward (embeddings)")
                self.step += stepped

        def post(m: torch.nn.Module, _args: tuple, _out: object) -> None:
            if type(m).__name__.endswith(("ForCausalLM", "ForConditionalGeneration")) and torch.is_grad_enabled():
                self.mark("loss and backward until the first recompute")

        def step_pre(_opt: object, _args: tuple, _kwargs: dict) -> None:
            if self.label != "optimizer step":  # DeepSpeed steps its CPU optimizer once per sub-group
                self.mark("optimizer step")

        return [module.register_module_forward_pre_hook(pre), module.register_module_forward_hook(post),
                optimizer.register_optimizer_step_pre_hook(step_pre)]

    def summary(self) -> dict:
        """The window of the peak, the step holding it window by window, and every window (step, label, start,
        peak)."""
        self.mark("end")
        top = max(self.windows, key=lambda w: w["peak_gib"])
        return {"peak_gib": top["peak_gib"], "peak_window": top,
                "step_of_peak": [w for w in self.windows if w["step"] == top["step"]],
                "windows": [[w["step"], w["window"], w["start_gib"], w["peak_gib"]] for w in self.windows]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("--stage", default=None)
    p.add_argument("--json", required=True)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--phases", action="store_true", help="peaks per window between layer marks, no history")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from crb.run import run

    if args.phases:
        phases = Phases()
        phases.install()
        run(args.recipe, args.sets, None, args.stage)
        result = {"recipe": args.recipe, "sets": args.sets, "live_at_peak": [], "phases": phases.summary()}
        if os.environ.get("RANK", "0") == "0":  # under a launcher of several processes, rank 0's GPU
            for w in result["phases"]["step_of_peak"]:
                print(f"step {w['step']} {w['window']:<48} start {w['start_gib']:8.3f}  peak {w['peak_gib']:8.3f} GiB")
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0

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
