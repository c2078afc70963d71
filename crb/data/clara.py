"""CLaRa records (docs/clara.md): stage 1 `{"data_type": "qa", "question": [...], "answers": [...],
"docs": [...]}` (one document, its questions and answers) or `{"data_type": "paraphrase", "docs": [...],
"answers": [paraphrase]}` (the document to restate; without "answers", the document itself); stages 2 and 3
`{"question", "docs", "answer", "pos_index"}` (pos_index: which docs are gold; the docs are the N candidates of
stage 3, stage 2 reads the gold ones and others drawn at random up to top_k). `build_stage23` makes stage-2/3 records
from stage-1 ones, the negatives the BM25-nearest documents of other records:

    python -m crb.data.clara build-stages IN.jsonl OUT.jsonl --docs 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from crb.data.reader import read_jsonl
from crb.errors import CrbError, DataError


def _require(data: dict, where: str, name: str) -> Any:
    if name not in data:
        raise DataError(f"{where}: missing field '{name}'")
    return data[name]


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {name}: expected non-empty text")
    return value


def _texts(value: Any, where: str, name: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {name}: expected a non-empty list of texts")
    return [_text(v, where, f"{name}[{i}]") for i, v in enumerate(value)]


def check_stage1(data: dict, where: str) -> dict:
    """{"data_type", "doc": the first document, "qa": [(question, answer), ...], "target": the decoder's target}
    of a stage-1 record, or a DataError. "qa": the QA pairs, one after another (`stage1_target`); "paraphrase":
    no QA pairs, the target is answers[0] (a paraphrase of the document, as the reference reads it) or, without
    answers, the document itself."""
    kind = data.get("data_type", "qa")
    if kind not in ("qa", "paraphrase"):
        raise DataError(f"{where}: data_type: expected 'qa' or 'paraphrase', got {kind!r}")
    docs = _texts(_require(data, where, "docs"), where, "docs")
    if kind == "paraphrase":
        target = _texts(data["answers"], where, "answers")[0] if "answers" in data else docs[0]
        return {"data_type": kind, "doc": docs[0], "qa": [], "target": target}
    questions = _texts(_require(data, where, "question"), where, "question")
    answers = _texts(_require(data, where, "answers"), where, "answers")
    if len(answers) != len(questions):
        raise DataError(f"{where}: answers: expected as many answers as questions ({len(answers)} vs {len(questions)})")
    qa = list(zip(questions, answers, strict=True))
    return {"data_type": kind, "doc": docs[0], "qa": qa, "target": stage1_target(qa)}


def stage1_target(qa: list[tuple[str, str]]) -> str:
    """The stage-1 QA target: every "Question: q\\nAnswer: a", one after another on new lines."""
    return "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in qa)


def check_stage23(data: dict, where: str) -> dict:
    """{"question", "docs", "answer", "pos_index"} of a stage-2/3 record, or a DataError."""
    question = _text(_require(data, where, "question"), where, "question")
    docs = _texts(_require(data, where, "docs"), where, "docs")
    answer = _text(_require(data, where, "answer"), where, "answer")
    pos = _require(data, where, "pos_index")
    if not isinstance(pos, list) or not pos:
        raise DataError(f"{where}: pos_index: expected a non-empty list of document indices")
    for i, p in enumerate(pos):
        if isinstance(p, bool) or not isinstance(p, int):
            raise DataError(f"{where}: pos_index[{i}]: expected an integer, got {json.dumps(p)}")
        if not 0 <= p < len(docs):
            raise DataError(f"{where}: pos_index[{i}]: {p} is out of range for {len(docs)} docs (0..{len(docs) - 1})")
    if len(set(pos)) != len(pos):
        dup = next(p for i, p in enumerate(pos) if p in pos[:i])
        raise DataError(f"{where}: pos_index: index {dup} appears more than once")
    return {"question": question, "docs": docs, "answer": answer, "pos_index": list(pos)}


def instruction_docs(n_docs: int, gold: list[int], top_k: int, key: str) -> list[int]:
    """The candidates stage 2 reads, in record order: the gold ones (the first top_k of them) and others drawn at
    random, top_k in all; `key` (the question) seeds the draw, so a record reads the same ones every epoch. Drawn,
    not the first others: with those, a gold candidate past them sat in the last slot 80 % of the time (N = 20,
    k = 5) and the decoder learned the slot instead of reading the documents."""
    keep = set(gold[:top_k])
    others = [i for i in range(n_docs) if i not in keep]
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
    return sorted([*keep, *(int(i) for i in rng.choice(others, top_k - len(keep), replace=False))])


def import_bm25s() -> Any:
    """bm25s, with JAX kept off the GPU: bm25s tries JAX at import for its top-k, and JAX then takes 75 % of the
    GPU's memory for itself, which the training that follows runs out of (a user's own JAX_PLATFORMS is kept)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bm25s

    return bm25s


