"""kernels.fused_attention against float64 truth and kernels.reference.attention.

Numerics criterion (flash-attention's): the kernel's max error against the reference computed in float64
from the same inputs may be at most 2x the error of the eager reference run in the kernel's dtype, plus
a small dtype slack. With dropout both sides apply the very same keep-mask (attention_dropout_mask).
On CPU the kernels run in the Triton interpreter (tests/conftest.py), so shapes are small.
"""

import pytest
import torch
from helpers import assert_close

from kernels import attention, fused_attention, reference
from kernels.attention import _CONFIGS, attention_backward, attention_dropout_mask, attention_forward

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
# slack added to 2x the reference's own error, relative to the truth's scale: about one rounding of the dtype,
# because the backward's delta = rowsum(dO * O) uses O rounded to the dtype (as FlashAttention does) where
# autograd uses the exact softmax (at T=1 the exact dq is 0 and the reference's error exactly 0).
# fp32 inputs: the GPU kernels' dots take TF32 operands (rounded to nearest, unit roundoff u = 2^-11), while
# the fp32 reference here runs without TF32, so the slack is 4u: with rounded operands the kernel's error
# stays near 1.5u on these shapes; truncated ones (the tensor cores' own fp32 -> tf32) reached 5u on an H200.
# The interpreter computes fp32 dots exactly.
TF32_U = 2.0**-11
ON_GPU = torch.cuda.is_available()
SLACK = {FP16: 1e-3, BF16: 1e-2, FP32: 4 * TF32_U if ON_GPU else 1e-5}
SEED = 1234


def _inputs(B, H, T, D, dtype, device, layout):
    """Leaf tensor(s) and the (B, H, T, D) q, k, v views the kernel gets: "qkv" is the model's layout,
    three permuted views of one (B, T, 3, H, D) tensor; "separate" is three contiguous tensors."""
    if layout == "qkv":
        leaf = torch.randn(B, T, 3, H, D, device=device).to(dtype).requires_grad_()
        return [leaf], lambda leaves: leaves[0].permute(2, 0, 3, 1, 4).unbind(0)
    leaves = [torch.randn(B, H, T, D, device=device).to(dtype).requires_grad_() for _ in range(3)]
    return leaves, lambda leaves: leaves


def _run(fn, leaves, make_qkv, do, dtype=None):
    """Output and leaf gradients of fn(q, k, v) on fresh copies of the leaves (optionally cast)."""
    leaves = [x.detach().clone().to(dtype or x.dtype).requires_grad_() for x in leaves]
    out = fn(*make_qkv(leaves))
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return out, grads


def _round_to_tf32(x):
    """x (fp32) rounded to nearest-even TF32 (10 mantissa bits), as the kernels round fp32 dot operands."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _logsumexp_of_scores(q, k, tf32, causal=True):
    """float64 lse of the scaled (causal) scores, from q and k as the kernel's dot sees them."""
    if tf32:
        q, k = _round_to_tf32(q), _round_to_tf32(k)
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if causal:
        T = q.shape[-2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.logsumexp(scores, -1)


def _check(name, actual, low_precision, truth, dtype):
    ref_err = (low_precision.double() - truth).abs().max().item()
    slack = SLACK[dtype] * max(1.0, truth.abs().max().item())
    assert_close(actual, truth, atol=2 * ref_err + slack, rtol=0, name=name)


CASES = [  # B, H, T, D, dtype, causal, dropout_p, layout
    (1, 3, 1, 16, FP16, True, 0.0, "separate"),
    (2, 3, 37, 32, BF16, True, 0.0, "qkv"),
    (1, 3, 37, 64, FP32, False, 0.0, "separate"),
    (2, 1, 129, 64, BF16, True, 0.1, "qkv"),
    (1, 3, 50, 128, FP16, False, 0.2, "separate"),
    (1, 1, 33, 16, FP32, True, 0.3, "qkv"),
    (3, 1, 64, 32, FP16, False, 0.0, "qkv"),
    (1, 3, 19, 128, BF16, False, 0.0, "separate"),
    (1, 3, 1, 64, BF16, False, 0.1, "separate"),
    (1, 3, 40, 32, FP16, True, 0.5, "separate"),
]


@pytest.mark.parametrize("B,H,T,D,dtype,causal,p,layout", CASES)
def test_against_reference(B, H, T, D, dtype, causal, p, layout, device):
    torch.manual_seed(0)
    leaves, make_qkv = _inputs(B, H, T, D, dtype, device, layout)
    do = torch.randn(B, H, T, D, device=device)
    mask = attention_dropout_mask(SEED, B, H, T, p, device) if p else None
    out, grads = _run(lambda q, k, v: fused_attention(q, k, v, causal=causal, dropout_p=p, _seed=SEED),
                      leaves, make_qkv, do)
    ref = lambda q, k, v: reference.attention(q, k, v, causal=causal, dropout_p=p, dropout_mask=mask)
    out_lp, grads_lp = _run(ref, leaves, make_qkv, do)
    out_64, grads_64 = _run(ref, leaves, make_qkv, do, dtype=torch.float64)
    assert out.dtype == dtype and out.shape == (B, H, T, D)
    _check("out", out, out_lp, out_64, dtype)
    names = ["dqkv"] if layout == "qkv" else ["dq", "dk", "dv"]
    for name, g, g_lp, g_64 in zip(names, grads, grads_lp, grads_64):
        assert g.dtype == dtype
        _check(name, g, g_lp, g_64, dtype)


@pytest.mark.parametrize("arch,D,fp32", [(9, 64, False), (8, 128, False), (9, 32, True)])
def test_gpu_launch_configs(arch, D, fp32, device):
    """The GPU table's block sizes (BLOCK_M != BLOCK_N, several diagonal steps) on a T that is a multiple
    of none of them, through the launchers, against float64."""
    torch.manual_seed(0)
    B, H, T, dtype = 1, 1, 200, FP32 if fp32 else BF16
    cfg = _CONFIGS[(arch, D, fp32)]
    q, k, v, do = (torch.randn(B, H, T, D, device=device).to(dtype) for _ in range(4))
    mask = attention_dropout_mask(SEED, B, H, T, 0.1, device)
    o, lse = attention_forward(q, k, v, dropout_p=0.1, seed=SEED, config=cfg)
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, dropout_p=0.1, seed=SEED, config=cfg)
    ref = lambda q, k, v: reference.attention(q, k, v, dropout_p=0.1, dropout_mask=mask)
    out_lp, grads_lp = _run(ref, [q, k, v], lambda x: x, do)
    out_64, grads_64 = _run(ref, [q, k, v], lambda x: x, do, dtype=torch.float64)
    _check("out", o, out_lp, out_64, dtype)
    for name, g, g_lp, g_64 in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_lp, grads_64):
        _check(name, g, g_lp, g_64, dtype)
    # the lse is that of the scores the kernel's dot can compute: from TF32-rounded q, k for fp32 on a GPU
    assert_close(lse, _logsumexp_of_scores(q, k, tf32=fp32 and ON_GPU), atol=1e-4, rtol=1e-4, name="lse")


