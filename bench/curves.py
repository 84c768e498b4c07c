"""Loss curves: the compiled training path against the eager one, run for real through gpt1.train.

    python -m bench.curves [--data data/shakespeare] [--steps 200] [--model gpt1] [--micro-batch-size 32]
                           [--deepspeed-config ds_configs/zero0_autocast_bf16.json] [--dropout P] [--out DIR]
                           [--budget-s S] [--smoke]

Three runs of `python -m gpt1.train` (one process each, DeepSpeed as gpt1.train builds it), all with the same
seed, so the same initial weights and the same batches in the same order, the loss logged at every step:

- compiled:  --compile, our kernels (attention, loss and norm as gpt1.train picks them);
- eager:     --no-compile, the same kernels;
- reference: --no-compile, torch's kernels (SDPA attention, eager loss): a second correct implementation.

No two of them can agree bitwise: dropout (0.1 in GPT-1) draws other masks in each (Inductor's random numbers
are not eager's, SDPA's are not ours), and compiling changes the rounding of the fused glue. So the tolerance is
measured in the same run: eager-vs-reference, two implementations that are both right, differ at step t by
|d_ref(t)|; the compiled path agrees with the eager one when its own differences are no larger:

    mean_t |compiled - eager|  <=  TOL_FACTOR * mean_t |eager - reference|  +  TOL_ABS nats
    |mean over the second half of (compiled - eager)|  <=  the same bound           (no drift)

A wrong gradient in the compiled path shows as a difference that grows with the steps; a difference of the
size that other correct kernels and other dropout masks make does not. The first step's time (compiling) of the
compiled run is reported as gpt1.train prints it.

Writes results.json (every run's per-step losses, the summary), results.md and curves.png to --out
(default bench/results/<gpu>/curves). Needs a prepared corpus (`gpt1 prepare --out data/shakespeare`; the GPU
machine has no network, so prepare it on the CPU machine and carry data/shakespeare). --smoke: gpt1-tiny for a
few steps on the CPU under the Triton interpreter, on a corpus it prepares itself (tests the harness; its
numbers say nothing).
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from . import common

TOL_FACTOR = 1.5  # the compiled path may differ from eager by 1.5x what two correct implementations differ by
TOL_ABS = 0.01  # nats: a floor for runs so short or so deterministic that the reference difference is ~0
# (name, gpt1.train flags): the runs compared; the first two are the pair under test, the third the yardstick
RUNS = (
    ("compiled", ["--compile"]),
    ("eager", ["--no-compile"]),
    ("reference", ["--no-compile", "--attn-impl", "sdpa", "--loss-impl", "eager", "--norm-impl", "eager"]),
)
FIRST_STEP = re.compile(r"first step, which compiles the model: ([0-9.]+) s")


def parse_args(argv):
    parser = common.cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="a directory written by `gpt1 prepare` (default "
                                                     "data/shakespeare; smoke: a small corpus of its own)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200; smoke 4)")
    parser.add_argument("--model", default=None, help="model preset (default gpt1; smoke gpt1-tiny)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="sequences per step (default 32; "
                                                                          "smoke 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's; "
                                                                  "smoke 32)")
    parser.add_argument("--deepspeed-config", default="ds_configs/zero0_autocast_bf16.json",
                        help="gpt1.train's default")
    parser.add_argument("--dropout", type=float, default=None, help="all three dropout rates (default: the "
                                                                    "model's, 0.1)")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps or (4 if smoke else 200)
    args.data = args.data or (None if smoke else "data/shakespeare")
    args.model = args.model or ("gpt1-tiny" if smoke else "gpt1")
    args.micro_batch_size = args.micro_batch_size or (2 if smoke else 32)
    args.seq_len = args.seq_len or (32 if smoke else 0)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (a curve), got {args.steps}")
    return args


def train_command(args, flags, out):
    cmd = [sys.executable, "-m", "gpt1.train", "--data", args.data, "--model", args.model, "--out", out,
           "--deepspeed-config", args.deepspeed_config, "--max-steps", str(args.steps),
           "--micro-batch-size", str(args.micro_batch_size), "--seq-len", str(args.seq_len),
           "--gradient-accumulation-steps", "1", "--log-interval", "1", "--eval-interval", str(args.steps),
           "--eval-batches", "4", "--save-interval", str(args.steps), "--keep-checkpoints", "1",
           "--seed", str(args.seed)]
    if args.dropout is not None:
        cmd += ["--dropout", str(args.dropout)]
    return cmd + run_flags(args, flags)


def run_flags(args, flags):
    """A run's own flags; with --smoke our kernels are asked for by name (on a CPU "auto" means torch's)."""
    if args.smoke and "--attn-impl" not in flags:
        return flags + ["--attn-impl", "triton", "--loss-impl", "triton_linear"]
    return flags


def train_run(args, name, flags, work, timeout_s):
    """One gpt1.train run: {"name", "flags", "status", "losses": [per step], "val_loss", "first_step_s", "wall_s"}."""
    out = os.path.join(work, name)
    row = {"name": name, "flags": " ".join(run_flags(args, flags)), "status": "error"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(train_command(args, flags, out), capture_output=True, text=True, timeout=timeout_s,
                              check=False, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired:
        return dict(row, status="not run", reason=f"time budget spent after {timeout_s:.0f} s")
    row["wall_s"] = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        return dict(row, reason=f"gpt1.train exited {proc.returncode}: {tail[0][:300]}")
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    first = FIRST_STEP.search(proc.stdout)
    return dict(row, status="ok", losses=[losses[s] for s in sorted(losses)], val_loss=vals[-1] if vals else None,
                first_step_s=float(first.group(1)) if first else None)


def compare(runs):
    """The summary of the three runs (module docstring); None unless all three have a curve of one length."""
    by = {r["name"]: r for r in runs if r["status"] == "ok"}
    if len(by) < len(RUNS) or len({len(r["losses"]) for r in by.values()}) != 1:
        return None
    cmp_ = [c - e for c, e in zip(by["compiled"]["losses"], by["eager"]["losses"])]
    ref = [e - r for e, r in zip(by["eager"]["losses"], by["reference"]["losses"])]
    half = cmp_[len(cmp_) // 2:]
    mean_abs_cmp, mean_abs_ref = statistics.fmean(map(abs, cmp_)), statistics.fmean(map(abs, ref))
    bound = TOL_FACTOR * mean_abs_ref + TOL_ABS
    drift = statistics.fmean(half)
    return {"steps": len(cmp_), "mean_abs_compiled_vs_eager": mean_abs_cmp, "max_abs_compiled_vs_eager":
            max(map(abs, cmp_)), "mean_abs_eager_vs_reference": mean_abs_ref,
            "max_abs_eager_vs_reference": max(map(abs, ref)), "drift_second_half": drift, "bound": bound,
            "ratio": mean_abs_cmp / mean_abs_ref if mean_abs_ref else None,
            "agree": mean_abs_cmp <= bound and abs(drift) <= bound}


def verdict(summary):
    if summary is None:
        return "**verdict**: not decided (a run did not finish; see the table)"
    s = summary
    word = "agree" if s["agree"] else "DO NOT agree"
    return (f"**verdict**: compiled and eager {word} within the measured tolerance: mean |compiled - eager| = "
            f"{s['mean_abs_compiled_vs_eager']:.4f} nats against the bound {s['bound']:.4f} "
            f"(= {TOL_FACTOR} x mean |eager - reference| {s['mean_abs_eager_vs_reference']:.4f} + {TOL_ABS}); "
            f"mean difference over the second half {s['drift_second_half']:+.4f}")


def markdown(result):
    a = result["args"]
    lines = [f"# Loss curves: compiled against eager ({'SMOKE run, ' if result['smoke'] else ''}{result['gpu']})",
             "", f"{a['model']}, {a['steps']} steps, micro batch {a['micro_batch_size']} x "
             f"{a['seq_len'] or 'n_positions'} tokens, {os.path.basename(a['deepspeed_config'])}, dropout "
             f"{'the model default' if a['dropout'] is None else a['dropout']}, seed {a['seed']}; torch "
             f"{result['torch']}, triton {result['triton']}, deepspeed {result['deepspeed']}; commit "
             f"{result['commit']}", "", "| run | gpt1.train flags | status | loss at steps 1 / 10 / 50% / last | "
             "val loss | first step s (compile) | wall s |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        curve = r.get("losses") or []
        picks = [curve[i] for i in sorted({0, min(9, len(curve) - 1), len(curve) // 2, len(curve) - 1})] if curve \
            else []
        lines.append(f"| {r['name']} | `{r['flags']}` | {r['status']}{': ' + r['reason'] if r.get('reason') else ''}"
                     f" | {' / '.join(f'{x:.3f}' for x in picks)} | {_num(r.get('val_loss'), 4)} | "
                     f"{_num(r.get('first_step_s'), 1)} | {_num(r.get('wall_s'), 0)} |")
    s = result["summary"]
    if s:
        lines += ["", "| per-step difference, nats | mean abs | max abs |", "|---|---|---|",
                  f"| compiled - eager | {s['mean_abs_compiled_vs_eager']:.4f} | "
                  f"{s['max_abs_compiled_vs_eager']:.4f} |",
                  f"| eager - reference (the yardstick) | {s['mean_abs_eager_vs_reference']:.4f} | "
                  f"{s['max_abs_eager_vs_reference']:.4f} |"]
    return lines + ["", verdict(s), "", "![curves.png](curves.png)", ""]


def _num(v, decimals):
    return "" if v is None else f"{v:.{decimals}f}"


def plot(result, path):
    plt = common.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    curves = {r["name"]: r["losses"] for r in result["runs"] if r.get("losses")}
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, linewidth=2 if name == "compiled" else 1)
    for (a, b) in (("compiled", "eager"), ("eager", "reference")):
        if a in curves and b in curves:
            bx.plot(range(1, len(curves[a]) + 1), [x - y for x, y in zip(curves[a], curves[b])], label=f"{a} - {b}")
    ax.set(title="training loss", xlabel="step", ylabel="nats")
    bx.set(title="per-step difference", xlabel="step", ylabel="nats")
    for x in (ax, bx):
        x.grid(alpha=0.3)
        x.legend(fontsize=8)
    fig.suptitle(f"{result['args']['model']} on {os.path.basename(result['args']['data'].rstrip('/'))}, "
                 f"{result['gpu']}" + (" - SMOKE run" if result["smoke"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smoke_data(work):
    """A small corpus for --smoke: the Shakespeare text with a 512-token vocabulary."""
    from gpt1.data import prepare

    path = os.path.join(work, "data")
    prepare(path, vocab_size=512)
    return path


def write(out, args, runs):
    result = dict(common.environment(args.smoke), args=vars(args), runs=runs, summary=compare(runs))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(markdown(result)))
    plot(result, os.path.join(out, "curves.png"))
    return result


def main(argv=None):
    args = parse_args(argv)
    out = args.out or os.path.join("bench", "results", common.gpu_slug(common.gpu_name()), "curves")
    if args.smoke and args.out is None:
        out = "runs/bench-smoke/curves"
    os.makedirs(out, exist_ok=True)
    deadline = common.Deadline(args.budget_s)
    with tempfile.TemporaryDirectory() as work:
        if args.data is None:
            args.data = smoke_data(work)
        if not os.path.exists(os.path.join(args.data, "meta.json")):
            raise SystemExit(f"bench.curves: no prepared corpus at {args.data}: run `gpt1 prepare --out {args.data}` "
                             f"(on the GPU machine, which has no network, carry it from the CPU machine)")
        common.use_interpreter_without_gpu(args.smoke)  # no GPU: --smoke only, our kernels interpreted
        runs = []
        for name, flags in RUNS:
            left = deadline.left()
            if left is not None and left <= 0:
                runs.append({"name": name, "flags": " ".join(run_flags(args, flags)), "status": "not run",
                             "reason": "time budget spent"})
                continue
            print(f"bench.curves: {name}: gpt1.train {' '.join(flags)}", flush=True)
            runs.append(train_run(args, name, flags, work, left))
            print(f"bench.curves: {name}: {runs[-1]['status']} {runs[-1].get('reason', '')}", flush=True)
            result = write(out, args, runs)  # after every run: a session cut short keeps what finished
    print("\n".join(markdown(result)[-4:-2]))
    print(f"wrote {out}/results.json, results.md, curves.png")
    bad = [r for r in runs if r["status"] == "error"]
    if bad:
        raise SystemExit(f"bench.curves: {len(bad)} run(s) failed: " + "; ".join(f"{r['name']}: {r['reason']}"
                                                                                 for r in bad))


if __name__ == "__main__":
    main()
