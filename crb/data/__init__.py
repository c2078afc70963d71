"""Data: read the recipe's files, tokenize by format (its task, passed in), apply the over-length policy, split
off eval, pack or not; cached by data hash + tokenizer + data section."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from transformers import PreTrainedTokenizerBase

from crb.data import retrieval
from crb.data.chatml import chat_template
from crb.data.packing import Doc, one_per_row, pack, pack_groups
from crb.data.reader import Record, mix, read_records, source_kind, source_sha256
from crb.errors import DataError
from crb.recipe.schema import ClaraConfig, DataConfig, uses
from crb.units import IGNORE

Row = dict[str, np.ndarray]
CACHE_VERSION = "4"  # 4: stage 2 reads the gold candidates and the first others


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
    train_sources: list[str] = field(default_factory=list)  # per train row: the file:line of its records

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
    The data layer does not import the agents: the caller passes the recipe's in (crb.tasks.prepare)."""

    packable: bool
    label_shift: int

    def check(self, rec: Record, cfg: DataConfig, clara_cfg: ClaraConfig | None) -> Any: ...

    def trains(self, checked: Any, cfg: DataConfig) -> bool: ...

    def make_row(self, checked: Any, where: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
                 clara_cfg: ClaraConfig | None) -> tuple[Row | Doc, int] | None: ...

    def truncate(self, item: Row | Doc, max_length: int) -> Row | Doc: ...

    def labels(self, item: Row | Doc) -> Any: ...

    def check_row(self, row: Row, where: str, seen: dict, clara_cfg: ClaraConfig | None) -> None: ...


def _make_row(rec: Record, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
              report: DataReport, task: Format, clara_cfg: ClaraConfig | None = None
              ) -> tuple[Row | Doc, int] | None:
    """One record in its format's shape, with its length in tokens (None: a record the recipe does not train)."""
    made = task.make_row(task.check(rec, cfg, clara_cfg), rec.where(), cfg, tokenizer, template, clara_cfg)
    if made is None:
        report.other_directions += 1
    return made


def _read(files: list[str], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
          report: DataReport, task: Format, clara_cfg: ClaraConfig | None = None,
          weights: list[float] | None = None, seed: int = 0) -> tuple[list, list[str]]:
    """The usable records as items, and each one's file:line; each file's mixed by its weight (data.weights)."""
    if weights:
        items, wheres = [], []
        for file, weight in zip(files, weights, strict=True):
            got = list(zip(*_read([file], cfg, tokenizer, template, report, task, clara_cfg), strict=True))
            mixed = mix(got, weight, seed, Path(file).name)
            items += [item for item, _ in mixed]
            wheres += [where for _, where in mixed]
        return items, wheres
    items, wheres = [], []
    seen: dict = {}  # what the format's check_row remembers of the rows before
    for file in files:
        for rec in read_records(file, cfg.columns):
            try:
                if isinstance(rec, DataError):
                    raise rec
                report.records += 1
                made = _make_row(rec, cfg, tokenizer, template, report, task, clara_cfg)
                if made:
                    task.check_row(made[0], rec.where(), seen, clara_cfg)
            except DataError as e:
                if cfg.bad_records == "error":
                    raise
                report.bad_skipped += 1
                report.first_bad = report.first_bad or [str(e)]
                continue
            if made is None:
                continue
            item, length = made
            if length > cfg.max_length:
                if cfg.overlong == "error":
                    raise DataError(f"{rec.where()}: {length} tokens > data.max_length {cfg.max_length} "
                                    "(set data.overlong = \"truncate\" or \"drop\")")
                if cfg.overlong == "drop":
                    report.dropped_overlong += 1
                    continue
                item = task.truncate(item, cfg.max_length)
                report.truncated += 1
            labels = task.labels(item)
            if labels is not None and all(t == IGNORE for t in labels[1:]):  # nothing left to learn (cut)
                report.dropped_no_target += 1
                continue
            items.append(item)
            wheres.append(rec.where())
    return items, wheres


