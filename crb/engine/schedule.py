"""The schedule of a run: how many rows a micro-batch holds, how many micro-batches a step accumulates, which
rows each step of each epoch trains on (sentence-transformers' trainer's order for the same seed), and how a
micro-batch is halved when memory runs out."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from crb.errors import CrbError
from crb.recipe.schema import Recipe
from crb.tasks import get_task


@dataclass
class Schedule:
    micro: int  # rows per micro-batch per process
    accum: int  # micro-batches per process per optimizer step
    steps_per_epoch: int
    total_steps: int


def make_schedule(recipe: Recipe, n_rows: int, world: int) -> Schedule:
    t = recipe.train
    micro = t.micro_batch
    if get_task(recipe.data.format).whole_batch:  # one pass per step: split over processes, not accumulated
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


def smaller(sched: Schedule) -> Schedule:
    """Half the micro-batch (rounded to a divisor of the old one), the accumulation up to match."""
    micro = max(d for d in range(1, sched.micro) if sched.micro % d == 0 and d <= sched.micro // 2)
    return Schedule(micro, sched.accum * sched.micro // micro, sched.steps_per_epoch, sched.total_steps)
