"""Measure the cross-entropy kernel's launch for long rows: num_warps and how many blocks' loads are in flight.

    python -m bench.tune_cross_entropy [--out DIR] [--budget-s S] [--smoke]

The streaming kernel is bound by the bytes its loads have in flight (kernels/cross_entropy.py): one 16-byte load a
thread per block, times the threads of the programs that fit on an SM. Two knobs set that: num_warps (the threads of
a program, and with them its registers and how many programs share an SM) and UNROLL (1, 2 or 4 blocks loaded before
any is used, more registers a thread). UNROLL "row" reads the row once into registers instead (all its loads in
flight, one pass over memory where streaming makes two, where the row fits in 80 registers a thread: an fp32 value or
a pair of 16-bit ones each; two 8-warp programs per SM at GPT-1's vocabulary in bf16). Their best values are the
GPU's to say: for each element size (bf16, fp32) every candidate in CANDIDATES is launched on GPT-1's shapes, rejected
if it spills registers or its losses and gradients differ from the default's beyond rounding, and timed (do_bench
medians). The best candidate, by the geometric mean of its speed-ups over the shapes, becomes a table entry when it is
at least MIN_GAIN faster than the default and slower on no shape. Writes cross_entropy_tuned.json (copy it to
kernels/ to use it; the kernels read it once) and .md.
"""

import functools
import json
import math
import os
import time

from . import common

# (num_warps, UNROLL); the default (_NUM_WARPS, 1) first, then the row read once into registers (UNROLL "row"), which
# a budget that runs short should not cut: a 16-bit row of GPT-1's vocabulary in 125-128 registers at 8 warps and 64
# (without its 16-byte stores) to 113 at 16 (sm_90, triton 3.6), two programs per SM at 8 warps
CANDIDATES = ((16, 1), (8, "row"), (16, "row"), (32, "row"), (16, 2), (16, 4), (8, 1), (8, 4), (4, 4), (32, 1))
MIN_GAIN = 0.03  # below it do_bench's noise decides
WORST_SHAPE = 0.99  # a winner may not be slower than this on any shape
# (name, element size, N rows, row length, classes): the linear cross-entropy's padded chunk at GPT-1's batch, the
# bench's N x V logits (rows not 16-byte aligned), fp32 logits
SHAPES = (("linear CE chunk", 2, 2048, 40512, 40478), ("logits N x V", 2, 32768, 40478, 40478),
          ("fp32 logits", 4, 8192, 40478, 40478))
SMOKE_SHAPES = (("linear CE chunk", 2, 3, 2048, 2000), ("fp32 logits", 4, 3, 1100, 1100))
WARMUP_MS, REP_MS = 25, 100  # do_bench's, per candidate and shape (common.measure_ms)


def make_problem(n_rows, row_len, n_cols, element_size, dev):
    import torch

    gen = torch.Generator(device=dev).manual_seed(1234)
    dtype = torch.bfloat16 if element_size == 2 else torch.float32
    logits = (torch.randn(n_rows, row_len, device=dev, generator=gen) * 4).to(dtype)
    return logits, torch.randint(0, n_cols, (n_rows,), device=dev, generator=gen)  # no ignored row: all are read


def run_launch(x, target, n_cols, launch, out=None):
    """One kernel launch on x (overwritten with the gradient); returns (compiled kernel, loss rows)."""
    import torch

    from kernels.cross_entropy import _launch

    loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if out is None else out
    kernel = _launch(x, target, loss, -100, 0.0, 1.0 / x.shape[0], True, n_cols=n_cols, launch=launch)
    return kernel, loss


def mismatch(got, want):
    """Why a candidate's (loss rows, gradient) differ from the default's beyond fp32 summation order, or None:
    losses to 1e-5 relative, gradients to one rounding step of their dtype."""
    import torch

    (loss, grad), (loss_ref, grad_ref) = got, want
    if not torch.allclose(loss, loss_ref, rtol=1e-5, atol=1e-6):
        return f"losses differ by up to {(loss - loss_ref).abs().max().item():.3g}"
    step = 2.0 ** -7 if grad.dtype == torch.bfloat16 else 2.0 ** -20
    if not torch.allclose(grad.float(), grad_ref.float(), rtol=step, atol=1e-9):
        return f"gradients differ by up to {(grad.float() - grad_ref.float()).abs().max().item():.3g}"
    return None


