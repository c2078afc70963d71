"""CLaRa on a tiny Mistral: memory tokens, compression shapes, the decoder's memory slots, where the
gradient goes in each stage, and the three stages chained by `crb run` on real CLaRa data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crb.artifacts import verify
from crb.data import prepare
from crb.data.clara import build_stage23, check_stage1
from crb.engine import recipe as recipes
from crb.engine.build import build_model, build_tokenizer, n_memory
from crb.errors import CrbError
from crb.run import make_batcher, run
from tests.conftest import CLARA_SLICE, write_jsonl, write_recipe

DOCS = ["The navy suit is wool, costs 320 dollars and comes in sizes 38 to 44.",
        "Our store opens at nine and closes at eight; returns are free within 30 days.",
        "The running shoe weighs 240 grams, has a neutral platform and costs 140 dollars.",
        "Delivery takes two days in the city and five days elsewhere; it is free over 50 dollars."]


def _stage1(tmp_path: Path) -> Path:
    qa = [(["What does the suit cost?"], ["320 dollars"]), (["When does the store open?"], ["At nine."]),
          (["How heavy is the shoe?"], ["240 grams"]), (["How long does delivery take?"], ["Two days in the city."])]
    return write_jsonl(tmp_path / "s1.jsonl", [{"data_type": "qa", "question": q, "answers": a, "docs": [d]}
                                               for (q, a), d in zip(qa * 4, DOCS * 4, strict=True)])


def _stage23(tmp_path: Path) -> Path:
    records = [check_stage1(json.loads(ln), "x") for ln in _stage1(tmp_path).read_text().splitlines()]
    return write_jsonl(tmp_path / "s23.jsonl", build_stage23(records[:4] * 2, n_docs=3, seed=0))


def _recipe(tmp_path: Path, model: Path, train: Path, stage: str, extra: str = "") -> Path:
    return write_recipe(tmp_path / f"clara-{stage}.toml", f"""
[model]
name = "{model}"
[method]
name = "lora"
[method.lora]
r = 4
alpha = 8
dropout = 0.0
[data]
format = "clara"
train = ["{train}"]
max_length = 256
cache_dir = "{tmp_path / 'cache'}"
[clara]
stage = "{stage}"
compress_rate = 8
doc_max_length = 32
top_k = 2
[train]
max_steps = 4
lr = 2e-3
batch_size = 4
micro_batch = 2
report_to = []
[[losses]]
name = "clara_generation"
[[losses]]
name = "clara_mse"
weight = 0.1
[output]
dir = "{tmp_path / 'out'}"
{extra}
""")


def _built(path: Path):
    r = recipes.load(path)
    tok = build_tokenizer(r)
    model = build_model(r, "no", torch.device("cpu"))
    train, _, _ = prepare(r.data, tok, 0, r.clara)
    batch = make_batcher(r, tok, model).collate(train[:2])
    return r, tok, model, batch


def test_memory_tokens_and_compressed_shapes(tmp_path, tiny_model):
    r, tok, model, batch = _built(_recipe(tmp_path, tiny_model, _stage1(tmp_path), "compression"))
    assert n_memory(r) == 32 // 8 == 4
    vocab = tok.get_vocab()
    assert all(t in vocab for t in ["<MEM0>", "<MEM3>", "<AE>", "<ENC>", "<SEP>"]) and "<MEM4>" not in vocab
    assert model.embeddings().weight.shape[0] == len(tok)
    assert batch["doc_ids"].shape == (2, 32 + 3 + 4)
    assert (batch["doc_ids"][:, -4:] == torch.tensor(tok.convert_tokens_to_ids([f"<MEM{i}>" for i in range(4)]))).all()
    assert batch["doc_ids"][0, 0] == tok.convert_tokens_to_ids("<ENC>") and batch["doc_ids"][0, 1] == tok.bos_token_id
    docs, mse = model.compress(batch["doc_ids"], batch["doc_mask"])
    assert docs.shape == (2, 4, model.config.hidden_size) and mse.ndim == 0 and mse > 0


def test_decoder_input_embeddings_at_memory_slots_are_the_compressed_vectors(tmp_path, tiny_model):
    _, _, model, batch = _built(_recipe(tmp_path, tiny_model, _stage23(tmp_path), "instruction"))
    model.eval()
    seen = {}
    model.peft.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        docs, _ = model.compress(batch["doc_ids"], batch["doc_mask"])
        model(batch, torch.tensor(1.0))
    emb = seen["inputs_embeds"]
    slots = torch.isin(batch["dec_ids"], model.mem_ids)
    assert int(slots.sum()) == 2 * 2 * 4  # rows x top_k documents x memory tokens
    assert torch.equal(emb[slots].view(2, -1, emb.shape[-1]), docs.reshape(2, -1, docs.shape[-1]))
    plain = model.embeddings()(batch["dec_ids"])
    assert torch.equal(emb[~slots], plain[~slots])  # everything else is the ordinary embedding


def _grads(model) -> dict[str, float]:
    out = {}
    for name, p in model.peft.named_parameters():
        if p.grad is not None:
            out[name] = float(p.grad.abs().sum())
    return out


def test_generation_loss_reaches_the_encoder_and_only_trainable_parts(tmp_path, tiny_model):
    _, _, model, batch = _built(_recipe(tmp_path, tiny_model, _stage1(tmp_path), "compression"))
    model(batch, torch.tensor(10.0)).generation.backward()
    grads = _grads(model)
    assert any(".encoder." in n and v > 0 for n, v in grads.items())  # through the replaced embeddings
    assert any(".decoder." in n and v > 0 for n, v in grads.items())
    assert not [n for n in grads if "lora_" not in n and "embed_tokens" not in n]  # the frozen base: no grad
    rows = model.embeddings().weight.grad.abs().sum(-1)
    mem = torch.zeros_like(rows, dtype=torch.bool)
    mem[model.mem_ids] = True
    assert rows[mem].sum() > 0 and rows[~mem].sum() == 0  # only the memory-token rows learn


def test_stage3_topk_gradient_reaches_the_query_reasoner(tmp_path, tiny_model):
    _, _, model, batch = _built(_recipe(tmp_path, tiny_model, _stage23(tmp_path), "end_to_end"))
    out = model(batch, torch.tensor(10.0))
    assert 0.0 <= out.recall <= 1.0
    out.generation.backward()
    grads = _grads(model)
    assert any(".query_reasoner." in n and v > 0 for n, v in grads.items())
    assert not any(".encoder." in n and v > 0 for n, v in grads.items())  # candidates compress without grad


def test_three_stages_chain_and_each_loss_falls(tmp_path, tiny_model):
    lines = CLARA_SLICE.read_text().splitlines()[:20]
    s1 = tmp_path / "clara20.jsonl"
    s1.write_text("\n".join(lines) + "\n")
    s23 = write_jsonl(tmp_path / "clara20-23.jsonl",
                      build_stage23([check_stage1(json.loads(ln), "x") for ln in lines], n_docs=3, seed=0)[:40])
    stages = f"""
