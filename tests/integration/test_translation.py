"""The translation agent on a tiny NLLB-architecture model: language tokens, label masking,
training, generation in the target language, and bad codes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from crb.artifacts import verify
from crb.cli import main as cli
from crb.data.collate import seq2seq_batcher
from crb.errors import DataError, RecipeError
from crb.recipe import schema as recipes
from crb.run import run
from crb.tasks import prepare
from crb.units import IGNORE
from tests.conftest import translation_records, write_jsonl


def _rows(recipe_path, tok):
    r = recipes.load(recipe_path)
    train, evals, report = prepare(r.data, tok, r.train.seed)
    return r, train, evals, report


def test_language_tokens_and_label_masking(translation_recipe, tiny_nllb):
    tok = AutoTokenizer.from_pretrained(tiny_nllb)
    r, train, _, _ = _rows(translation_recipe, tok)
    fra, hin, eng = (tok.convert_tokens_to_ids(c) for c in ("fra_Latn", "hin_Deva", "eng_Latn"))
    first = train[0]  # eng -> fra: "Do you have this shirt in size medium?"
    assert first["input_ids"][0] == eng and first["input_ids"][-1] == tok.eos_token_id
    assert first["labels"][0] == fra and first["labels"][-1] == tok.eos_token_id
    assert tok.decode(first["input_ids"], skip_special_tokens=True) == "Do you have this shirt in size medium?"
    assert train[1]["labels"][0] == hin
    batcher = seq2seq_batcher(tok.pad_token_id, tok.eos_token_id)
    batch = batcher.collate(train[:2])
    short = int(batch["attention_mask"].sum(1).argmin())
    n_src, n_tgt = len(train[short]["input_ids"]), len(train[short]["labels"])
    assert (batch["attention_mask"][short, n_src:] == 0).all()
    assert (batch["input_ids"][short, n_src:] == tok.pad_token_id).all()
    assert (batch["labels"][short, n_tgt:] == IGNORE).all() or n_tgt == batch["labels"].shape[1]
    # decoder inputs: the decoder start, then the labels shifted right (language token first)
    assert batch["decoder_input_ids"][0, 0] == tok.eos_token_id and batch["decoder_input_ids"][0, 1] == fra
    assert batcher.count(batch) == n_tgt + len(train[1 - short]["labels"])


def test_training_lowers_loss_and_generation_starts_with_the_target_language(translation_recipe, tmp_path):
    final = run(str(translation_recipe))
    out = tmp_path / "out"
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x]
    assert losses[-1] < 0.5 * losses[0]
    assert final["eval_loss"] < final["baseline"]["eval_loss"]
    assert {"bleu", "chrf"} <= final.keys() and final["chrf"] > final["baseline"]["chrf"]
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "final_model")  # loads with transformers alone
    tok = AutoTokenizer.from_pretrained(out / "final_model")
    tok.src_lang = "eng_Latn"
    src = tok("Where is my order?", return_tensors="pt")
    for code in ("fra_Latn", "hin_Deva"):
        gen = model.generate(**src, forced_bos_token_id=tok.convert_tokens_to_ids(code), max_new_tokens=12)
        assert gen[0, 1] == tok.convert_tokens_to_ids(code)  # after the decoder start token
        # crb verify renders the source and forces the language the same way
        assert verify(out, "Where is my order?", 12, code) == tok.decode(gen[0], skip_special_tokens=True)
    assert cli(["verify", str(out), "--prompt", "Where is my order?", "--target-lang", "xxx_Yyyy"]) == 2


def test_lora_on_seq2seq_trains_only_adapters_in_encoder_and_decoder(translation_recipe, tmp_path, tiny_nllb):
    """method lora on the encoder-decoder: LoRA layers on the linear layers of both stacks, only the adapters
    train (the base is frozen), the loss falls, and the saved adapter lowers the base model's loss on the pairs."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from crb.engine.build import build_model

    sets = ["method.name='lora'", "method.lora.dropout=0.0", "train.max_steps=12", "train.log_every=1",
            "data.eval=[]"]
    r = recipes.load(translation_recipe, sets)
    built = build_model(r, "no", torch.device("cpu"))
    lora = {n for n, m in built.named_modules() if isinstance(m, LoraLayer)}
    assert any(".encoder." in n for n in lora) and any(".decoder." in n for n in lora)
    assert any(n.endswith("encoder_attn.q_proj") for n in lora) and any(n.endswith("fc2") for n in lora)
    trainable = {n for n, p in built.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * len(lora)  # an A and a B per adapted layer, nothing else

    run(str(translation_recipe), sets)
    out = tmp_path / "out"
    losses = [x["loss"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    assert len(losses) == 12 and max(losses[-3:]) < min(losses[:3]), losses
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_nllb)
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_nllb), out / "final_adapter")
    assert model.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    assert len([n for n, _ in model.named_parameters() if "lora_" in n]) == len(trainable)  # all of them saved
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at zero
    tok = AutoTokenizer.from_pretrained(tiny_nllb)
    _, rows, _, _ = _rows(translation_recipe, tok)
    batch = seq2seq_batcher(tok.pad_token_id, tok.eos_token_id).collate(rows)  # every training pair
    with torch.no_grad():
        tuned, plain = model(**batch).loss, base(**batch).loss
    assert tuned < plain - 0.1, (float(tuned), float(plain))  # the adapter learnt the pairs (5.73 -> 5.54)
    merged = model.merge_and_unload().state_dict()
    frozen = base.state_dict()
    changed = {k for k in frozen if not torch.equal(merged[k], frozen[k])}
    assert changed and all(k.endswith("proj.weight") or k.endswith("fc1.weight") or k.endswith("fc2.weight")
                           for k in changed), changed  # merging moves the adapted linear weights, nothing else


