"""Shared benchmark machinery: environment columns, timing, peak memory, result rows, Markdown and plots.

A result row is a flat dict: the environment (gpu, torch, triton, deepspeed, commit, smoke), the bench and
table it belongs to, the x-axis value, the provider, the mode (fwd, bwd, fwd+bwd or step), a status with a
reason, and the measured columns (GPU ms with its 20th/80th percentiles, host-included ms, a throughput
column, peak memory). A row that was not measured carries no number. Statuses (STATUSES):

- ok: measured.
- n/a: the mode does not apply to the provider (a cross-entropy that computes its gradient in the forward
  has no separate backward to time).
- oom: out of GPU memory.
- skipped: the provider cannot run here, for one of two reasons only: its package is not installed, or its
  backend refuses these inputs in the documented way (SDPA's "No available kernel", see `refusable`).
- not run: the time budget was spent before the row's turn.
- error: anything else. A failure of ours or of the harness is an error, never a skip; the smoke test fails
  on any error row.
"""

import contextlib
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

QUANTILES = (0.5, 0.2, 0.8)  # median, then the spread reported beside it
MIN_REPS = 25  # timed calls at the least, so that a slow op (13 ms) still gets a median and a spread
HOST_TARGET_MS = 20.0  # back-to-back calls per host-included sample: about this long, 3 to 200 calls
OURS = "ours"
EAGER = "eager"
STATUSES = ("ok", "n/a", "oom", "skipped", "not run", "error")
# The documented refusals of a backend that cannot take these inputs (torch's SDPA with one backend forced;
# flash-attn before Ampere): a RuntimeError with one of these messages means "skipped", not "error".
REFUSALS = ("No available kernel", "No viable backend for scaled_dot_product_attention",
            "FlashAttention only supports Ampere GPUs or newer")


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
    """The checkout's commit, with "-dirty" when the tree has changes; read-only git calls only. $GIT_COMMIT, when
    set, wins: a copy without .git (the GPU machine's) gets it from the command that started the run."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               check=False, cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def gpu_name():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(smoke):
    import torch

    return {"gpu": gpu_name(), "torch": torch.__version__, "triton": _version("triton"),
            "deepspeed": _version("deepspeed"), "commit": git_commit(), "smoke": bool(smoke), **host()}


def cpu_model():
    """The host CPU's model name (/proc/cpuinfo), or platform's guess where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores():
    """The cores this process may run on (its affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def host_load():
    """The 1-minute load average over the cores this process may use: above ~1, other work competes for them."""
    try:
        return round(os.getloadavg()[0] / usable_cores(), 2)
    except OSError:
        return None


def dispatch_us(calls=2000, repeats=5):
    """The host's speed at what a host-bound step does: microseconds per eager torch operator call (an add into
    an 8-element CPU tensor: Python, dispatch, no arithmetic to speak of), the median of `repeats` runs."""
    import torch

    x, out = torch.zeros(8), torch.empty(8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.add(x, x, out=out)
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return round(statistics.median(times), 3)


def host():
    """The host as a step's host time depends on it, carried by every row: a step that waits on the host runs at
    the speed of this CPU, so two runs' host-bound rows compare only through these. host_cpu (model name),
    host_cores (usable), host_load (host_load(), at the start), host_dispatch_us (dispatch_us())."""
    return dict(zip(host_fields(), (cpu_model(), usable_cores(), host_load(), dispatch_us())))


def host_fields():
    return ("host_cpu", "host_cores", "host_load", "host_dispatch_us")


def host_line(env):
    """One line on the host for a results header ("" for rows written before these fields existed)."""
    if not env.get("host_cpu"):
        return ""
    load = f", load {env['host_load']:.2f} per core at the start" if env.get("host_load") is not None else ""
    return (f"Host: {env['host_cpu']}, {env.get('host_cores')} cores{load}; an eager torch operator call takes "
            f"{env.get('host_dispatch_us')} us on it (`common.dispatch_us`: compare it between runs before "
            "comparing host-bound rows).")


def peak_bf16_tflops(name):
    """The GPU's dense bf16 peak in TFLOP/s, or None for a device not in gpt1.runtime.PEAK_BF16_TFLOPS (imported
    here, when asked: gpt1 imports triton, which must not load before --smoke has chosen the interpreter)."""
    from gpt1.runtime import peak_bf16_tflops as peak

    return peak(name)


def gpu_slug(name):
    """A directory name for one GPU model: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


