"""The training loop: one function for every agent and every device count.

Each optimizer step takes `accum` micro-batches per process; the loss is normalised by the
labelled tokens of the whole step (all micro-batches, all processes), so 1 process at
micro-batch 2m equals 2 processes at m. The data position is the step number itself (the
order of each epoch is a seeded permutation, sentence-transformers' trainer's), so resuming is exact."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from crb.data.collate import Batcher
from crb.engine import checkpoint
from crb.engine.metrics import Metric
from crb.engine.schedule import Schedule, dataloader_draw, epoch_order, smaller, step_batches
from crb.engine.trace import StepTrace
from crb.errors import CrbError, Stopped
from crb.recipe.schema import Recipe
from crb.units import GIB

Row = dict[str, np.ndarray]
LossFn = Callable[[torch.nn.Module, dict, torch.Tensor], torch.Tensor]
# A loss may also leave scalars in batch["_metrics"] (e.g. CLaRa's recall@k): logged as their step mean.


class StopRequest:
    """While training: SIGTERM or SIGINT asks the loop to finish the step, write a checkpoint and stop;
    a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Training:
    """What every step of one run shares: the model and its optimizer, the data, the schedule, the outputs."""
    recipe: Recipe
    acc: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    losses: list[tuple[str, LossFn, float, dict]]
    batcher: Batcher
    sched: Schedule
    train_rows: Sequence[Row]
    eval_rows: Sequence[Row]
    out_dir: Path
    metrics: MetricsLog
    task_metrics: Sequence[Metric] = ()
    row_sources: Sequence[str] = ()
    tokens_seen: int = 0
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient

    @property
    def deepspeed(self) -> bool:  # its engine steps inside backward: nothing to skip
        return self.acc.state.deepspeed_plugin is not None

    def total_loss(self, batch: dict, num_items: torch.Tensor, parts: dict | None = None) -> torch.Tensor:
        """The weighted sum of the recipe's losses; with `parts`, also adds each (unweighted) to it."""
        total = 0
        for name, fn, w, opts in self.losses:
            value = fn(self.model, batch, num_items, **opts)
            if parts is not None and len(self.losses) > 1:
                parts[f"loss_{name}"] = parts.get(f"loss_{name}", 0) + value.detach().float()
            total = total + w * value
        return total

    def step_data(self, step: int) -> tuple[list[int], list[dict]]:
        """This process's training-row indices and micro-batches for optimizer step `step`."""
        epoch, in_epoch = divmod(step, self.sched.steps_per_epoch)
        n = len(self.train_rows)
        order = np.arange(n) if getattr(self.train_rows, "in_order", False) else epoch_order(n, self.recipe.train.seed,
                                                                                               epoch)
        mine = step_batches(order, in_epoch, self.recipe, self.sched, self.acc.num_processes, self.acc.process_index)
        return [int(i) for idx in mine for i in idx], [self.batcher.collate([self.train_rows[i] for i in idx])
                                                       for idx in mine]

    def state(self, epoch: int, done: int) -> dict:
        """What a checkpoint after `done` steps records beside the weights and optimizer (streamed rows: where the
        next step's rows start reading)."""
        st = {"epoch": epoch, "tokens": self.tokens_seen, "bad_steps": self.bad_steps}
        if hasattr(self.train_rows, "position"):
            st["stream"] = self.train_rows.position(done * self.recipe.train.batch_size)
        return st


