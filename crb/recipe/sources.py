"""Where a recipe comes from: a local path, a recipe bundled with crb by name (`crb recipes` lists
them: "language", "demo/retrieval"), or an https URL or Hub file pinned by its sha256
(`https://.../r.toml#sha256=HEX`, `hf://owner/repo/r.toml@revision#sha256=HEX`),
fetched once into crb's cache. An unpinned URL, or one whose content does not match its pin, is an error."""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from pathlib import Path

from crb.errors import RecipeError, first_line

BUNDLED = Path(__file__).resolve().parents[2] / "recipes"
PIN = re.compile(r"^(https://[^#\s]+|hf://[^#\s]+)#sha256=([0-9a-f]{64})$")
HUB = re.compile(r"^hf://([^/@]+/[^/@]+)/([^@]+)(?:@(.+))?$")  # hf://owner/repo/path/in/repo.toml[@revision]


def bundled() -> dict[str, Path]:
    """Bundled recipes by name ("language", "demo/code", ...)."""
    if not BUNDLED.is_dir():
        return {}
    return {str(p.relative_to(BUNDLED).with_suffix("")): p for p in sorted(BUNDLED.rglob("*.toml"))}


def cache_dir() -> Path:
    return Path(os.environ.get("CRB_CACHE", Path.home() / ".cache" / "crb")) / "recipes"


def resolve(ref: str, base: Path | None = None, where: str = "") -> Path:
    """The local file for `ref` (relative paths against `base`); `where` prefixes errors ("file:line: key: ")."""
    if ref.startswith(("http://", "https://", "hf://")):
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


def hub_file(address: str) -> bytes:
    from huggingface_hub import hf_hub_download

    m = HUB.match(address)
    if not m:
        raise OSError(f"expected hf://owner/repo/path.toml[@revision], got {address}")
    repo, file, revision = m.groups()
    return Path(hf_hub_download(repo, file, revision=revision)).read_bytes()


def fetch_pinned(url: str, where: str = "") -> Path:
    m = PIN.match(url)
    if not m:
        raise RecipeError(f"{where}{url}: a recipe URL must be https (or hf://) and pinned: "
                          "https://...#sha256=<64 hex digits>")
    address, pin = m.groups()
    cached = cache_dir() / f"{pin}.toml"
    if cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == pin:
        return cached
    try:
        if address.startswith("hf://"):  # a file in a Hub repository, at a revision
            body = hub_file(address)
        else:
            with urllib.request.urlopen(address, timeout=30) as response:  # noqa: S310 (https only, checked above)
                body = response.read()
    except OSError as e:
        raise RecipeError(f"{where}{address}: cannot fetch the recipe ({first_line(e)}): download it and "
                          "pass its path") from None
    got = hashlib.sha256(body).hexdigest()
    if got != pin:
        raise RecipeError(f"{where}{address}: sha256 mismatch: pinned {pin}, got {got}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, cached)
    return cached