# ----------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------


def measure_ms(fn, smoke, grad_to_none=None, warmup=10, rep=40, graph=False):
    """{"ms", "ms_p20", "ms_p80", "host_ms", "rep_ms"} of fn(), and with `graph` "graph_ms" (+ p20/p80).

    On a GPU, two timings side by side, three with `graph`:
    - ms (with p20/p80): GPU time, triton.testing.do_bench (warm-up, L2 cache cleared before each call, CUDA
      events around each call), over at least MIN_REPS calls: `rep` grows to fit them for a slow op. Where one
      call is several kernels with Python between them, a GPU that waits for the host's next launch counts the
      wait: for a short call this is partly launch time;
    - host_ms: the call as the model makes it, Python, launches and kernels together: the wall-clock time of
      back-to-back calls with one synchronize at the end, divided by their number (median of 3 such runs).
      Where the host cannot launch as fast as the GPU runs, host_ms is the larger;
    - graph_ms: the kernels alone, as a step replayed from a CUDA graph runs them (`graph_ms`); None, with
      graph_reason, where fn cannot be captured (a host sync inside, say).
    In --smoke (CPU): one call's wall-clock time after one warm-up, which only shows that the provider runs."""
    if smoke:
        call_ms = _host_ms(fn, grad_to_none, n=1, runs=1, sync=False)
        out = {"ms": call_ms, "ms_p20": call_ms, "ms_p80": call_ms, "host_ms": call_ms, "rep_ms": 0.0}
        return dict(out, graph_ms=None, graph_reason="no CUDA graphs without a GPU") if graph else out
    import triton.testing

    host = host_ms(fn, grad_to_none)
    rep = max(rep, MIN_REPS * host)  # host time >= GPU time, so do_bench repeats at least MIN_REPS times
    ms, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                           quantiles=list(QUANTILES))
    out = {"ms": ms, "ms_p20": p20, "ms_p80": p80, "host_ms": host, "rep_ms": rep}
    if graph:
        try:
            out["graph_ms"], out["graph_ms_p20"], out["graph_ms_p80"] = graph_ms(fn, grad_to_none, ms)
        except Exception as exc:  # noqa: BLE001 - an uncapturable provider keeps its other timings
            out.update(graph_ms=None, graph_reason=f"not capturable: {failure(exc)[1]}"[:200])
    return out


GRAPH_TARGET_MS, GRAPH_REPLAYS = 5.0, 10  # calls per captured graph: about this much GPU time, 3 to 200


def graph_ms(fn, grad_to_none=None, estimate_ms=None):
    """(median, p20, p80) ms per call of fn() replayed from a CUDA graph: n calls captured back to back (n from
    estimate_ms: about GRAPH_TARGET_MS of work), the graph replayed GRAPH_REPLAYS times, each replay timed with
    CUDA events and divided by n. No host between the kernels and no L2 clearing: each call finds in L2 what
    the one before left there, as a layer's kernels do in a training step. grad_to_none's gradients are reset
    to None before each captured call, so a backward writes fresh gradients rather than accumulating."""
    import torch

    n = min(200, max(3, int(GRAPH_TARGET_MS / max(estimate_ms or 1.0, 1e-3))))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(n):
                for t in grad_to_none or ():
                    t.grad = None
                fn()
        graph.replay()  # warm-up
        times = []
        for _ in range(GRAPH_REPLAYS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / n)
    finally:
        for t in grad_to_none or ():  # nothing of the graph's private pool stays referenced after it
            t.grad = None
        graph.reset()
        torch.cuda.synchronize()
    return spread(times)


