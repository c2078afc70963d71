"""CLaRa stage-2/3 candidates: N documents per question, its own (gold) among them, the others the BM25-nearest
documents of other records; stage 2 reads the gold ones and the first others up to top_k."""

from __future__ import annotations

import json
import os
import re

import pytest

from crb.data.clara import build_stage23, check_stage23, instruction_docs, main, read_stage1
from crb.data.reader import Record
from crb.errors import DataError
from crb.recipe.schema import ClaraConfig, DataConfig
from crb.tasks import check_record
from tests.conftest import CLARA_SLICE

COLOURS = ["red", "blue", "green", "black", "white", "grey", "pink", "brown"]
ITEMS = ["boot", "coat", "shirt", "scarf", "glove", "dress"]


def catalogue() -> list[dict]:
    """48 products: each shares its colour with 5 others and its item with 7 others."""
    return [{"doc": f"The {c} {i} is in stock.", "qa": [(f"Is the {c} {i} in stock?", "yes")]}
            for c in COLOURS for i in ITEMS]


def test_gold_is_among_the_n_candidates_once_and_no_document_twice():
    recs = catalogue()
    out = build_stage23(recs, 20, 0)
    assert len(out) == len(recs)
    for r, rec in zip(out, recs, strict=True):
        assert check_stage23(r, "built") == r
        assert len(r["docs"]) == 20 and len(set(r["docs"])) == 20
        assert r["docs"][r["pos_index"][0]] == rec["doc"] and r["docs"].count(rec["doc"]) == 1
    assert len({r["pos_index"][0] for r in out}) > 5  # the gold document lands in varied slots


def test_negatives_are_the_lexically_nearest_documents():
    """With 6 negatives, "the red boot" gets the 5 other red products and the 7 other boots before anything
    sharing neither word: every negative shares its colour or its item."""
    for r in build_stage23(catalogue(), 7, 0):
        colour, item = r["question"].split()[2:4]
        negatives = [d for i, d in enumerate(r["docs"]) if i not in r["pos_index"]]
        assert all(colour in d or item.rstrip("?") in d for d in negatives), r


def test_nearest_first_then_the_rest_at_random():
    """A question sharing a rare word with one document gets that document; the documents sharing no word
    fill up in a seeded random order."""
    recs = [{"doc": "zebra striped mug", "qa": [("zebra?", "a mug")]}, {"doc": "zebra print rug", "qa": []},
            *({"doc": f"plain item {i}", "qa": []} for i in range(30))]
    out = build_stage23(recs, 3, 0)
    assert len(out) == 1 and "zebra print rug" in out[0]["docs"]
    assert {d for r in [build_stage23(recs, 3, s)[0] for s in range(6)] for d in r["docs"]} > {
        "zebra striped mug", "zebra print rug"}  # the third is random among the rest


def test_deterministic_with_the_seed():
    recs = catalogue()
    assert build_stage23(recs, 20, 3) == build_stage23(recs, 20, 3)
    assert build_stage23(recs, 20, 3) != build_stage23(recs, 20, 4)


def test_too_few_documents_is_a_one_line_error_naming_the_file(tmp_path):
    f = tmp_path / "s1.jsonl"
    f.write_text("".join(json.dumps({"data_type": "qa", "question": ["q?"], "answers": ["a"],
                                     "docs": [f"document {i}"]}) + "\n" for i in range(4)))
    with pytest.raises(DataError) as e:
        build_stage23(read_stage1(f), 20, 0)
    assert str(e.value) == (f"{f}:1: --docs: 20 documents per record need at least 20 distinct documents, "
                            "the data has 4")
    assert main(["build-stages", str(f), str(tmp_path / "out.jsonl")]) == 2  # the default N is 20


def test_cli_default_is_20_candidates(tmp_path):
    dst = tmp_path / "s23.jsonl"
    assert main(["build-stages", str(CLARA_SLICE), str(dst)]) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(out) == 504 and all(len(r["docs"]) == 20 for r in out)


