"""kernels.gelu.fused_bias_gelu against float64 truth and kernels.reference.bias_gelu.

Numerics criterion (flash-attention's, tests/helpers.py: assert_all_within): for y, dx and dbias the kernel's max
abs error against the reference run in float64 on the same inputs is at most 2x the max error of the reference
run in the inputs' own dtypes (fp32 arithmetic, as the kernel), plus one fp32 rounding step at the op's scale. On
CPU the kernels run in the Triton interpreter (tests/conftest.py): small shapes.
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
from kernels.gelu import bias_gelu_backward, bias_gelu_backward_op, bias_gelu_forward, bias_gelu_op, fused_bias_gelu

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
NAMES = ("y", "dx", "dbias")


def _inputs(shape, x_dtype, bias_dtype, device):
    """[x, bias or None]: x spread over GELU's curved part and both tails, as a pre-activation is."""
    x = (2.0 * torch.randn(shape, device=device)).to(x_dtype)
    b = (0.5 * torch.randn(shape[-1], device=device)).to(bias_dtype) if bias_dtype is not None else None
    return [x, b]


def _run(fn, inputs, dy, dtype=None):
    """[y, dx, dbias (if any)] of fn(x, bias) on fresh leaf copies (optionally cast)."""
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype))]


CASES = [  # shape, x dtype, bias dtype (None: no bias), approximate
    ((1, 1), FP32, FP32, "tanh"),
    ((7, 100), BF16, FP32, "tanh"),  # the model under torch.autocast: a bf16 matmul output, an fp32 bias
    ((2, 5, 96), BF16, BF16, "tanh"),
    ((3, 3072), BF16, FP32, "tanh"),  # GPT-1's MLP width: three 1024-column blocks on a GPU
    ((9, 40), FP16, FP16, "tanh"),
    ((4, 33), FP32, None, "tanh"),
    ((5, 70), FP32, FP32, "none"),
    ((2, 3, 17), BF16, FP32, "none"),
    ((6, 64), FP16, None, "none"),
]


def _case_id(case):
    shape, x_dtype, b_dtype, approximate = case
    bias = str(b_dtype)[6:] if b_dtype else "None"
    return f"{'x'.join(map(str, shape))}-x{str(x_dtype)[6:]}-bias{bias}-{approximate}"


