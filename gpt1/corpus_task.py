"""A CoLA-format acceptability task derived from a prepared corpus: real lines against swapped-word lines.

    python -m gpt1.corpus_task --data data/shakespeare --out data/shakespeare/acceptability

Each kept line of the corpus (5 to 20 words, with lower-case letters) appears once: as it is (label
1, acceptable) or, with probability 1/2, with two of its words swapped (label 0, CoLA's `*`). Lines
of the data's train split make train.tsv; lines of its val split, documents the pre-trained model
never saw, make dev.tsv. The files use CoLA's layout, so `gpt1 finetune --task cola` reads them.

It is a word-order task on verse, not CoLA: there are no linguists' judgements and one kind of
error only, and a swap sometimes leaves a line that is still acceptable ("the king and the queen"),
so some labels are wrong and the best MCC is below 1.
"""

import argparse
import os
import random

import numpy as np

from .data import TokenFile, load_meta
from .errors import GPT1Error, cli_errors
from .tokenizer import GPT1Tokenizer


def split_lines(data_dir, split, meta, tok):
    """The distinct usable lines of one split's documents, in corpus order."""
    ids = np.asarray(TokenFile(data_dir, split, meta["dtype"]).tokens)
    docs = np.split(ids, np.flatnonzero(ids == tok.eot_id))
    seen, lines = set(), []
    for doc in docs:
        for line in tok.decode([int(t) for t in doc if t != tok.eot_id]).splitlines():
            line = " ".join(line.split())
            if 5 <= len(line.split()) <= 20 and any(c.islower() for c in line) and line not in seen:
                seen.add(line)
                lines.append(line)
    return lines


def swap_two_words(line, rng):
    """The line with two different words exchanged (None when all its words are the same)."""
    words = line.split()
    pairs = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words)) if words[i] != words[j]]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


def make_rows(lines, n, rng, source):
    """n CoLA rows from a random sample of lines: (source, label, mark, sentence)."""
    rows = []
    for line in rng.sample(lines, min(n, len(lines))):
        swapped = swap_two_words(line, rng) if rng.random() < 0.5 else None
        rows.append((source, "0", "*", swapped) if swapped else (source, "1", "", line))
    return rows


def write_tsv(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines("\t".join(r) + "\n" for r in rows)


def build(data_dir, out, n_train=10000, n_dev=2000, seed=0):
    """Write OUT/train.tsv and OUT/dev.tsv; returns the number of rows of each."""
    meta = load_meta(data_dir)
    tok = GPT1Tokenizer.from_dir(data_dir)
    rng = random.Random(seed)
    train, dev = split_lines(data_dir, "train", meta, tok), split_lines(data_dir, "val", meta, tok)
    dev_set = set(dev)
    train = [x for x in train if x not in dev_set]  # a line that recurs in both splits is held out
    if len(train) < 10 or len(dev) < 10:
        raise GPT1Error(f"{data_dir} has too few usable lines ({len(train)} train, {len(dev)} val)")
    os.makedirs(out, exist_ok=True)
    rows = {"train": make_rows(train, n_train, rng, "train"), "dev": make_rows(dev, n_dev, rng, "val")}
    for name, r in rows.items():
        write_tsv(os.path.join(out, f"{name}.tsv"), r)
    return {k: len(v) for k, v in rows.items()}


@cli_errors
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpt1.corpus_task", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a directory written by `gpt1 prepare`")
    p.add_argument("--out", required=True, help="where train.tsv and dev.tsv (CoLA format) go")
    p.add_argument("--train-examples", type=int, default=10000)
    p.add_argument("--dev-examples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for flag, n in (("--train-examples", a.train_examples), ("--dev-examples", a.dev_examples)):
        if n < 1:  # 0 would write a file that no fine-tuning reads, fewer fail in random.sample
            raise GPT1Error(f"{flag} must be at least 1, got {n}")
    counts = build(a.data, a.out, a.train_examples, a.dev_examples, a.seed)
    print(f"wrote {counts['train']} train and {counts['dev']} dev rows (CoLA format) to {a.out}")


if __name__ == "__main__":
    main()
