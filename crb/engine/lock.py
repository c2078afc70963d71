"""`crb lock RECIPE`: what a run depends on, pinned: the resolved recipe, the package versions, the
model's revision (a hub commit, or the sha256 of a local model's config and weights index) and the
sha256 of every data file. Every run writes the same to OUTPUT/crb.lock.json; `crb run LOCKFILE`
trains the locked recipe and reports drift first: package versions (a warning), data or model
(an error)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from importlib import metadata
from pathlib import Path

from crb.data.reader import file_sha256, source_sha256
from crb.errors import CrbError
from crb.recipe import schema as recipes
from crb.tasks import TASKS

PACKAGES = ("crb", "torch", "transformers", "accelerate", "peft", "bitsandbytes", "deepspeed", "sentence-transformers",
            "liger-kernel", "tokenizers")
SUFFIX = ".lock.json"


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def model_revision(r: recipes.Recipe) -> str:
    """A local model: sha256 of its config (and weights index); a hub id: the pinned revision or 'unpinned'."""
    local = Path(r.model.name)
    if local.is_dir():
        parts = [local / n for n in ("config.json", "model.safetensors.index.json") if (local / n).is_file()]
        return "sha256:" + hashlib.sha256("".join(file_sha256(p) for p in parts).encode()).hexdigest()
    return r.model.revision or "unpinned"


def make(r: recipes.Recipe) -> dict:
    files = [*r.data.train, *r.data.eval, *r.data.corpus]
    return {"recipe_toml": recipes.dumps(r, TASKS), "source": r.source, "stage": r.stage, "packages": versions(),
            "model": {"name": r.model.name, "revision": model_revision(r)},
            "data": {f: source_sha256(f) for f in files}}


def write(r: recipes.Recipe, path: Path) -> Path:
    path.write_text(json.dumps(make(r), indent=1) + "\n")
    return path


def is_lock(ref: str) -> bool:
    return ref.endswith(SUFFIX)  # crb lock's NAME.lock.json, and a run's crb.lock.json


def load(path: str | Path, overrides: list[str] | None = None) -> tuple[recipes.Recipe, list[str]]:
    """The locked recipe and the package drift (warnings); data or model drift is an error."""
    path = Path(path)
    try:
        locked = json.loads(path.read_text())
        text = locked["recipe_toml"]
    except (OSError, ValueError, KeyError) as e:
        raise CrbError(f"{path}: not a crb lock file ({e})") from None
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, dir=path.parent) as f:
        f.write(text)
    try:
        r = recipes.load(f.name, overrides, locked.get("stage") or None, TASKS)
    finally:
        Path(f.name).unlink()
    if r.stages and not locked.get("stage"):
        raise CrbError(f"{path}: a lock holds one stage: run each stage's OUTPUT/<stage>/crb.lock.json")
    r.source = str(path)
    now = make(r)
    for file, digest in locked["data"].items():
        got = now["data"].get(file) or (source_sha256(file) if Path(file).exists() else "missing")
        if got != digest:
            raise CrbError(f"{path}: data drift: {file} sha256 was {digest[:12]}..., is {got[:12]}...")
    if now["model"] != locked["model"]:
        raise CrbError(f"{path}: model drift: locked {locked['model']}, now {now['model']}")
    drift = [f"{k} {v} -> {now['packages'].get(k)}" for k, v in locked["packages"].items()
             if now["packages"].get(k) != v]
    return r, drift