@pytest.mark.parametrize("causal", [True, False])
def test_fp32_dot_operands_are_rounded_to_tf32(causal, device, monkeypatch):
    """The TF32 path (forced under the interpreter, where fp32 dots are otherwise exact): the lse matches the
    float64 lse of TF32 round-to-nearest q and k. Truncated operands (what the tensor cores do to raw fp32)
    bias every score towards zero and miss it by ~6e-4 on average here."""
    monkeypatch.setattr(attention, "_rounding", lambda q: "tf32" if q.dtype == FP32 else "none")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 32, device=device) for _ in range(3))
    _, lse = attention_forward(q, k, v, causal=causal)
    assert_close(lse, _logsumexp_of_scores(q, k, tf32=True, causal=causal), atol=3e-5, rtol=0, name="lse")


def test_backward_is_deterministic(device):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 45, 32, device=device).to(BF16).requires_grad_() for _ in range(3))
    do = torch.randn(2, 3, 45, 32, device=device).to(BF16)
    grads = []
    for _ in range(2):
        out = fused_attention(q, k, v, dropout_p=0.1, _seed=SEED)
        grads.append(torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_dropout_mask_fraction_and_seeds(device):
    p, shape = 0.25, (2, 3, 64)
    keep = attention_dropout_mask(SEED, *shape, p, device)
    assert keep.shape == (2, 3, 64, 64) and keep.dtype == torch.bool
    dropped = 1.0 - keep.float().mean().item()
    assert abs(dropped - p) < 0.015, dropped  # 24576 draws: std 0.003
    per_head = keep.float().mean(dim=(-1, -2))
    assert (per_head - (1 - p)).abs().max() < 0.04  # no head or batch is left undropped
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, attention_dropout_mask(SEED, *shape, p, device))
    assert not torch.equal(keep, attention_dropout_mask(SEED + 1, *shape, p, device))
    # a function of (seed, b, h, i, j) only: a shorter T (drawn with other block widths) gives the corner
    assert torch.equal(keep[:, :, :20, :20], attention_dropout_mask(SEED, 2, 3, 20, p, device))


def test_dropout_seed_follows_torch_manual_seed(device):
    q, k, v = (torch.randn(1, 2, 24, 16, device=device) for _ in range(3))
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(fused_attention(q, k, v, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    # without dropout no seed is drawn: the default generator is left alone
    torch.manual_seed(0)
    fused_attention(q, k, v)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_output_layout_is_free_to_transpose(device):
    q = k = v = torch.randn(2, 3, 5, 16, device=device)
    out = fused_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # the model's (B, T, C) reshape is a view


def _t(*shape, dtype=FP32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_t(2, 5, 16), _t(2, 5, 16), _t(2, 5, 16)), {}, ValueError, "rank 3"),
    ((_t(1, 2, 5, 16), _t(1, 2, 6, 16), _t(1, 2, 5, 16)), {}, ValueError, "same shape"),
    ((_t(1, 2, 5, 16), _t(1, 2, 5, 16, dtype=FP16), _t(1, 2, 5, 16)), {}, TypeError, "same dtype"),
    ((_t(1, 2, 5, 16, dtype=torch.float64),) * 3, {}, TypeError, "not supported"),
    ((_t(1, 2, 5, 48),) * 3, {}, ValueError, "head dim 48"),
    ((_t(1, 2, 5, 16),) * 3, dict(dropout_p=1.0), ValueError, "dropout_p"),
    ((_t(1, 2, 5, 16),) * 3, dict(dropout_p=-0.1), ValueError, "dropout_p"),
    ((_t(1, 2, 5, 16),) * 3, dict(causal=1), TypeError, "causal"),
    ((_t(1, 2, 5, 16), _t(1, 2, 5, 16), [0.0]), {}, TypeError, "v must be a torch.Tensor"),
])
def test_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fused_attention(*args, **kwargs)


def test_device_mismatch_error():
    meta = torch.zeros(1, 2, 5, 16, device="meta")
    with pytest.raises(ValueError, match="same device"):
        fused_attention(_t(1, 2, 5, 16), _t(1, 2, 5, 16), meta)
