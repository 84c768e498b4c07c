"""Fine-tune GPT-1 on a GLUE-format task (Radford et al. 2018, sections 3.2-3.3) through DeepSpeed.

Single process:   python -m gpt1.finetune --init runs/demo --task cola --data-dir glue/CoLA --out runs/cola
Several ranks:    deepspeed --num_gpus 2 --module gpt1.finetune --deepspeed_config ds_configs/zero2_bf16.json ...

A linear head W_y reads the final hidden state at each sequence's extract token (dropout before it).
The loss is L3 = L2 + lambda * L1: L2 the task's (cross-entropy, or MSE for STS-B), L1 the mean
next-token loss over the task's own tokens (start through extract; padding ignored), computed by
model.lm_loss and so by the fused kernels when the model is configured for them. Batches are right-
padded: attention is causal, so no position up to the extract token sees the padding.

OUT/ receives config.json, metrics.jsonl (train loss rows, dev metrics per epoch), metrics.json (the
final dev metrics), <Task>.tsv (test predictions in GLUE's submission format, with --test), model.pt
(the fine-tuned weights, head included) and tokenizer/. Runs are short: there are no mid-run checkpoints.
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import glue
from .checkpoint import load_run, refuse_to_write_over, save_weights, write_json
from .errors import GPT1Error, cli_errors
from .runtime import (
    all_reduce,
    build_engine,
    check_compile,
    check_kernels,
    check_ranges,
    compile_module,
    init_distributed,
    lean_checks,
    load_ds_config,
    log_row,
    parse_dataclass,
    seed_everything,
    zero_stage,
)
from .tokenizer import GPT1Tokenizer


@dataclass
class FinetuneConfig:
    init: str = "runs/demo"  # a pre-training run directory, or a Hugging Face openai-gpt directory
    task: str = "cola"  # cola, sst2, mrpc, qqp, stsb, rte, qnli, mnli; or classify / choice with the column flags
    data_dir: str = ""  # a GLUE task directory holding the task's train/dev(/test) files
    train: str = ""  # the train TSV (default DATA_DIR/train.tsv)
    dev: str = ""  # the labelled dev TSV that is evaluated (default DATA_DIR/dev.tsv, MNLI's dev_matched.tsv)
    test: str = ""  # an unlabelled TSV whose predictions are written to OUT/<Task>.tsv
    text_column: str = ""  # classify/choice: the text (or context) column
    text_b_column: str = ""  # classify: a second text column, which makes it an entailment-style pair
    label_column: str = ""  # classify/choice: the label column (choice: the right choice's 0-based index)
    choice_columns: str = ""  # choice: comma-separated answer columns
    out: str = "runs/finetune"  # output directory
    deepspeed_config: str = "ds_configs/zero0_autocast_bf16.json"  # a DeepSpeed JSON config, or a ds_configs/ name
    epochs: int = 3  # the paper's
    batch_size: int = 32  # examples per optimizer step over all ranks (the paper's 32)
    gradient_accumulation_steps: int = 1  # the micro batch is batch_size / (ranks x this)
    lr: float = 6.25e-5  # the paper's
    warmup: float = 0.002  # fraction of the steps warmed up linearly; then a linear decay to 0
    weight_decay: float = 0.01  # on matrices and embeddings, as in the paper's code
    lm_coef: float = 0.5  # lambda, the weight of the auxiliary LM loss; 0 turns it off
    clf_dropout: float = 0.1  # dropout before the classifier head
    max_len: int = 0  # tokens per sequence; 0 means the model's n_positions
    attn_impl: str = ""  # overrides the model's attention kernel (eager, sdpa, triton, auto)
    loss_impl: str = ""  # overrides the model's loss kernel (eager, triton, triton_linear, auto)
    norm_impl: str = ""  # overrides the model's residual dropout + add + LayerNorm kernel (eager, triton)
    mlp_impl: str = ""  # overrides the model's MLP bias + GELU kernel (eager, triton)
    residual_in_fp32: bool | None = None  # fp32 residual stream under autocast (no: bf16, fewer bytes); default: model
    log_interval: int = 10  # optimizer steps between train-loss rows
    seed: int = 42  # data order, head init and dropout
    compile: bool | None = None  # torch.compile the model; default: on a CUDA GPU under ZeRO 0-2
    compile_mode: str = "default"  # torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune, ...
    inline_kernels: bool = False  # compile through our kernels' operators: Inductor launches their Triton kernels


def parse_args(argv=None):
    run = parse_dataclass(FinetuneConfig, argv, "gpt1 finetune", "Fine-tune GPT-1 on a GLUE-format task.")
    check_ranges(run, epochs=(1, None), lr=(0.0, None), batch_size=(1, None), gradient_accumulation_steps=(1, None),
                 warmup=(0.0, 1.0), weight_decay=(0.0, None), lm_coef=(0.0, None), clf_dropout=(0.0, 1.0),
                 max_len=(0, None), log_interval=(1, None), seed=(0, 2**32 - 1))  # numpy's global seed's range
    return run


# ---- input transformations (figure 1): token id lists of one example, special tokens kept whole


def truncate(parts, budget):
    """Shorten the longest text part one token at a time until all fit in `budget`; (parts, whether cut)."""
    parts, cut = [list(p) for p in parts], False
    while sum(map(len, parts)) > budget:
        max(parts, key=len).pop()
        cut = True
    return parts, cut


def min_len(kind):
    """The shortest --max-len that leaves a token of every text part beside the special tokens."""
    return 3 if kind == "classify" else 5


def transform(kind, a, b, choices, tok, max_len):
    """The sequences of one example (already tokenized parts): one, two (similarity) or one per choice."""
    s, d, e = tok.start_id, tok.delim_id, tok.extract_id
    if kind == "classify":
        (a,), cut = truncate([a], max_len - 2)
        return [[s, *a, e]], cut
    if kind == "entail":
        (a, b), cut = truncate([a, b], max_len - 3)
        return [[s, *a, d, *b, e]], cut
    if kind == "similarity":  # no natural order: both, their final states added before the head
        (a, b), cut = truncate([a, b], max_len - 3)
        return [[s, *a, d, *b, e], [s, *b, d, *a, e]], cut
    if kind == "choice":
        seqs, cut = [], False
        for c in choices:
            (x, y), c_cut = truncate([a, c], max_len - 3)
            seqs.append([s, *x, d, *y, e])
            cut |= c_cut
        return seqs, cut
    raise ValueError(f"unknown transformation {kind!r}")


@dataclass
class Encoded:
    seqs: list  # token id lists, S of them (1; 2 for similarity; one per choice)
    label: int | float | None


def encode(task, examples, tok, max_len):
    """Encoded examples and how many had their text cut to fit max_len."""
    texts = [t for ex in examples for t in [ex.text_a, ex.text_b or "", *(ex.choices or [])]]
    ids, out, n_cut, i = tok.encode_batch(texts), [], 0, 0
    for ex in examples:
        n = 2 + len(ex.choices or [])
        a, b, choices = ids[i], ids[i + 1], ids[i + 2:i + n]
        i += n
        seqs, cut = transform(task.kind, a, b, choices, tok, max_len)
        out.append(Encoded(seqs, ex.label))
        n_cut += cut
    return out, n_cut


def collate(items, pad_id, regression=False):
    """Right-pad a batch: ids (B, S, T); the extract token's position (B, S); LM labels (B, S, T),
    labels[..., t] the token after t over the task's tokens, -100 on the padding; targets (B,)."""
    B, S = len(items), len(items[0].seqs)
    T = max(len(s) for it in items for s in it.seqs)
    ids = torch.full((B, S, T), pad_id, dtype=torch.long)
    lm_labels = torch.full((B, S, T), -100, dtype=torch.long)
    extract = torch.empty((B, S), dtype=torch.long)
    for i, it in enumerate(items):
        for j, s in enumerate(it.seqs):
            ids[i, j, :len(s)] = torch.tensor(s)
            lm_labels[i, j, :len(s) - 1] = torch.tensor(s[1:])
            extract[i, j] = len(s) - 1
    y = None
    if items[0].label is not None:
        y = torch.tensor([it.label for it in items], dtype=torch.float32 if regression else torch.long)
    return ids, extract, lm_labels, y


