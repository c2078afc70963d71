"""`crb report OUTPUT [OUTPUT ...]`: one PNG and one static HTML page per report: loss (train and
eval), learning rate, tokens/s and GPU memory over the steps (with the plan's prediction), the eval
metrics, the plan against the measured peak, and the recipe. Several run folders overlay their curves."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from crb.errors import CrbError

METRIC_SKIP = {"step", "eval_loss", "epoch"}


def read_run(out: Path) -> dict:
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        raise CrbError(f"{out}: no metrics.jsonl (is it a crb run folder?)")
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    read = {name: json.loads((out / name).read_text()) for name in ("profile.json", "run.json")
            if (out / name).is_file()}
    recipe = (out / "recipe.resolved.toml").read_text() if (out / "recipe.resolved.toml").is_file() else ""
    return {"name": out.name, "path": out, "train": [x for x in lines if "loss" in x],
            "eval": [x for x in lines if "eval_loss" in x], "skipped": [x for x in lines if "skipped" in x],
            "profile": read.get("profile.json", {}), "run": read.get("run.json", {}), "recipe": recipe}


def plot(runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (loss, lr), (speed, memory) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(runs):
        c, label = colors[i % len(colors)], r["name"] if len(runs) > 1 else "train"
        steps = [x["step"] for x in r["train"]]
        loss.plot(steps, [x["loss"] for x in r["train"]], color=c, label=label, linewidth=1.5)
        if r["eval"]:
            loss.plot([x["step"] for x in r["eval"]], [x["eval_loss"] for x in r["eval"]], color=c, linestyle="--",
                      marker="o", markersize=4, label=f"{r['name']} eval" if len(runs) > 1 else "eval")
        lr.plot(steps, [x["lr"] for x in r["train"]], color=c, label=r["name"])
        speed.plot(steps, [x.get("tokens_per_s", float("nan")) for x in r["train"]], color=c, label=r["name"])
        if any("gpu_mem_gib" in x for x in r["train"]):
            memory.plot(steps, [x.get("gpu_mem_gib", float("nan")) for x in r["train"]], color=c,
                        label=f"{r['name']} allocated" if len(runs) > 1 else "allocated (peak so far)")
            memory.plot(steps, [x.get("gpu_reserved_gib", float("nan")) for x in r["train"]], color=c, alpha=0.5,
                        linestyle=":", label=f"{r['name']} reserved" if len(runs) > 1 else "reserved")
            if r["profile"].get("plan_gib"):
                memory.axhline(r["profile"]["plan_gib"], color=c, linestyle="--", linewidth=1,
                               label=f"plan {r['profile']['plan_gib']:.1f} GiB ({r['profile'].get('profile')})")
        for x in r["skipped"]:
            loss.axvline(x["step"], color="red", alpha=0.3, linewidth=1)
    if not any("gpu_mem_gib" in x for r in runs for x in r["train"]):
        memory.text(0.5, 0.5, "no GPU in these runs", ha="center", va="center", transform=memory.transAxes,
                    color="gray")
        memory.set_xticks([])
        memory.set_yticks([])
    for ax, title, unit in ((loss, "loss", "loss (mean per target)"), (lr, "learning rate", "lr"),
                            (speed, "throughput", "tokens / s"), (memory, "GPU memory", "GiB")):
        ax.set_title(title, loc="left", fontweight="bold")
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(" vs ".join(r["name"] for r in runs), fontsize=13)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def eval_table(r: dict) -> str:
    keys = sorted({k for x in r["eval"] for k in x if k not in METRIC_SKIP})
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["step", "eval_loss", *keys])
    rows = "".join("<tr>" + "".join(f"<td>{_fmt(x.get(k))}</td>" for k in ["step", "eval_loss", *keys]) + "</tr>"
                   for x in r["eval"])
    return f"<table><tr>{head}</tr>{rows}</table>" if r["eval"] else "<p>No evaluation in this run.</p>"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else html.escape(str(v))


def page(runs: list[dict], png: Path) -> str:
    image = base64.b64encode(png.read_bytes()).decode()
    parts = [f"<h1>crb report: {html.escape(' vs '.join(r['name'] for r in runs))}</h1>",
             f'<img alt="loss, learning rate, tokens/s and GPU memory over steps" src="data:image/png;base64,{image}">']
    for r in runs:
        train, prof = r["train"], r["profile"]
        peak = max((x.get("gpu_mem_gib", 0) for x in train), default=0)
        summary = {"folder": str(r["path"]), "steps": train[-1]["step"] if train else 0,
                   "final loss": train[-1]["loss"] if train else None,
                   "tokens/s (last)": train[-1].get("tokens_per_s") if train else None,
                   "skipped steps (non-finite)": len(r["skipped"]), "profile": prof.get("profile"),
                   "plan (GiB)": prof.get("plan_gib"), "measured peak allocated (GiB)": peak or "no GPU"}
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in summary.items())
        parts += [f"<h2>{html.escape(r['name'])}</h2>", f"<table>{rows}</table>", "<h3>Evaluation</h3>",
                  eval_table(r), "<details><summary>recipe (resolved)</summary>",
                  f"<pre>{html.escape(r['recipe'])}</pre></details>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "img{max-width:100%}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}pre{background:#f6f6f6;padding:1em}")
    return f"<!doctype html><meta charset=utf-8><title>crb report</title><style>{style}</style>" + "".join(parts)


def report(outputs: list[Path], dest: Path | None = None) -> tuple[Path, Path]:
    """Write report.png and report.html (into the run folder, or `dest` for several runs)."""
    runs = [read_run(Path(o)) for o in outputs]
    folder = Path(dest) if dest else runs[0]["path"] if len(runs) == 1 else None
    if folder is None:
        raise CrbError("crb report: with several run folders, say where the report goes: --out DIR")
    folder.mkdir(parents=True, exist_ok=True)
    png, page_path = folder / "report.png", folder / "report.html"
    plot(runs, png)
    page_path.write_text(page(runs, png), encoding="utf-8")
    return png, page_path
