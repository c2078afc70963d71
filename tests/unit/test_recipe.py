"""Recipe errors as the user sees them: one line with the file, the line, the key path, expected vs got."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from crb.cli import main
from crb.errors import RecipeError
from crb.recipe import schema
from crb.recipe.schema import Recipe, find_line
from crb.tasks import TASKS


def load(path: str | Path, overrides: list[str] | None = None, stage: str | None = None) -> Recipe:
    """As every crb command loads a recipe: with the agents' own rules (formats, fields, keys, losses)."""
    return schema.load(path, overrides, stage, TASKS)


def to_dict(recipe: Recipe) -> dict:
    return schema.to_dict(recipe, TASKS)


def dumps(recipe: Recipe) -> str:
    return schema.dumps(recipe, TASKS)

# Line numbers below refer to this text: 1 [model], 4 [data], 5 train, 6 format, 8 [train], 9 lr,
# 10 batch_size, 11 micro_batch, 13 [output], 14 dir.
BASE = """\
[model]
name = "org/model"

[data]
train = ["train.jsonl"]
format = "chatml"

[train]
lr = 1e-3
batch_size = 8
micro_batch = 4

[output]
dir = "out"
"""


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


@pytest.fixture
def write(tmp_path):
    """write(text, name) -> the recipe's path, beside an existing train.jsonl."""
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")

    def write(text: str = BASE, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write


def error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as e:
        load(path, overrides)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_base_recipe_loads_with_defaults_and_absolute_paths(write, tmp_path):
    r = load(write())
    assert (r.model.name, r.data.format, r.method.name, r.train.scheduler) == ("org/model", "chatml", "lora", "cosine")
    assert r.train.lr == 1e-3 and r.train.batch_size == 8 and r.train.micro_batch == 4
    assert r.data.train == [str((tmp_path / "train.jsonl").resolve())]
    assert r.output.dir == str((tmp_path / "out").resolve())
    assert r.source == str(tmp_path / "recipe.toml")


# ---------------------------------------------------------------- TOML syntax


@pytest.mark.parametrize("old, new, line, what", [
    ('format = "chatml"', 'format = "chatml', 6, "Illegal character"),
    ("batch_size = 8", "lr = 2e-3", 10, "Cannot overwrite a value"),
    ("[output]", "[output", 13, "Expected ']'"),
])
def test_invalid_toml_names_the_parsers_line(write, old, new, line, what):
    path = write(edit(BASE, old, new))
    message = error(path)
    assert message.startswith(f"{path}:{line}: invalid TOML: {what}"), message
    assert "(at line" not in message  # the position is said once, as file:line


def test_recipe_file_not_found(tmp_path):
    assert error(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: recipe file not found"


# ---------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_suggests_the_nearest(write):
    path = write('extnds = "base.toml"\n' + BASE)
    assert error(path) == f"{path}:1: extnds: unknown key (did you mean 'extends'?)"


def test_unknown_top_level_key_without_a_near_one_lists_the_valid_keys(write):
    path = write('xyz = "blue"\n' + BASE)
    assert error(path) == (f"{path}:1: xyz: unknown key (valid: model, method, data, train, eval, "
                           "clara, losses, output, hardware, sweep, extends, stages, stage)")


def test_unknown_nested_key_suggests_the_nearest(write):
    path = write(edit(BASE, "lr = 1e-3", "lrr = 1e-3"))
    assert error(path) == f"{path}:9: train.lrr: unknown key (did you mean 'train.lr'?)"


def test_unknown_key_in_a_sub_table(write):
    path = write(BASE + "\n[method.lora]\nr = 8\nalpah = 16\n")
    assert error(path) == f"{path}:18: method.lora.alpah: unknown key (did you mean 'method.lora.alpha'?)"


def test_unknown_dotted_key_is_found_on_its_own_line(write):
    path = write(edit(BASE, "micro_batch = 4", 'micro_batch = 4\nmethod.name = "full"'))
    assert error(path).startswith(f"{path}:12: train.method: unknown key")


def test_source_is_not_a_recipe_key(write):
    path = write('source = "x.toml"\n' + BASE)
    assert error(path).startswith(f"{path}:1: source: unknown key")


# ---------------------------------------------------------------- types


@pytest.mark.parametrize("old, new, message", [
    ("lr = 1e-3", 'lr = "fast"', "9: train.lr: expected float, got str 'fast'"),
    ("lr = 1e-3", "epochs = 1.5", "9: train.epochs: expected integer, got float 1.5"),
    ("lr = 1e-3", "epochs = true", "9: train.epochs: expected integer, got bool True"),
    ('train = ["train.jsonl"]', 'train = "x.jsonl"', "5: data.train: expected list of string, got str 'x.jsonl'"),
    ('train = ["train.jsonl"]', "train = [1]", "5: data.train[0]: expected string, got int 1"),
    ('name = "org/model"', "name = 7", "2: model.name: expected string, got int 7"),
    ('[model]\nname = "org/model"', 'model = "org/model"', "1: model: expected a table, got str 'org/model'"),
])
def test_wrong_type_says_expected_and_got(write, old, new, message):
    path = write(edit(BASE, old, new))
    assert error(path) == f"{path}:{message}"


def test_an_integer_is_a_float_where_a_float_is_due(write):
    r = load(write(edit(BASE, "lr = 1e-3", "lr = 1")))
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("old, new, message", [
    ("lr = 1e-3", "lr = 0", "9: train.lr: expected a value > 0, got float 0.0"),
    ("lr = 1e-3", "lr = -1e-3", "9: train.lr: expected a value > 0, got float -0.001"),
    ("lr = 1e-3", "lr = nan", "9: train.lr: expected a finite number, got nan"),
    ("lr = 1e-3", "lr = inf", "9: train.lr: expected a finite number, got inf"),
    ("lr = 1e-3", "lr = 2.0", "9: train.lr: expected a value in [0, 1], got float 2.0"),
    ("lr = 1e-3", "warmup_ratio = 1.0", "9: train.warmup_ratio: expected a value in [0, 1), got float 1.0"),
    ("lr = 1e-3", "warmup_ratio = 1.5", "9: train.warmup_ratio: expected a value in [0, 1), got float 1.5"),
    ("batch_size = 8", "batch_size = 10",
     "10: train.batch_size: expected a multiple of train.micro_batch (4), got int 10"),
    ('format = "chatml"', 'format = "chatml"\neval = ["train.jsonl"]\neval_split = 0.1',
     "8: data.eval_split: expected 0 when data.eval lists files, got float 0.1"),
    ("lr = 1e-3", "epochs = 0", "9: train.epochs: expected epochs > 0 or max_steps > 0, got int 0"),
    ("lr = 1e-3", "keep_checkpoints = -1", "9: train.keep_checkpoints: expected a value >= 0, got int -1"),
    ('format = "chatml"', 'format = "chatml"\nmax_length = 100000000',
     "7: data.max_length: expected a value in [1, 1.04858e+06], got int 100000000"),
])
def test_impossible_value_says_expected_and_got(write, old, new, message):
    path = write(edit(BASE, old, new))
    assert error(path) == f"{path}:{message}"


# ---------------------------------------------------------------- choices


def test_unknown_method(write):
    path = write(BASE + '\n[method]\nname = "qlora2"\n')
    assert error(path) == f"{path}:17: method.name: expected one of 'full', 'lora', 'qlora', 'freeze', got str 'qlora2'"


def test_unknown_optimizer(write):
    path = write(edit(BASE, "lr = 1e-3", 'optimizer = "sgd"'))
    assert error(path) == (f"{path}:9: train.optimizer: expected one of 'adamw', 'adamw_8bit', 'paged_adamw_8bit', "
                           "got str 'sgd'")


def test_unknown_scheduler_suggests_the_nearest(write):
    path = write(edit(BASE, "lr = 1e-3", 'scheduler = "cosin"'))
    message = error(path)
    assert message.startswith(f"{path}:9: train.scheduler: expected one of linear, cosine, cosine_with_restarts")
    assert message.endswith("got 'cosin' (did you mean 'cosine'?)")


# ---------------------------------------------------------------- required keys and files


@pytest.mark.parametrize("old, new, message", [
    ('name = "org/model"', 'revision = "main"', "1: model.name: missing required key"),
    ('format = "chatml"', "max_length = 64", "4: data.format: missing required key"),
    ('dir = "out"', "", "13: output.dir: missing required key"),
    ('[output]\ndir = "out"\n', "", " output.dir: missing required key"),  # no [output]: no line to name
])
def test_missing_required_key(write, old, new, message):
    path = write(edit(BASE, old, new))
    assert error(path) == f"{path}:{message}"


def test_missing_data_file_names_the_path(write, tmp_path):
    path = write(edit(BASE, 'train = ["train.jsonl"]', 'train = ["train.jsonl", "data/nope.jsonl"]'))
    assert error(path) == f"{path}:5: data.train[1]: file not found: {tmp_path / 'data' / 'nope.jsonl'}"


def test_missing_eval_file(write, tmp_path):
    path = write(edit(BASE, 'format = "chatml"', 'format = "chatml"\neval = ["eval.jsonl"]'))
    assert error(path) == f"{path}:7: data.eval[0]: file not found: {tmp_path / 'eval.jsonl'}"


# ---------------------------------------------------------------- extends


def test_extends_child_overrides_and_parent_keys_are_kept(write, tmp_path):
    write(BASE, "base.toml")
    child = write('extends = "../base.toml"\n\n[train]\nlr = 5e-4\n\n[output]\ndir = "mine"\n', "sub/child.toml")
    r = load(child)
    assert r.train.lr == 5e-4  # the child's
    assert (r.train.batch_size, r.train.micro_batch, r.model.name) == (8, 4, "org/model")  # the parent's
    assert r.data.train == [str((tmp_path / "train.jsonl").resolve())]  # relative to the parent, which names it
    assert r.output.dir == str((tmp_path / "sub" / "mine").resolve())  # relative to the child, which names it
    assert r.source == str(child)


def test_extends_chain_of_three(write):
    write(BASE, "a.toml")
    write('extends = "a.toml"\n[train]\nlr = 2e-4\nepochs = 3\n', "b.toml")
    r = load(write('extends = "b.toml"\n[train]\nepochs = 5\n', "c.toml"))
    assert (r.train.lr, r.train.epochs, r.train.batch_size) == (2e-4, 5, 8)


def test_error_in_the_parent_names_the_parent_file_and_line(write):
    parent = write(edit(BASE, "lr = 1e-3", "epochs = 1.5"), "base.toml")
    child = write('extends = "base.toml"\n\n[train]\nbatch_size = 16\n', "child.toml")
    assert error(child) == f"{parent}:9: train.epochs: expected integer, got float 1.5"


def test_error_in_the_child_names_the_child_even_where_the_parent_has_the_table(write):
    write(BASE, "base.toml")
    child = write('extends = "base.toml"\n\n[train]\nlrr = 1e-4\n', "child.toml")
    assert error(child) == f"{child}:4: train.lrr: unknown key (did you mean 'train.lr'?)"


def test_value_check_names_the_file_that_set_the_value(write):
    write(BASE, "base.toml")
    child = write('extends = "base.toml"\n\n[train]\nmicro_batch = 3\n', "child.toml")
    # batch_size = 8 comes from the parent; micro_batch = 3 from the child makes it impossible
    assert error(child).startswith(f"{child.parent / 'base.toml'}:10: train.batch_size: expected a multiple of "
                                   "train.micro_batch (3), got int 8")


def test_missing_table_is_reported_in_the_recipe_loaded_not_its_parent(write):
    write(edit(BASE, '[output]\ndir = "out"\n', ""), "a_parent.toml")
    child = write('extends = "a_parent.toml"\n', "z_child.toml")
    assert error(child) == f"{child}: output.dir: missing required key"


def test_extends_file_not_found(write):
    child = write('# no parent\nextends = "nope.toml"\n' + BASE)
    assert error(child) == f"{child}:2: extends: file not found: {child.parent / 'nope.toml'}"


def test_circular_extends(write):
    a = write('extends = "b.toml"\n' + BASE, "a.toml")
    b = write('# b\nextends = "a.toml"\n', "b.toml")
    assert error(a) == f"{b}:2: extends: circular chain {a} -> {b} -> {a}"


def test_extends_itself(write):
    a = write('extends = "a.toml"\n' + BASE, "a.toml")
    assert error(a) == f"{a}:1: extends: circular chain {a} -> {a}"


# ---------------------------------------------------------------- --set


def test_set_parses_values_as_toml(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load(write(), ["train.lr=1e-4", "train.epochs=3", "train.betas=[0.8, 0.95]", "train.report_to=[]",
                       'data.train=["train.jsonl", "train.jsonl"]', "model.name=org/other model",
                       "method.lora.target_modules = [\"q_proj\"]"])
    assert r.train.lr == 1e-4 and isinstance(r.train.lr, float)
    assert r.train.epochs == 3 and isinstance(r.train.epochs, int)
    assert r.train.betas == [0.8, 0.95] and r.train.report_to == []
    assert r.data.train == [str(tmp_path / "train.jsonl")] * 2  # relative to the working folder
    assert r.model.name == "org/other model"  # not TOML: taken as a string
    assert r.method.lora.target_modules == ["q_proj"]


def test_set_beats_the_recipe_and_its_parent(write):
    write(BASE, "base.toml")
    child = write('extends = "base.toml"\n[train]\nlr = 5e-4\n', "child.toml")
    assert load(child, ["train.lr=3e-5"]).train.lr == 3e-5


@pytest.mark.parametrize("item, message", [
    ("train.lrr=1e-4", "--set: train.lrr: unknown key (did you mean 'train.lr'?)"),
    ("train.epochs=1.5", "--set: train.epochs: expected integer, got float 1.5"),
    ("train.lr=0", "--set: train.lr: expected a value > 0, got float 0.0"),
    ("train.scheduler=cosin", "--set: train.scheduler: expected one of linear, cosine,"),
    ("foo.bar=1", "--set: foo: unknown key (valid: model, method, data, train"),
    ("train.lr", "--set train.lr: expected key=value"),
    ("train.lr.x=1", "--set train.lr.x=1: lr is not a table"),
])
def test_set_errors_name_set(write, item, message):
    assert error(write(), [item]).startswith(message)


def test_set_into_a_table_the_recipe_lacks(write):
    path = write(edit(BASE, "[train]\nlr = 1e-3\nbatch_size = 8\nmicro_batch = 4\n", ""))

    def too_slow(*_):
        raise TimeoutError("locating the error looped")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(10)
    try:
        message = error(path, ["train.micro_batch=3"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert message == "--set: train.batch_size: expected a multiple of train.micro_batch (3), got int 8"


# ---------------------------------------------------------------- [[losses]]


LOSSES = '\n[[losses]]\nname = "causal_lm"\n\n[[losses]]\nname = "{name}"\nweight = 0.5\n'


def test_losses_load(write):
    r = load(write(BASE + LOSSES.format(name="causal_lm")))
    assert [(loss.name, loss.weight) for loss in r.losses] == [("causal_lm", 1.0), ("causal_lm", 0.5)]


def test_unknown_loss_suggests_the_nearest(write):
    path = write(BASE + LOSSES.format(name="causal_llm"))
    assert error(path) == f"{path}:20: losses[1].name: unknown loss 'causal_llm' (did you mean 'causal_lm'?)"


def test_unknown_loss_without_a_near_one_lists_the_known(write):
    path = write(BASE + LOSSES.format(name="dpo"))
    known = ("causal_lm, seq2seq, mnrl, cached_mnrl, clara_generation, clara_mse, rerank_mnrl, rerank_bce, "
             "rerank_lambda")
    assert error(path) == f"{path}:20: losses[1].name: unknown loss 'dpo' (known: {known})"


def test_unknown_key_in_a_loss(write):
    path = write(BASE + LOSSES.format(name="causal_lm").replace("weight", "wieght"))
    assert error(path) == f"{path}:21: losses[1].wieght: unknown key (did you mean 'losses[1].weight'?)"


# ---------------------------------------------------------------- find_line

FIND = """\
top = 1                     # 1
[method]                    # 2
name = "lora"               # 3
quant = { bits = 4 }        # 4
[ method . lora ]           # 5
r = 8                       # 6
[[losses]]                  # 7
name = "a"                  # 8
[[losses]]                  # 9
name = "b"                  # 10
"weight" = 2.0              # 11
[train]                     # 12
# lr = 1                    # 13
sched.name = "cosine"       # 14
sched.warmup = 0.1          # 15
"""


@pytest.mark.parametrize("key, line", [
    ("top", 1),
    ("method", 2),  # a table: its header
    ("method.name", 3),
    ("method.quant.bits", 4),  # inside an inline table: the table's line
    ("method.lora", 5),  # a header with spaces around the dot
    ("method.lora.r", 6),
    ("method.lora.alpha", 5),  # not written: its table's header
    ("losses", 7),
    ("losses[0].name", 8),
    ("losses[1]", 9),
    ("losses[1].name", 10),
    ("losses[1].weight", 11),  # a quoted key
    ("train.lr", 12),  # commented out: the header
    ("train.sched", 14),  # dotted keys: the first that defines it
    ("train.sched.warmup", 15),
    ("output.dir", None),
])
def test_find_line(key, line):
    assert find_line(FIND, key) == line


# ---------------------------------------------------------------- CLI


def test_cli_validate_bad_recipe_prints_one_line_and_exits_2(write, capsys):
    path = write(edit(BASE, "lr = 1e-3", "lrr = 1e-3"))
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"crb: error: {path}:9: train.lrr: unknown key (did you mean 'train.lr'?)\n"
    assert "Traceback" not in err


def test_cli_validate_bad_set_exits_2(write, capsys):
    assert main(["validate", str(write()), "--set", "train.epochs=1.5"]) == 2
    assert capsys.readouterr().err == "crb: error: --set: train.epochs: expected integer, got float 1.5\n"


def test_cli_validate_ok(write, capsys):
    path = write()
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok (lora org/model, chatml data: 1 record(s) in 1 file(s))\n"
    assert main(["validate", str(path), "--quick"]) == 0
    assert capsys.readouterr().out == f"{path}: ok (lora org/model, chatml data, 1 file(s))\n"


def test_cli_debug_raises(write):
    with pytest.raises(RecipeError, match="train.lrr: unknown key"):
        main(["--debug", "validate", str(write(edit(BASE, "lr = 1e-3", "lrr = 1e-3")))])


def test_cli_show_round_trips(write, tmp_path, capsys):
    path = write(BASE + LOSSES.format(name="causal_lm"))
    assert main(["show", str(path), "--set", "train.lr=3e-5", "--set", "method.name=full"]) == 0
    shown = capsys.readouterr().out
    assert f'"{(tmp_path / "train.jsonl").resolve()}"' in shown  # data paths are absolute
    again = tmp_path / "elsewhere" / "shown.toml"  # another folder: the absolute paths still resolve
    again.parent.mkdir()
    again.write_text(shown)
    first, second = to_dict(load(path, ["train.lr=3e-5", "method.name=full"])), to_dict(load(again))
    assert second["source"] == str(again)
    first.pop("source"), second.pop("source")
    assert second == first
    assert second["train"]["lr"] == 3e-5 and second["method"]["name"] == "full"
    assert dumps(load(again)).split("\n", 1)[1] == shown.split("\n", 1)[1]  # all but the `# resolved from` line


@pytest.mark.parametrize("table, message", [
    ('[method]\nname = "full"\n[method.lora]\nr = 8\n', "method.lora: not used by method.name 'full'"),
    ('[method]\nname = "lora"\n[method.quant]\nbits = 4\n', "method.quant: not used by method.name 'lora'"),
    ("[clara]\ntop_k = 3\n", "clara: not used by data.format 'chatml'"),
    ("[eval]\nnum_beams = 4\n", "eval.num_beams: not used by data.format 'chatml'"),
])
def test_a_table_the_method_does_not_use_is_an_error(write, table, message):
    path = write(BASE + "\n" + table)
    assert message in error(path) and error(path).startswith(f"{path}:")


def test_an_unused_table_is_a_warning_when_the_method_comes_from_elsewhere(write):
    write(BASE + '\n[method]\nname = "lora"\n[method.lora]\nr = 8\n', "base.toml")
    child = write('extends = "base.toml"\n[method]\nname = "full"\n', "child.toml")
    with pytest.warns(UserWarning, match="method.lora: not used by method.name 'full'.*ignored"):
        r = load(child)
    assert r.method.name == "full" and "lora" not in to_dict(r)["method"]
    path = write(BASE + '\n[method]\nname = "lora"\n[method.lora]\nr = 8\n', "qlora.toml")
    with pytest.warns(UserWarning, match="method.name set in --set"):
        load(path, ['method.name="full"'])
    assert "method.quant: not used" in error(path, ["method.quant.bits=8"])


def test_the_old_clara_stage_key_is_refused_with_its_new_name(tmp_path):
    """clara.stage became clara.phase ("stage" is a [[stages]] entry): the old key is an error that names the new
    one, at its file and line."""
    path = tmp_path / "r.toml"
    path.write_text('[model]\nname = "m"\n[method]\nname = "lora"\n[data]\nformat = "clara"\ntrain = ["x.jsonl"]\n'
                    '[clara]\nstage = "instruction"\n')
    with pytest.raises(RecipeError, match=r"r\.toml:9: clara\.stage: unknown key \(did you mean 'clara\.phase'\?\)"):
        load(path)


def test_the_command_line_wins_over_a_stage_s_own_keys(write, tmp_path):
    """`--set` reaches every stage, over what a stage sets itself (a sweep's train.lr, a benchmark's data); a bad
    value set that way is reported as --set's; the stage's other keys stay."""
    (tmp_path / "other.jsonl").write_text((tmp_path / "train.jsonl").read_text())
    path = write(BASE + '\n[[stages]]\nname = "one"\n\n[[stages]]\nname = "two"\ntrain.lr = 5e-6\n'
                 'train.epochs = 3\ndata.train = ["other.jsonl"]\n')
    assert load(path, stage="two").train.lr == 5e-6
    two = load(path, ["train.lr=1e-3", f'data.train=["{tmp_path / "train.jsonl"}"]'], stage="two")
    assert two.train.lr == 1e-3 and two.train.epochs == 3 and two.data.train == [str(tmp_path / "train.jsonl")]
    assert load(path, ["train.lr=1e-3"], stage="one").train.lr == 1e-3
    with pytest.raises(RecipeError, match=r"^--set.*train\.lr"):
        load(path, ['train.lr="fast"'], stage="two")