def test_unknown_language_code_names_file_line_and_code(translation_recipe, tiny_nllb, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_nllb)
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"source_lang": "eng_Latn", "target_lang": "fra_Latn", "source_text": "Hi", "target_text": "Salut"},
        {"source_lang": "eng_Latn", "target_lang": "xyz_Latn", "source_text": "Hi", "target_text": "?"}])
    r = recipes.load(translation_recipe, [f"data.train=['{bad}']"])
    with pytest.raises(DataError) as e:
        prepare(r.data, tok, 0)
    assert str(e.value) == f"{bad}:2: target_lang: unsupported language code 'xyz_Latn' (supported: data.languages)"
    r = recipes.load(translation_recipe, [f"data.train=['{bad}']", "data.bad_records='skip'"])
    _, _, report = prepare(r.data, tok, 0)
    assert report.bad_skipped == 1


def test_recipe_rejects_a_target_language_not_listed(translation_recipe):
    with pytest.raises(RecipeError) as e:
        recipes.load(translation_recipe, ["data.target_langs=['hin_Deva', 'fra_latn']"])
    assert str(e.value) == "--set: data.target_langs: 'fra_latn' is not in data.languages (did you mean 'fra_Latn'?)"


def test_directions_filter_is_counted(translation_recipe, tiny_nllb):
    tok = AutoTokenizer.from_pretrained(tiny_nllb)
    r = recipes.load(translation_recipe, ["data.target_langs=['hin_Deva']"])
    train, _, report = prepare(r.data, tok, 0)
    assert report.other_directions == len(train) + 6 // 2  # the French half of train and of eval
    assert all(row["labels"][0] == tok.convert_tokens_to_ids("hin_Deva") for row in train)
    hindi = [x for x in translation_records() * 4 if x["target_lang"] == "hin_Deva"]  # the train file's
    assert len(train) == len(hindi) == 32
    decoded = sorted((tok.decode(row["input_ids"], skip_special_tokens=True),
                      tok.decode(row["labels"], skip_special_tokens=True)) for row in train)
    assert decoded == sorted((x["source_text"], x["target_text"]) for x in hindi)  # each Hindi pair, no French
