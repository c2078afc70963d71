"""docs/recipes.md is generated from the recipe schema and must match it."""

from __future__ import annotations

import dataclasses
import re
import typing

from crb.recipe import schema as recipe
from crb.recipe.docs import DOCS, render


def test_recipes_md_is_up_to_date():
    assert DOCS.read_text(encoding="utf-8") == render(), (
        "docs/recipes.md is out of date with crb/recipe/schema.py: run `python -m crb.recipe.docs`")


def test_every_schema_key_is_documented():
    text = render()

    def walk(cls: type, key: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "source":
                continue
            tp = hints[f.name]
            sub = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
            if dataclasses.is_dataclass(sub):
                name = f"{key}.{f.name}" if key else f.name
                assert f"## [{name}]\n" in text or f"## [[{name}]]\n" in text, name
                walk(sub, name)
            else:
                assert f"| `{f.name}` |" in text and f.metadata["doc"] in text, f"{key}.{f.name}"

    walk(recipe.Recipe, "")


def test_example_error_is_real():
    assert "crb: error: recipe.toml:9: train.lrr: unknown key (did you mean 'train.lr'?)\n" in render()


def test_plan_md_shows_the_measured_accuracy_and_the_planner_coefficients():
    import json
    from pathlib import Path

    from crb.engine import plan

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "plan.md").read_text(encoding="utf-8")
    result = json.loads((root / "benchmarks" / "results" / "plan_accuracy.json").read_text())
    for row in result["rows"]:  # the measured peak beside its reserved memory (test_plan.py checks the plan's)
        if row["status"] != "ok":  # it ran out of memory: the table says so, at the step it did
            step = re.search(r"step \d+", next(x for x in row["note"] if "out of memory" in x)).group()
            assert f"out of memory at {step}" in text, row["setting"]
            continue
        assert f"| {row['measured_gib']:.2f} | {row['reserved_gib']:.2f} |" in text, row["setting"]
    h, i = plan.LORA_LAYER
    t5h, t5i = plan.T5_LAYER
    assert f"{h} h + {i} i" in text and f"{t5h} h + {t5i} i" in text
    assert f"{plan.T5_SCORE_BYTES} B per attention score" in text and f"x {plan.LOGIT_BYTES} B" in text
    (ch, ci), cs = plan.T5_COMPILED_LAYER, plan.T5_COMPILED_SCORE_BYTES
    assert f"{ch} h + {ci} i plus\n  {cs} B per score" in text and f"{plan.COMPILED_LORA_LAYER} of the eager" in text
