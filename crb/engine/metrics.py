"""Task metrics beside the eval loss, computed by the libraries that own them: BLEU and chrF
(sacrebleu) on generated translations; nDCG@10, MRR@10 and Recall@1/10 (sentence-transformers'
InformationRetrievalEvaluator) of held-out queries over a corpus; CLaRa stage 3's recall@k of the gold documents
among the candidates its query reasoner selects. Each metric function takes the
model being trained and returns {name: value}; the loop runs them on the main process."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from accelerate.utils import send_to_device
from transformers import PreTrainedTokenizerBase

from crb.data import retrieval
from crb.data.collate import clara_batcher
from crb.losses.clara import recall_at_k
from crb.recipe.schema import Recipe

Metric = Callable[[torch.nn.Module], dict[str, float]]


def task_metrics(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, train_rows: list, eval_rows: list) -> list[Metric]:
    if not eval_rows:
        return []
    rows = eval_rows[: recipe.eval.max_samples or None]
    if recipe.data.format == "translation":
        return [lambda model: translation_scores(model, tokenizer, rows, recipe)]
    if recipe.data.format == "retrieval":
        corpus = retrieval.corpus(recipe.data.corpus, [*train_rows, *eval_rows])
        return [lambda model: retrieval_scores(model, rows, corpus, recipe.eval.batch_size,
                                               recipe.data.document_instruction)]
    if recipe.data.format == "clara" and recipe.clara.phase == "end_to_end":
        collate = clara_batcher(tokenizer.pad_token_id, recipe.clara.doc_width)
        return [lambda model: clara_recall(model, [collate.collate(rows[i: i + recipe.eval.batch_size])
                                                   for i in range(0, len(rows), recipe.eval.batch_size)])]
    return []


def clara_recall(model: torch.nn.Module, batches: list[dict]) -> dict:
    """CLaRa stage 3: recall@k (k = the model's top_k) of the gold documents among the k candidates the query
    reasoner scores highest, over the held-out questions."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = total = 0.0
    with torch.no_grad():
        for batch in batches:
            scores, _ = model.retrieve(send_to_device(batch, device))
            top = scores.topk(model.top_k, dim=-1).indices
            n = sum(1 for g in batch["gold"] if g)
            hits, total = hits + recall_at_k(top, batch["gold"]) * n, total + n
    model.train(was_training)
    return {f"recall@{model.top_k}": hits / max(total, 1)}


def translate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sources: list[np.ndarray],
              target_lang_id: int, max_new_tokens: int, num_beams: int, batch_size: int) -> list[str]:
    """Generate translations of tokenized sources, the target language forced as the first token."""
    out: list[str] = []
    device = next(model.parameters()).device
    for i in range(0, len(sources), batch_size):
        chunk = sources[i: i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):  # left-aligned, as in training
            ids[j, : len(s)], mask[j, : len(s)] = torch.from_numpy(s), 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             forced_bos_token_id=target_lang_id, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             do_sample=False)
        out += tokenizer.batch_decode(gen, skip_special_tokens=True)
    return out


def translation_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list, recipe: Recipe) -> dict:
    import sacrebleu

    e = recipe.eval
    hyps, refs = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lang in sorted({int(r["target_lang"][0]) for r in rows}):
            group = [r for r in rows if int(r["target_lang"][0]) == lang]
            hyps += translate(model, tokenizer, [r["input_ids"] for r in group], lang, e.max_new_tokens, e.num_beams,
                              e.batch_size)
            refs += [str(r["target_text"][0]) for r in group]
    model.train(was_training)
    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}


def retrieval_scores(model: torch.nn.Module, rows: list, corpus: list[str], batch_size: int,
                     document_instruction: str = "") -> dict:
    """nDCG@10, MRR@10, Recall@1/10 of the rows' queries over `corpus`, encoded as training encodes them
    (the instruction and the document instruction as prompts)."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    queries, query_prompt, positives = retrieval.queries(rows)
    doc_id = {text: f"d{i}" for i, text in enumerate(corpus)}
    evaluator = InformationRetrievalEvaluator(
        queries={f"q{i}": q for i, q in enumerate(queries)}, corpus={v: k for k, v in doc_id.items()},
        relevant_docs={f"q{i}": {doc_id[p]} for i, p in enumerate(positives)}, name="eval",
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1, 10], precision_recall_at_k=[1, 10], map_at_k=[10],
        batch_size=batch_size, show_progress_bar=False, query_prompt=query_prompt,
        corpus_prompt=retrieval.prompt(document_instruction))
    was_training = model.training
    scores = evaluator(model)
    model.train(was_training)
    pick = {"ndcg@10": "ndcg@10", "mrr@10": "mrr@10", "recall@1": "recall@1", "recall@10": "recall@10"}
    found = {}
    for key, value in scores.items():  # e.g. "eval_cosine_ndcg@10"
        for name in pick:
            if key.endswith("_" + name) and "cosine" in key:
                found[name] = float(value)
    return found
