"""Library noise (bitsandbytes' kernels-community line, DeepSpeed's accelerator warning, deprecation warnings)
stays off the console of a run and goes to OUT/crb.log; `--debug` shows it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

NOISE = ("Failed to load CPU gemm_4bit_forward", "Setting accelerator to CPU", "FutureWarning")
ROOT = Path(__file__).resolve().parents[2]


def console(recipe: Path, out: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "crb.run", str(recipe), "--set", "method.name='qlora'", "--set", "train.max_steps=1",
           "--set", f"output.dir='{out}'", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_library_noise_goes_to_the_run_log_and_debug_shows_it(chat_recipe, tmp_path):
    loud = console(chat_recipe, tmp_path / "loud", "--debug")
    shown = [n for n in NOISE if n in loud]
    assert shown, "the libraries said nothing to filter: this test needs bitsandbytes and deepspeed installed"
    quiet = console(chat_recipe, tmp_path / "quiet")
    assert "crb: done" in quiet and not [n for n in NOISE if n in quiet]
    log = (tmp_path / "quiet" / "crb.log").read_text()
    assert all(n in log for n in shown)
