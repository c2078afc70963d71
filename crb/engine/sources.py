"""Where a recipe comes from: a local path, a recipe bundled with crb by name (`crb recipes` lists
them: "language", "demo/retrieval"), or an https URL pinned by its sha256 (`https://.../r.toml#sha256=HEX`),
fetched once into crb's cache. An unpinned URL, or one whose content does not match its pin, is an error."""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from pathlib import Path

from crb.errors import RecipeError

BUNDLED = Path(__file__).resolve().parents[2] / "recipes"
PIN = re.compile(r"^(https://[^#\s]+)#sha256=([0-9a-f]{64})$")


def bundled() -> dict[str, Path]:
    """Bundled recipes by name ("language", "demo/code", ...)."""
    if not BUNDLED.is_dir():
        return {}
    return {str(p.relative_to(BUNDLED).with_suffix("")): p for p in sorted(BUNDLED.rglob("*.toml"))}


def cache_dir() -> Path:
    return Path(os.environ.get("CRB_CACHE", Path.home() / ".cache" / "crb")) / "recipes"


def resolve(ref: str, base: Path | None = None, where: str = "") -> Path:
    """The local file for `ref` (relative paths against `base`); `where` prefixes errors ("file:line: key: ")."""
    if ref.startswith(("http://", "https://")):
        return fetch_pinned(ref, where)
    path = (base / ref) if base is not None and not Path(ref).is_absolute() else Path(ref)
    if path.is_file():
        return path
    if ref in bundled() and not ref.endswith(".toml"):
        return bundled()[ref]
    return path  # missing: the caller reports it


def is_fetched(path: Path) -> bool:
    """Whether `path` is a recipe fetched from a URL (it lives in crb's recipe cache)."""
    return path.resolve().parent == cache_dir().resolve()


def fetch_pinned(url: str, where: str = "") -> Path:
    m = PIN.match(url)
    if not m:
        raise RecipeError(f"{where}{url}: a recipe URL must be https and pinned: https://...#sha256=<64 hex digits>")
    address, pin = m.groups()
    cached = cache_dir() / f"{pin}.toml"
    if cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == pin:
        return cached
    try:
        with urllib.request.urlopen(address, timeout=30) as response:  # noqa: S310 (https only, checked above)
            body = response.read()
    except OSError as e:
        raise RecipeError(f"{where}{address}: cannot fetch the recipe: {e}") from None
    got = hashlib.sha256(body).hexdigest()
    if got != pin:
        raise RecipeError(f"{where}{address}: sha256 mismatch: pinned {pin}, got {got}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, cached)
    return cached
