"""Bad input, held to one standard: every broken recipe and data file below gets one line on stderr,
`crb: error: FILE:LINE: KEY: ...` (or the record's file:line and field), exit code 2, no traceback.
Recipes go through `crb validate`; data files through `crb run`, which stops before loading a model."""

from __future__ import annotations

import json
import re

import pytest
import tomli_w
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crb.cli import main as cli
from tests.conftest import write_jsonl


def one_line_error(capsys, argv: list[str]) -> str:
    rc = cli(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured.err[-1500:]
    assert "Traceback" not in captured.err + captured.out
    assert lines and lines[-1].startswith("crb: error: "), captured.err
    return lines[-1]


RECIPE_CASES = {  # name: (lines added to a valid recipe's [train] table or the whole text, expected)
    "wrong type": ("seed = \"fast\"", r"recipe\.toml:\d+: train\.seed: expected"),
    "unknown key": ("lrr = 0.1", r"recipe\.toml:\d+: train\.lrr: unknown key \(did you mean 'train\.lr'\?\)"),
    "wrong choice": ("optimizer = \"adam\"", r"recipe\.toml:\d+: train\.optimizer: expected one of"),
    "negative": ("max_steps = -3", r"recipe\.toml:\d+: train\.max_steps"),
    "bad toml": ("lr = = 1", r"recipe\.toml:\d+: invalid TOML"),
    "bad profile": (None, r"recipe\.toml:\d+: hardware\.profile: expected one of"),
    "missing data file": (None, r"recipe\.toml:\d+: data\.train\[0\]: file not found: .*missing\.jsonl"),
}


@pytest.mark.parametrize("name", list(RECIPE_CASES))
def test_broken_recipes(chat_recipe, capsys, name):
    extra, expected = RECIPE_CASES[name]
    text = chat_recipe.read_text()
    if name == "bad profile":
        text += '\n[hardware]\nprofile = "zero9"\n'
    elif name == "missing data file":
        text = re.sub(r'train = \["[^"]+"\]', 'train = ["missing.jsonl"]', text)
    else:
        text = text.replace("[train]\n", f"[train]\n{extra}\n", 1)
    chat_recipe.write_text(text)
    assert re.search(expected, one_line_error(capsys, ["validate", str(chat_recipe)]))


def test_circular_extends(tmp_path, capsys):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    err = one_line_error(capsys, ["validate", str(tmp_path / "a.toml")])
    assert "extends" in err and "a.toml" in err and re.search("circular|cycle|loop", err)


CHAT_OK = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
DATA_CASES = {  # name: (format, the bad line as written, expected)
    "bad json": ("chatml", '{"messages": [', r"bad\.jsonl:2: bad JSON"),
    "not an object": ("chatml", '["a"]', r"bad\.jsonl:2: expected a JSON object"),
    "wrong role": ("chatml", json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
                   r"bad\.jsonl:2: messages\[0\]\.role: expected one of"),
    "chat missing field": ("chatml", '{"text": "hi"}', r"bad\.jsonl:2: missing field 'messages'"),
    "empty content": ("chatml", json.dumps({"messages": [{"role": "user", "content": ""},
                                                         {"role": "assistant", "content": "x"}]}),
                      r"bad\.jsonl:2: messages\[0\]\.content"),
    "text missing field": ("text", '{"body": "hi"}', r"bad\.jsonl:2: missing field 'text'"),
    "empty text": ("text", '{"text": "   "}', r"bad\.jsonl:2: text"),
    "non-utf8": ("chatml", b'{"messages": "\xff"}', r"bad\.jsonl:2: invalid UTF-8"),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_broken_chat_and_text_records(chat_recipe, tmp_path, capsys, name):
    fmt, line, expected = DATA_CASES[name]
    good = CHAT_OK if fmt == "chatml" else {"text": "A retail store sells navy suits."}
    bad = tmp_path / "bad.jsonl"
    raw = line if isinstance(line, bytes) else line.encode()
    bad.write_bytes(json.dumps(good).encode() + b"\n" + raw + b"\n" + json.dumps(good).encode() + b"\n")
    err = one_line_error(capsys, ["run", str(chat_recipe), "--set", f"data.train=['{bad}']", "--set",
                                  f"data.format='{fmt}'", "--set", "data.eval_split=0"])
    assert re.search(expected, err), err


def test_over_long_record_with_overlong_error(chat_recipe, tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "suit " * 400}, {"role": "assistant", "content": "ok"}]}
    bad = write_jsonl(tmp_path / "bad.jsonl", [CHAT_OK, long])
    err = one_line_error(capsys, ["run", str(chat_recipe), "--set", f"data.train=['{bad}']", "--set",
                                  "data.overlong='error'", "--set", "data.eval_split=0"])
    assert re.search(r"bad\.jsonl:2: .*(max_length|tokens)", err), err


@pytest.mark.parametrize("record, expected", [
    ({"source_lang": "eng_Latn", "target_lang": "xxx_Latn", "source_text": "a", "target_text": "b"},
     r"bad\.jsonl:2: target_lang: unsupported language code 'xxx_Latn'"),
    ({"source_lang": "eng_Latn", "target_lang": "fra_Latn", "source_text": "a"},
     r"bad\.jsonl:2: missing field 'target_text'"),
], ids=["wrong language code", "translation missing field"])
def test_broken_translation_records(translation_recipe, tmp_path, capsys, record, expected):
    good = {"source_lang": "eng_Latn", "target_lang": "fra_Latn", "source_text": "Hi", "target_text": "Salut"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    err = one_line_error(capsys, ["run", str(translation_recipe), "--set", f"data.train=['{bad}']", "--set",
                                  "data.eval=[]", "--set", "data.eval_split=0"])
    assert re.search(expected, err), err


@pytest.mark.parametrize("local_tokenizer", [False, True], ids=["tokenizer", "config"])
def test_a_model_not_on_reach_is_one_line(chat_recipe, tiny_model, no_hub, capsys, local_tokenizer):
    """No hub and not cached: the tokenizer, or with a local one the model's config (the plan), names the model
    and what to do."""
    extra = ["--set", f"model.tokenizer='{tiny_model}'"] if local_tokenizer else []
    err = one_line_error(capsys, ["run", str(chat_recipe), "--set", "model.name='nobody/no-such-model'", *extra])
    what = "config" if local_tokenizer else "tokenizer"
    assert f"model.name 'nobody/no-such-model': cannot load its {what}" in err and "HF_HUB_OFFLINE" in err, err


# ---------------------------------------------------------------- property: random mutations, never a traceback

VALUES = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.text(max_size=12), st.lists(st.integers(-5, 5), max_size=3),
                   st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=2))


def paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out.extend(paths(v, (*prefix, k)))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_recipe_mutations_never_raise_a_traceback(chat_recipe, capsys, data):
    recipe = tomllib.loads(chat_recipe.read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths(recipe)))
        parent = recipe
        for k in where[:-1]:
            parent = parent[k]
        action = data.draw(st.sampled_from(["set", "delete", "add"]))
        if action == "set":
            parent[where[-1]] = data.draw(VALUES)
        elif action == "delete":
            del parent[where[-1]]
        else:
            parent[data.draw(st.text(min_size=1, max_size=8))] = data.draw(VALUES)
    mutated = chat_recipe.with_name("mutated.toml")
    mutated.write_text(tomli_w.dumps(recipe))
    rc = cli(["validate", str(mutated)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert rc == 0 or (rc == 2 and len(captured.err.strip().splitlines()) == 1
                       and captured.err.startswith("crb: error: ")), captured.err
