"""kernels.fused_cross_entropy / fused_linear_cross_entropy against float64 truth and kernels.reference.

Numerics criterion (flash-attention's, tests/helpers.py: assert_error_within): for the loss and every gradient,
the kernel's max abs error against a float64 computation on the same inputs is at most 2x the max error of the
eager reference run in the kernel's dtype, plus one fp32 rounding step at the tensor's scale (the loss is fp32
for every dtype, and kernel and reference both compute it in fp32).
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_all_within,
    assert_double_backward_refused,
    assert_error_within,
    triton_constexpr_calls_on_the_host,
)
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from kernels import cross_entropy, fused_cross_entropy, fused_linear_cross_entropy, reference
from kernels.cross_entropy import (
    COMPILE_SPECS,
    ROW,
    _default_chunk_size,
    _launch,
    _linear_extra_bytes,
    _long_row_config,
    _padded_vocab,
    _resident_parts,
    _row_config,
    load_tuned_table,
    parse_tuned_table,
)

IGNORE = -100
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


def _truth_ce(logits, target, label_smoothing=0.0, reduction="mean", ignore_index=IGNORE):
    """float64 cross-entropy with the reference's reduction rules (reference.cross_entropy computes in
    fp32 even for float64 input, so it cannot serve as the truth)."""
    loss = F.cross_entropy(logits.double(), target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / (target != ignore_index).sum().clamp(min=1) if reduction == "mean" else total


def _leaf(x, dtype=None):
    return x.detach().clone().to(dtype or x.dtype).requires_grad_()


def _targets(n, v, device, ignore_every=3):
    target = torch.randint(0, v, (n,), device=device)
    if ignore_every:
        target[::ignore_every] = IGNORE
    return target


def _compare_ce(x, target, dtype, label_smoothing=0.0, reduction="mean", grad_weights=None, view=None):
    """Loss and gradient of fused_cross_entropy on x in dtype against the reference and the truth. view, if given,
    maps each leaf to the logits the functions get (a non-contiguous view, say); the gradient is the leaf's."""
    kern, ref, truth = _leaf(x, dtype), _leaf(x, dtype), _leaf(x.to(dtype), torch.float64)
    view = view or (lambda t: t)
    kw = {"label_smoothing": label_smoothing, "reduction": reduction}
    losses = [fused_cross_entropy(view(kern), target, **kw), reference.cross_entropy(view(ref), target, **kw),
              _truth_ce(view(truth), target, label_smoothing, reduction)]
    assert losses[0].dtype == torch.float32
    for loss in losses:
        (loss * grad_weights.to(loss.dtype) if grad_weights is not None else loss).sum().backward()
    assert_error_within(*losses, name="loss")
    assert kern.grad.dtype == dtype
    assert_error_within(kern.grad, ref.grad, truth.grad, name="grad")