def host_ms(fn, grad_to_none=None):
    """Host-included ms per call of fn(): back-to-back calls (about HOST_TARGET_MS of them, 3 to 200) with a
    synchronize after the last; the median of 3 such runs."""
    one = _host_ms(fn, grad_to_none, n=1, runs=1)  # also the warm-up
    n = min(200, max(3, int(HOST_TARGET_MS / max(one, 1e-3))))
    return _host_ms(fn, grad_to_none, n=n, runs=3)


def _host_ms(fn, grad_to_none, n, runs, sync=True):
    import torch

    def synchronize():
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()

    samples = []
    fn()  # warm-up
    for _ in range(runs):
        synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            for t in grad_to_none or ():
                t.grad = None
            fn()
        synchronize()
        samples.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(samples)


def spread(times):
    """(median, p20, p80) of a list of timings; a single timing is its own spread."""
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=5, method="inclusive")  # the 20th, 40th, 60th and 80th percentiles
    return statistics.median(times), q[0], q[3]


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


GRAD_IN_FORWARD = ("n/a", "computes its gradient in the forward (its fwd row includes the backward's work): "
                               "compare on fwd+bwd")


def time_modes(fn, inputs, modes, smoke, grad_in_forward=False):
    """{mode: measured columns, or status and reason} of fn, a training forward (inputs require grad) that
    returns a tensor, or a tuple of tensors (each then gets a gradient of its own): "fwd" times fn(), "bwd" the
    backward of one retained graph, "fwd+bwd" both. A provider that computes its gradient in the forward
    (grad_in_forward) has no backward of its own: "bwd" is n/a."""
    import torch

    results = {}
    for mode in sorted(modes, key=("fwd", "fwd+bwd", "bwd").index):  # bwd last: its graph stays alive
        out = None
        if mode == "bwd" and grad_in_forward:
            results[mode] = dict(zip(("status", "reason"), GRAD_IN_FORWARD))
            continue
        try:
            call = fn
            if mode != "fwd":
                out = fn()
                outs = out if isinstance(out, tuple) else (out,)
                grads = [None if o.dim() == 0 else torch.randn_like(o) for o in outs]
                if mode == "bwd":
                    call = functools.partial(torch.autograd.backward, outs, grads, retain_graph=True)
                else:
                    out = outs = None
                    call = functools.partial(_forward_backward, fn, grads)
            results[mode] = {"status": "ok", **measure_ms(call, smoke, grad_to_none=inputs, graph=True),
                             "peak_mb": measure_peak_mb(call, grad_to_none=inputs)}
        except Exception as exc:  # noqa: BLE001 - one provider's failure must not end the run
            status, reason = failure(exc)
            results[mode] = {"status": status, "reason": reason}
        out = call = None
        if results[mode]["status"] != "ok":  # the traceback held the failed call's tensors
            free_memory()
    return {m: results[m] for m in modes}


def bandwidth_rows(base, name, call, inputs, nbytes, smoke, deadline):
    """The rows of one provider of a memory-bound op in every mode (time_modes), with GB/s against nbytes(mode),
    the bytes that must move; "not run" rows once the deadline has passed."""
    if deadline.passed():
        return [dict(base, provider=name, mode=m, **NOT_RUN) for m in MODES]
    rows = []
    for mode, res in time_modes(call, inputs, MODES, smoke).items():
        row = dict(base, provider=name, mode=mode, **res)
        if res["status"] == "ok":
            row["gbps"] = nbytes(mode) / (res["ms"] * 1e-3) / 1e9
        rows.append(row)
    return rows


