"""The anatomy of one training step: where its GPU time goes, how busy the GPU is, how many kernels it launches.

    python -m bench.profile_step                     # our default path: DeepSpeed ZeRO-0 autocast, auto kernels
    python -m bench.profile_step --peer              # the nanoGPT recipe (bench.e2e's peer)
    python -m bench.profile_step [--recipe deepspeed|torch] [--attn-impl A] [--loss-impl L] [--norm-impl N]
                                 [--mlp-impl M] [--no-residual-in-fp32]
                                 [--compile|--no-compile] [--compile-mode reduce-overhead]
                                 [--zero N] [--precision bf16|autocast] [--steps 5] [--smoke] [--json FILE]

The step is bench.e2e's, built the same way (gpt1.runtime for the DeepSpeed path, as gpt1.train builds it).
Defaults follow gpt1.train: attention and loss "auto" (our Triton kernels on a GPU, SDPA and the eager loss
on a CPU), compiled on a GPU and not on a CPU. Shapes: the paper's 117M model at T=512, micro batch 32 on a
GPU; gpt1-tiny (V=512) at T=32, micro batch 1 on a CPU or with --smoke.

On a GPU, after warm-up, torch.profiler records --steps steps with CUDA activity only (recording the CPU side
as well would slow the host and understate how busy the GPU is):
- wall ms per step: perf_counter around the profiled steps, synchronized before and after;
- GPU kernel ms per step: the summed durations of kernels, memcpys and memsets;
- GPU busy: the union of those intervals (streams overlap) over the wall time;
- kernels per step: kernel events (memcpy and memset events are counted apart, as copies);
- host syncs per step: CUDA runtime/driver calls named *Synchronize (cudaDeviceSynchronize,
  cudaStreamSynchronize, cudaEventSynchronize) less the profiling's own two;
- ms and kernels per step by family, from the kernel's name (FAMILIES; the first match wins, so a kernel that
  Inductor fused from a layer norm and an add counts as layernorm).

Everywhere (the CPU's only measure): operators per step. torch.profiler with CPU activity records one step
and counts the outermost operators: aten::* and c10d::* operators and Triton launches, each not called from
inside another of them (aten::linear counts, the aten::addmm inside it does not). A Triton launch counts as
one operator, triton::<kernel> (under the interpreter a profiler range around the launch: on a GPU it is one
launch, while the interpreter's own tensor work inside it is not). Our custom ops (gpt1_kernels::*) are
transparent: what they launch is counted, so the count does not depend on whether a kernel is reached through
the custom op or an autograd.Function. Views count like any other operator: each costs a dispatch on the host.
This is the GPU-free proxy for launches that tests/test_profile_step.py pins for gpt1-tiny. Beside it, sync
ops per step: aten::_local_scalar_dense calls at any depth (.item(), bool(tensor)), each a wait for the GPU
there. A synchronize called outside the dispatcher (torch.cuda.synchronize, DeepSpeed's timers) shows only on
the GPU, in host syncs per step; on a CPU, torch's fused AdamW reads its step with .item() per parameter group or
tensor, which it does not on a GPU.

Everywhere, where the host's time goes: cProfile over --steps more steps (no synchronize inside the loop, so on
a GPU the host runs ahead as in training until the launch queue fills): host ms per step (cProfile's total,
its own overhead included, so read the shares rather than the sum), self time per step by package (HOST_PACKAGES:
DeepSpeed, Triton's launcher, torch's compiled-graph runtime, our kernels' Python, ...) and the functions with
the most self time. On a host-bound GPU step this says which Python to remove; the GPU profile cannot.
"""

import contextlib
import cProfile
import json
import os
import pstats
import re
import tempfile
import time
from collections import Counter

from . import common

