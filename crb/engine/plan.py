"""`crb plan`: the predicted peak GPU memory of a recipe, per component, from the model's config
alone (the model is built on the meta device: no weights are read or allocated), for every
launch profile; the profile is chosen from these estimates and the card (crb.engine.profiles); the
offload profiles' CPU memory is checked against the machine's. The method and its accuracy: docs/plan.md."""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import asdict, dataclass, field

import torch

from crb.data.prepared import Rows
from crb.engine.build import checkpointed, n_blocks
from crb.engine.hardware import Hardware
from crb.engine.lora_dropout import shares
from crb.engine.profiles import PROFILES, Profile, choose
from crb.recipe.schema import Recipe
from crb.tasks import get_task
from crb.units import GIB

CUDA_CONTEXT = 0.5 * GIB  # CUDA context + cuBLAS workspaces, measured order of magnitude
HALF = 2  # bf16/fp16 bytes
LOGIT_BYTES = HALF + 4 + 4 + 4  # per vocabulary entry and token: bf16 logits, fp32 copy, log-softmax, gradient
LIGER_LORA_LAYER = (8.4, 5)  # the same with liger's RMSNorm and SwiGLU (Mistral-7B QLoRA, H200, bf16 stream)
PLAIN_MLP_BACKWARD = 25.5  # bytes per token and intermediate unit at a plain MLP's backward (H200, StarCoder2-3B)
GATED_MLP_BACKWARD = 2 * HALF  # a gated LoRA MLP's backward: the bf16 gradients of gate and up
LORA_LAYER = (14, 5)  # saved bf16 tensors per token of one layer, in units of (hidden, intermediate), with RMSNorm,
FULL_LAYER = (10, 4)  # for a gated MLP (gate, up, down); a plain one (fc, proj) keeps two fewer
T5_LAYER, T5_SCORE_BYTES = (26, 8), 12  # fp32 residual and norms under autocast, gelu_new as eight ops, fp32 bias
# torch.compile'd layers (train.compile): fused norms, activations and dropouts keep fewer tensors. Fitted on H200
# rows (benchmarks/results/plan_accuracy.json): Instructor-XL full fine-tunes at 3,072 to 12,288 tokens (T5), and
# StarCoder2-3B QLoRA at 4,096 and 16,384 tokens (its layers keep 5 % less, its MLP backward a quarter less).
T5_COMPILED_LAYER, T5_COMPILED_SCORE_BYTES = (10, 3), 4.3
COMPILED_LORA_LAYER, COMPILED_MLP_BACKWARD = 0.95, 0.75
# Each LoRA adapter keeps its dropped-out input and its mask for backward; method.lora.shared_dropout keeps one for
# q, k, v and one for gate, up: (3 if gated else 2) copies of DROPPED_COPY hidden units fewer than the constants
# above count. Fitted on H200 frontier rows: language whole card 109.8 -> 91.9 GiB, code compiled 78.5 -> 70.1.
DROPPED_COPY = 1.49
COMPILED_FULL_LAYER = 1.08  # NLLB-600M full fine-tune, compiled (as CUDA graphs): 10.93 and 12.86 GiB at batch 8, 16
GATES = {"gate_proj", "gate_up_proj", "wi_0", "w1", "w3"}  # a gated MLP's gate (Llama/Mistral, Phi-3, T5 v1.1, Mixtral)
CONTEXT = "CUDA context (outside torch's allocator)"
COPIES = "bf16 copies of fp32 weights (autocast, kept for backward)"
OVERLAP = "gradients not allocated yet at the loss's backward (the peak)"
LATER = "LoRA gradients of checkpointed layers, allocated as their inputs are freed"
FUSED = "fused linear + cross-entropy (logits in chunks, input gradient)"
FUSED_BYTES = 12  # per hidden unit and token: a bf16 + fp32 logits chunk of ~tokens x hidden / vocab rows, grad_input
LIGER_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2",
               "granite"}  # model types liger-kernel 0.8 patches (fused norms and SwiGLU; others get its loss alone)
HEADROOM = 0.95  # of the card, for the allocator's fragmentation
HOST_HEADROOM = 0.9  # of the machine's RAM, for the OS, the data workers and the page cache
# CPU memory under ZeRO-3 offload, measured on an H200 machine (StarCoder2-3B full fine-tune, 1 process: 53.5 GiB
# above idle while training, 81.3 GiB while the final model is written): each process's runtime (torch, CUDA,
# DeepSpeed's buffers) beside the planned states, and the main process's save, per trained parameter
RUNTIME_HOST = 2.7 * GIB
SAVE_HOST_BYTES = 9.8
# ZeRO-3 offload's GPU (full fine-tunes), measured window by window between layers (benchmarks/memory_peak.py
# --phases; one H200: Mistral-7B's layers and StarCoder2-3B at 2,048 to 8,192 tokens): what stays between steps, a
# layer's backward (its gathered bf16 weights, their gradients and part of the next layer's: 2.19 x its bf16
# bytes), and a vocabulary matrix's gradient on its way to the CPU: 10 bytes per element beside its bf16 copy on
# one GPU. Of those, by stage3.py, 8 are fp32 copies of this process's partition (the reduced gradient cast to the
# accumulation dtype, and the GPU copy of its CPU buffer), so on N GPUs 2 + 8 / N.
OFFLOAD_RESIDENT = 0.156 * GIB
OFFLOAD_LAYER = 2.19
OFFLOAD_REDUCE = (2, 8)  # bytes per element of the whole matrix, and of this process's partition
# Under DeepSpeed the weights are bf16 and nothing runs under autocast: a fully fine-tuned layer keeps half of
# FULL_LAYER (no fp32 residual stream; Mistral-7B: 98.6 kB per token measured, 98.3 planned) and a plain MLP's
# backward a few bf16 temporaries (StarCoder2-3B)
DS_FULL_LAYER = 0.5
DS_PLAIN_MLP_BACKWARD = 2.7
PAGED = "optimizer states (paged: unified memory, outside torch's allocator)"
STEP = "optimizer step: a flat bf16 copy and an fp32 copy of the gradients it updates (DeepSpeed)"
OUTSIDE = (CONTEXT, PAGED)