def measure_shape(shape, dev, smoke, deadline):
    """One row per candidate on one shape: status ok with ms, rejected with the reason, or not run."""
    import torch

    from kernels.cross_entropy import ROW, _row_config, check_launch

    name, size, n_rows, row_len, n_cols = shape
    base, target = make_problem(n_rows, row_len, n_cols, size, dev)
    rows, want = [], None
    for launch in CANDIDATES:
        row = {"shape": name, "element_size": size, "N": n_rows, "row_len": row_len, "V": n_cols,
               "num_warps": launch[0], "unroll": launch[1]}
        rows.append(row)
        if deadline.passed():
            row.update(status="not run", reason="the time budget was spent")
            continue
        assert check_launch(*launch) is None, launch
        block_v, num_warps, unroll = _row_config(row_len, size, launch)
        if launch[1] == ROW and unroll != ROW:  # it would time a streaming launch a second time
            why = "does not fit in registers" if num_warps == launch[0] else "is shorter than one block"
            row.update(status="rejected", reason=f"the row {why}: it streams, {block_v} columns at {num_warps} warps")
            continue
        x = base.clone()
        try:
            kernel, loss = run_launch(x, target, n_cols, launch)
            if dev == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is reported, the sweep goes on
            row.update(status="rejected", reason=f"does not compile or launch: {common.failure(exc)[1]}")
            continue
        row.update(n_regs=getattr(kernel, "n_regs", None), n_spills=getattr(kernel, "n_spills", None))
        if row["n_spills"]:
            row.update(status="rejected", reason=f"spills registers ({row['n_spills']} words, {row['n_regs']} regs)")
            continue
        if want is None:
            want = (loss, x)  # the default's result, CANDIDATES[0]
        else:
            wrong = mismatch((loss, x), want)
            if wrong:
                row.update(status="rejected", reason=f"wrong result: {wrong}")
                continue
        work, out = base.clone(), torch.empty_like(loss)
        # in place: from the second call on it reads gradients, which cost the same to read and write
        timed = common.measure_ms(functools.partial(run_launch, work, target, n_cols, launch, out), smoke,
                                  warmup=WARMUP_MS, rep=REP_MS)
        row.update(status="ok", ms=timed["ms"], ms_p20=timed["ms_p20"], ms_p80=timed["ms_p80"],
                   gbps=2 * n_rows * row_len * size / (timed["ms"] * 1e-3) / 1e9)
    return rows


def choose(rows, smoke):
    """{element size: (launch, geomean speed-up, {shape: speed-up})} of the winners. Under --smoke, whose times
    mean nothing, the first candidate that ran on every shape stands in, so that the table's path is exercised."""
    picks = {}
    for size in sorted({r["element_size"] for r in rows}):
        mine = [r for r in rows if r["element_size"] == size]
        shapes = sorted({r["shape"] for r in mine})
        ms = {(r["shape"], (r["num_warps"], r["unroll"])): r["ms"] for r in mine if r["status"] == "ok"}
        best = None
        for launch in CANDIDATES[1:]:
            if any((s, launch) not in ms or (s, CANDIDATES[0]) not in ms for s in shapes):
                continue
            speedups = {s: ms[s, CANDIDATES[0]] / ms[s, launch] for s in shapes}
            geo = math.exp(sum(math.log(v) for v in speedups.values()) / len(speedups))
            if smoke and best is None:
                best = (launch, geo, speedups)
            elif geo >= 1 + MIN_GAIN and min(speedups.values()) >= WORST_SHAPE and (best is None or geo > best[1]):
                best = (launch, geo, speedups)
        if best:
            picks[size] = best
    return picks


