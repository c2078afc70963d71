"""Recipes from elsewhere: bundled by name, https URLs pinned by sha256 (fetched once, checked), and a
fetched recipe's paths held under the working directory."""

from __future__ import annotations

import hashlib
import io

import pytest

from crb.cli import main as cli
from crb.errors import RecipeError
from crb.recipe import schema as recipes
from crb.recipe import sources


def test_bundled_recipes_by_name_in_run_and_extends(tmp_path, capsys):
    assert {"language", "code", "translation", "retrieval", "clara", "demo/retrieval"} <= set(sources.bundled())
    assert cli(["recipes"]) == 0 and "demo/retrieval" in capsys.readouterr().out
    assert recipes.load("demo/retrieval").data.format == "retrieval"
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "demo/retrieval"\n[train]\nlr = 1e-5\n')
    r = recipes.load(mine)
    assert r.train.lr == 1e-5 and r.data.format == "retrieval"


@pytest.fixture
def served(monkeypatch, tmp_path):
    """A fake https server: URL -> bytes (no network in tests); crb's cache in tmp_path."""
    pages: dict[str, bytes] = {}
    fetched: list[str] = []

    def urlopen(url, timeout=0):
        fetched.append(url)
        if url not in pages:
            raise OSError("404 not found")
        return io.BytesIO(pages[url])

    monkeypatch.setattr(sources.urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("CRB_CACHE", str(tmp_path / "cache"))
    return pages, fetched


def test_a_pinned_url_is_fetched_once_and_checked(served, tmp_path, monkeypatch):
    pages, fetched = served
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"text": "a"}\n')
    body = b'[model]\nname = "gpt2"\n[data]\ntrain = ["data.jsonl"]\nformat = "text"\n[output]\ndir = "out"\n'
    url = "https://example.org/r.toml"
    pages[url] = body
    pin = hashlib.sha256(body).hexdigest()
    r = recipes.load(f"{url}#sha256={pin}")
    assert r.data.train == [str((tmp_path / "data.jsonl").resolve())]  # fetched: paths from the working dir
    recipes.load(f"{url}#sha256={pin}")
    assert fetched == [url]  # the second load came from the cache

    with pytest.raises(RecipeError, match=r"sha256 mismatch: pinned 0{64}, got " + pin):
        recipes.load(f"{url}#sha256={'0' * 64}")
    with pytest.raises(RecipeError, match="must be https .* and pinned"):
        recipes.load(url)
    mine = tmp_path / "mine.toml"
    mine.write_text(f'extends = "http://example.org/r.toml#sha256={pin}"\n')
    with pytest.raises(RecipeError, match=r"mine\.toml:1: extends: http://example\.org/r\.toml#sha256=.*must be https"):
        recipes.load(mine)


@pytest.mark.parametrize("line, key", [('train = ["../secret.jsonl"]', "data.train"),
                                       ('train = ["/etc/passwd"]', "data.train"),
                                       ('train = ["d.jsonl"]\ncache_dir = "/tmp/elsewhere"', "data.cache_dir")])
def test_a_fetched_recipe_cannot_reach_outside_the_working_directory(served, tmp_path, monkeypatch, line, key):
    pages, _ = served
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "secret.jsonl").write_text('{"text": "a"}\n')
    (work / "d.jsonl").write_text('{"text": "a"}\n')
    body = f'[model]\nname = "gpt2"\n[data]\n{line}\nformat = "text"\n[output]\ndir = "out"\n'.encode()
    pages["https://example.org/evil.toml"] = body
    pin = hashlib.sha256(body).hexdigest()
    with pytest.raises(RecipeError, match=rf"{key}: a fetched recipe may only name paths under the working"):
        recipes.load(f"https://example.org/evil.toml#sha256={pin}")


def test_a_fetched_recipe_cannot_import_a_package_model(served, tmp_path, monkeypatch):
    pages, _ = served
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    body = b'[model]\nname = "package:os"\n[data]\ntrain = ["d.jsonl"]\nformat = "text"\n[output]\ndir = "out"\n'
    pages["https://example.org/p.toml"] = body
    with pytest.raises(RecipeError, match=r"model\.name: package:os: a fetched recipe cannot name a package"):
        recipes.load(f"https://example.org/p.toml#sha256={hashlib.sha256(body).hexdigest()}")


def test_a_hub_file_pinned_by_sha256(served, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    body = b'[model]\nname = "gpt2"\n[data]\ntrain = ["d.jsonl"]\nformat = "text"\n[output]\ndir = "out"\n'
    asked = []

    def download(repo, file, revision=None):
        asked.append((repo, file, revision))
        (tmp_path / "hub.toml").write_bytes(body)
        return str(tmp_path / "hub.toml")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    pin = hashlib.sha256(body).hexdigest()
    r = recipes.load(f"hf://retail/recipes/agents/text.toml@v1#sha256={pin}")
    assert asked == [("retail/recipes", "agents/text.toml", "v1")] and r.data.format == "text"
    with pytest.raises(RecipeError, match="sha256 mismatch"):
        recipes.load(f"hf://retail/recipes/agents/other.toml#sha256={'1' * 64}")
