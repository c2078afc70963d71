"""The reranker agent (data.format "rerank"): a sentence-transformers CrossEncoder, which reads a query together with
one document and scores how well they match, trained on `query, positive, negatives[]` records with the library's
cross-encoder losses (crb/losses/rerank.py). It reorders what a first-stage retriever found: eval takes each held-out
query's top CANDIDATES documents of the eval corpus by a bi-encoder (`data.retriever`) and reports nDCG@10 and MRR@10
of retrieval alone (retrieval_*) and of retrieval + reranker (sentence-transformers' CrossEncoderRerankingEvaluator)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from crb.data import Row, retrieval
from crb.data.collate import Batcher
from crb.data.reader import Record, read_jsonl
from crb.errors import CrbError, DataError, first_line
from crb.losses.rerank import rerank_bce, rerank_lambda, rerank_mnrl
from crb.recipe.schema import Bad, ClaraConfig, DataConfig, Recipe
from crb.tasks.base import Loader, Metric, Task, strings

CANDIDATES = 20  # the retriever's top documents that the reranker reorders


class Rerank(Task):
    format = "rerank"
    kind = "embedding"  # a sentence-transformers model, trained whole; `encoder` makes it a CrossEncoder
    auto_class = None
    losses = {"rerank_mnrl": rerank_mnrl, "rerank_bce": rerank_bce, "rerank_lambda": rerank_lambda}
    default_losses = ("rerank_mnrl",)
    demo_prompt = "waterproof boots for hiking in the rain"
    fields = frozenset({"query", "positive", "negatives"})
    keys = ("data.hard_negatives", "data.corpus", "data.retriever")
    token_keys = ()  # rows are texts, paired and tokenized by the model batch by batch

    def check_recipe(self, recipe: Recipe, bad: Bad) -> None:
        super().check_recipe(recipe, bad)
        if recipe.method.name not in ("full", "freeze"):
            raise bad("method.name", "expected 'full' or 'freeze' for rerank (the cross-encoder trains whole)",
                      recipe.method.name)

    def check(self, rec: Record, cfg: DataConfig, clara_cfg: ClaraConfig | None) -> list[str]:
        """[query, positive, negatives...]."""
        return check_record(rec.data, rec.where())

    def make_row(self, checked: list[str], where: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                 template: str, clara_cfg: ClaraConfig | None) -> tuple[Row, int]:
        query, docs = checked[0], checked[1:]
        pairs = tokenizer([query] * len(docs), docs)["input_ids"]  # as the cross-encoder reads them
        return {"texts": np.asarray(checked)}, max(len(ids) for ids in pairs)

    def truncate(self, item: Row, max_length: int) -> Row:
        return item  # the cross-encoder's tokenizer cuts each pair at max_length (model.max_seq_length)

    def texts(self, record: dict) -> dict[str, list[str]]:
        return {k: strings(record.get(k)) for k in ("query", "positive", "negatives") if k in record}

    def describe(self, records: list[dict]) -> dict[str, dict]:
        counts = Counter(f"negatives {len(strings(d.get('negatives')))}" for d in records)
        return {"per_record": dict(counts.most_common())} if counts else {}

    def encoder(self, name: str, **kwargs: Any) -> torch.nn.Module:
        """A CrossEncoder with one output (the relevance score): a cross-encoder as it is, or a BERT-like model
        (a sentence-transformers bi-encoder too) with a fresh score head."""
        from sentence_transformers.cross_encoder import CrossEncoder

        return CrossEncoder(name, num_labels=1, **kwargs)

    def batcher(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> Batcher:
        """Each row's query and its documents: the positive first, then as many negatives as the batch's poorest row
        has (at most data.hard_negatives). The loss pairs and tokenizes them with the model's own preprocessing.
        Counts queries; the tokens are the pairs'."""
        most, max_length = recipe.data.hard_negatives, recipe.data.max_length

        def make(rows: list[Row]) -> dict[str, Any]:
            negatives = min(most, *(len(r["texts"]) - 2 for r in rows))
            queries = [str(r["texts"][0]) for r in rows]
            docs = [[str(t) for t in r["texts"][1: 2 + negatives]] for r in rows]
            pairs = tokenizer([q for q, group in zip(queries, docs, strict=True) for _ in group],
                              [d for group in docs for d in group], truncation=True, max_length=max_length)
            return {"queries": queries, "docs": docs, "n_rows": len(rows),
                    "n_tokens": sum(len(ids) for ids in pairs["input_ids"])}

        return Batcher(make, lambda b: b["n_rows"], lambda b: b["n_tokens"])

    def plan_tokens(self, recipe: Recipe, micro_batch: int, length: int) -> tuple[int, int, int]:
        # every (query, document) pair of a micro-batch; rerank_mnrl adds num_negatives in-batch ones per query
        documents = 1 + recipe.data.hard_negatives
        options = {x.name: x.options for x in recipe.losses} or {name: {} for name in self.default_losses}
        sampled = options["rerank_mnrl"].get("num_negatives", 4) if "rerank_mnrl" in options else 0
        in_batch = (micro_batch - 1) * documents  # every other query's documents (num_negatives = None: all)
        pairs = micro_batch * (documents + (in_batch if sampled is None else min(sampled, in_batch)))
        return pairs * length, 0, pairs * length

    def metrics(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, rows: list[Row], all_rows: list[Row]
                ) -> list[Metric]:
        corpus = retrieval.corpus(recipe.data.corpus, all_rows)
        samples: list[dict] = []  # made at the first eval: the retriever does not train

        def scores(model: torch.nn.Module) -> dict[str, float]:
            if not samples:
                samples.extend(eval_samples(recipe.data.retriever, rows, corpus, model.device))
            return reranking_scores(model, samples, recipe.eval.batch_size)

        return [scores]

    def verify(self, load: Loader, recipe: dict, prompt: str, max_new_tokens: int, target_lang: str | None = None,
               source_lang: str | None = None, docs: list[str] | None = None) -> str:
        """The prompt's best 3 documents of the run's eval corpus: the retriever's top CANDIDATES (every document
        without a retriever) reordered by the trained cross-encoder, each with its score and its place before."""
        data = recipe["data"]
        rows = [{"texts": np.asarray(check_record(r.data, r.where()))}
                for file in [*data["train"], *data.get("eval", [])] for r in read_jsonl(file)
                if not isinstance(r, Exception)]
        corpus = retrieval.corpus(data.get("corpus", []), rows)
        retriever = data.get("retriever", "")
        found = shortlists(retriever, [prompt], corpus, "cpu")[0] if retriever else corpus
        ranked = load()[0].rank(prompt, found, top_k=3)
        by = "retrieval" if retriever else "corpus"
        return "\n".join(f"{r['score']:.3f}  ({by} #{r['corpus_id'] + 1})  {found[r['corpus_id']]}" for r in ranked)


