"""Nsight Compute on our kernels at GPT-1's training shapes: what limits each one (issue 11's profiler notes).

    python -m bench.ncu --out DIR          # on a GPU: runs ncu on the workload below, writes DIR/ncu.{txt,csv,md}
    python -m bench.ncu --workload         # the workload alone (what ncu profiles)
    python -m bench.ncu --smoke --out DIR  # CPU, Triton interpreter, tiny shapes: the workload runs, no ncu

The workload makes one call of each kernel family as a training step of the 117M model makes it (micro batch
32 x 512, bf16): attention forward + backward from the packed qkv with dropout 0.1 (the mask kernel, the forward,
dK/dV, dQ), the add + dropout + LayerNorm forward + backward with a bf16 branch copy, bias + GELU forward +
backward at the MLP's 3072 columns, and the cross-entropy on one chunk of the linear cross-entropy's logits
(bf16, V = 40478): through fused_cross_entropy (the tuned launch, or the default), then on the padded chunk with
each launch of long rows, streaming (16 warps, UNROLL 1) and the row read once (8 warps, "row"; its 125-128
registers tell it apart in the table). ncu profiles the first launches of the kernels whose names start with "_"
(ours; torch's and cuBLAS's do not) with `--clock-control none` (the clocks as they run) and the sections that
say what bounds a kernel: speed of light (compute and memory throughput against the peaks), occupancy, launch
statistics (registers, shared memory), warp state (the stall reasons), memory workload and scheduler statistics.

DIR/ncu.txt is ncu's details page, with its own advice ("OPT", "WRN"); DIR/ncu.csv the same as CSV; DIR/ncu.md
a table of the figures read first: duration, SM and memory throughput (% of peak), DRAM throughput, achieved
against theoretical occupancy, registers per thread, and warp cycles per issued instruction.
"""

import argparse
import csv
import glob
import io
import os
import shutil
import subprocess
import sys

from . import common

SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis", "SchedulerStats")
KERNELS = "regex:^_"  # our Triton kernels' names start with an underscore
MAX_LAUNCHES = 24
# (column, ncu section, metric name) of the summary table
SUMMARY = (
    ("duration", "GPU Speed Of Light Throughput", "Duration"),
    ("SM %", "GPU Speed Of Light Throughput", "Compute (SM) Throughput"),
    ("memory %", "GPU Speed Of Light Throughput", "Memory Throughput"),
    ("DRAM %", "GPU Speed Of Light Throughput", "DRAM Throughput"),
    ("achieved occupancy %", "Occupancy", "Achieved Occupancy"),
    ("theoretical occupancy %", "Occupancy", "Theoretical Occupancy"),
    ("registers", "Launch Statistics", "Registers Per Thread"),
    ("cycles per issue", "Warp State Statistics", "Warp Cycles Per Issued Instruction"),
)
GPT1 = dict(B=32, T=512, H=12, D=64, C=768, F=3072, V=40478, CE_ROWS=1920)
SMOKE = dict(B=1, T=16, H=2, D=16, C=32, F=64, V=50, CE_ROWS=8)


