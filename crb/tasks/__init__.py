"""The agents, one module each (chat, text, translation, retrieval, clara, rerank), behind one interface (Task, in
base.py), registered in one table by data.format. What differs between agents is asked of the recipe's task
(`get_task`), never decided by an if on the format name.

Adding an agent: write crb/tasks/<name>.py implementing Task and add it to TASKS below (docs/architecture.md)."""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedTokenizerBase

from crb import data
from crb.data import DataReport, Rows
from crb.data.reader import Record
from crb.data.stream import Stream
from crb.errors import RecipeError
from crb.recipe.schema import ClaraConfig, DataConfig, did_you_mean
from crb.tasks import chat, clara, rerank, retrieval, text, translation
from crb.tasks.base import Metric, Task

__all__ = ["LOSSES", "TASKS", "Metric", "Task", "check_record", "get_task", "prepare", "stream"]

TASKS: dict[str, Task] = {t.format: t for t in (chat.TASK, text.TASK, translation.TASK, retrieval.TASK, clara.TASK,
                                                rerank.TASK)}
LOSSES = {name: loss for task in TASKS.values() for name, loss in task.losses.items()}  # every [[losses]] name


def get_task(fmt: str) -> Task:
    """The agent of data format `fmt`, or a RecipeError naming an unknown one and the nearest known."""
    if fmt not in TASKS:
        known = f" (known: {', '.join(TASKS)})"
        raise RecipeError(f"data.format: unknown format '{fmt}'" + did_you_mean(fmt, TASKS, known))
    return TASKS[fmt]


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, clara_cfg: ClaraConfig | None = None
            ) -> tuple[Rows, Rows, DataReport]:
    """The recipe's rows (crb.data.prepare), made by its format's task."""
    return data.prepare(cfg, tokenizer, seed, clara_cfg, task=get_task(cfg.format))


def stream(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, clara_cfg: ClaraConfig | None,
           n_rows: int, keep: int) -> tuple[Stream, Rows | list, DataReport]:
    """data.streaming: the training rows as a Stream of `n_rows` (crb.data.stream); the eval rows (data.eval)
    prepared as usual."""
    task = get_task(cfg.format)
    rows = Stream(cfg, tokenizer, task, clara_cfg, n_rows, keep)
    evals: Rows | list = []
    report = DataReport()
    if cfg.eval:
        evals, _, report = data.prepare(dataclasses.replace(cfg, train=cfg.eval, eval=[], streaming=False),
                                        tokenizer, seed, clara_cfg, task=task)
        report.eval_rows, report.train_rows, report.train_tokens, report.target_tokens = len(evals), 0, 0, 0
    report.train_sources = rows.sources
    return rows, evals, report


def check_record(rec: Record, cfg: DataConfig, clara_cfg: ClaraConfig | None = None) -> object:
    """A record's fields in its format's shape, checked as training checks them (Task.check), or a DataError."""
    return get_task(cfg.format).check(rec, cfg, clara_cfg)
