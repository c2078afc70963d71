"""Prepared data on disk: the records tokenized by `datasets.map` (batched, in worker processes) into Arrow files,
memory-mapped; training reads rows from them on access, so memory does not grow with the corpus.

One table holds a document per record read (train and eval sources together, in file order): its `where`
(file:line), a status (usable, or why not), the error message of a malformed record, and the format's row
columns. Token ids are stored in the smallest integer type that holds the vocabulary (uint16 below 65,536
tokens; columns with labels signed, int16 or int32, for IGNORE = -100) and widened to int64 on access.

`Rows` is what training sees: a sequence of rows, each one document, or (data.packing) several documents of a
packing group concatenated when the row is read."""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa

from crb.data.packing import packed_row
from crb.data.reader import Record, parse_line, read_records, source_kind
from crb.errors import DataError
from crb.units import IGNORE

Row = dict[str, np.ndarray]

# A document's status: why it is not a row, or OK. MADE: the format made a row of it (kept in the table).
OK, READ_ERROR, BAD, OTHER, OVERLONG, NO_TARGET, BLANK = range(7)
MADE = (OK, OVERLONG, NO_TARGET)
BATCH = 1000  # records per map batch and per Arrow record batch


# ---------------------------------------------------------------- reading and tokenizing


def write_raw(files: list[str], path: Path) -> list[int]:
    """Every source's records, as read, into one small Arrow file: where a JSONL line's bytes are in its file (the
    workers read their batches from the file itself: nothing of the corpus is memory-mapped or copied), a table
    row pickled. Returns the records (and JSONL lines) per file."""
    schema = pa.schema([("file", pa.int32()), ("line", pa.int64()), ("offset", pa.int64()), ("size", pa.int64()),
                        ("raw", pa.binary()), ("pickled", pa.bool_())])
    counts = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for fi, file in enumerate(files):
            n, batch = 0, []
            for line, offset, size, raw, pickled in _located(file):
                batch.append((fi, line, offset, size, raw, pickled))
                n += 1
                if len(batch) == BATCH:
                    writer.write_batch(_batch(batch, schema))
                    batch = []
            if batch:
                writer.write_batch(_batch(batch, schema))
            counts.append(n)
    return counts


def _batch(rows: list[tuple], schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(c, f.type) for c, f in zip(zip(*rows, strict=True), schema,
                                                                          strict=True)], schema=schema)


def _jsonl_lines(file: str) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of each non-blank line."""
    offset = 0
    with open(file, "rb") as f:
        for no, raw in enumerate(f, 1):
            if raw.strip():
                yield no, offset, raw
            offset += len(raw)


def raw_records(file: str) -> Iterator[tuple[int, bytes, bool]]:
    """(line, bytes, False) of each JSONL record, (row, pickled record, True) of a table source's rows."""
    if source_kind(file) == "jsonl":
        yield from ((no, raw, False) for no, _, raw in _jsonl_lines(file))
        return
    for rec in read_records(file):  # a source datasets cannot read raises its DataError here
        yield rec.line, pickle.dumps(rec.data), True


def _located(file: str) -> Iterator[tuple[int, int, int, bytes | None, bool]]:
    """(line, byte offset, size, None, False) of each JSONL record (its bytes stay in the file); (row, -1, 0, pickled
    record, True) of a table source's rows."""
    if source_kind(file) == "jsonl":
        yield from ((no, offset, len(raw), None, False) for no, offset, raw in _jsonl_lines(file))
        return
    yield from ((no, -1, 0, raw, True) for no, raw, _ in raw_records(file))


def read_located(files: list[str], batch: Mapping[str, Sequence]) -> list[bytes]:
    """The records of a batch of `write_raw`'s table: JSONL lines read from their files (one read per file: a
    batch is consecutive lines), pickled rows as stored."""
    out: list[bytes] = list(batch["raw"])
    by_file: dict[int, list[int]] = {}
    for i, (f, pickled) in enumerate(zip(batch["file"], batch["pickled"], strict=True)):
        if not pickled:
            by_file.setdefault(f, []).append(i)
    for f, rows in by_file.items():
        lo = min(batch["offset"][i] for i in rows)
        hi = max(batch["offset"][i] + batch["size"][i] for i in rows)
        with open(files[f], "rb") as fh:
            fh.seek(lo)
            span = fh.read(hi - lo)
        for i in rows:
            start = batch["offset"][i] - lo
            out[i] = span[start: start + batch["size"][i]]
    return out


