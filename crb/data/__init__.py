"""Data: read the recipe's files, tokenize by format (its task, passed in) in worker processes, apply the
malformed-record and over-length policies in file order, split off eval, pack or not; the result is a folder of
memory-mapped Arrow documents and row indices (crb.data.prepared), cached by data hash + tokenizer + data
section."""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from transformers import PreTrainedTokenizerBase

from crb.data import retrieval
from crb.data.chatml import chat_template
from crb.data.packing import Doc
from crb.data.prepared import (
    BAD,
    BATCH,
    BLANK,
    MADE,
    NO_TARGET,
    OTHER,
    OVERLONG,
    READ_ERROR,
    Docs,
    Rows,
    Tokenize,
    open_table,
    pack_offsets,
    write_raw,
)
from crb.data.reader import Record, mix, read_records, source_kind, source_sha256
from crb.errors import DataError
from crb.recipe.schema import ClaraConfig, DataConfig

Row = dict[str, np.ndarray]
CACHE_VERSION = "6"  # 6: chat labels found per turn, CLaRa stage 2 drawing its other documents (5: Arrow folders)
REPORT = "report.json"  # written last: a folder with it is complete


@dataclass
class DataReport:
    records: int = 0
    bad_skipped: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    other_directions: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    train_tokens: int = 0
    target_tokens: int = 0
    first_bad: list[str] = field(default_factory=list)
    train_sources: Sequence[str] = field(default_factory=list)  # per train row: the file:line of its records (lazy)

    def summary(self) -> str:
        tokens = f" ({self.train_tokens:,} tokens, {self.target_tokens:,} trained on)" if self.train_tokens else ""
        s = (f"{self.records} records -> {self.train_rows} train rows{tokens}, {self.eval_rows} eval rows; "
             f"truncated {self.truncated}, dropped {self.dropped_overlong} over-long and {self.dropped_no_target} "
             "with no target")
        if self.other_directions:
            s += f"; skipped {self.other_directions} in directions the recipe does not train"
        if self.bad_skipped:
            s += f"; skipped {self.bad_skipped} malformed (first: {self.first_bad[0]})"
        return s


class Format(Protocol):
    """What the preparation below asks of a data format: crb.tasks.Task is one (its methods say what each does).
    The data layer does not import the agents: the caller passes the recipe's in (crb.tasks.prepare).

    check, make_row, truncate and labels run in the tokenizing worker processes (picklable, no shared state);
    check_row runs afterwards in the main process, in file order, on the prepared row (its columns read when
    asked for); packable documents (causal LM) have no checks across rows."""

    packable: bool
    label_shift: int
    keys: tuple[str, ...]  # the recipe keys only this format reads ([clara], data.corpus, ...)

    def check(self, rec: Record, cfg: DataConfig, clara_cfg: ClaraConfig | None) -> Any: ...

    def trains(self, checked: Any, cfg: DataConfig) -> bool: ...

    def make_row(self, checked: Any, where: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
                 clara_cfg: ClaraConfig | None) -> tuple[Row | Doc, int] | None: ...

    def truncate(self, item: Row | Doc, max_length: int) -> Row | Doc: ...

    def labels(self, item: Row | Doc) -> Any: ...

    def check_row(self, row: Mapping[str, np.ndarray], where: str, seen: dict, clara_cfg: ClaraConfig | None
                  ) -> None: ...


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, clara_cfg: ClaraConfig | None = None, *,
            task: Format) -> tuple[Rows, Rows, DataReport]:
    """(train rows, eval rows, report) of data in format `task`, memory-mapped from the cache when the same data
    was prepared before (crb.data.prepared)."""
    template = chat_template(tokenizer, cfg.chat_template)
    key = _cache_key(cfg, tokenizer, template, seed, clara_cfg if "clara" in task.keys else None)
    root = Path(cfg.cache_dir).expanduser()
    entry = root / key
    cacheable = "unpinned" not in {source_sha256(f) for f in [*cfg.train, *cfg.eval]}  # an unpinned Hub dataset
    if cacheable and (entry / REPORT).is_file():
        return _load(entry, task)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{key}.tmp", dir=root))
    work.chmod(0o755)
    try:
        _prepare(work, cfg, tokenizer, template, seed, clara_cfg, task)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if not cacheable:  # this run's alone
        atexit.register(shutil.rmtree, work, True)
        return _load(work, task)
    try:
        os.replace(work, entry)  # whole or not at all
    except OSError:  # another run prepared the same data first
        shutil.rmtree(work, ignore_errors=True)
        if not (entry / REPORT).is_file():
            raise
    return _load(entry, task)


