"""CLaRa records: stage-1 and stage-2/3 checks with file:line errors, the QA target, building stage-2/3 data."""

from __future__ import annotations

import json

import pytest

from crb.data.clara import build_stage23, check_stage1, check_stage23, main, read_stage1, stage1_target
from crb.data.reader import read_jsonl
from crb.errors import DataError
from tests.conftest import CLARA_SLICE


def stage1(**kw) -> dict:
    rec = {"data_type": "qa", "question": ["Who?", "When?"], "answers": ["Ada", "1843"],
           "docs": ["Ada wrote the notes in 1843."]}
    return {**rec, **kw}


def stage23(**kw) -> dict:
    rec = {"question": "Who?", "docs": ["d0", "d1", "d2"], "answer": "Ada", "pos_index": [1]}
    return {**rec, **kw}


def without(rec: dict, name: str) -> dict:
    return {k: v for k, v in rec.items() if k != name}


def corpus(n: int, per: int = 2) -> list[dict]:
    return [{"doc": f"document {i}", "qa": [(f"q{i}.{j}", f"a{i}.{j}") for j in range(per)]} for i in range(n)]


def test_stage1_happy_path():
    assert check_stage1(stage1(), "f:1") == {"data_type": "qa", "doc": "Ada wrote the notes in 1843.",
                                             "qa": [("Who?", "Ada"), ("When?", "1843")],
                                             "target": "Question: Who?\nAnswer: Ada\nQuestion: When?\nAnswer: 1843"}
    assert check_stage1(stage1(docs=["first", "second"]), "f:1")["doc"] == "first"


def test_stage1_paraphrase_records_target_their_paraphrase_or_the_document():
    doc = "Ada wrote the notes in 1843."
    given = {"data_type": "paraphrase", "docs": [doc], "answers": ["In 1843 Ada wrote the notes."]}
    assert check_stage1(given, "f:1") == {"data_type": "paraphrase", "doc": doc, "qa": [],
                                          "target": "In 1843 Ada wrote the notes."}
    assert check_stage1({"data_type": "paraphrase", "docs": [doc]}, "f:1")["target"] == doc
    with pytest.raises(DataError, match=r"^f:2: answers\[0\]: expected non-empty text$"):
        check_stage1({**given, "answers": [""]}, "f:2")


@pytest.mark.parametrize("rec, message", [
    (without(stage1(), "question"), "f:3: missing field 'question'"),
    (without(stage1(), "answers"), "f:3: missing field 'answers'"),
    (without(stage1(), "docs"), "f:3: missing field 'docs'"),
    (stage1(data_type="summary"), "f:3: data_type: expected 'qa' or 'paraphrase', got 'summary'"),
    (without(stage1(data_type="paraphrase"), "docs"), "f:3: missing field 'docs'"),
    (stage1(question="Who?"), "f:3: question: expected a non-empty list of texts"),
    (stage1(question=[]), "f:3: question: expected a non-empty list of texts"),
    (stage1(question=["Who?", " "]), "f:3: question[1]: expected non-empty text"),
    (stage1(answers=["Ada", 1843]), "f:3: answers[1]: expected non-empty text"),
    (stage1(answers=["Ada", "1843", "x"]), "f:3: answers: expected as many answers as questions (3 vs 2)"),
    (stage1(docs=[]), "f:3: docs: expected a non-empty list of texts"),
    (stage1(docs=[""]), "f:3: docs[0]: expected non-empty text"),
])
def test_stage1_errors(rec, message):
    with pytest.raises(DataError) as e:
        check_stage1(rec, "f:3")
    assert str(e.value) == message


def test_stage1_target():
    target = "Question: Who?\nAnswer: Ada\nQuestion: When?\nAnswer: 1843"
    assert stage1_target([("Who?", "Ada"), ("When?", "1843")]) == target
    assert stage1_target([("Who?", "Ada")]) == "Question: Who?\nAnswer: Ada"


def test_stage23_happy_path():
    rec = stage23(extra="ignored", pos_index=[2, 0])
    assert check_stage23(rec, "f:1") == {"question": "Who?", "docs": ["d0", "d1", "d2"], "answer": "Ada",
                                         "pos_index": [2, 0]}


@pytest.mark.parametrize("rec, message", [
    (without(stage23(), "question"), "f:4: missing field 'question'"),
    (without(stage23(), "pos_index"), "f:4: missing field 'pos_index'"),
    (stage23(question=""), "f:4: question: expected non-empty text"),
    (stage23(answer=["Ada"]), "f:4: answer: expected non-empty text"),
    (stage23(docs="d0"), "f:4: docs: expected a non-empty list of texts"),
    (stage23(docs=["d0", None]), "f:4: docs[1]: expected non-empty text"),
    (stage23(pos_index=[]), "f:4: pos_index: expected a non-empty list of document indices"),
    (stage23(pos_index=1), "f:4: pos_index: expected a non-empty list of document indices"),
    (stage23(pos_index=[0, "1"]), 'f:4: pos_index[1]: expected an integer, got "1"'),
    (stage23(pos_index=[True]), "f:4: pos_index[0]: expected an integer, got true"),
    (stage23(pos_index=[1.0]), "f:4: pos_index[0]: expected an integer, got 1.0"),
    (stage23(pos_index=[3]), "f:4: pos_index[0]: 3 is out of range for 3 docs (0..2)"),
    (stage23(pos_index=[0, -1]), "f:4: pos_index[1]: -1 is out of range for 3 docs (0..2)"),
    (stage23(pos_index=[2, 0, 2]), "f:4: pos_index: index 2 appears more than once"),
])
def test_stage23_errors(rec, message):
    with pytest.raises(DataError) as e:
        check_stage23(rec, "f:4")
    assert str(e.value) == message