@pytest.mark.parametrize("n,v", [(3, 40478), (1, 40478), (37, 1000), (5, 8193), (9, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference(n, v, dtype, reduction, label_smoothing, device):
    torch.manual_seed(n * v)
    x = torch.randn(n, v, device=device) * 4
    _compare_ce(x, _targets(n, v, device, ignore_every=3 if n > 1 else 0), dtype, label_smoothing, reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_scales_by_grad_output(dtype, reduction, device):
    """Non-unit incoming gradients, including an fp16-style loss scale of 2^16."""
    torch.manual_seed(1)
    x = torch.randn(33, 3001, device=device)
    weights = torch.rand(33, device=device) * 4 if reduction == "none" else torch.tensor(65536.0, device=device)
    _compare_ce(x, _targets(33, 3001, device), dtype, reduction=reduction, grad_weights=weights)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "column slice", "row stride"])
def test_cross_entropy_non_contiguous_logits(dtype, layout, device):
    """Logits that are views: of a (V, N) tensor transposed (column stride N), a column slice of wider rows (unit
    column stride, row stride > V), every other row of a taller tensor."""
    torch.manual_seed(10)
    n, v = 13, 1001
    x, view = {
        "transposed": (torch.randn(v, n, device=device), lambda t: t.t()),
        "column slice": (torch.randn(n, v + 30, device=device), lambda t: t[:, 7:v + 7]),
        "row stride": (torch.randn(2 * n, v, device=device), lambda t: t[::2]),
    }[layout]
    assert not view(x).is_contiguous()
    _compare_ce(x * 3, _targets(n, v, device), dtype, 0.1, "mean", view=view)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("launch", ["default", "row"])
def test_cross_entropy_extreme_logits(dtype, label_smoothing, launch, device, request):
    if launch == "row":
        request.getfixturevalue("row_launch")
    torch.manual_seed(2)
    n, v = 7, 40478
    x = torch.randn(n, v, device=device)
    x[:, ::5] = 1e4
    x[:, 1::7] = -1e4
    x[0] = -1e4
    target = torch.randint(0, v, (n,), device=device)
    target[1] = 0  # a +1e4 class
    target[2] = 1  # a -1e4 class: loss ~2e4
    _compare_ce(x, target, dtype, label_smoothing, "sum")

def test_cross_entropy_masked_classes(device):
    """-inf logits (classes masked out) and NaN, as torch treats them: a -inf class adds nothing to the sum of
    exponentials and gets a zero gradient (its loss was NaN through an unused smoothing term before); a row of
    -inf, or with a NaN, has a NaN loss; with label smoothing a -inf class makes the loss inf."""
    torch.manual_seed(3)
    n, v = 5, 300
    x = torch.randn(n, v, device=device) * 4
    x[0, :100] = float("-inf")
    x[1, 7] = float("nan")
    x[2] = float("-inf")
    x[3, 250:] = float("-inf")
    target = torch.randint(100, 250, (n,), device=device)
    for eps in (0.0, 0.1):
        kern = _leaf(x)
        loss = fused_cross_entropy(kern, target, reduction="none", label_smoothing=eps)
        want = F.cross_entropy(x, target, reduction="none", label_smoothing=eps)
        torch.testing.assert_close(loss, want, equal_nan=True)
    kern, ref = _leaf(x[[0, 3]]), _leaf(x[[0, 3]])
    fused_cross_entropy(kern, target[[0, 3]]).backward()
    F.cross_entropy(ref, target[[0, 3]]).backward()
    torch.testing.assert_close(kern.grad, ref.grad)
    assert (kern.grad[0, :100] == 0).all() and (kern.grad[1, 250:] == 0).all()



@pytest.fixture
def row_launch(monkeypatch):
    """The public functions as a tuned table with a (16, ROW) entry runs them: rows of at least 4096 (bf16) or 2048
    (fp32) columns and at most 20 such blocks read once into registers (the interpreter runs any num_warps)."""
    monkeypatch.setattr(cross_entropy, "_long_row_config", lambda device, element_size: (16, ROW))


@pytest.mark.parametrize("v", [40478, 8193])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction,label_smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.0)])
def test_row_launch_matches_reference(v, dtype, reduction, label_smoothing, row_launch, device):
    assert _row_config(v, dtype.itemsize, (16, ROW))[2] == ROW
    torch.manual_seed(12)
    n = 5
    _compare_ce(torch.randn(n, v, device=device) * 3, _targets(n, v, device), dtype, label_smoothing, reduction,
                grad_weights=torch.rand(n, device=device) if reduction == "none" else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_launch_masked_nan_and_target_classes(dtype, row_launch, device):
    """The resident row finds no class by its column: -inf logits (masked classes, a whole row, the target) and NaN
    must come out as torch has them, the target's term stored after the row, the padding zeroed apart."""
    torch.manual_seed(3)
    n, v = 6, 28003  # 4 + 2 + 1 blocks of 4096 in bf16, 8 + 4 + 2 of 2048 in fp32; rows off 16-byte boundaries
    x = (torch.randn(n, v, device=device) * 4).to(dtype)
    x[0, :5000] = float("-inf")
    x[1, 7] = float("nan")
    x[2] = float("-inf")
    x[3, 6000:] = float("-inf")
    x[4, 123] = float("-inf")
    # each row's max must be found where it is, or exp(300 - another max) overflows fp32: in the row's tail, in the
    # body's third part, in its second
    x[0, 28002], x[4, 26000], x[5, 20000] = 300.0, 300.0, 300.0
    target = torch.tensor([6000, 100, 3, 5000, 123, 28002], device=device)  # row 4's target is masked: loss inf
    for eps in (0.0, 0.1):
        loss = fused_cross_entropy(_leaf(x), target, reduction="none", label_smoothing=eps)
        want = F.cross_entropy(x.float(), target, reduction="none", label_smoothing=eps)
        torch.testing.assert_close(loss, want, equal_nan=True)
    keep = [0, 3, 4, 5]
    kern, truth = _leaf(x[keep]), _leaf(x[keep], torch.float64)
    fused_cross_entropy(kern, target[keep], reduction="sum").backward()
    F.cross_entropy(truth, target[keep], reduction="sum").backward()
    torch.testing.assert_close(kern.grad.double(), truth.grad, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-7)
    assert (kern.grad[0, :5000] == 0).all() and (kern.grad[1, 6000:] == 0).all() and kern.grad[2, 123] == -1
    padded = torch.full((n, _padded_vocab(v)), float("nan"), device=device, dtype=dtype)
    padded[:, :v] = x
    loss = torch.empty(n, device=device)
    _launch(padded, target, loss, IGNORE, 0.0, 1.0, True, n_cols=v)
    assert torch.equal(padded[:, v:], torch.zeros_like(padded[:, v:])), "padding columns got a gradient"
    torch.testing.assert_close(loss, F.cross_entropy(x.float(), target, reduction="none"), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_launch_loss_only_leaves_the_logits(dtype, row_launch, device):
    """Without a gradient to compute (no grad mode, an evaluation), the resident row gives the loss and writes
    nothing."""
    torch.manual_seed(14)
    n, v = 4, 40478
    x = (torch.randn(n, v, device=device) * 3).to(dtype)
    target = _targets(n, v, device)
    kept = x.clone()
    with torch.no_grad():
        loss = fused_cross_entropy(x, target, reduction="none")
    assert torch.equal(x, kept)
    want = F.cross_entropy(x.double(), target, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_row_launch_linear_cross_entropy(row_launch, device):
    """fused_linear_cross_entropy's padded chunks through the resident row: the padding columns, and the gradients
    that the chunk loop builds from the chunk's gradient."""
    torch.manual_seed(13)
    n, c, v = 9, 16, 8193
    hidden, weight = torch.randn(n, c, device=device), torch.randn(v, c, device=device) * 0.3
    target = _targets(n, v, device)
    got = [_leaf(hidden), _leaf(weight)]
    want = [_leaf(hidden, torch.float64), _leaf(weight, torch.float64)]
    fused_linear_cross_entropy(*got, target, label_smoothing=0.1, chunk_size=4).backward()
    F.cross_entropy(F.linear(*want), target, ignore_index=IGNORE, label_smoothing=0.1).backward()
    for g, w in zip(got, want):
        torch.testing.assert_close(g.grad.double(), w.grad, rtol=1e-4, atol=1e-6)


def test_resident_parts():
    """A row's blocks as at most three powers of two, the fewest that cover it."""
    assert _resident_parts(40478, 4096) == (8, 2, 0)  # 10 blocks, 40960 columns
    assert _resident_parts(50257, 4096) == (8, 4, 1)  # 13
    assert _resident_parts(40512, 2048) == (16, 4, 0)  # 20
    assert _resident_parts(4096, 4096) == (1, 0, 0)
    assert _resident_parts(15 * 512, 512) == (16, 0, 0)  # 15 = 1111b has four bits: 16
    assert _resident_parts(23 * 512 - 1, 512) == (16, 8, 0)  # 23 = 10111b: 24
    for blocks in range(1, 70):
        parts = _resident_parts(blocks * 256, 256)
        assert sum(parts) >= blocks and all(p == 0 or p & (p - 1) == 0 for p in parts)
        assert sum(parts) - blocks < max(parts) // 4 + 1  # rounding adds at most a quarter of the largest part


@pytest.mark.parametrize("grad_output", [1.0, 0.25])
def test_fp16_mean_gradient_is_rounded_once(grad_output, device):
    """fp16 + mean keeps 1 / n out of the kernel (underflow); the backward's rescale must not add a second
    rounding: every element within half an fp16 ulp of the exact gradient (plus fp32 noise). A rescale by
    1/3 after rounding, or by a factor itself rounded to fp16 (the H200 failure), errs up to ~0.8 ulp.
    Results below fp16's normal range are allowed a quarter of their 2^-24 spacing more: the exact
    rescale by 2^-k lands them on a 2^-25 grid first, a second rounding inherent to keeping 1 / n out.
    (So is the loss of precision under a loss scale > 1: values stored below fp16's normal range are
    scaled up with their rounding error; the check above is for incoming gradients <= 1.)"""
    torch.manual_seed(7)
    n, v = 150, 64  # 100 valid rows: n_valid is no power of two
    x, target = torch.randn(n, v, device=device) * 3, _targets(n, v, device)
    kern, truth = _leaf(x, torch.float16), _leaf(x.half(), torch.float64)
    (fused_cross_entropy(kern, target, label_smoothing=0.1) * grad_output).backward()
    (_truth_ce(truth, target, label_smoothing=0.1) * grad_output).backward()
    exact = truth.grad
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=2.0**-14))) - 10)  # fp16 spacing at |exact|
    allowed = 0.5 * ulp * (1 + 1e-3) + torch.where(exact.abs() < 2.0**-14, 2.0**-26, 0.0)
    err = (kern.grad.double() - exact).abs()
    worst = (err / ulp).max().item()
    assert (err <= allowed).all(), f"fp16 gradient off by up to {worst:.3f} ulp (one rounding is at most 0.5)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_padding_columns(dtype, device):
    """The kernel on a row-padded buffer (fused_linear_cross_entropy's chunks): whatever the padding columns
    hold (1e4, NaN), they change no loss and receive an exact zero gradient."""
    torch.manual_seed(8)
    n, v = 6, 1001
    width = _padded_vocab(v)
    assert width % 64 == 0 and width > v
    x, target = torch.randn(n, v, device=device).to(dtype), _targets(n, v, device)
    padded = torch.full((n, width), 1e4, device=device).to(dtype)
    padded[:, :v] = x
    padded[1, v:] = float("nan")
    loss_pad, loss_ref = (torch.empty(n, device=device) for _ in range(2))
    _launch(padded, target, loss_pad, IGNORE, 0.1, 0.5, True, n_cols=v)
    ref = x.clone()
    _launch(ref, target, loss_ref, IGNORE, 0.1, 0.5, True)
    # the rows' sums run in another order (an unpadded row of 1001 columns starts off a 16-byte boundary, so it
    # is walked as head, body and tail): equal up to fp32 summation order, then one rounding to dtype
    torch.testing.assert_close(loss_pad, loss_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(padded[:, :v].float(), ref.float(), rtol=2**-7 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-9, msg="class columns differ from the unpadded run")
    assert torch.equal(padded[:, v:], torch.zeros_like(padded[:, v:])), "padding columns got a gradient"


@pytest.mark.parametrize("row_len,n_cols", [(2048, 2000), (1999, 1999), (3000, 2950)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launches_of_the_tuner(dtype, row_len, n_cols, device):
    """Every (num_warps, UNROLL) that bench.tune_cross_entropy may write into the table: UNROLL 2 or 4 only changes
    when the loads are issued (each lane folds its columns in the same order), so its results equal UNROLL 1's at the
    same width bit for bit; each width's, and the row read once (ROW, which folds in its own order), equal the
    float64 truth to fp32 summation order and one rounding. Padded and unaligned rows, a partial last group of UNROLL
    blocks, label smoothing, ignored rows and per-row scales."""
    from bench.tune_cross_entropy import CANDIDATES

    torch.manual_seed(11)
    n = 4
    x = (torch.randn(n, row_len, device=device) * 3).to(dtype)
    target = _targets(n, n_cols, device)
    row_scale = torch.rand(n, device=device) + 0.5
    exact = F.cross_entropy(x[:, :n_cols].double(), target, ignore_index=IGNORE, label_smoothing=0.1,
                            reduction="none")
    exact_grad = torch.func.grad(lambda z: (F.cross_entropy(z, target, ignore_index=IGNORE, label_smoothing=0.1,
                                                            reduction="none") * row_scale.double()).sum() * 0.5)(
        x[:, :n_cols].double())
    ran = {}
    # each width at UNROLL 1 first, so that every unrolled launch meets its width's UNROLL 1 result
    launches = set(CANDIDATES) | {(1, 2), (1, 4), (2, 4), (1, ROW)}
    for launch in sorted(launches | {(w, 1) for w, _ in launches}, key=lambda w_u: str(w_u[1])):
        got, loss = x.clone(), torch.empty(n, device=device)
        _launch(got, target, loss, IGNORE, 0.1, 0.5, True, row_scale=row_scale, n_cols=n_cols, launch=launch)
        block_v, _, unroll = _row_config(row_len, x.element_size(), launch)
        if (block_v, 1) in ran and unroll != ROW:
            same = ran[block_v, 1]
            assert torch.equal(loss, same[0]) and torch.equal(got, same[1]), f"launch {launch} against UNROLL 1"
        ran[block_v, unroll] = loss, got
        torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6, msg=f"loss, launch {launch}")
        step = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-22
        torch.testing.assert_close(got[:, :n_cols].double(), exact_grad, rtol=step, atol=1e-7,
                                   msg=f"gradient, launch {launch}")
        assert not got[:, n_cols:].any(), "padding columns got a gradient"
    assert {u for _, u in ran} == {1, 2, 4, ROW} and len({b for b, _ in ran}) > 1, \
        f"launches run: {sorted(map(str, ran))}"
    assert all((b, 1) in ran for b, _ in ran), "an unrolled launch had no UNROLL 1 run of its width to match"


@pytest.mark.parametrize("launch", [(1, 2), (2, 4)])
def test_unrolled_launch_with_masked_and_nan_logits(launch, device):
    """The unrolled passes (_tie_blocks) on -inf logits (masked classes, a whole block of them, a lane that sees
    nothing else) and NaN: masked classes get probability 0 and a zero gradient, a NaN makes its row's loss and
    gradient NaN, as with UNROLL 1."""
    torch.manual_seed(5)
    n, v = 3, 2000
    x = torch.randn(n, v, device=device)
    x[0, 256:1024] = float("-inf")  # whole blocks of 256 / 512 columns, and lanes that see only -inf in a trip
    x[0, ::7] = float("-inf")
    x[2, 1500] = float("nan")
    target = torch.tensor([1, 5, 3], device=device)
    got, loss = x.clone(), torch.empty(n, device=device)
    _launch(got, target, loss, IGNORE, 0.0, 1.0, True, launch=launch)
    exact = F.cross_entropy(x[:2].double(), target[:2], reduction="none")
    torch.testing.assert_close(loss[:2].double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:2].double(), torch.func.grad(
        lambda z: F.cross_entropy(z, target[:2], reduction="sum"))(x[:2].double()), rtol=1e-5, atol=1e-7)
    assert not got[0, 256:1024].any() and torch.isnan(loss[2]) and torch.isnan(got[2]).all()


def test_row_config_of_a_tuned_launch():
    """A row of at least one full block of the tuned launch gets it; a shorter one the fewest warps that cover it,
    UNROLL 1; without a table every device runs (16, 1)."""
    assert _row_config(40512, 2, (8, 4)) == (2048, 8, 4)
    assert _row_config(40512, 4, (32, 2)) == (4096, 32, 2)
    assert _row_config(1500, 2, (8, 4)) == (2048, 8, 4)  # next power of two: one block, masked past 1500
    assert _row_config(1000, 2, (8, 4)) == (1024, 4, 1)
    assert _row_config(40512, 2) == (4096, 16, 1)
    assert _long_row_config(torch.device("cpu"), 2) == (16, 1)
    # ROW where the row fits in a thread's registers (80, 40 at 32 warps): an fp32 value each, a 16-bit pair each
    # (the resident row keeps 16-bit logits as loaded), twice that with label smoothing; else UNROLL 1
    assert _row_config(40478, 2, (16, ROW)) == (4096, 16, ROW)  # 8 + 2 blocks of 4 words a thread: 40
    assert _row_config(40478, 2, (16, ROW), smoothing=True) == (4096, 16, ROW)  # 80
    assert _row_config(40478, 2, (32, ROW)) == (8192, 32, ROW)  # 4 + 1: 20
    assert _row_config(40478, 2, (8, ROW)) == (2048, 8, ROW)  # 16 + 4: 80
    assert _row_config(40478, 2, (8, ROW), smoothing=True) == (2048, 8, 1)  # 160
    assert _row_config(40478, 4, (16, ROW)) == (2048, 16, ROW)  # 16 + 4 blocks of 4 fp32 values: 80
    assert _row_config(40478, 4, (16, ROW), smoothing=True) == (2048, 16, 1)
    assert _row_config(50257, 2, (16, ROW)) == (4096, 16, ROW)  # 8 + 4 + 1: 52
    assert _row_config(50257, 2, (8, ROW)) == (2048, 8, 1)  # 16 + 8 + 1: 100
    assert _row_config(44000, 2, (32, ROW)) == (8192, 32, ROW)  # 4 + 2: 24
    assert _row_config(44000, 2, (32, ROW), smoothing=True) == (8192, 32, 1)  # 48
    assert _row_config(50257, 4, (16, ROW)) == (2048, 16, 1)
    assert _row_config(1000, 2, (8, ROW)) == (1024, 4, 1)


def test_tuned_table_is_checked(tmp_path):
    """The table that bench.tune_cross_entropy writes parses; a bad entry is refused with its index and why; no
    file means no table."""
    good = {"entries": [{"arch": "sm90", "element_size": 2, "num_warps": 8, "unroll": 4, "speedup": 1.2},
                        {"arch": "sm80", "element_size": 4, "num_warps": 16, "unroll": 1},
                        {"arch": "sm80", "element_size": 2, "num_warps": 16, "unroll": "row"}], "rows": []}
    assert parse_tuned_table(good) == {(9, 2): (8, 4), (8, 4): (16, 1), (8, 2): (16, ROW)}
    bad = [({"arch": "sm70", "element_size": 2, "num_warps": 8, "unroll": 4}, "arch"),
           ({"arch": "sm90", "element_size": 2, "num_warps": 12, "unroll": 4}, "num_warps"),
           ({"arch": "sm90", "element_size": 2, "num_warps": 8, "unroll": 3}, "unroll"),
           ({"arch": "sm90", "element_size": 2, "num_warps": 8, "unroll": "rows"}, "unroll"),
           ({"arch": "sm90", "element_size": 2, "num_warps": 8, "unroll": True}, "unroll"),
           ({"arch": "sm90", "element_size": 2, "num_warps": 8}, "needs")]
    for entry, why in bad:
        with pytest.raises(ValueError, match=f"entry 0: .*{why}"):
            parse_tuned_table({"entries": [entry]})
    with pytest.raises(ValueError, match="entry 1: a second entry"):
        parse_tuned_table({"entries": [good["entries"][0], good["entries"][0]]})
    assert load_tuned_table(str(tmp_path / "none.json")) == {}
    smoke = tmp_path / "smoke.json"
    smoke.write_text('{"smoke": true, "entries": []}')
    with pytest.raises(ValueError, match="--smoke"):
        load_tuned_table(str(smoke))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_ignored(reduction, dtype, device):
    x = _leaf(torch.randn(5, 1001, device=device), dtype)
    loss = fused_cross_entropy(x, torch.full((5,), IGNORE, device=device), label_smoothing=0.1, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss)), f"all-ignored loss should be 0, got {loss}"
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_custom_ignore_index(device):
    torch.manual_seed(3)
    x, target = torch.randn(6, 500, device=device), torch.randint(0, 500, (6,), device=device)
    target[1] = 7
    kern, ref, truth = _leaf(x), _leaf(x), _leaf(x, torch.float64)
    losses = [fused_cross_entropy(kern, target, ignore_index=7), reference.cross_entropy(ref, target, ignore_index=7),
              _truth_ce(truth, target, ignore_index=7)]
    for loss in losses:
        loss.backward()
    assert_error_within(*losses, name="loss")
    assert_error_within(kern.grad, ref.grad, truth.grad, name="grad")
    assert torch.equal(kern.grad[1], torch.zeros_like(kern.grad[1]))