def _prepare(folder: Path, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str, seed: int,
             clara_cfg: ClaraConfig | None, task: Format) -> None:
    """Tokenize every source into `folder` (datasets.map, batched, in worker processes), then, reading only the
    small columns, apply the policies in file order, mix, split off eval and pack: row indices beside the table."""
    import datasets

    files = [*cfg.train, *cfg.eval]
    counts = write_raw(files, folder / "raw.arrow")
    if not sum(counts):
        raise DataError(f"{cfg.train[0]}: no usable training records ({DataReport().summary()})")
    raw = datasets.Dataset.from_file(str(folder / "raw.arrow"))
    tokenize = Tokenize(files, cfg, tokenizer, template, task, clara_cfg)
    tokenize.probe(raw.data.table, len(tokenizer))
    procs = num_proc(cfg.num_proc, raw.num_rows)
    quiet = datasets.utils.logging.is_progress_bar_enabled() and raw.num_rows < 10 * BATCH
    if quiet:
        datasets.disable_progress_bars()
    try:
        raw.map(tokenize, batched=True, batch_size=BATCH, num_proc=procs if procs > 1 else None,
                remove_columns=raw.column_names, cache_file_name=str(folder / "docs.arrow"),
                new_fingerprint=folder.name, load_from_cache_file=False, desc="crb: tokenizing")
    finally:
        if quiet:
            datasets.enable_progress_bars()
    del raw
    (folder / "raw.arrow").unlink()
    docs = Docs(open_table(folder))
    report = DataReport()
    ends = np.cumsum(counts).tolist()
    spans = list(zip([0, *ends[:-1]], ends, strict=True))
    train = _split(docs, files[:len(cfg.train)], spans[:len(cfg.train)], cfg, report, task, clara_cfg,
                   cfg.weights, seed)
    if cfg.eval:
        evals = _split(docs, cfg.eval, spans[len(cfg.train):], cfg, report, task, clara_cfg)
    elif cfg.eval_split > 0:
        order = np.random.default_rng(seed).permutation(len(train))
        n_eval = max(1, round(len(train) * cfg.eval_split))
        train, evals = train[np.sort(order[n_eval:])], train[np.sort(order[:n_eval])]
    else:
        evals = np.zeros(0, np.int64)
    if not len(train):
        raise DataError(f"{cfg.train[0]}: no usable training records ({report.summary()})")
    tokens = docs.column("tokens")
    n_rows = {}
    for name, index in (("train", train), ("eval", evals)):  # row g: documents index[offsets[g]:offsets[g + 1]]
        packed = task.packable and cfg.packing
        offsets = pack_offsets(tokens[index], cfg.max_length) if packed else np.arange(len(index) + 1)
        np.save(folder / f"{name}.index.npy", index.astype(np.int64))
        np.save(folder / f"{name}.offsets.npy", offsets.astype(np.int64))
        n_rows[name] = len(offsets) - 1
    report.train_rows, report.eval_rows = n_rows["train"], n_rows["eval"]
    if "input_ids" in docs.keys:
        report.train_tokens = int(tokens[train].sum())
        report.target_tokens = int(docs.column("targets")[train].sum())
    saved = {f.name: getattr(report, f.name) for f in dataclasses.fields(report) if f.name != "train_sources"}
    (folder / REPORT).write_text(json.dumps(saved))


def _split(docs: Docs, files: list[str], spans: list[tuple[int, int]], cfg: DataConfig, report: DataReport,
           task: Format, clara_cfg: ClaraConfig | None, weights: list[float] | None = None, seed: int = 0
           ) -> np.ndarray:
    """The usable documents of a split's sources, in order; each source mixed by its weight (data.weights)."""
    if weights:
        out: list[int] = []
        for file, span, weight in zip(files, spans, weights, strict=True):
            out += mix(_usable(docs, *span, cfg, report, task, clara_cfg, {}), weight, seed, Path(file).name)
        return np.asarray(out, np.int64)
    seen: dict = {}  # what the format's check_row remembers of the rows before
    return np.asarray([j for span in spans for j in _usable(docs, *span, cfg, report, task, clara_cfg, seen)],
                      np.int64)


def _usable(docs: Docs, start: int, end: int, cfg: DataConfig, report: DataReport, task: Format,
            clara_cfg: ClaraConfig | None, seen: dict) -> list[int]:
    """Documents start..end that make rows, the policies applied in file order (so the first error stops): a
    malformed record (data.bad_records), one in a direction not trained, over-long (data.overlong), no target."""
    status, truncated = docs.column("status")[start:end].tolist(), docs.column("truncated")[start:end].tolist()
    kept = []
    for j, s, cut in zip(range(start, end), status, truncated, strict=True):
        if s == BLANK:
            continue
        report.records += s != READ_ERROR
        error = docs.text("error", j) if s in (READ_ERROR, BAD) else None
        if not task.packable and s in MADE:  # checks across rows, in file order (a format reads what it needs)
            try:
                task.check_row(docs.row(j), docs.text("where", j), seen, clara_cfg)
            except DataError as e:
                error = str(e)
        if error is not None:
            if cfg.bad_records == "error":
                raise DataError(error)
            report.bad_skipped += 1
            report.first_bad = report.first_bad or [error]
        elif s == OTHER:
            report.other_directions += 1
        elif s == OVERLONG:
            if cfg.overlong == "error":
                raise DataError(docs.text("error", j))
            report.dropped_overlong += 1
        else:
            report.truncated += cut
            if s == NO_TARGET:
                report.dropped_no_target += 1
            else:
                kept.append(j)
    return kept


