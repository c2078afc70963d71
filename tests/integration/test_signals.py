"""A real `crb run` process stopped by SIGTERM / SIGINT: it finishes the step, writes a complete
checkpoint of it, exits non-zero (128 + the signal) with a one-line message, and --resume continues
from there to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def start(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "crb.run", str(recipe), "--set", "train.max_steps=400", "--set", "train.log_every=1",
           "--set", "train.save_every=1000", "--set", f"output.dir='{out}'", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines() if '"loss"' in ln]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_resume_completes(chat_recipe, tmp_path, sig):
    out = tmp_path / "run"
    proc = start(chat_recipe, out)
    deadline = time.time() + 240
    while len(logged_steps(out)) < 2:  # training is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"crb: stopped: {sig.name} after step "), last
    step = int(last.split("after step ")[1].split(":")[0])
    ckpt = out / "checkpoints" / f"step-{step}"
    assert str(ckpt) in last and (ckpt / "crb_state.json").is_file()
    assert json.loads((ckpt / "crb_state.json").read_text())["step"] == step
    assert step >= 2 and max(logged_steps(out)) == step  # the step it was in finished, no later one began
    assert not list((out / "checkpoints").glob(".tmp-*"))

    if step >= 12:
        pytest.skip("the signal came after step 12")
    resumed = subprocess.run([sys.executable, "-m", "crb.run", str(chat_recipe), "--set", "train.max_steps=12",
                              "--set", "train.save_every=1000", "--set", f"output.dir='{out}'", "--resume"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {ckpt} at step {step}" in resumed.stdout + resumed.stderr
    assert logged_steps(out) == list(range(1, 13))  # no step lost or repeated
