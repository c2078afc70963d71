"""`crb report`: a PNG and an HTML page from a run folder; several folders overlay into one."""

from __future__ import annotations

from crb.cli import main as cli
from crb.run import run


def test_report_of_one_run_and_of_two(chat_recipe, tmp_path, capsys):
    a, b = tmp_path / "lr-1e-3", tmp_path / "lr-1e-2"
    run(str(chat_recipe), ["train.max_steps=4", "train.eval_every=2", f"output.dir='{a}'"])
    run(str(chat_recipe), ["train.max_steps=4", "train.eval_every=2", "train.lr=1e-2", f"output.dir='{b}'"])
    assert cli(["report", str(a)]) == 0
    png, page = a / "report.png", a / "report.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = page.read_text()
    assert "data:image/png;base64," in text and "eval_loss" in text and "lr = 0.001" in text
    assert "<td>4</td>" in text  # the steps, in the summary

    assert cli(["report", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    both = (tmp_path / "cmp" / "report.html").read_text()
    assert "lr-1e-3 vs lr-1e-2" in both and "lr = 0.01" in both
    capsys.readouterr()
    assert cli(["report", str(a), str(b)]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert cli(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
