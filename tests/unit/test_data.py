"""Reading and preparing data: file:line errors, skip-and-count, over-length policies, the cache."""

from __future__ import annotations

import json

import pytest

from crb.errors import DataError
from crb.recipe.schema import DataConfig
from crb.tasks import prepare


def cfg(files, tmp_path, **kw) -> DataConfig:
    return DataConfig(train=[str(f) for f in files], format=kw.pop("format", "chatml"),
                      cache_dir=str(tmp_path / "cache"), **kw)


def good(i: int = 0) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"Is item {i} in stock?"},
                                    {"role": "assistant", "content": f"Yes, item {i} is in stock."}]})


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "chat.jsonl:2: bad JSON"),
    ('["a"]', "chat.jsonl:2: expected a JSON object, got list"),
    ('{"text": "hi"}', "chat.jsonl:2: missing field 'messages'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "chat.jsonl:2: messages[0].role"),
    ('{"messages": []}', "chat.jsonl:2: messages: expected a non-empty list"),
])
def test_bad_records_name_file_and_line(tmp_path, tiny_tokenizer, line, message):
    f = tmp_path / "chat.jsonl"
    f.write_text(good() + "\n" + line + "\n" + good(1) + "\n")
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        prepare(cfg([f], tmp_path), tiny_tokenizer, 0)


def test_invalid_utf8_names_the_line(tmp_path, tiny_tokenizer):
    f = tmp_path / "chat.jsonl"
    f.write_bytes(good().encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match="chat.jsonl:2: invalid UTF-8"):
        prepare(cfg([f], tmp_path), tiny_tokenizer, 0)


def test_bad_records_skipped_and_counted(tmp_path, tiny_tokenizer):
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join([good(0), "{oops", good(1), '{"messages": []}', good(2)]) + "\n")
    train, _, report = prepare(cfg([f], tmp_path, bad_records="skip"), tiny_tokenizer, 0)
    assert len(train) == 3
    assert report.bad_skipped == 2
    assert "chat.jsonl:2" in report.first_bad[0]


def test_overlong_policies(tmp_path, tiny_tokenizer):
    f = tmp_path / "text.jsonl"
    long_text = " ".join(["suit shirt shoes"] * 60)
    f.write_text(json.dumps({"text": "short text"}) + "\n" + json.dumps({"text": long_text}) + "\n")
    train, _, rep = prepare(cfg([f], tmp_path, format="text", max_length=32), tiny_tokenizer, 0)
    assert rep.truncated == 1 and max(len(r["input_ids"]) for r in train) == 32
    train, _, rep = prepare(cfg([f], tmp_path, format="text", max_length=32, overlong="drop"), tiny_tokenizer, 0)
    assert rep.dropped_overlong == 1 and len(train) == 1
    with pytest.raises(DataError, match=r"text.jsonl:2: \d+ tokens > data.max_length 32"):
        prepare(cfg([f], tmp_path, format="text", max_length=32, overlong="error"), tiny_tokenizer, 0)


def test_text_documents_end_with_eos_and_pack(tmp_path, tiny_tokenizer):
    f = tmp_path / "text.jsonl"
    f.write_text("".join(json.dumps({"text": f"def f{i}(): return {i}"}) + "\n" for i in range(20)))
    train, _, rep = prepare(cfg([f], tmp_path, format="text", max_length=64, packing=True), tiny_tokenizer, 0)
    assert len(train) < 20 and all(len(r["input_ids"]) <= 64 for r in train)
    eos = tiny_tokenizer.eos_token_id
    assert sum(int((r["input_ids"] == eos).sum()) for r in train) == 20
    assert sum(int((r["position_ids"] == 0).sum()) for r in train) == 20


def test_eval_split_and_cache(tmp_path, tiny_tokenizer):
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(good(i) + "\n" for i in range(40)))
    c = cfg([f], tmp_path, eval_split=0.25)
    train, evals, _ = prepare(c, tiny_tokenizer, 0)
    assert (len(train), len(evals)) == (30, 10)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one entry, no temporary folder left
    again, again_eval, _ = prepare(c, tiny_tokenizer, 0)  # from the cache
    assert [r["input_ids"].tolist() for r in again] == [r["input_ids"].tolist() for r in train]
    f.write_text("".join(good(i) + "\n" for i in range(41)))  # data changed: new cache entry
    prepare(c, tiny_tokenizer, 0)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_each_train_row_knows_its_records(tmp_path, tiny_tokenizer):
    """file:line of the records in every row, packed or not (what a NaN step's message names)."""
    import dataclasses

    f = tmp_path / "text.jsonl"
    f.write_text("".join(f'{{"text": "navy suit number {i} in stock"}}\n' for i in range(6)))
    base = dataclasses.replace(cfg([f], tmp_path), format="text", eval_split=0.0, max_length=64)
    rows, _, report = prepare(dataclasses.replace(base, packing=False), tiny_tokenizer, 0)
    assert report.train_sources == [f"{f}:{i}" for i in range(1, 7)] and len(rows) == 6
    packed = dataclasses.replace(base, packing=True, cache_dir=str(tmp_path / "c2"))
    rows, _, report = prepare(packed, tiny_tokenizer, 0)
    assert len(rows) < 6 and len(report.train_sources) == len(rows)
    assert ", ".join(report.train_sources) == ", ".join(f"{f}:{i}" for i in range(1, 7))  # in order, each once


def test_a_file_hash_is_kept_across_runs_until_the_file_changes(tmp_path, monkeypatch):
    """Later runs read a data file's sha256 from the hash cache (keyed by path, size and mtime) instead of reading
    the file again; a changed file is hashed again."""
    import hashlib
    import os

    from crb.data import reader

    monkeypatch.setattr(reader, "HASHES", tmp_path / "hashes")
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "one"}\n')
    first = reader.file_sha256(data)
    assert first == hashlib.sha256(data.read_bytes()).hexdigest()
    (memo,) = (tmp_path / "hashes").iterdir()
    memo.write_text("kept")  # what a new process finds: the file is not read again
    reader._sha256.cache_clear()
    assert reader.file_sha256(data) == "kept"
    data.write_text('{"text": "two"}\n')
    os.utime(data, ns=(1, 1))
    reader._sha256.cache_clear()
    assert reader.file_sha256(data) == hashlib.sha256(data.read_bytes()).hexdigest()
