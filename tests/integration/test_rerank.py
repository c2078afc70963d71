"""The reranker agent: the pretrained all-MiniLM-L6-v2 as a sentence-transformers CrossEncoder (a fresh score head),
trained with the library's cross-encoder losses in crb's loop to reorder a bi-encoder's top 20. Real data, subsampled
for CPU: the reranking records made from the shipped retail search data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crb.artifacts import verify
from crb.errors import DataError
from crb.recipe import schema as recipes
from crb.run import make_batcher, run
from crb.tasks import LOSSES, TASKS, prepare
from crb.tasks.rerank import CANDIDATES, check_record
from tests.conftest import DEMO_DATA, subsample, write_jsonl, write_recipe

ROOT = Path(__file__).resolve().parents[2]


def rerank_recipe(tmp_path: Path, model: str, train: Path, evals: Path, extra: str = "") -> Path:
    return write_recipe(tmp_path / "r.toml", f"""
[model]
name = "{model}"
[method]
name = "full"
[data]
format = "rerank"
train = ["{train}"]
eval = ["{evals}"]
max_length = 96
hard_negatives = 1
cache_dir = "{tmp_path / 'cache'}"
{extra}
[train]
lr = 1e-4
scheduler = "constant"
batch_size = 8
micro_batch = 8
log_every = 5
report_to = []
[eval]
batch_size = 64
[[losses]]
name = "rerank_mnrl"
options = {{ num_negatives = 2 }}
[output]
dir = "{tmp_path / 'out'}"
""")


def test_record_shapes_and_errors():
    assert check_record({"query": "q", "positive": "p", "negatives": ["a", "b"]}, "f:1") == ["q", "p", "a", "b"]
    with pytest.raises(DataError, match=r"^f:2: missing field 'negatives'$"):
        check_record({"query": "q", "positive": "p", "negative": "a"}, "f:2")  # the retrieval format's field
    with pytest.raises(DataError, match=r"^f:3: negatives: expected a non-empty list of texts$"):
        check_record({"query": "q", "positive": "p", "negatives": []}, "f:3")
    with pytest.raises(DataError, match=r"^f:4: negatives: expected a non-empty list of texts$"):
        check_record({"query": "q", "positive": "p", "negatives": "a"}, "f:4")
    with pytest.raises(DataError, match=r"^f:5: query: expected non-empty text$"):
        check_record({"query": " ", "positive": "p", "negatives": ["a"]}, "f:5")


def test_a_record_without_negatives_names_its_file_line_and_field(tmp_path, minilm):
    good = {"query": "red shoes", "positive": "Red shoes.", "negatives": ["Blue shoes."]}
    data = write_jsonl(tmp_path / "r.jsonl", [good, {"query": "q", "positive": "p"}])
    r = recipes.load(rerank_recipe(tmp_path, minilm, data, data), tasks=TASKS)
    tokenizer = TASKS["rerank"].encoder(minilm, device="cpu").tokenizer
    with pytest.raises(DataError, match=rf"^{data}:2: missing field 'negatives'$"):
        prepare(r.data, tokenizer, 0)


def test_batches_pair_each_query_with_its_positive_first_and_the_fewest_negatives(tmp_path, minilm):
    records = [{"query": "q1", "positive": "p1", "negatives": ["n1", "n2", "n3", "n4"]},
               {"query": "q2", "positive": "p2", "negatives": ["n5", "n6"]}]
    data = write_jsonl(tmp_path / "r.jsonl", records)
    r = recipes.load(rerank_recipe(tmp_path, minilm, data, data), ["data.hard_negatives=3"], tasks=TASKS)
    model = TASKS["rerank"].encoder(minilm, device="cpu")
    train, _, _ = prepare(r.data, model.tokenizer, 0)
    batcher = make_batcher(r, model.tokenizer, model)
    one = batcher.collate(train[:1])
    assert one["queries"] == ["q1"] and one["docs"] == [["p1", "n1", "n2", "n3"]]  # at most data.hard_negatives
    both = batcher.collate(train)
    assert both["docs"] == [["p1", "n1", "n2"], ["p2", "n5", "n6"]]  # as many as the poorest record has
    assert batcher.count(both) == 2
    pairs = model.tokenizer(["q1"] * 3 + ["q2"] * 3, [d for g in both["docs"] for d in g])["input_ids"]
    assert batcher.tokens(both) == sum(map(len, pairs))  # [CLS] query [SEP] document [SEP], every pair


@pytest.mark.parametrize("loss", TASKS["rerank"].allowed_losses)
def test_each_loss_falls_on_a_small_slice(loss, minilm):
    records = [json.loads(line) for line in (DEMO_DATA / "retail_rerank_train.jsonl").read_text().splitlines()[:8]]
    batch = {"queries": [r["query"] for r in records], "docs": [[r["positive"], *r["negatives"][:2]] for r in records],
             "n_rows": len(records)}
    torch.manual_seed(0)
    model = TASKS["rerank"].encoder(minilm, device="cpu")
    model.max_seq_length = 64
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    values = []
    for _ in range(5):
        value = LOSSES[loss](model, batch, torch.tensor(len(records)))
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append(value.item())
    assert values[-1] < values[0] - 0.05, values


def test_training_lifts_the_reranking_of_the_retrievers_top_20(tmp_path, minilm):
    """Held-out retail queries: the MiniLM bi-encoder's top 20 of the catalogue, reordered by the cross-encoder.
    Retrieval's own figures do not move; the reranker's rise with training (its score head starts random)."""
    from sentence_transformers.cross_encoder import CrossEncoder

    train = subsample(DEMO_DATA / "retail_rerank_train.jsonl", tmp_path / "train.jsonl", 200)
    evals = subsample(DEMO_DATA / "retail_rerank_eval.jsonl", tmp_path / "eval.jsonl", 20)
    corpus = DEMO_DATA / "retail_search_corpus.jsonl"
    path = rerank_recipe(tmp_path, minilm, train, evals, f'retriever = "{minilm}"\ncorpus = ["{corpus}"]')
    final = run(str(path), ["train.max_steps=15", "train.lr=2e-4"])
    before, after = final["baseline"], final
    assert {"retrieval_ndcg@10", "retrieval_mrr@10", "ndcg@10", "mrr@10"} <= after.keys()
    assert after["retrieval_ndcg@10"] == before["retrieval_ndcg@10"] > 0.3  # the retriever does not train
    assert after["ndcg@10"] > before["ndcg@10"] + 0.1, (before, after)
    assert after["eval_loss"] < before["eval_loss"]
    model = CrossEncoder(str(tmp_path / "out" / "final_model"), device="cpu")  # no crb needed
    assert model.predict([("waterproof boots", "A waterproof hiking boot.")]).shape == (1,)
    lines = verify(tmp_path / "out", "waterproof boots for hiking in the rain").splitlines()
    assert len(lines) == 3 and all("(retrieval #" in line for line in lines)
    assert all(1 <= int(line.split("#")[1].split(")")[0]) <= CANDIDATES for line in lines)


def test_the_demo_recipe_points_the_retriever_at_the_shipped_minilm(minilm):
    r = recipes.load(ROOT / "recipes" / "demo" / "reranker.toml", tasks=TASKS)
    assert r.data.format == "rerank" and r.model.name == r.data.retriever == str(Path(minilm).resolve())
