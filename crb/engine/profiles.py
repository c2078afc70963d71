"""Launch profiles: plain (no DeepSpeed) and the DeepSpeed ZeRO / offload configs in launch/deepspeed/,
fastest first (an optimizer stepped on the CPU is the slowest), and the choice among them from the plan's
estimate of each against the card.

DeepSpeed with 4-bit (QLoRA) models: ZeRO-2 (with or without optimizer offload) shards only the
trainable LoRA parameters' gradients and states and leaves the quantized base alone; ZeRO-3 would
partition the base too, which needs `bnb_4bit_quant_storage` equal to the compute dtype (peft's
"DeepSpeed" guide, QLoRA + ZeRO-3 section: https://huggingface.co/docs/peft/accelerate/deepspeed).
crb does not set that storage, so QLoRA recipes never get a ZeRO-3 profile (`qlora_compatible`).
The offload configs set `zero_force_ds_cpu_optimizer: false`: crb's own AdamW steps the fp32 master
weights on the CPU (DeepSpeedCPUAdam would need its C++ op built)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crb.errors import CrbError
from crb.units import GIB

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


@dataclass(frozen=True)
class Profile:
    name: str
    deepspeed_json: Path | None  # None: plain Accelerate
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    description: str


def _ds(name: str, stage: int, opt: bool, params: bool, description: str) -> Profile:
    return Profile(name, LAUNCH / "deepspeed" / f"{name}.json", stage, opt, params, description)


PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("plain", None, 0, False, False, "no DeepSpeed: everything on the GPU"),
    _ds("zero2", 2, False, False, "ZeRO-2: gradients and optimizer states sharded over the GPUs"),
    _ds("zero3", 3, False, False, "ZeRO-3: parameters, gradients and optimizer states sharded over the GPUs"),
    _ds("zero2-offload", 2, True, False, "ZeRO-2, optimizer states and fp32 master weights in CPU memory"),
    _ds("zero3-offload", 3, True, True, "ZeRO-3, parameters and optimizer in CPU memory (full fine-tunes "
        "that fit nowhere else)"),
]}


def qlora_compatible(profile: Profile) -> tuple[bool, str]:
    """Whether a 4-bit base can train under `profile` as crb builds it (see the module docstring)."""
    if profile.zero_stage == 3:
        return False, "ZeRO-3 partitions the 4-bit base, which needs bnb_4bit_quant_storage = compute dtype"
    return True, ""


def choose(forced: str, estimate: Callable[[Profile], float], capacity: float | None, n_gpus: int,
           quantized: bool = False, headroom: float = 0.95) -> tuple[Profile, str]:
    """`forced` (hardware.profile) unless "auto"; else the first profile whose estimate fits
    capacity x headroom (bytes). ZeRO without offload only shards, so it is tried with 2+ GPUs only."""
    if forced != "auto":
        if forced not in PROFILES:
            raise CrbError(f"hardware.profile: unknown profile '{forced}' (valid: auto, {', '.join(PROFILES)})")
        return PROFILES[forced], "set by hardware.profile"
    if capacity is None:
        return PROFILES["plain"], "no GPU"
    usable = capacity * headroom
    candidates = [p for p in PROFILES.values()
                  if (n_gpus > 1 or p.offload_optimizer or p.zero_stage == 0)
                  and (not quantized or qlora_compatible(p)[0])]
    plain = estimate(candidates[0])
    for p in candidates:
        need = estimate(p)
        if need <= usable:
            if p.name == "plain":
                return p, f"plan {need / GIB:.1f} GiB fits {usable / GIB:.1f} GiB usable of {capacity / GIB:.1f} GiB"
            return p, (f"plain needs {plain / GIB:.1f} GiB > {usable / GIB:.1f} GiB usable of "
                       f"{capacity / GIB:.1f} GiB; {p.name} {need / GIB:.1f} GiB fits")
    least = min(candidates, key=estimate)
    return least, (f"nothing fits {usable / GIB:.1f} GiB usable of {capacity / GIB:.1f} GiB by the plan; "
                   f"{least.name} needs the least ({estimate(least) / GIB:.1f} GiB)")


def deepspeed_plugin(profile: Profile, grad_accum: int, max_grad_norm: float):
    """Accelerate's DeepSpeedPlugin for `profile` ("auto" values are filled by accelerator.prepare)."""
    from accelerate.utils import DeepSpeedPlugin

    if profile.deepspeed_json is None:
        return None
    config = json.loads(profile.deepspeed_json.read_text())
    config["gradient_accumulation_steps"] = grad_accum
    config["gradient_clipping"] = max_grad_norm
    return DeepSpeedPlugin(hf_ds_config=config)


def launched_with_deepspeed() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (then the launcher's config rules)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def one_process_group() -> None:
    """DeepSpeed starts torch.distributed itself and, without a launcher's variables, looks for MPI: a process
    started with plain `python` gets the variables of a one-process group on a free local port instead."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