@dataclass
class Plan:
    components: dict[str, float] = field(default_factory=dict)  # bytes, of the chosen profile
    total: float = 0.0  # what the card must hold
    allocated: float = 0.0  # of it, what torch's allocator holds (torch.cuda.max_memory_allocated's peak)
    capacity: float | None = None
    profile: str = "plain"
    reason: str = ""
    fits: bool | None = None
    profiles: dict[str, float] = field(default_factory=dict)  # every profile's total (bytes)
    advice: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)  # how each "auto" of [train] was resolved, and why
    notes: dict[str, int | float | str] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)  # bytes of this machine's CPU memory (offload profiles)
    ram: float = 0.0  # this machine's CPU memory (bytes)

    def table(self) -> str:
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"crb plan: predicted peak GPU memory per process, profile {self.profile}")
        t.add_column("component")
        t.add_column("GiB", justify="right")
        for name, b in self.components.items():
            t.add_row(name, f"{b / GIB:.2f}")
        t.add_row("[bold]total", f"[bold]{self.total / GIB:.2f}")
        t.add_row("of it in torch's allocator", f"{self.allocated / GIB:.2f}")
        buf = StringIO()
        console = Console(file=buf, width=110)
        console.print(t)
        console.print("other profiles: " + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in self.profiles.items()
                                                     if k != self.profile))
        cap = f"{self.capacity / GIB:.1f} GiB" if self.capacity else "no GPU detected"
        verdict = {True: "fits", False: "does NOT fit", None: "(no GPU to compare)"}[self.fits]
        console.print(f"card: {cap}; profile: {self.profile} ({self.reason}); {verdict}")
        if self.host:
            parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.host.items())
            console.print(f"CPU memory of this machine: {sum(self.host.values()) / GIB:.1f} GiB ({parts}) of "
                          f"{self.ram / GIB:.0f} GiB")
        for line in self.choices:
            console.print(f"chosen: {line}")
        for line in self.advice:
            console.print(f"- {line}")
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_dict(self) -> dict:
        """The plan in GiB, as `crb plan --json` prints it."""
        d = asdict(self)
        d["components_gib"] = {k: round(v / GIB, 3) for k, v in d.pop("components").items()}
        d["profiles_gib"] = {k: round(v / GIB, 3) for k, v in d.pop("profiles").items()}
        d["total_gib"] = round(d.pop("total") / GIB, 3)
        d["allocated_gib"] = round(d.pop("allocated") / GIB, 3)
        d["capacity_gib"] = round(d.pop("capacity") / GIB, 3) if self.capacity else None
        d["host_gib"] = {k: round(v / GIB, 3) for k, v in d.pop("host").items()}
        d["ram_gib"] = round(d.pop("ram") / GIB, 3)
        return d


def meta_model(recipe: Recipe) -> torch.nn.Module:
    return _meta_model(recipe.model.name, recipe.model.revision, get_task(recipe.data.format).auto_class)


@functools.lru_cache(maxsize=4)
def _meta_model(name: str, revision: str | None, auto: type | None) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForTextEncoding

    from crb.engine import hub
    config = hub.config(name, revision)  # the hub, its cache, or the copy shipped with crb
    with init_empty_weights():  # no Auto class (a sentence-transformers model): the encoder alone
        model = (auto or AutoModelForTextEncoding).from_config(config)
    model.tie_weights()  # not done on the meta device: a tied lm_head would be counted twice
    return model


def lora_targets(model: torch.nn.Module, targets: list[str] | str) -> list[torch.nn.Linear]:
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if targets == "all-linear" or (isinstance(targets, list) and leaf in targets) or \
                (isinstance(targets, str) and re.fullmatch(targets, name)):
            out.append(mod)
    return out


