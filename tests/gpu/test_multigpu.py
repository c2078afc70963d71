"""On 2 GPUs: two accelerate launchers acting as two machines of one GPU each (launch/accelerate/multi-node.yaml,
ranks 0 and 1, the master on localhost) train like one launcher with 2 processes. Skipped below 2 GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def losses(out) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


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
