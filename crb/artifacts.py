"""Using a run's result: `crb merge` (adapter into base) and `crb verify` (generate with the same
chat rendering as training). Both read only the run folder: its resolved recipe and artifacts."""

from __future__ import annotations

from pathlib import Path

import tomllib
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crb.errors import CrbError


def _resolved(out: Path) -> dict:
    path = out / "recipe.resolved.toml"
    if not path.is_file():
        raise CrbError(f"{out}: not a crb run folder (no recipe.resolved.toml)")
    return tomllib.loads(path.read_text())


def load_result(out: Path, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer, recipe dict) of a finished run: final_model/, or base + final_adapter/."""
    recipe = _resolved(out)
    if (out / "final_model").is_dir():
        path = out / "final_model"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    elif (out / "final_adapter").is_dir():
        from peft import PeftModel

        path = out / "final_adapter"
        base = AutoModelForCausalLM.from_pretrained(recipe["model"]["name"], dtype=dtype,
                                                    revision=recipe["model"].get("revision"))
        model = PeftModel.from_pretrained(base, path)
    else:
        raise CrbError(f"{out}: no final_model/ or final_adapter/ (did the run finish?)")
    return model.eval(), AutoTokenizer.from_pretrained(path), recipe


def merge(out: Path, dest: str | None = None) -> Path:
    if not (out / "final_adapter").is_dir():
        raise CrbError(f"{out}: no final_adapter/ to merge (full fine-tunes are already whole: final_model/)")
    model, tok, _ = load_result(out, "auto")  # merged and saved in the base model's own dtype
    target = Path(dest) if dest else out / "merged_model"
    model.merge_and_unload().save_pretrained(target)
    tok.save_pretrained(target)
    return target


def verify(out: Path, prompt: str, max_new_tokens: int = 64) -> str:
    model, tok, recipe = load_result(out)
    if recipe["data"]["format"] == "chatml":
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    stop = [tok.eos_token_id]
    if "<|im_end|>" in tok.get_vocab():  # a ChatML turn ends there
        stop.append(tok.convert_tokens_to_ids("<|im_end|>"))
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stop)
    return tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
