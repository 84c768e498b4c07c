"""The `gpt1` command: prepare, train, finetune, generate, export-hf, metrics, checkpoint."""

import argparse
import json
import os
import sys

from .errors import GPT1Error, cli_errors

USAGE = """usage: gpt1 <command> [options]

commands:
  prepare     tokenize a corpus (Shakespeare by default) into a data directory
  train       pre-train (same flags as `python -m gpt1.train`; use the deepspeed launcher for several ranks)
  finetune    fine-tune on a GLUE-format task (same flags as `python -m gpt1.finetune`)
  generate    sample text from a run directory
  export-hf   write a run as a Hugging Face OpenAIGPTLMHeadModel directory
  metrics     summarize a run's metrics.jsonl
  checkpoint  `info RUN`: a run's checkpoints; `convert RUN`: one as a DeepSpeed universal checkpoint

`gpt1 <command> --help` describes each."""


def add_run_argument(parser, help="a run directory written by gpt1.train"):
    """The run directory, as every command that reads one takes it: positional (`gpt1 metrics RUN`) or --run RUN.
    Resolve it with run_dir(parser, args)."""
    parser.add_argument("run_dir", nargs="?", metavar="RUN", help=help)
    parser.add_argument("--run", dest="run_opt", metavar="RUN", help="the same, as an option")


def run_dir(parser, args):
    """The run directory given by add_run_argument's two forms; a usage error when neither or two different ones."""
    given = [d for d in (args.run_dir, args.run_opt) if d is not None]
    if not given:
        parser.error("the run directory is required: RUN or --run RUN")
    if len(set(given)) > 1:
        parser.error(f"two run directories given: {given[0]!r} and --run {given[1]!r}")
    return given[0]


def prepare(argv):
    from .data import prepare as build

    p = argparse.ArgumentParser(prog="gpt1 prepare", description="Tokenize a corpus into DIR.")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--text", nargs="+", action="extend", default=None,
                   help="text files or directories of .txt files (default: the complete works of Shakespeare)")
    p.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int, default=40478)
    p.add_argument("--val-fraction", "--val_fraction", dest="val_fraction", type=float, default=0.1)
    p.add_argument("--vocab", help="an existing vocab.json to use instead of training one (with --merges)")
    p.add_argument("--merges", help="the merges.txt that goes with --vocab")
    a = p.parse_args(argv)
    if not 0.0 < a.val_fraction < 1.0:
        raise GPT1Error(f"--val-fraction must be in (0, 1), got {a.val_fraction}")
    meta = build(a.out, texts=a.text, vocab_size=a.vocab_size, val_fraction=a.val_fraction, vocab=a.vocab,
                 merges=a.merges)
    print(f"{a.out}: vocab {meta['vocab_size']}, {meta['tokens']['train']} train tokens in "
          f"{meta['documents']['train']} documents, {meta['tokens']['val']} val tokens in "
          f"{meta['documents']['val']} documents")


def export_hf(argv):
    from .checkpoint import load_run
    from .hf import save_hf

    p = argparse.ArgumentParser(prog="gpt1 export-hf", description="Export a run as an HF OpenAIGPT directory: "
                                "`gpt1 export-hf RUN OUT` or `gpt1 export-hf --run RUN --out OUT`.")
    add_run_argument(p)
    p.add_argument("out_dir", nargs="?", metavar="OUT", help="the directory to write")
    p.add_argument("--out", dest="out_opt", metavar="OUT", help="the same, as an option")
    a = p.parse_args(argv)
    if a.run_opt is not None and a.out_dir is None:  # `--run RUN OUT`: the one positional is the output
        a.run_dir, a.out_dir = None, a.run_dir
    outs = [d for d in (a.out_dir, a.out_opt) if d is not None]
    if not outs:
        p.error("the output directory is required: OUT or --out OUT")
    if len(set(outs)) > 1:
        p.error(f"two output directories given: {outs[0]!r} and --out {outs[1]!r}")
    model, tokenizer = load_run(run_dir(p, a))
    save_hf(model, outs[0], tokenizer)
    print(f"wrote {outs[0]}: load it with transformers.OpenAIGPTLMHeadModel.from_pretrained({outs[0]!r})")