@dataclass
class Tokenize:
    """The map function: a batch of raw records -> a table of documents (status, error, row columns). Data errors
    become a status and a message (the main process applies data.bad_records in file order); the over-length
    policy truncates here and marks what the main process drops or stops at."""

    files: list[str]
    cfg: Any  # DataConfig
    tokenizer: Any
    template: str
    task: Any  # the Format
    clara_cfg: Any
    schema: pa.Schema | None = None  # the row columns' types (`probe`); None: only the status columns

    def one(self, file: int, line: int, raw: bytes, pickled: bool) -> tuple[int, str | None, Row | None, bool]:
        """(status, error message, row columns, truncated) of one record."""
        path = self.files[file]
        rec = Record(pickle.loads(raw), path, line, "row ") if pickled else parse_line(raw, path, line)
        if rec is None:
            return BLANK, None, None, False
        if isinstance(rec, DataError):
            return READ_ERROR, str(rec), None, False
        if self.cfg.columns:
            rename = {column: field for field, column in self.cfg.columns.items()}
            rec.data = {rename.get(k, k): v for k, v in rec.data.items()}
        where, cfg, task = rec.where(), self.cfg, self.task
        try:
            made = task.make_row(task.check(rec, cfg, self.clara_cfg), where, cfg, self.tokenizer, self.template,
                                 self.clara_cfg)
        except DataError as e:
            return BAD, str(e), None, False
        if made is None:
            return OTHER, None, None, False
        item, length = made
        status, error, truncated = OK, None, False
        if length > cfg.max_length:
            if cfg.overlong == "truncate":
                item, truncated = task.truncate(item, cfg.max_length), True
            else:  # dropped, or the run stops: the main process decides in file order
                status = OVERLONG
                error = (f"{where}: {length} tokens > data.max_length {cfg.max_length} "
                         "(set data.overlong = \"truncate\" or \"drop\")")
        labels = task.labels(item)
        if status == OK and labels is not None and not (np.asarray(labels[1:]) != IGNORE).any():  # nothing to learn
            status = NO_TARGET
        row = {"input_ids": np.asarray(item[0]), "labels": np.asarray(item[1])} if task.packable else item
        return status, error, row, truncated

    def __call__(self, batch: dict[str, list]) -> pa.Table:
        got = [self.one(*args) for args in zip(batch["file"], batch["line"], read_located(self.files, batch),
                                               batch["pickled"], strict=True)]
        columns: dict[str, Any] = {
            "where": [f"{self.files[f]}:{'row ' if p else ''}{n}" for f, n, p in
                      zip(batch["file"], batch["line"], batch["pickled"], strict=True)],
            "status": pa.array([g[0] for g in got], pa.int8()),
            "error": pa.array([g[1] for g in got], pa.string()),
            "truncated": pa.array([g[3] for g in got], pa.bool_()),
            "tokens": pa.array([len(g[2]["input_ids"]) if g[2] is not None and "input_ids" in g[2] else 0
                                for g in got], pa.int32()),
            "targets": pa.array([self._targets(g[2]) for g in got], pa.int32()),
        }
        for f in self.schema or []:
            columns[f.name] = _list_array([g[2][f.name] if g[2] is not None else () for g in got], f.type.value_type,
                                          f.name, columns["where"])
        return pa.table(columns)

    def _targets(self, row: Row | None) -> int:
        """The row's labels that carry a loss (after the causal shift), as DataReport.target_tokens counts them."""
        if row is None or "labels" not in row or "input_ids" not in row:
            return 0
        return int((np.asarray(row["labels"][self.task.label_shift:]) != IGNORE).sum())

    def probe(self, raw: pa.Table, vocab: int) -> None:
        """The row columns' types, from the first record the format makes a row of (none: no row columns)."""
        for part in raw.to_batches(BATCH):
            batch = part.to_pydict()
            for args in zip(batch["file"], batch["line"], read_located(self.files, batch), batch["pickled"],
                            strict=True):
                status, _, row, _ = self.one(*args)
                if status in MADE:
                    self.schema = pa.schema([(k, pa.list_(_value_type(k, np.asarray(v), vocab)))
                                             for k, v in row.items()])
                    return


