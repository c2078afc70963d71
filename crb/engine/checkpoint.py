"""Checkpoints: Accelerate state (trainable weights, optimizer, scheduler, RNG, scaler) plus the
data position, written to a temporary folder and renamed into place, so a crash leaves the last
complete one. Only trainable parameters are written: a LoRA checkpoint holds the adapter, not 7B
frozen weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator

from crb.errors import CrbError
from crb.units import GIB

if TYPE_CHECKING:
    from crb.engine.schedule import Schedule
    from crb.recipe.schema import TrainConfig

STATE_FILE = "crb_state.json"


def check_space(out: Path, need: float) -> None:
    """Before any training: the run folder can be created and written, and its disk has room for the
    checkpoints (`need` bytes: train.keep_checkpoints + 1 of them and the final weights)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".crb-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CrbError(f"output.dir: cannot write to {out}: {e.strerror or e}") from e
    free = shutil.disk_usage(out).free
    if free < need:
        raise CrbError(f"output.dir: {out} has {free / GIB:.2f} GiB free; the checkpoints and final weights need "
                       f"about {need / GIB:.2f} GiB (free space, or lower train.keep_checkpoints)")


def bytes_needed(t: TrainConfig, trainable: int, sched: Schedule) -> float:
    """Disk for the checkpoints this schedule writes (at most train.keep_checkpoints + 1 at once while a new one
    replaces the oldest; one more for a stop on a signal) and the final weights: fp32 weights and optimizer
    states of the trainable parameters each. keep_checkpoints 0: the final weights only."""
    if not t.keep_checkpoints:
        return trainable * 4
    saves = sched.total_steps // t.save_every if t.save_every else sched.total_steps // sched.steps_per_epoch
    at_once = min(saves + 1, t.keep_checkpoints + 1)
    return trainable * (at_once * (4 + t.optimizer_state_bytes) + 4)


def keep_trainable_only(accelerator: Accelerator) -> None:
    """Make `save_state` write only parameters that train (and buffers of trainable modules none). Under
    DeepSpeed the engine writes its own files (no `weights` here): `save` asks it to leave frozen ones out."""

    def hook(models: list[torch.nn.Module], weights: list[dict], _dir: str) -> None:
        for model, state in zip(models, weights, strict=False):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in trainable]:
                del state[key]

    accelerator.register_save_state_pre_hook(hook)


def save(accelerator: Accelerator, root: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoint `root/step-N` atomically; keep the newest `keep` and the newest with finite weights."""
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if _deepspeed(accelerator) else {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        good = latest_good(root)  # never rotated away: after a divergence it is the one to resume from
        for old in complete(root)[:-keep]:
            if old != good:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written `.tmp-*` folder is never one)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1] if found else None


def latest_good(root: Path) -> Path | None:
    """The newest complete checkpoint whose weights were finite when it was written."""
    good = [p for p in complete(root) if json.loads((p / STATE_FILE).read_text()).get("finite", True)]
    return good[-1] if good else None


def weights_finite(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Whether every trainable weight is finite on every process (each checks its own shards; under ZeRO-3 a
    parameter is empty outside a forward, its shard is `ds_tensor`)."""
    shards = (getattr(p, "ds_tensor", p).detach() for p in model.parameters() if p.requires_grad)
    bad = sum(int((~torch.isfinite(t)).any()) for t in shards if t.numel())
    flag = torch.tensor([float(bad)], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() == 0


def load(accelerator: Accelerator, path: Path) -> dict:
    """Restore the state saved at `path`; returns its crb state (step, ...)."""
    # strict=False: the frozen weights are not in the checkpoint (DeepSpeed names the flag its own way)
    accelerator.load_state(str(path), **({"load_module_strict": False} if _deepspeed(accelerator) else
                                          {"strict": False}))
    return json.loads((path / STATE_FILE).read_text())


def _deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
