"""GLUE-format tasks: the TSV readers, each task's input transformation and label set, and the metrics.

A task names its transformation (GPT-1 section 3.3, figure 1):
  classify    start, text, extract
  entail      start, premise, delim, hypothesis, extract
  similarity  both orders (start, a, delim, b, extract) and (start, b, delim, a, extract)
  choice      one (start, context, delim, answer_k, extract) per choice; the label is the right choice's index
Labels are strings from the task's label set, or a float score for the regression task STS-B.
The readers use GLUE's own conventions: tab-separated, no quoting, a header row except in CoLA's
train/dev files; an unlabelled test file keeps its `index` (or `id`) column for the submission file.
"""

import math
import os
from dataclasses import dataclass, replace

import numpy as np

from .errors import GPT1Error


@dataclass
class Example:
    text_a: str  # the text, premise, first sentence or multiple-choice context
    text_b: str | None = None  # the hypothesis or second sentence
    choices: list | None = None  # the candidate answers of a multiple-choice example
    label: str | float | int | None = None  # None in an unlabelled test file
    index: str = ""  # the row's id for the submission file
    where: str = ""  # FILE:LINE, for error messages


@dataclass
class Task:
    name: str  # GLUE's name, also the submission file's name (CoLA.tsv)
    kind: str  # classify | entail | similarity | choice
    labels: tuple | None  # the label set; None for regression, choice, and classify (read from train)
    columns: tuple  # header names of text_a[, text_b] (CoLA: column indices)
    label_column: str | int | None
    metrics: tuple  # names in METRICS; the first is the one reported as the task's score
    files: tuple = ("train.tsv", "dev.tsv", "test.tsv")
    header: bool = True  # CoLA's train/dev files have none (its test file does)
    width: int = 0  # fields per row of a file without a header
    regression: bool = False  # a float score (STS-B) instead of a label


TASKS = {
    "cola": Task("CoLA", "classify", ("0", "1"), (3,), 1, ("mcc", "accuracy"), header=False,
                 width=4),
    "sst2": Task("SST-2", "classify", ("0", "1"), ("sentence",), "label", ("accuracy",)),
    "mrpc": Task("MRPC", "similarity", ("0", "1"), ("#1 String", "#2 String"), "Quality", ("f1", "accuracy")),
    "qqp": Task("QQP", "similarity", ("0", "1"), ("question1", "question2"), "is_duplicate", ("f1", "accuracy")),
    "stsb": Task("STS-B", "similarity", None, ("sentence1", "sentence2"), "score", ("pearson", "spearman"),
                 regression=True),
    "rte": Task("RTE", "entail", ("entailment", "not_entailment"), ("sentence1", "sentence2"), "label",
                ("accuracy",)),
    "qnli": Task("QNLI", "entail", ("entailment", "not_entailment"), ("question", "sentence"), "label",
                 ("accuracy",)),
    "mnli": Task("MNLI-m", "entail", ("contradiction", "entailment", "neutral"), ("sentence1", "sentence2"),
                 "gold_label", ("accuracy",), files=("train.tsv", "dev_matched.tsv", "test_matched.tsv")),
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}


def get_task(name, text_column="", text_b_column="", label_column="", choice_columns=""):
    """The Task for --task; `classify` and `choice` are built from the column flags for any headed TSV."""
    key = ALIASES.get(name.lower(), name.lower())
    given = {"--text-column": text_column, "--text-b-column": text_b_column, "--label-column": label_column,
             "--choice-columns": choice_columns}
    takes = {"classify": ("--text-column", "--text-b-column", "--label-column"),
             "choice": ("--text-column", "--label-column", "--choice-columns")}.get(key, ())
    unused = [flag for flag, value in given.items() if value and flag not in takes]
    if unused and key in (*TASKS, "classify", "choice"):  # ignored, it would leave other columns read than asked
        raise GPT1Error(f"{', '.join(unused)} not used by --task {name}")
    if key in TASKS:
        return TASKS[key]
    if key == "classify":
        if not (text_column and label_column):
            raise GPT1Error("--task classify needs --text-column and --label-column")
        cols = (text_column, text_b_column) if text_b_column else (text_column,)
        return Task("classify", "entail" if text_b_column else "classify", None, cols, label_column,
                    ("accuracy", "f1", "mcc"))
    if key == "choice":
        if not (text_column and label_column and choice_columns):
            raise GPT1Error("--task choice needs --text-column, --choice-columns and --label-column")
        cols = (text_column, *[c.strip() for c in choice_columns.split(",")])
        if len(cols) < 3:  # a softmax over one choice is 1 whatever the model says: nothing would be learned
            raise GPT1Error(f"--choice-columns {choice_columns!r} names one answer column; a choice task needs two "
                            "or more")
        return Task("choice", "choice", None, cols, label_column, ("accuracy",))
    raise GPT1Error(f"unknown task {name!r}; choose one of {', '.join(TASKS)}, classify or choice")