def workload(smoke):
    """One call (forward and backward) of each kernel family at GPT-1's shapes (SMOKE's on the CPU)."""
    import torch

    from kernels import (
        fused_add_dropout_layer_norm,
        fused_attention_qkv,
        fused_bias_gelu,
        fused_cross_entropy,
    )
    from kernels.cross_entropy import ROW, _launch, _padded_vocab

    s, dev, bf16 = SMOKE if smoke else GPT1, common.device(), torch.bfloat16
    torch.manual_seed(0)
    n = s["B"] * s["T"]

    def leaf(*shape, dtype=bf16):
        return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)

    qkv = leaf(s["B"], s["T"], 3, s["H"], s["D"])
    fused_attention_qkv(qkv, causal=True, dropout_p=0.1).sum().backward()
    x, h = leaf(n, s["C"], dtype=torch.float32), leaf(n, s["C"])
    w, b = leaf(s["C"], dtype=torch.float32), leaf(s["C"], dtype=torch.float32)
    y, y16 = fused_add_dropout_layer_norm(x, h, w, b, dropout_p=0.1, branch_dtype=bf16)
    (y.sum() + y16.float().sum()).backward()
    fused_bias_gelu(leaf(n, s["F"]), leaf(s["F"], dtype=torch.float32)).sum().backward()
    logits = torch.randn(s["CE_ROWS"], s["V"], device=dev, dtype=bf16, requires_grad=True)
    target = torch.randint(0, s["V"], (s["CE_ROWS"],), device=dev)
    fused_cross_entropy(logits, target).backward()
    # and on the linear cross-entropy's padded chunk, both launches of long rows: streaming, then the row read once
    chunk = torch.zeros(s["CE_ROWS"], _padded_vocab(s["V"]), device=dev, dtype=bf16)
    for launch in ((16, 1), (8, ROW)):
        chunk[:, : s["V"]] = logits.detach()
        _launch(chunk, target, torch.empty(s["CE_ROWS"], device=dev), -100, 0.0, 1.0 / s["CE_ROWS"], True,
                n_cols=s["V"], launch=launch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def find_ncu():
    """ncu on the PATH, else the newest under /opt/nvidia/nsight-compute; None where there is none."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return candidates[-1] if candidates else None


def ncu_command(ncu, report):
    sections = [arg for name in SECTIONS for arg in ("--section", name)]
    return [ncu, "--clock-control", "none", "--target-processes", "all", "-k", KERNELS, "-c", str(MAX_LAUNCHES),
            *sections, "-f", "-o", report, sys.executable, "-m", "bench.ncu", "--workload"]


def summarize(csv_text):
    """The summary rows of ncu's `--csv --page details` output: one per profiled launch, in launch order, each
    {"kernel", "block", "grid", <SUMMARY column>: "value unit"}; a metric ncu did not report is left out."""
    wanted = {(section, metric): column for column, section, metric in SUMMARY}
    rows = {}
    for r in csv.DictReader(io.StringIO(csv_text[csv_text.find('"ID"'):])):
        row = rows.setdefault(r["ID"], {"kernel": r["Kernel Name"], "block": r.get("Block Size", ""),
                                        "grid": r.get("Grid Size", "")})
        column = wanted.get((r["Section Name"], r["Metric Name"]))
        if column:
            row[column] = f"{r['Metric Value']} {r['Metric Unit']}".strip()
    return [rows[k] for k in sorted(rows, key=int)]


def markdown(rows, header):
    columns = ["kernel", "block", "grid"] + [column for column, _, _ in SUMMARY]
    lines = ["# Nsight Compute: our kernels at GPT-1's training shapes", "", header, "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r.get(c, "") for c in columns) + " |" for r in rows]
    if not rows:
        lines.append("| (no launch profiled) |" + " |" * (len(columns) - 1))
    return "\n".join(lines) + "\n"


def profile(out_dir):
    """Run ncu on the workload; write ncu.txt, ncu.csv and ncu.md into out_dir. Returns ncu's exit status."""
    ncu = find_ncu()
    if ncu is None:
        print("bench.ncu: no ncu here (not on the PATH nor under /opt/nvidia/nsight-compute)", file=sys.stderr)
        return 2
    report = os.path.join(out_dir, "ncu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(ncu_command(ncu, os.path.abspath(report)), capture_output=True, text=True, cwd=root)
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    if proc.returncode != 0 or not os.path.exists(report + ".ncu-rep"):
        print(f"bench.ncu: ncu exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode or 1
    pages = {}
    for fmt, extra in (("txt", []), ("csv", ["--csv"])):
        page = subprocess.run([ncu, "--import", report + ".ncu-rep", "--page", "details", *extra],
                              capture_output=True, text=True, check=True).stdout
        with open(os.path.join(out_dir, f"ncu.{fmt}"), "w") as f:
            f.write(page)
        pages[fmt] = page
    os.remove(report + ".ncu-rep")  # the text and CSV hold what the report does, in a few hundred KB less
    env = common.environment(False)
    header = (f"GPU: {env['gpu']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; "
              f"`{' '.join(ncu_command('ncu', 'ncu')[1:-4])} python -m bench.ncu --workload`")
    text = markdown(summarize(pages["csv"]), header)
    with open(os.path.join(out_dir, "ncu.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for ncu.txt, ncu.csv, ncu.md (default bench/results/<gpu>/)")
    parser.add_argument("--workload", action="store_true", help="run the workload only (what ncu profiles)")
    parser.add_argument("--smoke", action="store_true", help="CPU: the workload under the interpreter, tiny shapes")
    args = parser.parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)
    if args.workload or args.smoke:
        workload(args.smoke)
        print(f"bench.ncu: workload ran ({'smoke shapes' if args.smoke else 'GPT-1 shapes'})")
        return 0
    return profile(common.out_dir(args))


if __name__ == "__main__":
    sys.exit(main())