@dataclass
class Shape:
    """What the estimate needs of a model and a recipe."""
    params: int  # all parameters
    linear: int  # parameters in the layers' linear weights (what 4-bit quantizes)
    trainable: int
    adapters: int  # LoRA adapter sets on the base (CLaRa: 2 or 3)
    hidden: int
    inter: int
    layers: int
    gated: bool  # the MLP has three matrices (SwiGLU: gate, up, down), not two
    vocab: int
    tokens: int  # per micro-batch through the layers (both passes of an encoder-decoder or CLaRa)
    logit_tokens: int  # per micro-batch, positions whose vocabulary logits are computed
    pass_tokens: int  # the most tokens in one forward pass of one layer stack (what one recomputed layer sees)
    heads: int = 0
    seq: int = 0  # the longest sequence (for eager attention's scores)
    attention: str = "sdpa"
    embedding_trains: bool = False  # CLaRa: its memory-token rows train (fp32, beside the frozen embedding)
    model_type: str = ""
    fused_norm: bool = False  # nn.LayerNorm (one op) rather than an RMSNorm written as fp32 elementwise ops
    blocks: int = 0  # checkpointable layers (both stacks of an encoder-decoder); 0: `layers`
    tied: bool = False  # the output layer is the input embedding (one vocabulary matrix)


@dataclass(frozen=True)
class DataFacts:
    """What the prepared rows tell the plan that the recipe cannot: the longest row one pass holds (a causal
    row, a seq2seq source or target, a CLaRa decoder prompt) and whether some row packs several documents."""
    longest: int
    packed: bool


def data_facts(rows: list[dict], fmt: str) -> DataFacts | None:
    keys = get_task(fmt).token_keys
    if not rows or not keys:  # rows of texts (retrieval), tokenized batch by batch
        return None
    if isinstance(rows, Rows):  # prepared rows: their lengths without reading them
        return DataFacts(max(int(rows.lengths(k).max()) for k in keys), rows.packed)
    longest = max(len(r[k]) for r in rows for k in keys)
    packed = any("position_ids" in r and bool((r["position_ids"][1:] == 0).any()) for r in rows)
    return DataFacts(longest, packed)


def shape_of(recipe: Recipe, model: torch.nn.Module, micro_batch: int, data: DataFacts | None = None) -> Shape:
    cfg = model.config
    method, d, task = recipe.method, recipe.data, get_task(recipe.data.format)
    params = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in lora_targets(model, "all-linear"))
    adapters = task.lora_adapters(recipe)
    if method.name in ("lora", "qlora"):
        trainable = adapters * sum(method.lora.r * (m.in_features + m.out_features)
                                   for m in lora_targets(model, method.lora.target_modules))
    elif method.name == "freeze":
        regex = [re.compile(p) for p in method.trainable]
        trainable = sum(p.numel() for n, p in model.named_parameters() if any(r.search(n) for r in regex))
    else:
        trainable = params
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "d_ff", None) or \
        getattr(cfg, "encoder_ffn_dim", None) or 4 * hidden
    gated = any(n.rsplit(".", 1)[-1] in GATES for n, _ in model.named_modules())
    fused_norm = any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    L = min(d.max_length, data.longest) if data else d.max_length
    tokens, logit_tokens, pass_tokens = task.plan_tokens(recipe, micro_batch, L)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", 0)
    attention = recipe.model.attn_implementation
    if attention == "auto":
        attention = getattr(cfg, "_attn_implementation", None) or "sdpa"
    head = model.get_output_embeddings()
    return Shape(params, linear, trainable, adapters, hidden, inter, layers, gated, cfg.vocab_size, tokens,
                 logit_tokens, pass_tokens, heads, L, attention, task.trains_embedding_rows, cfg.model_type,
                 fused_norm, blocks=n_blocks(model) or layers,
                 tied=head is not None and head.weight is model.get_input_embeddings().weight)


