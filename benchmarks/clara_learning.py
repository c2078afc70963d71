"""CLaRa's query reasoner learning from the answer loss: the three stages of tests/gpu/test_clara_learning.py at its
SETTINGS and at variants of them, all at once (each a tiny model: one GPU holds many), held-out recall@5 before
and after stage 3.

    python benchmarks/clara_learning.py --out /tmp/crb-bench/clara-learning                   # SETTINGS only
    python benchmarks/clara_learning.py --out DIR --variant 's2lr1e3={"lr": [1e-3, 1e-3, 1e-4]}'

A variant is NAME=JSON: keys of the test's SETTINGS that change (steps and lr as 3 lists, one per stage).
Prints a table; writes OUT/clara_learning.json (and --json PATH): per run its settings, recall@5 before and
after stage 3, the recall at each stage-3 eval and each stage's final loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from language import _git_commit  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def one(name: str, overrides: dict, out: Path) -> None:
    """Run the test's three stages with `overrides` on SETTINGS; write out/NAME.json."""
    sys.path.insert(0, str(ROOT))
    from tests.gpu.test_clara_learning import SETTINGS, three_stages

    settings = {**SETTINGS, **overrides}
    settings["steps"], settings["lr"] = tuple(settings["steps"]), tuple(settings["lr"])
    with tempfile.TemporaryDirectory(prefix=f"clara-learning-{name}-") as folder:
        tmp = Path(folder)
        before, after, finals = three_stages(tmp, **settings)
        rows = [json.loads(line) for line in (tmp / "out/end_to_end/metrics.jsonl").read_text().splitlines()]
    (out / f"{name}.json").write_text(json.dumps({
        "name": name, "overrides": overrides, "settings": settings, "recall_before": before, "recall_after": after,
        "recall_curve": [[r["step"], r["recall@5"]] for r in rows if "recall@5" in r],
        "stage_losses": {stage: round(m["loss"], 4) for stage, m in finals.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON overrides of SETTINGS (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--one", nargs=2, metavar=("NAME", "JSON"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        one(args.one[0], json.loads(args.one[1]), args.out)
        return
    variants = {"settings": {}} | {v.split("=", 1)[0]: json.loads(v.split("=", 1)[1]) for v in args.variant}
    runs = []
    with contextlib.ExitStack() as logs:
        children = {name: subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--one", name,
                                            json.dumps(over)], stderr=subprocess.STDOUT,
                                           stdout=logs.enter_context(open(args.out / f"{name}.log", "w")))
                    for name, over in variants.items()}
        for name, child in children.items():
            if child.wait() != 0:
                print(f"{name}: failed, see {args.out / f'{name}.log'}")
                continue
            runs.append(json.loads((args.out / f"{name}.json").read_text()))
    print(f"{'run':<14} {'recall@5 before':>16} {'after':>7} {'stage losses (1, 2, 3)':>26}  overrides")
    for r in runs:
        losses = ", ".join(f"{v:.3f}" for v in r["stage_losses"].values())
        print(f"{r['name']:<14} {r['recall_before']:>16.3f} {r['recall_after']:>7.3f} {losses:>26}  "
              f"{json.dumps(r['overrides'])}")
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "crb_commit": _git_commit(),
              "test": "tests/gpu/test_clara_learning.py", "chance": 0.25, "runs": runs}
    for path in (args.out / "clara_learning.json", args.json):
        if path:
            path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
