"""Fine-tuning: input transformations, GLUE readers and metrics, L3 = L2 + lambda * L1, padding
invariance, convergence on a separable fixture, and a run under the DeepSpeed launcher on 2 ranks."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, free_port

from gpt1 import finetune, glue
from gpt1.errors import GPT1Error
from gpt1.finetune import Encoded, GPT1ForTask, collate, encode, transform
from gpt1.tokenizer import GPT1Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(ROOT, "tests", "data", "glue")
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def tok():
    return GPT1Tokenizer.train([os.path.join(ROOT, "tests", "data", "shakespeare", "tempest.txt")], 400)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A gpt1-tiny run pre-trained for 30 steps on the test corpus, shared by the tests below."""
    from gpt1.data import prepare

    d = tmp_path_factory.mktemp("pretrain")
    prepare(str(d / "data"), texts=[os.path.join(ROOT, "tests", "data", "shakespeare")], vocab_size=1024)
    cmd = [sys.executable, "-m", "gpt1.train", "--data", str(d / "data"), "--model", "gpt1-tiny", "--out",
           str(d / "run"), "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero0_bf16.json"),
           "--max-steps", "30", "--seq-len", "64", "--eval-interval", "30", "--log-interval", "10"]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return str(d / "run")


def run_finetune(args, launcher=False):
    prefix = ([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", free_port(), "--module",
               "gpt1.finetune"] if launcher else [sys.executable, "-m", "gpt1.finetune"])
    res = subprocess.run(prefix + args, cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---- input transformations


def test_transformations(tok):
    a, b, c1, c2 = (tok.encode(t) for t in ("Full fathom five", "thy father lies", "Of his bones", "are coral"))
    s, d, e = tok.start_id, tok.delim_id, tok.extract_id
    assert transform("classify", a, [], None, tok, 64) == ([[s, *a, e]], False)
    assert transform("entail", a, b, None, tok, 64) == ([[s, *a, d, *b, e]], False)
    assert transform("similarity", a, b, None, tok, 64) == ([[s, *a, d, *b, e], [s, *b, d, *a, e]], False)
    assert transform("choice", a, [], [c1, c2], tok, 64) == ([[s, *a, d, *c1, e], [s, *a, d, *c2, e]], False)


@pytest.mark.parametrize("kind", ["classify", "entail", "similarity", "choice"])
def test_truncation_keeps_special_tokens(tok, kind):
    long, short = tok.encode("Where the bee sucks, there suck I " * 20), tok.encode("Ariel sings")
    a, b = (short, long) if kind == "choice" else (long, short)  # choice: a short context, a long answer
    seqs, cut = transform(kind, a, b, [long, short], tok, 24)
    assert cut and len(seqs[0]) == 24
    for seq in seqs:
        assert len(seq) <= 24 and seq[0] == tok.start_id and seq[-1] == tok.extract_id
        assert seq.count(tok.delim_id) == (kind != "classify")
        if kind != "classify":  # the long part was cut, the short one kept whole
            assert short in (seq[seq.index(tok.delim_id) + 1:-1], seq[1:len(short) + 1])


def test_encode_reads_pairs_in_both_orders(tok):
    task = glue.get_task("mrpc")
    ex = glue.check_labels(task, glue.read_examples(task, os.path.join(GLUE, "MRPC", "train.tsv")), task.labels)
    enc, n_cut = encode(task, ex, tok, 128)
    a, b = tok.encode(ex[0].text_a), tok.encode(ex[0].text_b)
    s, d, e = tok.start_id, tok.delim_id, tok.extract_id
    assert n_cut == 0 and enc[0].seqs == [[s, *a, d, *b, e], [s, *b, d, *a, e]] and enc[0].label == 1


@pytest.mark.parametrize("kind", ["classify", "entail", "similarity", "choice"])
def test_shortest_max_len_keeps_a_token_of_each_part(tok, kind):
    long = tok.encode("Where the bee sucks, there suck I " * 4)
    n = finetune.min_len(kind)
    seqs, cut = transform(kind, long, long, [long, long], tok, n)
    assert cut and all(len(s) == n and s[0] == tok.start_id and s[-1] == tok.extract_id for s in seqs)
    parts = [s[1:-1] if kind == "classify" else (s[1:s.index(tok.delim_id)], s[s.index(tok.delim_id) + 1:-1])
             for s in seqs]
    assert all(p == long[:1] for p in parts) if kind == "classify" else all(p == (long[:1],) * 2 for p in parts)


@pytest.mark.parametrize("task,kind,max_len", [("sst2", "classify", 2), ("rte", "entail", 4), ("mrpc", "similarity", 1),
                                               ("classify", "classify", 1)])
def test_max_len_without_room_for_the_text_is_refused(tmp_path, capsys, task, kind, max_len):
    """Too short a --max-len crashed the truncation (pop from an empty list) or left a text part empty."""
    cols = ["--text-column", "sentence", "--label-column", "label"] if task == "classify" else []
    with pytest.raises(SystemExit) as e:
        finetune.main(["--task", task, *cols, "--data-dir", os.path.join(GLUE, "SST-2"), "--max-len", str(max_len),
                       "--init", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --max-len {max_len} leaves no room for the text of a {kind} example; give at least "
                   f"{3 if kind == 'classify' else 5}"]
    assert not (tmp_path / "o").exists()


# ---- readers, bad input, metrics


@pytest.mark.parametrize("name,path,n,first", [
    ("cola", "CoLA/train.tsv", 4, ("The sailors rowed the boat to the shore.", None, 1)),
    ("sst2", "SST-2/train.tsv", 128, ("the lady is bitter .", None, 0)),
    ("mrpc", "MRPC/train.tsv", 2, ("The council approved the new budget on Monday .",
                                   "On Monday the council voted to approve the new budget .", 1)),
    ("qqp", "QQP/dev.tsv", 2, ("How can I learn to bake bread?", "What is a good way to start baking bread?", 1)),
    ("stsb", "STS-B/train.tsv", 2, ("A child is riding a red bicycle.", "A kid rides a red bike.", 5.0)),
    ("rte", "RTE/train.tsv", 2, ("No tickets were left at the station.", "Tickets were left at the station.", 1)),
    ("qnli", "QNLI/train.tsv", 2, ("When did the bridge open?", "The bridge opened in 1932.", 0)),
    ("mnli", "MNLI/dev_matched.tsv", 3, ("The new rules are fair enough.",
                                         "Everybody loves the newest rules.", 2)),
])
def test_readers(name, path, n, first):
    task = glue.get_task(name)
    ex = glue.check_labels(task, glue.read_examples(task, os.path.join(GLUE, path)), task.labels)
    assert len(ex) == n and (ex[0].text_a, ex[0].text_b, ex[0].label) == first


def test_test_file_keeps_index():
    task = glue.get_task("cola")
    ex = glue.read_examples(task, os.path.join(GLUE, "CoLA", "test.tsv"), labelled=False)
    assert [(e.index, e.text_a, e.label) for e in ex] == [("0", "Caliban saw the ship.", None),
                                                          ("1", "Ship the saw Caliban.", None)]


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    """makedirs said only "[Errno 17] File exists", after DeepSpeed had started."""
    (tmp_path / "o").write_text("kept")
    with pytest.raises(SystemExit) as e:
        finetune.main(["--task", "sst2", "--data-dir", os.path.join(GLUE, "SST-2"), "--init", str(tmp_path / "none"),
                       "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'o'} is a file, not a directory to write into; choose another --out"]
    assert (tmp_path / "o").read_text() == "kept"


@pytest.mark.parametrize("flags,msg", [(["--train-examples", "0"], "--train-examples must be at least 1, got 0"),
                                       (["--dev-examples", "-5"], "--dev-examples must be at least 1, got -5")])
def test_corpus_task_refuses_example_counts_below_one(tmp_path, capsys, flags, msg):
    from gpt1 import corpus_task

    with pytest.raises(SystemExit) as e:
        corpus_task.main(["--data", os.path.join(ROOT, "tests", "data", "shakespeare"), "--out", str(tmp_path / "o"),
                          *flags])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"error: {msg}"]
    assert not (tmp_path / "o").exists()


def test_byte_order_mark_is_not_read_into_the_header(tmp_path):
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text("\ufeff" + read(os.path.join(GLUE, "MRPC", "train.tsv")), encoding="utf-8")
    task = glue.get_task("mrpc")
    assert glue.check_labels(task, glue.read_examples(task, str(mrpc)), task.labels)[0].label == 1
    test = tmp_path / "test.tsv"
    test.write_text("\ufeffindex\tsentence\n7\tCaliban saw the ship.\n", encoding="utf-8")
    ex = glue.read_examples(glue.get_task("cola"), str(test), labelled=False)
    assert [(e.index, e.text_a) for e in ex] == [("7", "Caliban saw the ship.")]


@pytest.mark.parametrize("name,flags,msg", [
    ("sst2", {"text_column": "text"}, "--text-column not used by --task sst2"),
    ("mrpc", {"label_column": "label", "choice_columns": "A,B"}, "--label-column, --choice-columns not used"),
    ("classify", {"text_column": "s", "label_column": "l", "choice_columns": "A,B"}, "--choice-columns not used"),
    ("choice", {"text_column": "s", "text_b_column": "t", "label_column": "l", "choice_columns": "A,B"},
     "--text-b-column not used by --task choice"),
    ("choice", {"text_column": "s", "label_column": "l", "choice_columns": "A"}, "names one answer column"),
])
def test_column_flags_that_the_task_would_ignore_are_refused(name, flags, msg):
    with pytest.raises(GPT1Error, match=msg):
        glue.get_task(name, **flags)


def test_generic_classify_needs_two_labels(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\nthe duke is merry .\tgood\nthe duke is kind .\tgood\n")
    task = glue.get_task("classify", text_column="sentence", label_column="label")
    with pytest.raises(GPT1Error, match=f"{train}: every example has the label 'good'"):
        glue.label_set(task, glue.read_examples(task, str(train)))


def test_generic_classify_takes_labels_from_train():
    task = glue.get_task("classify", text_column="sentence", label_column="label")
    train = glue.read_examples(task, os.path.join(GLUE, "SST-2", "train.tsv"))
    assert glue.label_set(task, train) == ("0", "1")


def test_choice_task_reads_answers_and_checks_the_index(tmp_path):
    f = tmp_path / "story.tsv"
    f.write_text("context\tA\tB\tlabel\nThe storm broke .\tThey ran inside .\tThey sunbathed .\t0\n"
                 "Ariel sang .\tAll slept .\tAll woke .\t2\n")
    task = glue.get_task("choice", text_column="context", choice_columns="A,B", label_column="label")
    ex = glue.read_examples(task, str(f))
    expected = ("The storm broke .", ["They ran inside .", "They sunbathed ."], "0")
    assert (ex[0].text_a, ex[0].choices, ex[0].label) == expected
    with pytest.raises(GPT1Error, match=f"{f}:3: label '2' is not the index of one of the 2 choices"):
        glue.check_labels(task, ex, None)


def test_malformed_row_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "train.tsv"
    lines = read(os.path.join(GLUE, "SST-2", "train.tsv")).splitlines()
    bad.write_text("\n".join(lines[:5] + ["a row without its label"] + lines[5:]) + "\n")
    with pytest.raises(GPT1Error, match=f"{bad}:6: malformed row"):
        glue.read_examples(glue.get_task("sst2"), str(bad))
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tA fine sentence.\ngj04\t0\t*\n")
    with pytest.raises(GPT1Error, match=f"{cola}:2: malformed row"):
        glue.read_examples(glue.get_task("cola"), str(cola))
    # through the command line: one `error:` line, exit status 2, before any DeepSpeed start
    with pytest.raises(SystemExit) as e:
        finetune.main(["--task", "sst2", "--train", str(bad), "--dev", str(bad), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:6: malformed row")


def test_unknown_label_is_an_error(tmp_path):
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\nthe duke is merry .\t1\nthe duke is vile .\tnegative\n")
    task = glue.get_task("sst2")
    with pytest.raises(GPT1Error, match=f"{dev}:3: label 'negative' is not in SST-2's label set"):
        glue.check_labels(task, glue.read_examples(task, str(dev)), task.labels)
    generic = glue.get_task("classify", text_column="sentence", label_column="label")
    train = glue.read_examples(generic, os.path.join(GLUE, "SST-2", "train.tsv"))
    with pytest.raises(GPT1Error, match="label 'negative' is not in"):
        glue.check_labels(generic, glue.read_examples(generic, str(dev)), glue.label_set(generic, train))
    stsb = glue.get_task("stsb")
    bad = tmp_path / "stsb.tsv"
    lines = read(os.path.join(GLUE, "STS-B", "train.tsv")).splitlines()
    bad.write_text("\n".join(lines[:2] + [lines[2].rsplit("\t", 1)[0] + "\thigh"]) + "\n")
    with pytest.raises(GPT1Error, match=f"{bad}:3: label 'high' is not a number"):
        glue.check_labels(stsb, glue.read_examples(stsb, str(bad)), None)


def test_metrics():
    gold, pred = [1, 1, 1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1, 1, 0]
    assert glue.accuracy(pred, gold) == 0.75
    assert glue.mcc(pred, gold) == pytest.approx(0.5)  # (3*3 - 1*1) / sqrt(4*4*4*4)
    assert glue.f1(pred, gold) == pytest.approx(0.75)
    assert glue.mcc([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction has no correlation
    assert glue.spearman([1, 2, 2, 3], [10, 20, 20, 40]) == pytest.approx(1.0)
    assert glue.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert glue.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    assert list(glue.ranks([3, 1, 3, 2])) == [3.5, 1.0, 3.5, 2.0]
    # three classes: (correct * n - sum_k pred_k true_k) / sqrt((n^2 - sum pred_k^2)(n^2 - sum true_k^2))
    assert glue.mcc([0, 1, 2, 2, 1], [0, 2, 1, 2, 1]) == pytest.approx((3 * 5 - 9) / 16)
    assert glue.mcc([2, 2, 2], [0, 1, 2]) == 0.0


def test_f1_of_class_1_is_not_reported_for_three_labels():
    task = glue.get_task("classify", text_column="sentence", label_column="label")
    assert glue.fit_metrics(task, ("a", "b")).metrics == ("accuracy", "f1", "mcc")
    assert glue.fit_metrics(task, ("a", "b", "c")).metrics == ("accuracy", "mcc")
    assert glue.fit_metrics(glue.get_task("mnli"), glue.TASKS["mnli"].labels).metrics == ("accuracy",)


def test_epoch_order_is_seeded_and_fills_the_last_batch():
    a, b = finetune.epoch_order(10, 4, 42, 0), finetune.epoch_order(10, 4, 42, 0)
    assert (a == b).all() and len(a) == 12 and set(a) == set(range(10))
    assert not (finetune.epoch_order(10, 4, 42, 1)[:10] == a[:10]).all()
    # a batch more than twice the examples: one full batch, every example in it two or three times
    big = finetune.epoch_order(12, 64, 42, 0)
    assert len(big) == 64 and sorted(np.bincount(big, minlength=12).tolist()) == [5] * 8 + [6] * 4


def test_out_holding_the_init_or_a_pretraining_run_is_refused(pretrained, tmp_path):
    """--out that is --init, or holds a pre-training run or an HF export, would lose it: refused before anything
    is written; a fine-tuning run's --out is written over (a rerun)."""
    from types import SimpleNamespace

    from gpt1.errors import GPT1Error

    for out, msg in ((pretrained, "is the --init directory"), (tmp_path / "hf", "holds a Hugging Face export")):
        with pytest.raises(GPT1Error, match=msg):
            if out != pretrained:
                os.makedirs(out)
                (out / "config.json").write_text(json.dumps({"model_type": "openai-gpt"}))
            finetune.check_out(SimpleNamespace(out=str(out), init=pretrained), glue.get_task("sst2"))
    with pytest.raises(GPT1Error, match="holds a pre-training run"):
        finetune.check_out(SimpleNamespace(out=pretrained, init=str(tmp_path / "hf")), glue.get_task("sst2"))
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "config.json").write_text(json.dumps({"finetune": {}, "model": {}}))
    run = SimpleNamespace(out=str(tmp_path / "ft"), init=pretrained, data_dir="", train="t.tsv", dev="d.tsv", test="")
    finetune.check_out(run, glue.get_task("sst2"))
    # the test file kept in --out under the submission's name would be replaced by the predictions
    shutil.copy(os.path.join(GLUE, "SST-2", "test.tsv"), tmp_path / "ft" / "SST-2.tsv")
    run.test = str(tmp_path / "ft" / "SST-2.tsv")
    with pytest.raises(GPT1Error, match="SST-2.tsv is a task file and would be written over"):
        finetune.check_out(run, glue.get_task("sst2"))


# ---- the model: losses and padding


def task_model(pretrained, kind, n_out):
    from gpt1.checkpoint import load_run

    base, tok = load_run(pretrained)
    torch.manual_seed(0)
    return GPT1ForTask(base, kind, n_out).eval(), tok


def items_for(tok, kind, texts, labels):
    return [Encoded(transform(kind, tok.encode(a), tok.encode(b), [tok.encode(c) for c in b.split("|")],
                              tok, 128)[0], y) for (a, b), y in zip(texts, labels)]


TEXTS = [("the duke .", "my lord|the queen"), ("o , thy father is most true and noble !", "she|he is"),
         ("i think", "the night is dreadful and the sea is vile|x")]


@pytest.mark.parametrize("kind,regression", [("classify", False), ("entail", False), ("similarity", True)])
def test_lm_coef_gives_l3_as_defined(pretrained, kind, regression):
    model, tok = task_model(pretrained, kind, 1 if regression else 2)
    items = items_for(tok, kind, TEXTS, [0.5, 4.0, 2.5] if regression else [1, 0, 1])
    ids, extract, lm_labels, y = collate(items, tok.pad_id, regression)
    with torch.no_grad():
        logits, _ = model(ids, extract)
        l2 = F.mse_loss(logits.squeeze(-1), y) if regression else F.cross_entropy(logits, y)
        # L1 by hand: the LM's next-token loss over start..extract of every sequence, nothing else
        hidden = model.transformer.hidden_states(ids.flatten(0, 1))
        flat, ext = ids.flatten(0, 1), extract.flatten()
        terms = [F.cross_entropy(model.transformer.lm_logits(hidden[i, :ext[i]]), flat[i, 1:ext[i] + 1],
                                 reduction="sum") for i in range(len(flat))]
        l1 = sum(terms) / int(ext.sum())
        l3_0, _, l1_0 = finetune.losses(model, ids, extract, lm_labels, y, 0.0, regression)
        l3_5, _, l1_5 = finetune.losses(model, ids, extract, lm_labels, y, 0.5, regression)
    assert l1_0 is None
    assert_close(l3_0, l2, 1e-6, 1e-6, "L3 with lambda 0")
    assert_close(l1_5, l1, 1e-5, 1e-5, "L1")
    assert_close(l3_5, l2 + 0.5 * l1, 1e-5, 1e-5, "L3 with lambda 0.5")
    assert abs(l3_5 - l3_0 - 0.5 * l1) < 1e-5


@pytest.mark.parametrize("kind", ["classify", "entail", "similarity", "choice"])
def test_padding_does_not_change_scores(pretrained, kind):
    model, tok = task_model(pretrained, kind, 3)
    items = items_for(tok, kind, TEXTS, [0, 1, 2])
    ids, extract, lm_labels, _ = collate(items, tok.pad_id)
    with torch.no_grad():
        batched, l1 = model(ids, extract, lm_labels)
        more = F.pad(ids, (0, 29), value=tok.pad_id)  # 29 more pad columns on the right
        padded, l1_padded = model(more, extract, F.pad(lm_labels, (0, 29), value=-100))
        alone = torch.cat([model(*collate([it], tok.pad_id)[:2])[0] for it in items])  # no padding at all
    assert ids.shape[-1] > min(len(s) for it in items for s in it.seqs)  # the batch was padded
    assert_close(padded, batched, 1e-5, 1e-5, "scores with extra padding")
    assert_close(alone, batched, 1e-5, 1e-5, "scores with no padding")
    assert_close(l1_padded, l1, 1e-6, 1e-6, "L1 with extra padding")


# ---- end to end


def test_finetune_reaches_high_dev_accuracy(pretrained, tmp_path):
    out = tmp_path / "sst2"
    d = os.path.join(GLUE, "SST-2")
    run_finetune(["--init", pretrained, "--task", "sst2", "--data-dir", d, "--test", os.path.join(d, "test.tsv"),
                  "--out", str(out), "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero0_bf16.json"),
                  "--lr", "1e-3", "--epochs", "8", "--batch-size", "8"])
    metrics = json.loads(read(out / "metrics.json"))
    assert metrics["dev"]["accuracy"] >= 0.9, metrics["history"]
    rows = read(out / "SST-2.tsv").splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 9
    assert all(r.split("\t")[0] == str(i) and r.split("\t")[1] in ("0", "1") for i, r in enumerate(rows[1:]))
    assert {"transformer.tokens_embed.weight", "head.linear.weight"} <= set(torch.load(out / "model.pt"))


def test_finetune_under_deepspeed_launcher(pretrained, tmp_path):
    out, d = tmp_path / "classify", tmp_path / "data"
    shutil.copytree(os.path.join(GLUE, "SST-2"), d)
    run_finetune(["--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero2_bf16.json"), "--init", pretrained,
                  "--task", "classify", "--text-column", "sentence", "--label-column", "label",
                  "--train", str(d / "train.tsv"), "--dev", str(d / "dev.tsv"), "--test", str(d / "test.tsv"),
                  "--out", str(out), "--lr", "1e-3", "--epochs", "2", "--batch-size", "16"], launcher=True)
    cfg, metrics = json.loads(read(out / "config.json")), json.loads(read(out / "metrics.json"))
    assert cfg["world_size"] == 2 and cfg["deepspeed"]["train_micro_batch_size_per_gpu"] == 8
    assert metrics["steps"] == 16 and [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert set(metrics["dev"]) == {"accuracy", "f1", "mcc"}
    rows = [json.loads(r) for r in read(out / "metrics.jsonl").splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert len(read(out / "classify.tsv").splitlines()) == 9


def test_init_from_run_or_hf_directory(pretrained, tmp_path):
    from gpt1.hf import save_hf

    model, tok = finetune.load_init(pretrained)
    save_hf(model, str(tmp_path / "hf"), tok)
    hf_model, hf_tok = finetune.load_init(str(tmp_path / "hf"))
    ids = torch.tensor([[tok.start_id, *tok.encode("Full fathom five"), tok.extract_id]])
    assert hf_tok.extract_id == tok.extract_id
    with torch.no_grad():
        assert_close(hf_model.hidden_states(ids), model.hidden_states(ids), 1e-5, 1e-5, "hidden states")
    grown = finetune.resize_token_embeddings(model, tok.vocab_size + 5)  # HF's vocabulary lacks our tokens
    assert grown.tokens_embed.weight.shape[0] == grown.config.vocab_size == tok.vocab_size + 5
    with torch.no_grad():
        assert_close(grown.hidden_states(ids), hf_model.hidden_states(ids), 1e-5, 1e-5, "old rows kept")


@pytest.mark.parametrize("flags,msg", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--batch-size", "-4"], "--batch-size must be at least 1"),
    (["--warmup", "1.5"], "--warmup must be in [0.0, 1.0], got 1.5"),
    (["--lm-coef", "-0.5"], "--lm-coef must be at least 0.0"),
    (["--clf-dropout", "2"], "--clf-dropout must be in [0.0, 1.0]"),
    (["--log-interval", "0"], "--log-interval must be at least 1"),
    (["--lm-coef", "inf"], "--lm-coef must be at least 0.0, got inf"),  # every step's loss inf, all skipped
    (["--lr", "inf"], "--lr must be at least 0.0, got inf"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),  # numpy's seed refused it after DeepSpeed started
])
def test_flags_out_of_range_are_refused(flags, msg):
    import re

    from gpt1.errors import GPT1Error
    from gpt1.finetune import parse_args

    with pytest.raises(GPT1Error, match=re.escape(msg)):
        parse_args(flags)
