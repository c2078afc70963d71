"""Task metrics beside the eval loss, each agent's own (Task.metrics, computed by the libraries that own them):
BLEU and chrF of generated translations, nDCG@10, MRR@10 and Recall@1/10 of held-out queries over a corpus,
CLaRa stage 3's recall@k of the gold documents. Each metric takes the model being trained and returns
{name: value}; the loop runs them on the main process."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from crb.recipe.schema import Recipe
from crb.tasks import Metric, get_task

__all__ = ["Metric", "task_metrics"]


def task_metrics(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, train_rows: Sequence, eval_rows: Sequence
                 ) -> list[Metric]:
    """The recipe's task's metrics on the held-out rows (the first eval.max_samples); none without eval rows."""
    if not eval_rows:
        return []
    rows = eval_rows[: recipe.eval.max_samples or None]
    return get_task(recipe.data.format).metrics(recipe, tokenizer, rows, train_rows + eval_rows)
