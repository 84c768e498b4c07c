"""Residual dropout + add + LayerNorm (GPT-1's post-LN block glue): our fused kernel against eager and torch.compile.

    python -m bench.layer_norm --out DIR [--smoke]

y = layer_norm(x + dropout(h)) over (N, C=768) rows, N = 8k..32k tokens, dropout 0 and 0.1 (GPT-1's
resid_pdrop), two precisions: bf16 x and h (DeepSpeed's bf16 model) and an fp32 residual x with a bf16 branch h
(torch.autocast, the nanoGPT recipe's). As in the model (gpt1.model.AddLayerNorm), each provider returns
(y, y_branch): y for the next residual add and y in bf16 for the next sublayer (y itself where it is bf16
already), and the backward receives a gradient for each. Providers: ours (kernels.fused_add_dropout_layer_norm
with branch_dtype, which writes both outputs and adds both gradients in its kernels), eager (torch's ops:
F.dropout, the add, F.layer_norm, the cast), torch.compile of that (Inductor fuses it into a kernel each way, with
its own dropout draws). GB/s counts the bytes that must move: x and h read, y written and y_branch where it is a
tensor of its own (fwd); dy, dy_branch, x and h read, dx and dh written (bwd); the parameters and per-row
statistics are left out (under 1%).
"""

import functools

from . import common

GRID = {"N": (32768, 16384, 8192), "C": 768, "dropout": (0.1, 0.0)}
SMOKE_GRID = {"N": (24,), "C": 100, "dropout": (0.1,)}
PRECISIONS = {"bf16": ("bfloat16", "bfloat16"), "fp32 residual": ("float32", "bfloat16")}  # x dtype, h dtype


BRANCH_SIZE = 2  # bytes per element of y_branch, bf16


def ln_bytes(N, C, x_size, h_size, mode="fwd+bwd"):
    """Bytes that must move: fwd reads x, h and writes y (in the promoted dtype) and y_branch (bf16) unless y is
    bf16 already; bwd reads dy, dy_branch, x, h and writes dx, dh."""
    y_size = max(x_size, h_size)
    branch = BRANCH_SIZE if y_size != BRANCH_SIZE else 0
    fwd = N * C * (x_size + h_size + y_size + branch)
    bwd = N * C * (y_size + BRANCH_SIZE + 2 * x_size + 2 * h_size)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def torch_add_dropout_layer_norm(x, h, weight, bias, dropout_p):
    """(y, y in bf16) with torch's ops, as gpt1.model.AddLayerNorm's eager path."""
    import torch
    import torch.nn.functional as F

    y = F.layer_norm(x + F.dropout(h, dropout_p), weight.shape, weight, bias)
    return y, y.to(torch.bfloat16)


def ours(x, h, weight, bias, dropout_p):
    import torch

    import kernels

    return kernels.fused_add_dropout_layer_norm(x, h, weight, bias, dropout_p=dropout_p, branch_dtype=torch.bfloat16)


def providers(smoke):
    return {"ours": ours, "eager": torch_add_dropout_layer_norm,
            "torch.compile": common.compiled(torch_add_dropout_layer_norm, smoke)}


def run(smoke, deadline=None):
    import torch

    grid, dev = (SMOKE_GRID if smoke else GRID), common.device()
    deadline, env, rows = deadline or common.Deadline(0), common.environment(smoke), []
    fns, C = providers(smoke), grid["C"]
    for precision, (x_dtype, h_dtype) in PRECISIONS.items():
        for p in grid["dropout"]:
            table = f"add + dropout {p:g} + LayerNorm C={C}, {precision}"
            for N in grid["N"]:
                base = dict(env, bench="layer_norm", table=table, x=N, N=N, C=C, dropout=p, precision=precision)
                x = torch.randn(N, C, device=dev, dtype=getattr(torch, x_dtype), requires_grad=True)
                h = torch.randn(N, C, device=dev, dtype=getattr(torch, h_dtype), requires_grad=True)
                w = torch.ones(C, device=dev, dtype=x.dtype, requires_grad=True)
                b = torch.zeros(C, device=dev, dtype=x.dtype, requires_grad=True)
                nbytes = functools.partial(ln_bytes, N, C, x.element_size(), h.element_size())
                for name, fn in fns.items():
                    rows += common.bandwidth_rows(base, name, functools.partial(fn, x, h, w, b, p), [x, h, w, b],
                                                  nbytes, smoke, deadline)
                x = h = w = b = None
                common.free_memory()
    return rows


def markdown(rows):
    rows = [r for r in rows if r["bench"] == "layer_norm"]
    note = ("## Add + dropout + LayerNorm\n\nEach provider returns (y, y_branch), y_branch the bf16 copy for the "
            "next sublayer, and its backward gets a gradient for each, as in the model. GB/s against the bytes "
            "that must move: x and h read, y and (unless y is bf16) y_branch written (fwd), dy, dy_branch, x and h "
            "read and dx, dh written (bwd). eager is torch's ops; torch.compile fuses them itself. \"fp32 "
            "residual\": x fp32, h bf16, as under torch.autocast.")
    return common.tables_markdown(rows, common.BANDWIDTH_COLUMNS, note) + common.unavailable(rows) + [""]


def plot(rows, out_dir):
    return common.ms_plots(rows, "layer_norm", out_dir)


def main(argv=None):
    args = common.cli_parser(__doc__.splitlines()[0]).parse_args(argv)
    common.use_interpreter_without_gpu(args.smoke)
    rows = run(args.smoke, common.Deadline(args.budget_s))
    common.write_outputs(rows, common.out_dir(args), "Add + dropout + LayerNorm benchmark", [(markdown, plot)])


if __name__ == "__main__":
    main()