def _load(folder: Path, task: Format) -> tuple[Rows, Rows, DataReport]:
    docs = Docs(open_table(folder))
    train, evals = (Rows(docs, np.load(folder / f"{name}.index.npy", mmap_mode="r"),
                         np.load(folder / f"{name}.offsets.npy"), task.packable) for name in ("train", "eval"))
    report = DataReport(**json.loads((folder / REPORT).read_text()))
    report.train_sources = train.sources
    return train, evals, report


def num_proc(setting: int | str, records: int) -> int:
    """Worker processes for `records` records: data.num_proc, "auto" = the CPUs (at most 8), one for small data;
    never more than there are batches."""
    procs = (min(8, len(os.sched_getaffinity(0))) if records >= 5 * BATCH else 1) if setting == "auto" else setting
    return max(1, min(int(procs), -(-records // BATCH)))


SHOWN = 10  # the malformed records `crb validate` lists


@dataclass
class Validation:
    """What `crb validate` found in a recipe's data files."""

    files: int = 0
    records: int = 0
    usable: int = 0  # training records that pass (in the recipe's directions)
    other_directions: int = 0
    errors: int = 0  # malformed records that stop crb run
    skipped: int = 0  # malformed records crb run skips (data.bad_records = "skip")
    first: list[tuple[str, str]] = field(default_factory=list)  # (severity, "file:line: what") of the first SHOWN

    def add(self, severity: str, message: str) -> None:
        if severity == "error":
            self.errors += 1
        else:
            self.skipped += 1
        if len(self.first) < SHOWN:
            self.first.append((severity, message))

    def summary(self) -> str:
        s = f"{self.records} record(s) in {self.files} file(s)"
        if self.other_directions:
            s += f", {self.other_directions} in directions the recipe does not train"
        if self.skipped:
            s += f", {self.skipped} malformed to be skipped (data.bad_records = \"skip\")"
        return s


def validate(cfg: DataConfig, clara_cfg: ClaraConfig | None = None, *, task: Format) -> Validation:
    """Every record of the data files (train, eval, a retrieval corpus) through the checks training runs, short of
    those that need the tokenizer (token counts, language tokens, the chat template): no model or tokenizer loads."""
    v = Validation()
    corpus = cfg.corpus if "data.corpus" in task.keys else []
    for split, files in (("train", cfg.train), ("eval", cfg.eval), ("corpus", corpus)):
        for file in files:
            v.files += 1
            for rec in read_records(file, cfg.columns):
                v.records += 1
                try:
                    if isinstance(rec, DataError):
                        raise rec
                    if split == "corpus":
                        retrieval.check_document(rec.data, rec.where())
                        continue
                    checked = task.check(rec, cfg, clara_cfg)
                except DataError as e:  # training skips a malformed record only where bad_records says so
                    v.add("warning" if cfg.bad_records == "skip" and split != "corpus" else "error", e.one_line())
                    continue
                if not task.trains(checked, cfg):
                    v.other_directions += 1
                elif split == "train":
                    v.usable += 1
    if not v.usable and not v.errors:
        v.add("error", f"{cfg.train[0]}: no usable training records ({v.summary()})")
    return v


def _cache_key(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str, seed: int,
               clara_cfg: ClaraConfig | None = None) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    if clara_cfg is not None:
        h.update(json.dumps({k: v for k, v in dataclasses.asdict(clara_cfg).items() if k != "init_from"}).encode())
    for file in [*cfg.train, *cfg.eval]:
        h.update(source_sha256(file).encode())
        if source_kind(file) == "hub":  # its dataset and split besides the revision
            h.update(file.encode())
    section = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("cache_dir", "train", "eval", "num_proc")}
    h.update(json.dumps([section, seed if cfg.eval_split else 0], sort_keys=True).encode())
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    h.update(hashlib.sha256(vocab).digest())
    h.update(json.dumps([type(tokenizer).__name__, template, tokenizer.bos_token, tokenizer.eos_token,
                         tokenizer("a b")["input_ids"]]).encode())
    return h.hexdigest()[:24]
