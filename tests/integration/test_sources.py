"""Data sources besides JSONL (issue 19): the same records as JSON, parquet, CSV, Arrow and a save_to_disk folder
prepare to the same rows as JSONL; a malformed row is named SOURCE:row N; the data checks and `crb validate` run
on a parquet source; the lock and cache hash a folder by its files."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from crb.cli import main as cli
from crb.data import prepare
from crb.errors import DataError, RecipeError
from crb.recipe import schema
from crb.tasks import TASKS, get_task
from tests.conftest import chat_records, write_jsonl, write_recipe


def load(path, overrides=None):
    """As every crb command loads a recipe: with the agents' own rules (their fields for data.columns)."""
    return schema.load(path, overrides, None, TASKS)


TEXTS = [{"text": " ".join(m["content"] for m in r["messages"])} for r in chat_records(12)]


def write_source(tmp_path: Path, kind: str, records: list[dict]) -> Path:
    ds = datasets.Dataset.from_list(records)
    path = tmp_path / f"src-{kind}" / f"data.{kind}"
    path.parent.mkdir(exist_ok=True)
    if kind == "jsonl":
        return write_jsonl(path, records)
    if kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "arrow":
        ds.save_to_disk(str(path.parent / "saved"))
        (path.parent / "saved" / "data-00000-of-00001.arrow").rename(path)
    elif kind == "disk":
        path = path.parent / "saved"
        ds.save_to_disk(str(path))
    return path


def recipe(tmp_path: Path, model: Path, train: Path, extra: str = "") -> Path:
    return write_recipe(tmp_path / "recipe.toml", f"""
[model]
name = "{model}"

[data]
train = ["{train}"]
format = "text"
max_length = 64
cache_dir = "{tmp_path / 'cache'}"
{extra}

[output]
dir = "{tmp_path / 'out'}"
""")


def rows(tmp_path: Path, model: Path, train: Path, tokenizer) -> list[list[int]]:
    r = load(recipe(tmp_path, model, train))
    train_rows, _, _ = prepare(r.data, tokenizer, 0, task=get_task("text"))
    return [list(row["input_ids"]) for row in train_rows]


def test_every_kind_prepares_the_same_rows(tmp_path, tiny_model, tiny_tokenizer):
    want = rows(tmp_path, tiny_model, write_source(tmp_path, "jsonl", TEXTS), tiny_tokenizer)
    assert len(want) == len(TEXTS)
    for kind in ("json", "parquet", "csv", "arrow", "disk"):
        got = rows(tmp_path, tiny_model, write_source(tmp_path, kind, TEXTS), tiny_tokenizer)
        assert got == want, kind


def test_malformed_parquet_row_is_named(tmp_path, tiny_model, tiny_tokenizer):
    bad = [*TEXTS[:2], {"text": ""}, *TEXTS[3:5]]
    path = write_source(tmp_path, "parquet", bad)
    with pytest.raises(DataError, match=r"data\.parquet:row 3: text"):
        rows(tmp_path, tiny_model, path, tiny_tokenizer)


def test_not_a_source_is_a_recipe_error(tmp_path, tiny_model):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(RecipeError, match=r"data\.train\[0\]: not a data source: .*data\.txt"):
        load(recipe(tmp_path, tiny_model, path))
    with pytest.raises(RecipeError, match=r"data\.train\[0\]: file not found"):
        load(recipe(tmp_path, tiny_model, tmp_path / "missing.parquet"))


