"""The retrieval agent (data.format "retrieval"): a sentence-transformers encoder trained contrastively on
`instruction, query, positive, negative` records (MNRL: in-batch negatives, so a step is one pass over the whole
batch); nDCG@10, MRR@10 and Recall@1/10 of held-out queries over a corpus (sentence-transformers'
InformationRetrievalEvaluator)."""

from __future__ import annotations

from collections import Counter

import torch
from transformers import PreTrainedTokenizerBase

from crb.data import Row, retrieval
from crb.data.collate import Batcher, retrieval_batcher
from crb.data.reader import Record, read_records
from crb.losses.contrastive import cached_mnrl, mnrl
from crb.recipe.schema import Bad, ClaraConfig, DataConfig, Recipe
from crb.tasks.base import Loader, Metric, Task, strings


class Retrieval(Task):
    format = "retrieval"
    kind = "embedding"
    auto_class = None
    losses = {"mnrl": mnrl, "cached_mnrl": cached_mnrl}
    default_losses = ("mnrl",)
    demo_prompt = "waterproof boots for hiking in the rain"
    fields = frozenset({"instruction", "query", "positive", "negative"})
    keys = ("data.hard_negatives", "data.corpus", "data.document_instruction")
    whole_batch = True
    compile = True  # Instructor-XL contrastive on an H200: 1.56x SentenceTransformerTrainer's speed compiled
    token_keys = ()  # rows are texts, tokenized batch by batch

    def check_recipe(self, recipe: Recipe, bad: Bad) -> None:
        super().check_recipe(recipe, bad)
        if recipe.method.name not in ("full", "freeze"):
            raise bad("method.name", "expected 'full' or 'freeze' for retrieval (the encoder trains whole)",
                      recipe.method.name)
        if recipe.train.micro_batch not in (recipe.train.batch_size, "auto"):
            raise bad("train.micro_batch", "expected train.batch_size for retrieval: in-batch negatives need the "
                      "whole batch in one pass (cached_mnrl saves the memory)", recipe.train.micro_batch)

    def check(self, rec: Record, cfg: DataConfig, clara_cfg: ClaraConfig | None) -> tuple[list[str], str]:
        """([anchor, positive, negatives...], the query's instruction)."""
        return retrieval.check_triple(rec.data, rec.where()), retrieval.instruction_of(rec.data)

    def make_row(self, checked: tuple[list[str], str], where: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                 template: str, clara_cfg: ClaraConfig | None) -> tuple[Row, int]:
        texts, instruction = checked
        with_prompts = [f"{instruction} {texts[0]}".strip(), *texts[1:]]  # as the encoder will read them
        return retrieval.row(texts, instruction), max(len(ids) for ids in tokenizer(with_prompts)["input_ids"])

    def truncate(self, item: Row, max_length: int) -> Row:
        return item  # the encoder's tokenizer cuts at max_length (model.max_seq_length)

    def texts(self, record: dict) -> dict[str, list[str]]:
        return {k: strings(record.get(k)) for k in ("query", "positive", "negative") if k in record}

    def describe(self, records: list[dict]) -> dict[str, dict]:
        counts = Counter(f"negatives {len(strings(d.get('negative')))}" for d in records)
        return {"per_record": dict(counts.most_common())} if counts else {}

    def batcher(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> Batcher:
        encode = getattr(model, "preprocess", None) or (  # sentence-transformers before 6.1: tokenize, no prompt
            lambda texts, prompt=None: model.tokenize([(prompt or "") + t for t in texts]))
        return retrieval_batcher(encode, recipe.data.hard_negatives, retrieval.prompt(recipe.data.document_instruction))

    def plan_tokens(self, recipe: Recipe, micro_batch: int, length: int) -> tuple[int, int, int]:
        # anchor, positive and hard negatives at once; cached_mnrl: a mini-batch
        cached = [x.options.get("mini_batch_size", 32) for x in recipe.losses if x.name == "cached_mnrl"]
        columns = 1 if cached else 2 + recipe.data.hard_negatives  # GradCache re-runs one column's mini-batch at a time
        rows = min([micro_batch, *cached])
        return rows * columns * length, 0, rows * length  # sentence-transformers encodes each column separately

    def metrics(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, rows: list[Row], all_rows: list[Row]
                ) -> list[Metric]:
        corpus = retrieval.corpus(recipe.data.corpus, all_rows)
        return [lambda model: retrieval_scores(model, rows, corpus, recipe.eval.batch_size,
                                               recipe.data.document_instruction)]

    def verify(self, load: Loader, recipe: dict, prompt: str, max_new_tokens: int, target_lang: str | None = None,
               source_lang: str | None = None, docs: list[str] | None = None) -> str:
        """The prompt's nearest documents in the run's eval corpus, with their scores."""
        return search(load()[0], recipe, prompt)


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


def search(model: torch.nn.Module, recipe: dict, query: str, k: int = 3) -> str:
    """The `k` documents of the run's eval corpus nearest to `query`, a line each with its score."""
    rows = []
    for file in [*recipe["data"]["train"], *recipe["data"].get("eval", [])]:
        rows += [retrieval.row(retrieval.check_triple(r.data, r.where()), retrieval.instruction_of(r.data))
                 for r in read_records(file, recipe["data"].get("columns")) if not isinstance(r, Exception)]
    corpus = retrieval.corpus(recipe["data"].get("corpus", []), rows)
    _, query_prompt = retrieval.anchors(rows[:1])  # the training data's instruction, as training used it
    document_prompt = retrieval.prompt(recipe["data"].get("document_instruction", ""))
    scores = model.similarity(model.encode([query], convert_to_tensor=True, prompt=query_prompt),
                              model.encode(corpus, convert_to_tensor=True, batch_size=64, prompt=document_prompt))[0]
    top = torch.topk(scores, min(k, len(corpus)))
    return "\n".join(f"{s:.3f}  {corpus[i]}" for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True))


TASK = Retrieval()
