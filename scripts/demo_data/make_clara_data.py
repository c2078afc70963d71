"""Writes the CLaRa sample data crb ships: clara_stage1.jsonl (a product description as the document, with
questions and answers read off it: name, colour, price), one per catalogue product of retail_search_corpus.jsonl
(483: more than stage 1's batch of 128 after the eval split), and clara_stage23.jsonl (the colour and price
questions of every other product whose name no other product has, each with 20 candidate documents: its own and
the 19 BM25-nearest others of the catalogue; pos_index marks its own). Re-run:

    python scripts/demo_data/make_clara_data.py
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parents[2] / "crb" / "demo_data"  # where the shipped data files live
N_CANDIDATES = 20  # stage 3 selects clara.top_k = 5 of them


def qa_of(text: str) -> list[tuple[str, str]]:
    title = text.split(". ", 1)[0]
    pairs = [("What product does the document describe?", title)]
    if m := re.search(r"Colour: ([^.]+)\.", text):
        pairs.append((f"What colour is the {title}?", m.group(1)))
    if m := re.search(r"\$(\d+\.\d\d)", text):
        pairs.append((f"How much does the {title} cost?", f"${m.group(1)}"))
    return pairs


def main() -> None:
    from crb.data.clara import build_stage23

    texts = [json.loads(line)["text"] for line in (HERE / "retail_search_corpus.jsonl").read_text().splitlines()]
    stage1 = []
    for text in texts:
        qa = qa_of(text)
        stage1.append({"data_type": "qa", "question": [q for q, _ in qa], "answers": [a for _, a in qa],
                       "docs": [text]})
    (HERE / "clara_stage1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stage1))
    records = build_stage23([{"doc": r["docs"][0], "qa": list(zip(r["question"], r["answers"], strict=True))}
                             for r in stage1], n_docs=N_CANDIDATES, seed=0)
    titles = Counter(text.split(". ", 1)[0] for text in texts)
    unique = [text for text in texts if titles[text.split(". ", 1)[0]] == 1]  # a question names one product
    kept = set(unique[::2])  # half of them: the file stays small
    records = [r for r in records if r["docs"][r["pos_index"][0]] in kept
               and not r["question"].startswith("What product")]  # that one needs its document named
    (HERE / "clara_stage23.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(stage1)} stage-1 and {len(records)} stage-2/3 records")


if __name__ == "__main__":
    main()
