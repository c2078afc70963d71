"""Data: read the recipe's files, tokenize by format, apply the over-length policy, split off
eval, pack or not; cached by data hash + tokenizer + data section."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from crb.data import retrieval, translation
from crb.data.chatml import chat_template, check_messages, tokenize_chat
from crb.data.clara_inputs import PARAPHRASE, decoder_ids, document_ids
from crb.data.packing import Doc, one_per_row, pack, pack_groups
from crb.data.reader import Record, file_sha256, read_jsonl
from crb.data.text import check_text, tokenize_text
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


def check_record(rec: Record, cfg: DataConfig, clara_cfg: ClaraConfig | None = None) -> Any:
    """A record's fields in its format's shape, checked as training checks them, or a DataError naming the record
    and the field at fault. No tokenizer: what needs one (token counts, language tokens) comes after."""
    where = rec.where()
    if cfg.format == "translation":
        return translation.check_pair(rec.data, where, cfg)
    if cfg.format == "retrieval":
        return retrieval.check_triple(rec.data, where)
    if cfg.format == "clara":
        return _check_clara(rec.data, where, clara_cfg)
    name = cfg.field or ("messages" if cfg.format == "chatml" else "text")
    if name not in rec.data:
        raise DataError(f"{where}: missing field '{name}'")
    if cfg.format == "chatml":
        return check_messages(rec.data[name], where)
    return check_text(rec.data[name], where, name)


def _check_clara(data: dict, where: str, c: ClaraConfig) -> dict:
    """A CLaRa record's documents (those the stage reads), question, answer, gold indices and memory slots."""
    from crb.data import clara  # here, so `python -m crb.data.clara` runs without a double import

    if c.phase == "compression":
        r = clara.check_stage1(data, where)
        return {"docs": [r["doc"]], "question": None, "answer": r["target"], "gold": [0], "slots": 1,
                "instruction": PARAPHRASE if r["data_type"] == "paraphrase" else None}
    r = clara.check_stage23(data, where)
    if len(r["docs"]) < c.top_k:
        raise DataError(f"{where}: docs: expected at least clara.top_k ({c.top_k}) documents, got {len(r['docs'])}")
    docs, gold = r["docs"], r["pos_index"]
    if c.phase == "instruction":  # top_k of the candidates: the gold ones and the first others, in record order
        keep = clara.instruction_docs(len(docs), gold, c.top_k)
        docs, gold = [docs[i] for i in keep], [keep.index(g) for g in gold if g in keep]
    return {"docs": docs, "question": r["question"], "answer": r["answer"], "gold": gold, "slots": c.top_k,
            "instruction": None}


def _make_row(rec: Record, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
              report: DataReport, clara_cfg: ClaraConfig | None = None) -> tuple[Row | Doc, int] | None:
    """One record in its format's shape, with its length in tokens (None: not in the recipe's directions)."""
    checked = check_record(rec, cfg, clara_cfg)
    if cfg.format == "translation":
        translation.check_language_tokens(checked, rec.where(), tokenizer)
        if not translation.in_directions(checked, cfg):
            report.other_directions += 1
            return None
        row = translation.tokenize_pair(checked, tokenizer)
        return row, max(len(row["input_ids"]), len(row["labels"]))
    if cfg.format == "retrieval":
        instruction = retrieval.instruction_of(rec.data)
        with_prompts = [f"{instruction} {checked[0]}".strip(), *checked[1:]]  # as the encoder will read them
        return retrieval.row(checked, instruction), max(len(ids) for ids in tokenizer(with_prompts)["input_ids"])
    if cfg.format == "clara":
        row = clara_row(checked, clara_cfg, tokenizer, template, rec.where())
        return row, len(row["dec_ids"])
    if cfg.format == "chatml":
        doc = tokenize_chat(checked, tokenizer, template, rec.where())
    else:
        doc = tokenize_text(checked, tokenizer)
    return doc, len(doc[0])


def clara_row(r: dict, c: ClaraConfig, tokenizer: PreTrainedTokenizerBase, template: str, where: str) -> Row:
    """A checked CLaRa record (`_check_clara`) as token ids: documents for the encoder (flattened), the decoder
    prompt and labels, and in stage 3 the question for the query reasoner and the gold documents."""
    n_mem = c.memory_tokens
    encoded = [document_ids(d, tokenizer, c.doc_max_length, n_mem) for d in r["docs"]]
    dec_ids, dec_labels = decoder_ids(r["question"], r["answer"], r["slots"], n_mem, tokenizer, template, where,
                                      r["instruction"])
    row = {"doc_ids": np.concatenate([e[0] for e in encoded]), "doc_mask": np.concatenate([e[1] for e in encoded]),
           "dec_ids": dec_ids, "dec_labels": dec_labels, "gold": np.asarray(r["gold"], np.int64)}
    if c.phase == "end_to_end":
        row["query_ids"], row["query_mask"] = document_ids(r["question"], tokenizer, c.doc_max_length, n_mem)
    return row


