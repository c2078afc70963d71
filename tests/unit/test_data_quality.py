"""`crb data inspect | check | clean` on small files holding each defect, and on real CLaRa records (fixtures)."""

from __future__ import annotations

import json
import re

import pytest

from crb import quality
from crb.cli import main as cli
from crb.engine.build import build_tokenizer
from crb.recipe import schema as recipes
from tests.conftest import CLARA_SLICE


def chat(user: str, answer: str = "We do.", last: str = "assistant") -> str:
    msgs = [{"role": "user", "content": user}, {"role": last, "content": answer}]
    return json.dumps({"messages": msgs}, ensure_ascii=False)


LINES = [
    chat("Do you have navy suits?"),                         # 1
    chat("Do you have navy suits?"),                         # 2 duplicate of 1
    chat("do you have NAVY suits"),                          # 3 near duplicate of 1
    chat("Is the cafÃ© open?"),                              # 4 mojibake
    chat("Where is\x07 the till?"),                          # 5 control character
    chat(""),                                                # 6 empty content
    chat("Thanks", "bye", last="user"),                      # 7 last turn not the assistant's
    '{"messages": "\xff"}',                                  # 8 invalid UTF-8 (written as a raw byte below)
    chat("What sizes does the grey coat come in?"),          # 9 fine
]


@pytest.fixture
def defects(chat_recipe, tmp_path):
    train = tmp_path / "defects.jsonl"
    raw = "\n".join(LINES).encode("utf-8").replace("\xff".encode(), b"\xff") + b"\n"
    train.write_bytes(raw)
    evals = tmp_path / "held.jsonl"
    evals.write_text(chat("What sizes does the grey coat come in?") + "\n" + chat("A new question?") + "\n")
    text = re.sub(r'train = \["[^"]+"\]', f'train = ["{train}"]\neval = ["{evals}"]', chat_recipe.read_text())
    chat_recipe.write_text(re.sub(r"eval_split = [0-9.]+", "eval_split = 0", text))
    return chat_recipe, train, evals


def test_check_finds_each_defect_with_file_and_line(defects, capsys):
    recipe, train, evals = defects
    res = quality.check(recipes.load(recipe))
    got = {(f.where, f.severity, f.what.split(" (")[0].split(":")[0]) for f in res.findings}
    t, e = str(train), str(evals)
    assert {(f"{t}:2", "warning", f"duplicate of {t}"), (f"{t}:3", "warning", f"near duplicate of {t}"),
            (f"{t}:4", "warning", "messages[0].content"), (f"{t}:5", "warning", "messages[0].content"),
            (f"{t}:6", "error", "messages[0].content"), (f"{t}:7", "error", "the last turn is not the assistant's"),
            (f"{t}:8", "error", "invalid UTF-8 at byte 14"), (f"{e}:1", "error", "also in the training data at " + t)
            } <= got
    assert not [f for f in res.findings if f.where in (f"{t}:1", f"{t}:9", f"{e}:2")]
    assert cli(["data", str(recipe), "check"]) == 1  # errors: non-zero
    assert f"{e}:1: error: also in the training data at {t}:9 (leakage)" in capsys.readouterr().out


def test_clean_writes_a_repaired_copy_and_leaves_the_input(defects, tmp_path, capsys):
    recipe, train, _ = defects
    before = train.read_bytes()
    assert cli(["data", str(recipe), "clean", "--out", str(tmp_path / "clean")]) == 0
    assert train.read_bytes() == before
    kept = [json.loads(x) for x in (tmp_path / "clean" / "defects.jsonl").read_text().splitlines()]
    users = [r["messages"][0]["content"] for r in kept]
    assert users == ["Do you have navy suits?", "Is the café open?", "Where is the till?", "Thanks",
                     "What sizes does the grey coat come in?"]
    out = capsys.readouterr().out
    assert "dropped: duplicate 2" in out and "dropped: empty field 1" in out and "dropped: malformed 1" in out
    assert "repaired: text 2" in out  # the mojibake and the control character