def read_rows(path):
    """(line number, fields) of each non-empty row of a GLUE TSV file (tabs, no quoting)."""
    if not os.path.isfile(path):
        raise GPT1Error(f"task file {path} not found")
    with open(path, encoding="utf-8-sig", newline="") as f:  # a byte-order mark is not part of the first name
        try:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line.split("\t")
        except UnicodeDecodeError as e:
            raise GPT1Error(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def column_index(header, name, path):
    if isinstance(name, int):
        return name
    if name not in header:
        raise GPT1Error(f"{path}:1: no column {name!r} in the header ({', '.join(header)})")
    return header.index(name)


def read_examples(task, path, labelled=True):
    """The Examples of one TSV file; a row with the wrong number of fields is reported as FILE:LINE."""
    rows = read_rows(path)
    if task.header or not labelled:  # CoLA's test file has a header (index, sentence); its train/dev don't
        first = next(rows, None)
        if first is None:
            raise GPT1Error(f"{path} is empty")
        header = first[1]
        names = task.columns if task.header else ("sentence",)
        text_cols = [column_index(header, c, path) for c in names]
        label_col = column_index(header, task.label_column, path) if labelled else None
        id_col = next((header.index(c) for c in ("index", "id") if c in header), None)
        width = len(header)
    else:
        text_cols, label_col, id_col, width = list(task.columns), task.label_column, None, task.width
    examples = []
    for lineno, fields in rows:
        where = f"{path}:{lineno}"
        if len(fields) != width:
            raise GPT1Error(f"{where}: malformed row: {len(fields)} tab-separated fields, expected {width}")
        examples.append(make_example(task, fields, text_cols, label_col, id_col, len(examples), where))
    if not examples:
        raise GPT1Error(f"{path} holds no examples")
    return examples


def make_example(task, fields, text_cols, label_col, id_col, n, where):
    texts = [fields[i] for i in text_cols]
    label = fields[label_col].strip() if label_col is not None else None
    index = fields[id_col].strip() if id_col is not None else str(n)
    if task.kind == "choice":
        return Example(texts[0], choices=texts[1:], label=label, index=index, where=where)
    return Example(texts[0], texts[1] if len(texts) > 1 else None, label=label, index=index, where=where)


def check_labels(task, examples, labels):
    """Turn each example's label into its class index (or float score); labels outside the set are errors."""
    for ex in examples:
        if task.regression:
            try:
                ex.label = float(ex.label)
            except ValueError:
                raise GPT1Error(f"{ex.where}: label {ex.label!r} is not a number") from None
            if not math.isfinite(ex.label):
                raise GPT1Error(f"{ex.where}: label {ex.label!r} is not finite")
        elif task.kind == "choice":
            if not (ex.label.isdigit() and int(ex.label) < len(ex.choices)):
                raise GPT1Error(f"{ex.where}: label {ex.label!r} is not the index of one of the "
                                f"{len(ex.choices)} choices")
            ex.label = int(ex.label)
        else:
            if ex.label not in labels:
                raise GPT1Error(f"{ex.where}: label {ex.label!r} is not in {task.name}'s label set "
                                f"({', '.join(labels)})")
            ex.label = labels.index(ex.label)
    return examples


def label_set(task, train_examples):
    """The task's labels; a generic classify task takes the sorted labels of its train file."""
    if task.name != "classify":
        return task.labels
    labels = tuple(sorted({ex.label for ex in train_examples}))
    if len(labels) < 2:  # one class: the loss is 0 whatever the model says, nothing would be learned
        raise GPT1Error(f"{train_examples[0].where.rsplit(':', 1)[0]}: every example has the label {labels[0]!r}; "
                        "a classifier needs two or more")
    return labels


def fit_metrics(task, labels):
    """The task with the metrics that its label set allows: F1 of the class 1 means nothing among 3 or more."""
    if task.name == "classify" and len(labels) > 2:
        return replace(task, metrics=tuple(m for m in task.metrics if m != "f1"))
    return task


# ---- metrics: ours to keep the dependencies at numpy; each takes integer labels or float scores


def accuracy(pred, gold):
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1(pred, gold):
    """F1 of the positive class 1 (GLUE's for MRPC and QQP)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp, fp, fn = np.sum((pred == 1) & (gold == 1)), np.sum((pred == 1) & (gold != 1)), np.sum((pred != 1) & (gold == 1))
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def mcc(pred, gold):
    """Matthews correlation over any number of classes (Gorodkin's R_K; for two classes the usual
    (tp tn - fp fn) / sqrt(...)); 0 when the predictions or the labels are all of one class."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.union1d(pred, gold)
    p = np.array([np.sum(pred == c) for c in classes], dtype=np.float64)  # predicted per class
    t = np.array([np.sum(gold == c) for c in classes], dtype=np.float64)  # true per class
    n, correct = float(len(gold)), float(np.sum(pred == gold))
    denom = math.sqrt((n * n - p @ p) * (n * n - t @ t))
    return (correct * n - p @ t) / denom if denom else 0.0


def pearson(pred, gold):
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if pred.std() == 0 or gold.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, gold)[0, 1])


def ranks(x):
    """Ranks from 1, ties given their average rank (as Spearman's rho wants)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(pred, gold):
    return pearson(ranks(pred), ranks(gold))


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def evaluate(task, pred, gold):
    return {name: METRICS[name](pred, gold) for name in task.metrics}


def write_submission(path, task, labels, examples, pred):
    """GLUE's submission format: a header `index<TAB>prediction`, then one row per test example."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("index\tprediction\n")
        for ex, p in zip(examples, pred):
            value = f"{p:.4f}" if task.regression else (labels[p] if labels else str(p))
            f.write(f"{ex.index}\t{value}\n")