def compiled(fn, smoke):
    """torch.compile(fn) as a provider. On a GPU: inductor with its default automatic dynamic shapes (the
    second shape seen recompiles once for all later ones). In --smoke: dynamo with backend="eager", which
    checks that the function traces without paying a CPU inductor compile.

    AOTAutograd's donated buffers are turned off: the "bwd" timing replays the backward of one retained graph
    (retain_graph=True), which a backward with donated buffers refuses; they save memory, not time."""
    import torch
    import torch._dynamo

    limits = [limit for limit in DYNAMO_LIMITS if hasattr(torch._dynamo.config, limit)]
    if not _dynamo_defaults:  # before raising any: one may be an alias of the other
        _dynamo_defaults.update({limit: getattr(torch._dynamo.config, limit) for limit in limits})
    for limit in limits:  # one compiled function serves every shape
        setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    return torch.compile(fn, backend="eager" if smoke else "inductor")


DYNAMO_LIMITS = ("cache_size_limit", "recompile_limit")
_dynamo_defaults = {}


@contextlib.contextmanager
def dynamo_default_limits():
    """Dynamo's recompile limits as they were before `compiled` raised them, for the duration (a training
    step's recompiles should behave as they do in training)."""
    import torch._dynamo

    raised = {limit: getattr(torch._dynamo.config, limit) for limit in _dynamo_defaults}
    for limit, value in _dynamo_defaults.items():
        setattr(torch._dynamo.config, limit, value)
    try:
        yield
    finally:
        for limit, value in raised.items():
            setattr(torch._dynamo.config, limit, value)


def _forward_backward(fn, grads):
    import torch

    out = fn()
    torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)


def free_memory():
    import torch

    if torch.cuda.is_available():  # on the CPU (--smoke) nothing is measured that a collection would change
        gc.collect()
        torch.cuda.empty_cache()


class Unavailable(Exception):
    """A provider that cannot run here, in a documented way (see REFUSALS): recorded as skipped."""


def refusable(fn):
    """fn, with a backend's documented refusal (a RuntimeError whose message is one of REFUSALS) raised as
    Unavailable; any other exception passes through and is recorded as an error."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            if any(r in str(exc) for r in REFUSALS):
                raise Unavailable(str(exc).splitlines()[0][:200]) from exc
            raise
    return call


def failure(exc):
    """The (status, reason) of a provider that raised: out of memory; skipped when its package is missing
    or its backend refused these inputs (Unavailable); an error otherwise."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom", "torch.cuda.OutOfMemoryError"
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return "oom", str(exc).splitlines()[0][:200]
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] not in OWN_PACKAGES:
        return "skipped", f"not installed: {exc}"
    if isinstance(exc, Unavailable):
        return "skipped", f"refused by the backend: {exc}"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    why = lines[:1] + [line for line in lines[1:] if line.startswith("Explanation:")][:1]  # dynamo says why here
    return "error", f"{type(exc).__name__}: {' '.join(why)}"[:400]


OWN_PACKAGES = ("gpt1", "kernels", "bench")  # a module of ours that does not import is an error, not a skip
NOT_RUN = {"status": "not run", "reason": "time budget"}


class Deadline:
    """A time budget for one bench: once it has passed, the remaining rows are recorded as not run."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds if seconds else math.inf

    def passed(self):
        return time.monotonic() > self.end

    def left(self):
        """Seconds left, None without a budget."""
        return None if self.end == math.inf else self.end - time.monotonic()


# ----------------------------------------------------------------------------------------------------
# Rows, ratios, files
# ----------------------------------------------------------------------------------------------------


def add_ratios(rows):
    """Each ok row gets vs_eager = eager ms / its ms and vs_best_peer = the fastest peer's ms / its ms (above
    1: faster), comparing rows of one (bench, table, x, mode); roles come from `role`. Rows timed from a CUDA
    graph too get the same against the fastest peer by graph ms: vs_best_peer_graph, best_peer_graph."""
    groups = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("ms"):
            groups.setdefault((r["bench"], r["table"], r["x"], r["mode"]), []).append(r)
    for group in groups.values():
        eager = [r for r in group if role(r) == EAGER]
        best = min((r for r in group if role(r) == "peer"), key=lambda r: r["ms"], default=None)
        graphed = [r for r in group if r.get("graph_ms")]
        best_graph = min((r for r in graphed if role(r) == "peer"), key=lambda r: r["graph_ms"], default=None)
        for r in group:
            r["vs_eager"] = eager[0]["ms"] / r["ms"] if eager else None
            r["vs_best_peer"] = best["ms"] / r["ms"] if best else None
            r["best_peer"] = best["provider"] if best else None
            if r.get("graph_ms") and best_graph:
                r["vs_best_peer_graph"] = best_graph["graph_ms"] / r["graph_ms"]
                r["best_peer_graph"] = best_graph["provider"]
    return rows


def role(row):
    """"ours" (any provider named ours...), "eager" (the reference) or "peer"; a row may set its own."""
    if "role" in row:
        return row["role"]
    return EAGER if row["provider"] == EAGER else OURS if row["provider"].startswith(OURS) else "peer"


def open_for_writing(path):
    """open(path, "w"), its folder made first (a --json FILE in a folder that does not exist yet)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return open(path, "w")


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