def build_stage23(stage1_records: list[dict], n_docs: int, seed: int) -> list[dict]:
    """One stage-2/3 record per (question, answer) of each stage-1 record (as `read_stage1` returns them): n_docs
    candidate documents, its own (gold) and the n_docs - 1 distinct documents of the other records that BM25
    (bm25s) ranks nearest to the question: hard negatives, ties (such as documents sharing no word with it) in a
    seeded random order. The candidates are shuffled; pos_index is where the gold one landed. The same inputs
    and seed give the same records."""
    bm25s = import_bm25s()

    if n_docs < 1:
        raise DataError(f"--docs: expected at least 1 document per record, got {n_docs}")
    unique = list(dict.fromkeys(r["doc"] for r in stage1_records))
    if stage1_records and len(unique) < n_docs:
        where = f"{stage1_records[0]['where']}: " if "where" in stage1_records[0] else ""
        raise DataError(f"{where}--docs: {n_docs} documents per record need at least {n_docs} distinct documents, "
                        f"the data has {len(unique)}")
    if not stage1_records:
        return []
    index = {doc: i for i, doc in enumerate(unique)}
    bm25 = bm25s.BM25()
    bm25.index(bm25s.tokenize(unique, stopwords="en", show_progress=False), show_progress=False)
    rng = np.random.default_rng(seed)
    out = []
    for r in stage1_records:
        own = index[r["doc"]]
        questions = [q for q, _ in r["qa"]]
        for (question, answer), words in zip(r["qa"], bm25s.tokenize(questions, stopwords="en", return_ids=False,
                                                                     show_progress=False), strict=True):
            scores = bm25.get_scores(words) if words else np.zeros(len(unique))
            ranked = np.lexsort((rng.random(len(unique)), -scores))  # best first; ties at random
            others = [int(i) for i in ranked if i != own][: n_docs - 1]
            docs = [unique[own], *(unique[i] for i in others)]
            order = rng.permutation(n_docs)
            out.append({"question": question, "docs": [docs[i] for i in order], "answer": answer,
                        "pos_index": [int(np.flatnonzero(order == 0)[0])]})
    return out


def read_stage1(path: str | Path) -> list[dict]:
    """Every record of a stage-1 file, checked, with its file:line ("where"); the first malformed one raises its
    DataError."""
    records = []
    for rec in read_jsonl(path):
        if isinstance(rec, DataError):
            raise rec
        records.append({**check_stage1(rec.data, rec.where()), "where": rec.where()})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crb.data.clara", description="CLaRa data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-stages", help="build stage-2/3 records (question, docs, answer, pos_index) "
                                            "from a stage-1 file")
    b.add_argument("input", help="stage-1 JSON Lines file")
    b.add_argument("output", help="stage-2/3 JSON Lines file to write")
    b.add_argument("--docs", type=int, default=20, help="candidate documents per record (N), the question's own "
                                                        "included, the rest BM25-nearest (default: 20)")
    b.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    args = parser.parse_args(argv)
    try:
        records = build_stage23(read_stage1(args.input), args.docs, args.seed)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    except CrbError as e:
        print(f"crb: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"crb: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} records to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