# ---- the model: the pre-trained decoder and the task head


class ClassifierHead(nn.Module):
    """W_y on a final hidden state, dropout before it (section 3.2)."""

    def __init__(self, n_embd, n_out, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(n_embd, n_out)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h):
        return self.linear(self.dropout(h))


class GPT1ForTask(nn.Module):
    def __init__(self, transformer, kind, n_out, dropout=0.1):
        super().__init__()
        self.transformer, self.kind = transformer, kind
        self.head = ClassifierHead(transformer.config.n_embd, 1 if kind == "choice" else n_out, dropout)

    def forward(self, ids, extract, lm_labels=None):
        """ids (B, S, T); extract (B, S). Returns the task logits, (B, n_out) or (B, S) for multiple
        choice, and L1 over lm_labels (None when not given)."""
        B, S, T = ids.shape
        hidden = self.transformer.hidden_states(ids.view(B * S, T))  # (B*S, T, C)
        h = hidden[torch.arange(B * S, device=ids.device), extract.reshape(-1)].view(B, S, -1)  # (B, S, C)
        if self.kind == "similarity":
            logits = self.head(h.sum(1))  # the two orders' final states added
        elif self.kind == "choice":
            logits = self.head(h).squeeze(-1)  # a score per choice, softmaxed over S by the loss
        else:
            logits = self.head(h[:, 0])
        l1 = None if lm_labels is None else self.transformer.lm_loss(hidden, lm_labels.view(B * S, T))[0]
        return logits, l1


