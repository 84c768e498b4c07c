"""kernels.layer_norm.fused_add_dropout_layer_norm against float64 truth and kernels.reference.add_dropout_layer_norm.

Numerics criterion (flash-attention's, tests/helpers.py: assert_all_within): for y and every gradient (dx, dh,
d weight, d bias) the kernel's max abs error against the reference run in float64 on the same inputs is at most
2x the max error of the eager reference run in the inputs' own dtypes (fp32 arithmetic, as the kernel), plus one
fp32 rounding step at the op's scale. With dropout both sides apply the very same keep-mask
(add_dropout_layer_norm_mask). On CPU the kernels run in the Triton interpreter (tests/conftest.py): small shapes.
"""

import pytest
import torch
from helpers import (
    assert_all_within,
    assert_close,
    assert_double_backward_refused,
    fp32_eps_at,
    triton_constexpr_calls_on_the_host,
)

from kernels import reference
from kernels.layer_norm import (
    add_dropout_layer_norm_backward,
    add_dropout_layer_norm_backward_op,
    add_dropout_layer_norm_forward,
    add_dropout_layer_norm_mask,
    add_dropout_layer_norm_op,
    fused_add_dropout_layer_norm,
    new_dropout_seed,
)

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
SEED = 1234
NAMES = ("y", "dx", "dh", "dweight", "dbias")


def _inputs(shape, x_dtype, h_dtype, w_dtype, bias, device):
    """[x, h, weight, bias or None] as leaves of the given dtypes (weight around 1, as a trained LN's)."""
    C = shape[-1]
    x, h = torch.randn(shape, device=device).to(x_dtype), torch.randn(shape, device=device).to(h_dtype)
    w = (1.0 + 0.5 * torch.randn(C, device=device)).to(w_dtype)
    b = (0.5 * torch.randn(C, device=device)).to(w_dtype) if bias else None
    return [x, h, w, b]


def _run(fn, inputs, dy, dtype=None):
    """[y, dx, dh, dweight, dbias (if any)] of fn(x, h, weight, bias) on fresh leaf copies (optionally cast).
    With a tuple of outputs (y, y_branch) and of gradients: [y, y_branch, dx, ...], a None gradient leaving
    that output out of the backward."""
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    outs, dys = (out, dy) if isinstance(out, tuple) else ((out,), (dy,))
    present = [t for t in leaves if t is not None]
    pairs = [(o, d.to(o.dtype)) for o, d in zip(outs, dys) if d is not None]
    return [*outs, *torch.autograd.grad([o for o, _ in pairs], present, [d for _, d in pairs])]


def _mask(shape, p, device):
    return add_dropout_layer_norm_mask(SEED, shape[:-1].numel(), shape[-1], p, device).reshape(shape) if p else None


CASES = [  # shape, x dtype, h dtype, weight/bias dtype, bias, dropout p
    ((1, 16), FP32, FP32, FP32, True, 0.0),
    ((7, 100), BF16, BF16, BF16, True, 0.1),
    ((2, 5, 100), FP16, FP16, FP16, False, 0.5),
    ((3, 768), BF16, BF16, BF16, True, 0.1),
    ((2, 3, 768), FP32, BF16, FP32, True, 0.1),
    ((5, 768), FP32, FP32, FP32, False, 0.0),
    ((1, 768), FP16, FP16, FP16, True, 0.5),
    ((9, 16), FP16, FP16, FP16, True, 0.0),
    ((2, 4, 16), FP32, BF16, FP32, False, 0.5),
    ((11, 100), FP32, FP32, FP32, True, 0.5),
    ((3, 3, 100), BF16, BF16, FP32, True, 0.0),
    ((6, 16), BF16, BF16, BF16, False, 0.1),
    ((4, 100), FP32, BF16, FP32, True, 0.0),
]


def _case_id(case):
    shape, x_dtype, h_dtype, w_dtype, bias, p = case
    name = lambda t: str(t)[6:]
    return (f"{'x'.join(map(str, shape))}-x{name(x_dtype)}-h{name(h_dtype)}-w{name(w_dtype)}"
            f"{'-bias' if bias else ''}-p{p}")


