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
            nbytes = functools.partial(gelu_bytes, N, C, x.element_size())
            for name, fn in fns.items():
                rows += common.bandwidth_rows(base, name, functools.partial(fn, x, b), [x, b], nbytes, smoke,
                                              deadline)
            x = b = None
            common.free_memory()
    return rows


def markdown(rows):
    rows = [r for r in rows if r["bench"] == "gelu"]
    note = ("## Bias + GELU\n\ny = gelu(x + bias) (tanh), the MLP's activation; every provider's backward returns "
            "dx and the bias gradient. GB/s against the bytes that must move: x read and y written (fwd), dy and x "
            "read and dx written (bwd). eager is torch's add and F.gelu (its bias gradient a reduction of its "
            "own); torch.compile fuses them itself.")
    return common.tables_markdown(rows, common.BANDWIDTH_COLUMNS, note) + common.unavailable(rows) + [""]


def plot(rows, out_dir):
    return common.ms_plots(rows, "gelu", out_dir)


def main(argv=None):
    args = common.cli_parser(__doc__.splitlines()[0]).parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)
    rows = run(args.smoke, common.Deadline(args.budget_s))
    common.write_outputs(rows, common.out_dir(args), "Bias + GELU benchmark", [(markdown, plot)])


if __name__ == "__main__":
    main()
