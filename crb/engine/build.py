"""Build what the loop needs from a recipe: tokenizer, model (full | lora | qlora | freeze),
optimizer and scheduler. Small functions, one per component; the libraries do the work
(transformers, peft, bitsandbytes)."""

from __future__ import annotations

import math
import os
import re

import torch
from accelerate import PartialState
from transformers import AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from crb.data.chatml import chat_template
from crb.engine import hub
from crb.engine.kernels import apply_kernels, resolve_attention
from crb.engine.lora_dropout import share_dropouts, shares
from crb.errors import CrbError
from crb.recipe.schema import Recipe
from crb.tasks import get_task

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_precision(precision: str, device: torch.device) -> str:
    """Accelerate's mixed_precision: 'bf16' | 'fp16' | 'no'."""
    if precision == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision != "fp32" and device.type == "cpu" and precision == "fp16":
        raise CrbError("train.precision: fp16 needs a GPU (use bf16 or fp32 on CPU)")
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]


def half_dtype(mixed: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)


def build_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    m = recipe.model
    with hub.loading(m.tokenizer or m.name, "tokenizer", "model.tokenizer" if m.tokenizer else "model.name"):
        tok = AutoTokenizer.from_pretrained(m.tokenizer or m.name, revision=None if m.tokenizer else m.revision,
                                            local_files_only=hub.cache_only(m.tokenizer or m.name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding is never attended to nor trained on
    task = get_task(recipe.data.format)
    if task.chat:
        tok.chat_template = chat_template(tok, recipe.data.chat_template)  # saved with the result
    if added := task.special_tokens(recipe):
        tok.add_special_tokens({"additional_special_tokens": added})
    return tok


def load_weights(auto, name: str, **kwargs) -> torch.nn.Module:
    """`from_pretrained` from safetensors only: pickled (.bin) weights can run code when loaded, so they
    need the user's explicit `--allow-pickle` (CRB_ALLOW_PICKLE=1). A hub or cache failure is one line."""
    if os.environ.get("CRB_ALLOW_PICKLE") != "1":
        kwargs["use_safetensors"] = True
    if hub.cache_only(str(name)):  # no network: the cache at once, no retries (transformers' adapter lookup
        kwargs.update(local_files_only=True, adapter_kwargs={"local_files_only": True})  # needs it said again)
    try:
        return auto.from_pretrained(name, **kwargs)
    except OSError as e:
        if "safetensors" in str(e) and kwargs.get("use_safetensors"):
            raise CrbError(f"model.name: {name} has no safetensors weights; pickled weights can run code when "
                           "loaded: convert them, or pass --allow-pickle if you trust them") from None
        raise hub.load_error(str(name), "weights", e) from e


def build_model(recipe: Recipe, mixed: str, device: torch.device) -> torch.nn.Module:
    m, method = recipe.model, recipe.method
    task = get_task(recipe.data.format)
    kind = task.kind
    if kind == "embedding":
        return build_encoder(recipe)
    auto = task.auto_class
    dtype = DTYPES.get(m.dtype) or (half_dtype(mixed) if method.name in ("lora", "qlora") else torch.float32)
    attention = m.attn_implementation
    if attention == "auto":  # resolved by the plan in a run; here when a model is built without one
        attention, _ = resolve_attention(recipe.data.format, recipe.data.packing, device.type == "cuda")
    kwargs: dict = {"dtype": dtype, "attn_implementation": attention, "revision": m.revision}
    if method.name == "qlora":
        kwargs["quantization_config"] = quant_config(recipe, mixed)
        kwargs["device_map"] = {"": device}
    if m.random_init:
        if method.name == "qlora":
            raise CrbError("model.random_init: not with method 'qlora' (save the random model, then load it)")
        config = hub.config(m.name, m.revision)
        model = auto.from_config(config, dtype=dtype, attn_implementation=attention)
    else:
        model = load_weights(auto, m.name, **kwargs)
    model.config.use_cache = False
    if recipe.train.kernels in ("liger", "cce"):
        PartialState().print(f"crb: {apply_kernels(model, device, recipe.train.kernels)}")
    layers = checkpointed(recipe, n_blocks(model))
    # Offloaded activations need the reentrant form: it saves each layer's input through autograd, where
    # the loop's save_on_cpu hook moves it to the CPU (the non-reentrant form keeps it in a closure).
    gc_kwargs = {"use_reentrant": bool(recipe.train.offload_activations)}
    if method.name == "qlora":
        prepare_kbit(model, dtype)
    if kind == "clara":
        return build_clara(model, recipe, layers)
    if layers:
        checkpointing_on(model, gc_kwargs)
        keep_layers(model, layers)
        if method.name in ("lora", "qlora", "freeze"):
            model.enable_input_require_grads()  # checkpointed blocks need an input that wants grad
    if method.name in ("lora", "qlora"):
        model = add_lora(model, recipe, "SEQ_2_SEQ_LM" if kind == "seq2seq" else "CAUSAL_LM", layers)
    elif method.name == "freeze":
        freeze(model, method.trainable)
    if recipe.train.compiled:  # "auto" is resolved by the plan before a run builds
        compile_layers(model, graphs=recipe.train.compile == "graphs")
    return model


def compile_layers(model: torch.nn.Module, graphs: bool = False) -> int:
    """torch.compile each transformer layer in place (after LoRA is in it); with `graphs`, the layers that are not
    checkpointed replay as CUDA graphs (a recomputed layer runs again inside backward, which graphs do not
    allow). Returns how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    graphed = 0
    for layer in layers:
        graph = graphs and not layer.gradient_checkpointing
        layer.compile(mode="reduce-overhead" if graph else None)
        graphed += graph
    PartialState().print(f"crb: torch.compile on {len(layers)} layers" + (f", {graphed} as CUDA graphs" * graphs)
                         + " (the first steps compile)")
    return len(layers)


def prepare_kbit(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """peft's prepare_model_for_kbit_training without its fp32 copy of every non-quantized weight on bf16
    models: there the norms, embeddings and lm_head stay bf16, so the residual stream and its elementwise work
    stay bf16 (norm statistics and the loss are computed in fp32 all the same). fp16 models keep peft's upcast."""
    for m in model.modules():  # bitsandbytes 0.50 repacks 4-bit weights for CPU inference at an eval's forward and
        if hasattr(m, "support_avx512bf16_for_cpu"):  # keeps that layout once training goes on: no gradient through
            m.support_avx512bf16_for_cpu = False  # the base weights, and an in-place bias add fails. Never repack.
    if dtype != torch.bfloat16:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return
    for p in model.parameters():
        p.requires_grad_(False)


def n_blocks(model: torch.nn.Module) -> int:
    """The layers that gradient checkpointing can recompute one by one (transformers' checkpointable layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules())


def checkpointed(recipe: Recipe, blocks: int) -> int:
    """How many layers train.gradient_checkpointing recomputes (an unresolved "auto" counts as none)."""
    gc = recipe.train.gradient_checkpointing
    if gc is True:
        return blocks
    if gc is False or gc == "auto":
        return 0
    return min(int(gc), blocks)


def checkpointing_on(model: torch.nn.Module, kwargs: dict) -> None:
    """Activation checkpointing on every layer (keep_layers then narrows it): transformers 5.2x names it
    activation_checkpointing_enable and warns on the old name, which earlier 5.x releases have alone."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def keep_layers(model: torch.nn.Module, checkpointed: int) -> None:
    """Checkpoint only the first `checkpointed` layers (after checkpointing_on): the others keep
    their activations. The first ones, because a recomputed layer then runs after the kept layers' activations
    are freed in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and i < checkpointed


def build_clara(base: torch.nn.Module, recipe: Recipe, checkpointed_layers: int = 0) -> torch.nn.Module:
    """The CLaRa wrapper: memory tokens added, the stage's LoRA adapters (fresh, or a previous stage's) and
    memory rows, the first `checkpointed_layers` layers checkpointed."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    from crb.models.clara import Clara, special_tokens

    c, lora = recipe.clara, recipe.method.lora
    tok = build_tokenizer(recipe)
    if len(tok) > base.get_input_embeddings().num_embeddings:  # never shrink a padded vocabulary
        base.resize_token_embeddings(len(tok))
    added = tok.convert_tokens_to_ids(special_tokens(recipe.clara.memory_tokens))
    mem_ids = added[:recipe.clara.memory_tokens]
    adapters = ("encoder", "decoder", "query_reasoner") if c.phase == "end_to_end" else ("encoder", "decoder")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        bias=lora.bias, task_type="CAUSAL_LM")
    if c.init_from:
        src = _clara_source(c.init_from)
        model = PeftModel.from_pretrained(base, src / "encoder", adapter_name="encoder", is_trainable=True)
        for name in adapters[1:]:
            if (src / name).is_dir():
                model.load_adapter(str(src / name), adapter_name=name, is_trainable=True)
            elif name == "query_reasoner":  # stage 3 starts the query reasoner from the encoder
                model.load_adapter(str(src / "encoder"), adapter_name=name, is_trainable=True)
            else:
                model.add_adapter(name, config)
    else:
        model = get_peft_model(base, config, adapter_name="encoder")
        for name in adapters[1:]:
            model.add_adapter(name, config)
    if shares(recipe, checkpointed_layers):
        share_dropouts(model)
    for n, p in model.named_parameters():  # every adapter of the stage trains
        p.requires_grad = any(f".{a}." in n for a in adapters) and "lora_" in n
    clara = Clara(model, mem_ids, added, adapters, c.top_k if c.phase != "compression" else 1, c.temperature)
    if c.init_from:  # the previous stage's added-token rows
        rows = load_file(src / "clara_embeddings.safetensors")
        clara.load_rows(rows["ids"], rows["rows"])
    if checkpointed_layers:  # non-reentrant: its context_fn re-activates the forward's adapter for the recomputation
        checkpointing_on(base, {"use_reentrant": False, "context_fn": clara.recompute_context})
        keep_layers(base, checkpointed_layers)
    return clara