@pytest.mark.parametrize("shape,x_dtype,b_dtype,approximate", CASES, ids=[_case_id(c) for c in CASES])
def test_against_reference(shape, x_dtype, b_dtype, approximate, device):
    torch.manual_seed(0)
    inputs = _inputs(shape, x_dtype, b_dtype, device)
    dy = torch.randn(shape, device=device)
    actual = _run(lambda *a: fused_bias_gelu(*a, approximate=approximate), inputs, dy)
    ref = lambda *a: reference.bias_gelu(*a, approximate=approximate)
    low, truth = _run(ref, inputs, dy), _run(ref, inputs, dy, dtype=torch.float64)
    assert actual[0].shape == shape
    assert [t.dtype for t in actual] == [x_dtype, x_dtype] + ([b_dtype] if b_dtype else [])
    names = NAMES if b_dtype else NAMES[:2]
    assert_all_within(list(zip(names, actual, low, truth)), atol=fp32_eps_at(*truth))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_matches_torch_gelu(approximate, device):
    """fp32 values far into both tails and around 0: F.gelu's values and gradients to a few fp32 ulps (the tanh
    form is computed as x * sigmoid(2u), which saturates exactly where tanh does)."""
    x = torch.cat([torch.linspace(-30, 30, 601), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 100.0, -100.0])])
    x = x.to(device).requires_grad_()
    y = fused_bias_gelu(x[None], approximate=approximate)[0]
    (dx,) = torch.autograd.grad(y.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.nn.functional.gelu(x_ref, approximate=approximate)
    (dx_ref,) = torch.autograd.grad(y_ref.sum(), x_ref)
    assert_close(y, y_ref, atol=1e-6, rtol=1e-5, name="y")
    assert_close(dx, dx_ref, atol=1e-6, rtol=1e-5, name="dx")
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_extreme_inputs(dtype, device):
    """Where z^3 overflows fp32 (|z| > ~1.5e13) the tanh form's derivative stays what it is past |z| ~ 11: exactly 0
    below, 1 above (it was 0 * inf = NaN for large negative z); gelu itself is 0 and z there."""
    x = torch.tensor([-3e38, -1e19, -1e14, -30.0, 30.0, 1e14, 1e19, 3e38], dtype=dtype, device=device)
    x.requires_grad_()
    y = fused_bias_gelu(x[None])[0]
    (dx,) = torch.autograd.grad(y.sum(), x)
    positive = x.detach() > 0
    assert_close(y, torch.where(positive, x.detach(), 0.0), atol=0, rtol=0, name="y")
    assert_close(dx, positive.to(dtype), atol=0, rtol=0, name="dx")


def test_empty_rows(device):
    x, b = _inputs((0, 3, 16), BF16, FP32, device)
    y, dx, db = _run(fused_bias_gelu, [x, b], torch.zeros(0, 3, 16, device=device))
    assert y.shape == dx.shape == (0, 3, 16) and y.dtype == dx.dtype == BF16
    assert db.dtype == FP32 and db.shape == (16,) and not db.any()


def test_non_contiguous_inputs(device):
    """A transposed x (column stride != 1), rows of padding (row stride > C) and a transposed gradient give
    bitwise the results of their contiguous copies."""
    torch.manual_seed(0)
    N, C = 6, 40
    b = torch.randn(C, device=device)
    dy = torch.randn(C, N, device=device).t()
    for x in (torch.randn(C, N, device=device).t(), torch.randn(N, C + 24, device=device)[:, :C]):
        actual, expected = _run(fused_bias_gelu, [x, b], dy), _run(fused_bias_gelu, [x.contiguous(), b], dy)
        for a, e, name in zip(actual, expected, NAMES):
            assert_close(a, e, atol=0, rtol=0, name=name)
    # a bias of stride 2 (a column of a matrix; the leaf is the matrix, so that no copy hides the stride) and an
    # expanded one (stride 0), against their contiguous copies
    x = torch.randn(N, C, device=device)
    for parent, view in ((torch.randn(C, 2, device=device), lambda p: p[:, 1]),
                         (torch.randn(1, device=device), lambda p: p.expand(C))):
        actual = _run(lambda x, p, view=view: fused_bias_gelu(x, view(p)), [x, parent], dy)
        expected = _run(lambda x, p, view=view: fused_bias_gelu(x, view(p).contiguous()), [x, parent], dy)
        for a, e, name in zip(actual, expected, NAMES):
            assert_close(a, e, atol=0, rtol=0, name=name)


def test_launchers_match_autograd(device):
    """bias_gelu_forward / bias_gelu_backward (tensors in, tensors out) give bitwise the autograd path's results;
    the bias gradient sums many row chunks in a fixed order (the same bits twice)."""
    torch.manual_seed(0)
    x, b = _inputs((37, 50), BF16, FP32, device)
    dy = torch.randn(37, 50, device=device)
    expected = _run(fused_bias_gelu, [x, b], dy)
    y = bias_gelu_forward(x, b)
    dx, db = bias_gelu_backward(dy.to(BF16), x, b)
    for a, e, name in zip((y, dx, db), expected, NAMES):
        assert_close(a, e, atol=0, rtol=0, name=name)
    assert torch.equal(db, bias_gelu_backward(dy.to(BF16), x, b)[1])
    assert bias_gelu_backward(dy.to(BF16), x, None)[1] is None


@pytest.mark.parametrize("x_dtype,b_dtype,approximate", [(BF16, FP32, "tanh"), (FP32, None, "none"),
                                                         (FP16, FP16, "tanh")])
def test_compiled_matches_eager(x_dtype, b_dtype, approximate, device):
    """fullgraph (no graph break), aot_eager: forward and every gradient bitwise equal to eager mode."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    inputs = _inputs((2, 3, 40), x_dtype, b_dtype, device)
    dy = torch.randn(2, 3, 40, device=device)
    fn = lambda x, b: fused_bias_gelu(x * 2, b, approximate=approximate)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, e, name in zip(_run(compiled, inputs, dy), _run(fn, inputs, dy), NAMES):
        assert_close(a, e, atol=0, rtol=0, name=name)
    torch._dynamo.reset()


def _op_args(device, bias):
    torch.manual_seed(0)
    x, b = _inputs((3, 5, 24), BF16, FP32 if bias else None, device)
    return (x.requires_grad_(), b.requires_grad_() if b is not None else None, "tanh")


def _op_backward_args(device, bias):
    x, b, approximate = _op_args(device, bias)
    x, b = x.detach(), b.detach() if b is not None else None
    return (torch.randn_like(x), x, b, approximate)


OPCHECK_CASES = {
    "forward": (bias_gelu_op, lambda d: _op_args(d, bias=True)),
    "forward no bias": (bias_gelu_op, lambda d: _op_args(d, bias=False)),
    "backward": (bias_gelu_backward_op, lambda d: _op_backward_args(d, bias=True)),
    "backward no bias": (bias_gelu_backward_op, lambda d: _op_backward_args(d, bias=False)),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, device):
    """Schema, fake implementation against the real op, autograd registration, AOTAutograd with dynamic shapes."""
    op, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(op, make_args(device))


def _t(*shape, dtype=FP32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_t(2, 8), _t(9)), {}, ValueError, r"bias must have shape \(8,\), got \(9,\)"),
    ((_t(2, 8), _t(1, 8)), {}, ValueError, r"bias must have shape \(8,\), got \(1, 8\)"),
    ((_t(()),), {}, ValueError, r"x must have shape \(\.\.\., C\) with C >= 1, got \(\)"),
    ((_t(2, 0),), {}, ValueError, r"x must have shape \(\.\.\., C\) with C >= 1, got \(2, 0\)"),
    ((_t(2, 8, dtype=torch.float64),), {}, TypeError, "x dtype torch.float64 is not supported"),
    ((_t(2, 8), _t(8, dtype=torch.int32)), {}, TypeError, "bias dtype torch.int32 is not supported"),
    (([0.0],), {}, TypeError, "x must be a torch.Tensor, got list"),
    ((_t(2, 8), _t(8)), dict(approximate="erf"), ValueError, r"approximate must be one of \('tanh', 'none'\)"),
    ((_t(2, 8), _t(8, device="meta")), {}, ValueError, "x and bias must be on the same device, got cpu and meta"),
])
def test_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=f"^fused_bias_gelu: {match}"):
        fused_bias_gelu(*args, **kwargs)


def test_host_path_calls_no_triton_constexpr_function(monkeypatch):
    """The forward and backward compute their grids with plain ints (see the same test in test_attention.py)."""
    x, b = torch.randn(6, 40, requires_grad=True), torch.zeros(40, requires_grad=True)

    def calls():
        fused_bias_gelu(x, b).sum().backward()

    n = triton_constexpr_calls_on_the_host(monkeypatch, calls)
    assert n in (0, None), n


@pytest.mark.parametrize("path", ["function", "operator"])
def test_double_backward_is_refused(path, device):
    """A gradient penalty through bias + GELU (eager: the autograd.Function; compiled: the operator's
    register_autograd) gets a clear error, not second derivatives without the GELU's terms."""
    torch.manual_seed(0)
    inputs = [torch.randn(3, 8, device=device), torch.randn(8, device=device)]
    fn = fused_bias_gelu if path == "function" else lambda x, b: bias_gelu_op(x, b, "tanh")
    assert_double_backward_refused(fn, inputs, "fused_bias_gelu")
