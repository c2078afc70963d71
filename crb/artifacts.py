"""Using a run's result: `crb merge` (adapter into base) and `crb verify` (generate with the same
rendering as training: the chat template, or the target-language token). Both read only the run
folder: its resolved recipe and artifacts."""

from __future__ import annotations

from pathlib import Path

import tomllib
import torch
from transformers import AutoTokenizer

from crb.engine.build import build_model, build_tokenizer, load_weights
from crb.errors import CrbError
from crb.recipe import schema as recipes
from crb.tasks import TASKS, get_task


def _resolved(out: Path) -> dict:
    path = out / "recipe.resolved.toml"
    if not path.is_file():
        raise CrbError(f"{out}: not a crb run folder (no recipe.resolved.toml)")
    return tomllib.loads(path.read_text())


def load_result(out: Path, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer, recipe dict) of a finished run: final_model/, base + final_adapter/, or (CLaRa, crb's own
    model) the model rebuilt from the recipe and its saved adapters."""
    recipe = _resolved(out)
    task = get_task(recipe["data"]["format"])
    if task.kind == "embedding":
        model = task.encoder(str(out / "final_model"), device="cpu")
        return model.eval(), model.tokenizer, recipe
    if task.kind == "clara":
        return *_rebuilt(out), recipe
    if (out / "final_model").is_dir():
        path = out / "final_model"
        model = load_weights(task.auto_class, path, dtype=dtype)
    elif (out / "final_adapter").is_dir():
        from peft import PeftModel

        path = out / "final_adapter"
        base = load_weights(task.auto_class, recipe["model"]["name"], dtype=dtype,
                            revision=recipe["model"].get("revision"))
        model = PeftModel.from_pretrained(base, path)
    else:
        raise CrbError(f"{out}: no final_model/ or final_adapter/ (did the run finish?)")
    return model.eval(), AutoTokenizer.from_pretrained(path), recipe


def _rebuilt(out: Path) -> tuple[torch.nn.Module, object]:
    """A CLaRa run's model and tokenizer, built from its recipe and saved adapters."""
    if not (out / "final_adapter" / "encoder").is_dir():
        raise CrbError(f"{out}: no final_adapter/encoder/ (did the CLaRa run finish?)")
    recipe = recipes.load(out / "recipe.resolved.toml", [f"clara.init_from={out.resolve()}"], tasks=TASKS)
    tok = build_tokenizer(recipe)
    return build_model(recipe, "no", torch.device("cpu")).eval(), tok


def merge(out: Path, dest: str | None = None) -> Path:
    if not (out / "final_adapter").is_dir():
        raise CrbError(f"{out}: no final_adapter/ to merge (full fine-tunes are already whole: final_model/)")
    model, tok, _ = load_result(out, "auto")  # merged and saved in the base model's own dtype
    target = Path(dest) if dest else out / "merged_model"
    model.merge_and_unload().save_pretrained(target)
    tok.save_pretrained(target)
    return target


def verify(out: Path, prompt: str, max_new_tokens: int = 64, target_lang: str | None = None,
           source_lang: str | None = None, docs: list[str] | None = None) -> str:
    """The result's answer to `prompt`, as its task gives it (Task.verify): a chat reply, a continuation, a
    translation into `target_lang`, (retrieval) the prompt's nearest documents in the run's eval corpus, or
    (CLaRa) the answer to the question from `docs`, read through their compressed memory tokens."""
    recipe = _resolved(out)
    return get_task(recipe["data"]["format"]).verify(lambda: load_result(out)[:2], recipe, prompt, max_new_tokens,
                                                     target_lang, source_lang, docs)