def test_inspect_counts_match_an_independent_count(chat_recipe, chat_file, capsys):
    r = recipes.load(chat_recipe)
    rep = quality.inspect(r, build_tokenizer(r))
    records = [json.loads(x) for x in chat_file.read_text().splitlines() if x.strip()]
    assert rep["records"] == len(records) and rep["malformed"] == 0
    roles = {}
    for r in records:
        for m in r["messages"]:
            roles[m["role"]] = roles.get(m["role"], 0) + 1
    assert rep["roles"] == roles
    assert rep["tokens"]["min"] <= rep["tokens"]["median"] <= rep["tokens"]["p95"] <= rep["tokens"]["max"]
    assert rep["over_max_length"] == sum(n > rep["max_length"] for n in rep["lengths"])
    assert cli(["data", str(chat_recipe), "inspect", "--json", "--out", str(chat_file.with_suffix(".png"))]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == len(records)
    assert chat_file.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_clara_pretrain_data_matches_an_independent_count(chat_recipe, tiny_model, tmp_path):
    recipe = tmp_path / "clara.toml"
    recipe.write_text(f'extends = "clara"\n[model]\nname = "{tiny_model}"\n[data]\ntrain = ["{CLARA_SLICE}"]\n'
                      f'eval_split = 0.0\n[output]\ndir = "{tmp_path / "out"}"\n')
    r = recipes.load(recipe, stage="compression")
    rep = quality.inspect(r, build_tokenizer(r))
    counts: dict[str, int] = {}
    n = 0
    for line in CLARA_SLICE.read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        n += 1
        k = f"docs {len(d['docs'])}, questions {len(d['question'])}"
        counts[k] = counts.get(k, 0) + 1
    assert rep["records"] + rep["malformed"] == n and rep["per_record"] == counts


@pytest.mark.parametrize("fmt, good, dup, empty", [
    ("text", {"text": "Navy suits in stock."}, {"text": "navy suits in stock"}, {"text": " "}),
    ("translation", {"source_lang": "eng_Latn", "target_lang": "fra_Latn", "source_text": "Hi", "target_text": "Salut"},
     {"source_lang": "eng_Latn", "target_lang": "fra_Latn", "source_text": "hi!", "target_text": "salut"},
     {"source_lang": "eng_Latn", "target_lang": "fra_Latn", "source_text": "Hi", "target_text": ""}),
    ("retrieval", {"query": "boots", "positive": "Rain boots", "negative": "Sandals"},
     {"query": "Boots", "positive": "rain boots", "negative": "sandals"},
     {"query": "boots", "positive": "", "negative": "Sandals"}),
    ("clara", {"question": ["Open?"], "answers": ["Yes"], "docs": ["We open at nine."]},
     {"question": ["open"], "answers": ["yes"], "docs": ["we open at nine"]},
     {"question": ["Open?"], "answers": [""], "docs": ["We open at nine."]}),
])
def test_check_on_every_format(chat_recipe, tmp_path, fmt, good, dup, empty):
    f = tmp_path / f"{fmt}.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in (good, dup, empty)))
    text = re.sub(r'train = \["[^"]+"\]', f'train = ["{f}"]', chat_recipe.read_text())
    text = re.sub(r'format = "chatml"', f'format = "{fmt}"', text)
    if fmt == "retrieval":  # the encoder trains whole, one pass per batch
        text = text.replace('name = "lora"', 'name = "full"').replace("micro_batch = 4", "micro_batch = 8")
        text = re.sub(r"\nlora = \{[^\n]*\}", "", text)  # full trains no adapters
    chat_recipe.write_text(text)
    r = recipes.load(chat_recipe)
    found = {(x.where, x.severity, x.what.split(":")[0]) for x in quality.check(r).findings}
    assert (f"{f}:2", "warning", f"near duplicate of {f}") in found
    assert any(w == f"{f}:3" and s == "error" for w, s, _ in found)  # the empty field
    counts = quality.clean(r, tmp_path / "clean")
    assert counts["kept"] == 1 and counts["dropped: duplicate"] == 1 and counts["dropped: empty field"] == 1
