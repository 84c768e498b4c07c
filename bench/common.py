"""Shared benchmark machinery: environment columns, timing, peak memory, result rows, Markdown and plots.

A result row is a flat dict: the environment (gpu, torch, triton, deepspeed, commit, smoke), the bench and
table it belongs to, the x-axis value, the provider, the mode (fwd, bwd, fwd+bwd or step), a status
("ok", "oom", "skipped", "error") with a reason, and the measured columns (ms with its 20th/80th
percentiles, a throughput column, peak memory). A row that was not measured carries no number.
"""

import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import time

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's datasheets; the first key that is a
# substring of torch.cuda.get_device_name() wins, so the specific names come before the generic ones.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
)
QUANTILES = (0.5, 0.2, 0.8)  # median, then the spread reported beside it
OURS = "ours"
EAGER = "eager"


def use_interpreter_without_gpu(smoke):
    """Choose the Triton interpreter when there is no GPU; must run before `kernels` is first imported.

    Without a GPU only --smoke makes sense, and it needs the interpreter to run our kernels on the CPU.
    """
    import torch

    if torch.cuda.is_available():
        return
    if not smoke:
        raise SystemExit("no CUDA device: the benchmarks need a GPU; use --smoke to test the harness on the CPU")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------------
# Environment columns, carried by every row
# ----------------------------------------------------------------------------------------------------


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit():
    """The checkout's commit, with "-dirty" when the tree has changes; read-only git calls only."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               check=False, cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIT_COMMIT", "unknown")
    return sha + ("-dirty" if dirty else "")


def gpu_name():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(smoke):
    import torch

    return {"gpu": gpu_name(), "torch": torch.__version__, "triton": _version("triton"),
            "deepspeed": _version("deepspeed"), "commit": git_commit(), "smoke": bool(smoke)}


def peak_bf16_tflops(name):
    """The GPU's dense bf16 peak in TFLOP/s, or None for a device not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def gpu_slug(name):
    """A directory name for one GPU model: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


# ----------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------


def measure_ms(fn, smoke, grad_to_none=None, warmup=10, rep=40):
    """(median, p20, p80) milliseconds of fn(). On a GPU: triton.testing.do_bench, which warms up, clears
    the L2 cache before each call and times with CUDA events. In --smoke (CPU): a wall-clock median of a
    call after one warm-up, which only shows that the provider runs."""
    if not smoke:
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                             quantiles=list(QUANTILES)))
    times = []
    for i in range(2):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        if i:  # the first call is the warm-up
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def measure_peak_mb(fn, grad_to_none=None):
    """Peak memory allocated (MiB) while fn() runs once, inputs included (torch.cuda.max_memory_allocated);
    None on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    for t in grad_to_none or ():
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


MODES = ("fwd", "bwd", "fwd+bwd")


def time_modes(fn, inputs, modes, smoke):
    """{mode: measured columns, or status and reason} of fn, a training forward (inputs require grad) that
    returns a tensor: "fwd" times fn(), "bwd" the backward of one retained graph, "fwd+bwd" both."""
    import torch

    results = {}
    for mode in sorted(modes, key=("fwd", "fwd+bwd", "bwd").index):  # bwd last: its graph stays alive
        out = None
        try:
            call = fn
            if mode != "fwd":
                out = fn()
                grad = None if out.dim() == 0 else torch.randn_like(out)
                if mode == "bwd":
                    call = functools.partial(out.backward, grad, retain_graph=True)
                else:
                    out, call = None, functools.partial(_forward_backward, fn, grad)
            ms, p20, p80 = measure_ms(call, smoke, grad_to_none=inputs)
            results[mode] = {"status": "ok", "ms": ms, "ms_p20": p20, "ms_p80": p80,
                                 "peak_mb": measure_peak_mb(call, grad_to_none=inputs)}
        except Exception as exc:  # noqa: BLE001 - one provider's failure must not end the run
            status, reason = failure(exc)
            results[mode] = {"status": status, "reason": reason}
        out = call = None
        if results[mode]["status"] != "ok":  # the traceback held the failed call's tensors
            free_memory()
    return {m: results[m] for m in modes}


def compiled(fn, smoke):
    """torch.compile(fn) as a provider. On a GPU: inductor with its default automatic dynamic shapes (the
    second shape seen recompiles once for all later ones). In --smoke: dynamo with backend="eager", which
    checks that the function traces without paying a CPU inductor compile."""
    import torch
    import torch._dynamo

    for limit in ("cache_size_limit", "recompile_limit"):  # one compiled function serves every shape
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    return torch.compile(fn, backend="eager" if smoke else "inductor")


def _forward_backward(fn, grad):
    fn().backward(grad)


def free_memory():
    import torch

    if torch.cuda.is_available():  # on the CPU (--smoke) nothing is measured that a collection would change
        gc.collect()
        torch.cuda.empty_cache()


def failure(exc):
    """The (status, reason) of a provider that raised: out of memory, or unavailable on this machine."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom", "torch.cuda.OutOfMemoryError"
    if isinstance(exc, ImportError):
        return "skipped", f"not installed: {exc}"
    if isinstance(exc, (RuntimeError, NotImplementedError)) and "out of memory" in str(exc).lower():
        return "oom", str(exc).splitlines()[0][:200]
    if isinstance(exc, (RuntimeError, NotImplementedError, ValueError)):
        return "skipped", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return "error", f"{type(exc).__name__}: {str(exc)[:200]}"


class Deadline:
    """A time budget for one bench: once it has passed, the remaining rows are recorded as skipped."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds if seconds else math.inf

    def passed(self):
        return time.monotonic() > self.end