def test_errors_name_file_and_line(tmp_path):
    f = tmp_path / "clara.jsonl"
    f.write_text(json.dumps(stage1()) + "\n\n" + json.dumps(stage1(answers=["Ada"])) + "\n"
                 + json.dumps(stage23(pos_index=[5])) + "\n")
    recs = list(read_jsonl(f))
    assert check_stage1(recs[0].data, recs[0].where())["qa"][0] == ("Who?", "Ada")
    with pytest.raises(DataError) as e:
        check_stage1(recs[1].data, recs[1].where())
    assert str(e.value) == f"{f}:3: answers: expected as many answers as questions (1 vs 2)"
    with pytest.raises(DataError) as e:
        check_stage23(recs[2].data, recs[2].where())
    assert str(e.value) == f"{f}:4: pos_index[0]: 5 is out of range for 3 docs (0..2)"
    with pytest.raises(DataError) as e:
        read_stage1(f)
    assert str(e.value) == f"{f}:3: answers: expected as many answers as questions (1 vs 2)"


def test_build_is_deterministic():
    recs = corpus(30)
    assert build_stage23(recs, 5, 0) == build_stage23(recs, 5, 0)
    assert build_stage23(recs, 5, 0) != build_stage23(recs, 5, 1)


def test_build_records():
    recs = corpus(30, per=3)
    out = build_stage23(recs, 5, 7)
    assert len(out) == 90
    own = {q: r["doc"] for r in recs for q, _ in r["qa"]}
    for r in out:
        assert check_stage23(r, "built") == r
        assert len(r["docs"]) == 5
        assert len(set(r["docs"])) == 5
        assert r["pos_index"] == [r["docs"].index(own[r["question"]])]
        assert r["answer"] == "a" + r["question"][1:]
    assert len({r["pos_index"][0] for r in out}) > 1  # the own document is not always in one slot


def test_build_document_counts():
    recs = corpus(4)
    assert all(len(r["docs"]) == 4 and len(set(r["docs"])) == 4 for r in build_stage23(recs, 4, 0))
    assert [r["docs"] for r in build_stage23(recs, 1, 0)] == [[r["doc"]] for r in recs for _ in r["qa"]]
    with pytest.raises(DataError) as e:
        build_stage23(recs, 5, 0)
    assert str(e.value) == "--docs: 5 documents per record need at least 5 distinct documents, the data has 4"
    with pytest.raises(DataError) as e:
        build_stage23(recs, 0, 0)
    assert str(e.value) == "--docs: expected at least 1 document per record, got 0"
    assert build_stage23([], 5, 0) == []


def test_build_skips_duplicate_documents():
    recs = corpus(6) + [{"doc": "document 0", "qa": [("again", "yes")]}]
    for r in build_stage23(recs, 6, 0):
        assert len(set(r["docs"])) == 6


def test_cli(tmp_path, capsys):
    src, dst = tmp_path / "s1.jsonl", tmp_path / "out" / "s23.jsonl"
    src.write_text("".join(json.dumps(stage1(docs=[f"doc {i}"])) + "\n" for i in range(6)))
    assert main(["build-stages", str(src), str(dst), "--docs", "3", "--seed", "1"]) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(out) == 12 and all(len(r["docs"]) == 3 for r in out)
    assert f"wrote 12 records to {dst}" in capsys.readouterr().out

    src.write_text(json.dumps(stage1()) + "\n" + json.dumps(stage1(docs="x")) + "\n")
    assert main(["build-stages", str(src), str(dst)]) == 2
    assert capsys.readouterr().err == f"crb: error: {src}:2: docs: expected a non-empty list of texts\n"

    assert main(["build-stages", str(tmp_path / "missing.jsonl"), str(dst)]) == 2
    assert capsys.readouterr().err == f"crb: error: {tmp_path / 'missing.jsonl'}: No such file or directory\n"


def test_real_stage1_records_give_one_stage23_record_per_question():
    """The reference repository's own stage-1 records (64 of them): each read as its first document and its
    (question, answer) pairs; stage 2/3 has one record per question, its own document among 4 others."""
    raw = [json.loads(line) for line in CLARA_SLICE.read_text().splitlines()]
    recs = read_stage1(CLARA_SLICE)
    assert len(recs) == len(raw) == 64
    for rec, d in zip(recs, raw, strict=True):
        assert rec["doc"] == d["docs"][0] and rec["qa"] == list(zip(d["question"], d["answers"], strict=True))
    out = build_stage23(recs, 5, 0)
    expected = [(q, a, d["docs"][0]) for d in raw for q, a in zip(d["question"], d["answers"], strict=True)]
    assert len(out) == len(expected) == 504
    for r, (question, answer, own) in zip(out, expected, strict=True):
        assert (r["question"], r["answer"]) == (question, answer)
        assert len(r["docs"]) == 5 and len(set(r["docs"])) == 5
        assert r["docs"][r["pos_index"][0]] == own and r["docs"].count(own) == 1
    assert build_stage23(recs, 5, 0) == out and build_stage23(recs, 5, 1) != out  # seeded
