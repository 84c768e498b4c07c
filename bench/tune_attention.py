"""Attention launch-config tuner: the measured table that kernels/attention.py reads (kernels/attention_tuned.json).

    python -m bench.tune_attention [--out DIR] [--budget-s S]    # one CUDA GPU; about a minute on an H100
    python -m bench.tune_attention --smoke --out DIR              # CPU, Triton interpreter: tests the harness

What it measures: bf16, causal, head dims 64 (GPT-1's) then 128, T in 128 ... 2048 (B*T = 16384, H = 12, q, k, v
laid out as the model's fused qkv projection), dropout 0.1 (GPT-1 trains with it) then 0; for each kernel (fwd, dq,
dkdv) a pruned candidate list: the `_CONFIGS` entry and its neighbours one knob away (BLOCK_M or BLOCK_N doubled
or halved, 4 -> 8 warps, one pipeline stage more or less; see `candidates`), plus any config the committed table
holds and its neighbours, so that each run climbs one step from where the last stopped. Each candidate is
launched once and its outputs compared with the default config's: equal up to bf16 rounding (other tiles sum
in another order), the dropout mask bit for bit. A candidate that fails to compile or launch, spills registers
(the compiled kernel's n_spills) or computes something else is rejected and reported.
The rest are timed with triton.testing.do_bench (median; the backward kernels on their own, reading the default
forward's lse and mask and the default dq kernel's delta). A candidate becomes a table entry when it is at least
MIN_GAIN faster than the default; otherwise the kernel keeps `_CONFIGS` for that (D, T bucket, dropout).

Compiling dominates (about 2 s a kernel, ~70 of them on sm_90): the candidates are compiled ahead in a pool of worker
processes, each launching them once on a small problem with the same specialization, which fills Triton's on-disk
cache in the order that the main process measures, so it times the first shapes while the rest compile.
--budget-s stops cleanly: candidates not reached are recorded as not run, the files hold what was measured.

Writes DIR/attention_tuned.json (the table with the run's environment; copy it to kernels/attention_tuned.json
to use it, then `python -m bench.compile_report` shows the new entries' registers) and DIR/attention_tuned.md
(chosen against default ms per (D, T, dropout, kind), the rejected candidates and why, every timing).
"""

import json
import math
import os
import time
from types import SimpleNamespace

from . import common

GRID = {"D": (64, 128), "T": (128, 256, 512, 1024, 2048), "dropout": (0.1, 0.0), "H": 12, "tokens": 16384}
SMOKE_GRID = {"D": (16,), "T": (40,), "dropout": (0.1, 0.0), "H": 2, "tokens": 40}
LIMIT, SMOKE_LIMIT = 14, 2  # candidates per kernel, the default included
MAX_BLOCK = 128  # larger tiles spill at D=64 already (the accumulators alone take 128 registers a thread)
MIN_GAIN = 0.03  # a candidate replaces the default only when this much faster: below it, do_bench's noise decides
TOL_STEPS = 4  # outputs may differ from the default's by this many rounding steps (bf16, fp32) at their scale
WARMUP_MS, REP_MS = 5, 25  # per candidate; the kernels take 0.02-0.5 ms, so the median is over >= 50 calls
WARM_T = 128  # the T of the workers' compile problem: a multiple of 16 like every T measured, same specialization
SEED = 1234


# ----------------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------------


def _mma_rows(kind, cfg):
    """The M side of the kernel's big dots: the query block (fwd, dq) or the key block (dkdv)."""
    return cfg[1] if kind == "dkdv" else cfg[0]


