"""`crb validate`: every record of every data file the recipe names goes through the checks training runs,
without loading a model or tokenizer; the first errors are listed with file:line, exit code 2.
`--quick` checks the recipe only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import transformers

from crb.cli import main as cli
from tests.conftest import retrieval_recipe_text, write_jsonl, write_recipe
from tests.integration.test_bad_input import CHAT_OK, DATA_CASES

NO_MODEL = "model.name='no-such-org/no-such-model'"  # a hub id nothing here can load
PAIR_OK = {"source_lang": "eng_Latn", "target_lang": "fra_Latn", "source_text": "Hi", "target_text": "Salut"}
TRIPLE_OK = {"query": "red shoes", "positive": "Red running shoes.", "negative": "A blue scarf."}


@pytest.fixture
def no_models(monkeypatch):
    """Any model, tokenizer or config load fails the test."""

    def boom(*_args, **_kwargs):
        raise AssertionError("crb validate loaded a model, tokenizer or config")

    for cls in (transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, transformers.AutoTokenizer,
                transformers.AutoConfig, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", boom)
    monkeypatch.setattr("crb.engine.build.build_model", boom)
    monkeypatch.setattr("crb.engine.build.build_tokenizer", boom)


def validate(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # not what fixtures printed while building models
    rc = cli(["validate", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def bad_file(tmp_path: Path, good: dict, bad: dict | str, name: str = "bad.jsonl") -> Path:
    """good, bad, good: the bad record on line 2."""
    line = bad if isinstance(bad, str) else json.dumps(bad)
    path = tmp_path / name
    path.write_text(f"{json.dumps(good)}\n{line}\n{json.dumps(good)}\n")
    return path


def chat_set(path: Path) -> list[str]:
    return ["--set", f"data.train=['{path}']", "--set", "data.eval_split=0", "--set", NO_MODEL]


def translation_set(path: Path) -> list[str]:
    return ["--set", f"data.train=['{path}']", "--set", "data.eval=[]", "--set", NO_MODEL]


BAD = {  # name: (recipe fixture, good record, bad line, --set for the bad file, expected on stderr)
    "bad json": ("chat_recipe", CHAT_OK, '{"messages": [', chat_set, r"bad\.jsonl:2: bad JSON"),
    "wrong role": ("chat_recipe", CHAT_OK, {"messages": [{"role": "bot", "content": "x"}]}, chat_set,
                   r"bad\.jsonl:2: messages\[0\]\.role: expected one of system, user, assistant, got 'bot'"),
    "empty messages": ("chat_recipe", CHAT_OK, {"messages": []}, chat_set,
                       r"bad\.jsonl:2: messages: expected a non-empty list"),
    "unsupported language": ("translation_recipe", PAIR_OK, {**PAIR_OK, "target_lang": "xxx_Latn"}, translation_set,
                             r"bad\.jsonl:2: target_lang: unsupported language code 'xxx_Latn'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_record_fails_validation_with_its_file_and_line(request, tmp_path, capsys, no_models, name):
    fixture, good, bad, sets, expected = BAD[name]
    recipe = request.getfixturevalue(fixture)
    path = bad_file(tmp_path, good, bad)
    rc, out, err = validate(capsys, [str(recipe), *sets(path)])
    assert rc == 2 and ": ok (" not in out
    assert re.fullmatch(rf"crb: error: {re.escape(str(tmp_path))}/{expected}.*\n", err), err
    rc, out, _ = validate(capsys, [str(recipe), *sets(path), "--quick"])  # the recipe only: today's check
    assert rc == 0 and out.startswith(f"{recipe}: ok (")


def test_retrieval_record_without_positive_and_a_bad_corpus_document(tmp_path, capsys, no_models):
    good = write_jsonl(tmp_path / "good.jsonl", [TRIPLE_OK] * 3)
    bad = bad_file(tmp_path, TRIPLE_OK, {"query": "red shoes", "negative": "A blue scarf."})
    corpus = bad_file(tmp_path, {"text": "A hat."}, {"text": ""}, "corpus.jsonl")
    recipe = write_recipe(tmp_path / "r.toml", retrieval_recipe_text(tmp_path, "no-such-org/model", bad, good,
                                                                     corpus))
    rc, _, err = validate(capsys, [str(recipe)])  # every file: train, eval, corpus
    assert rc == 2 and err == (f"crb: error: {bad}:2: missing field 'positive'\n"
                               f"crb: error: {corpus}:2: text: expected non-empty text\n")
    rc, _, err = validate(capsys, [str(recipe), "--set", f"data.train=['{good}']"])
    assert rc == 2 and err == f"crb: error: {corpus}:2: text: expected non-empty text\n"


def test_every_chat_and_text_error_is_the_one_crb_run_stops_at(chat_recipe, tmp_path, capsys):
    """One rule: validate reports each of test_bad_input's broken records exactly as crb run does."""
    for name, (fmt, line, _) in DATA_CASES.items():
        good = CHAT_OK if fmt == "chatml" else {"text": "A retail store sells navy suits."}
        path = tmp_path / "bad.jsonl"
        path.write_bytes(json.dumps(good).encode() + b"\n" + (line if isinstance(line, bytes) else line.encode())
                         + b"\n")
        sets = ["--set", f"data.train=['{path}']", "--set", f"data.format='{fmt}'", "--set", "data.eval_split=0"]
        assert cli(["run", str(chat_recipe), *sets]) == 2, name
        run_error = capsys.readouterr().err.strip().splitlines()[-1]
        rc, _, err = validate(capsys, [str(chat_recipe), *sets])
        assert rc == 2 and err == run_error + "\n", name