# ----------------------------------------------------------------------------------------------------
# Rows, ratios, files
# ----------------------------------------------------------------------------------------------------


def add_ratios(rows):
    """Each ok row gets vs_eager = eager ms / its ms and vs_best_peer = the fastest peer's ms / its ms (above
    1: faster), comparing rows of one (bench, table, x, mode); roles come from `role`."""
    groups = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("ms"):
            groups.setdefault((r["bench"], r["table"], r["x"], r["mode"]), []).append(r)
    for group in groups.values():
        eager = [r for r in group if role(r) == EAGER]
        best = min((r for r in group if role(r) == "peer"), key=lambda r: r["ms"], default=None)
        for r in group:
            r["vs_eager"] = eager[0]["ms"] / r["ms"] if eager else None
            r["vs_best_peer"] = best["ms"] / r["ms"] if best else None
            r["best_peer"] = best["provider"] if best else None
    return rows


def role(row):
    """"ours" (any provider named ours...), "eager" (the reference) or "peer"; a row may set its own."""
    if "role" in row:
        return row["role"]
    return EAGER if row["provider"] == EAGER else OURS if row["provider"].startswith(OURS) else "peer"


def write_json(rows, out_dir, name="results.json"):
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    return path


def _fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def markdown_table(rows, columns):
    """A Markdown table of rows; columns are (header, key or function of the row)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [_fmt(key(r) if callable(key) else r.get(key)) for _, key in columns]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def value_or_status(key, digits=3):
    """A cell showing the row's number, or its status (oom, skipped, error) when it has none."""
    def cell(r):
        return _fmt(r.get(key), digits) if r.get("status") == "ok" else r.get("status")
    return cell


def ratio(key):
    def cell(r):
        return f"{r[key]:.2f}x" if r.get(key) else ""
    return cell


def header(rows, title):
    env = rows[0] if rows else {}
    lines = [f"# {title}", ""]
    if env.get("smoke"):
        where = "CPU interpreter" if str(env.get("gpu")).startswith("cpu") else "tiny shapes"
        lines += [(f"**SMOKE ({where}) - not a speed measurement.** These rows only show that the "
                   "harness and every provider run; their times are meaningless."), ""]
    lines += [(f"GPU: {env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, "
               f"deepspeed {env.get('deepspeed')}; commit {env.get('commit')}"), "",
              ("Ratios are speed-ups: `vs eager` = eager reference ms / this provider's ms, `vs best peer` = "
               "fastest peer's ms / this provider's ms (peers: every provider other than ours and the eager "
               "reference); above 1 means faster."), ""]
    return lines


def tables_markdown(rows, columns, note=None):
    """One Markdown section per (table, mode) of a bench's rows, in the order the rows came."""
    sections, order = {}, []
    for r in rows:
        key = (r["table"], r["mode"])
        if key not in sections:
            sections[key], _ = [], order.append(key)
        sections[key].append(r)
    lines = [note, ""] if note else []
    for table, mode in order:
        lines += [f"### {table}, {mode}", "", markdown_table(sections[(table, mode)], columns), ""]
    return lines


def unavailable(rows):
    """One line per provider that never ran, with its first reason, so skips are not silent."""
    seen = {}
    for r in rows:
        if r.get("status") in ("skipped", "error") and r["provider"] not in seen:
            seen[r["provider"]] = f"{r['status']}: {r.get('reason')}"
    return [f"- `{p}`: {why}" for p, why in seen.items()]


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(rows, y_key, path, title, xlabel, ylabel, panels, logx=True):
    """One panel per (table, mode) in `panels`, one line per provider of y_key against x; ok rows only."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (table, mode) in zip(axes[0], panels):
        sel = [r for r in rows if r["table"] == table and r["mode"] == mode and r.get("status") == "ok"
               and r.get(y_key) is not None]
        for provider in dict.fromkeys(r["provider"] for r in sel):
            mine = [r for r in sel if r["provider"] == provider]
            pts = sorted((r["x"], r[y_key]) for r in mine)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linewidth=2.5 if role(mine[0]) == OURS else 1.2, label=provider)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set(title=f"{table}\n{mode}", xlabel=xlabel, ylabel=ylabel)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        if sel:
            ax.legend(fontsize=7)
    smoke = rows and rows[0].get("smoke")
    fig.suptitle(title + (" - SMOKE run, not a speed measurement" if smoke else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cli_parser(description):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help="output directory (default: bench/results/<gpu>, "
                                                    "or runs/bench-smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter "
                                                              "(tests the harness; not a speed measurement)")
    parser.add_argument("--budget-s", type=float, default=0, help="time budget in seconds (0: none); rows left "
                                                                  "when it runs out are recorded as skipped")
    return parser


def out_dir(args):
    if args.out is None:
        args.out = "runs/bench-smoke" if args.smoke else os.path.join("bench", "results", gpu_slug(gpu_name()))
    os.makedirs(args.out, exist_ok=True)
    return args.out


def write_outputs(rows, out, title, sections, headline=None):
    """results.json (every row, with ratios), results.md (a header, then each section's tables) and the
    sections' plots; sections are (markdown(rows) -> lines, plot(rows, out) -> paths) pairs."""
    add_ratios(rows)
    write_json(rows, out)
    lines = header(rows, title) + (headline or [])
    paths = []
    for markdown, plot in sections:
        lines += markdown(rows)
        paths += plot(rows, out)
    lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths] + [""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {len(rows)} rows to {out}/results.json, results.md and {len(paths)} plots")
