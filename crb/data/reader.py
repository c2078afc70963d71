"""Record reading: JSON Lines with file:line errors; JSON, parquet, CSV, Arrow files and `Dataset.save_to_disk`
folders through `datasets`, with SOURCE:row N errors. Malformed records stop or are skipped and counted."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crb.errors import DataError
from crb.recipe.schema import DATA_SUFFIXES, HUB_DATASETS

HASHES = Path(os.environ.get("CRB_HASH_CACHE", "~/.cache/crb/sha256")).expanduser()  # file hashes by path+stat


def file_sha256(path: str | Path) -> str:
    """A file's sha256, computed once per (path, size, mtime): data preparation and the run's lock share it, and
    later runs read it from HASHES (a 4.4 GB corpus takes 9 s to hash again at every start)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    memo = HASHES / hashlib.sha256(f"{path}\0{size}\0{mtime_ns}".encode()).hexdigest()
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    try:  # written whole, then renamed: a reader never sees half a hash
        HASHES.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(h.hexdigest())
        os.replace(tmp, memo)
    except OSError:  # a read-only home: hash again next time
        pass
    return h.hexdigest()


@dataclass
class Record:
    data: dict[str, Any]
    file: str
    line: int
    unit: str = ""  # "row " for the rows of a table source: "file.parquet:row 3"

    def where(self) -> str:
        return f"{self.file}:{self.unit}{self.line}"


TABLE_KINDS = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SOURCE_KINDS = (*DATA_SUFFIXES, "a Dataset.save_to_disk folder")


def source_kind(path: str | Path) -> str | None:
    """'jsonl', 'json', 'parquet', 'csv', 'arrow' or 'disk' (a save_to_disk folder); None: not a data source."""
    if str(path).startswith(HUB_DATASETS):
        return "hub"
    path = Path(path)
    if path.is_dir():
        return "disk" if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() else None
    suffix = path.suffix.lower()
    return "jsonl" if suffix == ".jsonl" else TABLE_KINDS.get(suffix)


def source_sha256(path: str | Path) -> str:
    """A file's sha256; a save_to_disk folder's: the sha256 of its files' names and sha256s; a Hub dataset's:
    'revision:REV' (or 'unpinned')."""
    if source_kind(path) == "hub":
        rev = parse_hub(str(path))[1]
        return f"revision:{rev}" if rev else "unpinned"
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    parts = [f"{f.relative_to(path)}:{file_sha256(f)}" for f in sorted(path.rglob("*")) if f.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def parse_hub(source: str) -> tuple[str, str | None, str]:
    """hf://datasets/owner/name[@revision][:split] -> (owner/name, revision or None, split, default train)."""
    rest = source.removeprefix(HUB_DATASETS)
    rest, _, split = rest.partition(":")
    name, _, rev = rest.partition("@")
    return name, rev or None, split or "train"


def read_records(path: str | Path, columns: dict[str, str] | None = None) -> Iterator[Record | DataError]:
    """Any source kind's records: JSONL by line (read_jsonl), the others by 1-based row through `datasets`;
    `columns` (crb field -> source column, data.columns) renames each record's keys."""
    kind = source_kind(path)
    if kind is None:
        raise DataError(f"{path}: not a data source (expected one of {', '.join(SOURCE_KINDS)})")
    records = read_jsonl(path) if kind == "jsonl" else _read_table(path, kind)
    rename = {column: field for field, column in (columns or {}).items()}
    for rec in records:
        if rename and isinstance(rec, Record):
            rec.data = {rename.get(k, k): v for k, v in rec.data.items()}
        yield rec


def mix(items: list, weight: float, seed: int, name: str) -> list:
    """A source's items under its mixing weight: int(weight) full copies, then a seeded, in-order sample of the
    fraction left; the sample depends on the seed and the source's name only, not on the other sources."""
    whole, frac = divmod(weight, 1.0)
    out = items * int(whole)
    if frac:
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")])
        out += [items[i] for i in sorted(rng.permutation(len(items))[:round(len(items) * frac)])]
    return out


def _read_table(path: str | Path, kind: str) -> Iterator[Record | DataError]:
    import datasets

    try:
        if kind == "hub":
            name, rev, split = parse_hub(str(path))
            ds = datasets.load_dataset(name, revision=rev, split=split)
        elif kind == "disk":
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(f"{path}: a DatasetDict folder (splits {', '.join(ds)}); name one split's folder")
        elif kind == "arrow":
            ds = datasets.Dataset.from_file(str(path))
        else:
            ds = datasets.Dataset.from_dict({}) if Path(path).stat().st_size == 0 else \
                datasets.load_dataset(kind, data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as e:  # a file datasets cannot read: one line naming it
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{path}: cannot read as {kind}: {type(e).__name__}: {first}") from None
    for no, data in enumerate(ds, 1):
        yield Record(dict(data), str(path), no, "row ")


def read_jsonl(path: str | Path) -> Iterator[Record | DataError]:
    """Yield each record, or a DataError in its place for a line that is not a JSON object."""
    path = Path(path)
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            got = parse_line(raw, str(path), no)
            if got is not None:
                yield got


def parse_line(raw: bytes, path: str, no: int) -> Record | DataError | None:
    """Line `no` of a JSONL file as a Record, a DataError naming it, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(f"{path}:{no}: invalid UTF-8 at byte {e.start}")
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(f"{path}:{no}: bad JSON: {e.msg} (column {e.colno})")
    if not isinstance(data, dict):
        return DataError(f"{path}:{no}: expected a JSON object, got {type(data).__name__}")
    return Record(data, path, no)
