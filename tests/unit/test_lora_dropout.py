"""method.lora.shared_dropout: the adapters that read one tensor share one dropout mask and one kept copy."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import MistralConfig, MistralForCausalLM

from crb.engine.lora_dropout import SharedDropout, share_dropouts


def lora_model(p: float, shared: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    model = MistralForCausalLM(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules="all-linear"))
    for n, w in model.named_parameters():  # a non-zero B, so the adapters' inputs reach the loss
        if "lora_B" in n:
            torch.nn.init.normal_(w, std=0.1)
    if shared:
        share_dropouts(model)
    return model


def adapter_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each lora_A of the first layer received, by projection name."""
    seen: dict[str, torch.Tensor] = {}
    layer = model.base_model.model.model.layers[0]

    def keep(name: str):
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen.setdefault(name, args[0])
        return hook

    hooks = [m.lora_A["default"].register_forward_hook(keep(n))
             for n, m in layer.named_modules() if hasattr(m, "lora_A") and n.endswith("proj")]
    model(input_ids=ids).logits.sum().backward()
    for h in hooks:
        h.remove()
    return {n.split(".")[-1]: x for n, x in seen.items()}


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward over one forward (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(storages.values())


def test_adapters_reading_one_tensor_share_one_mask():
    model, ids = lora_model(0.5, shared=True), torch.randint(0, 64, (2, 16))
    x = adapter_inputs(model, ids)
    assert x["q_proj"] is x["k_proj"] is x["v_proj"]  # one dropped copy for the three
    assert x["gate_proj"] is x["up_proj"]
    assert (x["q_proj"] == 0).float().mean() == pytest.approx(0.5, abs=0.1)  # it is dropped
    assert not torch.equal(x["q_proj"] == 0, x["o_proj"] == 0) and x["down_proj"] is not x["up_proj"]
    peft_way = adapter_inputs(lora_model(0.5, shared=False), ids)
    assert not torch.equal(peft_way["q_proj"] == 0, peft_way["k_proj"] == 0)  # peft: a mask per adapter


def test_shared_dropout_keeps_fewer_tensors_for_backward():
    """Per layer q, k, v and gate, up keep one dropped input instead of three and two: 3 fewer fp32 copies of
    tokens x hidden per layer, and fewer masks (their bytes depend on the device's dropout kernel)."""
    ids = torch.randint(0, 64, (2, 16))
    per_adapter, shared = saved_bytes(lora_model(0.1, False), ids), saved_bytes(lora_model(0.1, True), ids)
    tokens, layers, hidden = 32, 2, 32
    copies = tokens * layers * 3 * hidden * 4
    assert copies < per_adapter - shared <= copies * 2  # at most one mask as large as a copy per copy


def test_without_dropout_the_model_is_unchanged_and_gradients_match():
    """p = 0 leaves peft's Identity; with dropout off (eval), shared and per-adapter models are the same function
    with the same gradients."""
    assert share_dropouts(lora_model(0.0, False)) == 0
    ids = torch.randint(0, 64, (2, 16))
    grads = []
    for shared in (False, True):
        model = lora_model(0.3, shared).eval()
        model(input_ids=ids).logits.pow(2).mean().backward()
        grads.append({n: w.grad for n, w in model.named_parameters() if w.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_the_dropped_copy_is_in_the_adapters_dtype():
    """A bf16 model with fp32 adapters and no autocast: peft casts each adapter's input to fp32; the shared copy is
    cast once. Under autocast it is the autocast dtype (what the adapter's matmul would cast it to)."""
    model = lora_model(0.2, True, torch.bfloat16)
    for n, w in model.named_parameters():
        if "lora_" in n:
            w.data = w.data.float()
    ids = torch.randint(0, 64, (1, 8))
    assert adapter_inputs(model, ids)["q_proj"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert adapter_inputs(model, ids)["q_proj"].dtype == torch.bfloat16


def test_nothing_outlives_the_forward():
    """The SharedDropouts of a model hold one (input, dropped copy) pair between them, dropped after the forward;
    a forward stopped early (as checkpointing's recomputation stops) leaves that one pair, never one per layer."""
    model = lora_model(0.2, True)
    model(input_ids=torch.randint(0, 64, (1, 8)))
    drops = {id(m): m for m in model.modules() if isinstance(m, SharedDropout)}
    assert len(drops) == 2 * 2  # self_attn and mlp of each layer
    slots = {id(m.slot): m.slot for m in drops.values()}
    assert len(slots) == 1 and not next(iter(slots.values()))
    layers = model.base_model.model.model.layers
    hidden = torch.randn(1, 8, 32)
    for layer in layers:  # each layer's attention projections, as a recomputation that stops inside the layer
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj(hidden)
    assert len(slots[next(iter(slots))]) == 3 and slots[next(iter(slots))]["input"] is hidden


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_recompute_the_shared_masks(reentrant):
    """Checkpointing recomputes each layer in backward (non-reentrant: stopping early, once the saved tensors are
    back); the recomputation draws the forward's shared masks, so the gradients are those of the plain model."""
    ids = torch.randint(0, 64, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = lora_model(0.3, True)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        torch.manual_seed(1)
        model(input_ids=ids).logits.pow(2).mean().backward()
        grads.append({n: w.grad for n, w in model.named_parameters() if w.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])



@pytest.mark.parametrize("compiled, checkpointing, shared", [(True, "true", False), (True, "false", True),
                                                             (False, "true", True)])
def test_compiled_layers_with_checkpointing_keep_a_dropout_per_adapter(tmp_path, compiled, checkpointing, shared):
    """build.add_lora asks lora_dropout.shares: compiled layers with checkpointing on keep peft's dropout (a shared
    one there measured 0.4 GiB more and ran out of memory at 8 GiB); eager or uncheckpointed layers share."""
    from pathlib import Path

    from crb.engine.build import add_lora, checkpointed
    from crb.recipe.schema import load

    root = Path(__file__).resolve().parents[2]
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path)
    recipe = load(root / "recipes" / "language.toml", [f"model.name='{tmp_path}'", 'method.name="lora"',
                                                      f"train.compile={str(compiled).lower()}", 'train.kernels="none"',
                                                      f"train.gradient_checkpointing={checkpointing}"])
    model = add_lora(MistralForCausalLM(config), recipe, "CAUSAL_LM", checkpointed(recipe, 2))
    attn = model.base_model.model.model.layers[0].self_attn
    assert isinstance(attn.q_proj.lora_dropout["default"], SharedDropout) is shared