def _rows(items: list, wheres: list[str], cfg: DataConfig, task: Format) -> tuple[list[Row], list[str]]:
    """Rows, and for each the file:line of the records in it."""
    if not task.packable:
        return items, wheres  # already rows
    if not cfg.packing:
        return one_per_row(items), wheres
    groups = pack_groups([len(ids) for ids, _ in items], cfg.max_length)
    return pack(items, cfg.max_length), [", ".join(wheres[i] for i in g) for g in groups]


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, clara_cfg: ClaraConfig | None = None, *,
            task: Format) -> tuple[list[Row], list[Row], DataReport]:
    """(train rows, eval rows, report) of data in format `task`, from the cache when the same data was prepared
    before."""
    template = chat_template(tokenizer, cfg.chat_template)
    key = _cache_key(cfg, tokenizer, template, seed, clara_cfg if uses(cfg.format, "clara") else None)
    cache = Path(cfg.cache_dir).expanduser() / f"{key}.npz"
    cacheable = "unpinned" not in {source_sha256(f) for f in [*cfg.train, *cfg.eval]}  # an unpinned Hub dataset
    if cacheable and cache.is_file():
        return _load_cache(cache)
    report = DataReport()
    docs, wheres = _read(cfg.train, cfg, tokenizer, template, report, task, clara_cfg, cfg.weights, seed)
    if cfg.eval:
        eval_docs, eval_wheres = _read(cfg.eval, cfg, tokenizer, template, report, task, clara_cfg)
    elif cfg.eval_split > 0:
        order = np.random.default_rng(seed).permutation(len(docs))
        n_eval = max(1, round(len(docs) * cfg.eval_split))
        held, kept = sorted(order[:n_eval]), sorted(order[n_eval:])
        eval_docs, eval_wheres = [docs[i] for i in held], [wheres[i] for i in held]
        docs, wheres = [docs[i] for i in kept], [wheres[i] for i in kept]
    else:
        eval_docs, eval_wheres = [], []
    if not docs:
        raise DataError(f"{cfg.train[0]}: no usable training records ({report.summary()})")
    (train, report.train_sources), (evals, _) = _rows(docs, wheres, cfg, task), _rows(eval_docs, eval_wheres, cfg, task)
    report.train_rows, report.eval_rows = len(train), len(evals)
    if "input_ids" in train[0]:
        report.train_tokens = int(sum(len(r["input_ids"]) for r in train))
        report.target_tokens = int(sum((r["labels"][task.label_shift:] != IGNORE).sum() for r in train))
    if cacheable:
        _save_cache(cache, train, evals, report)
    return train, evals, report


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
    corpus = cfg.corpus if uses(cfg.format, "data.corpus") else []
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
    section = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("cache_dir", "train", "eval")}
    h.update(json.dumps([section, seed if cfg.eval_split else 0], sort_keys=True).encode())
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    h.update(hashlib.sha256(vocab).digest())
    h.update(json.dumps([type(tokenizer).__name__, template, tokenizer.bos_token, tokenizer.eos_token,
                         tokenizer("a b")["input_ids"]]).encode())
    return h.hexdigest()[:24]


def _flatten(rows: list[Row], prefix: str) -> dict[str, np.ndarray]:
    """Rows (dicts of 1-d arrays, ids or texts) as one concatenated array + lengths per key."""
    out: dict[str, np.ndarray] = {}
    for k in (rows[0] if rows else {}):
        out[f"{prefix}.{k}.len"] = np.asarray([len(r[k]) for r in rows], np.int64)
        out[f"{prefix}.{k}"] = np.concatenate([r[k] for r in rows])
    return out


def _unflatten(arrays: dict[str, np.ndarray], prefix: str) -> list[Row]:
    keys = [k.split(".")[1] for k in arrays if k.startswith(prefix + ".") and k.endswith(".len")]
    columns = {}
    for k in keys:
        ends = np.cumsum(arrays[f"{prefix}.{k}.len"])
        columns[k] = np.split(arrays[f"{prefix}.{k}"], ends[:-1]) if len(ends) else []
    n = len(next(iter(columns.values()))) if columns else 0
    return [{k: columns[k][i] for k in keys} for i in range(n)]


def _save_cache(path: Path, train: list[Row], evals: list[Row], report: DataReport) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    meta = np.frombuffer(json.dumps(dataclasses.asdict(report)).encode(), np.uint8)
    np.savez(tmp, **_flatten(train, "train"), **_flatten(evals, "eval"), report=meta)
    os.replace(tmp, path)


def _load_cache(path: Path) -> tuple[list[Row], list[Row], DataReport]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    report = DataReport(**json.loads(arrays.pop("report").tobytes()))
    return _unflatten(arrays, "train"), _unflatten(arrays, "eval"), report
