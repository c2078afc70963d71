"""Prepared data (crb.data.prepared, issue 19): the rows memory-mapped from the Arrow cache equal the rows the
formats make record by record, for every format; a second prepare reads the cache without tokenizing; ids are
stored in the vocabulary's smallest integer type; worker processes change nothing, errors keep their file:line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

import crb.data
from crb.data import prepare
from crb.data.chatml import chat_template
from crb.data.packing import one_per_row, pack
from crb.data.prepared import Rows, Tokenize
from crb.data.reader import read_records
from crb.engine.plan import data_facts
from crb.errors import DataError
from crb.recipe.schema import ClaraConfig, DataConfig
from crb.tasks import get_task
from tests.conftest import CLARA_SLICE, DEMO_DATA, chat_records, translation_records, write_jsonl


def record_rows(cfg: DataConfig, tokenizer, clara: ClaraConfig | None = None) -> list[dict]:
    """The rows as crb made them before the Arrow cache: each record through its format, then packed or not."""
    task = get_task(cfg.format)
    template = chat_template(tokenizer, cfg.chat_template)
    items = []
    for file in cfg.train:
        for rec in read_records(file, cfg.columns):
            made = task.make_row(task.check(rec, cfg, clara), rec.where(), cfg, tokenizer, template, clara)
            if made is not None:
                items.append(task.truncate(made[0], cfg.max_length) if made[1] > cfg.max_length else made[0])
    if not task.packable:
        return items
    return pack(items, cfg.max_length) if cfg.packing else one_per_row(items)


def assert_same(got, want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w)
        for k in w:
            assert g[k].dtype.kind == np.asarray(w[k]).dtype.kind, k
            assert g[k].tolist() == np.asarray(w[k]).tolist(), k


def data(tmp_path: Path, files: list[Path], **kw) -> DataConfig:
    return DataConfig(train=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("fmt, packing", [("chatml", False), ("chatml", True), ("text", False), ("text", True)])
def test_causal_rows_equal_the_record_by_record_rows(tmp_path, tiny_tokenizer, fmt, packing):
    records = chat_records(50)
    if fmt == "text":
        records = [{"text": " ".join(m["content"] for m in r["messages"])} for r in records]
    cfg = data(tmp_path, [write_jsonl(tmp_path / "d.jsonl", records)], format=fmt, packing=packing, max_length=40)
    train, _, report = prepare(cfg, tiny_tokenizer, 0, task=get_task(fmt))
    assert isinstance(train, Rows)
    assert_same(train, record_rows(cfg, tiny_tokenizer))
    assert report.truncated > 0  # some records were cut to max_length: cut in the workers as before
    assert report.train_tokens == sum(len(r["input_ids"]) for r in train)
    assert report.target_tokens == sum(int((r["labels"][1:] != -100).sum()) for r in train)
    assert data_facts(train, fmt) == data_facts(list(train), fmt)
    assert_same(train[1::3], list(train)[1::3])
    assert_same(train[-2:], list(train)[-2:])


def test_translation_rows(tmp_path, tiny_nllb):
    tok = AutoTokenizer.from_pretrained(tiny_nllb)
    cfg = data(tmp_path, [write_jsonl(tmp_path / "p.jsonl", translation_records() * 2)], format="translation",
               source_lang="eng_Latn", target_langs=["fra_Latn"], max_length=12)
    train, _, report = prepare(cfg, tok, 0, task=get_task("translation"))
    assert_same(train, record_rows(cfg, tok))
    assert report.other_directions == 16 and len(train) == 16
    assert str(train[0]["target_text"][0]) == translation_records()[0]["target_text"]


def test_retrieval_rows(tmp_path, tiny_tokenizer):
    records = [{"query": f"red shoes {i}", "positive": f"p{i}", "negative": [f"n{i}", "m"][: i % 3]}
               for i in range(9)]
    records[4]["instruction"] = "Represent the query:"
    cfg = data(tmp_path, [write_jsonl(tmp_path / "r.jsonl", records)], format="retrieval")
    train, _, _ = prepare(cfg, tiny_tokenizer, 0, task=get_task("retrieval"))
    assert_same(train, record_rows(cfg, tiny_tokenizer))
    assert train[4]["instruction"].tolist() == ["Represent the query:"]
    assert train[0]["texts"].tolist() == ["red shoes 0", "p0"]


@pytest.mark.parametrize("phase", ["compression", "end_to_end"])
def test_clara_rows(tmp_path, phase):
    tok = AutoTokenizer.from_pretrained(DEMO_DATA / "tiny-mistral")
    clara = ClaraConfig(phase=phase, top_k=2, doc_max_length=32, compress_rate=8)
    if phase == "compression":
        path = CLARA_SLICE
    else:
        rec = {"question": "Which shoe fits flat feet?", "answer": "The Striden trail shoe.", "pos_index": [1]}
        path = write_jsonl(tmp_path / "s3.jsonl", [{**rec, "docs": [f"doc {i} of {j}" for i in range(4)]}
                                                    for j in range(5)])
    cfg = data(tmp_path, [path], format="clara", max_length=256)
    train, _, _ = prepare(cfg, tok, 0, clara, task=get_task("clara"))
    assert_same(train, record_rows(cfg, tok, clara))


def test_second_prepare_memory_maps_the_cache_without_tokenizing(tmp_path, tiny_tokenizer, monkeypatch):
    cfg = data(tmp_path, [write_jsonl(tmp_path / "c.jsonl", chat_records(300))], format="chatml", eval_split=0.1)
    train, evals, report = prepare(cfg, tiny_tokenizer, 0, task=get_task("chatml"))
    want = [r["input_ids"].tolist() for r in train]

    def no(*_args, **_kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(Tokenize, "__call__", no)
    monkeypatch.setattr(Tokenize, "one", no)
    before = pa.total_allocated_bytes()
    again, again_eval, again_report = prepare(cfg, tiny_tokenizer, 0, task=get_task("chatml"))
    table = again.docs.table
    assert pa.total_allocated_bytes() - before < table.nbytes / 20  # the ids stay in the mapped file
    assert table.schema.field("input_ids").type == pa.list_(pa.uint16())  # a 400-token vocabulary
    assert table.schema.field("labels").type == pa.list_(pa.int16())  # IGNORE = -100
    assert again[0]["input_ids"].dtype == np.int64  # widened on access
    assert [r["input_ids"].tolist() for r in again] == want and len(again_eval) == len(evals) == 30
    assert list(again_report.train_sources) == list(report.train_sources)
    assert len(again + again_eval) == 300 and (again + again_eval)[270]["labels"].tolist() == \
        again_eval[0]["labels"].tolist()


def test_worker_processes_make_the_same_rows_and_name_the_first_bad_record(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(crb.data, "BATCH", 10)  # 4 map batches: two processes get two each
    path = write_jsonl(tmp_path / "c.jsonl", chat_records(40))
    one = data(tmp_path, [path], format="chatml", packing=True, max_length=64, num_proc=1)
    rows_one, _, report_one = prepare(one, tiny_tokenizer, 0, task=get_task("chatml"))
    two = dataclasses.replace(one, num_proc=2, cache_dir=str(tmp_path / "cache2"))
    rows_two, _, report_two = prepare(two, tiny_tokenizer, 0, task=get_task("chatml"))
    assert len(list((tmp_path / "cache2").glob("*/docs_0000?_of_00002.arrow"))) == 2  # two workers wrote
    assert_same(rows_two, list(rows_one))
    assert list(report_two.train_sources) == list(report_one.train_sources)
    lines = path.read_text().splitlines()
    lines[33], lines[26] = '{"messages": []}', "{oops"  # the later worker's; the first in file order: line 27
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:27: bad JSON"):
        prepare(two, tiny_tokenizer, 0, task=get_task("chatml"))
    skipped = dataclasses.replace(two, bad_records="skip")
    _, _, report = prepare(skipped, tiny_tokenizer, 0, task=get_task("chatml"))
    assert report.bad_skipped == 2 and report.records == 39 and "c.jsonl:27" in report.first_bad[0]
    assert not [p for p in (tmp_path / "cache2").iterdir() if ".tmp" in p.name]  # failed runs leave nothing


def test_overlong_error_names_the_record_in_file_order(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(crb.data, "BATCH", 5)
    texts = [{"text": f"short {i}"} for i in range(12)]
    texts[3] = {"text": " ".join(["suit shirt shoes"] * 40)}
    texts[8] = {"text": ""}
    cfg = data(tmp_path, [write_jsonl(tmp_path / "t.jsonl", texts)], format="text", max_length=32,
               overlong="error", num_proc=2)
    with pytest.raises(DataError, match=r"t\.jsonl:4: \d+ tokens > data\.max_length 32"):
        prepare(cfg, tiny_tokenizer, 0, task=get_task("text"))


def test_the_raw_table_locates_jsonl_records_and_workers_read_them_from_the_file(tmp_path):
    """The table the workers map over holds where each JSONL record is (a few bytes each), not the record: its
    batches read back exactly the lines raw_records yields (blank lines skipped, CRLF and non-ASCII kept), so a
    large corpus is neither copied nor memory-mapped by the preparation."""
    from crb.data.prepared import BATCH, raw_records, read_located, write_raw

    lines = [b'{"text": "' + f"w{i} ".encode() * 200 + b'\xc3\xa9"}' + (b"\r\n" if i % 7 else b"\n")
             for i in range(2 * BATCH + 5)]
    lines.insert(3, b"\n")
    lines.insert(1500, b"   \n")
    src = tmp_path / "a.jsonl"
    src.write_bytes(b"".join(lines))
    table = tmp_path / "raw.arrow"
    assert write_raw([str(src)], table) == [2 * BATCH + 5]
    assert table.stat().st_size < src.stat().st_size / 20
    got = []
    with pa.ipc.open_stream(str(table)) as reader:
        for part in reader:
            got += read_located([str(src)], part.to_pydict())
    assert got == [raw for _, raw, _ in raw_records(str(src))] and len(got) == 2 * BATCH + 5