@pytest.mark.parametrize("shape,x_dtype,h_dtype,w_dtype,bias,p", CASES, ids=[_case_id(c) for c in CASES])
def test_against_reference(shape, x_dtype, h_dtype, w_dtype, bias, p, device):
    torch.manual_seed(0)
    inputs = _inputs(shape, x_dtype, h_dtype, w_dtype, bias, device)
    dy = torch.randn(shape, device=device)
    mask = _mask(torch.Size(shape), p, device)
    actual = _run(lambda *a: fused_add_dropout_layer_norm(*a, dropout_p=p, _seed=SEED), inputs, dy)
    ref = lambda *a: reference.add_dropout_layer_norm(*a, dropout_p=p, dropout_mask=mask)
    low, truth = _run(ref, inputs, dy), _run(ref, inputs, dy, dtype=torch.float64)
    out_dtype = torch.promote_types(x_dtype, h_dtype)
    assert actual[0].shape == shape
    assert [t.dtype for t in actual] == [out_dtype, x_dtype, h_dtype, w_dtype] + [w_dtype] * bias
    names = NAMES if bias else NAMES[:4]
    assert_all_within(list(zip(names, actual, low, truth)), atol=fp32_eps_at(*truth))


def test_empty_rows(device):
    x, h, w, b = _inputs((0, 3, 16), BF16, BF16, FP32, True, device)
    y, dx, dh, dw, db = _run(lambda *a: fused_add_dropout_layer_norm(*a, dropout_p=0.1), [x, h, w, b],
                             torch.zeros(0, 3, 16, device=device))
    assert y.shape == dx.shape == dh.shape == (0, 3, 16) and y.dtype == BF16
    assert dw.dtype == db.dtype == FP32 and not dw.any() and not db.any()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_non_contiguous_inputs(p, device):
    """A transposed x (column stride != 1) and an h of padded rows (row stride > C) give bitwise the results of
    their contiguous copies."""
    torch.manual_seed(0)
    N, C = 6, 40
    x = torch.randn(C, N, device=device).t()
    h = torch.randn(N, C + 24, device=device)[:, :C]
    w, b = torch.randn(C, device=device), torch.randn(C, device=device)
    dy = torch.randn(C, N, device=device).t()
    fn = lambda *a: fused_add_dropout_layer_norm(*a, dropout_p=p, _seed=SEED)
    for a, e, name in zip(_run(fn, [x, h, w, b], dy), _run(fn, [x.contiguous(), h.contiguous(), w, b], dy), NAMES):
        assert_close(a, e, atol=0, rtol=0, name=name)
    # weight and bias as the columns of one (C, 2) matrix (stride 2; the leaf is the matrix, so that no copy hides
    # the stride), against contiguous copies of them
    wb = torch.randn(C, 2, device=device)
    strided = lambda x, h, wb: fn(x, h, wb[:, 0], wb[:, 1])
    copied = lambda x, h, wb: fn(x, h, wb[:, 0].contiguous(), wb[:, 1].contiguous())
    for a, e, name in zip(_run(strided, [x, h, wb], dy), _run(copied, [x, h, wb], dy), NAMES):
        assert_close(a, e, atol=0, rtol=0, name=name)


def test_launchers_match_autograd(device):
    """The seed API (forward and backward launchers, the mask drawn again from the seed) gives bitwise the
    autograd path's results."""
    torch.manual_seed(0)
    shape, p = (3, 5, 100), 0.2
    x, h, w, b = _inputs(shape, FP32, BF16, FP32, True, device)
    dy = torch.randn(shape, device=device)
    expected = _run(lambda *a: fused_add_dropout_layer_norm(*a, dropout_p=p, _seed=SEED), [x, h, w, b], dy)
    y, mean, rstd = add_dropout_layer_norm_forward(x, h, w, b, dropout_p=p, seed=SEED)
    assert mean.shape == rstd.shape == (3, 5) and mean.dtype == rstd.dtype == FP32
    grads = add_dropout_layer_norm_backward(dy, x, h, w, b, mean, rstd, dropout_p=p, seed=SEED)
    for a, e, name in zip((y, *grads), expected, NAMES):
        assert_close(a, e, atol=0, rtol=0, name=name)
    assert add_dropout_layer_norm_backward(dy, x, h, w, None, mean, rstd, dropout_p=p, seed=SEED)[3] is None


BRANCH_CASES = [  # shape, x dtype, h dtype, weight/bias dtype, branch dtype, dropout p
    ((2, 3, 768), FP32, BF16, FP32, BF16, 0.1),  # the model under torch.autocast
    ((7, 100), BF16, BF16, BF16, BF16, 0.1),  # DeepSpeed's bf16: a second bf16 buffer
    ((5, 100), FP32, FP32, FP32, FP16, 0.0),
]