def _rows_per_warpgroup(kind, cfg):
    """MMA rows per warpgroup of 4 warps. Hopper's wgmma takes 64 rows per instruction: with fewer per warpgroup
    the warpgroups split the columns instead (smaller instructions), and below 64 rows in all Triton falls back
    to mma.sync."""
    return _mma_rows(kind, cfg) / max(1, cfg[2] // 4)


def candidates(kind, default, wgmma, limit=LIMIT, extra=()):
    """default first, then the configs in extra (the committed table's), then the default's neighbours one knob
    away (BLOCK_M or BLOCK_N x2 or /2, 4 -> 8 warps, a stage more or less), then the extra configs' neighbours (so
    that each re-run on a GPU climbs one more step from where the last one stopped), within the kernels' block
    rules (attention.block_rule_error) and tiles <= MAX_BLOCK. A tile doubled from 4 warps gets 8 (each thread's
    share stays); never fewer warps for the same tile (the share would double, and the defaults are the largest
    tiles that do not spill: under triton 3.9 all such sm_90 variants spilled). With wgmma (sm_90): >= 64 MMA
    rows, and at least as many per warpgroup as the default has, up to 64 (some defaults split a 64-row tile over
    two warpgroups), a halved tile going to 4 warps for it."""
    from kernels import attention

    default, extra = tuple(default), [tuple(c) for c in extra]
    want_rows = min(64, _rows_per_warpgroup(kind, default))

    def neighbours(cfg):
        bm, bn, w, s = cfg
        near = [(bm * 2, bn, max(w, 8), s), (bm, bn * 2, max(w, 8), s), (bm // 2, bn, w, s), (bm, bn // 2, w, s)]
        if wgmma:
            near = [c if _rows_per_warpgroup(kind, c) >= want_rows else (*c[:2], 4, s) for c in near]
        return [*near, *([(bm, bn, 8, s)] if w == 4 else []), (bm, bn, w, s + 1), (bm, bn, w, s - 1)]

    def allowed(c):
        return (attention.block_rule_error(kind, *c) is None and max(c[:2]) <= MAX_BLOCK
                and (not wgmma or (_mma_rows(kind, c) >= 64 and _rows_per_warpgroup(kind, c) >= want_rows)))

    near = [*extra, *neighbours(default), *(n for c in extra for n in neighbours(c))]
    return [default] + [c for c in dict.fromkeys(near) if c != default and allowed(c)][:limit - 1]


def label(cfg):
    block_m, block_n, num_warps, num_stages = cfg
    return f"{block_m}x{block_n} w{num_warps} s{num_stages}"


# ----------------------------------------------------------------------------------------------------
# One problem: inputs, launches, checks
# ----------------------------------------------------------------------------------------------------


def make_problem(B, H, T, D, p, dev):
    """q, k, v as the model passes them (views of one (B, T, 3, H, D) projection), do in the layout of o's gradient
    ((B, T, H, D) memory), a seed, and buffers for what the backward kernels read (filled by `reference`)."""
    import torch

    from kernels import attention
    from kernels._common import seed_tensor

    gen = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, device=dev, generator=gen).to(torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    do = torch.randn(B, T, H, D, device=dev, generator=gen).to(torch.bfloat16).transpose(1, 2)
    x = SimpleNamespace(q=q, k=k, v=v, do=do, p=p, scale=1.0 / math.sqrt(D),
                        seed=seed_tensor(SEED, torch.device(dev)) if p else None, mask=None)
    if p:  # the keep-mask that every forward candidate reads (attention.MASK_DRAW) and the backward kernels too
        x.mask = new_mask(x)
        attention._launch_mask(x.mask, x.seed, p, True, T)
    fwd, dq = outputs("fwd", x), outputs("dq", x)
    x.o, x.lse, x.delta = fwd["o"], fwd["lse"], dq["delta"]
    return x


def new_mask(x, zeroed=False):
    from kernels import attention

    B, H, T, _ = x.q.shape
    return attention._new_mask(B, H, T, x.q.device, zeroed)


def outputs(kind, x):
    """Fresh output buffers of one kernel, as the launchers allocate them."""
    import torch

    B, H, T, D = x.q.shape
    new = dict(dtype=x.q.dtype, device=x.q.device)
    if kind == "fwd":
        return dict(o=torch.empty((B, T, H, D), **new).transpose(1, 2),
                    lse=torch.empty((B, H, T), dtype=torch.float32, device=x.q.device))
    if kind == "dq":
        return dict(dq=torch.empty((B, H, T, D), **new), delta=torch.empty((B, H, T), dtype=torch.float32,
                                                                           device=x.q.device))
    return dict(dk=torch.empty((B, H, T, D), **new), dv=torch.empty((B, H, T, D), **new))


def launch(kind, x, cfg, out):
    """One launch of kind's kernel with cfg into out (every kernel reads x's mask, the backward ones x's o, lse,
    delta); returns the compiled kernel (None under the interpreter)."""
    from kernels import attention

    if kind == "fwd":
        return attention._launch_fwd(x.q, x.k, x.v, out["o"], out["lse"], x.mask, True, x.scale, x.p, x.seed, cfg)
    bwd = attention._bwd_args(x.q, x.mask, True, x.scale, x.p)
    if kind == "dq":
        return attention._launch_dq(x.q, x.k, x.v, x.o, x.do, out["dq"], x.lse, out["delta"], bwd, cfg)
    return attention._launch_dkdv(x.q, x.k, x.v, x.do, out["dk"], out["dv"], x.lse, x.delta, bwd, cfg)


def reference(x, defaults):
    """Runs the default configs, so that x holds the forward and delta the backward kernels read, and returns
    their outputs per kind, against which the candidates are checked."""
    ref = {}
    for kind in ("fwd", "dq", "dkdv"):  # each reads the one before
        ref[kind] = outputs(kind, x)
        launch(kind, x, defaults[kind], ref[kind])
        if kind == "fwd":
            x.o, x.lse = ref[kind]["o"], ref[kind]["lse"]
        elif kind == "dq":
            x.delta = ref[kind]["delta"]
    return ref


def mismatch(x, got, want):
    """None when a candidate's outputs equal the default's up to TOL_STEPS rounding steps at each output's scale,
    else what differs."""
    import torch

    for name, g in got.items():
        w = want[name]
        # bf16 outputs: one rounding each; fp32 ones (lse, delta): sums over up to T terms in another order
        step = 2.0**-8 if g.dtype == torch.bfloat16 else 2.0**-16
        g, w = g.float(), w.float()
        tol = TOL_STEPS * step * max(w.abs().max().item(), 1e-30)
        err = (g - w).abs().max().item()
        if not math.isfinite(err) or err > tol:
            return f"{name} differs from the default's by {err:.3g} (tolerance {tol:.3g})"
    return None


def time_ms(fn, smoke):
    """(median, p20, p80) GPU ms of fn() with do_bench; in --smoke one call's wall-clock ms (measures nothing)."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms, ms
    import triton.testing

    return tuple(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=list(common.QUANTILES)))


def try_candidate(kind, x, cfg, want, smoke):
    """The measured columns of one candidate: status ok with ms, or rejected with the reason."""
    import torch

    out = outputs(kind, x)
    try:
        kernel = launch(kind, x, cfg, out)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is reported, the sweep goes on
        return dict(status="rejected", reason=f"does not compile or launch: {common.failure(exc)[1]}")
    regs, spills = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)
    if spills:
        return dict(status="rejected", reason=f"spills registers ({spills} words of local memory, {regs} registers)",
                    n_regs=regs, n_spills=spills)
    wrong = mismatch(x, out, want) if want is not None else None
    if wrong:
        return dict(status="rejected", reason=f"wrong result: {wrong}", n_regs=regs)
    ms, p20, p80 = time_ms(lambda: launch(kind, x, cfg, out), smoke)
    return dict(status="ok", ms=ms, ms_p20=p20, ms_p80=p80, n_regs=regs, n_spills=spills)


# ----------------------------------------------------------------------------------------------------
# Compiling ahead in worker processes
# ----------------------------------------------------------------------------------------------------


def _compile_job(dev, H, D, p, kind, cfg):
    """Worker: launch one config once on a small problem (B=1, T=WARM_T) that specializes as the measured ones do
    (every T and stride a multiple of 16), leaving the compiled kernel in Triton's cache; returns an error text."""
    try:
        x = make_problem(1, H, WARM_T, D, p, dev)
        launch(kind, x, cfg, outputs(kind, x))
        return None
    except Exception as exc:  # noqa: BLE001 - the main process's own launch reports it
        return f"{type(exc).__name__}: {str(exc)[:200]}"


class Precompiler:
    """Compiles every planned (D, dropout, kind, config) in a process pool, in the order given; `wait` blocks
    until one is in the cache (or the budget is spent). Without a GPU (--smoke) it does nothing."""

    def __init__(self, jobs, H, enabled, dev="cuda"):
        self.futures, self.pool = {}, None
        if not (enabled and jobs):
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # by its module's name, not __main__'s (python -m), so that the spawned workers import it as a module
        from bench.tune_attention import _compile_job as job_fn

        workers = min(len(jobs), max(1, (os.cpu_count() or 2) - 2))  # leave the timing process a core
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))  # CUDA: no fork
        self.futures = {job: self.pool.submit(job_fn, dev, H, *job) for job in jobs}

    def wait(self, job, deadline):
        future = self.futures.get(job)
        if future is None:
            return
        left = deadline.left()
        try:
            future.result(timeout=None if left is None else max(0.0, left))
        except Exception:  # noqa: BLE001 - a timeout is the budget's business, a failure the launch's
            pass

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------


def arch_major():
    """9 (Hopper and later) or 8, as _CONFIGS keys them; --smoke without a GPU stands in as 9."""
    import torch

    if not torch.cuda.is_available():
        return 9
    return 9 if torch.cuda.get_device_capability()[0] >= 9 else 8


def plan(grid, major, smoke):
    """{(D, dropout, kind): [candidate configs]}, in the order they are measured; the default first."""
    from kernels import attention

    plans = {}
    for D in grid["D"]:
        for p in grid["dropout"]:
            defaults = attention._INTERPRETER_CONFIG if smoke else attention._CONFIGS[(major, D, False)]
            for kind in attention.KINDS:
                committed = [] if smoke else [cfg for key, cfg in attention._TUNED.items()
                                              if key[:3] == (major, D, False) and key[4:] == (p > 0, kind)]
                plans[(D, p, kind)] = candidates(kind, defaults[kind], wgmma=major >= 9 and not smoke,
                                                 limit=SMOKE_LIMIT if smoke else LIMIT, extra=committed)
    return plans


def run(smoke, deadline, env):
    """Every candidate row of the sweep: (D, T, dropout, kind, config) with its status, ms and registers."""
    grid, major = (SMOKE_GRID if smoke else GRID), arch_major()
    plans = plan(grid, major, smoke)
    pre = Precompiler([(*key, cfg) for key, cfgs in plans.items() for cfg in cfgs], grid["H"], enabled=not smoke)
    rows = []
    try:
        for D in grid["D"]:
            for p in grid["dropout"]:
                for T in grid["T"]:
                    base = dict(env, arch=f"sm{major}0", D=D, T=T, B=max(1, grid["tokens"] // T), H=grid["H"],
                                dropout=p, dtype="bf16")
                    rows += tune_shape(base, plans, pre, deadline, smoke)
    finally:
        pre.close()
    return rows


def tune_shape(base, plans, pre, deadline, smoke):
    """The rows of every kernel's candidates at one (D, T, dropout)."""
    import torch

    D, T, p = base["D"], base["T"], base["dropout"]
    kinds = [kind for (d, q, kind) in plans if (d, q) == (D, p)]
    todo = [(kind, cfg) for kind in kinds for cfg in plans[(D, p, kind)]]
    for kind in kinds:
        pre.wait((D, p, kind, plans[(D, p, kind)][0]), deadline)
    if deadline.passed():
        return [row(base, kind, cfg, **common.NOT_RUN) for kind, cfg in todo]
    x = make_problem(base["B"], base["H"], T, D, p, common.device())
    try:
        ref = reference(x, {kind: plans[(D, p, kind)][0] for kind in kinds})
    except Exception as exc:  # noqa: BLE001 - without the defaults' outputs nothing here can be checked
        status, reason = common.failure(exc)
        return [row(base, kind, cfg, status=status, reason=f"the default configs failed: {reason}")
                for kind, cfg in todo]
    rows = []
    for kind, cfg in todo:
        pre.wait((D, p, kind, cfg), deadline)
        if deadline.passed():
            rows.append(row(base, kind, cfg, **common.NOT_RUN))
            continue
        rows.append(row(base, kind, cfg, **try_candidate(kind, x, cfg, ref[kind], smoke)))
    if p and not deadline.passed():
        rows += draw_rows(base, x, plans[(D, p, "fwd")][0], ref["fwd"], smoke)
    del x, ref
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def draw_rows(base, x, fwd_cfg, want, smoke):
    """The keep-mask's two ways (kernels.attention.MASK_DRAW) beside the forward rows, which read a mask drawn
    before: the mask kernel alone ("mask"), and the default forward drawing its mask inline ("fwd inline", checked
    against the default forward's outputs), so that mask + fwd compares with fwd inline in one run."""
    import torch

    from kernels import attention

    T = x.q.shape[2]
    block_r, block_c, num_warps = attention._MASK_CONFIG
    mask = new_mask(x)
    ms = time_ms(lambda: attention._launch_mask(mask, x.seed, x.p, True, T), smoke)
    rows = [dict(base, kind="mask", config=[block_r, block_c, num_warps], label=f"{block_r}x{block_c} w{num_warps}",
                 status="ok", ms=ms[0], ms_p20=ms[1], ms_p80=ms[2])]
    out, inline_mask = outputs("fwd", x), new_mask(x, zeroed=True)

    def fwd_inline():
        return attention._launch_fwd(x.q, x.k, x.v, out["o"], out["lse"], inline_mask, True, x.scale, x.p, x.seed,
                                     fwd_cfg, inline=True)

    fwd_inline()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wrong = [name for name in ("o", "lse") if not torch.equal(out[name], want[name])]
    if wrong:
        measured = dict(status="error", reason=f"the inline draw's {' and '.join(wrong)} differ from the default's")
    else:
        ms = time_ms(fwd_inline, smoke)
        measured = dict(status="ok", ms=ms[0], ms_p20=ms[1], ms_p80=ms[2])
    return rows + [row(base, "fwd inline", fwd_cfg, **measured)]


def row(base, kind, cfg, **measured):
    return dict(base, kind=kind, config=list(cfg), label=label(cfg), **measured)


def choose(rows, smoke):
    """[(default row, chosen row)] per (D, T, dropout, kind) whose default was timed; chosen is the fastest ok
    candidate when it beats the default by MIN_GAIN, else the default. In --smoke (nothing is measured) the last
    ok candidate, so that the table path runs."""
    from kernels import attention

    groups = {}
    for r in (r for r in rows if r["kind"] in attention.KINDS):
        groups.setdefault((r["D"], r["T"], r["dropout"], r["kind"]), []).append(r)
    picks = []
    for group in groups.values():
        ok = [r for r in group if r["status"] == "ok"]
        default = group[0] if group[0]["status"] == "ok" else None
        if default is None:
            continue
        best = ok[-1] if smoke else min(ok, key=lambda r: r["ms"])
        if not smoke and best["ms"] > default["ms"] * (1.0 - MIN_GAIN):
            best = default
        picks.append((default, best))
    return picks


def table(rows, picks, env, smoke):
    """The tuned table (kernels/attention_tuned.json's format): one entry per kernel whose choice is not its
    default."""
    from kernels import attention

    entries = []
    for default, best in picks:
        if best is default:
            continue
        bm, bn, w, s = best["config"]
        entries.append(dict(arch=best["arch"], head_dim=best["D"], dtype="16-bit",
                            T_bucket=attention._t_bucket(best["T"]), dropout=best["dropout"] > 0, kind=best["kind"],
                            block_m=bm, block_n=bn, num_warps=w, num_stages=s, gpu=env["gpu"], triton=env["triton"],
                            torch=env["torch"], commit=env["commit"], ms=round(best["ms"], 5),
                            default_ms=round(default["ms"], 5), default=default["config"]))
    about = ("Written by python -m bench.tune_attention" + (" --smoke: measures nothing, never commit it" if smoke
             else "; copy to kernels/attention_tuned.json to use it") + f". Entries: candidates at least "
             f"{MIN_GAIN:.0%} faster than the default (_CONFIGS) at T = {sorted({r['T'] for r in rows})}.")
    data = dict(about=about, smoke=smoke, environment=env, entries=entries)
    attention.parse_tuned_table(data, "bench.tune_attention's table")  # what it writes, the kernels accept
    return data


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------


def _speedup(pair):
    default, best = pair
    return f"{default['ms'] / best['ms']:.2f}x" if best["ms"] else ""


CHOSEN_COLUMNS = [("D", lambda pr: pr[1]["D"]), ("T", lambda pr: pr[1]["T"]), ("B", lambda pr: pr[1]["B"]),
                  ("dropout", lambda pr: pr[1]["dropout"]), ("kind", lambda pr: pr[1]["kind"]),
                  ("default", lambda pr: pr[0]["label"]), ("default ms", lambda pr: pr[0]["ms"]),
                  ("chosen", lambda pr: "(default)" if pr[1] is pr[0] else pr[1]["label"]),
                  ("chosen ms", lambda pr: pr[1]["ms"]), ("speed-up", _speedup)]
ALL_COLUMNS = [("D", "D"), ("T", "T"), ("dropout", "dropout"), ("kind", "kind"), ("config", "label"),
               ("ms", common.value_or_status("ms")), ("p20-p80", common.spread_cell), ("regs", "n_regs"),
               ("note", "reason")]


def markdown(rows, picks, data, smoke):
    env = data["environment"]
    lines = ["# Attention launch-config tuning", ""]
    if smoke:
        lines += ["**SMOKE (CPU interpreter or tiny shapes) - not a speed measurement.**", ""]
    lines += [f"GPU: {env['gpu']} ({rows[0]['arch'] if rows else '?'}); torch {env['torch']}, triton {env['triton']}; "
              f"commit {env['commit']}", "",
              (f"bf16, causal, H={rows[0]['H'] if rows else '?'}, B*T = {(SMOKE_GRID if smoke else GRID)['tokens']}; "
               "each kernel timed alone (triton.testing.do_bench median, L2 cleared before each call). A candidate "
               f"replaces the default (_CONFIGS) when at least {MIN_GAIN:.0%} faster; "
               f"{len(data['entries'])} table entries."), "",
              "## Chosen configs", "", markdown_pairs(picks), ""]
    rejected = {}
    for r in rows:
        if r["status"] == "rejected":
            rejected.setdefault((r["D"], r["dropout"], r["kind"], r["label"], r["reason"]), []).append(r["T"])
    lines += ["## The dropout mask: drawn by its kernel, or inline by the forward", "", markdown_draw(rows), ""]
    lines += ["## Rejected candidates", ""]
    lines += [f"- D={d} dropout={p} {kind} {lab} (T={ts}): {why}" for (d, p, kind, lab, why), ts in rejected.items()]
    lines += ["(none)"] if not rejected else []
    not_run = sum(r["status"] == "not run" for r in rows)
    lines += ["", f"{not_run} candidates not run (time budget)." if not_run else "", "## Every candidate", "",
              common.markdown_table(rows, ALL_COLUMNS), ""]
    return "\n".join(lines)


def markdown_draw(rows):
    """Per (D, T) with dropout: the mask kernel's ms and the default forward's (which reads that mask), their sum,
    and the default forward drawing the mask inline (kernels.attention.MASK_DRAW chooses between the two)."""
    from kernels import attention

    found = {}
    for r in rows:
        if r["dropout"] and r["status"] == "ok" and r["kind"] in ("mask", "fwd", "fwd inline"):
            found.setdefault((r["D"], r["T"]), {}).setdefault(r["kind"], r["ms"])  # fwd: its default, timed first
    lines = [f"MASK_DRAW = {attention.MASK_DRAW!r}.", "",
             "| D | T | mask ms | fwd ms | mask + fwd ms | fwd inline ms | inline / (mask + fwd) |",
             "|---|---|---|---|---|---|---|"]
    for (d, t), ms in found.items():
        if len(ms) == 3:
            both = ms["mask"] + ms["fwd"]
            lines.append(f"| {d} | {t} | {common.fmt(ms['mask'])} | {common.fmt(ms['fwd'])} | {common.fmt(both)} | "
                         f"{common.fmt(ms['fwd inline'])} | {ms['fwd inline'] / both:.2f} |")
    return "\n".join(lines if len(lines) > 4 else lines + ["| (not measured) |"])


def markdown_pairs(picks):
    lines = ["| " + " | ".join(h for h, _ in CHOSEN_COLUMNS) + " |", "|" + "---|" * len(CHOSEN_COLUMNS)]
    lines += ["| " + " | ".join(common.fmt(f(pr)) for _, f in CHOSEN_COLUMNS) + " |" for pr in picks]
    return "\n".join(lines)


def main(argv=None):
    parser = common.cli_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)
    t0, env = time.monotonic(), common.environment(args.smoke)
    rows = run(args.smoke, common.Deadline(args.budget_s), env)
    picks = choose(rows, args.smoke)
    data = table(rows, picks, env, args.smoke)
    out = common.out_dir(args)
    with open(os.path.join(out, "attention_tuned.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, "attention_tuned.md"), "w") as f:
        f.write(markdown(rows, picks, data, args.smoke))
    print(f"tune_attention: {len(rows)} candidates ({sum(r['status'] == 'ok' for r in rows)} timed), "
          f"{len(data['entries'])} table entries in {time.monotonic() - t0:.0f} s: {out}/attention_tuned.json, .md")


if __name__ == "__main__":
    main()
