"""The agents' registry (crb.tasks): every agent implements the whole Task interface, an unknown format is one
line with the nearest, and no module outside crb/tasks/ decides by the format's name."""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path

import pytest

from crb.errors import RecipeError
from crb.recipe import schema
from crb.tasks import LOSSES, TASKS, Task, get_task

CRB = Path(__file__).resolve().parents[2] / "crb"
# The methods every agent writes (the others have a default in Task).
OWN = [name for name, f in vars(Task).items() if inspect.isfunction(f) and "raise NotImplementedError" in
       inspect.getsource(f)]


def test_the_registry_holds_the_formats_the_recipe_names():
    """The recipe layer names no format: data.format, each format's fields, keys and losses come from the
    registry (adding an agent is one module and one line in crb.tasks)."""
    assert typing.get_type_hints(schema.DataConfig)["format"] is str
    assert not {"FORMAT_KEYS", "FORMAT_FIELDS"} & set(vars(schema))
    assert set(LOSSES) == {name for task in TASKS.values() for name in task.allowed_losses}


def test_a_new_agent_is_a_module_and_a_registry_line(tmp_path):
    """An agent the schema has never heard of (here: text under another name, reading its own field) loads with
    its format, fields and losses once it is in the registry, and is an unknown format with a hint before."""
    from crb.errors import RecipeError

    class Faq(type(TASKS["text"])):
        format, field = "faq", "answer"

    (tmp_path / "faq.jsonl").write_text('{"body": "Returns are free within 30 days."}\n')
    path = tmp_path / "faq.toml"
    path.write_text('[model]\nname = "m"\n[method]\nname = "lora"\n[data]\nformat = "faq"\ntrain = ["faq.jsonl"]\n'
                    '[data.columns]\nanswer = "body"\n[[losses]]\nname = "causal_lm"\n[output]\ndir = "out"\n')
    r = schema.load(path, tasks={**TASKS, "faq": Faq()})
    assert (r.data.format, r.data.columns, r.losses[0].name) == ("faq", {"answer": "body"}, "causal_lm")
    with pytest.raises(RecipeError, match=r"faq.toml:6: data.format: unknown format .*'faq'"):
        schema.load(path, tasks=TASKS)


@pytest.mark.parametrize("fmt", list(TASKS))
def test_every_task_implements_the_whole_interface(fmt):
    task = TASKS[fmt]
    assert isinstance(task, Task) and task.format == fmt
    for name in typing.get_type_hints(Task):  # every attribute set, of its type
        assert hasattr(task, name), f"{fmt}: {name} not set"
    assert task.kind in ("causal", "seq2seq", "embedding", "clara")
    assert task.auto_class is None or task.auto_class.__name__.startswith("AutoModelFor")
    assert task.default_losses and set(task.default_losses) <= set(task.allowed_losses) <= set(LOSSES)
    assert task.kernels in ("liger", "cce", "none") and task.label_shift in (0, 1)
    assert isinstance(task.token_keys, tuple) and all(isinstance(k, str) for k in task.token_keys)
    assert {"check", "make_row", "truncate", "texts", "batcher", "verify"} <= set(OWN)
    for name in OWN:
        assert getattr(type(task), name) is not getattr(Task, name), f"{fmt}: {name} not written"
    for name, f in vars(Task).items():  # the methods keep the interface's parameters
        if inspect.isfunction(f):
            assert list(inspect.signature(getattr(task, name)).parameters) == \
                list(inspect.signature(f).parameters)[1:], f"{fmt}: {name}"


def test_an_unknown_format_names_the_nearest():
    with pytest.raises(RecipeError, match=r"^data\.format: unknown format 'chat' \(did you mean 'chatml'\?\)$"):
        get_task("chat")
    with pytest.raises(RecipeError, match=r"unknown format 'dpo' \(known: chatml, text, translation, retrieval, "
                                          r"clara, rerank\)"):
        get_task("dpo")
    assert get_task("clara") is TASKS["clara"]


NAMES = "|".join(TASKS)
FORMAT = r"\b(format|fmt)\b"  # data.format, in any of its spellings: r.data.format, cfg.format, fmt, ["format"]
# A decision by the format's name: the format compared with a literal or a constant (FORMATS), or looking up a table.
COMPARE = re.compile(FORMAT + r"[\"'\]]*\s*(==|!=|\bnot\s+in\b|\bin\b)\s*([(\[{\"']|[\w.]*\b[A-Z_]{3,}\b)")
REVERSED = re.compile(rf"[\"']({NAMES})[\"']\s*(==|!=)[^=]*" + FORMAT)
SUBSCRIPT = re.compile(r"(?<=[\w)\]])\[((?:[^\[\]]|\[[^\[\]]*\])*)\]")  # x[index] (one level of nesting)
GET = re.compile(r"\.get\(\s*[^,()\"']*" + FORMAT)


def decides(line: str, declared: bool = False) -> bool:
    """Whether a line of code decides by the format's name (`declared`: crb/recipe/schema.py, whose format-keyed
    data is the recipe's vocabulary, and which receives the registry as `tasks`)."""
    code = line.split("#")[0]
    lookup = GET.search(code) or any(re.search(FORMAT, index) and not re.fullmatch(r"\s*[\"'][^\"']*[\"']\s*", index)
                                     for index in SUBSCRIPT.findall(code))  # not the ["format"] of a dict itself
    return bool(COMPARE.search(code) or REVERSED.search(code) or (not declared and lookup))


def test_no_module_outside_the_tasks_decides_by_the_format_name():
    found = []
    for path in sorted(CRB.rglob("*.py")):
        rel = path.relative_to(CRB.parent).as_posix()
        if rel.startswith("crb/tasks/"):
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if decides(line, rel == "crb/recipe/schema.py"):
                found.append(f"{rel}:{no}: {line.strip()}")
    assert not found, "ask the recipe's task (crb.tasks.get_task) instead:\n" + "\n".join(found)


def test_the_guard_sees_the_old_dispatch():
    """The forms the dispatch had before the registry are caught; asking the task is not."""
    old = ['if recipe.data.format == "clara":', 'if "clara" != cfg.format:', 'if not rows or fmt == "retrieval":',
           'if d.format not in ("chatml", "text"):', 'shift = 1 if cfg.format in ("chatml", "text") else 0',
           'if packing and fmt in CAUSAL_FORMATS and gpu:', 'if base.data.format in recipes.WHOLE_BATCH_FORMATS:',
           'kind = KINDS[recipe["data"]["format"]]', 'default = DEFAULT_LOSS[recipe.data.format]',
           'keys = {"clara": ("dec_ids",)}.get(fmt, ("input_ids",))',
           'fmt = recipe["data"]["format"]; return fmt in {"chatml"}']
    assert all(decides(line) for line in old), [line for line in old if not decides(line)]
    new = ["task = get_task(recipe.data.format)", 'get_task(recipe["data"]["format"]).verify(load, recipe)',
           'if task.kind == "clara":', 'head = f"{args.recipe}: ok ({r.data.format} data"',
           'return _meta_model(recipe.model.name, recipe.model.revision, get_task(recipe.data.format).auto_class)']
    assert not any(decides(line) for line in new), [line for line in new if decides(line)]