@pytest.mark.parametrize("shape,x_dtype,h_dtype,w_dtype,branch_dtype,p", BRANCH_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-x{str(c[1])[6:]}-branch{str(c[4])[6:]}"
                              for c in BRANCH_CASES])
def test_branch_output_against_reference(shape, x_dtype, h_dtype, w_dtype, branch_dtype, p, device):
    """With branch_dtype the op returns (y, y rounded to branch_dtype), and its backward takes both outputs'
    gradients: y, y_branch and every gradient within the criterion against the reference, whose autograd adds
    the two gradients."""
    torch.manual_seed(0)
    inputs = _inputs(shape, x_dtype, h_dtype, w_dtype, True, device)
    dys = (torch.randn(shape, device=device), torch.randn(shape, device=device))
    mask = _mask(torch.Size(shape), p, device)
    actual = _run(lambda *a: fused_add_dropout_layer_norm(*a, dropout_p=p, branch_dtype=branch_dtype, _seed=SEED),
                  inputs, dys)
    ref = lambda *a: reference.add_dropout_layer_norm(*a, dropout_p=p, dropout_mask=mask, branch_dtype=branch_dtype)
    low, truth = _run(ref, inputs, dys), _run(ref, inputs, dys, dtype=torch.float64)
    out_dtype = torch.promote_types(x_dtype, h_dtype)
    assert [t.dtype for t in actual] == [out_dtype, branch_dtype, x_dtype, h_dtype, w_dtype, w_dtype]
    assert actual[0].data_ptr() != actual[1].data_ptr()
    assert_close(actual[1], actual[0].to(branch_dtype), atol=0, rtol=0, name="y_branch")  # one rounding of y
    assert_all_within(list(zip(("y", "y_branch", *NAMES[1:]), actual, low, truth)), atol=fp32_eps_at(*truth))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
@pytest.mark.parametrize("used", ["y", "y_branch"])
def test_branch_with_one_output_unused(used, compiled, device):
    """Only one of (y, y_branch) reaches the loss (the last block's y_branch feeds the head): the gradients equal
    those of the plain op on that output's gradient, eager (the unused one is never read) and compiled."""
    torch.manual_seed(0)
    shape, p = (3, 100), 0.2
    inputs = _inputs(shape, FP32, BF16, FP32, True, device)
    dy = torch.randn(shape, device=device).to(BF16).float()  # exact in bf16: both outputs see the same gradient
    fn = lambda *a: fused_add_dropout_layer_norm(*a, dropout_p=p, branch_dtype=BF16, _seed=SEED)
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    actual = _run(fn, inputs, (dy, None) if used == "y" else (None, dy))[2:]
    expected = _run(lambda *a: fused_add_dropout_layer_norm(*a, dropout_p=p, _seed=SEED), inputs, dy)[1:]
    for a, e, name in zip(actual, expected, NAMES[1:]):
        assert_close(a, e, atol=0, rtol=0, name=name)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- dropout


def test_dropout_mask_fraction_and_seeds(device):
    N, C, p = 64, 768, 0.25
    keep = add_dropout_layer_norm_mask(SEED, N, C, p, device)
    assert keep.shape == (N, C) and keep.dtype == torch.bool
    dropped = 1.0 - keep.float().mean().item()
    assert abs(dropped - p) < 0.01, dropped  # 49152 draws: std 0.002
    assert (keep.float().mean(1) - (1 - p)).abs().max() < 0.1  # every row is dropped about as much (std 0.016)
    assert not torch.equal(keep[0], keep[1])
    assert torch.equal(keep, add_dropout_layer_norm_mask(SEED, N, C, p, device))
    assert not torch.equal(keep, add_dropout_layer_norm_mask(SEED + 1, N, C, p, device))
    # a function of (seed, row, column) only: fewer rows or columns (other block widths) give the corner
    assert torch.equal(keep[:10, :100], add_dropout_layer_norm_mask(SEED, 10, 100, p, device))
    assert abs((1.0 - add_dropout_layer_norm_mask(SEED, N, C, 0.5, device).float().mean().item()) - 0.5) < 0.01


