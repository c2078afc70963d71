"""The DeepSpeed profiles run for real on the CPU (DeepSpeed's CPU accelerator, gloo): a full fine-tune under
ZeRO-3 on 2 processes trains like plain data parallel, and a run killed with kill -9 resumes from its sharded
checkpoint to the unbroken run's weights, bit for bit; a LoRA run under ZeRO-2 started with plain `python`
checkpoints only what trains and resumes to the unbroken adapter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def command(recipe: Path, out: Path, profile: str, method: str, processes: int, port: int,
            resume: bool = False) -> list[str]:
    sets = ["train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=4", f"method.name='{method}'",
            f"hardware.profile='{profile}'", f"output.dir='{out}'"]
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    return [*launch, "-m", "crb.run", str(recipe), *[x for s in sets for x in ("--set", s)],
            *(["--resume"] if resume else [])]


def train(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def weights(out: Path) -> dict[str, torch.Tensor]:
    found = out / "final_model" / "model.safetensors"
    return load_file(found if found.is_file() else out / "final_adapter" / "adapter_model.safetensors")


def test_zero3_on_two_processes_trains_like_plain_and_resumes_after_kill_9(chat_recipe, tmp_path):
    plain, zero3, killed = tmp_path / "plain", tmp_path / "zero3", tmp_path / "killed"
    train(command(chat_recipe, plain, "plain", "full", 2, 29621))
    said = train(command(chat_recipe, zero3, "zero3", "full", 2, 29623))
    assert "profile zero3: set by hardware.profile" in said
    # every parameter counted by its full size, though ZeRO-3 partitioned it as it loaded
    assert "full: 125,248 of 125,248 parameters train" in said
    # each rank wrote its own shard of the weights and optimizer states
    shards = sorted(p.name for p in (zero3 / "checkpoints" / "step-4" / "pytorch_model").iterdir())
    assert [s for s in shards if s.startswith("zero_pp_rank_")] == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert losses(zero3) == pytest.approx(losses(plain), rel=1e-5)
    assert losses(zero3)[-1] < losses(zero3)[0]
    reference = weights(zero3)
    for k, v in weights(plain).items():
        torch.testing.assert_close(reference[k], v, atol=1e-5, rtol=1e-4)

    proc = subprocess.Popen(command(chat_recipe, killed, "zero3", "full", 2, 29625), cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-2").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait(timeout=60)
    assert not (killed / "final_model").exists()
    said = train(command(chat_recipe, killed, "zero3", "full", 2, 29627, resume=True))
    assert f"resumed from {killed / 'checkpoints' / 'step-'}" in said
    got = weights(killed)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


def test_lora_under_zero2_without_a_launcher_checkpoints_the_adapter_and_resumes(chat_recipe, tmp_path):
    """Plain `python -m crb.run` with a DeepSpeed profile (no launcher: a one-process group); the checkpoint
    leaves the frozen base out, and a resume from step 2 ends with the unbroken run's adapter."""
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    said = train(command(chat_recipe, unbroken, "zero2", "lora", 1, 0))
    assert "profile zero2: set by hardware.profile" in said and "1 process(es)" in said
    step2 = unbroken / "checkpoints" / "step-2"
    states = torch.load(step2 / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert states and all("lora_" in k for k in states), sorted(states)[:5]
    shutil.copytree(step2, resumed / "checkpoints" / "step-2")
    said = train(command(chat_recipe, resumed, "zero2", "lora", 1, 0, resume=True))
    assert "resumed from " + str(resumed / "checkpoints" / "step-2") in said
    assert losses(resumed) == losses(unbroken)[2:]
    reference, got = weights(unbroken), weights(resumed)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


NAN_CHECK = """
import torch
from accelerate import Accelerator
from crb.engine import checkpoint
from crb.engine.profiles import PROFILES, deepspeed_plugin, one_process_group
one_process_group()
acc = Accelerator(deepspeed_plugin=deepspeed_plugin(PROFILES["zero3"], 1, 1.0))
acc.state.deepspeed_plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=1, train_batch_size=1)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
model, _ = acc.prepare(model, torch.optim.AdamW(model.parameters()))
weight = model.module[0].weight
print("outside a forward", weight.numel(), "shard", weight.ds_tensor.numel())
print("finite", checkpoint.weights_finite(acc, model))
weight.ds_tensor.data[3] = float("nan")
print("finite", checkpoint.weights_finite(acc, model))
"""


def test_a_nan_in_a_zero3_shard_is_seen():
    """Under ZeRO-3 a parameter is empty outside a forward: the finiteness check reads each rank's shard."""
    out = train([sys.executable, "-c", NAN_CHECK])
    assert "outside a forward 0 shard 4096" in out
    assert out.count("finite True") == 1 and out.count("finite False") == 1