def train(recipe: Recipe, accelerator: Accelerator, model: torch.nn.Module, optimizer, scheduler,
          losses: list[tuple[str, LossFn, float, dict]], train_rows: Sequence[Row], eval_rows: Sequence[Row],
          batcher: Batcher, sched: Schedule, out_dir: Path, resume: Path | None = None,
          task_metrics: Sequence[Metric] = (), row_sources: Sequence[str] = ()) -> dict:
    """Run the optimizer steps of `sched`; returns the final metrics (and `baseline`: step 0's eval)."""
    acc, start, resumed = accelerator, 0, {}
    if resume is not None:
        resumed = checkpoint.load(acc, resume)
        start = resumed["step"]
        acc.print(f"resumed from {resume} at step {start}")
        if "stream" in resumed:  # streamed rows: read on from where the checkpoint's next step starts
            train_rows.seek(start * recipe.train.batch_size, resumed["stream"])
    tr = Training(recipe, acc, model, optimizer, scheduler, losses, batcher, sched, train_rows, eval_rows, out_dir,
                  MetricsLog(out_dir / "metrics.jsonl", acc, keep_until=start), task_metrics, row_sources,
                  bad_steps=resumed.get("bad_steps", 0))
    bar = ProgressBar(acc, sched.total_steps, start)
    last, t0 = {}, time.perf_counter()
    baseline = run_eval(tr, 0) if eval_rows and start == 0 else {}  # so every run shows what training changed
    data = Prefetch(tr.step_data, sched.total_steps, start)
    trace = StepTrace(recipe.train.trace_steps, start, out_dir, acc.is_main_process)
    with bar, StopRequest() as stop:
        for step in range(start, tr.sched.total_steps):
            model.train()
            trace.before(step)
            tick = time.perf_counter()
            if step % tr.sched.steps_per_epoch == 0:
                dataloader_draw()
            rows, batches = data.take(step)
            targets, real_tokens = step_counts(tr, batches, stop, step, start, data)
            result, rows = update_or_halve(tr, step, rows, batches, targets, data)
            done = step + 1
            last.update(finish_step(tr, done, rows, result, real_tokens, tick, bar))
            trace.after(done, last=done == tr.sched.total_steps)
            last.update(eval_and_save(tr, done, data))
    data.close()
    last["train_s"] = time.perf_counter() - t0
    if baseline:
        last["baseline"] = baseline
    return last


@dataclass
class StepResult:
    loss: torch.Tensor  # this process's sum over its micro-batches
    parts: dict  # per-loss sums and the losses' own metrics (e.g. CLaRa's recall@k)
    grad_norm: torch.Tensor | None
    bad: bool  # a non-finite loss or gradient: the update was skipped


def update(tr: Training, batches: list[dict], num_items: torch.Tensor) -> StepResult:
    """Forward and backward of one step's micro-batches, then the update (skipped when non-finite)."""
    acc, t = tr.acc, tr.recipe.train
    result = StepResult(torch.zeros((), device=acc.device), {}, None, False)
    for i, batch in enumerate(batches):
        batch = send_to_device(batch, acc.device)
        if t.compile == "graphs" and i == 0:  # a new step: the graphs may reuse the last one's memory (not per
            torch.compiler.cudagraph_mark_step_begin()  # micro-batch: accumulated gradients live in that memory)
        with acc.accumulate(tr.model):
            with offloaded(t.offload_activations, acc.device):  # saved tensors (layer inputs) to the CPU
                loss = tr.total_loss(batch, num_items, result.parts)
            for k, v in batch.get("_metrics", {}).items():
                result.parts[k] = result.parts.get(k, 0) + float(v)
            acc.backward(loss)
            result.loss += loss.detach().float()
            if acc.sync_gradients:
                if t.max_grad_norm > 0:
                    result.grad_norm = acc.clip_grad_norm_(tr.model.parameters(), t.max_grad_norm)
                result.bad = not tr.deepspeed and non_finite(acc, result.loss, result.grad_norm)
            if not result.bad:  # a non-finite loss or gradient: no update (the gradients are dropped)
                tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
    return result


def update_or_halve(tr: Training, step: int, rows: list[int], batches: list[dict], targets: float,
                    data: Prefetch) -> tuple[StepResult, list[int]]:
    """`update`; when CUDA runs out of memory, again with half the micro-batch (the same rows, the same
    effective batch), as often as it takes. Several processes or DeepSpeed cannot halve alone: one line to stop."""
    acc = tr.acc
    while True:
        num_items = torch.tensor(targets / (acc.num_processes * tr.sched.accum), device=acc.device)
        try:
            return update(tr, batches, num_items), rows
        except torch.OutOfMemoryError as e:
            tr.optimizer.zero_grad(set_to_none=True)
            said = oom_said(str(e))
            if acc.num_processes > 1 or tr.deepspeed or tr.sched.micro == 1:  # the others wait in a collective
                raise CrbError(oom_advice(step + 1, tr.sched, acc.num_processes, tr.deepspeed) + said) from None
        old, tr.sched = tr.sched.micro, smaller(tr.sched)
        acc.gradient_accumulation_steps, acc.step = tr.sched.accum, 0
        free_memory()
        acc.print(f"crb: step {step + 1}: out of memory at micro-batch {old}{said}; going on with micro-batch "
                  f"{tr.sched.micro} x accumulation {tr.sched.accum} (the same effective batch)")
        rows, batches = data.rebuild(step)