def metrics(argv):
    p = argparse.ArgumentParser(prog="gpt1 metrics", description="Summarize RUN/metrics.jsonl.")
    add_run_argument(p)
    a = p.parse_args(argv)
    path = os.path.join(run_dir(p, a), "metrics.jsonl")
    if not os.path.isfile(path):
        raise GPT1Error(f"{path} not found")
    from .runtime import read_rows

    rows = read_rows(path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    dev = [r for r in rows if any(k.startswith("dev_") for k in r)]  # a fine-tuning run's evaluations
    for r in train:  # a pre-training row has tokens/s and maybe MFU and grad norm; a fine-tuning row two losses
        parts = [f"step {r.get('step', '?'):>6}  train loss {r['loss']:.4f}"]
        parts += [f"{name} {r[key]:.4f}" for key, name in (("task_loss", "task loss"), ("lm_loss", "LM loss"))
                  if key in r]
        parts += [f"{r['tokens_per_s']:.0f} tokens/s"] if "tokens_per_s" in r else []
        parts += [f"MFU {r['mfu']:.1%}"] if "mfu" in r else []
        parts += [f"grad norm {r['grad_norm']:.3f}"] if "grad_norm" in r else []
        print("  ".join(parts))
    for r in evals:
        print(f"step {r.get('step', '?'):>6}  val loss {r['val_loss']:.4f}  ppl {r['val_ppl']:.1f}  "
              f"acc {r['val_acc']:.3f}")
    for r in dev:
        scores = "  ".join(f"{k.removeprefix('dev_')} {v:.4f}" for k, v in r.items() if k.startswith("dev_"))
        print(f"step {r.get('step', '?'):>6}  epoch {r.get('epoch', '?')}  dev {scores}")
    if len(train) > 1:
        print(f"train loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}")


def checkpoint(argv):
    p = argparse.ArgumentParser(prog="gpt1 checkpoint", description="Inspect or convert a run's checkpoints.")
    sub = p.add_subparsers(dest="action", required=True)
    info = sub.add_parser("info", help="world size, ZeRO stage, step, model config and files of each checkpoint")
    add_run_argument(info)
    info.add_argument("--json", action="store_true", help="print the records as JSON")
    conv = sub.add_parser("convert", help="write a checkpoint as a DeepSpeed universal checkpoint beside it, "
                                          "which --resume loads on any number of ranks with ZeRO 1-3")
    add_run_argument(conv)
    conv.add_argument("--to", choices=["universal"], default="universal")
    conv.add_argument("--tag", help="the checkpoint to convert (default: the newest complete one)")
    conv.add_argument("--workers", type=int, default=1,
                      help="processes that extract and merge the ZeRO shards (forked by DeepSpeed's converter)")
    a = p.parse_args(argv)
    a.run_dir = run_dir(info if a.action == "info" else conv, a)
    return checkpoint_info(a) if a.action == "info" else checkpoint_convert(a)


def checkpoint_info(a):
    from .checkpoint import describe

    rows = describe(a.run_dir)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    complete = [r for r in rows if r["complete"]]
    print(f"{os.path.join(a.run_dir, 'checkpoints')}: {len(complete)} complete checkpoint(s)")
    for r in rows:
        if not r["complete"]:
            print(f"  {r['tag']}  incomplete (no COMPLETE record): never resumed from, pruned by the next save")
            continue
        universal = f"  universal: {os.path.basename(r['universal'])}" if r["universal"] else ""
        samples = f"  {r['samples']} samples" if "samples" in r else ""
        print(f"  {r['tag']}  step {r['step']}  {r['world_size']} rank(s)  ZeRO-{r['zero_stage']}{samples}  "
              f"{r['bytes'] / 2**20:.1f} MiB{universal}")
    if complete:
        newest = complete[-1]
        print(f"newest: {newest['tag']}")
        print("  model: " + ", ".join(f"{k}={v}" for k, v in newest["model"].items()))
        for name, size in newest["files"].items():
            print(f"  {size:>12}  {name}")


def checkpoint_convert(a):
    from .checkpoint import complete_tags, convert, verify

    root = os.path.join(a.run_dir, "checkpoints")
    if not os.path.isdir(root):
        raise GPT1Error(f"{a.run_dir} is not a run directory (no checkpoints/ in it)")
    tags = complete_tags(root)
    if not tags:
        raise GPT1Error(f"no complete checkpoint under {root}")
    tag = a.tag or tags[-1]
    if tag not in tags:
        why = "is not complete (no COMPLETE record)" if os.path.isdir(os.path.join(root, tag)) else "does not exist"
        raise GPT1Error(f"checkpoint {os.path.join(root, tag)} {why}; complete ones: {', '.join(tags)}")
    if a.workers < 1:
        raise GPT1Error(f"--workers must be at least 1, got {a.workers}")
    record = verify(root, tag)
    path, made = convert(root, tag, record, workers=a.workers)
    print(f"{'wrote' if made else 'already converted:'} {path} (step {record['step']}, saved on "
          f"{record['world_size']} rank(s) with ZeRO-{record['zero_stage']}); --resume loads it on any number "
          "of ranks with ZeRO 1-3")


@cli_errors
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "prepare":
        return prepare(rest)
    if cmd == "train":
        from .train import main as train
        return train(rest)
    if cmd == "finetune":
        from .finetune import main as finetune
        return finetune(rest)
    if cmd == "generate":
        from .generate import main as generate
        return generate(rest)
    if cmd == "export-hf":
        return export_hf(rest)
    if cmd == "metrics":
        return metrics(rest)
    if cmd == "checkpoint":
        return checkpoint(rest)
    raise GPT1Error(f"unknown command {cmd!r}; commands: prepare, train, finetune, generate, export-hf, metrics, "
                    "checkpoint")


if __name__ == "__main__":
    main()
