"""Parity with TRL's SFTTrainer: same tiny Mistral, ChatML data, seed, lr, schedule, LoRA dropout 0.
The first 5 optimizer steps' losses agree within 1e-4 relative."""

from __future__ import annotations

import json

import pytest
import torch

from crb.data.chatml import CHATML_TEMPLATE
from crb.run import run
from tests.conftest import chat_records, write_jsonl

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
STEPS, BATCH, LR, SEED = 5, 8, 1e-3, 7


def trl_losses(model_dir, records, tmp_path) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_utils import set_seed

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHATML_TEMPLATE
    set_seed(SEED)  # crb seeds, loads, then adds LoRA: the same random LoRA init here
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), learning_rate=LR, lr_scheduler_type="cosine",
                         warmup_steps=1, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                         max_steps=STEPS, logging_steps=1, seed=SEED, report_to="none", save_strategy="no",
                         max_length=128, packing=False, assistant_only_loss=True, optim="adamw_torch",
                         use_cpu=True, dataloader_drop_last=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=tok, callbacks=[Record()])
    trainer.train()
    return losses


def test_first_steps_match_trl(tmp_path, tiny_model):
    records = chat_records(BATCH, seed=3)  # one batch: every step sees the same rows in both tools
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    recipe = tmp_path / "parity.toml"
    recipe.write_text(f"""
[model]
name = "{tiny_model}"
[method]
name = "lora"
lora = {{ r = 8, alpha = 16, dropout = 0.0, target_modules = "all-linear" }}
[data]
train = ["{data}"]
format = "chatml"
max_length = 128
cache_dir = "{tmp_path / 'cache'}"
[train]
max_steps = {STEPS}
lr = {LR}
scheduler = "cosine"
warmup_ratio = 0.2
batch_size = {BATCH}
micro_batch = {BATCH}
seed = {SEED}
report_to = []
save_every = 100
[output]
dir = "{tmp_path / 'crb'}"
""")
    run(str(recipe))
    crb = [json.loads(ln)["loss"] for ln in (tmp_path / "crb" / "metrics.jsonl").read_text().splitlines()]
    ref = trl_losses(tiny_model, records, tmp_path)
    assert len(crb) == len(ref) == STEPS
    print("crb", crb, "trl", ref)
    assert crb[-1] < crb[0]  # it trains
    for a, b in zip(crb, ref, strict=True):
        assert a == pytest.approx(b, rel=1e-4), (crb, ref)
