"""On 2 GPUs: two accelerate launchers acting as two machines of one GPU each (launch/accelerate/multi-node.yaml,
ranks 0 and 1, the master on localhost) train like one launcher with 2 processes; a run killed with kill -9 and
resumed ends with the unbroken run's adapter; SIGTERM to one rank stops both with one checkpoint. Skipped below
2 GPUs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def crb_args(recipe, out) -> list[str]:
    args = ["-m", "crb.run", str(recipe)]
    for item in ["train.max_steps=4", "train.batch_size=8", "train.micro_batch=4", "method.lora.dropout=0.0",
                 "train.precision='bf16'", f"output.dir='{out}'"]:
        args += ["--set", item]
    return args


def test_two_machines_match_one_launcher_with_two_processes(chat_recipe, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    one = tmp_path / "one"
    proc = subprocess.run([*launch, "--multi_gpu", "--num_processes", "2", "--main_process_port", "29541",
                           *crb_args(chat_recipe, one)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    nodes = []
    for rank in (0, 1):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(rank)}
        cmd = [*launch, "--config_file", "launch/accelerate/multi-node.yaml", "--machine_rank", str(rank),
               "--num_machines", "2", "--num_processes", "2", "--main_process_port", "29543",
               *crb_args(chat_recipe, two)]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                      env=env))
    for p in nodes:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    assert len(losses(two)) == 4 and losses(two) == pytest.approx(losses(one), rel=1e-3)


def test_kill_9_on_two_gpus_then_resume_ends_with_the_unbroken_adapter(chat_recipe, tmp_path):
    """kill -9 of the whole launch (launcher and both ranks) once step 3's checkpoint is complete; --resume on 2
    GPUs again ends with the adapter of a run never killed (allclose: the GPU's reductions are not bitwise)."""
    from safetensors.torch import load_file

    def launch(out, port: int, resume: bool = False) -> subprocess.Popen:
        sets = [*crb_args(chat_recipe, out)[3:], "--set", "train.max_steps=6", "--set", "train.save_every=1",
                "--set", "train.keep_checkpoints=3", "--set", "method.lora.dropout=0.1"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(port), "-m", "crb.run", str(chat_recipe), *sets,
               *(["--resume"] if resume else [])]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    unbroken = launch(tmp_path / "unbroken", 29545)
    out, _ = unbroken.communicate(timeout=900)
    assert unbroken.returncode == 0, out[-3000:]
    killed_dir = tmp_path / "killed"
    proc = launch(killed_dir, 29547)
    deadline = time.time() + 600
    while not (killed_dir / "checkpoints" / "step-3").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed_dir / "final_adapter").exists()
    resumed = launch(killed_dir, 29549, resume=True)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0 and "resumed from " in out, out[-3000:]
    want = load_file(tmp_path / "unbroken" / "final_adapter" / "adapter_model.safetensors")
    got = load_file(killed_dir / "final_adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=1e-3, atol=1e-5, msg=name)


def test_sigterm_to_one_rank_on_two_gpus_stops_both_with_one_checkpoint(chat_recipe, tmp_path):
    """The CPU test's run (tests/integration/test_signals.py), here with a GPU per rank (NCCL)."""
    from tests.integration.test_signals import test_sigterm_to_one_of_two_processes_stops_both_with_one_checkpoint

    test_sigterm_to_one_of_two_processes_stops_both_with_one_checkpoint(chat_recipe, tmp_path)