def test_checks_and_validate_on_parquet(tmp_path, tiny_model, capsys):
    path = write_source(tmp_path, "parquet", [*TEXTS[:3], TEXTS[0], {"text": ""}])
    r = recipe(tmp_path, tiny_model, path)
    capsys.readouterr()
    assert cli(["validate", str(r)]) == 2
    assert "data.parquet:row 5: text" in "".join(capsys.readouterr())
    cli(["data", str(r), "check"])
    out = "".join(capsys.readouterr())
    assert "data.parquet:row 4" in out  # the exact duplicate of row 1
    assert cli(["data", str(r), "clean", "--out", str(tmp_path / "clean")]) == 0
    cleaned = (tmp_path / "clean" / "data.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in cleaned] == TEXTS[:3]


def test_lock_hashes_a_folder_by_its_files(tmp_path):
    from crb.data.reader import source_sha256

    path = write_source(tmp_path, "disk", TEXTS)
    before = source_sha256(path)
    datasets.Dataset.from_list(TEXTS[:5]).save_to_disk(str(tmp_path / "other"))
    assert source_sha256(tmp_path / "other") != before
    assert source_sha256(path) == before


def test_columns_map_source_columns_to_fields(tmp_path, tiny_model, tiny_tokenizer):
    want = rows(tmp_path, tiny_model, write_source(tmp_path, "jsonl", TEXTS), tiny_tokenizer)
    path = write_source(tmp_path, "parquet", [{"body": r["text"]} for r in TEXTS])
    r = load(recipe(tmp_path, tiny_model, path, 'columns = { text = "body" }'))
    train_rows, _, _ = prepare(r.data, tiny_tokenizer, 0, task=get_task("text"))
    assert [list(row["input_ids"]) for row in train_rows] == want
    with pytest.raises(RecipeError, match=r"data\.columns\.txt: not a field of format text.*did you mean 'text'"):
        load(recipe(tmp_path, tiny_model, path, 'columns = { txt = "body" }'))


def test_weights_repeat_subsample_and_keep_order(tmp_path, tiny_model, tiny_tokenizer):
    a = write_source(tmp_path, "jsonl", TEXTS[:6])
    b = write_source(tmp_path, "parquet", TEXTS[6:])
    c = write_source(tmp_path, "csv", TEXTS[:4])

    def wheres(train: str, weights: str) -> list[str]:
        r = load(recipe(tmp_path, tiny_model, a, f"weights = {weights}"), [f"data.train={train}"])
        _, _, report = prepare(r.data, tiny_tokenizer, 0, task=get_task("text"))
        return list(report.train_sources)  # one record per row (no packing)

    two = wheres(f'["{a}", "{b}"]', "[2.0, 0.5]")
    assert len(two) == 6 * 2 + 3
    assert two[:12] == [f"{a}:{i}" for i in range(1, 7)] * 2
    sampled = two[12:]
    assert sampled == sorted(sampled, key=lambda w: int(w.rsplit(" ", 1)[1]))  # in file order
    three = wheres(f'["{a}", "{b}", "{c}"]', "[2.0, 0.5, 1.0]")
    assert three[:15] == two  # a third source leaves the others' rows as they were
    assert len(three) == 15 + 4
    with pytest.raises(RecipeError, match=r"data\.weights: expected one weight per data\.train source"):
        load(recipe(tmp_path, tiny_model, a, "weights = [1.0, 2.0]"))


def test_hub_dataset_pinned_and_stubbed(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    want = rows(tmp_path, tiny_model, write_source(tmp_path, "jsonl", TEXTS), tiny_tokenizer)
    calls = []

    def load_dataset(name, revision=None, split=None, **_kwargs):  # the Hub, offline
        calls.append((name, revision, split))
        if split != "train":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\'].')
        return datasets.Dataset.from_list(TEXTS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = "hf://datasets/acme/texts@0123abc:train"
    assert rows(tmp_path, tiny_model, source, tiny_tokenizer) == want
    assert calls == [("acme/texts", "0123abc", "train")]
    from crb.data.reader import source_sha256

    assert source_sha256(source) == "revision:0123abc"
    with pytest.raises(DataError, match=r"hf://datasets/acme/texts@0123abc:test: cannot read.*Unknown split"):
        rows(tmp_path, tiny_model, "hf://datasets/acme/texts@0123abc:test", tiny_tokenizer)
    with pytest.warns(UserWarning, match="names no revision"):
        load(recipe(tmp_path, tiny_model, "hf://datasets/acme/texts"))
    monkeypatch.setenv("CRB_CACHE", str(tmp_path / "crb-cache"))  # a recipe in crb's cache: a fetched one
    fetched = tmp_path / "crb-cache" / "recipes"
    fetched.mkdir(parents=True)
    with pytest.raises(RecipeError, match=r"data\.train\[0\]: hf://datasets/acme/texts names no revision.*must pin"):
        load(recipe(fetched, tiny_model, "hf://datasets/acme/texts"))
