"""End-to-end training steps of GPT-1: our training path against the nanoGPT recipe, in one run.

    python -m bench.e2e --out DIR [--smoke] [--micro-batch 32] [--steps 30] [--only ROW,ROW] [--budget-s S]

The paper's 117M model (12 layers, C=768, 12 heads, V=40478, dropout 0.1) at T=512, micro batch 32, bf16, one
GPU. Each row is a Recipe:
- runtime "deepspeed": our training path, built as gpt1.train builds it: gpt1.runtime.load_ds_config of
  ds_configs/zero<N>_bf16.json (precision "bf16": bf16 weights, DeepSpeed's fp32 master copy) or
  zero<N>_autocast_bf16.json (precision "autocast": fp32 weights under DeepSpeed's torch_autocast),
  runtime.lean_checks, runtime.build_engine (GuardedAdamW: fused AdamW, clipping and a non-finite guard without a
  host sync), runtime.compile_module (the model's forward through Inductor, fullgraph under ZeRO 0-2); the step is
  `loss = engine(x, labels=y).loss; engine.backward(loss); engine.step()`.
- runtime "torch": the nanoGPT recipe, plain PyTorch without DeepSpeed: fp32 weights under
  torch.autocast(bfloat16), torch.optim.AdamW(fused=True), clip_grad_norm_(1.0), torch.compile(model); with SDPA
  and the eager loss that is the peer ("nanoGPT recipe"), with our kernels a row of ours.
ROWS runs the peer first, then our default path (gpt1.train's default config: ZeRO-0 under torch_autocast,
triton/triton_linear, compiled), the default replayed as CUDA graphs (--compile-mode reduce-overhead), that with
the fused residual-dropout-LayerNorm (--norm-impl triton), that with the residual stream in bf16
(--no-residual-in-fp32), with the fused bias + GELU (--mlp-impl triton), with both, the default with our kernels
inlined into Inductor's code (--inline-kernels), that with every fused kernel and the bf16 residual stream, without
and with CUDA graphs, the default with the fused LayerNorm alone and with the
materializing triton loss, ZeRO-2 in DeepSpeed's bf16, the
default with torch's kernels (what our kernels give), our kernels without DeepSpeed (what DeepSpeed costs), ZeRO-2
under torch_autocast, ZeRO-1 and 0 in bf16, the uncompiled and eager steps, ZeRO-3 (not compiled: slow), and last
--compile-mode max-autotune (Inductor's Triton matmul templates where its autotuning finds them faster, which can
take the GELU and its gradient into their epilogues; CUDA graphs too; a compile of minutes), so that a time budget
drops the least telling rows.
torch.compile runs with dynamo's default recompile limits here, even inside bench.run_all, whose op benches raise
them.

Per row, after --warmup steps (the first pays the compile): --steps timed steps. On a GPU each step's time is
the interval between CUDA events recorded after consecutive steps, with no synchronize in between (the loop
runs as training runs it); median, p20 and p80 over the steps; tokens/s = B*T / median; MFU = tokens/s *
flops_per_token / peak (GPT1.flops_per_token = 6*N + 12*L*C*T, N the parameters without position
embeddings; the GPU's dense bf16 peak from gpt1.runtime.PEAK_BF16_TFLOPS). Then bench.profile_step's anatomy of
a few more steps: GPU busy %, kernels per step, ms by kernel family, operators per step. Peak memory is
torch.cuda.max_memory_allocated over the timed steps less what was allocated before the model was built.

--smoke: one layer of gpt1-tiny with a 512-token vocabulary, T=32, B=1, one warm-up and one timed step on the CPU
under the Triton interpreter; "compiled" rows use dynamo with backend="eager" (the trace is checked, with fullgraph
where our path asks for it; Inductor is not run), so the rows that differ from another only by their compile mode
(CUDA graphs, max-autotune) or by inlining our kernels (which AOTAutograd does, not run either) are n/a there.
"""

import os
import time
from dataclasses import asdict, dataclass, replace

from . import common, profile_step

SETTINGS = {"preset": "gpt1", "vocab_size": 40478, "seq_len": 512, "micro_batch": 32, "warmup": 5, "steps": 30,
            "profile_steps": 5}