fmt = _fmt


def markdown_table(rows, columns):
    """A Markdown table of rows; columns are (header, key or function of the row)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [_fmt(key(r) if callable(key) else r.get(key)) for _, key in columns]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def value_or_status(key, digits=3):
    """A cell showing the row's number, or its status (n/a, oom, skipped, not run, error) when it has none."""
    def cell(r):
        return _fmt(r.get(key), digits) if r.get("status") == "ok" else r.get("status")
    return cell


def spread_cell(r):
    """"p20-p80" of an ok row's ms."""
    return f"{_fmt(r['ms_p20'], 4)}-{_fmt(r['ms_p80'], 4)}" if r.get("status") == "ok" and "ms_p20" in r else ""


def graph_cell(r):
    """An ok row's graph ms, "-" where it was not captured (graph_reason says why), empty otherwise."""
    if r.get("status") != "ok":
        return ""
    return _fmt(r["graph_ms"]) if r.get("graph_ms") else "-" if "graph_reason" in r else ""


def graph_ratio_cell(r):
    """"1.23x (peer)": the row's speed-up over the fastest peer by graph ms, and which peer that was."""
    return f"{r['vs_best_peer_graph']:.2f}x ({r['best_peer_graph']})" if r.get("vs_best_peer_graph") else ""


def ratio(key):
    def cell(r):
        return f"{r[key]:.2f}x" if r.get(key) else ""
    return cell


