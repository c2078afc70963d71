"""data.streaming: rows made as training reads them equal the prepared rows in source order (packed or not), a run
stopped by SIGTERM and resumed reads on from the record its checkpoint names and ends where an unbroken streamed run
ends, and a stream holds only a window of rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crb.engine.build import build_tokenizer
from crb.errors import RecipeError
from crb.recipe import schema as recipes
from crb.run import run
from crb.tasks import TASKS, prepare, stream
from tests.conftest import losses
from tests.integration.test_signals import HOOKED, WAIT_S

ROOT = Path(__file__).resolve().parents[2]
STREAM = ["data.streaming=true", "data.eval_split=0", "train.max_steps=6", "train.batch_size=4", "train.micro_batch=2"]


@pytest.mark.parametrize("packing", [False, True])
def test_streamed_rows_are_the_prepared_rows_in_source_order(chat_recipe, packing):
    r = recipes.load(chat_recipe, [*STREAM, f"data.packing={str(packing).lower()}"], tasks=TASKS)
    tok = build_tokenizer(r)
    prepared, _, _ = prepare(dataclass_replace(r.data, streaming=False), tok, 0, r.clara)
    rows, _, _ = stream(r.data, tok, 0, r.clara, n_rows=len(prepared) + 3, keep=4)
    last = len(prepared) - packing  # packed, the last row fills up with the sources' next round
    for i in range(last):
        want, got = prepared[i], rows[i]
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"row {i} {key}")
    if not packing:  # the sources start again
        np.testing.assert_array_equal(rows[len(prepared)]["input_ids"], prepared[0]["input_ids"])
    rows[len(prepared) + 2]
    assert len(rows.made) <= 4 + 1  # a window, not the corpus
    with pytest.raises(IndexError, match="read past"):
        rows[0]


def dataclass_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final_adapter" / "adapter_model.safetensors")


def test_a_stopped_streamed_run_resumes_at_the_record_its_checkpoint_names(chat_recipe, tmp_path):
    sets = [*STREAM, "data.packing=true", "method.lora.dropout=0.1", "train.log_every=1", "train.save_every=1000"]
    unbroken = tmp_path / "unbroken"
    run(str(chat_recipe), [*sets, f"output.dir='{unbroken}'"])

    out, ready, stop = tmp_path / "stopped", tmp_path / "ready", 3
    cmd = [sys.executable, "-c", HOOKED, str(ready), str(stop), str(chat_recipe),
           *[x for s in [*sets, f"output.dir='{out}'"] for x in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + WAIT_S
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=WAIT_S)
    assert "crb: stopped: SIGTERM after step 3" in err, err[-2000:]
    state = json.loads((out / "checkpoints" / "step-3" / "crb_state.json").read_text())
    assert state["stream"][0] == 0 and state["stream"][1] > 0  # the first source, some records in

    resumed = subprocess.run([sys.executable, "-m", "crb.run", str(chat_recipe),
                              *[x for s in [*sets, f"output.dir='{out}'"] for x in ("--set", s)], "--resume"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == losses(unbroken)
    want, got = adapter(unbroken), adapter(out)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("setting, key", [("train.max_steps=0", "train.max_steps"),
                                          ("data.eval_split=0.1", "data.eval_split")])
def test_streaming_needs_a_step_count_and_named_eval_data(chat_recipe, setting, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.") + ": expected"):
        recipes.load(chat_recipe, [*STREAM, setting], tasks=TASKS)
