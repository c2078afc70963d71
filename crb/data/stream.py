"""data.streaming: training rows made from the sources as training reads them, never prepared whole, so memory and
disk do not grow with the corpus. Rows come in source order (packed greedily in order, as prepared rows are; no
epoch shuffle), the same policies apply record by record, and the sources start again when they end. Where a row
starts reading (source, record) is what a checkpoint saves: a resumed run reads on from there."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from crb.data.chatml import chat_template
from crb.data.packing import packed_row
from crb.data.prepared import BAD, OK, OVERLONG, READ_ERROR, Tokenize, raw_records
from crb.errors import DataError
from crb.recipe.schema import ClaraConfig, DataConfig

Row = dict[str, np.ndarray]
Position = tuple[int, int]  # (source, record): where reading starts


class Stream(Sequence[Row]):
    """Row i of a run that reads `n_rows`, made when first asked for; rows asked for go in increasing order, and
    the last `keep` stay (a step's rows built again after the micro-batch halves)."""

    in_order = True  # the loop takes rows in this order (crb.engine.loop.Training.step_data)

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, task: Any, clara_cfg: ClaraConfig | None,
                 n_rows: int, keep: int) -> None:
        self.cfg, self.task, self.clara_cfg, self.n, self.keep = cfg, task, clara_cfg, n_rows, keep
        template = chat_template(tokenizer, cfg.chat_template)
        self.tokenize = Tokenize(list(cfg.train), cfg, tokenizer, template, task, clara_cfg)
        self.lock = threading.Lock()  # the loop's prefetch thread and its main thread both read
        self.seek(0, (0, 0))

    def seek(self, row: int, position: Position) -> None:
        """Row `row` is the one that starts reading at `position` (a resumed run's first)."""
        self.made: dict[int, tuple[Row, str, Position]] = {}  # row -> (row, where, position after it)
        self.first, self.next_row, self.start = row, row, tuple(position)
        self.rows = self._rows(self.start)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Row:  # type: ignore[override]
        with self.lock:
            while self.next_row <= i:
                self.made[self.next_row] = next(self.rows)
                self.next_row += 1
            for old in [r for r in self.made if r < i - self.keep]:
                del self.made[old]
            if i not in self.made:
                raise IndexError(f"stream row {i}: read past already (rows are read in order)")
            return self.made[i][0]

    def position(self, row: int) -> Position:
        """Where row `row` starts reading: after the row before it (made now if this process has not needed it)."""
        if row <= self.first:
            return self.start
        self[row - 1]
        return self.made[row - 1][2]

    @property
    def sources(self) -> Sequence[str]:
        """Where each row (still held) comes from, for the loop's report of a bad step."""
        return _Sources(self)

    def _rows(self, position: Position) -> Iterator[tuple[Row, str, Position]]:
        packed = self.task.packable and self.cfg.packing
        docs: list[tuple[Row, str, Position]] = []
        used = 0
        for doc, where, after in self._documents(position):
            n = len(doc["input_ids"]) if self.task.packable else 0
            if docs and (not packed or used + n > self.cfg.max_length):
                yield self._row([d for d, _, _ in docs]), docs[0][1], docs[-1][2]
                docs, used = [], 0
            docs.append((doc, where, after))
            used += n

    def _row(self, docs: list[Row]) -> Row:
        return packed_row([(d["input_ids"], d["labels"]) for d in docs]) if self.task.packable else docs[0]

    def _documents(self, position: Position) -> Iterator[tuple[Row, str, Position]]:
        """The usable documents from `position` on, the data policies applied in file order; round again at the
        end of the sources."""
        files, (first, skip) = self.tokenize.files, position
        seen: dict = {}
        while True:
            usable = 0
            for f in range(first, len(files)):
                for k, (line, raw, pickled) in enumerate(raw_records(files[f])):
                    if f == first and k < skip:
                        continue
                    status, error, row, _ = self.tokenize.one(f, line, raw, pickled)
                    where = f"{files[f]}:{'row ' if pickled else ''}{line}"
                    if status == OK and not self.task.packable:
                        try:
                            self.task.check_row(row, where, seen, self.clara_cfg)
                        except DataError as e:
                            status, error = BAD, str(e)
                    if status in (READ_ERROR, BAD) and self.cfg.bad_records == "error":
                        raise DataError(error)
                    if status == OVERLONG and self.cfg.overlong == "error":
                        raise DataError(error)
                    if status == OK:  # (skipped: blank, another direction, bad or over-long by policy, no target)
                        usable += 1
                        yield row, where, (f, k + 1)
            if not usable and (first, skip) == (0, 0):
                raise DataError(f"{files[0]}: no usable training records to stream")
            first, skip = 0, 0


class _Sources(Sequence[str]):
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        made = self.stream.made.get(i)
        return made[1] if made else f"stream row {i}"
