"""End-to-end training on CPU: loss falls on real text, resume equals an unbroken run, artifacts
load with peft/transformers alone, CLI errors are one line."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crb.cli import main as cli
from crb.run import run
from tests.conftest import CLARA_SLICE, losses, make_model_dir, write_jsonl


def test_loss_falls_over_50_steps_on_real_text(tmp_path):
    """504 real question/answer pairs (the CLaRa fixture's 64 documents) as chats, 50 steps of 16."""
    records = []
    for line in CLARA_SLICE.read_text().splitlines():
        rec = json.loads(line)
        for q, a in zip(rec["question"], rec["answers"], strict=False):
            records.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    random.Random(0).shuffle(records)
    data = write_jsonl(tmp_path / "qa.jsonl", records[:800])
    texts = [m["content"] for r in records for m in r["messages"]]
    model = make_model_dir(tmp_path / "model", texts, vocab=1000)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
[model]
name = "{model}"
[method]
name = "full"
[data]
train = ["{data}"]
format = "chatml"
max_length = 96
eval_split = 0.05
cache_dir = "{tmp_path / 'cache'}"
[train]
max_steps = 50
lr = 3e-3
warmup_ratio = 0.05
batch_size = 16
micro_batch = 8
eval_every = 25
report_to = []
save_every = 1000
[output]
dir = "{tmp_path / 'out'}"
""")
    final = run(str(recipe))
    got = losses(tmp_path / "out")
    assert len(got) == 50
    first, last = sum(got[:5]) / 5, sum(got[-5:]) / 5
    assert last < first - 0.7, (first, last)  # about 6.9 -> 5.8 measured
    evals = [json.loads(ln)["eval_loss"] for ln in (tmp_path / "out/metrics.jsonl").read_text().splitlines()
             if "eval_loss" in ln]
    assert len(evals) == 3 and evals[2] < evals[1] < evals[0]  # before training, step 25, step 50
    assert final["eval_loss"] == evals[2]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final_adapter" / "adapter_model.safetensors")


def test_resume_equals_unbroken_run(chat_recipe, tmp_path):
    """A run of 8 steps, and the same run resumed from its step-4 checkpoint (as if it had crashed
    after step 4), end with identical adapter weights (dropout on, so RNG state matters too)."""
    import shutil

    common = ["train.max_steps=8", "method.lora.dropout=0.1", "train.save_every=4"]
    full = tmp_path / "full"
    run(str(chat_recipe), [*common, f"output.dir='{full}'"])
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-4", broken / "checkpoints" / "step-4")
    kept = [ln for ln in (full / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= 4]
    (broken / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    run(str(chat_recipe), [*common, f"output.dir='{broken}'"], resume="latest")
    a, b = adapter(full), adapter(broken)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(full) == losses(broken)  # metrics.jsonl continues, no duplicates


def test_checkpoints_are_complete_and_rotated(chat_recipe, tmp_path):
    out = tmp_path / "ck"
    run(str(chat_recipe), ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=2",
                           f"output.dir='{out}'"])
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-4", "step-6"]
    state = json.loads((out / "checkpoints/step-6/crb_state.json").read_text())
    assert state["step"] == 6
    saved = load_file(out / "checkpoints/step-6/model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # only what trains, not the frozen base


def test_artifacts_load_with_peft_and_transformers_alone(chat_recipe, tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "art"
    run(str(chat_recipe), ["train.max_steps=3", f"output.dir='{out}'"])
    for name in ("recipe.resolved.toml", "metrics.jsonl", "run.json", "final_adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, out / "final_adapter")
    tok = AutoTokenizer.from_pretrained(out / "final_adapter")
    assert "<|im_start|>" in tok.chat_template  # the rendering used in training travels with the result
    ids = tok("Do you have", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == base.config.vocab_size
    lora_b = [v for k, v in adapter(out).items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # it trained (B starts at zero)
    # crb merge / crb verify use the same folder
    assert cli(["merge", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged_model")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert cli(["verify", str(out), "--prompt", "Do you have the navy suit?", "--max-new-tokens", "5"]) == 0


def test_full_method_writes_final_model(chat_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    run(str(chat_recipe), ["method.name='full'", "train.max_steps=2", f"output.dir='{out}'"])
    assert AutoModelForCausalLM.from_pretrained(out / "final_model").config.model_type == "mistral"


def test_cli_errors_are_one_line(chat_recipe, tmp_path, capsys):
    assert cli(["run", str(chat_recipe), "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crb: error: --set: train.lrr: unknown key (did you mean 'train.lr'?)")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{x\n')
    assert cli(["run", str(chat_recipe), "--set", f"data.train=['{bad}']"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2: bad JSON" in err[0]


def test_qlora_quantizes_the_base_to_4_bits(chat_recipe, tiny_model):
    """method qlora on the CPU: every linear layer of the base is a bitsandbytes 4-bit layer whose weight is
    stored packed (two nf4 values per byte, double-quantized absmax constants) and dequantizes to the saved
    weight within nf4's error; lm_head is kept as is; only the LoRA adapters on top train."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from crb.engine.build import build_model
    from crb.recipe import schema as recipes

    saved = load_file(tiny_model / "model.safetensors")
    model = build_model(recipes.load(chat_recipe, ["method.name='qlora'"]), "no", torch.device("cpu"))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down of both layers
    for name, layer in quantized.items():
        w, key = layer.weight, name.replace("base_model.model.", "").replace(".base_layer", "") + ".weight"
        assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8 and not w.requires_grad
        assert w.numel() == layer.in_features * layer.out_features // 2  # 4 bits a weight
        qs = w.quant_state
        assert qs is not None and qs.quant_type == "nf4" and qs.nested and tuple(qs.shape) == saved[key].shape
        back = dequantize_4bit(w.data, qs).float()
        levels = (back.reshape(-1, qs.blocksize).sort(1).values.diff(dim=1) != 0).sum(1) + 1
        assert qs.blocksize == 64 and levels.max() <= 16  # 4 bits: at most 16 values in each block of 64
        err = float((back - saved[key]).norm() / saved[key].norm())
        assert 0.03 < err < 0.15, (name, err)  # the saved weight, rounded (nf4: about 9 % here)
    assert not isinstance(model.base_model.model.lm_head, bnb.nn.Linear4bit)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_an_eval_forward_leaves_qlora_training_as_it_was(chat_recipe):
    """bitsandbytes 0.50 repacks 4-bit weights for CPU inference at an eval's forward (where the CPU has AVX512-BF16)
    and keeps that layout when training goes on: no gradient through the base weights. crb turns the repacking
    off: the LoRA gradients of a training step after an eval equal those of the same step without it."""
    from crb.engine.build import build_model
    from crb.recipe import schema as recipes

    r = recipes.load(chat_recipe, ["method.name='qlora'", "method.lora.dropout=0.0"])
    ids = torch.randint(0, 300, (2, 24))
    grads = []
    for with_eval in (False, True):
        torch.manual_seed(0)
        model = build_model(r, "no", torch.device("cpu"))
        if with_eval:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_qlora_with_paged_8bit_adamw_runs_on_cpu(chat_recipe, tmp_path):
    out = tmp_path / "q"
    final = run(str(chat_recipe), ["method.name='qlora'", "train.optimizer='paged_adamw_8bit'",
                                   "train.gradient_checkpointing=true", "train.max_steps=3", f"output.dir='{out}'"])
    assert final["loss"] == final["loss"]  # finite (not NaN)
    assert any(v.abs().sum() > 0 for k, v in adapter(out).items() if "lora_B" in k)


def test_freeze_trains_only_matching_parameters(chat_recipe, tmp_path, tiny_model):
    out = tmp_path / "fz"
    run(str(chat_recipe), ["method.name='freeze'", "method.trainable=['lm_head', 'layers\\.1\\.']",
                           "train.optimizer='adamw_8bit'", "train.max_steps=3", f"output.dir='{out}'"])
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(out / "final_model" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lm_head" in k or "layers.1." in k for k in changed)
    assert "model.layers.1.mlp.down_proj.weight" in changed and "lm_head.weight" in changed


@pytest.mark.parametrize("method", ["qlora"])
def test_offloaded_activations_train_the_same_as_kept_ones(chat_recipe, tmp_path, method, monkeypatch):
    """Checkpointed layer inputs in CPU memory (reentrant checkpointing + save_on_cpu) change where
    tensors live, not the math: the same losses and adapter as checkpoints kept in place. On the CPU
    nothing moves, so the test watches the path: with offloading, every checkpointed layer's input of
    every training forward goes through save_on_cpu's pack hook; without, save_on_cpu is never entered."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    packed: set[tuple] = set()
    layer_inputs: list[tuple] = []
    real = torch.autograd.graph.save_on_cpu

    class counted_save_on_cpu(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.add((t.data_ptr(), tuple(t.shape))) or pack(t)

    def record(module, args):
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing and module.training \
                and torch.is_grad_enabled():
            layer_inputs.append((args[0].data_ptr(), tuple(args[0].shape)))

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counted_save_on_cpu)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    runs = {}
    try:
        for offload in (False, True):
            packed.clear()
            layer_inputs.clear()
            out = tmp_path / f"{method}-{offload}"
            run(str(chat_recipe), [f"method.name='{method}'", "train.gradient_checkpointing=true", "train.max_steps=3",
                                   f"train.offload_activations={str(offload).lower()}", "train.kernels='liger'",
                                   f"output.dir='{out}'"])
            runs[offload] = (losses(out), adapter(out))
            assert json.loads((out / "profile.json").read_text())["offload_activations"] is offload
            assert len(layer_inputs) == 3 * 2 * 2  # steps x micro-batches x layers, all checkpointed
            if offload:
                assert set(layer_inputs) <= packed, "a checkpointed layer's input was not offloaded"
            else:
                assert not packed  # save_on_cpu never entered
    finally:
        hook.remove()
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-4, atol=1e-6)
    assert runs[False][0][-1] != runs[False][0][0]  # it trained


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpointing_some_layers_trains_the_same_as_none_or_all(chat_recipe, tmp_path, method):
    """train.gradient_checkpointing = N recomputes the first N layers (the others keep their activations):
    where the activations live changes, not the math. The tiny model has 2 layers: none, the first, both."""
    runs = {}
    for gc in ("false", "1", "true"):
        out = tmp_path / f"{method}-{gc}"
        run(str(chat_recipe), [f"method.name='{method}'", f"train.gradient_checkpointing={gc}", "train.max_steps=3",
                               f"output.dir='{out}'"])
        runs[gc] = losses(out)
        chosen = json.loads((out / "profile.json").read_text())
        assert chosen["checkpointed_layers"] == {"false": 0, "1": 1, "true": 2}[gc] and chosen["layers"] == 2
    assert runs["1"] == pytest.approx(runs["false"], rel=1e-5) == runs["true"]
    assert runs["1"][-1] != runs["1"][0]  # it trained


def test_only_the_first_layers_are_checkpointed(tiny_model):
    """keep_layers: of a model with checkpointing enabled, the first N layers recompute, the rest do not."""
    from transformers import AutoModelForCausalLM

    from crb.engine.build import keep_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.gradient_checkpointing_enable()
    keep_layers(model, 1)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]
    calls = []
    model.model.layers[0]._gradient_checkpointing_func = lambda f, *a, **k: calls.append(1) or f(*a, **k)
    model.model.layers[1]._gradient_checkpointing_func = lambda f, *a, **k: calls.append(2) or f(*a, **k)
    model.train()
    model(input_ids=torch.tensor([[1, 5, 7, 9]]), labels=torch.tensor([[1, 5, 7, 9]])).loss.backward()
    assert calls == [1]


def test_unwritable_or_full_output_dir_fails_before_training(chat_recipe, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli(["run", str(chat_recipe), "--set", f"output.dir='{blocker / 'run'}'"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"crb: error: output.dir: cannot write to {blocker / 'run'}")

    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("crb.engine.checkpoint.shutil.disk_usage", lambda _p: usage(2**30, 2**30 - 1000, 1000))
    out = tmp_path / "full-disk"
    assert cli(["run", str(chat_recipe), "--set", f"output.dir='{out}'"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"crb: error: output.dir: {out} has 0.00 GiB free") and "keep_checkpoints" in err
    assert not (out / "metrics.jsonl").exists()  # nothing trained


def nan_on(calls: set[int], monkeypatch) -> None:
    """The causal-LM loss turns NaN on the given (1-based) training calls (eval calls run without grad)."""
    import crb.tasks as losses_module

    real, seen = losses_module.LOSSES["causal_lm"], [0]

    def loss(model, batch, num_items, **kw):
        value = real(model, batch, num_items, **kw)
        if torch.is_grad_enabled():
            seen[0] += 1
            if seen[0] in calls:
                return value * float("nan")
        return value

    monkeypatch.setitem(losses_module.LOSSES, "causal_lm", loss)


def test_a_nan_step_is_skipped_and_training_goes_on(chat_recipe, tmp_path, monkeypatch):
    nan_on({3}, monkeypatch)  # micro-batch 1 of step 2 (2 micro-batches a step)
    out = tmp_path / "nan"
    final = run(str(chat_recipe), ["train.max_steps=4", "train.max_bad_steps=1", f"output.dir='{out}'"])
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in lines if "skipped" in x]
    assert [x["step"] for x in skipped] == [2] and len(skipped[0]["rows"]) == 8
    assert all(re.fullmatch(r".*chat\.jsonl:\d+", r) for r in skipped[0]["records"])  # the source records
    assert [x["step"] for x in lines if "loss" in x] == [1, 3, 4]
    assert final["loss"] == final["loss"] and all(torch.isfinite(v).all() for v in adapter(out).values())


def test_too_many_nan_steps_stop_with_the_last_good_checkpoint(chat_recipe, tmp_path, monkeypatch, capsys):
    nan_on(set(range(5, 100)), monkeypatch)  # from step 3 on
    out = tmp_path / "nans"
    rc = cli(["run", str(chat_recipe), "--set", "train.max_steps=8", "--set", "train.save_every=1",
              "--set", "train.max_bad_steps=2", "--set", f"output.dir='{out}'"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("crb: error: train.max_bad_steps: 3 steps had a non-finite loss or gradient, "
                                      "the last step 5 (records ")
    assert re.search(r"chat\.jsonl:\d+; ", err)
    good = out / "checkpoints" / "step-4"  # steps 3 and 4 were skipped but their checkpoints hold step 2's weights
    assert f"last good checkpoint: {good}" in err
    weights = load_file(good / "model.safetensors")
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert json.loads((good / "crb_state.json").read_text())["bad_steps"] == 2


def test_diverged_weights_end_with_the_last_good_checkpoint_not_done(chat_recipe, tmp_path, monkeypatch, capsys):
    """Weights that turn inf mid-run (every later step skipped as non-finite) end the run with an error that
    names the newest checkpoint written while the weights were finite, and no final model."""
    import crb.tasks as losses_module

    real, seen = losses_module.LOSSES["causal_lm"], [0]

    def loss(model, batch, num_items, **kw):
        if torch.is_grad_enabled():
            seen[0] += 1
            if seen[0] == 5:  # step 3's first micro-batch: a LoRA weight blows up
                next(p for p in model.parameters() if p.requires_grad).data.fill_(float("inf"))
        return real(model, batch, num_items, **kw)

    monkeypatch.setitem(losses_module.LOSSES, "causal_lm", loss)
    out = tmp_path / "diverged"
    rc = cli(["run", str(chat_recipe), "--set", "train.max_steps=6", "--set", "train.save_every=2",
              "--set", "train.max_bad_steps=100", "--set", f"output.dir='{out}'"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("crb: error: training diverged: weights")
    assert f"last good checkpoint: {out / 'checkpoints' / 'step-2'} " in err
    assert json.loads((out / "checkpoints" / "step-4" / "crb_state.json").read_text())["finite"] is False
    assert "crb: done" not in captured.out and not (out / "final_adapter").exists()


def oom_above(rows: int, monkeypatch) -> None:
    """The causal-LM loss raises CUDA's out-of-memory error for training micro-batches of more than `rows`."""
    import crb.tasks as losses_module

    real = losses_module.LOSSES["causal_lm"]

    def loss(model, batch, num_items, **kw):
        if torch.is_grad_enabled() and batch["input_ids"].shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                         "of 79.19 GiB of which 1.50 GiB is free. Including non-PyTorch memory, "
                                         "this process has 77.60 GiB memory in use. (injected)")
        return real(model, batch, num_items, **kw)

    monkeypatch.setitem(losses_module.LOSSES, "causal_lm", loss)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_math(chat_recipe, tmp_path, monkeypatch, capsys):
    direct = tmp_path / "micro2"
    run(str(chat_recipe), ["train.max_steps=4", "train.micro_batch=2", f"output.dir='{direct}'"])
    oom_above(2, monkeypatch)
    halved = tmp_path / "halved"
    run(str(chat_recipe), ["train.max_steps=4", "train.micro_batch=4", f"output.dir='{halved}'"])
    out = capsys.readouterr().out
    assert ("crb: step 1: out of memory at micro-batch 4 (tried to allocate 2.00 GiB: 1.50 GiB of 79.19 GiB free, "
            "77.60 GiB held by this process); going on with micro-batch 2 x accumulation 4") in out
    assert losses(halved) == pytest.approx(losses(direct), rel=1e-6)  # batch 8 all along: the same steps
    a, b = adapter(direct), adapter(halved)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_out_of_memory_at_micro_batch_1_stops_with_a_clear_message(chat_recipe, tmp_path, monkeypatch, capsys):
    oom_above(0, monkeypatch)
    rc = cli(["run", str(chat_recipe), "--set", "train.max_steps=2", "--set", f"output.dir='{tmp_path / 'o'}'"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err == ("crb: error: step 1: CUDA out of memory at micro-batch 1: set a lower "
                               "data.max_length, train.gradient_checkpointing = true or train.offload_activations = "
                               '"auto" (`crb plan` shows what fits) (tried to allocate 2.00 GiB: 1.50 GiB of '
                               "79.19 GiB free, 77.60 GiB held by this process)")


def test_out_of_memory_with_several_processes_stops_with_what_to_set():
    """Several processes (or DeepSpeed) cannot halve on one process: one line says the micro-batch to set."""
    from crb.engine.loop import oom_advice
    from crb.engine.schedule import Schedule

    line = oom_advice(3, Schedule(8, 2, 10, 10), world=4, deepspeed=False)
    assert line == ("step 3: CUDA out of memory at micro-batch 8 on 1 of 4 processes: set train.micro_batch = 4 "
                    '(accumulation 4 keeps the effective batch), or leave it "auto" for the plan to choose')
    assert "under DeepSpeed: set train.micro_batch = 2 (accumulation 2" in oom_advice(1, Schedule(4, 1, 5, 5), 1, True)


def test_lock_pins_the_run_and_reports_drift(chat_recipe, chat_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lockfile = tmp_path / "chat.lock.json"
    assert cli(["lock", str(chat_recipe), "--set", "train.max_steps=1", "--out", str(lockfile)]) == 0
    locked = json.loads(lockfile.read_text())
    assert locked["data"] == {str(chat_file.resolve()): hashlib.sha256(chat_file.read_bytes()).hexdigest()}
    assert torch.__version__.startswith(locked["packages"]["torch"]) and locked["packages"]["crb"]
    assert locked["model"]["revision"].startswith("sha256:")

    locked["packages"]["transformers"] = "0.0.1"
    lockfile.write_text(json.dumps(locked))
    assert cli(["run", str(lockfile)]) == 0
    printed = capsys.readouterr()
    assert "crb: warning: package drift since the lock: transformers 0.0.1 -> " in printed.out + printed.err
    from crb.recipe import schema as recipes

    written = json.loads((Path(recipes.load(chat_recipe).output.dir) / "crb.lock.json").read_text())
    assert written["data"] == locked["data"] and written["model"] == locked["model"]  # every run records its lock

    chat_file.write_text(chat_file.read_text() + "\n")  # the data changed since the lock
    rc = cli(["run", str(lockfile)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith(f"crb: error: {lockfile}: data drift: {chat_file.resolve()} sha256 was ")
