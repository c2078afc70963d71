"""train.trace_steps: the profiler covers the steps after the first and writes its tables."""

from __future__ import annotations

import json

from crb.run import run


def test_trace_steps_write_the_kernel_table_of_the_traced_steps(chat_recipe, tmp_path):
    out = tmp_path / "run"
    run(str(chat_recipe), ["train.trace_steps=2", "train.max_steps=4", "train.eval_every=0", f"output.dir='{out}'"])
    table = json.loads((out / "trace" / "kernels.json").read_text())
    assert table["steps"] == 2 and table["device"] == "cpu"
    mm = [k for k in table["kernels"] if k["name"] == "aten::mm"]
    assert mm and mm[0]["calls"] > 0 and mm[0]["ms"] > 0
    assert [k["ms"] for k in table["kernels"]] == sorted((k["ms"] for k in table["kernels"]), reverse=True)
    assert "aten::mm" in (out / "trace" / "kernels.txt").read_text()
    assert json.loads((out / "trace" / "trace.json").read_text())["traceEvents"]
    assert json.loads((out / "profile.json").read_text())["compile"] is False  # "auto" without CUDA


def test_no_trace_by_default(chat_recipe, tmp_path):
    out = tmp_path / "run"
    run(str(chat_recipe), ["train.max_steps=1", f"output.dir='{out}'"])
    assert not (out / "trace").exists()
