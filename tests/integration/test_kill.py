"""kill -9 of a real training process, at several steps and in the middle of a checkpoint write:
`--resume` picks the last complete checkpoint (a half-written one never), and the resumed run ends
with the same adapter, bit for bit on CPU, as a run that was never killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from crb.engine import checkpoint

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
# The run under test, in a subprocess. SLOW_SAVE holds each checkpoint write open for 0.5 s between writing
# its files and renaming the folder into place, so a kill can land inside the write.
LAUNCH = """
import sys, time
import crb.engine.checkpoint as c
if {slow}:
    fsync = c._fsync_dir
    c._fsync_dir = lambda p: (time.sleep(0.5) if p.name.startswith(".tmp-") else None, fsync(p))[1]
from crb.run import main
sys.exit(main(sys.argv[1:]))
"""


def command(recipe: Path, out: Path, slow: bool, resume: bool) -> list[str]:
    sets = [f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_checkpoints=3",
            "method.lora.dropout=0.1", f"output.dir='{out}'"]
    return [sys.executable, "-c", LAUNCH.format(slow=slow), str(recipe),
            *[x for s in sets for x in ("--set", s)], *(["--resume"] if resume else [])]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def finish(recipe: Path, out: Path) -> None:
    """Resume (or start, when nothing was saved) to the end."""
    resume = checkpoint.latest(out / "checkpoints") is not None
    done = subprocess.run(command(recipe, out, False, resume), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    if resume:
        assert "resumed from " + str(out / "checkpoints" / "step-") in done.stdout + done.stderr


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final_adapter" / "adapter_model.safetensors")


def test_kill_9_anywhere_then_resume_equals_an_unbroken_run(chat_recipe, tmp_path):
    unbroken = tmp_path / "unbroken"
    finish(chat_recipe, unbroken)
    reference = adapter(unbroken)
    tried = []
    # (when to kill): after the first step's checkpoint is complete, in the middle of step 4's checkpoint
    # write, and in the middle of the last step's write (the final weights not written yet)
    for name, target in (("after-step-1", "step-1"), ("inside-write-4", ".tmp-step-4"),
                         ("inside-write-8", f".tmp-step-{STEPS}")):
        out = tmp_path / name
        proc = subprocess.Popen(command(chat_recipe, out, True, False), cwd=ROOT, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while not (out / "checkpoints" / target).exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        half = list((out / "checkpoints").glob(".tmp-*"))
        if target.startswith(".tmp-"):
            assert half, "the kill was meant to land inside a checkpoint write"
            assert not (out / "final_adapter").exists()
        last = checkpoint.latest(out / "checkpoints")
        assert last is not None and not last.name.startswith(".tmp-")
        finish(chat_recipe, out)
        got = adapter(out)
        assert got.keys() == reference.keys()
        for k in reference:
            assert torch.equal(got[k], reference[k]), (name, k)
        tried.append((name, last.name))
    assert [t[1] for t in tried] == ["step-1", "step-3", f"step-{STEPS - 1}"]