def header(rows, title, env=None):
    env = env if env is not None else rows[0] if rows else {}
    lines = [f"# {title}", ""]
    if env.get("smoke"):
        where = "CPU interpreter" if str(env.get("gpu")).startswith("cpu") else "tiny shapes"
        lines += [(f"**SMOKE ({where}) - not a speed measurement.** These rows only show that the "
                   "harness and every provider run; their times are meaningless."), ""]
    lines += [(f"GPU: {env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, "
               f"deepspeed {env.get('deepspeed')}; commit {env.get('commit')}"), "",
              *([host_line(env), ""] if host_line(env) else []),
              ("Two timings per op: `ms` is GPU time (triton.testing.do_bench median over at least "
               f"{MIN_REPS} calls, L2 cleared before each; `p20`-`p80` its spread); `host ms` is the call as "
               "the model makes it (Python, launch and kernel: back-to-back calls, one synchronize at the end, "
               "divided by their number). Where host ms is the larger, the call is launch-bound. `graph ms` is "
               "the kernels alone: calls captured back to back in a CUDA graph and replayed, as a graph-replayed "
               "training step runs them (no host between kernels, L2 not cleared; `-` where the provider cannot "
               "be captured); `graph vs best peer` compares it with the fastest peer's graph ms."), "",
              ("Statuses: `n/a` the mode does not apply (a gradient computed in the forward), `skipped` the "
               "package is not installed or the backend refused these inputs, `not run` the time budget was "
               "spent, `error` anything else."), "",
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
        rows_by_x = sorted(sections[(table, mode)], key=lambda r: r["x"])  # stable: providers keep their order
        lines += [f"### {table}, {mode}", "", markdown_table(rows_by_x, columns), ""]
    return lines


def unavailable(rows):
    """One line per provider that never ran, with its first reason, so skips are not silent."""
    seen = {}
    for r in rows:
        if r.get("status") in ("skipped", "error") and (r["provider"], r["status"]) not in seen:
            seen[(r["provider"], r["status"])] = r.get("reason")
    return [f"- `{p}` {status}: {why}" for (p, status), why in seen.items()]


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


def ms_plots(rows, bench, out_dir):
    """One plot per table of `bench`'s rows, ms against N per provider and mode, as <bench>_<i>.png."""
    import os

    rows, paths = [r for r in rows if r["bench"] == bench], []
    for i, table in enumerate(dict.fromkeys(r["table"] for r in rows)):
        path = os.path.join(out_dir, f"{bench}_{i}.png")
        paths.append(line_plot(rows, "ms", path, f"{table}: ms against N (lower is better)", "N tokens", "ms",
                               [(table, m) for m in MODES]))
    return paths


# the table of a memory-bound op (bench.layer_norm, bench.gelu): one row per N and provider
BANDWIDTH_COLUMNS = [("N", "N"), ("provider", "provider"), ("ms", value_or_status("ms")), ("p20-p80", spread_cell),
                     ("host ms", value_or_status("host_ms")), ("graph ms", graph_cell),
                     ("GB/s", value_or_status("gbps")), ("peak MiB", value_or_status("peak_mb", 5)),
                     ("vs eager", ratio("vs_eager")), ("vs best peer", ratio("vs_best_peer")),
                     ("best peer", "best_peer"), ("graph vs best peer", graph_ratio_cell), ("note", "reason")]


def cli_parser(description, out=True, budget=True):
    """The benches' parser: --smoke, and --out / --budget-s for those that write a directory / have a budget. Its
    parse_args refuses a negative or non-finite budget and an --out that cannot be a directory (a file, or under
    one), before any work, and creates --out."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def parse_args(self, args=None, namespace=None):
            a = super().parse_args(args, namespace)
            if budget and not (0 <= a.budget_s < math.inf):
                self.error(f"--budget-s must be a finite number >= 0 (0: none), got {a.budget_s}")
            if out and a.out is not None:
                try:
                    os.makedirs(a.out, exist_ok=True)
                except OSError as e:
                    self.error(f"--out {a.out}: cannot be a directory ({e.strerror})")
            return a

    parser = Parser(description=description)
    if out:
        parser.add_argument("--out", default=None, help="output directory (default: bench/results/<gpu>, "
                                                        "or runs/bench-smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter "
                                                              "(tests the harness; not a speed measurement)")
    if budget:
        parser.add_argument("--budget-s", type=float, default=0, help="time budget in seconds (0: none); rows left "
                                                                      "when it runs out are recorded as not run")
    return parser


def check_at_least(parser, args, **lows):
    """A usage error for the first of these flags (by dest) below its low end; None (a flag's default) passes."""
    for dest, low in lows.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            parser.error(f"--{dest.replace('_', '-')} must be at least {low}, got {value}")


def out_dir(args):
    if args.out is None:
        args.out = "runs/bench-smoke" if args.smoke else os.path.join("bench", "results", gpu_slug(gpu_name()))
    os.makedirs(args.out, exist_ok=True)
    return args.out


def write_outputs(rows, out, title, sections, headline=None, env=None):
    """results.json (every row, with ratios), results.md (a header, then each section's tables) and the
    sections' plots; sections are (markdown(rows) -> lines, plot(rows, out) -> paths) pairs. env: the run that the
    header describes (default: the first row's)."""
    add_ratios(rows)
    write_json(rows, out)
    lines = header(rows, title, env) + (headline or [])
    paths = []
    for markdown, plot in sections:
        lines += markdown(rows)
        paths += plot(rows, out)
    lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths] + [""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {len(rows)} rows to {out}/results.json, results.md and {len(paths)} plots")