def estimate(recipe: Recipe, s: Shape, profile: Profile, n_gpus: int) -> dict[str, float]:
    """Bytes per GPU, per component, of one recipe under one profile. Components named in OUTSIDE are
    GPU memory that torch's allocator does not see (torch.cuda.max_memory_allocated leaves them out)."""
    method, t = recipe.method, recipe.train
    if profile.offload_params and method.name == "full":  # a model of its own: the peak is one of three moments
        return zero3_offload(recipe, s, profile, n_gpus)
    ds = profile.zero_stage > 0  # DeepSpeed keeps the model in bf16 and fp32 master weights in its optimizer
    shard = n_gpus if profile.zero_stage >= 2 else 1  # gradients and optimizer states partitioned
    c: dict[str, float] = {}
    if method.name == "qlora":
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if method.quant.double_quant else 4 / 64)  # nf4 + absmax constants
        c["weights (nf4, incl. quant constants)"] = s.linear * per
        upcast = recipe.train.precision == "fp16" and not ds  # crb.engine.build.prepare_kbit: fp32 on fp16 only
        label = "bf16 under DeepSpeed" if ds else "fp32 after k-bit prep" if upcast else "bf16"
        c[f"weights (not quantized, {label})"] = (s.params - s.linear) * (4 if upcast else HALF)
    else:
        weights = s.params * frozen_bytes_of(recipe, ds)
        if profile.offload_params:
            weights = 2 * (s.params / s.layers) * HALF  # only the layers being gathered stay on the GPU
        elif profile.zero_stage == 3:
            weights = weights / n_gpus + (s.params / s.layers) * HALF
        c["weights"] = weights
    lora, k = method.name in ("lora", "qlora"), checkpointed(recipe, s.blocks)
    if lora:  # peft keeps adapters in fp32 (autocast_adapter_dtype)
        c["trainable parameters (LoRA, fp32)"] = s.trainable * (HALF if ds else 4)
    paged = t.optimizer.startswith("paged") and not ds
    opt_bytes = t.optimizer_state_bytes if not ds else 8
    # The other moment that can peak: the optimizer step, activations freed, every gradient of this process live
    step: dict[str, float] = {}
    if profile.offload_optimizer:
        grads = _buckets(profile) * HALF  # reduced in buckets, then to CPU
        c["optimizer states"] = 0.0
    elif ds:  # bf16 gradients of this process's partition; fp32 master weights and AdamW states
        partition = s.trainable * HALF / shard
        grads = partition + _buckets(profile) * HALF  # ZeRO-1/2: + its buckets
        c["optimizer states"] = s.trainable * (opt_bytes + 4) / shard
        # The step flattens the bf16 gradient partition and makes an fp32 copy of it: ZeRO-2 of the whole partition
        # at once, ZeRO-3 one sub-group at a time (stage_1_and_2.py / stage3.py; H200: Mistral-7B and StarCoder2-3B
        # full fine-tunes on 1 GPU, 20 and 22 bytes per parameter at ZeRO-2's first and later steps)
        at_once = s.trainable / shard if profile.zero_stage < 3 else min(_sub_group(profile), s.trainable / shard)
        step = {"gradients": partition, STEP: at_once * (HALF + 4)}
    else:
        grads = s.trainable * 4
        step = {"gradients": grads}  # torch's fused AdamW: no temporaries (Mistral-7B full, H200: 16 B/parameter)
        c[PAGED if paged else "optimizer states"] = s.trainable * opt_bytes
    if s.embedding_trains:  # fp32 rows beside the frozen embedding: weights, gradient, two AdamW states
        n_mem = recipe.clara.memory_tokens
        c["CLaRa memory-token rows (fp32): weights, gradient, states"] = n_mem * s.hidden * 4 * 4
    # The backward's moment: gradients beside the activations and logits (the peak unless the step's is higher)
    backward: dict[str, float] = {"gradients": grads}
    if recipe.train.precision != "fp32" and not ds:  # autocast's bf16 copy of each fp32 matmul weight
        head = s.vocab * s.hidden if s.logit_tokens else 0  # lm_head (a full model's; fp32 after fp16 k-bit prep)
        upcast = method.name == "qlora" and t.precision == "fp16"
        fp32_matmul = {"qlora": s.trainable + head * upcast, "lora": s.trainable}.get(method.name, s.linear + head)
        live = 1 if not lora else (s.blocks - k + min(k, 1)) / s.blocks  # LoRA: kept layers' and the recomputed one's
        backward[COPIES] = fp32_matmul * HALF * live
    acts = activations(recipe, s, fp32_stream=frozen_bytes_of(recipe, ds) == 4, deepspeed=ds)
    backward.update(acts)
    on_gpu = sum(v for name, v in acts.items() if name.startswith("activation checkpoints"))
    if lora and not ds and k:  # the checkpointed layers' LoRA gradients appear as the backward frees their inputs
        backward[LATER] = -min(grads * k / s.blocks, on_gpu)
    if backward_temporaries(s, lora):
        backward["backward temporaries (gated MLP, bf16)" if s.gated else "backward temporaries (plain MLP, fp32)"] = \
            backward_temporaries(s, lora, t.compiled, ds)
    if s.logit_tokens and fused_loss(recipe):  # chunks of ~tokens x hidden / vocab: never all logits
        backward[FUSED] = s.logit_tokens * s.hidden * FUSED_BYTES
        if not lora and not ds:  # the peak is the loss's backward: of the weight gradients only the head's exists,
            head_grad = s.vocab * s.hidden * (4 + HALF)  # fp32, beside the fused kernel's bf16 one (NLLB: --peaks)
            backward[OVERLAP] = -max(0.0, grads - head_grad)
    elif s.logit_tokens:  # bf16 logits, their fp32 copy, log-softmax and its gradient
        backward["logits + loss (vocab x tokens)"] = s.logit_tokens * s.vocab * LOGIT_BYTES
        if not ds:  # the peak is the loss's backward: no weight gradient is allocated yet
            backward[OVERLAP] = -min(grads, backward["logits + loss (vocab x tokens)"])
    c.update(step if sum(step.values()) > sum(backward.values()) else backward)
    c[CONTEXT] = CUDA_CONTEXT
    return c