def _truncate(item: Row | Doc, cfg: DataConfig) -> Row | Doc:
    if cfg.format == "translation":
        return translation.truncate(item, cfg.max_length)
    if cfg.format == "retrieval":
        return item  # the encoder's tokenizer cuts at max_length (model.max_seq_length)
    if cfg.format == "clara":
        cut = cfg.max_length
        return {**item, "dec_ids": item["dec_ids"][:cut], "dec_labels": item["dec_labels"][:cut]}
    ids, labels = item
    return ids[: cfg.max_length], labels[: cfg.max_length]


def _read(files: list[str], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
          report: DataReport, clara_cfg: ClaraConfig | None = None) -> tuple[list, list[str]]:
    """The usable records as items, and each one's file:line."""
    items, wheres = [], []
    first: tuple[int, str] | None = None  # stage 3: the first record's number of candidates, and where it is
    for file in files:
        for rec in read_jsonl(file):
            try:
                if isinstance(rec, DataError):
                    raise rec
                report.records += 1
                made = _make_row(rec, cfg, tokenizer, template, report, clara_cfg)
                if made and cfg.format == "clara" and clara_cfg.phase == "end_to_end":  # rows stack their docs
                    n = len(made[0]["doc_ids"]) // clara_cfg.doc_width
                    first = first or (n, rec.where())
                    if n != first[0]:
                        raise DataError(f"{rec.where()}: docs: {n} candidate documents, {first[0]} at {first[1]}: "
                                        "stage 3 needs the same number in every record (python -m crb.data.clara "
                                        "build-stages --docs N makes them so)")
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
                item = _truncate(item, cfg)
                report.truncated += 1
            labels = item["dec_labels"] if cfg.format == "clara" else item[1] if cfg.format in ("chatml", "text") \
                else None
            if labels is not None and all(t == IGNORE for t in labels[1:]):  # nothing left to learn (cut)
                report.dropped_no_target += 1
                continue
            items.append(item)
            wheres.append(rec.where())
    return items, wheres


def _rows(items: list, wheres: list[str], cfg: DataConfig) -> tuple[list[Row], list[str]]:
    """Rows, and for each the file:line of the records in it."""
    if cfg.format not in ("chatml", "text"):
        return items, wheres  # already rows
    if not cfg.packing:
        return one_per_row(items), wheres
    groups = pack_groups([len(ids) for ids, _ in items], cfg.max_length)
    return pack(items, cfg.max_length), [", ".join(wheres[i] for i in g) for g in groups]


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, clara_cfg: ClaraConfig | None = None
            ) -> tuple[list[Row], list[Row], DataReport]:
    """(train rows, eval rows, report), from the cache when the same data was prepared before."""
    template = chat_template(tokenizer, cfg.chat_template)
    key = _cache_key(cfg, tokenizer, template, seed, clara_cfg if uses(cfg.format, "clara") else None)
    cache = Path(cfg.cache_dir).expanduser() / f"{key}.npz"
    if cache.is_file():
        return _load_cache(cache)
    report = DataReport()
    docs, wheres = _read(cfg.train, cfg, tokenizer, template, report, clara_cfg)
    if cfg.eval:
        eval_docs, eval_wheres = _read(cfg.eval, cfg, tokenizer, template, report, clara_cfg)
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
    (train, report.train_sources), (evals, _) = _rows(docs, wheres, cfg), _rows(eval_docs, eval_wheres, cfg)
    report.train_rows, report.eval_rows = len(train), len(evals)
    if "input_ids" in train[0]:
        report.train_tokens = int(sum(len(r["input_ids"]) for r in train))
        shift = 1 if cfg.format in ("chatml", "text") else 0  # causal labels shift by one
        report.target_tokens = int(sum((r["labels"][shift:] != IGNORE).sum() for r in train))
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


def validate(cfg: DataConfig, clara_cfg: ClaraConfig | None = None) -> Validation:
    """Every record of the data files (train, eval, a retrieval corpus) through the checks training runs, short of
    those that need the tokenizer (token counts, language tokens, the chat template): no model or tokenizer loads."""
    v = Validation()
    corpus = cfg.corpus if uses(cfg.format, "data.corpus") else []
    for split, files in (("train", cfg.train), ("eval", cfg.eval), ("corpus", corpus)):
        for file in files:
            v.files += 1
            for rec in read_jsonl(file):
                v.records += 1
                try:
                    if isinstance(rec, DataError):
                        raise rec
                    if split == "corpus":
                        retrieval.check_document(rec.data, rec.where())
                        continue
                    checked = check_record(rec, cfg, clara_cfg)
                except DataError as e:  # training skips a malformed record only where bad_records says so
                    v.add("warning" if cfg.bad_records == "skip" and split != "corpus" else "error", e.one_line())
                    continue
                if cfg.format == "translation" and not translation.in_directions(checked, cfg):
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
        h.update(file_sha256(file).encode())
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