# (family, pattern on the kernel name); the first that matches wins, "elementwise" takes the rest
FAMILIES = (
    ("communication", r"nccl|allreduce|all_reduce|reduce_scatter|allgather"),
    ("attention", r"_attn_|flash|fmha|sdpa|attention|cudnn"),
    ("loss", r"cross_entropy|nll_loss|LogSoftMax|log_softmax"),
    ("optimizer", r"adam|Adam|multi_tensor|foreach|lpnorm"),
    ("layernorm", r"layer_norm|LayerNorm|layernorm|_add_ln_"),
    ("copies", r"^Memcpy|^Memset|direct_copy|CatArray|copy_kernel"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|_mm_|addmm|bmm|splitK|triton_tem_"),
)
FAMILY_NAMES = tuple(f for f, _ in FAMILIES) + ("elementwise",)
TOP_KERNELS = 40  # kernels listed per anatomy, the costliest first
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome-trace categories of GPU work
# gpt1.runtime.COMPILE_MODES, written out: importing gpt1 imports triton, which must wait until main has chosen
# the interpreter (tests/test_profile_step.py checks the two agree)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# and gpt1.config's kernel choices, likewise (tests/test_profile_step.py checks that they agree)
ATTN_IMPLS, LOSS_IMPLS = ("auto", "eager", "sdpa", "triton"), ("auto", "eager", "triton", "triton_linear")
NORM_IMPLS = MLP_IMPLS = ("eager", "triton")
IDLE_GAP_US = 20.0  # a GPU idle gap at least this long counts (shorter ones are launch latency)
OPERATOR = re.compile(r"^(\w+)::\w")  # namespace::name
SYNCING_OPS = ("aten::_local_scalar_dense",)  # .item(), bool(t), is_nonzero: a device-to-host copy and a wait
COUNTED = ("aten", "c10d", "triton")  # counted namespaces; others (autograd::, gpt1_kernels::) are transparent
# (package, pattern on a cProfile entry's file path or built-in name); the first that matches wins
HOST_PACKAGES = (
    ("deepspeed", r"/deepspeed/"),
    ("triton launcher", r"/triton/|triton_launcher|__triton_launcher"),
    ("compiled graphs", r"/torch/_inductor/|/torch/_dynamo/|/torch/_functorch/|torchinductor|<eval_with_key>"),
    ("our kernels", r"/kernels/"),
    ("gpt1", r"/gpt1/"),
    ("optimizer", r"/torch/optim/"),
    ("autograd engine", r"run_backward|/torch/autograd/"),
    ("torch", r"/torch/|<built-in method torch|<method '.*' of 'torch"),
)


def kernel_family(name):
    for family, pattern in FAMILIES:
        if re.search(pattern, name):
            return family
    return "elementwise"


def _merged(intervals):
    """The union of (start, end) intervals as disjoint (start, end) segments, in order."""
    segments = []
    for a, b in sorted(intervals):
        if segments and a <= segments[-1][1]:
            segments[-1][1] = max(segments[-1][1], b)
        else:
            segments.append([a, b])
    return segments


def busy_us(intervals):
    """Length of the union of (start, end) intervals."""
    return sum(b - a for a, b in _merged(intervals))


def gpu_anatomy(trace_events, steps, wall_ms, own_syncs=0):
    """The per-step GPU columns from chrome-trace events ({"cat", "name", "ts", "dur"}, microseconds);
    own_syncs: synchronize calls of the profiling itself, not counted as the step's."""
    gpu = [e for e in trace_events if e.get("ph", "X") == "X" and e.get("cat") in GPU_CATEGORIES]
    syncs = [e for e in trace_events if e.get("cat") in ("cuda_runtime", "cuda_driver")
             and "Synchronize" in e.get("name", "")]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    families = {f: {"ms": 0.0, "count": 0.0} for f in FAMILY_NAMES}
    for e in gpu:
        fam = families["copies" if e["cat"] != "kernel" else kernel_family(e["name"])]
        fam["ms"] += e["dur"] / 1e3 / steps
        fam["count"] += 1 / steps
    top, launches = Counter(), Counter()
    for e in kernels:
        top[e["name"][:120]] += e["dur"] / 1e3 / steps
        launches[e["name"][:120]] += 1 / steps
    union_ms = busy_us([(e["ts"], e["ts"] + e["dur"]) for e in gpu]) / 1e3 / steps
    copies = Counter(" ".join(e["name"].split()[:2]) for e in gpu if e["cat"] != "kernel")  # "Memcpy HtoD", ...
    runtime = {}
    for e in trace_events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("ph", "X") == "X":
            n_ms = runtime.setdefault(e["name"], [0, 0.0])
            n_ms[0] += 1
            n_ms[1] += e.get("dur", 0) / 1e3
    gaps = idle_gaps_us([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    return {"wall_ms": wall_ms, "gpu_kernel_ms": sum(e["dur"] for e in gpu) / 1e3 / steps,
            "gpu_busy": union_ms / wall_ms if wall_ms else None, "kernels_per_step": len(kernels) / steps,
            "copies_per_step": (len(gpu) - len(kernels)) / steps,
            # our own synchronizes missing from the trace: runtime calls were not recorded, the count is unknown
            "host_syncs_per_step": (len(syncs) - own_syncs) / steps if len(syncs) >= own_syncs else None,
            "families": families,
            # [name, ms/step, launches/step, family]: enough of them that the elementwise family is accounted for
            "top_kernels": [[name, ms, launches[name], kernel_family(name)]
                            for name, ms in top.most_common(TOP_KERNELS)],
            # a host-to-device copy from pageable memory waits for the stream: a sync the counts above miss
            "copies_by_kind": {k: n / steps for k, n in copies.most_common()},
            # where the host's CUDA calls spend their time (a launch that blocks: the launch queue is full, the GPU
            # is the bottleneck; a long cudaMemcpyAsync or cudaStreamSynchronize: the host waits on the GPU)
            "runtime_calls": [[name, n / steps, ms / steps] for name, (n, ms) in
                              sorted(runtime.items(), key=lambda kv: -kv[1][1])[:10]],
            # GPU idle between activities: spread thin (the host cannot keep up) or in a few long gaps (a wait)
            "idle_gaps_per_step": sum(1 for g in gaps if g >= IDLE_GAP_US) / steps,
            "idle_gap_ms_per_step": sum(g for g in gaps if g >= IDLE_GAP_US) / 1e3 / steps,
            "longest_idle_gaps_ms": [g / 1e3 for g in sorted(gaps, reverse=True)[:5]]}


def idle_gaps_us(intervals):
    """The lengths of the gaps between the union of (start, end) intervals (the GPU's idle stretches inside the
    profiled window)."""
    segments = _merged(intervals)
    return [b[0] - a[1] for a, b in zip(segments, segments[1:])]


def count_operators(events):
    """(outermost operators, all operators, Counter of the outermost by name) of profiler FunctionEvents."""
    def is_op(e):
        m = OPERATOR.match(e.name)
        return bool(m) and m.group(1) in COUNTED

    ops = [e for e in events if is_op(e)]
    outer = [e for e in ops if not _has_op_ancestor(e, is_op)]
    return len(outer), len(ops), Counter(e.name for e in outer)


def _has_op_ancestor(e, is_op):
    p = e.cpu_parent
    while p is not None:
        if is_op(p):
            return True
        p = p.cpu_parent
    return False


@contextlib.contextmanager
def triton_launches_as_ops():
    """Under the Triton interpreter, wrap each kernel launch in a profiler range named triton::<kernel>, so
    that it counts as one operator and the interpreter's own tensor work inside it does not."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def traced(self, *args, **kwargs):
        with torch.profiler.record_function(f"triton::{self.fn.__name__}"):
            return run(self, *args, **kwargs)

    InterpretedFunction.run = traced
    try:
        yield
    finally:
        InterpretedFunction.run = run


def own_operators(events, steps):
    """[[name, calls per step, host us per call]] of our custom operators (gpt1_kernels::*), costliest first: each
    call's CPU time under the profiler with everything it runs (our Python, allocations, the Triton launches), the
    host's price of an operator that the GPU does not see."""
    times = {}
    for e in events:
        if e.name.startswith("gpt1_kernels::"):
            times.setdefault(e.name, []).append(e.cpu_time_total)
    rows = [[name, len(t) / steps, sum(t) / len(t)] for name, t in times.items()]
    return sorted(rows, key=lambda r: -r[1] * r[2])


def operators(step, steps=1):
    """Operators per step of step() (see the module docstring), with the 15 most frequent, and our own operators'
    host time (own_operators)."""
    from torch.profiler import ProfilerActivity, profile

    with triton_launches_as_ops(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.events()
    outer, total, names = count_operators(events)
    syncing = sum(e.name in SYNCING_OPS for e in events)
    return {"ops_per_step": outer / steps, "ops_all_per_step": total / steps, "sync_ops_per_step": syncing / steps,
            "top_ops": [[n, c / steps] for n, c in names.most_common(15)],
            "own_ops": own_operators(events, steps)}


def host_package(filename, funcname):
    """The HOST_PACKAGES group of a cProfile entry (its file, or "~" and the built-in's name); "other" else."""
    where = f"{filename}:{funcname}" if filename != "~" else funcname
    for package, pattern in HOST_PACKAGES:
        if re.search(pattern, where):
            return package
    return "other"


def host_anatomy(step, steps=5):
    """Where the host's time goes over `steps` steps (module docstring): {"host_ms_per_step", "host_by_package":
    {package: self ms per step}, "host_top_functions": [[function, self ms per step, calls per step], ...]}."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, function): (primitive calls, calls, self s, cumulative s, ...)}
    by_package, functions = Counter(), []
    for (filename, line, funcname), (_, calls, self_s, _, _) in stats.items():
        ms = self_s * 1e3 / steps
        by_package[host_package(filename, funcname)] += ms
        name = funcname if filename == "~" else f"{os.path.basename(filename)}:{line}({funcname})"
        functions.append([name, ms, calls / steps])
    functions.sort(key=lambda f: -f[1])
    return {"host_ms_per_step": sum(by_package.values()),
            "host_by_package": dict(sorted(by_package.items(), key=lambda kv: -kv[1])),
            "host_top_functions": functions[:15]}


def anatomy(step, device, steps=5, host=True):
    """The step's anatomy (module docstring) over `steps` profiled steps after the caller's warm-up: the GPU
    columns on a CUDA device, operators per step (one step) everywhere, and with `host` the host's time."""
    import torch

    out = {"profiled_steps": steps}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) * 1e3 / steps
        out.update(gpu_anatomy(_trace_events(prof), steps, wall_ms, own_syncs=2))  # the two synchronizes above
    t0 = time.perf_counter()
    out.update(operators(step))
    out.setdefault("wall_ms", (time.perf_counter() - t0) * 1e3)  # CPU: the one step under the CPU profiler
    if host and device.type == "cuda":
        out.update(host_anatomy(step, steps))
        torch.cuda.synchronize()
    elif host:  # the CPU computes inside the calls: one step shows the split, and the interpreter is slow
        out.update(host_anatomy(step, 1))
    return out


def _trace_events(prof):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def format_anatomy(a, title):
    lines = [title]
    if "gpu_busy" in a:
        lines.append(f"wall {a['wall_ms']:.2f} ms/step, GPU kernels {a['gpu_kernel_ms']:.2f} ms/step, GPU busy "
                     f"{a['gpu_busy']:.1%}, {a['kernels_per_step']:.0f} kernels/step (+{a['copies_per_step']:.0f} "
                     f"memcpy/memset), {common.fmt(a['host_syncs_per_step']) or 'unknown'} host syncs/step, over "
                     f"{a['profiled_steps']} profiled steps")
        lines.append(f"{'family':<14} {'ms/step':>8} {'share':>7} {'launches/step':>14}")
        for fam in FAMILY_NAMES:
            f = a["families"][fam]
            share = f["ms"] / a["gpu_kernel_ms"] if a["gpu_kernel_ms"] else 0.0
            lines.append(f"{fam:<14} {f['ms']:>8.3f} {share:>7.1%} {f['count']:>14.0f}")
        lines.append(f"top kernels: {'ms/step':>8} {'launches/step':>14} {'family':<12} name")
        lines += [f"{'':<12} {ms:>8.3f} {n:>14.1f} {fam:<12} {name}" for name, ms, n, fam in a["top_kernels"]]
        if "idle_gaps_per_step" in a:
            lines.append(f"GPU idle gaps >= {IDLE_GAP_US:.0f} us: {a['idle_gaps_per_step']:.0f}/step, "
                         f"{a['idle_gap_ms_per_step']:.2f} ms/step; longest (ms): "
                         + ", ".join(f"{g:.2f}" for g in a["longest_idle_gaps_ms"]))
            lines.append("copies per step by kind: " + (", ".join(f"{k} {n:.0f}" for k, n in
                                                                 a["copies_by_kind"].items()) or "none"))
            lines.append("host CUDA calls (calls/step, ms/step): " + "; ".join(
                f"{n} {c:.0f} {ms:.2f}" for n, c, ms in a["runtime_calls"][:8]))
    else:
        lines.append(f"wall {a['wall_ms']:.1f} ms for one step under the CPU profiler (not a GPU measurement)")
    lines.append(f"operators per step: {a['ops_per_step']:.0f} (outermost aten/c10d operators and Triton launches; "
                 f"{a['ops_all_per_step']:.0f} with the nested ones)")
    lines.append(f"sync ops per step (aten::_local_scalar_dense: .item(), bool(tensor)): {a['sync_ops_per_step']:.0f}")
    lines.append("top operators: " + ", ".join(f"{n} {c:.0f}" for n, c in a["top_ops"]))
    if a.get("own_ops"):
        lines.append("our operators (calls per step, host us per call): "
                     + ", ".join(f"{n} {c:.0f}, {us:.0f}" for n, c, us in a["own_ops"]))
    if "host_ms_per_step" in a:
        lines.append(f"host (cProfile, its overhead included): {a['host_ms_per_step']:.2f} ms/step; self ms/step by "
                     "package: " + ", ".join(f"{p} {ms:.2f}" for p, ms in a["host_by_package"].items()))
        lines.append("top host functions (self ms/step, calls/step): " + "; ".join(
            f"{n} {ms:.3f} ({c:.0f})" for n, ms, c in a["host_top_functions"][:10]))
    return "\n".join(lines)


def parse_args(argv):
    parser = common.cli_parser(__doc__.splitlines()[0], out=False, budget=False)
    parser.add_argument("--recipe", choices=("deepspeed", "torch"), default="deepspeed",
                        help="deepspeed: gpt1.runtime's engine (our training path); torch: the nanoGPT recipe")
    parser.add_argument("--peer", action="store_true", help="the nanoGPT recipe: torch, sdpa/eager, compiled")
    parser.add_argument("--attn-impl", default="auto", choices=ATTN_IMPLS, help="eager, sdpa, triton, auto")
    parser.add_argument("--loss-impl", default="auto", choices=LOSS_IMPLS, help="eager, triton, triton_linear, auto")
    parser.add_argument("--norm-impl", default="eager", choices=NORM_IMPLS,
                        help="eager, triton (residual dropout + add + LayerNorm)")
    parser.add_argument("--mlp-impl", default="eager", choices=MLP_IMPLS, help="eager, triton (the MLP's bias + GELU)")
    parser.add_argument("--residual-in-fp32", action=__import__("argparse").BooleanOptionalAction, default=True,
                        help="under autocast, the residual stream in fp32 (default) or bf16")
    parser.add_argument("--compile", action=__import__("argparse").BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on a GPU, off on a CPU)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile's mode (reduce-overhead: CUDA graphs), as gpt1.train's --compile-mode")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                        help="ZeRO stage (deepspeed recipe; default 0, as gpt1.train's default config)")
    parser.add_argument("--precision", default="autocast", choices=("bf16", "autocast"),
                        help="deepspeed recipe (default autocast, as gpt1.train's default config): bf16 "
                             "(ds_configs/zero<N>_bf16.json) or autocast (zero<N>_autocast_bf16.json: fp32 weights "
                             "under torch_autocast)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps on a GPU (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5 on a GPU, 2 on a CPU)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--json", default=None, help="also write the anatomy to this JSON file")
    args = parser.parse_args(argv)
    common.check_at_least(parser, args, steps=1, micro_batch=1, warmup=0)
    return args


def profile_recipe(recipe, smoke=False, tiny=False, steps=5, warmup=None, micro_batch=None):
    """Build recipe's step (bench.e2e), warm it up and return its anatomy with the row's description.
    tiny: gpt1-tiny shapes; smoke: also compile with dynamo's eager backend (a trace check, no Inductor)."""
    import torch

    from . import e2e

    s = e2e.settings(smoke or tiny, micro_batch)
    dev = e2e.init()
    step, teardown = e2e.build_step(recipe, s, smoke, dev)
    try:
        for _ in range(warmup if warmup is not None else (5 if dev.type == "cuda" else 2)):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        a = anatomy(step, dev, steps)
    finally:
        teardown()
    return dict(common.environment(smoke), **e2e.describe(recipe, s), **a)


def main(argv=None):
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is first imported
    from . import e2e

    if args.peer:
        recipe = e2e.NANOGPT
    else:
        recipe = e2e.Recipe("profiled", args.recipe, args.attn_impl, args.loss_impl, args.compile,
                            args.zero if args.recipe == "deepspeed" else None, precision=args.precision,
                            norm=args.norm_impl, compile_mode=args.compile_mode, mlp=args.mlp_impl,
                            residual_in_fp32=args.residual_in_fp32)
    a = profile_recipe(e2e.resolve(recipe), args.smoke, not torch.cuda.is_available(), args.steps, args.warmup,
                       args.micro_batch)
    print(format_anatomy(a, f"profile_step: {a['description']}; {a['gpu']}; commit {a['commit']}"))
    if args.json:
        with common.open_for_writing(args.json) as f:
            json.dump(a, f, indent=1)


if __name__ == "__main__":
    main()