def arch_name():
    """The table's arch field of this GPU: sm90 from compute capability 9 on, else sm80 (and sm90 under --smoke on a
    CPU, whose file the kernels refuse to load anyway)."""
    import torch

    if not torch.cuda.is_available():
        return "sm90"
    return "sm90" if torch.cuda.get_device_capability()[0] >= 9 else "sm80"


def table(rows, picks, env, smoke):
    """The JSON that kernels/cross_entropy.py reads (parse_tuned_table), with every measured row beside it."""
    entries = [{"arch": arch_name(), "element_size": size, "num_warps": launch[0], "unroll": launch[1],
                "speedup": round(geo, 4), "speedups": {s: round(v, 4) for s, v in per_shape.items()},
                "gpu": env["gpu"], "triton": env["triton"], "torch": env["torch"], "commit": env["commit"]}
               for size, (launch, geo, per_shape) in sorted(picks.items())]
    about = ("SMOKE: written by python -m bench.tune_cross_entropy --smoke, which measures nothing; never commit "
             "it (kernels/ refuses it). " if smoke else "Written by python -m bench.tune_cross_entropy; copy to "
             "kernels/cross_entropy_tuned.json to use it. ")
    return {"about": about + f"Entries: a (num_warps, unroll) at least {MIN_GAIN:.0%} faster than the default "
                     f"{CANDIDATES[0]} by the geometric mean over the shapes, and slower on none.",
            "smoke": bool(smoke), "environment": env, "entries": entries, "rows": rows}


def markdown(data, picks):
    env = data["environment"]
    smoke = " - SMOKE (tiny shapes under the interpreter), not a measurement" if data["smoke"] else ""
    lines = [f"# Cross-entropy launch tuning ({env['gpu']}; torch {env['torch']}, triton {env['triton']}; commit "
             f"{env['commit']}){smoke}", "",
             "| shape | N x row | num_warps | unroll | status | ms | p20-p80 | GB/s (read + write) | regs | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ok = r["status"] == "ok"
        lines.append(f"| {r['shape']} | {r['N']} x {r['row_len']} | {r['num_warps']} | {r['unroll']} | {r['status']} "
                     f"| {r['ms']:.4f} | {r['ms_p20']:.4f}-{r['ms_p80']:.4f} | {r['gbps']:.0f} | "
                     f"{r.get('n_regs') if r.get('n_regs') is not None else ''} | {r.get('reason', '')} |" if ok else
                     f"| {r['shape']} | {r['N']} x {r['row_len']} | {r['num_warps']} | {r['unroll']} | {r['status']} "
                     f"| | | | {r.get('n_regs') if r.get('n_regs') is not None else ''} | {r.get('reason', '')} |")
    lines += ["", "Chosen (speed-up over the default, per shape):", ""]
    for size, (launch, geo, per_shape) in sorted(picks.items()):
        shapes = ", ".join(f"{s} {v:.2f}x" for s, v in per_shape.items())
        lines.append(f"- element size {size}: num_warps {launch[0]}, unroll {launch[1]}: {geo:.3f}x ({shapes})")
    if not picks:
        lines.append(f"- none: the default {CANDIDATES[0]} stays")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = common.cli_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)
    t0, env, dev = time.monotonic(), common.environment(args.smoke), common.device()
    deadline = common.Deadline(args.budget_s)
    rows = [r for shape in (SMOKE_SHAPES if args.smoke else SHAPES) for r in measure_shape(shape, dev, args.smoke,
                                                                                             deadline)]
    picks = choose(rows, args.smoke)
    data = table(rows, picks, env, args.smoke)
    out = common.out_dir(args)
    with open(os.path.join(out, "cross_entropy_tuned.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, "cross_entropy_tuned.md"), "w") as f:
        f.write(markdown(data, picks))
    print(markdown(data, picks))
    print(f"tune_cross_entropy: {len(rows)} candidates ({sum(r['status'] == 'ok' for r in rows)} timed), "
          f"{len(data['entries'])} table entries in {time.monotonic() - t0:.0f} s: {out}/cross_entropy_tuned.json, .md")


if __name__ == "__main__":
    main()