def zero3_offload(recipe: Recipe, s: Shape, profile: Profile, n_gpus: int) -> dict[str, float]:
    """Bytes per GPU of a full fine-tune under ZeRO-3 with weights and optimizer in CPU memory. Only layers being
    computed are gathered, so the peak is one of three moments of the backward (measured, OFFLOAD_*): the last
    layer's backward beside every checkpoint; the output layer's gradient sent to the CPU after the loss; the
    input embedding's at the end (with a tied output layer, the two are one matrix, sent there)."""
    vocab = s.vocab * s.hidden * HALF  # one vocabulary matrix in bf16
    layer = (s.params - s.vocab * s.hidden * (1 if s.tied else 2)) / s.layers * HALF
    acts = activations(recipe, s, deepspeed=True)
    recomputed = {k: acts.pop(k) for k in list(acts) if k.startswith("activations (one layer")}
    resident = {"ZeRO-3 buffers (between steps)": OFFLOAD_RESIDENT, **acts,
                "gradient of the layers' output": s.tokens * s.hidden * HALF}
    sent, whole, part = "vocabulary matrix's gradient on its way to the CPU", *OFFLOAD_REDUCE
    reduce = vocab / HALF * (whole + part / n_gpus)
    last_layer = {**resident, "gradient reduce bucket": _reduce_bucket(profile) * HALF,
                  "embedding (gathered)" + (", output layer's gradient" if s.tied else ""): vocab * (1 + s.tied),
                  "one layer gathered: weights and gradients (bf16)": layer * OFFLOAD_LAYER, **recomputed}
    if temporaries := backward_temporaries(s, False, recipe.train.compiled, deepspeed=True):
        last_layer["backward temporaries (plain MLP, bf16)"] = temporaries
    head = {**resident, "embedding (gathered), output layer's gradient": 2 * vocab,
            sent: reduce}
    embedding = {"ZeRO-3 buffers (between steps)": OFFLOAD_RESIDENT,
                 "first layer's input and gradient": 2 * s.tokens * s.hidden * HALF,
                 "embedding (gathered) and its gradient": 2 * vocab, sent: reduce}
    c = max([last_layer, embedding] + [head] * (not s.tied), key=lambda m: sum(m.values()))
    c[CONTEXT] = CUDA_CONTEXT
    return c


def host_need(s: Shape, profile: Profile, hw: Hardware) -> dict[str, float]:
    """Bytes of CPU memory an offload profile needs on one machine: its processes' shares of the fp32 master
    weights, AdamW states and fp32 gradients (and of the bf16 weights under ZeRO-3 offload; ZeRO-2 stages a bf16
    copy of its partition), each process's runtime and the final save on the main process (RUNTIME_HOST and
    SAVE_HOST_BYTES: fitted on StarCoder2-3B fully fine-tuned under ZeRO-3 offload)."""
    if not profile.offload_optimizer:
        return {}
    n_gpus = max(1, hw.processes)
    share = (hw.local_processes or n_gpus) / n_gpus  # of the processes, those on this machine
    out = {"optimizer (fp32 master weights, AdamW states, fp32 gradients)":
           s.trainable * (4 + 8 + 4) * share}  # under DeepSpeed AdamW keeps two fp32 moments (as `estimate`)
    out["bf16 weights" if profile.offload_params else "bf16 staging copy"] = \
        (s.params if profile.offload_params else s.trainable) * HALF * share
    out["runtime (torch, CUDA) of each process"] = RUNTIME_HOST * n_gpus * share
    out["final save (main process)"] = s.trainable * SAVE_HOST_BYTES
    return out


def fused_loss(recipe: Recipe, kernels: str | None = None) -> bool:
    """Whether liger-kernel's fused linear + cross-entropy replaces the logits (train.kernels resolved to
    "liger": by its patch for the types it knows, by crb.engine.kernels for other causal LMs)."""
    return (kernels or recipe.train.kernels) in ("liger", "cce") and get_task(recipe.data.format).kernels != "none"


def layer_bytes(recipe: Recipe, s: Shape, deepspeed: bool = False) -> float:
    """Activation bytes one layer saves for backward, per token. LoRA layers keep each adapter's
    dropped-out input too. Calibrated on measured peaks (docs/plan.md): Mistral-7B LoRA 258 kB/token
    (H100), 212 kB with liger's fused norms and SwiGLU, StarCoder2-3B QLoRA 163 kB (H200); T5 blocks
    from a trace of their saved tensors (benchmarks/layer_trace.py). Attention by SDPA/flash keeps no
    sequence-squared term; eager attention, and T5's (its position bias sends SDPA to the math path),
    keep the scores."""
    lora, compiled = recipe.method.name in ("lora", "qlora"), recipe.train.compiled
    if compiled and s.model_type == "t5":
        h, i = T5_COMPILED_LAYER
        return HALF * (h * s.hidden + i * s.inter) + s.heads * s.seq * T5_COMPILED_SCORE_BYTES
    h, i = LORA_LAYER if lora else T5_LAYER if s.model_type == "t5" else FULL_LAYER
    liger = lora and recipe.train.kernels == "liger" and s.model_type in LIGER_TYPES
    if liger:
        h, i = LIGER_LORA_LAYER
    if not s.gated:  # no gate projection and no product to keep
        i -= 2
    if lora and shares(recipe, checkpointed(recipe, s.blocks)):
        h -= (3 if s.gated else 2) * DROPPED_COPY
    if s.fused_norm and lora:  # a bf16 stream into LayerNorm: autocast's fp32 output feeds the adapters' dropouts
        h += 0.7
    elif s.fused_norm:  # LayerNorm keeps its bf16 input; an fp32 RMSNorm also its fp32 copy: 2 units less per norm
        h -= 4
    per = HALF * (h * s.hidden + i * s.inter)
    if s.attention == "eager" or s.model_type == "t5":
        per += s.heads * s.seq * (T5_SCORE_BYTES if s.model_type == "t5" else HALF + 4 + 1)  # + fp32 softmax, mask
    if deepspeed and not lora:  # bf16 weights, no autocast (DS_FULL_LAYER)
        per *= DS_FULL_LAYER
    if compiled and not lora:
        return per * COMPILED_FULL_LAYER
    return per * (COMPILED_LORA_LAYER if compiled and lora and not liger else 1)  # liger's layers: as eager


