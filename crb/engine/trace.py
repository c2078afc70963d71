"""train.trace_steps: torch.profiler over a few optimizer steps, written where the run writes.

The first step of a run (and of a resumed run) is left out: it pays for allocation, cuDNN/cuBLAS
heuristics and, with train.compile, compilation. Writes OUT/trace/kernels.json (device time and calls
per kernel or op, largest first), kernels.txt (torch's table of the same) and a Chrome trace
(trace.json: open it in https://ui.perfetto.dev)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


class StepTrace:
    def __init__(self, steps: int, first: int, out_dir: Path, is_main: bool) -> None:
        self.begin, self.end = first + 1, first + 1 + steps  # trace steps begin+1 .. end (1-based)
        self.out = out_dir / "trace"
        self.on = steps > 0 and is_main
        self.prof: profile | None = None

    def before(self, step: int) -> None:
        """Called before 0-based step `step`."""
        if self.on and step == self.begin:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities)
            self.prof.start()

    def after(self, done: int, last: bool = False) -> None:
        """Called after `done` steps; the last traced step (or the run's last) writes the files."""
        if self.prof is None or (done < self.end and not last):
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.stop()
        self.write(self.prof, done - self.begin)
        self.prof = None

    def write(self, prof: profile, steps: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        cuda = torch.cuda.is_available()
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        # on CUDA the kernels alone (an op's device time is its kernels'); on the CPU the ops
        events = [e for e in prof.key_averages() if (e.self_device_time_total and e.device_type == DeviceType.CUDA
                                                     if cuda else e.self_cpu_time_total)]
        rows = [{"name": e.key, "calls": e.count,
                 "ms": (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3} for e in events]
        rows.sort(key=lambda r: -r["ms"])
        device = "cuda" if cuda else "cpu"
        (self.out / "kernels.json").write_text(json.dumps({"steps": steps, "device": device, "kernels": rows},
                                                          indent=1))
        (self.out / "kernels.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60) + "\n")
        prof.export_chrome_trace(str(self.out / "trace.json"))