SMOKE_SETTINGS = {"preset": "gpt1-tiny", "vocab_size": 512, "seq_len": 32, "micro_batch": 1, "warmup": 1,
                  "steps": 1, "profile_steps": 1}
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 2.5e-4, 0.01, 1.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Recipe:
    name: str  # the row's provider label
    runtime: str  # "deepspeed" (gpt1.runtime, as gpt1.train) or "torch" (the nanoGPT recipe)
    attn: str  # attn_impl: eager, sdpa, triton, auto
    loss: str  # loss_impl: eager, triton, triton_linear, auto
    compile: bool | None  # torch.compile the model; None: gpt1.train's default (on a GPU)
    zero: int | None = 2  # ZeRO stage of the deepspeed runtime
    role: str = common.OURS  # ours, peer or eager (bench.common.add_ratios)
    precision: str = "bf16"  # deepspeed runtime: "bf16" (DeepSpeed's bf16: bf16 weights, an fp32 master copy in
    # the optimizer) or "autocast" (fp32 weights under DeepSpeed's torch_autocast in bf16, the nanoGPT recipe's)
    norm: str = "eager"  # norm_impl: eager, or triton (residual dropout + add + LayerNorm in one kernel)
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" replays CUDA graphs
    residual_in_fp32: bool = True  # under autocast: the model's residual stream in fp32 (False: bf16)
    mlp: str = "eager"  # mlp_impl: eager, or triton (the MLP's bias + GELU in one kernel each way)
    inline: bool = False  # compiled through our operators (--inline-kernels): Inductor launches our Triton kernels


NANOGPT = Recipe("nanoGPT recipe", "torch", "sdpa", "eager", True, None, "peer")
# gpt1.train's default config (ds_configs/zero0_autocast_bf16.json): the fastest DeepSpeed path measured on one GPU
DEFAULT = Recipe("ours ZeRO-0 autocast (default)", "deepspeed", "triton", "triton_linear", True, 0,
                 precision="autocast")
ZERO2 = replace(DEFAULT, name="ours ZeRO-2", zero=2, precision="bf16")
ROWS = (
    NANOGPT,
    DEFAULT,
    replace(DEFAULT, name="ours CUDA graphs", compile_mode="reduce-overhead"),
    replace(DEFAULT, name="ours CUDA graphs + fused LN", compile_mode="reduce-overhead", norm="triton"),
    # the residual stream in bf16 (GPT1Config.residual_in_fp32=False): the add-LayerNorms move 2/3 of the bytes
    replace(DEFAULT, name="ours CUDA graphs + fused LN + bf16 residual", compile_mode="reduce-overhead",
            norm="triton", residual_in_fp32=False),
    # and the MLP's bias + GELU fused, its bias gradient summed in its backward (a pass over (B*T, 3072) less)
    replace(DEFAULT, name="ours CUDA graphs + fused LN + fused GELU", compile_mode="reduce-overhead", norm="triton",
            mlp="triton"),
    replace(DEFAULT, name="ours CUDA graphs + all fused + bf16 residual", compile_mode="reduce-overhead",
            norm="triton", mlp="triton", residual_in_fp32=False),
    # our operators traced into the compiled graph (--inline-kernels): Inductor launches our kernels itself, no
    # operator dispatch or launcher Python per call; without CUDA graphs, then with them
    replace(DEFAULT, name="ours inlined kernels", inline=True),
    replace(DEFAULT, name="ours inlined + all fused + bf16 residual", inline=True, norm="triton", mlp="triton",
            residual_in_fp32=False),
    replace(DEFAULT, name="ours CUDA graphs + inlined + all fused + bf16 residual", inline=True,
            compile_mode="reduce-overhead", norm="triton", mlp="triton", residual_in_fp32=False),
    replace(DEFAULT, name="ours fused LN", norm="triton"),
    replace(DEFAULT, name="ours triton loss", loss="triton"),
    ZERO2,
    replace(DEFAULT, name="DeepSpeed sdpa/eager", attn="sdpa", loss="eager", role="peer"),
    Recipe("torch + our kernels", "torch", "triton", "triton_linear", True, None),
    replace(ZERO2, name="ours ZeRO-2 autocast", precision="autocast"),
    *(replace(ZERO2, name=f"ours ZeRO-{z}", zero=z) for z in (1, 0)),
    replace(DEFAULT, name="ours uncompiled", compile=False),
    replace(DEFAULT, name="eager", attn="eager", loss="eager", compile=False, role=common.EAGER),
    replace(ZERO2, name="ours ZeRO-3 uncompiled", zero=3, compile=False),  # runtime.compile_module refuses ZeRO-3
    # Inductor's Triton matmul templates where they time faster than cuBLAS; they can fuse the GELU (and its
    # gradient) into their epilogues, a pass over the (B*T, 3072) activations each way that cuBLAS leaves. Last: its
    # autotuning compiles for minutes (E2E_ONLY picks it)
    replace(DEFAULT, name="ours max-autotune", compile_mode="max-autotune"),
)