def test_gradient_is_written_in_place(device):
    torch.manual_seed(4)
    x, target = torch.randn(4, 300, device=device), torch.randint(0, 300, (4,), device=device)
    logits, ref = _leaf(x), _leaf(x)
    fused_cross_entropy(logits, target, reduction="sum")
    reference.cross_entropy(ref, target, reduction="sum").backward()
    expected = torch.softmax(x.double(), -1) - F.one_hot(target, 300)
    assert_error_within(logits, ref.grad, expected, name="logits buffer")
    # without a gradient to compute the buffer is left alone
    frozen = x.clone()
    fused_cross_entropy(frozen, target)
    assert torch.equal(frozen, x)
    with torch.no_grad():
        fused_cross_entropy(logits.detach().copy_(x).requires_grad_(), target)
    assert torch.equal(logits.detach(), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaf_gradient_is_the_buffer_not_a_copy(dtype, device):
    """Logits that are a leaf get their .grad without a copy: autograd's gradient accumulation clones a gradient
    that something else still references (it did: 2.65 GB written again at N=32768, V=40478 in bf16)."""
    torch.manual_seed(5)
    x, target = torch.randn(4, 300, device=device, dtype=dtype), torch.randint(0, 300, (4,), device=device)
    logits, ref = _leaf(x), _leaf(x)
    buffer = logits.data_ptr()
    fused_cross_entropy(logits, target).backward()
    reference.cross_entropy(ref, target).backward()
    assert logits.grad.data_ptr() == buffer
    expected = (torch.softmax(x.double(), -1) - F.one_hot(target, 300)) / 4
    assert_error_within(logits.grad, ref.grad, expected, name="leaf grad")


def test_in_place_write_is_visible_to_autograd(device):
    """An op that saved the logits for its backward must not silently see the gradient."""
    x, target = _leaf(torch.randn(4, 300, device=device)), torch.randint(0, 300, (4,), device=device)
    logits = x.exp()  # exp saves its output
    loss = fused_cross_entropy(logits, target)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("bad", [300, -1, 10**9])
def test_bad_target_raises(bad, device):
    target = torch.tensor([0, bad, 2], device=device)
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        fused_cross_entropy(torch.randn(3, 300, device=device), target)
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        fused_linear_cross_entropy(torch.randn(3, 8, device=device), torch.randn(300, 8, device=device), target)


@pytest.mark.parametrize("logits_shape,target,kwargs,error,match", [
    ((3, 10), torch.zeros(4, dtype=torch.long), {}, ValueError, r"target must have shape \(3,\)"),
    ((3, 10), torch.zeros(3, dtype=torch.int32), {}, TypeError, "target must be int64"),
    ((30,), torch.zeros(3, dtype=torch.long), {}, ValueError, "logits must be 2-D"),
    ((3, 10), torch.zeros(3, dtype=torch.long), {"reduction": "avg"}, ValueError, "reduction must be"),
    ((3, 10), torch.zeros(3, dtype=torch.long), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ((3, 10), torch.zeros(3, dtype=torch.long), {"label_smoothing": True}, ValueError, "label_smoothing"),
    ((3, 10), torch.zeros(3, dtype=torch.long), {"ignore_index": 2**63}, ValueError, "ignore_index must fit in int64"),
    ((3, 10), torch.zeros(3, dtype=torch.long), {"ignore_index": 1.0}, TypeError, "ignore_index must be an int"),
])
def test_bad_arguments_raise(logits_shape, target, kwargs, error, match, device):
    with pytest.raises(error, match=match):
        fused_cross_entropy(torch.randn(logits_shape, device=device), target.to(device), **kwargs)


def test_bad_linear_shapes_raise(device):
    h, w, t = torch.randn(5, 8, device=device), torch.randn(20, 8, device=device), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="hidden has 8 features but weight has 6"):
        fused_linear_cross_entropy(h, w[:, :6], t.to(device))
    with pytest.raises(ValueError, match=r"bias must be \(20,\)"):
        fused_linear_cross_entropy(h, w, t.to(device), bias=torch.zeros(21, device=device))
    with pytest.raises(ValueError, match="hidden, weight, target and bias must be on the same device"):
        fused_linear_cross_entropy(h, w, t.to(device), bias=torch.zeros(20, device="meta"))
    with pytest.raises(TypeError, match="must share one of"):
        fused_linear_cross_entropy(h, w.bfloat16(), t.to(device))
    with pytest.raises(ValueError, match=r"target must have shape \(5,\)"):
        fused_linear_cross_entropy(h, w, t[:4].to(device))
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor, got list"):  # before autocast reads it
        fused_linear_cross_entropy([[0.0] * 8] * 5, w, t.to(device))
    for chunk in (0, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            fused_linear_cross_entropy(h, w, t.to(device), chunk_size=chunk)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        fused_cross_entropy([[0.0] * 8] * 5, t.to(device))


@pytest.mark.parametrize("view", ["expand", "as_strided"])
def test_overlapping_rows_are_copied_before_the_gradient_is_written(view, device):
    """Logits whose rows share memory (an expanded row, an as_strided window) cannot hold the gradient in place:
    each row's program would write over rows that others still read. They get a contiguous copy, as a
    column-strided view does; the loss and the gradient reaching the leaf are the reference's."""
    torch.manual_seed(0)
    base, target = torch.randn(4, 300, device=device), torch.randint(0, 300, (4,), device=device)
    make = {"expand": lambda b: b[:1].expand(4, 300), "as_strided": lambda b: b.view(-1).as_strided((4, 300), (7, 1))}
    out = []
    for fn in (fused_cross_entropy, reference.cross_entropy):
        leaf = _leaf(base.clone())
        loss = fn(make[view](leaf), target, reduction="sum")
        out.append((loss, *torch.autograd.grad(loss, leaf)))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_classes_with_every_target_ignored(reduction, device):
    """V = 0, which torch's cross-entropy admits when every target is ignored: a zero loss (the reference's mean
    of nothing) and empty gradients, plain and fused with the linear head; a target that is not ignored is out of
    range."""
    target = torch.full((3,), -100, device=device)
    logits = _leaf(torch.randn(3, 0, device=device))
    loss = fused_cross_entropy(logits.clone(), target, reduction=reduction)
    torch.testing.assert_close(loss, reference.cross_entropy(logits, target, reduction=reduction))
    loss.sum().backward()
    assert logits.grad.shape == (3, 0)
    h, w = _leaf(torch.randn(3, 8, device=device)), _leaf(torch.randn(0, 8, device=device))
    loss = fused_linear_cross_entropy(h, w, target, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss)) and loss.shape == ((3,) if reduction == "none" else ())
    loss.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and w.grad.shape == (0, 8)
    with pytest.raises(ValueError, match=r"outside \[0, 0\)"):
        fused_cross_entropy(torch.randn(3, 0, device=device), torch.tensor([0, -100, -100], device=device))


# ----------------------------------------------------------------------------- fused linear


def _run_linear(fn, hidden, weight, bias, target, dtype, grad_weights, frozen=(), **kwargs):
    """[loss, d hidden, d weight, (d bias)] of fn on leaves cast to dtype; the names in frozen get no gradient."""
    leaves = {"hidden": _leaf(hidden, dtype), "weight": _leaf(weight, dtype)}
    if bias is not None:
        leaves["bias"] = _leaf(bias, dtype)
    for name in frozen:
        leaves[name].requires_grad_(False)
    loss = fn(leaves["hidden"], leaves["weight"], target, bias=leaves.get("bias"), **kwargs)
    (loss * grad_weights.to(loss.dtype) if grad_weights is not None else loss).sum().backward()
    return [loss] + [t.grad for t in leaves.values()]


def _truth_linear(h, w, target, *, bias=None, label_smoothing=0.0, reduction="mean", chunk_size=None):
    return _truth_ce(F.linear(h, w, bias), target, label_smoothing, reduction)


def _compare_linear(hidden, weight, bias, target, dtype, grad_weights=None, chunk_size=None, frozen=(), known=(),
                    strict=True, **kw):
    """fused_linear_cross_entropy against the eager reference and the float64 truth: the loss and every gradient
    (None for the frozen inputs). known, strict: see helpers.assert_all_within."""
    args = (target, dtype, grad_weights, frozen)
    kern = _run_linear(fused_linear_cross_entropy, hidden, weight, bias, *args, chunk_size=chunk_size, **kw)
    ref = _run_linear(reference.linear_cross_entropy, hidden, weight, bias, *args, **kw)
    cast = [t.to(dtype) if t is not None else None for t in (hidden, weight, bias)]
    truth = _run_linear(_truth_linear, *cast, target, torch.float64, grad_weights, frozen, **kw)
    checks = []
    for name, k, r, t in zip(["loss", "hidden", "weight", "bias"], kern, ref, truth):
        if name in frozen:
            assert k is None, f"{name} is frozen but got a gradient"
            continue
        assert k.dtype == (torch.float32 if name == "loss" else dtype), name
        checks.append((name if name == "loss" else f"grad {name}", k, r, t))
    assert_all_within(checks, known=known, strict=strict)


@pytest.mark.parametrize("n,c,v,chunk_size", [(37, 16, 1000, 10), (37, 16, 1000, None), (5, 8, 40478, 3),
                                              (64, 32, 257, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction,label_smoothing,with_bias", [("mean", 0.0, True), ("sum", 0.1, False),
                                                                  ("none", 0.1, True)])
def test_linear_cross_entropy_matches_reference(n, c, v, chunk_size, dtype, reduction, label_smoothing,
                                                with_bias, device):
    torch.manual_seed(n + v)
    hidden, weight = torch.randn(n, c, device=device), torch.randn(v, c, device=device) / c**0.5
    bias = torch.randn(v, device=device) if with_bias else None
    grad_weights = torch.rand(n, device=device) if reduction == "none" else None
    _compare_linear(hidden, weight, bias, _targets(n, v, device), dtype, grad_weights, chunk_size,
                    label_smoothing=label_smoothing, reduction=reduction)


# per reduction: a power-of-two loss scale (fp16 training), a factor that is no power of two, per-row weights
GRAD_OUTPUTS = {"mean": 1024.0, "sum": 0.3, "none": "per row"}
# "mean" and "sum" keep d hidden and d weight in fp32 from the forward to the backward's one rounding. Rounded to
# 16 bits in the forward (and each chunk's d weight before its sum), "sum" with 0.3 measured 2.18x eager's error
# (bf16 d weight) and 2.21x (fp16 d hidden) here; in fp32, 1.14x and 1.21x, at most 1.62x over 20 seeds.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_scales_by_grad_output(dtype, reduction, device):
    """A non-unit incoming gradient reaches d hidden, d weight and d bias, for each reduction (the gradients of
    "mean" and "sum" are computed in the forward and scaled in the backward; "none" recomputes the chunks)."""
    torch.manual_seed(11)
    n, c, v = 29, 16, 700
    hidden, weight = torch.randn(n, c, device=device), torch.randn(v, c, device=device) / c**0.5
    bias = torch.randn(v, device=device)
    g = GRAD_OUTPUTS[reduction]
    g = torch.rand(n, device=device) * 4 + 0.5 if g == "per row" else torch.tensor(g, device=device)
    _compare_linear(hidden, weight, bias, _targets(n, v, device), dtype, g, chunk_size=8, label_smoothing=0.1,
                    reduction=reduction)


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_linear_cross_entropy_frozen_inputs(frozen, device):
    torch.manual_seed(5)
    hidden, weight = torch.randn(9, 8, device=device), torch.randn(100, 8, device=device)
    _compare_linear(hidden, weight, None, _targets(9, 100, device), torch.float32, chunk_size=4, frozen=(frozen,))


def test_linear_cross_entropy_no_grad(device):
    hidden, weight = torch.randn(9, 8, device=device), torch.randn(100, 8, device=device)
    target = _targets(9, 100, device)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=4)
        ref = reference.linear_cross_entropy(hidden, weight, target)
    assert_error_within(loss, ref, _truth_linear(hidden.double(), weight.double(), target), name="loss")


@pytest.mark.parametrize("n", [0, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_no_valid_rows(n, dtype, device):
    """No rows, or every row ignored: loss 0 for every reduction and exact zero gradients (the padded
    head must not leak into them), in the shapes and dtypes of the inputs."""
    torch.manual_seed(9)
    for reduction in ("mean", "sum", "none"):
        h, w, b = _leaf(torch.randn(n, 16, device=device), dtype), _leaf(torch.randn(77, 16, device=device), dtype), \
            _leaf(torch.randn(77, device=device), dtype)
        target = torch.full((n,), IGNORE, device=device)
        loss = fused_linear_cross_entropy(h, w, target, bias=b, reduction=reduction, chunk_size=4)
        assert torch.equal(loss, torch.zeros_like(loss)) and loss.shape == ((n,) if reduction == "none" else ())
        loss.sum().backward()
        for t in (h, w, b):
            assert t.grad.dtype == dtype and torch.equal(t.grad, torch.zeros_like(t)), reduction


GPT1_HEAD = (64 * 512, 40478, 768)  # tokens of a 64 x 512 batch, vocabulary, features


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_default_chunk_size_keeps_gpt1_within_400_mib(dtype):
    """The chunk rule's own memory account at GPT-1's shape (nothing allocated): everything the chunk loop holds,
    logits chunk and fixed buffers, within 400 MiB, with chunks that stay large (1280 rows, 26 chunks)."""
    chunk = _default_chunk_size(*GPT1_HEAD, dtype)
    extra = _linear_extra_bytes(*GPT1_HEAD, dtype, chunk)
    assert extra <= 400 * 2**20, f"{extra / 2**20:.1f} MiB with chunks of {chunk} rows"
    assert chunk == 1280 and chunk % 128 == 0
    # the account itself: logits chunk, padded head, fp32 d weight / d bias, fp32 d weight slice, fp32 d hidden
    n, v, c = GPT1_HEAD
    v_pad = _padded_vocab(v)
    assert extra == chunk * v_pad * 2 + v_pad * c * 2 + (v_pad * c + 2 * v_pad) * 4 + 8192 * c * 4 + n * (c + 1) * 4


def test_default_chunk_size():
    n, v, c = GPT1_HEAD
    assert _default_chunk_size(n, v, c, torch.float32) == 1024  # fp32's fixed buffers leave < 1024 rows: the floor
    assert _default_chunk_size(100, v, c, torch.bfloat16) == 100  # small batches stay one chunk
    assert _default_chunk_size(5000, 10**7, c, torch.float32) == 1024  # never below 1024 rows
    assert _default_chunk_size(0, v, c, torch.bfloat16) == 1  # a valid range() step for no rows
    # little free memory shrinks the chunks (down to the floor), plenty does not grow them past the budget
    assert _default_chunk_size(n, v, c, torch.bfloat16, free_bytes=2**40) == 1280
    assert _default_chunk_size(n, v, c, torch.bfloat16, free_bytes=700 * 2**20) == 1024
    assert _default_chunk_size(n, 2000, 64, torch.bfloat16, free_bytes=100 * 2**20) < \
        _default_chunk_size(n, 2000, 64, torch.bfloat16) == n
    # where d weight accumulates in its matmul, the slice's 24 MiB go to the logits: fewer, larger chunks
    assert _default_chunk_size(n, v, c, torch.bfloat16, dw_slice=False) == 1536
    assert _linear_extra_bytes(n, v, c, torch.bfloat16, 1536, dw_slice=False) <= 400 * 2**20
    assert _default_chunk_size(n // 2, v, c, torch.bfloat16, dw_slice=False) == 2048  # GPT-1's 32 x 512: 8 chunks
    assert _default_chunk_size(n // 2, v, c, torch.bfloat16) == 1920  # 9 with the slice
    assert _default_chunk_size(n, v, c, torch.float32, dw_slice=False) == 1024  # fp32 has no slice either way


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_chunks_match_one_chunk(dtype, device):
    """Any chunking (uneven last chunk, one row per chunk) gives the single-chunk run's loss and gradients: rows
    are independent and d weight / d bias are summed in fp32, so only that sum's order differs."""
    torch.manual_seed(13)
    n, c, v = 37, 16, 9000  # V over one _DW_SLICE of 8192 classes: the slice loop runs twice
    hidden, weight = torch.randn(n, c, device=device), torch.randn(v, c, device=device) / c**0.5
    bias, target = torch.randn(v, device=device), _targets(n, v, device)
    runs = [_run_linear(fused_linear_cross_entropy, hidden, weight, bias, target, dtype, torch.tensor(0.3),
                        chunk_size=chunk, reduction="sum") for chunk in (n, 10, 1)]
    for run in runs[1:]:
        for name, a, b in zip(["loss", "hidden", "weight", "bias"], run, runs[0]):
            # one fp32 rounding of a sum, then (16-bit gradients) at most one step of the dtype
            tol = {"atol": 1e-5, "rtol": 1e-5} if name == "loss" or dtype == torch.float32 else {}
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_cross_entropy_fp32_accumulation_matches_the_slices(dtype, device, monkeypatch):
    """16-bit d weight accumulated in the matmul (CUDA's baddbmm into the fp32 accumulator, where torch has it)
    gives the slice path's gradients to fp32 summation order; elsewhere the probe says no and the slices run."""
    from kernels import cross_entropy as ce

    dev = torch.device(device)
    if dev.type != "cuda":
        assert ce._fp32_accumulate_ok(dev) is False
        return
    if not ce._fp32_accumulate_ok(dev):
        pytest.skip(f"torch {torch.__version__} has no fp32 baddbmm accumulation of {dtype} products on CUDA")
    torch.manual_seed(13)
    n, c, v = 37, 16, 9000
    hidden, weight = torch.randn(n, c, device=device), torch.randn(v, c, device=device) / c**0.5
    bias, target = torch.randn(v, device=device), _targets(n, v, device)
    run = functools.partial(_run_linear, fused_linear_cross_entropy, hidden, weight, bias, target, dtype,
                            torch.tensor(0.3), chunk_size=10, reduction="sum")
    fast = run()
    monkeypatch.setitem(ce._FP32_ACCUMULATE, dev, False)
    slices = run()
    for name, a, b in zip(["loss", "hidden", "weight", "bias"], fast, slices):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def _peak_cpu_bytes(fn):
    """Peak of live CPU tensor bytes allocated while fn runs, and the largest single allocation, from the
    profiler's allocation events (profile_memory records every allocator call with its signed size)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    assert events, "the profiler recorded no allocations"
    live = peak = largest = 0
    for _, size in sorted(events):
        live += size
        peak, largest = max(peak, live), max(largest, size)
    return peak, largest


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures the CPU allocator; the CUDA bench reports GPU peaks")
def test_linear_cross_entropy_memory_stays_near_one_chunk():
    torch.manual_seed(6)
    n, c, v, chunk = 192, 8, 6000, 16
    hidden, weight, target = torch.randn(n, c), torch.randn(v, c), torch.randint(0, v, (n,))
    full_logits, chunk_logits = n * v * 4, chunk * _padded_vocab(v) * 4  # chunks hold the padded vocabulary
    small = (3 * v * c + 3 * n * c + 2 * n) * 4  # d weight fp32 + its scaled copy, d hidden, losses
    # On CPU up to three chunk-sized buffers can be live at once: the chunk's logits, a copy of their
    # transpose that CPU BLAS may make for d weight, and the previous chunk, which the Triton interpreter
    # keeps referenced until its next launch. The full logits are 12 chunks.
    allowed = 3.5 * chunk_logits + small

    def run(fn, **kw):
        h, w = _leaf(hidden), _leaf(weight)
        return lambda: fn(h, w, target, **kw).backward()

    fused_peak, fused_largest = _peak_cpu_bytes(run(fused_linear_cross_entropy, chunk_size=chunk))
    eager_peak, _ = _peak_cpu_bytes(run(reference.linear_cross_entropy))
    assert eager_peak >= full_logits, f"the eager path should hold the {full_logits} B logits, peak {eager_peak}"
    assert fused_largest <= chunk_logits, f"largest fused allocation {fused_largest} B > one chunk {chunk_logits} B"
    assert fused_peak <= allowed, f"fused peak {fused_peak} B > {allowed} B (one chunk is {chunk_logits} B)"


def test_linear_cross_entropy_backward_makes_no_fp32_products(device):
    """The backward scales the forward's fp32 gradients by the incoming gradient and rounds them once to bf16,
    writing the bf16 results directly (mul with a bf16 out=): no operator of the backward returns an fp32
    tensor of d weight's or d hidden's size (at N = 32768 those products were 215 MiB beside the saved
    gradients; CUDA casts inside the kernel, while the CPU's TensorIterator still makes a temporary below the
    operator)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Outputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32 = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= n * c:
                    self.fp32.append((str(func), tuple(t.shape)))
            return out

    torch.manual_seed(7)
    n, c, v = 64, 32, 3000
    h, w = _leaf(torch.randn(n, c, device=device).bfloat16()), _leaf(torch.randn(v, c, device=device).bfloat16())
    loss = fused_linear_cross_entropy(h, w, torch.randint(0, v, (n,), device=device))
    with Outputs() as seen:
        (loss * 3.0).backward()
    assert seen.fp32 == [], seen.fp32
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16


def test_compile_specs_describe_the_kernel():
    for spec in COMPILE_SPECS:
        names = spec["fn"].arg_names
        assert set(spec["signature"]) | set(spec["constexprs"]) == set(names), spec["name"]
        assert spec["constexprs"]["BLOCK_V"] >= 1 and spec["num_warps"] >= 1
        # a launch named for the row read once compiles it (a row that did not fit would stream under the name)
        if spec["name"].endswith("_row"):
            assert spec["constexprs"]["ROWS1"] > 0, spec["name"]


def test_host_path_calls_no_triton_constexpr_function(monkeypatch):
    """fused_cross_entropy and fused_linear_cross_entropy, forward and backward, pick their launch with plain ints
    (see the same test in test_attention.py)."""
    logits = torch.randn(6, 50, requires_grad=True)
    hidden, weight = torch.randn(6, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    target = torch.randint(0, 50, (6,))

    def calls():
        fused_cross_entropy(logits, target).backward()
        fused_linear_cross_entropy(hidden, weight, target).backward()

    n = triton_constexpr_calls_on_the_host(monkeypatch, calls)
    assert n in (0, None), n


@pytest.mark.skipif(not cross_entropy.INTERPRET, reason="Triton's interpreter only")
def test_interpreter_patches_the_language_once_per_launch(monkeypatch):
    """kernels._common makes Triton's interpreter patch triton.language once per launch rather than at each of the
    kernel's helper calls: the same loss and gradient bit for bit, with a small fraction of the patching."""
    from triton.runtime import interpreter

    patches, patch = [], interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: patches.append(fn) or patch(fn))
    torch.manual_seed(0)
    logits, target = torch.randn(6, 50, dtype=torch.bfloat16), torch.randint(0, 50, (6,))

    def run():
        patches.clear()
        x = logits.clone().requires_grad_()
        loss = fused_cross_entropy(x, target, label_smoothing=0.1)
        (loss * 3).backward()  # not 1: the backward kernel scales the rows
        return loss, x.grad, len(patches)

    once = run()
    for cls in (interpreter.GridExecutor, interpreter.InterpretedFunction):
        monkeypatch.setattr(cls, "__call__", cls.__call__.__wrapped__)  # the interpreter as Triton ships it
    every_call = run()
    assert torch.equal(once[0], every_call[0]) and torch.equal(once[1], every_call[1])
    assert 2 <= once[2] and once[2] * 20 < every_call[2], (once[2], every_call[2])


@pytest.mark.skipif(not cross_entropy.INTERPRET, reason="Triton's interpreter only")
def test_interpreter_indexes_with_a_one_element_array():
    """kernels._common makes the interpreter's scalars convert to an int through a squeeze (triton 3.6 took int() of
    the one-element array itself, which numpy 2.4 refuses): while a launch's patches are in place a one-element
    scalar is an index, and afterwards tl.tensor is as it was."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    before = tl.tensor.__dict__.get("__index__")
    scope = interpreter._patch_lang(cross_entropy._cross_entropy_kernel.fn)
    try:
        scalar = tl.tensor(interpreter.TensorHandle(np.array([7], dtype=np.int32), tl.int32), tl.int32)
        assert list(range(scalar)) == list(range(7))
    finally:
        scope.restore()
    assert tl.tensor.__dict__.get("__index__") is before


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused(reduction, device):
    """A gradient penalty through either loss gets a clear error, not second derivatives without the loss's terms
    (the in-place one raised autograd's version-counter error, the linear one gave them silently)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 8, device=device), torch.randn(30, 8, device=device)
    target = torch.tensor([1, IGNORE, 29, 0, 7], device=device)
    assert_double_backward_refused(lambda h, w: fused_cross_entropy(h @ w.t(), target, reduction=reduction),
                                   [hidden, weight], "fused_cross_entropy")
    assert_double_backward_refused(lambda h, w: fused_linear_cross_entropy(h, w, target, reduction=reduction),
                                   [hidden, weight], "fused_linear_cross_entropy")