def backward_temporaries(s: Shape, lora: bool, compiled: bool = False, deepspeed: bool = False) -> float:
    """An MLP's backward holds intermediate-width gradients at the peak, once per micro-batch: a plain MLP under
    autocast about five fp32 tensors per token (StarCoder2-3B QLoRA: 2.15 GiB per 8192-token row, H200, fitted
    with the layer bytes on rows with 0, 15 and all 30 layers checkpointed); a gated LoRA one the bf16 gradients
    of gate and up (Mistral-7B; the T5 and full fine-tune layer constants include theirs)."""
    if s.gated:
        return s.pass_tokens * s.inter * GATED_MLP_BACKWARD if lora else 0.0
    if deepspeed and not lora:  # bf16 weights, no autocast
        return s.pass_tokens * s.inter * DS_PLAIN_MLP_BACKWARD
    return s.pass_tokens * s.inter * PLAIN_MLP_BACKWARD * (COMPILED_MLP_BACKWARD if compiled else 1)


def activations(recipe: Recipe, s: Shape, fp32_stream: bool = False, deepspeed: bool = False) -> dict[str, float]:
    """Saved activations of one micro-batch. A checkpointed layer keeps its input (bf16; fp32 when the
    weights are fp32 under autocast) and is recomputed in backward; the others keep everything. crb
    checkpoints the first layers, so a recomputed layer runs after the kept layers' activations are freed:
    the peak is the larger of the two moments."""
    k = checkpointed(recipe, s.blocks)
    share = k / s.blocks  # of the layers' tokens (both stacks: s.tokens x s.layers counts them all)
    every = s.tokens * s.layers  # token-layers of one micro-batch
    checkpoints = share * every * s.hidden * (4 if fp32_stream else HALF)
    kept = (1 - share) * every * layer_bytes(recipe, s, deepspeed)
    recomputed = s.pass_tokens * layer_bytes(recipe, s, deepspeed) if k else 0.0
    out: dict[str, float] = {}
    if k == s.blocks and recipe.train.offload_activations is True:
        out["activation checkpoints (offloaded to pinned CPU memory)"] = 0.0
    elif k:
        out[f"activation checkpoints ({k} layer inputs)"] = checkpoints
    if k < s.blocks:
        out[f"activations ({s.blocks - k} layers kept whole)"] = kept
    if recomputed > kept:
        out["activations (one layer recomputed)"] = recomputed - kept
    return out


def frozen_bytes_of(recipe: Recipe, ds: bool) -> int:
    """Bytes per base weight: fp32 for full and freeze fine-tunes (autocast computes in bf16), the
    half dtype for (Q)LoRA bases and under DeepSpeed (its fp32 master copy lives in the optimizer)."""
    return 4 if recipe.method.name in ("full", "freeze") and not ds else HALF


@functools.cache
def _zero(profile: Profile) -> dict:
    """The profile's `zero_optimization` section (read once; the plan asks for it per setting it tries)."""
    if profile.deepspeed_json is None:
        return {}
    return json.loads(profile.deepspeed_json.read_text()).get("zero_optimization", {})


def _buckets(profile: Profile) -> float:
    """Elements of the gradient buffers ZeRO-1/2 allocates when the backward starts (deepspeed's
    setup_buckets): one of reduce_bucket_size elements with contiguous_gradients, two with overlap_comm,
    however few parameters train (the language 8 GiB row: 2 x 0.37 GiB live at its peak)."""
    if profile.deepspeed_json is None or profile.zero_stage > 2:
        return 0.0
    zero = _zero(profile)
    return _reduce_bucket(profile) * zero.get("contiguous_gradients", True) * (1 + zero.get("overlap_comm", False))


def _reduce_bucket(profile: Profile) -> float:
    """Elements of zero_optimization.reduce_bucket_size ("auto" or unset: DeepSpeed's 5e8)."""
    value = _zero(profile).get("reduce_bucket_size", 5e8)
    return float(value) if not isinstance(value, str) else 5e8


def _sub_group(profile: Profile) -> float:
    """Elements ZeRO-3 steps at a time (zero_optimization.sub_group_size, DeepSpeed's default 1e9)."""
    return float(_zero(profile).get("sub_group_size", 1e9))