def _clara_source(path: str):
    from pathlib import Path

    src = Path(path)
    src = src / "final_adapter" if (src / "final_adapter").is_dir() else src
    if not (src / "encoder").is_dir():
        raise CrbError(f"clara.init_from: {path}: no CLaRa adapters there (expected final_adapter/encoder/)")
    return src


def build_encoder(recipe: Recipe) -> torch.nn.Module:
    """A sentence-transformers model (full or freeze); fp32 weights unless model.dtype says otherwise (mixed
    precision autocasts), whatever dtype the folder was saved in."""
    m = recipe.model
    with hub.loading(m.name, "sentence-transformers model"):  # the task's: a bi- or a cross-encoder
        model = get_task(recipe.data.format).encoder(m.name, revision=m.revision, device="cpu",
                                                     local_files_only=hub.cache_only(m.name),
                                                     model_kwargs={"dtype": DTYPES.get(m.dtype) or torch.float32})
    model.max_seq_length = recipe.data.max_length
    layers = checkpointed(recipe, n_blocks(model[0].auto_model))
    if layers:
        checkpointing_on(model[0].auto_model, {"use_reentrant": False})
        keep_layers(model[0].auto_model, layers)
    if recipe.method.name == "freeze":
        freeze(model, recipe.method.trainable)
    if recipe.train.compiled:  # "auto" is resolved by the plan before a run builds
        compile_layers(model, graphs=recipe.train.compile == "graphs")
    return model