def _value_type(key: str, values: np.ndarray, vocab: int) -> pa.DataType:
    """Text, or the smallest integer type of token ids: signed where the column holds labels (IGNORE)."""
    if values.dtype.kind in "USO":
        return pa.string()
    if "label" in key or (values.size and values.min() < 0):
        return pa.int16() if vocab <= np.iinfo(np.int16).max else pa.int32()
    return pa.uint16() if vocab <= np.iinfo(np.uint16).max + 1 else pa.uint32()


def _list_array(values: list, value_type: pa.DataType, key: str, wheres: list[str]) -> pa.Array:
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    if pa.types.is_string(value_type):
        flat = pa.array([str(s) for v in values for s in v], pa.string())
    else:
        dtype = value_type.to_pandas_dtype()
        flat_np = np.concatenate([np.asarray(v, np.int64) for v in values]) if len(values) else np.zeros(0, np.int64)
        info = np.iinfo(dtype)
        if flat_np.size and (flat_np.min() < info.min or flat_np.max() > info.max):
            bad = next(w for w, v in zip(wheres, values, strict=True)
                       if len(v) and (min(v) < info.min or max(v) > info.max))
            raise ValueError(f"{bad}: {key}: a value outside {np.dtype(dtype).name} (the vocabulary's id type)")
        flat = pa.array(flat_np.astype(dtype))
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


# ---------------------------------------------------------------- reading the prepared table


