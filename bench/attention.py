"""Causal attention: our fused kernel against the eager reference and its peers, forward, backward and both.

    python -m bench.attention --out DIR [--smoke]

Providers (all from kernels/reference.py but ours): ours (kernels.fused_attention), at T <= 128 also `ours (tiled)`
(the same with the short-sequence kernels off, so that one run compares the two), eager (the reference),
torch's scaled_dot_product_attention forced to each backend in turn (sdpa-flash, sdpa-efficient, sdpa-cudnn),
flash-attn's flash_attn_func where it imports, and torch.compile of the reference. A provider that cannot run
here (not installed, or a backend's documented refusal of these inputs) is recorded as skipped with the
reason; any other failure is an error.

Shapes: GPT-1's heads (H=12, D=64) and D=128, T from 128 to 8192 with B = 16384 // T (constant tokens),
bf16, causal, attention dropout 0 and 0.1 (GPT-1 trains with 0.1). The short sequences come first (T=128 and
256, where launch overhead shows: compare `ms` with `host ms`), both dropouts per T, so that a time budget
cuts the long sequences rather than GPT-1's own.
FLOPs: a forward is two T x T x D matmuls per head, 4*B*H*T*T*D, halved for causal; the backward does five
such matmuls to the forward's two, 2.5x; fwd+bwd is 3.5x. TFLOP/s = FLOPs / median time.
"""

import functools

from . import common

GRID = {"T": (128, 256, 512, 1024, 2048, 4096, 8192), "D": (64, 128), "H": 12, "tokens": 16384, "dropout": (0.0, 0.1)}
SMOKE_GRID = {"T": (16, 48), "D": (16,), "H": 2, "tokens": 48, "dropout": (0.1,)}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(B, H, T, D, causal=True, mode="fwd"):
    """FLOPs of one call in `mode`, as FlashAttention and Triton's tutorial count them."""
    fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return fwd * FLOP_FACTOR[mode]


TILED = "ours (tiled)"


def tiled(fn):
    """fn with the short-sequence kernels off (kernels.attention._SHORT_CONFIGS) in its forward: the tiled forward
    at every T. Its backward, run later by autograd, takes the launcher's own choice (the short backward only up to
    T = 64, shorter than any T of GRID)."""
    from kernels import attention

    def call(*args, **kwargs):
        with attention.short_configs(None):
            return fn(*args, **kwargs)

    return call


def providers(smoke):
    import kernels
    from kernels import reference

    ps = {"ours": kernels.fused_attention, TILED: tiled(kernels.fused_attention), "eager": reference.attention}
    for backend in reference.SDPA_BACKENDS:
        ps[f"sdpa-{backend}"] = common.refusable(functools.partial(reference.sdpa_attention, backend=backend))
    ps["flash-attn"] = common.refusable(reference.flash_attn_attention)
    ps["torch.compile"] = common.compiled(reference.attention, smoke)
    return ps


def table_name(H, D, dropout, tokens):
    return f"attention H={H} D={D} causal dropout={dropout} bf16, B*T={tokens}"


def run(smoke, deadline=None):
    import torch

    grid, dev = (SMOKE_GRID if smoke else GRID), common.device()
    deadline, env, rows = deadline or common.Deadline(0), common.environment(smoke), []
    provs = providers(smoke)
    for D in grid["D"]:
        for T in grid["T"]:
            for p in grid["dropout"]:
                B, H = max(1, grid["tokens"] // T), grid["H"]
                base = dict(env, bench="attention", table=table_name(H, D, p, grid["tokens"]), x=T,
                            B=B, H=H, T=T, D=D, dropout=p, dtype="bf16")
                qkv = [torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3)]
                for name, fn in provs.items():
                    if name == TILED and T > 128:  # the short kernels' longest: the row would repeat ours
                        continue
                    rows += bench_provider(base, name, fn, qkv, p, smoke, deadline)
                qkv = None
                common.free_memory()
    return rows


def bench_provider(base, name, fn, qkv, dropout_p, smoke, deadline):
    if deadline.passed():
        return [dict(base, provider=name, mode=m, **common.NOT_RUN) for m in common.MODES]
    call = functools.partial(fn, *qkv, causal=True, dropout_p=dropout_p)
    rows = []
    for mode, res in common.time_modes(call, qkv, common.MODES, smoke).items():
        row = dict(base, provider=name, mode=mode, **res)
        if res["status"] == "ok":
            flops = attention_flops(base["B"], base["H"], base["T"], base["D"], True, mode)
            row["tflops"] = flops / (res["ms"] * 1e-3) / 1e12
        rows.append(row)
    return rows


COLUMNS = [("T", "T"), ("B", "B"), ("provider", "provider"), ("ms", common.value_or_status("ms")),
           ("p20-p80", common.spread_cell), ("host ms", common.value_or_status("host_ms")),
           ("graph ms", common.graph_cell), ("TFLOP/s", common.value_or_status("tflops")),
           ("peak MiB", common.value_or_status("peak_mb", 5)), ("vs eager", common.ratio("vs_eager")),
           ("vs best peer", common.ratio("vs_best_peer")), ("best peer", "best_peer"),
           ("graph vs best peer", common.graph_ratio_cell), ("note", "reason")]


def markdown(rows):
    rows = [r for r in rows if r["bench"] == "attention"]
    note = ("## Attention\n\nTFLOP/s counts 4*B*H*T*T*D per forward, x0.5 for causal, x2.5 for the backward, "
            "x3.5 for fwd+bwd. Peak memory is torch.cuda.max_memory_allocated during one call, inputs included.")
    return common.tables_markdown(rows, COLUMNS, note) + common.unavailable(rows) + [""]


def plot(rows, out_dir):
    import os

    rows, paths = [r for r in rows if r["bench"] == "attention"], []
    for table in dict.fromkeys(r["table"] for r in rows):
        D, p = next((r["D"], r["dropout"]) for r in rows if r["table"] == table)
        path = os.path.join(out_dir, f"attention_D{D}_dropout{p}.png")
        paths.append(common.line_plot(rows, "tflops", path, "causal attention, TFLOP/s against T", "T",
                                      "TFLOP/s", [(table, m) for m in common.MODES]))
    return paths


def main(argv=None):
    args = common.cli_parser(__doc__.splitlines()[0]).parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)
    rows = run(args.smoke, common.Deadline(args.budget_s))
    common.write_outputs(rows, common.out_dir(args), "Attention benchmark", [(markdown, plot)])


if __name__ == "__main__":
    main()
