"""Data: read the recipe's files, tokenize by format, apply the over-length policy, split off
eval, pack or not; cached by data hash + tokenizer + data section."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from crb.data import retrieval, translation
from crb.data.chatml import chat_template, check_messages, tokenize_chat
from crb.data.clara_inputs import decoder_ids, document_ids
from crb.data.packing import Doc, one_per_row, pack, pack_groups
from crb.data.reader import Record, file_sha256, read_jsonl
from crb.data.text import check_text, tokenize_text
from crb.engine.recipe import ClaraConfig, DataConfig
from crb.errors import DataError

Row = dict[str, np.ndarray]
CACHE_VERSION = "3"


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


def _lm_doc(rec: Record, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str) -> Doc:
    if cfg.format == "chatml":
        name = cfg.field or "messages"
        if name not in rec.data:
            raise DataError(f"{rec.where()}: missing field '{name}'")
        return tokenize_chat(check_messages(rec.data[name], rec.where()), tokenizer, template, rec.where())
    name = cfg.field or "text"
    if name not in rec.data:
        raise DataError(f"{rec.where()}: missing field '{name}'")
    return tokenize_text(check_text(rec.data[name], rec.where(), name), tokenizer)


def _make_row(rec: Record, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, template: str,
              report: DataReport, clara_cfg: ClaraConfig | None = None) -> tuple[Row | Doc, int] | None:
    """One record in its format's shape, with its length in tokens (None: not in the recipe's directions)."""
    if cfg.format == "translation":
        pair = translation.check_pair(rec.data, rec.where(), cfg, tokenizer)
        if not translation.in_directions(pair, cfg):
            report.other_directions += 1
            return None
        row = translation.tokenize_pair(pair, tokenizer)
        return row, max(len(row["input_ids"]), len(row["labels"]))
    if cfg.format == "retrieval":
        texts, instruction = retrieval.check_triple(rec.data, rec.where()), retrieval.instruction_of(rec.data)
        with_prompts = [f"{instruction} {texts[0]}".strip(), *texts[1:]]  # as the encoder will read them
        return retrieval.row(texts, instruction), max(len(ids) for ids in tokenizer(with_prompts)["input_ids"])
    if cfg.format == "clara":
        row = clara_row(rec, clara_cfg, tokenizer, template)
        return row, len(row["dec_ids"])
    doc = _lm_doc(rec, cfg, tokenizer, template)
    return doc, len(doc[0])


def clara_row(rec: Record, c: ClaraConfig, tokenizer: PreTrainedTokenizerBase, template: str) -> Row:
    """A CLaRa record as token ids: documents for the encoder (flattened), the decoder prompt and labels,
    and in stage 3 the question for the query reasoner and the gold documents."""
    from crb.data import clara  # here, so `python -m crb.data.clara` runs without a double import

    n_mem = c.doc_max_length // c.compress_rate
    where = rec.where()
    if c.stage == "compression":
        r = clara.check_stage1(rec.data, where)
        docs, question, answer, gold, slots = [r["doc"]], None, clara.stage1_target(r["qa"]), [0], 1
    else:
        r = clara.check_stage23(rec.data, where)
        docs, question, answer, gold = r["docs"], r["question"], r["answer"], r["pos_index"]
        if len(docs) < c.top_k:
            raise DataError(f"{where}: docs: expected at least clara.top_k ({c.top_k}) documents, got {len(docs)}")
        if c.stage == "instruction":
            docs = docs[: c.top_k]
        slots = c.top_k
    encoded = [document_ids(d, tokenizer, c.doc_max_length, n_mem) for d in docs]
    dec_ids, dec_labels = decoder_ids(question, answer, slots, n_mem, tokenizer, template, where)
    row = {"doc_ids": np.concatenate([e[0] for e in encoded]), "doc_mask": np.concatenate([e[1] for e in encoded]),
           "dec_ids": dec_ids, "dec_labels": dec_labels, "gold": np.asarray(gold, np.int64)}
    if c.stage == "end_to_end":
        row["query_ids"], row["query_mask"] = document_ids(question, tokenizer, c.doc_max_length, n_mem)
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
    for file in files:
        for rec in read_jsonl(file):
            try:
                if isinstance(rec, DataError):
                    raise rec
                report.records += 1
                made = _make_row(rec, cfg, tokenizer, template, report, clara_cfg)
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
            if labels is not None and all(t == -100 for t in labels[1:]):  # nothing left to learn (cut)
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
    key = _cache_key(cfg, tokenizer, template, seed, clara_cfg if cfg.format == "clara" else None)
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
        report.target_tokens = int(sum((r["labels"][shift:] != -100).sum() for r in train))
    _save_cache(cache, train, evals, report)
    return train, evals, report


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
