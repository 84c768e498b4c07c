"""Sample text from a finished run: `gpt1 generate RUN --prompt "..."` (or --run RUN)."""

import argparse

import torch

from .checkpoint import load_run
from .cli import add_run_argument, run_dir
from .errors import GPT1Error, cli_errors


def add_arguments(parser):
    add_run_argument(parser)
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    parser.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None,
                        help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None,
                        help="sample among the most likely tokens whose probability reaches p (nucleus)")
    parser.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def generate(args):
    if args.max_new_tokens < 0 or args.temperature < 0 or args.num_samples < 1:
        raise GPT1Error("--max-new-tokens and --temperature must be >= 0, --num-samples >= 1")
    if args.top_k is not None and args.top_k < 1:
        raise GPT1Error(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise GPT1Error(f"--top-p must be in (0, 1], got {args.top_p}")
    try:  # an unknown or absent device: a one-line error, before the model is loaded
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise GPT1Error(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    model, tokenizer = load_run(args.run, args.device)  # args.run: resolved by main (cli.run_dir)
    # the run's kernel choice may be a GPU's: off one, torch's ops (the same model, in eval mode without dropout)
    fused = None if torch.device(args.device).type == "cuda" else "eager"
    model.set_impl(attn_impl="auto", loss_impl="auto", norm_impl=fused, mlp_impl=fused)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise GPT1Error("the prompt encodes to no tokens")
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x = torch.tensor([ids] * args.num_samples, device=args.device)
    out = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         generator=gen)
    return [tokenizer.decode(row.tolist()) for row in out]


@cli_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpt1 generate", description="Sample text from a trained GPT-1 run.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.run = run_dir(parser, args)
    for i, text in enumerate(generate(args)):
        print(text if i == 0 else f"\n---\n{text}")


if __name__ == "__main__":
    main()