def plan(recipe: Recipe, hw: Hardware, micro_batch: int | None = None, advise: bool = True,
         data: DataFacts | None = None) -> Plan:
    """The memory plan of `recipe` on `hw` (and its rows, when prepared). Every "auto" is resolved first, as
    the run resolves it (`auto_config`); `micro_batch` overrides the micro-batch."""
    recipe, choices = auto_config(recipe, hw, data)
    micro = micro_batch or recipe.train.micro_batch
    if get_task(recipe.data.format).whole_batch:
        micro = recipe.train.batch_size // max(1, hw.processes)
    s = shape_of(recipe, meta_model(recipe), micro, data)
    n_gpus = max(1, hw.processes)
    per_profile = {name: estimate(recipe, s, prof, n_gpus) for name, prof in PROFILES.items()}
    totals = {name: sum(c.values()) for name, c in per_profile.items()}
    capacity = hw.gpus[0].total_gib * GIB if hw.gpus else None
    chosen, reason = choose(recipe.hardware.profile, lambda p: totals[p.name], capacity, n_gpus,
                            quantized=recipe.method.name == "qlora")
    c = per_profile[chosen.name]
    p = Plan(components=c, total=totals[chosen.name], allocated=sum(v for k, v in c.items() if k not in OUTSIDE),
             capacity=capacity, profile=chosen.name, reason=reason, profiles=totals, choices=choices)
    t = recipe.train
    p.notes = {"parameters": s.params, "trainable": s.trainable, "tokens_per_micro_batch": s.tokens,
               "micro_batch": micro, "gpus": n_gpus, "checkpointed_layers": checkpointed(recipe, s.blocks),
               "layers": s.blocks, "offload_activations": bool(t.offload_activations), "kernels": t.kernels,
               "compile": t.compile}
    p.host, p.ram = host_need(s, chosen, hw), hw.ram_gib * GIB
    if capacity:
        p.fits = p.total <= capacity * HEADROOM
        if not p.fits and advise:
            p.advice = advice(recipe, hw, micro, data)
    if p.host and p.ram and sum(p.host.values()) > p.ram * HOST_HEADROOM:
        p.fits = False
        if advise:
            p.advice.insert(0, f"{chosen.name} needs {sum(p.host.values()) / GIB:.0f} GiB of CPU memory on this "
                               f"machine, which has {p.ram / GIB:.0f} GiB: more GPUs without offload (ZeRO-3 keeps "
                               "the states on them), several machines, or one with more memory")
    return p


def advice(recipe: Recipe, hw: Hardware, micro: int, data: DataFacts | None = None) -> list[str]:
    """Concrete changes that fit: a smaller micro-batch, then shorter sequences, then a smaller method."""
    out = []
    for m in range(micro - 1, 0, -1):
        if (q := plan(recipe, hw, m, advise=False, data=data)).fits:
            out.append(f"train.micro_batch = {m} fits ({q.total / GIB:.1f} GiB, {q.profile}); "
                       "accumulation keeps the effective batch")
            break
    length = recipe.data.max_length
    while length > 256:
        length //= 2
        shorter = copy.deepcopy(recipe)
        shorter.data.max_length = length
        if (q := plan(shorter, hw, 1, advise=False, data=data)).fits:
            out.append(f"data.max_length = {length} fits at micro-batch 1 ({q.total / GIB:.1f} GiB, {q.profile})")
            break
    levers = []  # switches that keep the recipe's math: the fused loss, checkpoints in CPU memory, both
    if recipe.train.kernels != "liger" and fused_loss(recipe, "liger"):
        levers.append({"kernels": "liger"})
    if recipe.train.gradient_checkpointing is True and not recipe.train.offload_activations and \
            get_task(recipe.data.format).offloadable:
        levers.append({"offload_activations": True})
    if len(levers) == 2:
        levers.append({**levers[0], **levers[1]})
    for change in levers:
        if (q := plan(_with(recipe, **change), hw, micro, advise=False, data=data)).fits:
            sets = ", ".join(f"train.{k} = {json.dumps(v)}" for k, v in change.items())
            out.insert(0, f"{sets} fits at micro-batch {micro} ({q.total / GIB:.1f} GiB, {q.profile})")
            break
    if recipe.train.gradient_checkpointing is not True:
        out.append("train.gradient_checkpointing = true keeps one layer's activations instead of all")
    if recipe.method.name != "qlora" and get_task(recipe.data.format).kind == "causal":
        out.append('method.name = "qlora" stores the base in 4 bits')
    return out or ["no setting of micro-batch or length fits this card: a larger GPU, or more GPUs with ZeRO"]


RECOMPUTE = 0.45  # a step's extra time when every layer is recomputed (H200, ctx 8192, micro-batch 1: Mistral-7B
# QLoRA 12,335 tok/s with no layer checkpointed against 8,460 with all; StarCoder2-3B 16,116 against 11,120)
SATURATE = 1000  # a pass over T tokens per layer runs at about T / (T + SATURATE) of the card's full speed (H200,
# nothing checkpointed: micro-batch 2 against 1 at ctx 8192 is 13,067 / 12,335 tok/s for Mistral-7B QLoRA and
# 17,013 / 16,116 for StarCoder2-3B, 1.06 both; 1000 gives 1.057)