def ds_config_path(zero, precision="bf16"):
    """ds_configs/zero<N>_bf16.json, or zero<N>_autocast_bf16.json for precision "autocast"."""
    if precision not in ("bf16", "autocast"):
        raise ValueError(f"precision must be bf16 or autocast, got {precision!r}")
    return os.path.join(ROOT, "ds_configs", f"zero{zero}_{'autocast_bf16' if precision == 'autocast' else 'bf16'}.json")


def settings(smoke, micro_batch=None, steps=None):
    s = dict(SMOKE_SETTINGS if smoke else SETTINGS)
    s["micro_batch"], s["steps"] = micro_batch or s["micro_batch"], steps or s["steps"]
    return s


def init():
    """gpt1.runtime.init_distributed (a one-rank group when not launched); returns this rank's device."""
    from gpt1 import runtime

    return runtime.init_distributed()[2]


def resolve(recipe, device=None):
    """The recipe with "auto" kernels and the default compile decided as gpt1.train decides them."""
    import torch

    from gpt1.model import resolve_attn_impl, resolve_loss_impl
    from gpt1.runtime import compiles_by_default

    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile_ = recipe.compile
    if compile_ is None:
        compile_ = compiles_by_default(dev.type, recipe.zero or 0, recipe.compile_mode)
    cfg = model_config(SETTINGS)  # GPT-1's head dim, 64 (the smoke preset's, 32, has our kernel too)
    return replace(recipe, attn=resolve_attn_impl(recipe.attn, dev, cfg.n_embd // cfg.n_head),
                   loss=resolve_loss_impl(recipe.loss, dev), compile=compile_)


def describe(recipe, s):
    """The row's columns that say what ran."""
    runtime = (f"DeepSpeed ZeRO-{recipe.zero}{' torch_autocast' if recipe.precision == 'autocast' else ''}"
               if recipe.runtime == "deepspeed" else "torch (autocast bf16, fused AdamW)")
    kernels = (f"{recipe.attn}/{recipe.loss}" + ("/fused LN" if recipe.norm == "triton" else "")
               + ("/fused GELU" if recipe.mlp == "triton" else "")
               + ("" if recipe.residual_in_fp32 else ", bf16 residual stream"))
    compiled = "not compiled" if not recipe.compile else (
        ("compiled" if recipe.compile_mode == "default" else f"compiled ({recipe.compile_mode})")
        + (", kernels inlined" if recipe.inline else ""))
    text = (f"{runtime}, {kernels}, {compiled}; "
            f"{model_label(s)} T={s['seq_len']} micro batch {s['micro_batch']}, bf16, 1 rank")
    return {"recipe": asdict(recipe), "runtime": recipe.runtime, "zero": recipe.zero, "compiled": recipe.compile,
            "precision": recipe.precision if recipe.runtime == "deepspeed" else "autocast",
            "attn_impl": recipe.attn, "loss_impl": recipe.loss, "norm_impl": recipe.norm, "mlp_impl": recipe.mlp,
            "description": text}


def model_config(s, **kwargs):
    """The model config of settings s: its preset with its vocabulary (and its layer count, where s sets one)."""
    from gpt1 import get_config

    if s.get("n_layer"):
        kwargs["n_layer"] = s["n_layer"]
    return get_config(s["preset"], vocab_size=s["vocab_size"], **kwargs)


def model_label(s):
    layers = f" with {s['n_layer']} layer(s)" if s.get("n_layer") else ""
    return f"{s['preset']}{layers} (V={s['vocab_size']})"


def build_step(recipe, s, smoke, dev):
    """(step, teardown): step() runs one training step of the recipe on one fixed batch."""
    import torch

    from gpt1 import GPT1

    cfg = model_config(s, attn_impl=recipe.attn, loss_impl=recipe.loss, norm_impl=recipe.norm,
                       mlp_impl=recipe.mlp, residual_in_fp32=recipe.residual_in_fp32)
    torch.manual_seed(1337)
    model = GPT1(cfg)
    x = torch.randint(0, s["vocab_size"], (s["micro_batch"], s["seq_len"] + 1), device=dev)
    build = deepspeed_step if recipe.runtime == "deepspeed" else torch_step
    return build(model, recipe, s, smoke, dev, x[:, :-1], x[:, 1:])


def deepspeed_step(model, recipe, s, smoke, dev, inputs, labels):
    import torch

    from gpt1 import runtime

    ds = runtime.load_ds_config(ds_config_path(recipe.zero, recipe.precision), 1, micro_batch_size=s["micro_batch"],
                                gradient_accumulation_steps=1)
    ds, max_grad_norm = runtime.lean_checks(ds, 1)
    engine, _, _ = runtime.build_engine(model, ds, lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=max_grad_norm,
                                        tied_weight=model.tokens_embed.weight)
    if recipe.compile and smoke:  # runtime.compile_module's trace (fullgraph), without Inductor
        engine.module.forward = torch.compile(engine.module.forward, backend="eager", fullgraph=True)
    else:
        runtime.compile_module(engine, recipe.compile, runtime.zero_stage(ds), recipe.compile_mode, recipe.inline)

    def step():
        loss = engine(inputs, labels=labels).loss
        engine.backward(loss)
        engine.step()

    return step, getattr(engine, "destroy", lambda: None)


def torch_step(model, recipe, s, smoke, dev, inputs, labels):
    import torch

    import kernels
    from gpt1.model import param_groups

    model.to(dev)
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                  fused=True)
    mode = None if smoke or recipe.compile_mode == "default" else recipe.compile_mode
    if recipe.compile and not smoke:
        kernels.register_inductor_fallbacks()  # as runtime.compile_module does
        kernels.set_inline(recipe.inline)
    forward = torch.compile(model, backend="eager" if smoke else "inductor", mode=mode) if recipe.compile else model

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = forward(inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, lambda: None


def time_steps(step, dev, s):
    """(per-step ms of the timed steps, wall ms per step, peak MiB) after s["warmup"] steps."""
    import torch

    cuda = dev.type == "cuda"
    for _ in range(s["warmup"]):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(s["steps"] + 1)]
    t0 = time.perf_counter()
    marks = [t0]
    if cuda:
        ends[0].record()
    for i in range(s["steps"]):
        step()
        if cuda:
            ends[i + 1].record()
        else:
            marks.append(time.perf_counter())
    if cuda:
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in zip(ends, ends[1:])]
    else:
        times = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
    wall = (time.perf_counter() - t0) * 1e3 / s["steps"]
    return times, wall, torch.cuda.max_memory_allocated() / 2**20 if cuda else None