def test_a_clean_recipe_is_ok_with_its_record_counts_and_loads_no_model(chat_recipe, capsys, no_models):
    rc, out, err = validate(capsys, [str(chat_recipe), "--set", NO_MODEL])
    assert rc == 0 and err == ""
    assert out == f"{chat_recipe}: ok (lora no-such-org/no-such-model, chatml data: 64 record(s) in 1 file(s))\n"


def test_the_first_ten_errors_then_a_count(chat_recipe, tmp_path, capsys, no_models):
    path = write_jsonl(tmp_path / "bad.jsonl", [CHAT_OK, *[{"messages": []}] * 14])
    rc, _, err = validate(capsys, [str(chat_recipe), *chat_set(path)])
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 11
    assert lines[0] == f"crb: error: {path}:2: messages: expected a non-empty list of {{role, content}}"
    assert lines[9].startswith(f"crb: error: {path}:11: ")
    assert lines[10] == "crb: error: ... and 4 more malformed record(s)"


def test_bad_records_skip_warns_and_passes_unless_nothing_is_left(chat_recipe, tmp_path, capsys, no_models):
    path = bad_file(tmp_path, CHAT_OK, "not json")
    skip = [*chat_set(path), "--set", "data.bad_records='skip'"]
    rc, out, err = validate(capsys, [str(chat_recipe), *skip])
    assert rc == 0 and err.startswith(f"crb: warning: {path}:2: bad JSON")
    assert out.endswith('3 record(s) in 1 file(s), 1 malformed to be skipped (data.bad_records = "skip"))\n')
    path.write_text("not json\n")
    rc, _, err = validate(capsys, [str(chat_recipe), *skip])
    assert rc == 2 and err.splitlines()[-1].startswith(f"crb: error: {path}: no usable training records")


def test_translation_records_in_other_directions_are_counted_not_errors(translation_recipe, tmp_path, capsys,
                                                                        no_models):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR_OK, {**PAIR_OK, "source_lang": "hin_Deva"}])
    rc, out, err = validate(capsys, [str(translation_recipe), *translation_set(path)])
    assert rc == 0 and err == ""
    assert out.endswith("translation data: 2 record(s) in 1 file(s), 1 in directions the recipe does not train)\n")


def test_every_stage_of_a_staged_recipe_is_checked_as_that_stage(tmp_path, capsys, no_models):
    stage1 = write_jsonl(tmp_path / "s1.jsonl", [{"question": ["Q?"], "answers": ["A."], "docs": ["D."]}])
    stage2 = write_jsonl(tmp_path / "s2.jsonl", [{"question": "Q?", "docs": ["D0.", "D1."], "answer": "A.",
                                                  "pos_index": [0]}] * 2)
    recipe = write_recipe(tmp_path / "clara.toml", f"""
[model]
name = "no-such-org/no-such-model"
[method]
name = "lora"
[data]
format = "clara"
train = ["{stage1}"]
[clara]
top_k = 2
[output]
dir = "{tmp_path / 'out'}"
[[stages]]
name = "compression"
clara.phase = "compression"
[[stages]]
name = "instruction"
clara.phase = "instruction"
data.train = ["{stage2}"]
""")
    rc, out, _ = validate(capsys, [str(recipe)])
    assert rc == 0 and out.endswith("stage compression 1 record(s) in 1 file(s); "
                                    "stage instruction 2 record(s) in 1 file(s))\n")
    stage2.write_text(stage2.read_text() + json.dumps({"question": "Q?", "docs": ["D0.", "D1."], "answer": "A.",
                                                       "pos_index": [2]}) + "\n")
    rc, _, err = validate(capsys, [str(recipe)])
    assert rc == 2 and err == f"crb: error: {stage2}:3: pos_index[0]: 2 is out of range for 2 docs (0..1)\n"
    rc, _, err = validate(capsys, [str(recipe), "--set", "clara.top_k=3"])  # the stage's own rule: top_k documents
    assert rc == 2 and err.startswith(f"crb: error: {stage2}:1: docs: expected at least clara.top_k (3) documents")