def auto_config(recipe: Recipe, hw: Hardware, data: DataFacts | None = None) -> tuple[Recipe, list[str]]:
    """A copy of `recipe` with every "auto" of [train] resolved, and a line saying why for each. The kernels
    first; then micro-batch, checkpointed layers and activation offload together: of the settings whose plan
    fits the card, the fastest by a simple model (each recomputed layer costs RECOMPUTE / layers of a step;
    a short pass runs below full speed). Offloading is tried only when nothing fits without it."""
    from crb.engine.kernels import resolve_attention, resolve_compile, resolve_kernels

    r, t, why = copy.deepcopy(recipe), recipe.train, []
    if r.model.attn_implementation == "auto":
        packed = data.packed if data else r.data.packing  # before the data is read: packing may pack
        r.model.attn_implementation, reason = resolve_attention(r.data.format, packed, bool(hw.gpus))
        why.append(f"attention auto -> {r.model.attn_implementation} ({reason})")
    if t.kernels == "auto":
        r.train.kernels, reason = resolve_kernels(r.data.format, bool(hw.gpus))
        why.append(f"kernels auto -> {r.train.kernels} ({reason})")
    if t.compile == "auto":
        patched = r.train.kernels == "liger" and meta_model(r).config.model_type in LIGER_TYPES
        r.train.compile, reason = resolve_compile(r.data.format, bool(hw.gpus), patched)
        said = {True: "on", False: "off"}.get(r.train.compile, r.train.compile)
        why.append(f"compile auto -> {said} ({reason})")
    auto_gc, auto_micro, auto_off = (t.gradient_checkpointing == "auto", t.micro_batch == "auto",
                                     t.offload_activations == "auto")
    if not (auto_gc or auto_micro or auto_off):
        return r, why
    model = meta_model(r)
    blocks = n_blocks(model) or 1
    per_process = max(1, t.batch_size // max(1, hw.processes))
    micros = [d for d in range(1, per_process + 1) if per_process % d == 0] if auto_micro else [t.micro_batch]
    if get_task(r.data.format).whole_batch:
        micros = [per_process]
    movable = get_task(r.data.format).offloadable  # checkpoints that can go to the CPU
    layers = list(range(blocks + 1)) if auto_gc else [checkpointed(r, blocks)]
    offloads = ([False, True] if movable else [False]) if auto_off else [t.offload_activations]
    if not hw.gpus:  # nothing to fit: the plain, fastest settings
        r.train.micro_batch = micros[0]
        r.train.gradient_checkpointing = False if auto_gc else t.gradient_checkpointing
        r.train.offload_activations = False if auto_off else t.offload_activations
        why.append(f"no GPU: micro-batch {r.train.micro_batch}, checkpointing {r.train.gradient_checkpointing}, "
                   f"offload {str(r.train.offload_activations).lower()}")
        return r, why
    best: tuple[float, int, int, bool, float, str] | None = None
    capacity = hw.gpus[0].total_gib * GIB
    # Cheapest first: plain data parallel; then ZeRO's sharding; then the optimizer in CPU memory; then the
    # checkpoints too (each tier only when nothing of the one before fits).
    tiers = [("plain", False), ("zero", False), ("offload", False)] + [("offload", True)] * (True in offloads)
    for offload_profile, off in tiers:
        if off not in offloads:
            continue
        for m in micros:
            s = shape_of(r, model, m, data)
            for k in layers:  # the fewest checkpointed layers that fit at this micro-batch
                if off and k != blocks:
                    continue
                trial = _with(r, micro_batch=m, gradient_checkpointing=k, offload_activations=off)
                profile, total = _fitting(trial, s, hw, capacity, offload_profile)
                if profile is None:
                    continue
                cost = (1 + RECOMPUTE * k / blocks) * (1 + SATURATE / max(1, s.pass_tokens))
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, m, k, off, total, profile)
                break
        if best is not None:
            break
    if best is None:  # nothing fits: the least memory (the plan then says so, with advice)
        best = (0.0, micros[0], layers[-1], offloads[-1], 0.0, "")
        reason = "nothing fits the card by the plan: the settings that need the least"
    else:
        slowest = (1 + RECOMPUTE) * (1 + SATURATE / max(1, shape_of(r, model, micros[-1], data).pass_tokens))
        reason = (f"plan {best[4] / GIB:.1f} GiB of {capacity / GIB:.1f} GiB ({best[5]}); the fastest setting that "
                  f"fits, by the speed model {best[0] / slowest:.2f} of the time of every layer checkpointed at "
                  f"micro-batch {micros[-1]}")
    _, m, k, off, _, _ = best
    r.train.micro_batch, r.train.offload_activations = m, off
    if auto_gc:  # true and false keep their meaning
        r.train.gradient_checkpointing = k
    parts = [f"micro-batch {m}" + (" (auto)" if auto_micro else ""),
             f"checkpointing {k} of {blocks} layers" + (" (auto)" if auto_gc else ""),
             f"offload activations {'on' if off else 'off'}" + (" (auto)" if auto_off else "")]
    why.append(", ".join(parts) + f": {reason}")
    return r, why


def _fitting(recipe: Recipe, s: Shape, hw: Hardware, capacity: float, tier: str) -> tuple[str | None, float]:
    """The profile `choose` takes for `recipe` among the tier's ("plain"; "zero": no CPU offload; "offload":
    any) and its total, or (None, 0) when the plan does not fit."""
    n_gpus = max(1, hw.processes)
    totals = {name: sum(estimate(recipe, s, prof, n_gpus).values()) for name, prof in PROFILES.items()}

    def total(p: Profile) -> float:
        allowed = {"plain": p.name == "plain", "zero": not p.offload_optimizer}.get(tier, True)
        return totals[p.name] if allowed else float("inf")

    chosen, _ = choose(recipe.hardware.profile, total, capacity, n_gpus, quantized=recipe.method.name == "qlora")
    total = totals[chosen.name]
    return (chosen.name, total) if total <= capacity * HEADROOM else (None, 0.0)


def _with(recipe: Recipe, **train: object) -> Recipe:
    """A copy of `recipe` with some train.* settings changed."""
    changed = copy.deepcopy(recipe)
    for k, v in train.items():
        setattr(changed.train, k, v)
    return changed
