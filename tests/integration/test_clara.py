"""CLaRa on a tiny Mistral: memory tokens, compression shapes, the decoder's memory slots, where the
gradient goes in each stage, and the three stages chained by `crb run` on real CLaRa data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crb.artifacts import verify
from crb.data.clara import build_stage23, check_stage1
from crb.engine.build import build_model, build_tokenizer
from crb.errors import CrbError
from crb.recipe import schema as recipes
from crb.run import make_batcher, run
from crb.tasks import prepare
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
phase = "{stage}"
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
    assert r.clara.memory_tokens == 32 // 8 == 4
    vocab = tok.get_vocab()
    assert all(t in vocab for t in ["<MEM0>", "<MEM3>", "<AE>", "<ENC>", "<SEP>"]) and "<MEM4>" not in vocab
    assert model.embeddings().weight.shape[0] == len(tok)
    assert batch["doc_ids"].shape == (2, 32 + 3 + 4)
    assert (batch["doc_ids"][:, -4:] == torch.tensor(tok.convert_tokens_to_ids([f"<MEM{i}>" for i in range(4)]))).all()
    assert batch["doc_ids"][0, 0] == tok.convert_tokens_to_ids("<ENC>") and batch["doc_ids"][0, 1] == tok.bos_token_id
    docs, mse = model.compress(batch["doc_ids"], batch["doc_mask"])
    assert docs.shape == (2, 4, model.config.hidden_size) and mse.ndim == 0
    # the MSE by hand: per document, the mean last hidden state over its attended text positions against the mean
    # over its memory positions (the last four), squared difference averaged over dims, then over documents
    model.use("encoder")
    inner = model.peft.get_base_model().model
    hidden = inner(input_ids=batch["doc_ids"], attention_mask=batch["doc_mask"]).last_hidden_state
    per_doc = []
    for h, m in zip(hidden, batch["doc_mask"], strict=True):
        text = h[:-4][m[:-4].bool()].mean(0)
        per_doc.append(((text - h[-4:].mean(0)) ** 2).mean())
    assert torch.equal(docs, hidden[:, -4:])
    assert mse.item() == pytest.approx(torch.stack(per_doc).mean().item(), rel=1e-5)


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
    assert not [n for n in grads if "lora_" not in n]  # the frozen base, its embedding included: no grad
    assert model.embeddings().weight.grad is None
    # the memory-token rows learn through their own fp32 rows, every one of them (each document has them all)
    assert model.memory.weight.dtype == torch.float32 and (model.memory.weight.grad.abs().sum(-1) > 0).all()


def test_stage3_topk_gradient_reaches_the_query_reasoner(tmp_path, tiny_model):
    _, _, model, batch = _built(_recipe(tmp_path, tiny_model, _stage23(tmp_path), "end_to_end"))
    out = model(batch, torch.tensor(10.0))
    # recall by hand: cosine scores of each row's question against its 3 candidates, the top 2 selected, the share
    # of the row's gold documents among them, averaged over rows
    with torch.no_grad():
        cands, _ = model.compress(batch["doc_ids"], batch["doc_mask"])
        query, _ = model.compress(batch["query_ids"], batch["query_mask"], "query_reasoner")
    expected = []
    for b in range(2):
        q = query[b].flatten()
        scores = [float(torch.dot(q, c.flatten()) / (q.norm() * c.flatten().norm())) for c in cands[3 * b: 3 * b + 3]]
        top = sorted(range(3), key=lambda i: -scores[i])[:2]
        gold = batch["gold"][b]
        expected.append(len(set(top) & set(gold)) / len(gold))
    assert out.recall == pytest.approx(sum(expected) / 2)
    out.generation.backward()
    grads = _grads(model)
    assert any(".query_reasoner." in n and v > 0 for n, v in grads.items())
    assert not any(".encoder." in n and v > 0 for n, v in grads.items())  # candidates compress without grad


def _spy_builds(monkeypatch) -> list:
    """Each model `crb run` builds, with a copy of its weights as built (before any step)."""
    import crb.run

    builds = []

    def spy(recipe, *args):
        model = build_model(recipe, *args)
        builds.append((model, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(crb.run, "build_model", spy)
    return builds


def test_three_stages_chain_and_each_loss_falls(tmp_path, tiny_model, monkeypatch):
    """Each stage starts from the weights the previous one saved (read back with safetensors and peft's own key
    mapping, not crb's loader): both adapters and the memory rows; stage 3's query reasoner from the encoder."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    lines = CLARA_SLICE.read_text().splitlines()[:20]
    s1 = tmp_path / "clara20.jsonl"
    s1.write_text("\n".join(lines) + "\n")
    s23 = write_jsonl(tmp_path / "clara20-23.jsonl",
                      build_stage23([check_stage1(json.loads(ln), "x") for ln in lines], n_docs=3, seed=0)[:40])
    stages = f"""
[[stages]]
name = "compression"
clara.phase = "compression"
[[stages]]
name = "instruction"
clara.phase = "instruction"
data.train = ["{s23}"]
[[stages]]
name = "end_to_end"
clara.phase = "end_to_end"
data.train = ["{s23}"]
train.lr = 1e-3
train.scheduler = "constant"
losses = [{{ name = "clara_generation" }}]
"""
    path = _recipe(tmp_path, tiny_model, s1, "compression", stages)
    builds = _spy_builds(monkeypatch)
    finals = run(str(path), ["train.max_steps=12", "train.log_every=1"])
    assert list(finals) == ["compression", "instruction", "end_to_end"] and len(builds) == 3
    for name in finals:
        out = tmp_path / "out" / name
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert sum(losses[-3:]) < sum(losses[:3]), (name, losses)
        if name == "end_to_end":
            assert all("recall_at_k" in r for r in rows if "loss" in r)
    # what stage 2 started from against what stage 1 saved, then stage 3 against stage 2
    chain = [("compression", builds[1], {"encoder": "encoder", "decoder": "decoder"}),
             ("instruction", builds[2], {"query_reasoner": "encoder", "decoder": "decoder"})]
    for prev, (model, start), sources in chain:
        saved = tmp_path / "out" / prev / "final_adapter"
        model.load_state_dict(start)  # the weights as built, before the stage's steps
        for adapter, source in sources.items():
            expected = load_file(saved / source / "adapter_model.safetensors")
            got = get_peft_model_state_dict(model.peft, adapter_name=adapter,  # in peft's saved naming
                                            save_embedding_layers=False)
            assert expected and expected.keys() == got.keys()
            assert all(torch.equal(expected[k], got[k]) for k in expected), (prev, adapter)
        rows = load_file(saved / "clara_embeddings.safetensors")
        mem = torch.isin(rows["ids"], model.mem_ids)
        assert torch.equal(model.memory.weight, rows["rows"][mem])  # fp32, bit for bit
        assert torch.equal(model.embeddings().weight[rows["ids"][~mem]], rows["rows"][~mem])  # <AE>, <ENC>, <SEP>
    assert (tmp_path / "out/end_to_end/final_adapter/query_reasoner/adapter_model.safetensors").is_file()


def test_total_is_generation_plus_a_tenth_of_the_mse(tmp_path, tiny_model, monkeypatch):
    """The loss `crb run` logs for a one-step stage-1 run over four records (one micro-batch), against the answer
    cross-entropy and the MSE computed here by hand with the weights as built: generation + 0.1 x MSE."""
    import torch.nn.functional as F

    four = [json.loads(ln) for ln in _stage1(tmp_path).read_text().splitlines()[:4]]
    data = write_jsonl(tmp_path / "four.jsonl", four)
    path = _recipe(tmp_path, tiny_model, data, "compression")
    builds = _spy_builds(monkeypatch)
    run(str(path), ["train.max_steps=1", "train.batch_size=4", "train.micro_batch=4", "train.log_every=1"])
    row = next(r for r in map(json.loads, (tmp_path / "out/metrics.jsonl").read_text().splitlines()) if "loss" in r)

    r, tok, model, _ = _built(path)
    model.load_state_dict(builds[0][1])
    model.eval()
    train, _, _ = prepare(r.data, tok, 0, r.clara)
    batch = make_batcher(r, tok, model).collate(train)
    inner = model.peft.get_base_model().model
    with torch.no_grad():
        model.use("encoder")
        hidden = inner(input_ids=batch["doc_ids"], attention_mask=batch["doc_mask"]).last_hidden_state
        text = [h[:-4][m[:-4].bool()].mean(0) for h, m in zip(hidden, batch["doc_mask"], strict=True)]
        mse = torch.stack([((t - h[-4:].mean(0)) ** 2).mean() for t, h in zip(text, hidden, strict=True)]).mean()
        model.use("decoder")
        emb = inner.embed_tokens(batch["dec_ids"])
        slots = torch.isin(batch["dec_ids"], model.mem_ids)
        emb[slots] = hidden[:, -4:].reshape(-1, hidden.shape[-1])  # one document per row, its four memory vectors
        logits = model.peft(inputs_embeds=emb, attention_mask=batch["dec_mask"]).logits
        labels = batch["dec_labels"]
        generation = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert row["loss_clara_mse"] == pytest.approx(mse.item(), rel=1e-4)
    assert row["loss_clara_generation"] == pytest.approx(generation.item(), rel=1e-4)
    assert row["loss"] == pytest.approx(generation.item() + 0.1 * mse.item(), rel=1e-4)


def test_verify_answers_as_plain_transformers_and_peft_do(tmp_path, tiny_model):
    """`crb verify` on a CLaRa run against the method rebuilt here from the run folder with transformers, peft and
    safetensors alone: the base, the saved added-token rows, the encoder's last hidden states at the memory tokens
    of `<ENC> BOS doc EOS pad.. <MEM0>..<MEM3>` as the documents, the chat prompt with their slots, greedy decoding."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _recipe(tmp_path, tiny_model, _stage1(tmp_path), "compression")
    run(str(path), ["train.max_steps=3"])
    out = tmp_path / "out"
    question, docs = "What does the suit cost?", DOCS[:2]
    answer = verify(out, question, max_new_tokens=6, docs=docs)

    saved = out / "final_adapter"
    tok = AutoTokenizer.from_pretrained(saved)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    rows = load_file(saved / "clara_embeddings.safetensors")
    with torch.no_grad():
        base.get_input_embeddings().weight[rows["ids"]] = rows["rows"]
    model = PeftModel.from_pretrained(base, saved / "encoder", adapter_name="encoder")
    model.load_adapter(str(saved / "decoder"), adapter_name="decoder")
    model.eval()
    mem = [f"<MEM{i}>" for i in range(4)]
    enc_ids, enc_mask = [], []
    for d in docs:
        text = tok(d, add_special_tokens=False)["input_ids"][:32]
        body = [tok.convert_tokens_to_ids("<ENC>"), tok.bos_token_id, *text, tok.eos_token_id]
        pad = 32 + 3 - len(body)
        enc_ids.append(body + [tok.pad_token_id] * pad + tok.convert_tokens_to_ids(mem))
        enc_mask.append([1] * len(body) + [0] * pad + [1] * 4)
    system = "You are a helpful assistant. Answer the question using the compressed background documents."
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "Background:\n" + ("".join(mem) + "<SEP>") * 2 + f"\nQuestion: {question}"}]
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model.set_adapter("encoder")
        hidden = model.get_base_model().model(input_ids=torch.tensor(enc_ids),
                                              attention_mask=torch.tensor(enc_mask)).last_hidden_state
        model.set_adapter("decoder")
        emb = model.get_input_embeddings()(prompt)
        slots = torch.isin(prompt, torch.tensor(tok.convert_tokens_to_ids(mem)))
        emb[slots] = hidden[:, -4:].reshape(-1, emb.shape[-1])
        stop = [tok.eos_token_id] + [tok.convert_tokens_to_ids("<|im_end|>")] * ("<|im_end|>" in tok.get_vocab())
        gen = model.generate(inputs_embeds=emb, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stop)
    expected = tok.decode(gen[0], skip_special_tokens=True).strip()
    assert answer == expected and expected
    with pytest.raises(CrbError, match="--doc"):
        verify(out, question)


def test_memory_rows_train_in_fp32_at_stage3_lr(tmp_path, tiny_model):
    """On a bf16 base one AdamW step at 5e-6 moves the memory rows by the learning rate, which a bf16 row cannot
    represent; the rows take no weight decay, the vocabulary embedding stays as it was."""
    from crb.engine.build import build_optimizer

    r = recipes.load(_recipe(tmp_path, tiny_model, _stage1(tmp_path), "compression"),
                     ["train.lr=5e-6", "train.weight_decay=0.1"])
    tok = build_tokenizer(r)
    model = build_model(r, "bf16", torch.device("cpu"))
    train, _, _ = prepare(r.data, tok, 0, r.clara)
    batch = make_batcher(r, tok, model).collate(train[:2])
    optimizer = build_optimizer(r, model)
    memory_group = [g for g in optimizer.param_groups if any(p is model.memory.weight for p in g["params"])]
    assert [g["weight_decay"] for g in memory_group] == [0.0]
    assert any(g["weight_decay"] == 0.1 for g in optimizer.param_groups)  # the LoRA weights
    before, vocab = model.memory.weight.detach().clone(), model.embeddings().weight.detach().clone()
    assert model.embeddings().weight.dtype == torch.bfloat16 and before.dtype == torch.float32
    model(batch, torch.tensor(10.0)).generation.backward()
    optimizer.step()
    step = (model.memory.weight.detach() - before).abs()
    # Adam's first step moves each entry by lr x |g| / (|g| + eps), about lr: a bf16 row could only move by 0 or by
    # whole bf16 spacings (~4e-6 to 3e-5 at these magnitudes), never by 5e-6 to within 1 %
    assert step.max() <= 5e-6 * 1.001 and ((step - 5e-6).abs() < 5e-8).float().mean() > 0.9
    assert torch.equal(model.embeddings().weight, vocab)
    ids = model.mem_ids[None]
    assert torch.equal(model.embeddings()(ids)[0], model.memory.weight.bfloat16())  # the forward reads the new rows


@pytest.mark.parametrize("stage", ["compression", "end_to_end"])
def test_gradient_checkpointing_gives_the_same_step(tmp_path, tiny_model, stage):
    """A CLaRa forward and backward with every layer checkpointed: the same loss and gradients as without (fp32,
    CPU), with adapters made distinct so that a recomputation under the wrong adapter would show."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    data = _stage1(tmp_path) if stage == "compression" else _stage23(tmp_path)
    path = _recipe(tmp_path, tiny_model, data, stage)
    results = []
    for gc in ("false", "true"):
        r = recipes.load(path, [f"train.gradient_checkpointing={gc}"])
        tok = build_tokenizer(r)
        torch.manual_seed(0)
        model = build_model(r, "no", torch.device("cpu")).train()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert flags and all(flags) == (gc == "true")
        train, _, _ = prepare(r.data, tok, 0, r.clara)
        batch = make_batcher(r, tok, model).collate(train[:2])
        loss = model(batch, torch.tensor(10.0)).generation
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain), (gc_loss, checkpointed) = results
    assert gc_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4), name


def test_paraphrase_record_targets_the_document_after_the_instruction(tmp_path, tiny_model):
    """A stage-1 paraphrase record: one document in the memory slot, the instruction to restate it after the
    slot (no question), and the answer labels the document itself."""
    rec = {"data_type": "paraphrase", "docs": [DOCS[0]]}
    path = _recipe(tmp_path, tiny_model, write_jsonl(tmp_path / "p.jsonl", [rec] * 4), "compression")
    r, tok, model, batch = _built(path)
    labels = batch["dec_labels"][0]
    assert tok.decode(labels[labels != -100], skip_special_tokens=True).strip() == DOCS[0]
    prompt = tok.decode(batch["dec_ids"][0][labels == -100])
    assert "Restate the background above in your own words." in prompt and "Question:" not in prompt
    assert int(torch.isin(batch["dec_ids"][0], model.mem_ids).sum()) == 4
    model(batch, torch.tensor(10.0)).generation.backward()  # trains like a QA record
    assert model.memory.weight.grad.abs().sum() > 0