def open_table(folder: Path) -> pa.Table:
    """The documents' Arrow files of a prepared folder, memory-mapped (nothing is read until used)."""
    tables = []
    for path in sorted(folder.glob("docs*.arrow")):
        with pa.memory_map(str(path)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


class Docs:
    """Random access to the documents' columns: zero-copy numpy views of the memory-mapped Arrow buffers."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        sizes = [len(c) for c in table.column("status").chunks]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._chunks: dict[str, list[tuple[np.ndarray, Any]]] = {}
        self._lengths: dict[str, np.ndarray] = {}
        self._small: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def keys(self) -> list[str]:
        return [f.name for f in self.table.schema if pa.types.is_list(f.type)]

    def _columns(self, key: str) -> list[tuple[np.ndarray, Any]]:
        if key not in self._chunks:  # (offsets, values) per chunk; ids as numpy, texts as Arrow
            chunks = self.table.column(key).chunks
            self._chunks[key] = [(c.offsets.to_numpy(), c.values if pa.types.is_string(c.type.value_type)
                                  else c.values.to_numpy()) for c in chunks]
        return self._chunks[key]

    def _at(self, j: int) -> tuple[int, int]:
        """(chunk, row in it) of document j."""
        c = int(np.searchsorted(self.starts, j, "right")) - 1
        return c, int(j - self.starts[c])

    def get(self, key: str, j: int) -> np.ndarray:
        c, local = self._at(j)
        offsets, values = self._columns(key)[c]
        part = values[offsets[local]: offsets[local + 1]]
        return part.astype(np.int64) if isinstance(part, np.ndarray) else np.asarray(part.to_pylist(), str)

    def lengths(self, key: str) -> np.ndarray:
        """Every document's length in `key`, without reading the values."""
        if key not in self._lengths:
            self._lengths[key] = np.concatenate([np.diff(o) for o, _ in self._columns(key)]).astype(np.int64)
        return self._lengths[key]

    def column(self, name: str) -> np.ndarray:
        """A small column (status, tokens, ...) whole."""
        if name not in self._small:
            self._small[name] = self.table.column(name).to_numpy()
        return self._small[name]

    def text(self, name: str, j: int) -> str | None:
        c, local = self._at(j)
        return self.table.column(name).chunk(c)[local].as_py()

    def row(self, j: int) -> Mapping[str, np.ndarray]:
        """Document j's row, each column read when asked for."""
        return _LazyRow(self, j)


class _LazyRow(Mapping[str, np.ndarray]):
    def __init__(self, docs: Docs, j: int) -> None:
        self.docs, self.j = docs, j

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.docs.keys:
            raise KeyError(key)
        return self.docs.get(key, self.j)

    def __iter__(self) -> Iterator[str]:
        return iter(self.docs.keys)

    def __len__(self) -> int:
        return len(self.docs.keys)


class Rows(Sequence[Row]):
    """Training rows over prepared documents: row g is documents index[offsets[g]:offsets[g+1]] of `docs`, one
    each unless packed. Packable rows (causal LM documents) gain position ids that restart at each document and
    mask each document's first label, as crb.data.packing does; other formats' rows are the documents' columns."""

    def __init__(self, docs: Docs, index: np.ndarray, offsets: np.ndarray, packable: bool) -> None:
        self.docs, self.index, self.offsets, self.packable = docs, index, offsets, packable

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, g: int) -> Row: ...

    @overload
    def __getitem__(self, g: slice) -> Rows: ...

    def __getitem__(self, g: int | slice) -> Row | Rows:
        if isinstance(g, slice):
            return self.select(np.arange(len(self))[g])
        if not -len(self) <= g < len(self):
            raise IndexError(g)
        members = self.index[self.offsets[g % len(self)]: self.offsets[g % len(self) + 1]]
        if not self.packable:
            return {k: self.docs.get(k, int(members[0])) for k in self.docs.keys}
        return packed_row([(self.docs.get("input_ids", int(j)), self.docs.get("labels", int(j))) for j in members])

    def __iter__(self) -> Iterator[Row]:
        return (self[g] for g in range(len(self)))

    def __add__(self, other: Rows | list) -> Rows:
        if isinstance(other, list) and not other:
            return self
        if not isinstance(other, Rows) or other.docs is not self.docs:
            return NotImplemented
        return Rows(self.docs, np.concatenate([self.index, other.index]),
                    np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]]), self.packable)

    def __radd__(self, other: list) -> Rows:
        if isinstance(other, list) and not other:
            return self
        return NotImplemented

    def select(self, groups: np.ndarray) -> Rows:
        """The rows `groups` (indices), in that order."""
        starts, sizes = self.offsets[groups], np.diff(self.offsets)[groups]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        pos = np.repeat(starts - offsets[:-1], sizes) + np.arange(offsets[-1])
        return Rows(self.docs, self.index[pos.astype(np.int64)], offsets, self.packable)

    def lengths(self, key: str) -> np.ndarray:
        """Each row's length in `key` (a packed row's: its documents' sum)."""
        per_doc = self.docs.lengths(key)[self.index]
        return np.add.reduceat(per_doc, self.offsets[:-1]) if len(self) else np.zeros(0, np.int64)

    @property
    def packed(self) -> bool:
        """Whether some row holds more than one document."""
        return self.packable and bool((np.diff(self.offsets) > 1).any())

    def where(self, g: int) -> str:
        """The file:line of the records in row g."""
        return ", ".join(self.docs.text("where", int(j)) for j in self.index[self.offsets[g]: self.offsets[g + 1]])

    @property
    def sources(self) -> Sources:
        return Sources(self)


class Sources(Sequence[str]):
    """Per row, the file:line of its records (DataReport.train_sources), read when asked for."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, g: int | slice) -> Any:
        if isinstance(g, slice):
            return [self.rows.where(i) for i in range(len(self))[g]]
        if not -len(self) <= g < len(self):
            raise IndexError(g)
        return self.rows.where(g % len(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"Sources({len(self)} rows)"


def pack_offsets(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """crb.data.packing.pack_groups as offsets: greedy in-order packing of documents of `lengths`."""
    starts, used = [], 0
    for i, n in enumerate(lengths.tolist()):
        if starts and used + n <= max_length:
            used += n
        else:
            starts.append(i)
            used = n
    return np.asarray([*starts, len(lengths)], np.int64)