def check_record(data: dict, where: str) -> list[str]:
    """[query, positive, negatives...] of a record, or a DataError naming the record and the field."""
    for name in ("query", "positive", "negatives"):
        if name not in data:
            raise DataError(f"{where}: missing field '{name}'")
    for name in ("query", "positive"):
        if not isinstance(data[name], str) or not data[name].strip():
            raise DataError(f"{where}: {name}: expected non-empty text")
    negatives = data["negatives"]
    if not isinstance(negatives, list) or not negatives or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise DataError(f"{where}: negatives: expected a non-empty list of texts")
    return [data["query"], data["positive"], *negatives]


def shortlists(retriever: str, queries: list[str], corpus: list[str], device: Any) -> list[list[str]]:
    """Each query's top CANDIDATES documents of `corpus` by the bi-encoder `retriever`, best first."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import semantic_search

    try:
        model = SentenceTransformer(retriever, device=str(device))
    except OSError as e:
        raise CrbError(f"data.retriever: {retriever}: cannot load it ({first_line(e).rstrip('.')})") from e
    hits = semantic_search(model.encode(queries, convert_to_tensor=True, batch_size=64),
                           model.encode(corpus, convert_to_tensor=True, batch_size=64), top_k=CANDIDATES)
    return [[corpus[h["corpus_id"]] for h in found] for found in hits]


def eval_samples(retriever: str, rows: list[Row], corpus: list[str], device: Any) -> list[dict]:
    """The eval rows as CrossEncoderRerankingEvaluator's samples: each query with its positive and the retriever's
    shortlist of `corpus` (`documents`); without a retriever, with the row's own negatives."""
    queries = [str(r["texts"][0]) for r in rows]
    positives = [[str(r["texts"][1])] for r in rows]
    if not retriever:
        return [{"query": q, "positive": p, "negative": [str(t) for t in r["texts"][2:]]}
                for q, p, r in zip(queries, positives, rows, strict=True)]
    found = shortlists(retriever, queries, corpus, device)
    return [{"query": q, "positive": p, "documents": d} for q, p, d in zip(queries, positives, found, strict=True)]


def reranking_scores(model: torch.nn.Module, samples: list[dict], batch_size: int) -> dict[str, float]:
    """nDCG@10 and MRR@10 of the samples reranked by `model` and (retrieval_*) in the retriever's order. A positive
    the retriever missed counts as missed (always_rerank_positives off)."""
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    evaluator = CrossEncoderRerankingEvaluator(samples, at_k=10, always_rerank_positives=False,
                                               batch_size=batch_size, write_csv=False)
    was_training = model.training
    found = evaluator(model)
    model.train(was_training)
    names = {"base_ndcg@10": "retrieval_ndcg@10", "base_mrr@10": "retrieval_mrr@10", "ndcg@10": "ndcg@10",
             "mrr@10": "mrr@10"}
    return {name: float(found[key]) for key, name in names.items() if key in found}


TASK = Rerank()
