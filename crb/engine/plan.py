"""`crb plan`: the predicted peak GPU memory of a recipe, per component, from the model's config
alone (the model is built on the meta device: no weights are read or allocated)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import torch

from crb.engine.hardware import Hardware
from crb.engine.recipe import Recipe

GIB = 2**30
CUDA_CONTEXT = 0.5 * GIB  # CUDA context + cuBLAS workspaces, measured order of magnitude


@dataclass
class Plan:
    components: dict[str, float] = field(default_factory=dict)  # bytes
    total: float = 0.0
    capacity: float | None = None
    profile: str = "plain"
    fits: bool | None = None
    advice: list[str] = field(default_factory=list)
    notes: dict[str, int | float | str] = field(default_factory=dict)

    def table(self) -> str:
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        t = Table(title="crb plan: predicted peak GPU memory (per process)")
        t.add_column("component")
        t.add_column("GiB", justify="right")
        for name, b in self.components.items():
            t.add_row(name, f"{b / GIB:.2f}")
        t.add_row("[bold]total", f"[bold]{self.total / GIB:.2f}")
        buf = StringIO()
        console = Console(file=buf, width=100)
        console.print(t)
        cap = f"{self.capacity / GIB:.0f} GiB" if self.capacity else "no GPU detected"
        verdict = {True: "fits", False: "does NOT fit", None: "(no GPU to compare)"}[self.fits]
        console.print(f"card: {cap}; profile: {self.profile}; {verdict}")
        for line in self.advice:
            console.print(f"- {line}")
        return buf.getvalue()

    def to_json(self) -> str:
        d = asdict(self)
        d["components_gib"] = {k: round(v / GIB, 3) for k, v in d.pop("components").items()}
        d["total_gib"] = round(d.pop("total") / GIB, 3)
        d["capacity_gib"] = round(d.pop("capacity") / GIB, 3) if self.capacity else None
        return json.dumps(d, indent=1)


def meta_model(recipe: Recipe) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    from crb.engine.build import AUTO_CLASSES, KINDS

    config = AutoConfig.from_pretrained(recipe.model.name, revision=recipe.model.revision)
    auto = AUTO_CLASSES.get(KINDS[recipe.data.format], AutoModel)  # an embedding model: the bare encoder
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


def plan(recipe: Recipe, hw: Hardware) -> Plan:
    model = meta_model(recipe)
    cfg = model.config
    method, t = recipe.method, recipe.train
    half = 2  # bf16/fp16 bytes
    total_params = sum(p.numel() for p in model.parameters())
    targets = lora_targets(model, method.lora.target_modules) if method.name in ("lora", "qlora") else []
    c: dict[str, float] = {}
    if method.name == "qlora":
        linear = sum(m.weight.numel() for m in lora_targets(model, "all-linear"))
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if method.quant.double_quant else 4 / 64)  # nf4 + absmax constants
        c["weights (nf4, incl. quant constants)"] = linear * per
        c["weights (not quantized, fp32 after k-bit prep)"] = (total_params - linear) * 4
    else:
        bytes_w = 4 if method.name in ("full", "freeze") else half
        c["weights"] = total_params * bytes_w
    if targets:
        trainable = sum(method.lora.r * (m.in_features + m.out_features) for m in targets)
    elif method.name == "freeze":
        regex = [re.compile(p) for p in method.trainable]
        trainable = sum(p.numel() for n, p in model.named_parameters() if any(r.search(n) for r in regex))
    else:
        trainable = total_params
    opt_bytes = 2 if "8bit" in t.optimizer else 8
    c["trainable parameters (fp32)"] = trainable * 4 if targets else 0
    c["gradients (fp32)"] = trainable * 4
    c["optimizer states"] = trainable * opt_bytes
    tokens = t.micro_batch * recipe.data.max_length
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    if t.gradient_checkpointing:  # one saved input per layer + one layer recomputed in backward
        act = tokens * hidden * half * layers + tokens * (10 * hidden + 4 * inter) * half
    else:
        act = tokens * (16 * hidden + 6 * inter) * half * layers
    c["activations"] = act
    if recipe.data.format != "retrieval":  # an encoder has no vocabulary logits
        c["logits + loss (fp32)"] = tokens * cfg.vocab_size * (half + 4 + 4)
    c["CUDA context + allocator"] = CUDA_CONTEXT
    total = sum(c.values())
    p = Plan(components=c, total=total)
    p.notes = {"parameters": total_params, "trainable": trainable, "tokens_per_micro_batch": tokens}
    if hw.gpus:
        p.capacity = hw.gpus[0].total_gib * GIB
        p.fits = total <= p.capacity * 0.95
        if not p.fits:
            p.advice = [f"lower train.micro_batch (now {t.micro_batch}); accumulation keeps the effective batch",
                        f"or lower data.max_length (now {recipe.data.max_length})",
                        "or turn on train.gradient_checkpointing" if not t.gradient_checkpointing else
                        "or use method qlora / an offload profile"]
    return p
