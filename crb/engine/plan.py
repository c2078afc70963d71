"""`crb plan`: the predicted peak GPU memory of a recipe, per component, from the model's config
alone (the model is built on the meta device: no weights are read or allocated), for every
launch profile; the profile is chosen from these estimates and the card (crb.engine.profiles).
The method and its measured accuracy: docs/plan.md."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import torch

from crb.engine.hardware import Hardware
from crb.engine.profiles import PROFILES, Profile, choose
from crb.engine.recipe import Recipe

GIB = 2**30
CUDA_CONTEXT = 0.5 * GIB  # CUDA context + cuBLAS workspaces, measured order of magnitude
HALF = 2  # bf16/fp16 bytes


@dataclass
class Plan:
    components: dict[str, float] = field(default_factory=dict)  # bytes, of the chosen profile
    total: float = 0.0
    capacity: float | None = None
    profile: str = "plain"
    reason: str = ""
    fits: bool | None = None
    profiles: dict[str, float] = field(default_factory=dict)  # every profile's total (bytes)
    advice: list[str] = field(default_factory=list)
    notes: dict[str, int | float | str] = field(default_factory=dict)

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
        buf = StringIO()
        console = Console(file=buf, width=110)
        console.print(t)
        console.print("other profiles: " + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in self.profiles.items()
                                                     if k != self.profile))
        cap = f"{self.capacity / GIB:.1f} GiB" if self.capacity else "no GPU detected"
        verdict = {True: "fits", False: "does NOT fit", None: "(no GPU to compare)"}[self.fits]
        console.print(f"card: {cap}; profile: {self.profile} ({self.reason}); {verdict}")
        for line in self.advice:
            console.print(f"- {line}")
        return buf.getvalue()

    def to_json(self) -> str:
        d = asdict(self)
        d["components_gib"] = {k: round(v / GIB, 3) for k, v in d.pop("components").items()}
        d["profiles_gib"] = {k: round(v / GIB, 3) for k, v in d.pop("profiles").items()}
        d["total_gib"] = round(d.pop("total") / GIB, 3)
        d["capacity_gib"] = round(d.pop("capacity") / GIB, 3) if self.capacity else None
        return json.dumps(d, indent=1)


def meta_model(recipe: Recipe) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForTextEncoding

    from crb.engine.build import AUTO_CLASSES, KINDS

    config = AutoConfig.from_pretrained(recipe.model.name, revision=recipe.model.revision)
    kind = KINDS[recipe.data.format]
    auto = AUTO_CLASSES.get("causal" if kind == "clara" else kind, AutoModelForTextEncoding)  # embedding: encoder
    with init_empty_weights():
        return auto.from_config(config)


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
    vocab: int
    tokens: int  # per micro-batch through the layers (both passes of an encoder-decoder or CLaRa)
    logit_tokens: int  # per micro-batch, positions whose vocabulary logits are computed


def shape_of(recipe: Recipe, model: torch.nn.Module, micro_batch: int) -> Shape:
    cfg = model.config
    method, d = recipe.method, recipe.data
    params = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in lora_targets(model, "all-linear"))
    adapters = 1
    if d.format == "clara":
        adapters = 3 if recipe.clara.stage == "end_to_end" else 2
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
    n, L = micro_batch, d.max_length
    if d.format == "translation":  # encoder and decoder stacks, logits on the target
        tokens, logit_tokens = 2 * n * L, n * L
    elif d.format == "retrieval":  # anchor, positive and hard negatives; cached_mnrl: a mini-batch at a time
        cached = [x.options.get("mini_batch_size", 32) for x in recipe.losses if x.name == "cached_mnrl"]
        tokens, logit_tokens = min([n, *cached]) * (2 + d.hard_negatives) * L, 0
    elif d.format == "clara":  # the encoder over the documents (+ the question in stage 3), the decoder prompt
        c = recipe.clara
        docs = 1 if c.stage == "compression" else c.top_k
        enc = n * docs * (c.doc_max_length + 3 + c.doc_max_length // c.compress_rate)
        tokens, logit_tokens = enc + n * L, n * L
    else:
        tokens, logit_tokens = n * L, n * L
    return Shape(params, linear, trainable, adapters, hidden, inter, layers, cfg.vocab_size, tokens, logit_tokens)


def estimate(recipe: Recipe, s: Shape, profile: Profile, n_gpus: int) -> dict[str, float]:
    """Bytes per GPU, per component, of one recipe under one profile."""
    method, t = recipe.method, recipe.train
    ds = profile.zero_stage > 0  # DeepSpeed keeps the model in bf16 and fp32 master weights in its optimizer
    shard = n_gpus if profile.zero_stage >= 2 else 1  # gradients and optimizer states partitioned
    c: dict[str, float] = {}
    if method.name == "qlora":
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if method.quant.double_quant else 4 / 64)  # nf4 + absmax constants
        c["weights (nf4, incl. quant constants)"] = s.linear * per
        c["weights (not quantized, fp32 after k-bit prep)"] = (s.params - s.linear) * (HALF if ds else 4)
    else:
        frozen_bytes = 4 if method.name in ("full", "freeze") and not ds else HALF
        weights = s.params * frozen_bytes
        if profile.offload_params:
            weights = 2 * (s.params / s.layers) * HALF  # only the layers being gathered stay on the GPU
        elif profile.zero_stage == 3:
            weights = weights / n_gpus + (s.params / s.layers) * HALF
        c["weights"] = weights
    lora = method.name in ("lora", "qlora")
    if lora:
        c["trainable parameters (LoRA)"] = s.trainable * (HALF if ds else 4)
    opt_bytes = 2 if "8bit" in t.optimizer and not ds else 8
    if profile.offload_optimizer:
        c["gradients"] = min(s.trainable * HALF, _bucket(profile) * HALF)  # reduced in buckets, then to CPU
        c["optimizer states"] = 0.0
    else:
        c["gradients"] = s.trainable * (4 / shard if ds else 4)
        c["optimizer states"] = s.trainable * ((opt_bytes + 4) / shard if ds else opt_bytes)
    c["activations"] = activations(recipe, s)
    if s.logit_tokens:
        c["logits + loss (fp32)"] = s.logit_tokens * s.vocab * (HALF + 4 + 4)
    c["CUDA context + allocator"] = CUDA_CONTEXT
    return c


def activations(recipe: Recipe, s: Shape) -> float:
    """Saved activations of one micro-batch (bf16). Without checkpointing each layer keeps about
    16 hidden-sized and 6 intermediate-sized tensors per token (attention by SDPA/flash: no
    sequence-squared term); with it, each layer keeps its input and one layer is recomputed."""
    per_layer = s.tokens * (16 * s.hidden + 6 * s.inter) * HALF
    if recipe.train.gradient_checkpointing:
        return s.tokens * s.hidden * HALF * s.layers + per_layer
    return per_layer * s.layers


def _bucket(profile: Profile) -> float:
    """Elements in DeepSpeed's gradient reduce bucket (from the profile's JSON)."""
    if profile.deepspeed_json is None:
        return 0.0
    zero = json.loads(profile.deepspeed_json.read_text()).get("zero_optimization", {})
    value = zero.get("reduce_bucket_size", 5e8)
    return float(value) if not isinstance(value, str) else 5e8


def plan(recipe: Recipe, hw: Hardware, micro_batch: int | None = None) -> Plan:
    model = meta_model(recipe)
    micro = micro_batch or (recipe.train.micro_batch if isinstance(recipe.train.micro_batch, int) else 1)
    if recipe.data.format == "retrieval":
        micro = recipe.train.batch_size // max(1, hw.processes)
    s = shape_of(recipe, model, micro)
    n_gpus = max(1, hw.processes)
    per_profile = {name: estimate(recipe, s, prof, n_gpus) for name, prof in PROFILES.items()}
    totals = {name: sum(c.values()) for name, c in per_profile.items()}
    capacity = hw.gpus[0].total_gib * GIB if hw.gpus else None
    chosen, reason = choose(recipe.hardware.profile, lambda p: totals[p.name], capacity, n_gpus,
                            quantized=recipe.method.name == "qlora")
    p = Plan(components=per_profile[chosen.name], total=totals[chosen.name], capacity=capacity,
             profile=chosen.name, reason=reason, profiles=totals)
    p.notes = {"parameters": s.params, "trainable": s.trainable, "tokens_per_micro_batch": s.tokens,
               "micro_batch": micro, "gpus": n_gpus}
    if capacity:
        p.fits = p.total <= capacity * 0.95
        if not p.fits:
            t = recipe.train
            p.advice = [f"lower train.micro_batch (now {micro}); accumulation keeps the effective batch",
                        f"or lower data.max_length (now {recipe.data.max_length})",
                        "or turn on train.gradient_checkpointing" if not t.gradient_checkpointing else
                        "or use method qlora / a smaller model"]
    return p


def auto_micro_batch(recipe: Recipe, hw: Hardware) -> tuple[int, str]:
    """The largest micro-batch (a divisor of the per-process batch) whose plan fits the card."""
    per_process = recipe.train.batch_size // max(1, hw.processes)
    if not hw.gpus:
        return 1, "no GPU: 1"
    best, why = 1, "nothing larger fits"
    for m in (d for d in range(1, per_process + 1) if per_process % d == 0):
        p = plan(recipe, hw, m)
        if not p.fits:
            break
        best, why = m, f"plan {p.total / GIB:.1f} GiB of {p.capacity / GIB:.1f} GiB ({p.profile})"
    return best, why