[[stages]]
name = "compression"
clara.stage = "compression"
[[stages]]
name = "instruction"
clara.stage = "instruction"
data.train = ["{s23}"]
[[stages]]
name = "end_to_end"
clara.stage = "end_to_end"
data.train = ["{s23}"]
train.lr = 1e-3
train.scheduler = "constant"
losses = [{{ name = "clara_generation" }}]
"""
    path = _recipe(tmp_path, tiny_model, s1, "compression", stages)
    finals = run(str(path), ["train.max_steps=12", "train.log_every=1"])
    assert list(finals) == ["compression", "instruction", "end_to_end"]
    for name in finals:
        out = tmp_path / "out" / name
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert sum(losses[-3:]) < sum(losses[:3]), (name, losses)
        if name != "end_to_end":  # each loss logged beside the total: generation + 0.1 x MSE
            r = [r for r in rows if "loss" in r][-1]
            assert r["loss"] == pytest.approx(r["loss_clara_generation"] + 0.1 * r["loss_clara_mse"], rel=1e-4)
        else:
            assert all(0 <= r["recall_at_k"] <= 1 for r in rows if "loss" in r)
        for adapter in ("encoder", "decoder"):
            assert (out / "final_adapter" / adapter / "adapter_config.json").is_file()
    assert (tmp_path / "out/end_to_end/final_adapter/query_reasoner/adapter_model.safetensors").is_file()
    resolved = (tmp_path / "out/instruction/recipe.resolved.toml").read_text()
    assert f'init_from = "{tmp_path / "out" / "compression"}"' in resolved  # each stage from the previous


def test_verify_answers_through_compression_as_a_manual_greedy_decode_does(tmp_path, tiny_model):
    """`crb verify` on a CLaRa run rebuilds the model from the saved adapters and memory-token rows and
    generates from the compressed documents: the same ids as a step-by-step greedy decode of the decoder
    over [prompt with memory slots filled] + answer so far."""
    import numpy as np

    from crb.data.chatml import chat_template
    from crb.data.clara_inputs import decoder_prompt_ids, document_ids

    path = _recipe(tmp_path, tiny_model, _stage1(tmp_path), "compression")
    run(str(path), ["train.max_steps=3"])
    out = tmp_path / "out"
    question, docs = "What does the suit cost?", DOCS[:2]
    answer = verify(out, question, max_new_tokens=6, docs=docs)

    r = recipes.load(out / "recipe.resolved.toml", [f"clara.init_from={out}"])
    tok, model = build_tokenizer(r), build_model(r, "no", torch.device("cpu")).eval()
    enc = [document_ids(d, tok, r.clara.doc_max_length, n_memory(r)) for d in docs]
    with torch.no_grad():
        compressed, _ = model.compress(torch.tensor(np.stack([e[0] for e in enc])),
                                       torch.tensor(np.stack([e[1] for e in enc])))
        ids = torch.tensor(decoder_prompt_ids(question, 2, n_memory(r), tok, chat_template(tok, "tokenizer")))[None]
        assert int(torch.isin(ids, model.mem_ids).sum()) == 2 * n_memory(r)
        new = []
        for _ in range(6):
            model.use("decoder")
            emb = model.decoder_embeds(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1),
                                       compressed.reshape(1, -1, compressed.shape[-1]))
            nxt = int(model.peft(inputs_embeds=emb).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    assert answer == tok.decode(new, skip_special_tokens=True).strip()
    with pytest.raises(CrbError, match="--doc"):
        verify(out, question)
