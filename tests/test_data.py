"""Tokenizer and corpus preparation: round trips, GPT-2 file format, document split, token files, errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gpt1.data import DataError, TokenFile, load_meta, prepare, split_documents
from gpt1.tokenizer import GPT1Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCERPT = os.path.join(ROOT, "tests", "data", "shakespeare")
ENV = {**os.environ, "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def tok():
    return GPT1Tokenizer.train([os.path.join(EXCERPT, "hamlet.txt")], 600)


@pytest.mark.parametrize("text", ["To be, or not to be: that is the question.",
                                  "  leading spaces\n\ttabs and\r\nCRLF  ",
                                  "Ophélie — naïve façade, 「日本語」, emoji 🎭, Ελληνικά",
                                  ""])
def test_tokenizer_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_vocab(tok):
    ids = tok.special_ids()
    assert set(ids) == {"eot", "pad", "start", "delim", "extract"}
    assert sorted(ids.values()) == [0, 1, 2, 3, 4]
    assert tok.vocab_size == 600
    assert tok.encode("<|start|>a<|delim|>b<|extract|>") == ([ids["start"]] + tok.encode("a") + [ids["delim"]]
                                                             + tok.encode("b") + [ids["extract"]])


def test_saved_files_are_gpt2_format_and_reload(tok, tmp_path):
    tok.save(tmp_path)
    vocab = json.load(open(tmp_path / "vocab.json"))
    merges = open(tmp_path / "merges.txt", encoding="utf-8").read().splitlines()
    assert len(vocab) == 600 and merges[0].startswith("#version")
    assert all(len(m.split(" ")) == 2 for m in merges[1:])
    again = GPT1Tokenizer.from_files(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    text = "Something is rotten in the state of Denmark. Ünïcödé"
    assert again.encode(text) == tok.encode(text)
    # in id order, as GPT-2's file is: it was a hash map's order, another in every process
    assert list(vocab.values()) == list(range(600))


def test_lone_surrogate_is_a_value_error(tok):
    """A str that is not Unicode text (`gpt1 generate --prompt` with an undecodable byte) is a ValueError, which
    the CLI prints as one line; it was the library's TypeError, a traceback."""
    with pytest.raises(ValueError, match="lone surrogate at character 2"):
        tok.encode("ab\udcffcd")
    with pytest.raises(ValueError, match="lone surrogate at character 0"):
        tok.encode_batch(["fine", "\ud800"])