def task_loss(logits, y, regression):
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), y)
    return F.cross_entropy(logits.float(), y)


def losses(model, ids, extract, lm_labels, y, lm_coef, regression):
    """(L3, L2, L1) with L3 = L2 + lm_coef * L1; L1 is not computed (None) when lm_coef is 0."""
    logits, l1 = model(ids, extract, lm_labels if lm_coef else None)
    l2 = task_loss(logits, y, regression)
    return (l2 + lm_coef * l1 if lm_coef else l2), l2, l1


def resize_token_embeddings(model, vocab_size):
    """Grow the tied token embedding to `vocab_size` rows: the new ones (the task's special tokens,
    absent from HF's openai-gpt vocabulary) are learned from N(0, initializer_range)."""
    old = model.tokens_embed
    if vocab_size <= old.num_embeddings:
        return model
    new = nn.Embedding(vocab_size, old.embedding_dim)
    nn.init.normal_(new.weight, std=model.config.initializer_range)
    new.weight.data[:old.num_embeddings] = old.weight.data
    model.tokens_embed = new
    model.config.vocab_size = vocab_size
    return model


def load_init(path):
    """(model, tokenizer) from a pre-training run directory or from an HF openai-gpt directory."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise GPT1Error(f"--init {path} is not a directory")
    try:
        with open(cfg_path) as f:
            ours = "model" in json.load(f)
    except (OSError, ValueError):
        ours = False
    if ours:
        model, tok = load_run(path)
    else:
        from .hf import load_hf

        model, tok = load_hf(path), GPT1Tokenizer.from_dir(path)
    return resize_token_embeddings(model, tok.vocab_size), tok


# ---- data: files, order, sharding


def task_files(run, task):
    d = run.data_dir
    train = run.train or (os.path.join(d, task.files[0]) if d else "")
    dev = run.dev or (os.path.join(d, task.files[1]) if d else "")
    test = run.test or ""
    if not (train and dev):
        raise GPT1Error("give --data-dir, or --train and --dev")
    return train, dev, test


def read_task(run, task):
    """Train, dev and (optional) test examples, labels checked; all bad input is found before any rank starts."""
    train_file, dev_file, test_file = task_files(run, task)
    train, dev = glue.read_examples(task, train_file), glue.read_examples(task, dev_file)
    labels = glue.label_set(task, train)
    glue.check_labels(task, train, labels)
    glue.check_labels(task, dev, labels)
    test = glue.read_examples(task, test_file, labelled=False) if test_file else []
    return labels, train, dev, test


def check_out(run, task):
    """Refuse an --out that holds --init or another kind of run (a fine-tuning run's is written over), or whose
    submission file would write over a task file."""
    if os.path.isdir(run.out) and os.path.exists(run.init) and os.path.samefile(run.out, run.init):
        raise GPT1Error(f"--out {run.out} is the --init directory; write the fine-tuned model elsewhere")
    refuse_to_write_over(run.out, ("fine-tuning",), "choose another --out")
    submission = os.path.join(run.out, f"{task.name}.tsv")
    for f in task_files(run, task):
        if os.path.isfile(f) and os.path.isfile(submission) and os.path.samefile(f, submission):
            raise GPT1Error(f"{submission} is a task file and would be written over by the test predictions; "
                            "choose another --out")


def epoch_order(n, batch, seed, epoch):
    """The example indices of one epoch, shuffled by (seed, epoch) alike on every rank; the last batch
    is filled up from the start of the order (over again, for a batch larger than the examples) so that every
    rank gets full micro-batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return np.resize(order, -(-n // batch) * batch)


def ds_config(run, world):
    gas = max(1, run.gradient_accumulation_steps)
    if run.batch_size % (world * gas):
        raise GPT1Error(f"--batch-size {run.batch_size} is not divisible by {world} rank(s) x "
                        f"{gas} accumulation steps")
    return load_ds_config(run.deepspeed_config, world, run.batch_size // (world * gas), gas)


def lr_lambda(total, warmup_frac):
    warmup = max(1, math.ceil(warmup_frac * total))

    def factor(step):  # multiplier of the peak lr after `step` optimizer steps
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


@torch.no_grad()
def predict(engine, items, micro, device, pad_id):
    """The float logits of `items` in order: each rank scores an equal share (ZeRO-3 needs every rank in
    every forward), then the shares are gathered."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per = math.ceil(len(items) / world)
    idx = list(range(len(items))) + [len(items) - 1] * (per * world - len(items))
    mine = idx[rank * per:(rank + 1) * per]
    engine.module.eval()
    scores = []
    for i in range(0, per, micro):
        ids, extract, _, _ = collate([items[j] for j in mine[i:i + micro]], pad_id)
        scores.append(engine(ids.to(device), extract.to(device))[0].float().cpu())
    engine.module.train()
    shares = [None] * world
    dist.all_gather_object(shares, (mine, torch.cat(scores)))
    out = torch.empty(len(items), *shares[0][1].shape[1:])
    for m, s in shares:
        out[m] = s
    return out


def predictions(scores, regression):
    return scores[:, 0].tolist() if regression else scores.argmax(-1).tolist()


def evaluate(engine, task, dev, micro, device, pad_id):
    pred = predictions(predict(engine, dev, micro, device, pad_id), task.regression)
    return glue.evaluate(task, pred, [it.label for it in dev])


def format_metrics(m):
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items())


@cli_errors
def main(argv=None):
    from tqdm import tqdm

    run = parse_args(argv)
    task = glue.get_task(run.task, run.text_column, run.text_b_column, run.label_column, run.choice_columns)
    if run.max_len and run.max_len < min_len(task.kind):
        raise GPT1Error(f"--max-len {run.max_len} leaves no room for the text of a {task.kind} example; "
                        f"give at least {min_len(task.kind)}")
    labels, train_ex, dev_ex, test_ex = read_task(run, task)
    task = glue.fit_metrics(task, labels)
    check_compile(run.compile, run.compile_mode, run.inline_kernels)
    check_out(run, task)
    rank, world, device = init_distributed()
    ds, max_grad_norm = lean_checks(ds_config(run, world), world)
    base, tok = load_init(run.init)
    base.set_impl(run.attn_impl or None, run.loss_impl or None, run.norm_impl or None, run.residual_in_fp32,
                  run.mlp_impl or None)
    check_kernels(base.config, device)
    max_len = run.max_len or base.config.n_positions
    if max_len > base.config.n_positions:
        raise GPT1Error(f"--max-len {max_len} is longer than the model's n_positions={base.config.n_positions}")
    (train, n_cut), (dev, dev_cut), (test, test_cut) = (encode(task, e, tok, max_len) for e in (train_ex, dev_ex,
                                                                                                   test_ex))
    if rank == 0 and n_cut + dev_cut + test_cut:
        print(f"{n_cut} train, {dev_cut} dev and {test_cut} test examples are longer than {max_len} tokens: "
              "their text was cut to fit (the special tokens are kept)", flush=True)

    seed_everything(run.seed)  # the same head on every rank
    regression = task.regression
    model = GPT1ForTask(base.train(), task.kind, 1 if regression else len(labels or ()), run.clf_dropout)
    total = run.epochs * math.ceil(len(train) / run.batch_size)
    engine, _, scheduler = build_engine(
        model, ds, lr=run.lr, weight_decay=run.weight_decay, lr_lambda=lr_lambda(total, run.warmup),
        max_grad_norm=max_grad_norm,
        tied_weight=model.transformer.tokens_embed.weight)  # L1's LM head
    compile_module(engine, run.compile, zero_stage(ds), run.compile_mode, run.inline_kernels)
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    torch.manual_seed(run.seed + 1 + rank)  # dropout masks differ across ranks

    metrics_path = os.path.join(run.out, "metrics.jsonl")
    if rank == 0:
        os.makedirs(run.out, exist_ok=True)
        open(metrics_path, "w").close()
        write_json(os.path.join(run.out, "config.json"), {
            "finetune": vars(run), "task": {**vars(task), "labels": labels}, "model": base.config.to_dict(),
            "deepspeed": ds, "world_size": world,
            "examples": {"train": len(train), "dev": len(dev), "test": len(test)}})
        print(f"{task.name} ({task.kind}): {len(train)} train / {len(dev)} dev examples; {world} rank(s), micro "
              f"batch {micro} x accumulation {gas}; {total} steps; lambda {run.lm_coef}", flush=True)
    t0, step = time.time(), 0
    bar = tqdm(total=total, disable=rank != 0, dynamic_ncols=True, file=sys.stdout)
    history = []
    for epoch in range(run.epochs):
        order = epoch_order(len(train), micro * gas * world, run.seed, epoch)
        for start in range(0, len(order), micro * gas * world):
            sums = torch.zeros(3, device=device)  # L3, L2, L1 summed over the micro-batches, on the device
            lr = scheduler.get_last_lr()[0]  # this step's (the scheduler steps with the optimizer)
            for j in range(gas):  # this rank's micro-batch j of the global batch
                lo = start + (j * world + rank) * micro
                ids, extract, lm_labels, y = collate([train[k] for k in order[lo:lo + micro]], tok.pad_id, regression)
                l3, l2, l1 = losses(engine, ids.to(device), extract.to(device), lm_labels.to(device), y.to(device),
                                    run.lm_coef, regression)
                engine.backward(l3)
                engine.step()
                sums += torch.stack([l3.detach(), l2.detach(), l1.detach() if l1 is not None else l2.new_zeros(())])
            step += 1
            bar.update(1)
            if step % run.log_interval == 0 or step == total:
                l3, l2, l1 = (v / (world * gas) for v in all_reduce(sums.tolist(), device))
                if rank == 0:
                    log_row(metrics_path, {"step": step, "loss": l3, "task_loss": l2, "lm_loss": l1,
                                           "lr": lr})
                    bar.set_postfix(loss=f"{l3:.3f}")
        m = evaluate(engine, task, dev, micro, device, tok.pad_id)
        history.append({"epoch": epoch + 1, "step": step, **{f"dev_{k}": v for k, v in m.items()}})
        if rank == 0:
            log_row(metrics_path, history[-1])
            bar.write(f"epoch {epoch + 1}: dev {format_metrics(m)}")
    bar.close()
    elapsed = time.time() - t0
    if test:
        pred = predictions(predict(engine, test, micro, device, tok.pad_id), regression)
        if rank == 0:
            glue.write_submission(os.path.join(run.out, f"{task.name}.tsv"), task, labels, test_ex, pred)
    save_weights(engine, SimpleNamespace(out=run.out), rank)
    if rank == 0:
        tok.save(os.path.join(run.out, "tokenizer"))
        result = {"task": task.name, "metric": task.metrics[0], "dev": m, "history": history,
                  "dev_examples": len(dev), "train_examples": len(train), "steps": total, "train_time_s": elapsed}
        write_json(os.path.join(run.out, "metrics.json"), result)
        print(f"{task.name} dev ({len(dev)} examples): {format_metrics(m)}; {elapsed:.0f} s; "
              f"wrote {os.path.join(run.out, 'metrics.json')}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