def test_backward_uses_the_forward_mask(device):
    """dh is dx * 1/(1-p) where the forward kept h (exact for p = 0.5, both in fp32) and 0 where it dropped it,
    and the output matches the reference on that very mask."""
    torch.manual_seed(0)
    shape, p = (2, 7, 100), 0.5
    x, h, w, b = _inputs(shape, FP32, FP32, FP32, True, device)
    y, dx, dh, _, _ = _run(lambda *a: fused_add_dropout_layer_norm(*a, dropout_p=p, _seed=SEED), [x, h, w, b],
                           torch.randn(shape, device=device))
    keep = _mask(torch.Size(shape), p, device)
    assert torch.equal(dh, torch.where(keep, dx * 2.0, 0.0))
    assert dx.abs().min() > 0  # so that the zeros of dh are the dropped elements
    assert_close(y, reference.add_dropout_layer_norm(x, h, w, b, p, dropout_mask=keep), atol=1e-5, rtol=1e-5)


def test_dropout_seed_follows_torch_manual_seed(device):
    x, h, w = torch.randn(4, 32, device=device), torch.randn(4, 32, device=device), torch.randn(32, device=device)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(fused_add_dropout_layer_norm(x, h, w, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    # without dropout no seed is drawn: the default generator is left alone
    torch.manual_seed(0)
    fused_add_dropout_layer_norm(x, h, w)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


# ---------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("x_dtype,h_dtype,bias,p", [(BF16, BF16, True, 0.1), (FP32, BF16, False, 0.0),
                                                    (FP16, FP16, True, 0.0)])
