"""No network: `crb plan` works on every bundled recipe from the model configs shipped with crb, and these
are the shapes test_plan.py checks the planner on; a model neither reachable nor shipped is one line, exit 2."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from crb.cli import main
from crb.engine import build, hub
from crb.engine import plan as plans
from crb.recipe import schema as recipes
from tests.unit.test_plan import RECIPES, ROOT, SHAPES

LAYERS = {"language": 32, "code": 30, "translation": 24, "retrieval": 24, "clara": 32}  # checkpointable blocks
# What the planner reads of a config (aliases resolve: T5's num_heads is its num_attention_heads).
KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
        "num_hidden_layers", "encoder_layers", "decoder_layers", "num_attention_heads", "num_key_value_heads",
        "decoder_attention_heads", "head_dim", "d_kv", "feed_forward_proj", "scale_embedding", "tie_word_embeddings",
        "sliding_window")
MISSING = "nobody/no-such-model"


def model_name(recipe: str) -> str:
    return recipes.load(ROOT / "recipes" / f"{recipe}.toml").model.name


def last_error_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-1500:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("crb: error: "), err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("recipe", list(LAYERS))
def test_plan_of_every_bundled_recipe_works_with_no_hub(no_hub, capsys, recipe):
    plans._meta_model.cache_clear()  # built afresh here, from the shipped config
    assert main(["plan", str(ROOT / "recipes" / f"{recipe}.toml"), "--gpu-memory", "80", "--json"]) == 0
    out, err = capsys.readouterr()
    planned = json.loads(out)
    for p in planned.values() if recipe == "clara" else [planned]:  # a recipe with [[stages]]: each stage's plan
        assert p["notes"]["layers"] == LAYERS[recipe] and p["total_gib"] > 1 and p["fits"] is True
    assert f"crb: model.name '{model_name(recipe)}': using the config shipped with crb" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_shipped_configs_are_the_planner_tests_shapes(recipe):
    """Every bundled recipe's model has a shipped config, with test_plan.py's SHAPES values (no silent drift)."""
    from transformers import AutoConfig

    folder = hub.shipped_config(model_name(recipe))
    assert folder is not None, f"no config shipped for {recipe}'s model"
    shipped, expected = AutoConfig.from_pretrained(folder), SHAPES[RECIPES[recipe]]
    assert {k: getattr(shipped, k, None) for k in KEYS} == {k: getattr(expected, k, None) for k in KEYS}


def test_plan_of_a_model_neither_reachable_nor_shipped_is_one_line(no_hub, capsys):
    line = last_error_line(capsys, ["plan", str(ROOT / "recipes" / "language.toml"),
                                    "--set", f'model.name="{MISSING}"'])
    assert f"model.name '{MISSING}': cannot load its config" in line
    assert f"hf download {MISSING} --local-dir" in line and "HF_HUB_OFFLINE" in line and "model.revision" in line


def test_a_pinned_revision_is_not_planned_from_the_shipped_config(no_hub, capsys):
    plans._meta_model.cache_clear()
    line = last_error_line(capsys, ["plan", str(ROOT / "recipes" / "code.toml"), "--set", 'model.revision="v0.1"'])
    assert "model.name 'bigcode/starcoder2-3b'" in line and "without model.revision" in line


@pytest.mark.parametrize("what", ["tokenizer", "weights", "config"])
def test_every_loader_names_the_model_and_what_to_do(no_hub, what):
    """The tokenizer, weights and config loads of `crb run` (and data, merge, verify) fail as one HubError."""
    loaders = {"tokenizer": lambda: build.build_tokenizer(recipes.load(ROOT / "recipes" / "language.toml",
                                                                       [f'model.name="{MISSING}"'])),
               "weights": lambda: build.load_weights(AutoModelForCausalLM, MISSING),
               "config": lambda: hub.config(MISSING)}
    with pytest.raises(hub.HubError) as e:
        loaders[what]()
    assert f"model.name '{MISSING}': cannot load its {what}" in str(e.value) and "\n" not in str(e.value)


def test_a_missing_sentence_transformers_model_is_one_line(no_hub):
    r = recipes.load(ROOT / "recipes" / "retrieval.toml", [f'model.name="{MISSING}"'])
    with pytest.raises(hub.HubError, match=f"model.name '{MISSING}': cannot load its sentence-transformers model"):
        build.build_encoder(r)


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """No network and HF_HUB_OFFLINE not set: the probe's request fails as a failed DNS lookup does, and any later
    request fails the test. Yields the probe's requests."""
    from huggingface_hub import constants, utils

    calls: list[str] = []

    class NoNetwork:
        def head(self, url, **kw):
            calls.append(url)
            raise OSError("[Errno -2] Name or service not known")

        def __getattr__(self, name):
            raise AssertionError(f"the hub was contacted ({name}) after it was found unreachable")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(utils, "get_session", lambda: NoNetwork())
    hub.reachable.cache_clear()
    yield calls
    hub.reachable.cache_clear()


def test_an_unreachable_hub_is_found_once_and_the_cache_used_at_once(unreachable_hub, capsys):
    """One probe finds the hub unreachable; the config comes from the cache or crb's copy with no further request
    (no retries: huggingface_hub would spend ~25 s on each file)."""
    from huggingface_hub import constants

    assert main(["plan", str(ROOT / "recipes" / "translation.toml"), "--gpu-memory", "24", "--json"]) == 0
    err = capsys.readouterr().err
    assert unreachable_hub == [constants.ENDPOINT]
    assert "using the config shipped with crb" in err and "the hub cannot be reached" in err and "Retrying" not in err


def test_an_unreachable_hub_makes_a_run_load_from_the_cache_at_once(unreachable_hub, capfd, caplog):
    """The tokenizer and weights of a run, the same: not cached, one line at once, not a request more (nor the
    retries of one: transformers' adapter lookup ignores local_files_only unless told again)."""
    with pytest.raises(hub.HubError, match=r"model\.name 'mistralai/Mistral-7B-Instruct-v0\.3': cannot load its "
                                           r"tokenizer") as e:
        build.build_tokenizer(recipes.load(ROOT / "recipes" / "language.toml"))
    assert "\n" not in str(e.value) and len(unreachable_hub) == 1
    with pytest.raises(hub.HubError, match="cannot load its weights"):
        build.load_weights(AutoModelForCausalLM, "mistralai/Mistral-7B-Instruct-v0.3")
    assert len(unreachable_hub) == 1
    assert "Retrying" not in capfd.readouterr().err + caplog.text  # huggingface_hub logs each retry