def test_real_records_negatives_share_more_words_with_the_question_than_the_rest():
    """The reference's own records: the 19 negatives of a question share more of its words (4+ letters) with it,
    on average, than the documents left out."""
    recs = read_stage1(CLARA_SLICE)
    unique = list(dict.fromkeys(r["doc"] for r in recs))

    def shared(question: str, doc: str) -> int:
        return len({w for w in re.findall(r"\w{4,}", question.lower())} & set(re.findall(r"\w{4,}", doc.lower())))

    chosen, rest = [], []
    for r in build_stage23(recs, 20, 0):
        negatives = {d for i, d in enumerate(r["docs"]) if i not in r["pos_index"]}
        chosen += [shared(r["question"], d) for d in negatives]
        rest += [shared(r["question"], d) for d in unique if d not in negatives and d not in r["docs"]]
    assert sum(chosen) / len(chosen) > 2 * sum(rest) / len(rest)


@pytest.mark.parametrize("n, gold, k", [(20, [13], 5), (20, [0], 5), (20, [19, 2], 5), (5, [4], 5), (20, [9, 8, 7], 2)])
def test_instruction_docs_keep_the_gold_ones_and_draw_the_rest(n, gold, k):
    keep = instruction_docs(n, gold, k, "which code has the red boot ?")
    assert keep == sorted(set(keep)) and len(keep) == k and all(0 <= i < n for i in keep)
    assert set(gold[:k]) <= set(keep)
    assert keep == instruction_docs(n, gold, k, "which code has the red boot ?")  # the same every epoch


def test_the_gold_document_is_as_likely_in_any_slot_stage_2_reads():
    # with the first others instead of drawn ones the gold one is in the last slot 80 % of the time (N 20, k 5):
    # a decoder then learns the slot rather than reading the documents
    slots = [0] * 5
    for q in range(2000):
        gold = q % 20
        slots[instruction_docs(20, [gold], 5, f"question {q}").index(gold)] += 1
    assert all(300 < s < 500 for s in slots), slots


def test_stage2_reads_top_k_with_the_gold_and_stage3_all_candidates():
    docs = [f"d{i}" for i in range(20)]
    rec = Record({"question": "q?", "docs": docs, "answer": "a", "pos_index": [13]}, "f.jsonl", 7)
    data = DataConfig(format="clara", train=["f.jsonl"])
    two = check_record(rec, data, ClaraConfig(phase="instruction", top_k=5))
    keep = instruction_docs(20, [13], 5, "q?")
    assert two["docs"] == [f"d{i}" for i in keep] and two["gold"] == [keep.index(13)] and two["slots"] == 5
    three = check_record(rec, data, ClaraConfig(phase="end_to_end", top_k=5))
    assert three["docs"] == docs and three["gold"] == [13] and three["slots"] == 5
    with pytest.raises(DataError, match=r"^f.jsonl:7: docs: expected at least clara.top_k \(5\) documents, got 4"):
        check_record(Record({**rec.data, "docs": docs[:4], "pos_index": [1]}, "f.jsonl", 7), data,
                     ClaraConfig(phase="end_to_end", top_k=5))


def test_stage3_records_must_all_carry_the_same_number_of_candidates(tmp_path):
    """Stage 3 stacks every record's candidates into one tensor: a record with another count is an error that
    names it and the first record, not a shape error (or a silent mix-up) inside the model."""
    from transformers import AutoTokenizer

    from crb.tasks import prepare
    from tests.conftest import ROOT

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "crb" / "demo_data" / "tiny-mistral")
    rec = {"question": "Which shoe fits flat feet?", "answer": "The Striden trail shoe.", "pos_index": [1]}
    rows = [{**rec, "docs": [f"doc {i}" for i in range(n)]} for n in (6, 6, 5)]
    path = tmp_path / "s3.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(format="clara", train=[str(path)], eval_split=0.0, cache_dir=str(tmp_path / "cache"))
    clara = ClaraConfig(phase="end_to_end", top_k=2)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: docs: 5 candidate documents, 6 at "
                                        rf"{re.escape(str(path))}:1: stage 3 needs the same number"):
        prepare(data, tokenizer, 0, clara)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    train, _, _ = prepare(data, tokenizer, 0, clara)
    assert len(train) == 2


def test_building_candidates_keeps_jax_off_the_gpu(monkeypatch):
    """bm25s tries JAX at import, and JAX on a GPU takes 75 % of its memory (a GPU run beside it went out of
    memory): crb's import sets JAX_PLATFORMS=cpu unless the user set it."""
    from crb.data.clara import import_bm25s

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    import_bm25s()
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    import_bm25s()
    assert os.environ["JAX_PLATFORMS"] == "cuda"