def test_compiled_matches_eager(x_dtype, h_dtype, bias, p, device):
    """fullgraph (no graph break), aot_eager: forward and every gradient bitwise equal to eager mode, the seed
    drawn inside the graph from the same generator state."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    shape = (2, 3, 40)
    inputs = _inputs(shape, x_dtype, h_dtype, FP32, bias, device)
    dy = torch.randn(shape, device=device)
    fn = lambda x, h, w, b: fused_add_dropout_layer_norm(x * 2, h, w, b, dropout_p=p)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        torch.manual_seed(1)
        results.append(_run(f, inputs, dy))
    for a, e, name in zip(*results, NAMES):
        assert_close(a, e, atol=0, rtol=0, name=name)
    torch._dynamo.reset()


def _op_args(device, dropout, bias, branch_dtype=None):
    torch.manual_seed(0)
    x, h, w, b = (t.requires_grad_() if t is not None else None for t in _inputs((3, 5, 24), FP32, BF16, FP32,
                                                                                  bias, device))
    return (x, h, w, b, new_dropout_seed(device) if dropout else None, 0.2 if dropout else 0.0, 1e-5, branch_dtype)


def _op_backward_args(device, bias, grads=("y", "y_branch")):
    x, h, w, b, seed, p, eps, _ = _op_args(device, True, bias)
    x, h, w = x.detach(), h.detach(), w.detach()
    b = b.detach() if b is not None else None
    y, _, mean, rstd = add_dropout_layer_norm_op(x, h, w, b, seed, p, eps, BF16)
    dy = torch.randn_like(y) if "y" in grads else None
    dy_branch = torch.randn_like(y).to(BF16) if "y_branch" in grads else None
    return (dy, dy_branch, x, h, w, b, mean, rstd, seed, p)


OPCHECK_CASES = {
    "forward": (add_dropout_layer_norm_op, lambda d: _op_args(d, dropout=False, bias=True)),
    "forward dropout no bias": (add_dropout_layer_norm_op, lambda d: _op_args(d, dropout=True, bias=False)),
    "forward branch": (add_dropout_layer_norm_op, lambda d: _op_args(d, dropout=True, bias=True, branch_dtype=BF16)),
    "backward": (add_dropout_layer_norm_backward_op, lambda d: _op_backward_args(d, bias=True)),
    "backward no bias": (add_dropout_layer_norm_backward_op, lambda d: _op_backward_args(d, bias=False)),
    "backward y only": (add_dropout_layer_norm_backward_op, lambda d: _op_backward_args(d, True, grads=("y",))),
    "backward branch only": (add_dropout_layer_norm_backward_op,
                             lambda d: _op_backward_args(d, True, grads=("y_branch",))),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, device):
    """Schema, fake implementation against the real op, autograd registration, AOTAutograd with dynamic shapes."""
    op, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(op, make_args(device))


# ---------------------------------------------------------------------------------------------- errors


def _t(*shape, dtype=FP32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_t(2, 8), _t(2, 9), _t(8)), {}, ValueError, r"x and h must have the same shape \(\.\.\., C\)"),
    ((_t(()), _t(()), _t(1)), {}, ValueError, r"x and h must have the same shape \(\.\.\., C\), got \(\) and \(\)"),
    ((_t(2, 8), _t(2, 8), _t(9)), {}, ValueError, r"weight must have shape \(8,\), got \(9,\)"),
    ((_t(2, 8), _t(2, 8), _t(1, 8)), {}, ValueError, r"weight must have shape \(8,\)"),
    ((_t(2, 8), _t(2, 8), _t(8), _t(7)), {}, ValueError, r"bias must have shape \(8,\), got \(7,\)"),
    ((_t(2, 8, dtype=torch.float64), _t(2, 8), _t(8)), {}, TypeError, "x dtype torch.float64 is not supported"),
    ((_t(2, 8), _t(2, 8, dtype=torch.int32), _t(8)), {}, TypeError, "h dtype torch.int32 is not supported"),
    ((_t(2, 8), _t(2, 8), _t(8, dtype=torch.float64)), {}, TypeError, "weight dtype"),
    ((_t(2, 8), [0.0], _t(8)), {}, TypeError, "h must be a torch.Tensor"),
    ((_t(2, 8), _t(2, 8), _t(8)), dict(dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\)"),
    ((_t(2, 8), _t(2, 8), _t(8)), dict(dropout_p=-0.1), ValueError, "dropout_p"),
    ((_t(2, 8), _t(2, 8), _t(8)), dict(eps=0.0), ValueError, "eps must be a positive finite number"),
    ((_t(2, 8), _t(2, 8), _t(8)), dict(eps=-1e-5), ValueError, "eps"),
    ((_t(2, 8), _t(2, 8), _t(8)), dict(eps=float("inf")), ValueError, "eps"),
    ((_t(2, 8), _t(2, 8), _t(8)), dict(eps=True), ValueError, "eps must be a positive finite number"),
    ((_t(2, 8), _t(2, 8), _t(8)), dict(dropout_p=False), ValueError, "dropout_p must be a number"),
    ((_t(2, 0), _t(2, 0), _t(0)), {}, ValueError, r"C = 0 is not supported \(1 <= C <= 8192\)"),
    ((_t(1, 8193), _t(1, 8193), _t(8193)), {}, ValueError, "C = 8193"),
    ((_t(2, 8), _t(2, 8), _t(8)), dict(branch_dtype=torch.int8), TypeError, "branch_dtype torch.int8 is not supported"),
])
def test_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=f"^fused_add_dropout_layer_norm: {match}"):
        fused_add_dropout_layer_norm(*args, **kwargs)


def test_device_mismatch_error():
    with pytest.raises(ValueError, match="must be on the same device, got cpu, cpu, meta"):
        fused_add_dropout_layer_norm(_t(2, 8), _t(2, 8), _t(8, device="meta"))


def test_host_path_calls_no_triton_constexpr_function(monkeypatch):
    """The forward and backward of fused_add_dropout_layer_norm compute their grids with plain ints (see the same
    test in test_attention.py)."""
    from kernels import fused_add_dropout_layer_norm

    x, h = torch.randn(6, 40, requires_grad=True), torch.randn(6, 40, requires_grad=True)
    w, b = torch.ones(40, requires_grad=True), torch.zeros(40, requires_grad=True)

    def calls():
        y, y_branch = fused_add_dropout_layer_norm(x, h, w, b, dropout_p=0.1, branch_dtype=torch.bfloat16)
        (y.sum() + y_branch.float().sum()).backward()

    n = triton_constexpr_calls_on_the_host(monkeypatch, calls)
    assert n in (0, None), n


@pytest.mark.parametrize("path", ["function", "operator"])
def test_double_backward_is_refused(path, device):
    """A gradient penalty through the add + LayerNorm (eager: the autograd.Function; compiled: the operator's
    register_autograd) gets a clear error, not second derivatives without the LayerNorm's terms."""
    torch.manual_seed(0)
    inputs = [torch.randn(3, 8, device=device), torch.randn(3, 8, device=device), torch.randn(8, device=device),
              torch.randn(8, device=device)]
    fn = fused_add_dropout_layer_norm if path == "function" else (
        lambda x, h, w, b: add_dropout_layer_norm_op(x, h, w, b, None, 0.0, 1e-5)[0])
    assert_double_backward_refused(fn, inputs, "fused_add_dropout_layer_norm")
