"""The agents' registry (crb.tasks): every agent implements the whole Task interface, and an unknown format is one
line with the nearest."""

from __future__ import annotations

import inspect
import typing

import pytest

from crb.errors import RecipeError
from crb.losses import LOSSES
from crb.recipe import schema
from crb.tasks import TASKS, Task, get_task

# The methods every agent writes (the others have a default in Task).
OWN = [name for name, f in vars(Task).items() if inspect.isfunction(f) and "raise NotImplementedError" in
       inspect.getsource(f)]


def test_the_registry_holds_the_formats_the_recipe_names():
    assert list(TASKS) == list(typing.get_args(typing.get_type_hints(schema.DataConfig)["format"]))
    assert set(schema.FORMAT_KEYS) <= set(TASKS)


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
                                          r"clara\)"):
        get_task("dpo")
    assert get_task("clara") is TASKS["clara"]