def bench_row(base, recipe, s, smoke, dev, deadline):
    import torch

    row = dict(base, provider=recipe.name, role=recipe.role, **describe(recipe, s))
    if deadline.passed():
        return dict(row, **common.NOT_RUN)
    if smoke and recipe.compile_mode != "default":
        # --smoke traces with dynamo's eager backend, which has no modes: the row would repeat another's step
        return dict(row, status="n/a", reason=f"--smoke compiles with dynamo's eager backend, where compile mode "
                                              f"{recipe.compile_mode} changes nothing")
    if smoke and recipe.inline:  # nor AOTAutograd, which is what traces into the operators
        return dict(row, status="n/a", reason="--smoke compiles with dynamo's eager backend, where inlining the "
                                              "kernels changes nothing")
    common.free_memory()
    before = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    teardown, linear = None, torch.nn.functional.linear
    try:
        step, teardown = build_step(recipe, s, smoke, dev)
        row["host_load"] = common.host_load()  # now, not at the run's start: other work competing for the cores
        times, wall, peak = time_steps(step, dev, s)
        ms, p20, p80 = common.spread(times)
        tok_s = s["micro_batch"] * s["seq_len"] / (ms * 1e-3)
        fpt = flops_per_token(s)
        row.update(status="ok", ms=ms, ms_p20=p20, ms_p80=p80, wall_ms=wall, tokens_per_s=tok_s,
                   flops_per_token=fpt, mfu=mfu(tok_s, fpt, common.peak_bf16_tflops(base["gpu"])),
                   peak_mb=None if peak is None else peak - before)
        row.update(profile_step.anatomy(step, dev, s["profile_steps"], host=not smoke))  # smoke: the harness only
    except Exception as exc:  # noqa: BLE001 - one row's failure must not end the run
        row.update(zip(("status", "reason"), common.failure(exc)))
    finally:
        if teardown is not None:
            teardown()
        step = teardown = None
        # a ZeRO-3 engine replaces F.linear for the whole process (DeepSpeed's zero3_linear_wrap): not for the
        # rows after it
        torch.nn.functional.linear = linear
        reset_compiler()
        common.free_memory()
    return row


