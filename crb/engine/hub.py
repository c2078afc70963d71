"""Loading from the Hugging Face hub: every failure (no network, not cached, no such repository) becomes one
line naming the model and what to do. The configs of the bundled recipes' models ship with crb
(crb/model_configs/ORG--NAME/config.json, copies of the published files), so `crb plan` works offline."""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from crb.errors import CrbError, first_line

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SHIPPED = Path(__file__).resolve().parents[1] / "model_configs"


class HubError(CrbError):
    """A model, tokenizer or config cannot be loaded: the hub is unreachable, it is not cached, or no such repo."""


def load_error(name: str, what: str, err: BaseException, key: str = "model.name") -> HubError:
    """`key` 'name': cannot load its `what` (the library's reason), and for a hub id how to work offline."""
    from huggingface_hub import is_offline_mode

    message = f"{key} '{name}': cannot load its {what} ({first_line(err).rstrip('.')})"
    if Path(name).exists():  # a local folder: the hub is not involved
        return HubError(message)
    download = f"download it where there is network (`hf download {name} --local-dir DIR`) and set {key} to DIR"
    pin = key == "model.name"  # the tokenizer of model.tokenizer has no revision to pin
    if is_offline_mode():
        return HubError(f"{message}: HF_HUB_OFFLINE is set: {download}" +
                        (", or pin model.revision to a cached commit" if pin else ""))
    return HubError(f"{message}: {download}, or, with a copy in the Hugging Face cache, set HF_HUB_OFFLINE=1" +
                    (" (and pin model.revision to the cached commit if it is not main's)" if pin else ""))


@contextmanager
def loading(name: str, what: str, key: str = "model.name") -> Iterator[None]:
    """Turns the OSError that transformers, sentence-transformers and huggingface_hub raise for a hub or cache
    failure into a one-line HubError."""
    try:
        yield
    except OSError as e:
        raise load_error(str(name), what, e, key) from e


def shipped_config(name: str) -> Path | None:
    """The folder of the config shipped with crb for hub id `name` ("org/name"), if there is one."""
    folder = SHIPPED / name.replace("/", "--")
    return folder if name.count("/") == 1 and (folder / "config.json").is_file() else None


@functools.cache
def reachable() -> bool:
    """Whether the hub answers at all (huggingface_hub's own session: its endpoint and proxies; 3 s). Asked once
    per process: with no network, loading goes to the cache at once instead of through the library's retries
    (about 25 s and ten lines per file)."""
    from huggingface_hub import constants, utils

    try:
        utils.get_session().head(constants.ENDPOINT, timeout=3)
    except Exception:  # no route, no DNS, refused, timed out: whatever the transport raises, the hub is not there
        return False
    return True


def cache_only(name: str) -> bool:
    """Whether loading `name` must go to the cache alone: a hub id while the hub cannot be reached."""
    from huggingface_hub import is_offline_mode

    return not Path(name).exists() and not is_offline_mode() and not reachable()


def config(name: str, revision: str | None = None) -> PretrainedConfig:
    """The model's config: from the hub or its cache (the cache alone when the hub cannot be reached); failing
    that, for an unpinned model whose config ships with crb, that copy (said on stderr)."""
    from huggingface_hub import is_offline_mode
    from transformers import AutoConfig

    cached = cache_only(name)
    try:
        return AutoConfig.from_pretrained(name, revision=revision, local_files_only=cached)
    except OSError as e:
        shipped = shipped_config(name)
        if shipped is None or revision is not None:
            note = "; the copy shipped with crb is main's: without model.revision the plan uses it" if shipped else ""
            raise HubError(f"{load_error(name, 'config', e)}{note}") from e
        skip = "" if is_offline_mode() else "; the hub cannot be reached" if cached else \
            "; HF_HUB_OFFLINE=1 skips the hub"
        print(f"crb: model.name '{name}': using the config shipped with crb ({first_line(e).rstrip('.')}{skip})",
              file=sys.stderr)
        return AutoConfig.from_pretrained(shipped)
