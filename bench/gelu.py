"""Bias + GELU (the MLP's activation after its first matmul): our fused kernel against eager and torch.compile.

    python -m bench.gelu --out DIR [--smoke]

y = gelu(x + bias, approximate="tanh") over (N, C=3072) rows (GPT-1's MLP width), N = 8k..32k tokens, two
precisions: a bf16 x with an fp32 bias (torch.autocast: the matmul's output and an fp32 parameter) and bf16 with a
bf16 bias (DeepSpeed's bf16 model). Each provider's backward returns dx and the bias gradient. Providers: ours
(kernels.fused_bias_gelu, whose backward sums the bias gradient as it writes dx), eager (torch's add and F.gelu; the
bias gradient a reduction of its own) and torch.compile of that. GB/s counts the bytes that must move: x read and y
written (fwd); dy and x read, dx written (bwd); the bias and its gradient are left out (under 0.1%).
"""

import functools
import os

from . import common

GRID = {"N": (32768, 16384, 8192), "C": 3072}
SMOKE_GRID = {"N": (24,), "C": 100}
PRECISIONS = {"bf16, fp32 bias": ("bfloat16", "float32"), "bf16": ("bfloat16", "bfloat16")}  # x dtype, bias dtype


def gelu_bytes(N, C, x_size, mode="fwd+bwd"):
    """Bytes that must move: fwd reads x and writes y, bwd reads dy and x and writes dx (all in x's dtype)."""
    fwd, bwd = 2 * N * C * x_size, 3 * N * C * x_size
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def torch_bias_gelu(x, bias):
    """torch's ops: the add and F.gelu, y in x's dtype (gpt1.model.LinearGELU's eager path adds the bias in the
    matmul instead; its bias gradient is a reduction of its own either way)."""
    import torch.nn.functional as F

    return F.gelu(x + bias.to(x.dtype), approximate="tanh")


def ours(x, bias):
    import kernels

    return kernels.fused_bias_gelu(x, bias)


def providers(smoke):
    return {"ours": ours, "eager": torch_bias_gelu, "torch.compile": common.compiled(torch_bias_gelu, smoke)}


def run(smoke, deadline=None):
    import torch

    grid, dev = (SMOKE_GRID if smoke else GRID), common.device()
    deadline, env, rows = deadline or common.Deadline(0), common.environment(smoke), []
    fns, C = providers(smoke), grid["C"]
    for precision, (x_dtype, b_dtype) in PRECISIONS.items():
        table = f"bias + GELU C={C}, {precision}"
        for N in grid["N"]:
            base = dict(env, bench="gelu", table=table, x=N, N=N, C=C, precision=precision)
            x = torch.randn(N, C, device=dev, dtype=getattr(torch, x_dtype), requires_grad=True)
            b = torch.randn(C, device=dev, dtype=getattr(torch, b_dtype), requires_grad=True)
            for name, fn in fns.items():
                rows += bench_provider(base, name, functools.partial(fn, x, b), [x, b], x.element_size(), smoke,
                                       deadline)
            x = b = None
            common.free_memory()
    return rows


def bench_provider(base, name, call, inputs, x_size, smoke, deadline):
    if deadline.passed():
        return [dict(base, provider=name, mode=m, **common.NOT_RUN) for m in common.MODES]
    rows = []
    for mode, res in common.time_modes(call, inputs, common.MODES, smoke).items():
        row = dict(base, provider=name, mode=mode, **res)
        if res["status"] == "ok":
            row["gbps"] = gelu_bytes(base["N"], base["C"], x_size, mode) / (res["ms"] * 1e-3) / 1e9
        rows.append(row)
    return rows


COLUMNS = [("N", "N"), ("provider", "provider"), ("ms", common.value_or_status("ms")),
           ("p20-p80", common.spread_cell), ("host ms", common.value_or_status("host_ms")),
           ("GB/s", common.value_or_status("gbps")), ("peak MiB", common.value_or_status("peak_mb", 5)),
           ("vs eager", common.ratio("vs_eager")), ("vs best peer", common.ratio("vs_best_peer")),
           ("best peer", "best_peer"), ("note", "reason")]


def markdown(rows):
    rows = [r for r in rows if r["bench"] == "gelu"]
    note = ("## Bias + GELU\n\ny = gelu(x + bias) (tanh), the MLP's activation; every provider's backward returns "
            "dx and the bias gradient. GB/s against the bytes that must move: x read and y written (fwd), dy and x "
            "read and dx written (bwd). eager is torch's add and F.gelu (its bias gradient a reduction of its "
            "own); torch.compile fuses them itself.")
    return common.tables_markdown(rows, COLUMNS, note) + common.unavailable(rows) + [""]


def plot(rows, out_dir):
    rows, paths = [r for r in rows if r["bench"] == "gelu"], []
    for i, table in enumerate(dict.fromkeys(r["table"] for r in rows)):
        path = os.path.join(out_dir, f"gelu_{i}.png")
        paths.append(common.line_plot(rows, "ms", path, f"{table}: ms against N (lower is better)", "N tokens",
                                      "ms", [(table, m) for m in common.MODES]))
    return paths


def main(argv=None):
    args = common.cli_parser(__doc__.splitlines()[0]).parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)
    rows = run(args.smoke, common.Deadline(args.budget_s))
    common.write_outputs(rows, common.out_dir(args), "Bias + GELU benchmark", [(markdown, plot)])


if __name__ == "__main__":
    main()