def quant_config(recipe: Recipe, mixed: str) -> BitsAndBytesConfig:
    q = recipe.method.quant
    compute = DTYPES.get(q.compute_dtype) or half_dtype(mixed)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute)


def add_lora(model: torch.nn.Module, recipe: Recipe, task_type: str, checkpointed_layers: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = recipe.method.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias=lora.bias,
                        modules_to_save=lora.modules_to_save or None, task_type=task_type)
    model = get_peft_model(model, config)
    if shares(recipe, checkpointed_layers):
        share_dropouts(model)
    return model


def freeze(model: torch.nn.Module, patterns: list[str]) -> None:
    regex = [re.compile(p) for p in patterns]
    for name, p in model.named_parameters():
        p.requires_grad = any(r.search(name) for r in regex)
    if not any(p.requires_grad for p in model.parameters()):
        raise CrbError(f"method.trainable: no parameter name matches {patterns}")


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) with train.weight_decay on the weights, none on biases and norms
    (transformers' Trainer rule, as the peers crb is compared with) nor on CLaRa's memory-token embedding."""
    from transformers.trainer_pt_utils import get_parameter_names

    t = recipe.train
    no_decay_types = [torch.nn.LayerNorm] + [torch.nn.Embedding] * get_task(recipe.data.format).trains_embedding_rows
    decay = set(get_parameter_names(model, no_decay_types, NO_DECAY_NAMES))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n in decay], "weight_decay": t.weight_decay},
              {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = {"lr": t.lr, "betas": tuple(t.betas), "eps": t.eps}
    if t.optimizer == "adamw":  # fused: one kernel, no temporaries (transformers' default optim too)
        return torch.optim.AdamW(groups, **kwargs, fused=True)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, **kwargs)


# Parameter names that take no weight decay (transformers' Trainer.get_decay_parameter_names).
NO_DECAY_NAMES = ["bias", "layernorm", "rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def warmup_steps(recipe: Recipe, total_steps: int) -> int:
    return math.ceil(total_steps * recipe.train.warmup_ratio)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler  # late: it imports transformers' trainer (and peft), 2 s of every start

    return get_scheduler(recipe.train.scheduler, optimizer, num_warmup_steps=warmup_steps(recipe, total_steps),
                         num_training_steps=total_steps)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit weights counted by their packed elements x 2; a weight that
    DeepSpeed ZeRO-3 partitioned as it loaded by its full size, `ds_numel`)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel()) * (2 if p.dtype == torch.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
