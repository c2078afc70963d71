"""What machine are we on: GPUs (memory each, bf16), CPU RAM, the process layout.
`CRB_GPU_MEMORY_GB` overrides the detected GPU memory (to test profiles anywhere); on a real GPU a
run also caps itself there (`cap_memory`), so an 80 GB card behaves as an 8 GB one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from crb.units import GIB


@dataclass
class Gpu:
    name: str
    total_gib: float
    free_gib: float
    capability: tuple[int, int]


@dataclass
class Hardware:
    gpus: list[Gpu] = field(default_factory=list)
    bf16: bool = False
    ram_gib: float = 0.0
    processes: int = 1
    local_processes: int = 0  # of them, those on this machine (LOCAL_WORLD_SIZE; 0: all)

    def describe(self) -> str:
        if not self.gpus:
            return f"CPU only, {self.ram_gib:.0f} GiB RAM, {self.processes} process(es)"
        g = self.gpus[0]
        return (f"{len(self.gpus)} x {g.name} ({g.total_gib:.0f} GiB, bf16 {'yes' if self.bf16 else 'no'}), "
                f"{self.ram_gib:.0f} GiB RAM, {self.processes} process(es)")


def memory_override(gpu_memory_gb: float | None = None) -> float | None:
    env = os.environ.get("CRB_GPU_MEMORY_GB")
    return gpu_memory_gb or (float(env) if env else None)


def cap_memory(device: torch.device, gpu_memory_gb: float | None = None) -> float | None:
    """Limit this process's CUDA allocations to the overridden memory size; returns the cap in GiB."""
    override = memory_override(gpu_memory_gb)
    if not override or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, override / total), index)
    return min(override, total)


def detect(gpu_memory_gb: float | None = None) -> Hardware:
    override = memory_override(gpu_memory_gb)
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(Gpu(props.name, total / GIB, free / GIB, (props.major, props.minor)))
    if override:
        gpus = [Gpu(g.name, override, min(g.free_gib, override), g.capability) for g in gpus] or \
               [Gpu("virtual", override, override, (8, 0))]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    bf16 = bool(gpus) and (torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True)
    return Hardware(gpus, bf16, ram, int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_WORLD_SIZE", "0")))
