"""JSON Lines reading with file:line errors; malformed records stop or are skipped and counted."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crb.errors import DataError


def file_sha256(path: str | Path) -> str:
    """A file's sha256, computed once per (path, size, mtime): data preparation and the run's lock share it."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Record:
    data: dict[str, Any]
    file: str
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def read_jsonl(path: str | Path) -> Iterator[Record | DataError]:
    """Yield each record, or a DataError in its place for a line that is not a JSON object."""
    path = Path(path)
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield DataError(f"{path}:{no}: invalid UTF-8 at byte {e.start}")
                continue
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                yield DataError(f"{path}:{no}: bad JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(data, dict):
                yield DataError(f"{path}:{no}: expected a JSON object, got {type(data).__name__}")
                continue
            yield Record(data, str(path), no)
