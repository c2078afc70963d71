"""`crb data RECIPE inspect | check | clean`: the training guide's data-quality advice as commands, for
any agent's data format, on the files the recipe names (what differs by format is its task's: Task.texts,
problems, describe).

- inspect: records, tokens per record (the recipe's tokenizer and rendering, as training sees them),
  how many exceed data.max_length, and per format: roles and turns (chat), language pairs
  (translation), negatives per query (retrieval), documents and questions per record (CLaRa).
- check: exact and near duplicates (train/eval overlap separately: leakage), encoding damage
  (invalid UTF-8, mojibake, control characters), empty fields, chats not ending with the assistant;
  each finding with file:line. Errors make the command exit 1.
- clean: a cleaned copy (duplicates dropped, Unicode repaired by ftfy, empty records dropped); the
  input is never touched."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from crb.data.chatml import chat_template
from crb.data.reader import Record, read_records
from crb.errors import CrbError, DataError
from crb.recipe.schema import Recipe
from crb.tasks import get_task


def normalised(s: str) -> str:
    """Case, accents, punctuation and spacing folded: near duplicates share it."""
    s = unicodedata.normalize("NFKD", s.casefold())
    return " ".join(re.sub(r"[\W_]+", " ", "".join(c for c in s if not unicodedata.combining(c))).split())


def _key(fields: dict[str, list[str]], norm: bool) -> str:
    body = json.dumps([normalised(t) if norm else t for v in fields.values() for t in v], ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def _records(files: list[str], columns: dict[str, str]) -> list[Record | DataError]:
    return [r for f in files for r in read_records(f, columns)]


# ---------------------------------------------------------------- inspect


def inspect(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Lengths (by `tokenizer`, the recipe's), what the format's task counts (roles and turns, language pairs,
    negatives, documents and questions) and bad records of the recipe's data files."""
    cfg, task = recipe.data, get_task(recipe.data.format)
    template = chat_template(tokenizer, cfg.chat_template)
    lengths, read, bad = [], [], 0
    for rec in _records([*cfg.train, *cfg.eval], cfg.columns):
        if isinstance(rec, DataError):
            bad += 1
            continue
        try:
            made = task.make_row(task.check(rec, cfg, recipe.clara), rec.where(), cfg, tokenizer, template,
                                 recipe.clara)
        except DataError:
            bad += 1
            continue
        if made is not None:
            lengths.append(made[1])
        read.append(rec.data)
    if not lengths:
        raise CrbError(f"{cfg.train[0]}: no usable records to inspect ({bad} malformed)")
    a = np.asarray(lengths)
    out = {"format": cfg.format, "files": [*cfg.train, *cfg.eval], "records": len(lengths), "malformed": bad,
           "tokens": {"min": int(a.min()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
                      "max": int(a.max()), "total": int(a.sum())},
           "over_max_length": int((a > cfg.max_length).sum()), "max_length": cfg.max_length,
           "lengths": [int(x) for x in a]}
    return {**out, **task.describe(read)}


def histogram(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    ax.hist(report["lengths"], bins=min(50, max(5, len(report["lengths"]) // 5)), color="#4c72b0")
    ax.axvline(report["max_length"], color="red", linestyle="--", label=f"data.max_length {report['max_length']}")
    ax.set_xlabel("tokens per record (as training renders it)")
    ax.set_ylabel("records")
    ax.set_title(f"{report['records']} {report['format']} records: median {report['tokens']['median']:.0f}, "
                 f"p95 {report['tokens']['p95']:.0f}, {report['over_max_length']} over max_length", loc="left")
    ax.legend(frameon=False)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- check


@dataclass
class Finding:
    severity: str  # "error" | "warning"
    where: str
    what: str


@dataclass
class CheckResult:
    findings: list[Finding] = field(default_factory=list)
    records: int = 0

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for f in self.findings)


CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check(recipe: Recipe) -> CheckResult:
    from ftfy.badness import is_bad

    cfg, res, task = recipe.data, CheckResult(), get_task(recipe.data.format)
    seen: dict[tuple[bool, str], str] = {}  # (near?, key) -> first train file:line
    for split, files in (("train", cfg.train), ("eval", cfg.eval)):
        for rec in _records(files, recipe.data.columns):
            if isinstance(rec, DataError):
                res.findings.append(Finding("error", str(rec).split(": ", 1)[0], str(rec).split(": ", 1)[-1]))
                continue
            res.records += 1
            fields, where = task.texts(rec.data), rec.where()
            if not fields:
                res.findings.append(Finding("error", where, f"no text fields for format {cfg.format}"))
            for name, values in fields.items():
                for v in values:
                    if not v.strip():
                        res.findings.append(Finding("error", where, f"{name}: empty"))
                    elif CONTROL.search(v):
                        res.findings.append(Finding("warning", where, f"{name}: control characters"))
                    elif is_bad(v):
                        res.findings.append(Finding("warning", where, f"{name}: mojibake (crb data clean repairs it)"))
            res.findings += [Finding("error", where, what) for what in task.problems(rec.data)]
            for near in (False, True):
                key = (near, _key(fields, near))
                first = seen.get(key)
                if first is None:
                    if split == "train":
                        seen[key] = where
                elif split == "eval":
                    res.findings.append(Finding("error", where, f"also in the training data at {first} (leakage)"))
                    break
                else:
                    kind = "near duplicate" if near else "duplicate"
                    res.findings.append(Finding("warning", where, f"{kind} of {first}"))
                    break
    return res


# ---------------------------------------------------------------- clean


def clean(recipe: Recipe, out: Path) -> dict[str, int]:
    """Cleaned JSONL copies of the training sources in `out` (same stems, .jsonl): records that do not parse, have an
    empty field, or duplicate an earlier one (near duplicates included) dropped; text repaired by ftfy."""
    from ftfy import fix_text

    out.mkdir(parents=True, exist_ok=True)
    counts, seen, task = Counter(), set(), get_task(recipe.data.format)
    for file in recipe.data.train:
        target = out / (Path(file).stem + ".jsonl")  # every source kind is written out as JSONL
        if target.resolve() == Path(file).resolve():
            raise CrbError(f"crb data clean: --out {out} would overwrite {file}")
        kept = []
        for rec in read_records(file, recipe.data.columns):
            if isinstance(rec, DataError):
                counts["dropped: malformed"] += 1
                continue
            d = _repair(rec.data, fix_text, counts)
            fields = task.texts(d)
            if not fields or any(not v.strip() for vs in fields.values() for v in vs):
                counts["dropped: empty field"] += 1
                continue
            key = _key(fields, norm=True)
            if key in seen:
                counts["dropped: duplicate"] += 1
                continue
            seen.add(key)
            kept.append(d)
        target.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in kept), encoding="utf-8")
        counts["kept"] += len(kept)
    return dict(counts)


def _repair(value: Any, fix, counts: Counter) -> Any:
    if isinstance(value, str):
        fixed = fix(value).strip()
        if fixed != value:
            counts["repaired: text"] += 1
        return fixed
    if isinstance(value, list):
        return [_repair(v, fix, counts) for v in value]
    if isinstance(value, dict):
        return {k: _repair(v, fix, counts) if k not in ("role", "source_lang", "target_lang") else v
                for k, v in value.items()}
    return value