def reset_compiler():
    import torch._dynamo

    torch._dynamo.reset()  # each row compiles its own model; the previous row's graphs are garbage


def flops_per_token(s):
    import torch

    from gpt1 import GPT1

    with torch.device("meta"):
        model = GPT1(model_config(s))
    return model.flops_per_token(s["seq_len"])


def mfu(tokens_per_s, flops_per_token, peak_tflops):
    """Model FLOPs utilization: achieved model FLOP/s over the GPU's dense bf16 peak; None without a peak."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def run(smoke, deadline=None, micro_batch=None, steps=None, only=None, out=None):
    """The rows of ROWS (or those named in `only`); with `out`, results are rewritten after every row, so that a
    run cut short still leaves the rows it finished."""
    s = settings(smoke, micro_batch, steps)
    if smoke:  # one layer: the interpreter runs every kernel program in Python, and the harness is what is tested
        s["n_layer"] = 1
    deadline, env, dev = deadline or common.Deadline(0), common.environment(smoke), init()
    table = (f"{model_label(s)} training step, T={s['seq_len']}, micro batch {s['micro_batch']}, "
             "bf16, 1 rank")
    base = dict(env, bench="e2e", table=table, x=s["seq_len"], mode="step", preset=s["preset"],
                n_layer=s.get("n_layer"),  # None: the preset's
                vocab_size=s["vocab_size"], seq_len=s["seq_len"], micro_batch=s["micro_batch"], steps=s["steps"],
                warmup_steps=s["warmup"],
                peak_tflops=common.peak_bf16_tflops(env["gpu"]))
    rows = []
    for recipe in ROWS:
        if only and recipe.name not in only:
            continue
        t0 = time.monotonic()
        with common.dynamo_default_limits():
            rows.append(bench_row(base, recipe, s, smoke, dev, deadline))
        r = rows[-1]
        print(f"e2e {r['provider']}: {r['status']} in {time.monotonic() - t0:.0f} s"
              + (f", {r['ms']:.2f} ms/step, {r['tokens_per_s']:.0f} tokens/s" if r["status"] == "ok" else
                 f" ({r.get('reason')})"), flush=True)
        add_vs_nanogpt(rows)
        if out:
            common.write_json(rows, out)
    print(formula(rows))
    return rows


def fill_not_run(rows, reason):
    """rows plus a "not run" row for every recipe of ROWS that has none (a run cut short from outside)."""
    done = {r["provider"] for r in rows}
    keep = ("gpu", "torch", "triton", "deepspeed", "commit", "smoke", "bench", "table", "x", "mode", "preset",
            "n_layer", "vocab_size", "seq_len", "micro_batch", "steps", "warmup_steps", "peak_tflops",
            *common.host_fields())
    base = {k: rows[0][k] for k in keep if rows and k in rows[0]}
    s = {k: base.get(k) for k in ("preset", "n_layer", "vocab_size", "seq_len", "micro_batch")}
    return rows + [dict(base, provider=r.name, role=r.role, **describe(r, s), status="not run", reason=reason)
                   for r in ROWS if r.name not in done]


def add_vs_nanogpt(rows):
    """vs_nanogpt = the nanoGPT recipe's step ms / this row's (its tokens/s ratio); above 1: faster."""
    peer = next((r for r in rows if r["provider"] == NANOGPT.name and r.get("status") == "ok"), None)
    for r in rows:
        r["vs_nanogpt"] = peer["ms"] / r["ms"] if peer and r.get("status") == "ok" else None
    return rows


def formula(rows):
    ok = next((r for r in rows if r.get("flops_per_token")), None)
    if ok is None:
        return "MFU: no row ran"
    peak = ok["peak_tflops"]
    peak_text = f"{peak:g} TFLOP/s, dense bf16 of {ok['gpu']}" if peak else "unknown for this device, so no MFU"
    return (f"MFU = tokens/s x flops_per_token / peak; flops_per_token = 6*N + 12*L*C*T = "
            f"{ok['flops_per_token'] / 1e6:.1f} MFLOP at T={ok['seq_len']} (N: parameters without position "
            f"embeddings); peak = {peak_text}")


# Done when (issue 10): the default path is >= 1.2x the nanoGPT recipe's tokens/s, the GPU >= 92% busy, at most
# 1,000 kernels per step; ZeRO-2 within 15% of the fastest one-GPU configuration.
TARGETS = {"vs_nanogpt": 1.2, "gpu_busy": 0.92, "kernels_per_step": 1000, "zero2_within": 0.15}


def verdict(rows):
    """Plain sentences: where the default path stands against the targets, and where it is behind."""
    default = next((r for r in rows if r["provider"] == DEFAULT.name), None)
    if default is None or default.get("status") != "ok":
        why = f"{default['status']}: {default.get('reason')}" if default else "not in this run"
        return [f"- Our default path did not run ({why}): nothing to compare."]
    lines = []
    if default.get("vs_nanogpt"):
        lines.append(_target_line("tokens/s against the nanoGPT recipe", f"{default['vs_nanogpt']:.2f}x",
                                  default["vs_nanogpt"] >= TARGETS["vs_nanogpt"], f">= {TARGETS['vs_nanogpt']}x"))
    else:
        lines.append("- The nanoGPT recipe did not run: no tokens/s comparison.")
    if default.get("gpu_busy") is not None:
        lines.append(_target_line("GPU busy", f"{default['gpu_busy']:.1%}", default["gpu_busy"] >= TARGETS["gpu_busy"],
                                  f">= {TARGETS['gpu_busy']:.0%}"))
        lines.append(_target_line("kernels per step", f"{default['kernels_per_step']:.0f}",
                                  default["kernels_per_step"] <= TARGETS["kernels_per_step"],
                                  f"<= {TARGETS['kernels_per_step']}"))
    ours = [r for r in rows if r.get("status") == "ok" and common.role(r) == common.OURS and r.get("ms")]
    best = min(ours, key=lambda r: r["ms"])
    if best is not default:
        busy = f", GPU busy {best['gpu_busy']:.1%}" if best.get("gpu_busy") is not None else ""
        ratio = f", {best['vs_nanogpt']:.2f}x the nanoGPT recipe" if best.get("vs_nanogpt") else ""
        lines.append(f"- Our fastest row is not the default: {best['provider']}, {best['ms']:.2f} ms per step against "
                     f"{default['ms']:.2f}{ratio}{busy}")
    zero2 = next((r for r in rows if r["provider"] == ZERO2.name and r.get("status") == "ok"), None)
    if zero2 is None:
        lines.append("- ZeRO-2 did not run: no comparison with the fastest row.")
        return lines
    fastest = min((r for r in rows if r.get("status") == "ok"), key=lambda r: r["ms"])
    behind = zero2["ms"] / fastest["ms"] - 1
    lines.append(_target_line(f"ZeRO-2 against the fastest row ({fastest['provider']})", f"{behind:+.1%} step time",
                              behind <= TARGETS["zero2_within"], f"within {TARGETS['zero2_within']:.0%}"))
    return lines


def _target_line(what, value, met, target):
    return f"- {what}: {value} ({'meets' if met else 'BEHIND'} the target, {target})"


def _pct(key):
    def cell(r):
        return f"{r[key]:.1%}" if r.get(key) is not None and r.get("status") == "ok" else ""
    return cell


def _runtime_cell(r):
    if r["runtime"] != "deepspeed":
        return "torch"
    return f"ZeRO-{r['zero']}" + (" autocast" if r.get("precision") == "autocast" else "")


def _compiled_cell(r):
    """no, yes (torch.compile's default mode) or the mode's name."""
    mode = r.get("recipe", {}).get("compile_mode", "default")
    return "no" if not r["compiled"] else ("yes" if mode == "default" else mode)


COLUMNS = [("row", "provider"), ("runtime", _runtime_cell),
           ("kernels (attn/loss)", lambda r: f"{r['attn_impl']}/{r['loss_impl']}"
            + ("/fused LN" if r.get("norm_impl") == "triton" else "")
            + ("/fused GELU" if r.get("mlp_impl") == "triton" else "")
            + ("/bf16 residual" if not r.get("recipe", {}).get("residual_in_fp32", True) else "")),
           ("compiled", _compiled_cell),
           ("step ms", common.value_or_status("ms", 4)), ("p20-p80", common.spread_cell),
           ("tokens/s", common.value_or_status("tokens_per_s", 4)), ("vs nanoGPT", common.ratio("vs_nanogpt")),
           ("MFU", _pct("mfu")), ("GPU busy", _pct("gpu_busy")),
           ("kernels/step", lambda r: common.fmt(r.get("kernels_per_step"), 4)),
           ("host syncs/step", lambda r: common.fmt(r.get("host_syncs_per_step"))),
           ("ops/step", lambda r: common.fmt(r.get("ops_per_step"), 4)),
           ("sync ops/step", lambda r: common.fmt(r.get("sync_ops_per_step"))),
           ("peak MiB", common.value_or_status("peak_mb", 5)), ("vs eager", common.ratio("vs_eager")),
           ("note", "reason")]
def _family_ms(family):
    return lambda r: common.fmt(r["families"][family]["ms"])


FAMILY_COLUMNS = [("row", "provider"), *((f, _family_ms(f)) for f in profile_step.FAMILY_NAMES),
                  ("GPU kernel ms", lambda r: common.fmt(r.get("gpu_kernel_ms"))),
                  ("wall ms (profiled)", lambda r: common.fmt(r.get("wall_ms"))),
                  ("GPU idle gaps/step", lambda r: common.fmt(r.get("idle_gaps_per_step"))),
                  ("idle ms/step", lambda r: common.fmt(r.get("idle_gap_ms_per_step"))),
                  ("longest gap ms", lambda r: common.fmt((r.get("longest_idle_gaps_ms") or [None])[0])),
                  ("copies by kind/step", lambda r: ", ".join(f"{k} {n:.0f}" for k, n in
                                                               (r.get("copies_by_kind") or {}).items()))]


HOST_PACKAGE_NAMES = tuple(p for p, _ in profile_step.HOST_PACKAGES) + ("other",)
HOST_COLUMNS = [("row", "provider"), ("host ms/step", lambda r: common.fmt(r.get("host_ms_per_step"))),
                ("load/core", lambda r: common.fmt(r.get("host_load"))),
                *((p, lambda r, p=p: common.fmt(r["host_by_package"].get(p, 0.0))) for p in HOST_PACKAGE_NAMES)]


def host_lines(rows):
    """The host's time per step by package (cProfile's self time, its own overhead included), and each row's
    top functions: on a host-bound step, the Python to remove."""
    timed = [r for r in rows if r.get("host_by_package")]
    if not timed:
        return []
    lines = ["### Host time by package, self ms per step (cProfile)", "", common.markdown_table(timed, HOST_COLUMNS),
             "", "Top host functions (self ms per step, calls per step):", ""]
    for r in timed:
        top = "; ".join(f"`{name}` {ms:.2f} ({calls:.0f})" for name, ms, calls in r["host_top_functions"][:6])
        lines.append(f"- {r['provider']}: {top}")
    own = [r for r in timed if r.get("own_ops")]
    if own:
        lines += ["", "Our operators (calls per step, host us per call with what they run, under torch.profiler):", ""]
        lines += [f"- {r['provider']}: " + "; ".join(f"`{n}` {c:.0f}, {us:.0f}" for n, c, us in r["own_ops"])
                  for r in own]
    traced = [r for r in timed if r.get("runtime_calls")]
    if traced:
        lines += ["", "Host CUDA calls (calls per step, ms per step, from the profiled steps):", ""]
        lines += [f"- {r['provider']}: " + "; ".join(f"`{n}` {c:.0f}, {ms:.2f}" for n, c, ms in r["runtime_calls"][:6])
                  for r in traced]
    return lines + [""]


def markdown(rows):
    rows = add_vs_nanogpt([r for r in rows if r["bench"] == "e2e"])
    note = (f"## End to end\n\n{formula(rows)}.\n\nStep time: median of the per-step intervals between CUDA events "
            "(no synchronize between steps) over the timed steps after the warm-up (which pays the compile); "
            "p20-p80 its spread. GPU busy: the union of kernel, memcpy and memset intervals over wall time, "
            "kernels/step: kernel launches, host syncs/step: *Synchronize calls, all from torch.profiler (CUDA "
            "activity only) over a few more steps; ops/step: outermost aten operators and Triton launches of one step, "
            "sync ops/step: its .item()-like calls (bench.profile_step). Peak memory: "
            "torch.cuda.max_memory_allocated over the timed steps less what was allocated before the model. "
            "Peers: the nanoGPT recipe and DeepSpeed with torch's kernels; ours: our kernels.\n\n"
            "Against the targets (issue 10):\n\n" + "\n".join(verdict(rows)))
    lines = common.tables_markdown(rows, COLUMNS, note)
    profiled = [r for r in rows if r.get("families")]
    if profiled:
        lines += ["### GPU time by kernel family, ms per step", "",
                  common.markdown_table(profiled, FAMILY_COLUMNS), ""]
    return lines + host_lines(rows) + common.unavailable(rows) + [""]


def plot(rows, out_dir):
    rows = [r for r in rows if r["bench"] == "e2e"]
    if not rows:
        return []
    plt = common.pyplot()
    names = [r["provider"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "peak_mb", "peak memory (MiB)")):
        values = [r.get(key) or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color=["tab:red" if common.role(r) == common.OURS else "tab:gray"
                                                        for r in rows])
        for bar, r in zip(bars, rows):
            if r.get("status") != "ok" or r.get(key) is None:
                ax.annotate(r.get("status") if r.get("status") != "ok" else "n/a", (bar.get_x(), 0))
        ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
        ax.set(ylabel=label)
        ax.grid(axis="y", alpha=0.3)
    smoke = rows[0].get("smoke")
    fig.suptitle(rows[0]["table"] + ("\nSMOKE run, not a speed measurement" if smoke else ""), fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "e2e.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None):
    parser = common.cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 32; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30; smoke 1)")
    parser.add_argument("--only", default=None, help="comma-separated row names (default: every row of ROWS)")
    args = parser.parse_args(argv)
    common.check_at_least(parser, args, micro_batch=1, steps=1)
    if args.only is not None and not args.only.replace(",", "").strip():
        parser.error("--only: no row names given")
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    unknown = [n for n in only or () if n not in {r.name for r in ROWS}]
    if unknown:
        parser.error(f"--only: unknown row(s) {', '.join(map(repr, unknown))}; rows: "
                     f"{', '.join(repr(r.name) for r in ROWS)}")
    common.use_interpreter_without_gpu(args.smoke)
    out = common.out_dir(args)
    rows = run(args.smoke, common.Deadline(args.budget_s), args.micro_batch, args.steps, only, out)
    common.write_outputs(rows, out, "End-to-end training-step benchmark", [(markdown, plot)])


if __name__ == "__main__":
    main()
