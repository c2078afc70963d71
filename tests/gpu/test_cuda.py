"""On a GPU: the real QLoRA path (bf16 compute, paged 8-bit AdamW, gradient checkpointing) trains and
reports GPU memory. Skipped where there is no CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from crb.run import run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qlora_bf16_trains_on_gpu(chat_recipe, tmp_path):
    out = tmp_path / "gpu"
    run(str(chat_recipe), ["method.name='qlora'", "train.optimizer='paged_adamw_8bit'", "train.precision='bf16'",
                           "train.gradient_checkpointing=true", "train.max_steps=12", "train.lr=3e-3",
                           f"output.dir='{out}'"])
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    assert all(r["gpu_mem_gib"] > 0 for r in rows if "loss" in r)
    assert (out / "final_adapter" / "adapter_model.safetensors").is_file()


def test_the_automatic_configuration_trains_like_the_plain_one(chat_recipe, tmp_path):
    """Issue 14's check: the plan's choice (micro-batch, checkpointed layers, liger kernels where installed) gives
    the same first 5 losses as the plain configuration (every layer checkpointed, micro-batch 1, no fused
    kernels) on the same rows, within 1e-3 relative."""
    runs = {}
    for name, sets in {"auto": ['train.micro_batch="auto"', 'train.gradient_checkpointing="auto"',
                                'train.kernels="auto"'],
                       "plain": ["train.micro_batch=1", "train.gradient_checkpointing=true", 'train.kernels="none"']
                       }.items():
        out = tmp_path / name
        run(str(chat_recipe), ["method.name='qlora'", "train.precision='bf16'", "train.max_steps=5",
                               "method.lora.dropout=0.0", *sets, f"output.dir='{out}'"])  # no dropout: same math
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in rows if "loss" in r]
    assert runs["auto"] == pytest.approx(runs["plain"], rel=1e-3)


@pytest.mark.parametrize("kernels", ["liger", "cce"])
def test_fused_seq2seq_loss_equals_the_logits_loss(translation_recipe, tmp_path, kernels):
    """A fused linear + cross-entropy on NLLB's head (liger's, cut-cross-entropy's) gives the losses of the
    plain logits path, and trains."""
    pytest.importorskip({"liger": "liger_kernel", "cce": "cut_cross_entropy"}[kernels])
    runs = {}
    for name in (kernels, "none"):
        out = tmp_path / name
        run(str(translation_recipe), [f'train.kernels="{name}"', "train.max_steps=6", "train.log_every=1",
                                      "train.precision='bf16'", "train.eval_every=0", f"output.dir='{out}'"])
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in rows if "loss" in r]
    assert len(runs[kernels]) == 6
    assert runs[kernels] == pytest.approx(runs["none"], rel=2e-2)  # bf16 logits against fp32 accumulation
    assert runs[kernels][-1] < runs[kernels][0]


def test_packed_rows_train_alike_with_flex_and_sdpa(chat_recipe, tiny_model, tmp_path):
    """Packed rows of a Mistral with 64-wide heads, rows not a multiple of FlexAttention's 128-token blocks:
    its document block mask (attention "auto" on CUDA) gives SDPA's losses (a dense mask), and "auto" chose it."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    wide = tmp_path / "wide"
    MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)).save_pretrained(wide)
    tok.save_pretrained(wide)
    runs = {}
    for attention in ("auto", "sdpa"):
        out = tmp_path / attention
        run(str(chat_recipe), [f"model.name='{wide}'", "data.packing=true", "data.max_length=300",
                               f'model.attn_implementation="{attention}"', "train.max_steps=4",
                               "train.precision='bf16'", 'train.kernels="none"', f"output.dir='{out}'"])
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        runs[attention] = [r["loss"] for r in rows if "loss" in r]
    assert json.loads((tmp_path / "auto" / "profile.json").read_text())["attention"] == "flex_attention"
    assert runs["auto"] == pytest.approx(runs["sdpa"], rel=1e-2)


def test_out_of_memory_under_a_cap_halves_the_micro_batch(chat_recipe, tiny_model, tmp_path, monkeypatch, capsys):
    """A real CUDA out-of-memory: a model whose fp32 logits at micro-batch 8 x 2048 tokens (2 GiB, and their
    gradient) exceed a 3 GiB cap; the run halves the micro-batch by itself and finishes the same effective batch."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    wide = tmp_path / "wide-vocab"
    MistralForCausalLM(MistralConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)).save_pretrained(wide)
    tok.save_pretrained(wide)
    texts = tmp_path / "long.jsonl"  # 16 documents longer than 2048 tokens: full rows
    texts.write_text("".join(json.dumps({"text": " ".join(f"word{i * j % 97}" for j in range(3000))}) + "\n"
                             for i in range(16)))
    monkeypatch.setenv("CRB_GPU_MEMORY_GB", "3")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests in this process set bf16
    out = tmp_path / "capped"
    sets = [f"model.name='{wide}'", "method.name='full'", 'data.format="text"', f"data.train=['{texts}']",
            "data.eval_split=0", "data.max_length=2048", "train.micro_batch=8", "train.batch_size=8",
            "train.max_steps=2", "train.precision='fp32'", 'train.kernels="none"', "train.gradient_checkpointing=false",
            'hardware.profile="plain"']  # not a DeepSpeed profile: only a plain run can halve by itself
    run(str(chat_recipe), [*sets, f"output.dir='{out}'"])
    said = capsys.readouterr().out
    assert "out of memory at micro-batch 8; going on with micro-batch 4 x accumulation 2" in said
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def test_cuda_graphs_train_translation_like_eager(translation_recipe, tmp_path, capsys):
    """train.compile = "graphs" on CUDA (each layer replayed as a CUDA graph, rows padded to multiples of 64):
    the first 5 losses of the eager model within 1e-3 relative, and the eval's generation runs."""
    runs = {}
    for name, mode in (("graphs", '"graphs"'), ("eager", "false")):
        out = tmp_path / name
        run(str(translation_recipe), [f"train.compile={mode}", "train.max_steps=5", "train.log_every=1",
                                      "train.lr=1e-3", "train.precision='bf16'", "train.eval_every=5",
                                      f"output.dir='{out}'"])
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in rows if "loss" in r]
        assert [r["step"] for r in rows if "bleu" in r][-1] == 5
    assert "4 as CUDA graphs" in capsys.readouterr().out
    assert runs["graphs"] == pytest.approx(runs["eager"], rel=1e-3)
