"""A real `crb run` process stopped by SIGTERM / SIGINT: it finishes the step, writes a complete
checkpoint of it, exits non-zero (128 + the signal) with a one-line message, and --resume continues
from there to the end.

The signal comes from this test, another process, as in real life; so that its step is known, the run
waits after logging step STOP until its SIGTERM/SIGINT handler has seen the signal (a wrapper around
`python -m crb.run` that hooks crb's metrics log and signal handler, nothing else). The stop therefore
always lands after step STOP: no race with the training speed, no skip."""

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
STOP = 3  # the step after which the signal arrives
WAIT_S = 240

# `python -c HOOKED READY STEP <crb.run arguments>`: crb.run, which after logging step STEP touches READY
# and waits until its signal handler has run (at most WAIT_S seconds: then it trains on, and the test fails).
HOOKED = f"""
import sys, time
from pathlib import Path
import crb.engine.loop as loop
from crb.run import main
ready, stop_at = Path(sys.argv.pop(1)), int(sys.argv.pop(1))
seen = []
handle = loop.StopRequest._handle
def _handle(self, signum, frame):
    seen.append(signum)
    handle(self, signum, frame)
loop.StopRequest._handle = _handle
write = loop.MetricsLog.write
def _write(self, row):
    write(self, row)
    if row.get("step") == stop_at and "loss" in row:
        ready.touch()
        deadline = time.time() + {WAIT_S}
        while not seen and time.time() < deadline:
            time.sleep(0.01)
loop.MetricsLog.write = _write
sys.exit(main())
"""


def start(recipe: Path, out: Path, ready: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", HOOKED, str(ready), str(STOP), str(recipe), "--set", "train.max_steps=400",
           "--set", "train.log_every=1", "--set", "train.save_every=1000", "--set", f"output.dir='{out}'"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines() if '"loss"' in ln]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_resume_completes(chat_recipe, tmp_path, sig):
    out, ready = tmp_path / "run", tmp_path / "ready"
    proc = start(chat_recipe, out, ready)
    deadline = time.time() + WAIT_S
    while not ready.exists():  # training has logged step STOP and now waits for the signal
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 128 + sig, err[-2000:]
    last = err.strip().splitlines()[-1]
    ckpt = out / "checkpoints" / f"step-{STOP}"
    assert last == f"crb: stopped: {sig.name} after step {STOP}: checkpoint {ckpt}; continue with --resume", last
    assert json.loads((ckpt / "crb_state.json").read_text())["step"] == STOP
    assert logged_steps(out) == list(range(1, STOP + 1))  # the step it was in finished, no later one began
    assert not list((out / "checkpoints").glob(".tmp-*"))

    resumed = subprocess.run([sys.executable, "-m", "crb.run", str(chat_recipe), "--set", "train.max_steps=12",
                              "--set", "train.save_every=1000", "--set", f"output.dir='{out}'", "--resume"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {ckpt} at step {STOP}" in resumed.stdout + resumed.stderr
    assert logged_steps(out) == list(range(1, 13))  # no step lost or repeated


# Two processes (torchrun, gloo): each writes its PID after logging step STOP; rank 0 then waits for GO, so the
# signal to rank 1 arrives while rank 0 holds the run at step STOP.
HOOKED_RANKS = f"""
import os, sys, time
from pathlib import Path
import crb.engine.loop as loop
from crb.run import main
folder, stop_at = Path(sys.argv.pop(1)), int(sys.argv.pop(1))
write = loop.MetricsLog.write
def _write(self, row):
    write(self, row)
    if row.get("step") == stop_at and "loss" in row:
        (folder / f"pid-{{os.environ['RANK']}}").write_text(str(os.getpid()))
        deadline = time.time() + {WAIT_S}
        while os.environ["RANK"] == "0" and not (folder / "go").exists() and time.time() < deadline:
            time.sleep(0.01)
loop.MetricsLog.write = _write
sys.exit(main())
"""


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_with_one_checkpoint(chat_recipe, tmp_path):
    """SIGTERM to rank 1 alone: the signal is summed over the processes at the next step's start, so both finish
    that step, write one complete checkpoint and stop; --resume (2 processes again) completes the run."""
    out, folder = tmp_path / "run", tmp_path / "sync"
    folder.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561"]
    sets = ["--set", "train.log_every=1", "--set", "train.save_every=1000", "--set", f"output.dir='{out}'",
            "--set", "method.lora.dropout=0.0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*torchrun, "--no-python", sys.executable, "-c", HOOKED_RANKS, str(folder), str(STOP),
                             str(chat_recipe), "--set", "train.max_steps=400", *sets],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + WAIT_S
    while not (folder / "pid-0").exists() or not (folder / "pid-1").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.kill(int((folder / "pid-1").read_text()), signal.SIGTERM)
    time.sleep(0.5)
    (folder / "go").touch()
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode != 0  # torchrun reports the workers' exit (128 + SIGTERM)
    assert "crb: stopped: SIGTERM after step" in err, err[-2000:]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and not list((out / "checkpoints").glob(".tmp-*"))
    stopped_at = json.loads((ckpts[0] / "crb_state.json").read_text())["step"]
    assert stopped_at in (STOP, STOP + 1)  # rank 1 saw the signal before or after it sent step STOP + 1's counts
    assert logged_steps(out) == list(range(1, stopped_at + 1))

    resumed = subprocess.run([*torchrun, "-m", "crb.run", str(chat_recipe), "--set", "train.max_steps=8", *sets,
                              "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert logged_steps(out) == list(range(1, 9))  # no step lost or repeated