def byte_level_vocab(extra):
    from tokenizers import pre_tokenizers

    return {**{c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, **extra}


@pytest.mark.parametrize("vocab, merges, msg", [
    (byte_level_vocab({"ab": 1000}), "a b", "the token ids must be the integers 0 to 256, each once"),  # a gap
    (byte_level_vocab({"ab": 5}), "a b", "each once"),  # an id twice
    (byte_level_vocab({"ab": "256"}), "a b", "each once"),
    ({"a": 0, "b": 1, "ab": 2}, "a b", "lacks some of the 256 byte symbols"),  # would drop every other byte
    (byte_level_vocab({}), "a z9", "Token `z9` out of vocabulary"),
    (byte_level_vocab({}), "a b c", "Merges text file invalid at line 1"),
])
def test_bad_vocabulary_files_are_refused(tmp_path, vocab, merges, msg):
    """Ids beyond the vocabulary's size overran the embedding and could wrap in a uint16 token file, and a
    byte-level vocabulary without the byte alphabet dropped text, all silently; a bad merges file was the
    library's bare Exception, a traceback."""
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(f"#version: 0.2\n{merges}\n")
    with pytest.raises(ValueError, match=re.escape(msg)):
        GPT1Tokenizer.from_files(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


def test_original_gpt_bpe_files_load(tmp_path):
    """The original model's files: word-final symbols marked with </w>, no byte-level alphabet."""
    vocab = {"t": 0, "h": 1, "e": 2, "e</w>": 3, "th": 4, "the</w>": 5, "c": 6, "a": 7, "t</w>": 8,
             "ca": 9, "cat</w>": 10, "<unk>": 11}
    (tmp_path / "encoder_bpe.json").write_text(json.dumps(vocab))
    (tmp_path / "vocab_bpe.txt").write_text("#version: 0.2\nt h\nth e</w>\nc a\nca t</w>\n")
    tok = GPT1Tokenizer.from_files(str(tmp_path / "encoder_bpe.json"), str(tmp_path / "vocab_bpe.txt"))
    ids = tok.encode("the cat")
    assert ids[:2] == [5, 10]
    assert tok.decode(ids).replace(" ", "") == "thecat"


def test_prepare_splits_by_document_and_writes_memmaps(tmp_path):
    meta = prepare(str(tmp_path / "d"), texts=[EXCERPT], vocab_size=400, val_fraction=0.25)
    assert meta["documents"] == {"train": 3, "val": 1}
    assert meta["vocab_size"] == 400 and meta["dtype"] == "uint16"
    assert meta == load_meta(str(tmp_path / "d"))
    train = TokenFile(str(tmp_path / "d"), "train", meta["dtype"])
    assert len(train) == meta["tokens"]["train"]
    tok = GPT1Tokenizer.from_dir(str(tmp_path / "d"))
    # the val split decodes back to exactly one of the documents (plus the end-of-text marker)
    val = np.memmap(tmp_path / "d" / "val.bin", dtype=np.uint16, mode="r")
    assert val[-1] == meta["special_tokens"]["eot"]
    texts = {open(os.path.join(EXCERPT, f), encoding="utf-8").read() for f in os.listdir(EXCERPT)}
    assert tok.decode(val[:-1].tolist()) in texts
    w = train.windows(np.random.default_rng(0), 3, 17)
    assert w.shape == (3, 17) and w.dtype == np.int64 and w.max() < 400
    # each window is a contiguous slice of the file
    flat = np.asarray(train.tokens)
    for row in w:
        starts = np.flatnonzero(flat[:len(flat) - 16] == row[0])
        assert any((flat[s:s + 17] == row).all() for s in starts)


def test_single_document_is_split_at_a_line(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i} of the only play\n" for i in range(400)))
    meta = prepare(str(tmp_path / "d"), texts=[str(f)], vocab_size=300, val_fraction=0.1)
    assert meta["documents"] == {"train": 1, "val": 1}
    tok = GPT1Tokenizer.from_dir(str(tmp_path / "d"))
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
    assert tok.decode(val[:-1].tolist()).startswith("line 36")


@pytest.mark.parametrize("n, f, n_val", [(40, 0.1, 4), (40, 0.9, 36), (40, 0.4, 16), (40, 0.75, 30), (3, 0.5, 1),
                                          (2, 0.1, None), (2, 0.9, None)])
def test_split_follows_the_val_fraction(n, f, n_val):
    """Whole documents where both sides get some (every 1/f-th, the 1/f // 2-th of each, where 1/f is whole, as
    the rule always chose; spread evenly otherwise, f > 0.5 too); with too few documents (n_val None), the
    last f of the characters, cut at a line break: a two-document corpus used to give validation half of it."""
    docs = [(str(i), "".join(f"line {j} of document {i}\n" for j in range(100))) for i in range(n)]
    train, val = split_documents(docs, f)
    total = sum(len(t) for _, t in docs)
    got = sum(len(t) for _, t in val) / total
    assert "".join(t for _, t in train + val) != "" and sum(len(t) for _, t in train + val) == total
    if n_val is not None:
        assert len(val) == n_val and len(train) == n - n_val
        if f == 0.1:
            assert [name for name, _ in val] == ["5", "15", "25", "35"]
    else:
        assert abs(got - f) < 0.02, got  # lines are ~25 characters of ~2,500 a document
        assert all(t.endswith("\n") for _, t in train)


def test_prepare_into_its_corpus_directory_reads_the_same_corpus_again(tmp_path):
    """An --out inside a --text directory: a second prepare read the first one's merges.txt as a document."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in os.listdir(EXCERPT):
        (corpus / name).write_bytes(open(os.path.join(EXCERPT, name), "rb").read())
    first = prepare(str(corpus / "prepared"), texts=[str(corpus)], vocab_size=300, val_fraction=0.25)
    files = {f: (corpus / "prepared" / f).read_bytes() for f in os.listdir(corpus / "prepared")}
    assert prepare(str(corpus / "prepared"), texts=[str(corpus)], vocab_size=300, val_fraction=0.25) == first
    assert {f: (corpus / "prepared" / f).read_bytes() for f in os.listdir(corpus / "prepared")} == files


def test_a_file_named_twice_is_one_document(tmp_path):
    """A file given again (itself, or inside a given directory) was read twice: the same document in both splits."""
    hamlet = os.path.join(EXCERPT, "hamlet.txt")
    meta = prepare(str(tmp_path / "d"), texts=[EXCERPT, hamlet, os.path.join(EXCERPT, ".", "hamlet.txt")],
                   vocab_size=300, val_fraction=0.25)
    assert meta["documents"] == {"train": 3, "val": 1}
    meta = prepare(str(tmp_path / "d"), texts=[hamlet, hamlet], vocab_size=300, val_fraction=0.5)
    tok = GPT1Tokenizer.from_dir(str(tmp_path / "d"))
    split = {k: tok.decode(np.fromfile(tmp_path / "d" / f"{k}.bin", dtype=np.uint16)[:-1].tolist())
             for k in ("train", "val")}
    assert split["train"] + split["val"] == open(hamlet, encoding="utf-8").read()  # cut in two, not doubled


@pytest.mark.parametrize("f, empty", [(0.9999, "train"), (1e-17, "validation")])
def test_val_fraction_that_empties_a_split_is_refused(tmp_path, f, empty):
    """A corpus too small for the fraction's other side: 0 train tokens (a tokenizer trained on nothing) or 0
    val tokens were written and reported as a success."""
    doc = tmp_path / "one.txt"
    doc.write_text("".join(f"line {i} of the only play\n" for i in range(200)))
    with pytest.raises(DataError, match=f"--val-fraction {f} leaves the {empty} split of this corpus empty"):
        prepare(str(tmp_path / "d"), texts=[str(doc)], vocab_size=300, val_fraction=f)
    assert not os.path.exists(tmp_path / "d")


def test_windows_take_files_of_exactly_one_window(tmp_path):
    """A file of n tokens holds one window of n (it was refused, "33 tokens, fewer than one window of 33")."""
    np.arange(33, dtype=np.uint16).tofile(tmp_path / "val.bin")
    val = TokenFile(str(tmp_path), "val", "uint16")
    assert val.windows(np.random.default_rng(0), 2, 33).tolist() == [list(range(33))] * 2
    with pytest.raises(DataError, match="has 33 tokens, fewer than one window of 34"):
        val.windows(np.random.default_rng(0), 1, 34)


def test_training_refuses_a_vocabulary_smaller_than_its_alphabet_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be at least 261, got 10"):
        GPT1Tokenizer.train([os.path.join(EXCERPT, "tempest.txt")], 10)
    with pytest.raises(FileNotFoundError, match="nope.txt not found"):
        GPT1Tokenizer.train([str(tmp_path / "nope.txt")], 300)


def test_vocab_that_is_not_json_is_named(tmp_path):
    (tmp_path / "vocab.json").write_text("not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="vocab.json is not a JSON vocabulary"):
        GPT1Tokenizer.from_files(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


def prepare_cli(*args):
    return subprocess.run([sys.executable, "-m", "gpt1.cli", "prepare", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, check=False)


def test_cli_prepare(tmp_path):
    res = prepare_cli("--out", str(tmp_path / "d"), "--text", os.path.join(EXCERPT, "hamlet.txt"),
                      os.path.join(EXCERPT, "macbeth.txt"), "--vocab-size", "320")
    assert res.returncode == 0, res.stderr
    assert "vocab 320" in res.stdout
    assert sorted(os.listdir(tmp_path / "d")) == ["merges.txt", "meta.json", "train.bin", "val.bin", "vocab.json"]


def bad_corpus(tmp_path, kind):
    if kind == "missing":
        return str(tmp_path / "nowhere.txt"), "does not exist"
    if kind == "empty":
        (tmp_path / "empty.txt").write_text("")
        return str(tmp_path / "empty.txt"), "empty"
    if kind == "empty dir":
        (tmp_path / "dir").mkdir()
        return str(tmp_path / "dir"), "no .txt files"
    (tmp_path / "latin1.txt").write_bytes("Ophélie\n".encode("latin-1") * 10)
    return str(tmp_path / "latin1.txt"), "not UTF-8"


@pytest.mark.parametrize("kind", ["missing", "empty", "empty dir", "not utf-8"])
def test_bad_corpus_is_one_line_error_and_keeps_what_was_there(tmp_path, kind):
    out = tmp_path / "d"
    assert prepare_cli("--out", str(out), "--text", os.path.join(EXCERPT, "tempest.txt"),
                       "--vocab-size", "300").returncode == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    path, msg = bad_corpus(tmp_path, kind)
    res = prepare_cli("--out", str(out), "--text", path, "--vocab-size", "300")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], res.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


@pytest.mark.parametrize("args, msg", [(["--vocab-size", "100"], "at least 300"),
                                       (["--vocab-size", str(2**64)], f"at most {2**32}"),  # was OverflowError
                                       (["--val-fraction", "1.5"], "val-fraction"),
                                       (["--vocab", "v.json"], "together")])
def test_bad_prepare_flags(tmp_path, args, msg):
    res = prepare_cli("--out", str(tmp_path / "d"), "--text", EXCERPT, *args)
    assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_unprepared_data_dir_is_reported(tmp_path):
    with pytest.raises(DataError, match="not a prepared data directory"):
        load_meta(str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        TokenFile(str(tmp_path), "train", "uint16")


def test_bad_merges_file_is_one_line_error(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps(byte_level_vocab({})))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nq z9\n")
    res = prepare_cli("--out", str(tmp_path / "d"), "--text", EXCERPT, "--vocab", str(tmp_path / "vocab.json"),
                      "--merges", str(tmp_path / "merges.txt"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error:") and "are not a BPE vocabulary and its merges" in res.stderr
