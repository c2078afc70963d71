"""The training loop: one function for every agent and every device count.

Each optimizer step takes `accum` micro-batches per process; the loss is normalised by the
labelled tokens of the whole step (all micro-batches, all processes), so 1 process at
micro-batch 2m equals 2 processes at m. The data position is the step number itself (the
order of each epoch is a seeded permutation, sentence-transformers' trainer's), so resuming is exact."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import signal
import threading
import time
from collections.abc import Callable
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
from crb.engine.recipe import WHOLE_BATCH_FORMATS, Recipe
from crb.engine.trace import StepTrace
from crb.errors import CrbError, Stopped
from crb.units import GIB

Row = dict[str, np.ndarray]
LossFn = Callable[[torch.nn.Module, dict, torch.Tensor], torch.Tensor]
# A loss may also leave scalars in batch["_metrics"] (e.g. CLaRa's recall@k): logged as their step mean.


@dataclass
class Schedule:
    micro: int  # rows per micro-batch per process
    accum: int  # micro-batches per process per optimizer step
    steps_per_epoch: int
    total_steps: int


def make_schedule(recipe: Recipe, n_rows: int, world: int) -> Schedule:
    t = recipe.train
    micro = t.micro_batch
    if recipe.data.format in WHOLE_BATCH_FORMATS:  # one pass per step: split over processes, not accumulated
        if t.batch_size % world:
            raise CrbError(f"train.batch_size: {t.batch_size} is not a multiple of {world} processes")
        micro = t.batch_size // world
    per_step = micro * world
    if t.batch_size % per_step:
        raise CrbError(f"train.batch_size: {t.batch_size} is not a multiple of micro_batch {t.micro_batch} "
                       f"x {world} processes")
    accum = t.batch_size // per_step
    steps_per_epoch = n_rows // t.batch_size
    if steps_per_epoch == 0:
        raise CrbError(f"train.batch_size: {t.batch_size} rows per step but the data has only {n_rows} rows")
    total = t.max_steps or t.epochs * steps_per_epoch
    return Schedule(micro, accum, steps_per_epoch, total)


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


def dataloader_draw() -> None:
    """At each epoch's start, the one draw from the global generator that a torch DataLoader makes when its
    iterator starts (its workers' base seed). transformers' and sentence-transformers' trainers make it, so with
    it the same seed gives crb their dropout masks too, not only their batches."""
    torch.empty((), dtype=torch.int64).random_()


@functools.lru_cache(maxsize=2)
def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The rows' order in `epoch`: torch.randperm from a generator seeded with seed + epoch, the order Accelerate's
    seedable RandomSampler gives sentence-transformers' trainer (so the same seed makes the same batches)."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).numpy()


def step_batches(order: np.ndarray, step_in_epoch: int, recipe: Recipe, sched: Schedule,
                 world: int, rank: int) -> list[np.ndarray]:
    """This process's micro-batches (row indices) for one optimizer step."""
    mb = sched.micro
    start = step_in_epoch * recipe.train.batch_size
    return [order[start + (a * world + rank) * mb: start + (a * world + rank + 1) * mb]
            for a in range(sched.accum)]


def train(recipe: Recipe, accelerator: Accelerator, model: torch.nn.Module, optimizer, scheduler,
          losses: list[tuple[str, LossFn, float, dict]], train_rows: list[Row], eval_rows: list[Row],
          batcher: Batcher, sched: Schedule, out_dir: Path, resume: Path | None = None,
          task_metrics: list[Metric] = (), row_sources: list[str] = ()) -> dict:
    """Run the optimizer steps of `sched`; returns the final metrics (and `baseline`: step 0's eval)."""
    acc, t = accelerator, recipe.train
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    ckpt_root = out_dir / "checkpoints"
    start, bad_steps = 0, 0  # bad: steps skipped for a non-finite loss or gradient
    if resume is not None:
        state = checkpoint.load(acc, resume)
        start, bad_steps = state["step"], state.get("bad_steps", 0)
        acc.print(f"resumed from {resume} at step {start}")
    deepspeed = acc.state.deepspeed_plugin is not None  # its engine steps inside backward: nothing to skip
    metrics = MetricsLog(out_dir / "metrics.jsonl", acc, keep_until=start)

    def total_loss(batch: dict, num_items: torch.Tensor, parts: dict | None = None) -> torch.Tensor:
        """The weighted sum of the recipe's losses; with `parts`, also adds each (unweighted) to it."""
        total = 0
        for name, fn, w, opts in losses:
            value = fn(model, batch, num_items, **opts)
            if parts is not None and len(losses) > 1:
                parts[f"loss_{name}"] = parts.get(f"loss_{name}", 0) + value.detach().float()
            total = total + w * value
        return total

    def offload():
        if t.offload_activations:
            return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
        return contextlib.nullcontext()

    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), console=console,
                        disable=not (acc.is_main_process and console.is_terminal))
    task = progress.add_task("train", total=sched.total_steps, completed=start, info="")
    last: dict = {}
    tokens_seen, t0 = 0, time.perf_counter()
    def run_eval(step: int) -> dict:
        ev = {"eval_loss": evaluate(acc, model, total_loss, eval_rows, sched.micro, batcher)}
        if task_metrics:
            if acc.is_main_process:
                for fn in task_metrics:
                    ev.update(fn(acc.unwrap_model(model)))
            acc.wait_for_everyone()
        metrics.write({"step": step, **ev})
        acc.print(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items())
                  + (" (before training)" if step == 0 else ""))
        return ev

    def step_data(step: int) -> tuple[list[int], list[dict]]:
        """This process's training-row indices and micro-batches for optimizer step `step`."""
        epoch, in_epoch = divmod(step, sched.steps_per_epoch)
        mine = step_batches(epoch_order(len(train_rows), t.seed, epoch), in_epoch, recipe, sched, world, rank)
        return [int(i) for idx in mine for i in idx], [batcher.collate([train_rows[i] for i in idx]) for idx in mine]

    def micro_batches(batches: list[dict], num_items: torch.Tensor) -> tuple[torch.Tensor, dict, object, bool]:
        """Forward and backward of one step's micro-batches, then the update (skipped when non-finite)."""
        step_loss = torch.zeros((), device=device)
        parts: dict = {}  # per-loss sums and the losses' own metrics, logged beside the total
        grad_norm, bad = None, False
        for batch in batches:
            batch = send_to_device(batch, device)
            with acc.accumulate(model):
                with offload():  # with train.offload_activations: saved tensors (layer inputs) to the CPU
                    loss = total_loss(batch, num_items, parts)
                for k, v in batch.get("_metrics", {}).items():
                    parts[k] = parts.get(k, 0) + float(v)
                acc.backward(loss)
                step_loss += loss.detach().float()
                if acc.sync_gradients:
                    if t.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    bad = not deepspeed and non_finite(acc, step_loss, grad_norm)
                if not bad:  # a non-finite loss or gradient: no update (the gradients are dropped)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return step_loss, parts, grad_norm, bad

    baseline = run_eval(0) if eval_rows and start == 0 else {}  # so every run shows what training changed
    ahead = ThreadPoolExecutor(max_workers=1)  # builds (tokenizes, pads) the next step's batches during this one
    upcoming = ahead.submit(step_data, start)
    trace = StepTrace(t.trace_steps, start, out_dir, acc.is_main_process)
    with progress, StopRequest() as stop:
        for step in range(start, sched.total_steps):
            epoch = step // sched.steps_per_epoch
            model.train()
            trace.before(step)
            tick = time.perf_counter()
            if step % sched.steps_per_epoch == 0:
                dataloader_draw()
            rows, batches = upcoming.result()
            if step + 1 < sched.total_steps:
                upcoming = ahead.submit(step_data, step + 1)
            counts = torch.tensor([sum(batcher.count(b) for b in batches), sum(batcher.tokens(b) for b in batches),
                                   stop.signum], device=device, dtype=torch.float64)
            targets, real_tokens, signals = acc.reduce(counts, "sum").tolist()
            if signals:  # some process got SIGTERM/SIGINT: every one stops here, after a checkpoint
                ahead.shutdown(cancel_futures=True)
                raise stopped(acc, ckpt_root, step, start, {"epoch": epoch, "tokens": tokens_seen,
                                                            "bad_steps": bad_steps}, stop.signum, t.keep_checkpoints)
            while True:  # once, unless CUDA runs out of memory: then again with half the micro-batch
                num_items = torch.tensor(targets / (world * sched.accum), device=device)
                try:
                    step_loss, parts, grad_norm, bad = micro_batches(batches, num_items)
                    break
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    if world > 1 or deepspeed or sched.micro == 1:  # the others wait in a collective: stop
                        raise CrbError(oom_advice(step + 1, sched, world, deepspeed)) from None
                old = sched.micro
                sched = smaller(sched)
                acc.gradient_accumulation_steps, acc.step = sched.accum, 0
                free_memory()
                acc.print(f"crb: step {step + 1}: out of memory at micro-batch {old}; going on with micro-batch "
                          f"{sched.micro} x accumulation {sched.accum} (the same effective batch)")
                rows, batches = step_data(step)
                if step + 1 < sched.total_steps:  # the next step's micro-batches, split the new way
                    upcoming.result()
                    upcoming = ahead.submit(step_data, step + 1)
            if not acc.optimizer_step_was_skipped and not bad:
                scheduler.step()
            loss_value = acc.reduce(step_loss, "sum").item() / (world * sched.accum)
            if parts:  # every value is a sum over this process's micro-batches: the step's mean over all
                sums = acc.reduce(torch.tensor([float(v) for v in parts.values()], device=device), "sum")
                parts = dict(zip(parts, (sums / (world * sched.accum)).tolist(), strict=True))
            tokens_seen += real_tokens
            done = step + 1
            if bad:
                bad_steps += 1
                skip_bad_step(acc, metrics, done, rows, bad_steps, t.max_bad_steps, ckpt_root, row_sources)
            elif not math.isfinite(loss_value):  # DeepSpeed: the update happened already
                raise CrbError(f"step {done}: loss is {loss_value} (lower train.lr, check the data)")
            elif done % t.log_every == 0 or done == sched.total_steps:
                elapsed = time.perf_counter() - tick
                last = {"step": done, "epoch": round(done / sched.steps_per_epoch, 4), "loss": loss_value,
                        "lr": scheduler.get_last_lr()[0], "tokens_per_s": real_tokens / max(elapsed, 1e-9),
                        "tokens": tokens_seen, "step_s": elapsed, **parts}
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                if torch.cuda.is_available():
                    last["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / GIB
                    last["gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
                metrics.write(last)
                info = f"loss {loss_value:.4f}  lr {last['lr']:.2e}  {last['tokens_per_s']:,.0f} tok/s"
                if "gpu_mem_gib" in last:
                    info += f"  {last['gpu_mem_gib']:.1f} GiB"
                progress.update(task, info=info)
                if not progress.live.is_started:
                    acc.print(f"step {done}/{sched.total_steps}  {info}")
            progress.update(task, completed=done)
            trace.after(done, last=done == sched.total_steps)
            epoch_end = done % sched.steps_per_epoch == 0
            due = (t.eval_every and done % t.eval_every == 0) or (not t.eval_every and epoch_end)
            if eval_rows and (due or done == sched.total_steps):  # and always at the end
                upcoming.result()  # the tokenizer is not shared across threads
                last.update(run_eval(done))
            if (t.save_every and done % t.save_every == 0) or (not t.save_every and epoch_end):
                checkpoint.save(acc, ckpt_root, done, {"epoch": epoch, "tokens": tokens_seen, "bad_steps": bad_steps,
                                                        "finite": checkpoint.weights_finite(acc, model)},
                                t.keep_checkpoints)
    ahead.shutdown()
    last["train_s"] = time.perf_counter() - t0
    if baseline:
        last["baseline"] = baseline
    return last


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


def smaller(sched: Schedule) -> Schedule:
    """Half the micro-batch (rounded to a divisor of the old one), the accumulation up to match."""
    micro = max(d for d in range(1, sched.micro) if sched.micro % d == 0 and d <= sched.micro // 2)
    return Schedule(micro, sched.accum * sched.micro // micro, sched.steps_per_epoch, sched.total_steps)


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
                  ckpt_root: Path, row_sources: list[str] = ()) -> None:
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
    path = checkpoint.save(acc, root, done, state, keep)
    return Stopped(f"{name} after step {done}: checkpoint {path}; continue with --resume", signum or signal.SIGTERM)


def evaluate(acc: Accelerator, model: torch.nn.Module, total_loss: Callable, rows: list[Row], micro: int,
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