def step_counts(tr: Training, batches: list[dict], stop: StopRequest, step: int, start: int,
                data: Prefetch) -> tuple[float, float]:
    """The step's target count and real tokens over all processes; a stop signal on any process ends the run
    here, after a checkpoint of the steps done."""
    counts = torch.tensor([sum(tr.batcher.count(b) for b in batches), sum(tr.batcher.tokens(b) for b in batches),
                           stop.signum], device=tr.acc.device, dtype=torch.float64)
    targets, real_tokens, signals = tr.acc.reduce(counts, "sum").tolist()
    if signals:  # some process got SIGTERM/SIGINT: every one stops here, after a checkpoint
        data.close(cancel=True)
        raise stopped(tr.acc, tr.out_dir / "checkpoints", step, start, tr.state(step // tr.sched.steps_per_epoch, step),
                      stop.signum, tr.recipe.train.keep_checkpoints)
    return targets, real_tokens


def finish_step(tr: Training, done: int, rows: list[int], result: StepResult, real_tokens: float, tick: float,
                bar: ProgressBar) -> dict:
    """The scheduler's step, the step's mean loss over all processes, and its log line (or the skip of a bad
    step). Returns what was logged. The step's time runs from `tick` to its loss on the host (a GPU sync)."""
    acc, t, world = tr.acc, tr.recipe.train, tr.acc.num_processes
    if not acc.optimizer_step_was_skipped and not result.bad:
        tr.scheduler.step()
    loss_value = acc.reduce(result.loss, "sum").item() / (world * tr.sched.accum)
    parts = result.parts
    if parts:  # every value is a sum over this process's micro-batches: the step's mean over all
        sums = acc.reduce(torch.tensor([float(v) for v in parts.values()], device=acc.device), "sum")
        parts = dict(zip(parts, (sums / (world * tr.sched.accum)).tolist(), strict=True))
    tr.tokens_seen += real_tokens
    logged: dict = {}
    if result.bad:
        tr.bad_steps += 1
        skip_bad_step(acc, tr.metrics, done, rows, tr.bad_steps, t.max_bad_steps, tr.out_dir / "checkpoints",
                      tr.row_sources)
    elif not math.isfinite(loss_value):  # DeepSpeed: the update happened already
        raise CrbError(f"step {done}: loss is {loss_value} (lower train.lr, check the data)")
    elif done % t.log_every == 0 or done == tr.sched.total_steps:
        elapsed = time.perf_counter() - tick
        logged = {"step": done, "epoch": round(done / tr.sched.steps_per_epoch, 4), "loss": loss_value,
                  "lr": tr.scheduler.get_last_lr()[0], "tokens_per_s": real_tokens / max(elapsed, 1e-9),
                  "tokens": tr.tokens_seen, "step_s": elapsed, **parts}
        if result.grad_norm is not None:
            logged["grad_norm"] = float(result.grad_norm)
        if torch.cuda.is_available():
            logged["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / GIB
            logged["gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        tr.metrics.write(logged)
        info = f"loss {loss_value:.4f}  lr {logged['lr']:.2e}  {logged['tokens_per_s']:,.0f} tok/s"
        if "gpu_mem_gib" in logged:
            info += f"  {logged['gpu_mem_gib']:.1f} GiB"
        bar.say(done, info)
    bar.advance(done)
    return logged


def eval_and_save(tr: Training, done: int, data: Prefetch) -> dict:
    """The eval when due (train.eval_every, else each epoch's end; always after the last step) and the checkpoint
    when due (train.save_every, else each epoch's end). Returns the eval's figures."""
    t, sched = tr.recipe.train, tr.sched
    epoch_end = done % sched.steps_per_epoch == 0
    due = (t.eval_every and done % t.eval_every == 0) or (not t.eval_every and epoch_end)
    ev = {}
    if tr.eval_rows and (due or done == sched.total_steps):
        data.wait()  # the tokenizer is not shared across threads
        ev = run_eval(tr, done)
    if t.keep_checkpoints and ((t.save_every and done % t.save_every == 0) or (not t.save_every and epoch_end)):
        checkpoint.save(tr.acc, tr.out_dir / "checkpoints", done,
                        {**tr.state((done - 1) // sched.steps_per_epoch, done),
                         "finite": checkpoint.weights_finite(tr.acc, tr.model)}, t.keep_checkpoints)
    return ev


def run_eval(tr: Training, step: int) -> dict:
    """Eval loss and the task's metrics (main process), logged and printed."""
    acc = tr.acc
    eager = tr.recipe.train.compile == "graphs"  # generation's many shapes would each record a graph
    with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
        ev = {"eval_loss": evaluate(acc, tr.model, tr.total_loss, tr.eval_rows, tr.sched.micro, tr.batcher)}
        if tr.task_metrics:
            if acc.is_main_process:
                for fn in tr.task_metrics:
                    ev.update(fn(acc.unwrap_model(tr.model)))
            acc.wait_for_everyone()
    tr.metrics.write({"step": step, **ev})
    acc.print(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items())
              + (" (before training)" if step == 0 else ""))
    return ev


def offloaded(on: bool, device: torch.device):
    """train.offload_activations: the tensors autograd saves go to (pinned) CPU memory."""
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda") if on else contextlib.nullcontext()


class Prefetch:
    """Builds (tokenizes, pads) the next step's batches in a thread while this step trains."""

    def __init__(self, make: Callable[[int], tuple], total: int, first: int) -> None:
        self.make, self.total = make, total
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.next = self.pool.submit(make, first)

    def take(self, step: int) -> tuple:
        """Step `step`'s data (built during the previous step); starts building the next step's."""
        data = self.next.result()
        if step + 1 < self.total:
            self.next = self.pool.submit(self.make, step + 1)
        return data

    def rebuild(self, step: int) -> tuple:
        """After the micro-batch changed: this step's data built again now, the next step's in the background."""
        self.wait()
        data = self.make(step)
        if step + 1 < self.total:
            self.next = self.pool.submit(self.make, step + 1)
        return data

    def wait(self) -> None:
        self.next.result()

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(cancel_futures=cancel)


class ProgressBar:
    """The rich progress bar on a terminal (main process); a plain line per logged step elsewhere."""

    def __init__(self, acc: Accelerator, total: int, start: int) -> None:
        console = Console(stderr=True)
        self.acc = acc
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                 disable=not (acc.is_main_process and console.is_terminal))
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.total = total

    def __enter__(self) -> ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def say(self, done: int, info: str) -> None:
        self.progress.update(self.task, info=info)
        if not self.progress.live.is_started:
            self.acc.print(f"step {done}/{self.total}  {info}")

    def advance(self, done: int) -> None:
        self.progress.update(self.task, completed=done)


def oom_advice(step: int, sched: Schedule, world: int, deepspeed: bool) -> str:
    """The one line a run that cannot halve its micro-batch by itself stops with: what to set. With several
    processes (or DeepSpeed) the others are inside a collective of this step, so the micro-batch cannot be
    changed on one process alone; the launcher ends them when this one exits."""
    where = f" on 1 of {world} processes" if world > 1 else (" under DeepSpeed" if deepspeed else "")
    if sched.micro == 1:
        return (f"step {step}: CUDA out of memory at micro-batch 1{where}: set a lower data.max_length, "
                "train.gradient_checkpointing = true or train.offload_activations = \"auto\" (`crb plan` shows "
                "what fits)")
    half = smaller(sched)
    return (f"step {step}: CUDA out of memory at micro-batch {sched.micro}{where}: set train.micro_batch = "
            f"{half.micro} (accumulation {half.accum} keeps the effective batch), or leave it \"auto\" for the plan "
            "to choose")


def oom_said(message: str) -> str:
    """What torch's out-of-memory message says of the card, in a few words (" (tried to allocate 2.00 GiB: 1.50 GiB
    of 139.80 GiB free, 137.90 GiB held by this process)"): whether the run itself or another process holds it."""
    want = re.search(r"Tried to allocate ([\d.]+ \w+)", message)
    card = re.search(r"total capacity of ([\d.]+ \w+) of which ([\d.]+ \w+) is free", message)
    mine = re.search(r"this process has ([\d.]+ \w+) memory in use", message)
    if not (want and card):
        return ""
    held = f", {mine.group(1)} held by this process" if mine else ""
    return f" (tried to allocate {want.group(1)}: {card.group(2)} of {card.group(1)} free{held})"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def non_finite(acc: Accelerator, step_loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    """Whether any process saw a NaN/inf loss or gradient this step (all processes agree). A non-finite loss
    makes its gradients non-finite, and the clipped norm is of the gradients synced over all processes, so it
    alone decides; without clipping, the processes' losses are compared."""
    if grad_norm is not None:
        return not bool(torch.isfinite(grad_norm).item())
    flag = (~torch.isfinite(step_loss.float())).float().reshape(1)
    return acc.reduce(flag, "sum").item() > 0


def skip_bad_step(acc: Accelerator, metrics: MetricsLog, done: int, rows: list[int], bad: int, limit: int,
                  ckpt_root: Path, row_sources: Sequence[str] = ()) -> None:
    """Log a skipped step (its rows' records by file:line); past train.max_bad_steps, stop with the last good
    checkpoint named."""
    records = [row_sources[i] for i in rows] if len(row_sources) else [f"row {i}" for i in rows]
    shown = "; ".join(records[:8]) + ("; ..." if len(records) > 8 else "")
    metrics.write({"step": done, "skipped": "non-finite loss or gradient", "rows": rows, "records": records})
    acc.print(f"crb: step {done}: non-finite loss or gradient, update skipped ({bad} of train.max_bad_steps "
              f"{limit}); records {shown}")
    if bad > limit:
        good = checkpoint.latest_good(ckpt_root)
        raise CrbError(f"train.max_bad_steps: {bad} steps had a non-finite loss or gradient, the last step {done} "
                       f"(records {shown}); stopped; last good checkpoint: {good or 'none yet'} "
                       "(lower train.lr, or check those records)")


def stopped(acc: Accelerator, root: Path, done: int, start: int, state: dict, signum: int, keep: int) -> Stopped:
    """The checkpoint of the `done` steps finished so far, and the message to stop with."""
    name = signal.Signals(signum).name if signum else "a signal on another process"
    if done == start:
        return Stopped(f"{name} before step {done + 1} finished: nothing new to save", signum or signal.SIGTERM)
    if not keep:
        return Stopped(f"{name} after step {done}: train.keep_checkpoints = 0, so no checkpoint",
                       signum or signal.SIGTERM)
    path = checkpoint.save(acc, root, done, state, keep)
    return Stopped(f"{name} after step {done}: checkpoint {path}; continue with --resume", signum or signal.SIGTERM)


def evaluate(acc: Accelerator, model: torch.nn.Module, total_loss: Callable, rows: Sequence[Row], micro: int,
             batcher: Batcher) -> float:
    """Mean loss per item (target token, or query) over the eval rows, split across processes."""
    mine = rows[acc.process_index:: acc.num_processes]
    sums = torch.zeros(2, device=acc.device, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), micro):
            batch = send_to_device(batcher.collate(mine[i: i + micro]), acc.device)
            sums[0] += total_loss(batch, torch.tensor(1.0, device=acc.device)).double()
            sums[1] += batcher.count(batch)
    sums = acc.reduce(sums, "sum")
    model.train()
    return (sums[0] / sums[1].clamp(min=1)).item()


class MetricsLog:
    """metrics.jsonl (main process) and Accelerate's trackers, side by side."""

    def __init__(self, path: Path, acc: Accelerator, keep_until: int) -> None:
        self.path, self.acc = path, acc
        if acc.is_main_process:
            kept = []
            if path.exists() and keep_until:  # on resume, drop lines from after the checkpoint
                kept = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= keep_until]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, row: dict) -> None:
        if self.acc.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
