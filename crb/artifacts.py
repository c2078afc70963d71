"""Using a run's result: `crb merge` (adapter into base) and `crb verify` (generate with the same
rendering as training: the chat template, or the target-language token). Both read only the run
folder: its resolved recipe and artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tomllib
import torch
from transformers import AutoTokenizer

from crb.engine.build import AUTO_CLASSES, KINDS, load_weights
from crb.errors import CrbError


def _resolved(out: Path) -> dict:
    path = out / "recipe.resolved.toml"
    if not path.is_file():
        raise CrbError(f"{out}: not a crb run folder (no recipe.resolved.toml)")
    return tomllib.loads(path.read_text())


def load_result(out: Path, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer, recipe dict) of a finished run: final_model/, or base + final_adapter/."""
    recipe = _resolved(out)
    kind = KINDS[recipe["data"]["format"]]
    if kind == "embedding":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(out / "final_model"), device="cpu")
        return model.eval(), model.tokenizer, recipe
    auto = AUTO_CLASSES[kind]
    if (out / "final_model").is_dir():
        path = out / "final_model"
        model = load_weights(auto, path, dtype=dtype)
    elif (out / "final_adapter").is_dir():
        from peft import PeftModel

        path = out / "final_adapter"
        base = load_weights(auto, recipe["model"]["name"], dtype=dtype, revision=recipe["model"].get("revision"))
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


def verify(out: Path, prompt: str, max_new_tokens: int = 64, target_lang: str | None = None,
           source_lang: str | None = None, docs: list[str] | None = None) -> str:
    """The result's answer to `prompt`: a chat reply, a continuation, a translation into
    `target_lang`, (retrieval) the prompt's nearest documents in the run's eval corpus, or (CLaRa)
    the answer to the question from `docs`, read through their compressed memory tokens."""
    if _resolved(out)["data"]["format"] == "clara":
        return _clara_answer(out, prompt, docs or [], max_new_tokens)
    model, tok, recipe = load_result(out)
    fmt = recipe["data"]["format"]
    if fmt == "translation":
        return _translate(model, tok, recipe, prompt, max_new_tokens, target_lang, source_lang)
    if fmt == "retrieval":
        return _search(model, recipe, prompt)
    if fmt == "chatml":
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


def _translate(model, tok, recipe: dict, text: str, max_new_tokens: int, target_lang: str | None,
               source_lang: str | None) -> str:
    data = recipe["data"]
    source_lang = source_lang or data.get("source_lang") or "eng_Latn"
    if not target_lang:
        raise CrbError("verify: translation results need --target-lang CODE (e.g. hin_Deva)")
    for flag, code in (("--source-lang", source_lang), ("--target-lang", target_lang)):
        if code not in data["languages"]:
            raise CrbError(f"verify: {flag} {code}: not in the recipe's data.languages")
    from crb.engine.metrics import translate

    tok.src_lang = source_lang
    ids = tok(text)["input_ids"]
    return translate(model, tok, [np.asarray(ids)], tok.convert_tokens_to_ids(target_lang), max_new_tokens, 1, 1)[0]


def _clara_answer(out: Path, question: str, docs: list[str], max_new_tokens: int) -> str:
    """Build the run's CLaRa model from its saved adapters; compress `docs`, answer `question`."""
    from crb.data.chatml import chat_template
    from crb.data.clara_inputs import decoder_prompt_ids, document_ids
    from crb.engine.build import build_model, build_tokenizer
    from crb.recipe import schema as recipes

    if not (out / "final_adapter" / "encoder").is_dir():
        raise CrbError(f"{out}: no final_adapter/encoder/ (did the CLaRa run finish?)")
    recipe = recipes.load(out / "recipe.resolved.toml", [f"clara.init_from={out.resolve()}"])
    if not docs:
        raise CrbError("verify: CLaRa results answer from documents: give them with --doc TEXT (repeatable)")
    tok = build_tokenizer(recipe)
    model = build_model(recipe, "no", torch.device("cpu")).eval()
    c = recipe.clara
    n_mem = c.memory_tokens
    encoded = [document_ids(d, tok, c.doc_max_length, n_mem) for d in docs]
    doc_ids = torch.tensor(np.stack([ids for ids, _ in encoded]))
    doc_mask = torch.tensor(np.stack([mask for _, mask in encoded]))
    template = chat_template(tok, recipe.data.chat_template)
    prompt = torch.tensor(decoder_prompt_ids(question, len(docs), n_mem, tok, template))[None]
    stop = [tok.eos_token_id] + ([tok.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in tok.get_vocab() else [])
    gen = model.answer(doc_ids, doc_mask, prompt, max_new_tokens=max_new_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id, eos_token_id=stop)
    return tok.decode(gen[0], skip_special_tokens=True).strip()


def _search(model, recipe: dict, query: str, k: int = 3) -> str:
    from crb.data import retrieval
    from crb.data.reader import read_jsonl

    rows = []
    for file in [*recipe["data"]["train"], *recipe["data"].get("eval", [])]:
        rows += [retrieval.row(retrieval.check_triple(r.data, r.where()), retrieval.instruction_of(r.data))
                 for r in read_jsonl(file) if not isinstance(r, Exception)]
    corpus = retrieval.corpus(recipe["data"].get("corpus", []), rows)
    _, query_prompt = retrieval.anchors(rows[:1])  # the training data's instruction, as training used it
    document_prompt = retrieval.prompt(recipe["data"].get("document_instruction", ""))
    scores = model.similarity(model.encode([query], convert_to_tensor=True, prompt=query_prompt),
                              model.encode(corpus, convert_to_tensor=True, batch_size=64, prompt=document_prompt))[0]
    top = torch.topk(scores, min(k, len(corpus)))
    return "\n".join(f"{s:.3f}  {corpus[i]}" for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True))
