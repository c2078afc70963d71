"""Two CPU processes (torchrun, gloo) train like one process at doubled micro-batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from crb.run import run
from tests.conftest import losses


@pytest.mark.slow
def test_two_processes_match_one_at_double_micro_batch(chat_recipe, tmp_path):
    common = ["train.max_steps=4", "train.batch_size=8", "method.lora.dropout=0.0"]
    one = tmp_path / "one"
    run(str(chat_recipe), [*common, "train.micro_batch=8", f"output.dir='{one}'"])
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "crb.run", str(chat_recipe)]
    for item in [*common, "train.micro_batch=4", f"output.dir='{two}'"]:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "accumulation 1" in proc.stdout

    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    a = load_file(one / "final_adapter/adapter_model.safetensors")
    b = load_file(two / "final_adapter/adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_translation_two_processes_match_one(translation_recipe, tmp_path):
    """Seq2seq under 2 CPU processes: the loss is normalised over the whole step's target tokens.
    (`accelerate launch --cpu` starts one process; torchrun starts several.)"""
    common = ["train.max_steps=3", "train.batch_size=8", "data.eval=[]", "train.log_every=1"]
    one = tmp_path / "one"
    run(str(translation_recipe), [*common, "train.micro_batch=8", f"output.dir='{one}'"])
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "crb.run", str(translation_recipe)]
    for item in [*common, "train.micro_batch=4", f"output.dir='{two}'"]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout

    # padding differs (each micro-batch pads to its own longest row): float noise of ~1e-4, where a wrong
    # normalisation would be off by the ratio of the processes' target tokens (several %)
    assert losses(two) == pytest.approx(losses(one), rel=1e-3)


@pytest.mark.slow
def test_two_machines_of_one_process_match_one_process(chat_recipe, tmp_path):
    """Two launchers as two machines (torchrun --nnodes 2, node ranks 0 and 1, the rendezvous on localhost: what
    accelerate launch --num_machines 2 starts on each node) train like one process at the doubled micro-batch,
    and write one result (docs/multinode.md)."""
    common = ["train.max_steps=3", "train.batch_size=8", "method.lora.dropout=0.0"]
    one = tmp_path / "one"
    run(str(chat_recipe), [*common, "train.micro_batch=8", f"output.dir='{one}'"])
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", "29537",
               "-m", "crb.run", str(chat_recipe)]
        for item in [*common, "train.micro_batch=4", f"output.dir='{two}'"]:
            cmd += ["--set", item]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=600) for p in nodes]
    for p, (_, err) in zip(nodes, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outs[0][0] and "accumulation 1" in outs[0][0]

    assert len(losses(two)) == 3 and losses(two) == pytest.approx(losses(one), rel=1e-5)
    a = load_file(one / "final_adapter/adapter_model.safetensors")
    b = load_file(two / "final_adapter/adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_one_process_tokenizes_the_others_memory_map(chat_recipe, tmp_path):
    """Issue 19: under torchrun the first process prepares the data; the second waits and reads its cache."""
    marks = tmp_path / "tokenized-by"
    script = tmp_path / "counted_run.py"
    script.write_text(f"""
import os, sys
import crb.data.prepared as prepared
tokenize = prepared.Tokenize.__call__
def counted(self, batch):
    with open({str(marks)!r}, "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    return tokenize(self, batch)
prepared.Tokenize.__call__ = counted
from crb.run import main
sys.exit(main())
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(script), str(chat_recipe), "--set", "train.max_steps=1", "--set", f"output.dir='{tmp_path / 'o'}'"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marks.read_text().split() == ["0"]  # one batch of 64 records, tokenized by rank 0 alone
    assert len(list((tmp_path / "cache").iterdir())) == 1
