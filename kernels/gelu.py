"""Fused bias + GELU in Triton: y = gelu(x + bias), the MLP's activation after its first matmul, forward and
backward, with the bias gradient summed as the input gradient is written (Megatron-LM's bias_gelu fusion,
written anew here).

Algorithm:

- Forward: an elementwise pass over (BLOCK_R, BLOCK_C) tiles of the (N, C) rows: y = gelu(x + bias) in fp32,
  rounded once to x's dtype. Only x (the matmul's output without its bias) and the bias are kept for the
  backward, which recomputes x + bias: the same tensors torch keeps for F.gelu after a biased matmul.
- Backward: dx = dy * gelu'(x + bias). A grid of (row chunks, column blocks), about 4 programs per SM: each
  program walks its chunk of rows BLOCK_R at a time for one column block, writes dx, and keeps the running sum
  of dx over its rows in fp32 registers; it stores that once, as one (n_chunks, C) fp32 row, and torch sums
  the chunks' rows (a fixed order: bitwise reproducible, no atomics). In the model, torch's bias gradient is a
  second pass over dx (the matmul's bias-gradient reduction); here it costs no bytes.
- GELU: approximate="tanh" (GPT-1's, OpenAI's gelu) as x * sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3)
  (0.5 * (1 + tanh(u)) = sigmoid(2u): one exp2 and one division), or "none": 0.5 x (1 + erf(x / sqrt(2))),
  as F.gelu's `approximate`.

Dtypes: x fp16, bf16 or fp32; bias (C,) in any of those or None. All arithmetic is fp32. y and dx are in x's
dtype, dbias in bias's. Under torch.autocast the matmul before it gives a 16-bit x and the bias is an fp32
parameter: y stays 16-bit (as autocast's biased matmul and F.gelu give it), and x + bias is not rounded to 16
bits on the way.

Shapes: x (..., C), any leading dims (flattened into N rows, N = 0 gives empty results), rows of any stride
(columns of stride 1, or x is copied first); C >= 1; a bias of a stride other than 1 is copied first.

Operators: `gpt1_kernels::bias_gelu(x, bias?, approximate) -> y` and
`gpt1_kernels::bias_gelu_backward(dy, x, bias?, approximate) -> (dx, dbias)` (dbias empty without a bias),
torch.library triton_ops (kernels._common.kernel_op: opaque to Inductor unless kernels.set_inline(True)) with
fake implementations and the backward registered with register_autograd, so
torch.compile(fullgraph=True) traces fused_bias_gelu forward and backward; in eager mode the public function
calls the same launchers through BiasGELUFunction. No double backward: create_graph=True raises
(kernels._common.first_order).
"""

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._common import (
    INTERPRET,
    LOG2E,
    as_rows,
    cdiv,
    check_tensors,
    first_order,
    interpreter_block,
    interpreter_rows,
    kernel_op,
    launchable,
    next_power_of_2,
    stored,
    unit_stride,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
APPROXIMATIONS = ("tanh", "none")
# tanh GELU: gelu(z) = z * sigmoid(2u), 2u = z * (TANH_A + TANH_B * z^2), with 2u in base 2 (times log2(e)):
# 2u = 2 sqrt(2/pi) (z + 0.044715 z^3); d(2u)/dz = DTANH_A + DTANH_B * z^2 (not in base 2)
_K2 = 2.0 * math.sqrt(2.0 / math.pi)
TANH_A = tl.constexpr(_K2 * LOG2E.value)
TANH_B = tl.constexpr(_K2 * 0.044715 * LOG2E.value)
DTANH_A = tl.constexpr(_K2)
DTANH_B = tl.constexpr(3.0 * _K2 * 0.044715)
# the tanh derivative's z is clamped to +-20: s = sigmoid(2u) is exactly 1 in fp32 past z ~ 9 and 0 below z ~ -11
GRAD_CLAMP = tl.constexpr(20.0)
INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))

# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _gelu_and_grad(z, TANH: tl.constexpr, GRAD: tl.constexpr):
    """(gelu(z), gelu'(z)) of fp32 z (the derivative only if GRAD, else the value twice)."""
    if TANH:
        z2 = z * z
        s = 1.0 / (1.0 + tl.math.exp2(-z * (TANH_A + TANH_B * z2)))  # sigmoid(2u) = (1 + tanh(u)) / 2
        y = z * s
        if GRAD:
            # d/dz [z s(2u)] = s + z s (1 - s) d(2u)/dz; past |z| = GRAD_CLAMP it is 0 or 1 in fp32 (s is), and
            # the clamped z keeps z^3 finite there, where 0 * inf would make it NaN
            zc = tl.minimum(tl.maximum(z, -GRAD_CLAMP), GRAD_CLAMP)
            return y, s * (1.0 + zc * (1.0 - s) * (DTANH_A + DTANH_B * zc * zc))
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * INV_SQRT_2))
        y = z * cdf
        if GRAD:
            return y, cdf + z * INV_SQRT_2PI * tl.math.exp2(z * z * (-0.5 * LOG2E))
    return y, y


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, stride_x, N, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          HAS_BIAS: tl.constexpr, TANH: tl.constexpr, RTNE_BF16: tl.constexpr):
    """Y (contiguous (N, C)) = gelu(X + B) of the tile (program 0 rows, program 1 columns)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows[:, None] < N) & col_ok[None, :]
    z = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y, _ = _gelu_and_grad(z, TANH, False)
    tl.store(Y + rows[:, None] * C + cols[None, :], stored(y, Y.dtype.element_ty, RTNE_BF16), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, DB_PART, stride_dy, stride_x, N, C, rows_per_program,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
                          RTNE_BF16: tl.constexpr):
    """DX (contiguous (N, C)) = DY * gelu'(X + B) over rows [program 0 * rows_per_program, ...) (a multiple of
    BLOCK_R) of column block program 1; with HAS_BIAS, the fp32 sum of DX over those rows into row program 0 of
    DB_PART (n_programs_0, C)."""
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < row_end) & col_ok[None, :]
        z = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        _, grad = _gelu_and_grad(z + bias[None, :], TANH, True)
        dx = dy * grad
        tl.store(DX + rows[:, None] * C + cols[None, :], stored(dx, DX.dtype.element_ty, RTNE_BF16), mask=mask)
        if HAS_BIAS:
            db += tl.where(mask, dx, 0.0)  # fp32, before dx is rounded to its dtype
    if HAS_BIAS:
        tl.store(DB_PART + pid * C + cols, tl.sum(db, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------

# Tiles of 4096 elements on 8 warps (16 per thread: two 16-byte loads of a 16-bit tensor per operand), at most
# 1024 columns wide; the backward runs about 4 programs per SM, each walking its chunk of rows. The interpreter
# runs each program in Python: small tiles and 3 row chunks keep tests quick while still covering several tiles
# per program, a partial tile and more than one partial row; many rows or columns take larger tiles
# (interpreter_block, interpreter_rows), as the interpreter's cost is per tile.
_TILE_ELEMENTS, _NUM_WARPS, _MAX_BLOCK_C, _BWD_PROGRAMS_PER_SM = 4096, 8, 1024, 4
_INTERPRETER_TILE, _INTERPRETER_ROW_CHUNKS = (2, 32), 3


def _config_for(device, N, C, backward=False):
    """(BLOCK_R, BLOCK_C, num_warps, the most backward programs) for N rows of C columns."""
    if device.type != "cuda":
        rows, cols = _INTERPRETER_TILE
        block_c = min(interpreter_block(C, cols, 4, _MAX_BLOCK_C), next_power_of_2(C))
        block_r = interpreter_rows(N, block_c, rows, 8 if backward else 4)
        return block_r, block_c, 1, _INTERPRETER_ROW_CHUNKS * cdiv(C, block_c)
    return _gpu_config(device, C)


@functools.cache
def _gpu_config(device, C):
    block_c = min(_MAX_BLOCK_C, next_power_of_2(C))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, _TILE_ELEMENTS // block_c), block_c, _NUM_WARPS, _BWD_PROGRAMS_PER_SM * sms


def _compile_specs():
    """COMPILE_SPECS for bench.compile_report: both kernels at GPT-1's MLP width (C = 3072), tanh GELU, a bf16 x
    with an fp32 bias (torch.autocast) and bf16 with a bf16 bias (DeepSpeed's bf16)."""
    C, block_c = 3072, _MAX_BLOCK_C
    consts = dict(BLOCK_R=_TILE_ELEMENTS // block_c, BLOCK_C=block_c, HAS_BIAS=True, TANH=True, RTNE_BF16=False)
    specs = []
    for x_t, b_t in (("bf16", "fp32"), ("bf16", "bf16")):
        specs.append(dict(name=f"bias_gelu_fwd C={C} x {x_t} bias {b_t}", fn=_bias_gelu_fwd_kernel,
                          signature=dict(X=f"*{x_t}:16", B=f"*{b_t}:16", Y=f"*{x_t}:16", stride_x="i32:16",
                                         N="i32", C="i32:16"),
                          constexprs=consts, num_warps=_NUM_WARPS, num_stages=1))
        specs.append(dict(name=f"bias_gelu_bwd C={C} x {x_t} bias {b_t}", fn=_bias_gelu_bwd_kernel,
                          signature=dict(DY=f"*{x_t}:16", X=f"*{x_t}:16", B=f"*{b_t}:16", DX=f"*{x_t}:16",
                                         DB_PART="*fp32:16", stride_dy="i32:16", stride_x="i32:16", N="i32",
                                         C="i32:16", rows_per_program="i32"),
                          constexprs=consts, num_warps=_NUM_WARPS, num_stages=1))
    return specs


COMPILE_SPECS = _compile_specs()

# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------


def _fail(message, exc=ValueError):
    raise exc(f"fused_bias_gelu: {message}")


def _check_inputs(x, bias, approximate):
    check_tensors("fused_bias_gelu: ", x=x, bias=bias)
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.dtype not in DTYPES:
            _fail(f"{name} dtype {t.dtype} is not supported (use float16, bfloat16 or float32)", TypeError)
    if x.dim() == 0 or x.shape[-1] < 1:
        _fail(f"x must have shape (..., C) with C >= 1, got {tuple(x.shape)}")
    if bias is not None and bias.shape != x.shape[-1:]:
        _fail(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
    if bias is not None and bias.device != x.device:
        _fail(f"x and bias must be on the same device, got {x.device} and {bias.device}")
    if approximate not in APPROXIMATIONS:
        _fail(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def bias_gelu_forward(x, bias=None, approximate="tanh"):
    """y = gelu(x + bias) of x's shape and dtype."""
    _check_inputs(x, bias, approximate)
    return _forward(x, bias, approximate)


def _forward(x, bias, approximate):
    bias = unit_stride(bias)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    C = x.shape[-1]
    N = y.numel() // C
    if N:
        x2 = as_rows(x)
        block_r, block_c, num_warps, _ = _config_for(x.device, N, C)
        launchable(_bias_gelu_fwd_kernel, x2)[(cdiv(N, block_r), cdiv(C, block_c))](
            x2, bias, y, x2.stride(0), N, C, BLOCK_R=block_r, BLOCK_C=block_c, HAS_BIAS=bias is not None,
            TANH=approximate == "tanh", RTNE_BF16=INTERPRET, num_warps=num_warps)
    return y


def bias_gelu_backward(dy, x, bias=None, approximate="tanh"):
    """(dx, dbias): dx = dy * gelu'(x + bias) in x's dtype, dbias (its sum over the rows, in bias's dtype) None
    without a bias."""
    _check_inputs(x, bias, approximate)
    if dy.shape != x.shape:
        _fail(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    dx, dbias = _backward(dy, x, bias, approximate)
    return dx, dbias if bias is not None else None


def _backward(dy, x, bias, approximate):
    """(dx, dbias), dbias an empty tensor of x's dtype without a bias."""
    bias = unit_stride(bias)
    C = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    N = dx.numel() // C
    block_r, block_c, num_warps, programs = _config_for(x.device, N, C, backward=True)
    col_blocks = cdiv(C, block_c)
    rows_per_program = cdiv(cdiv(max(N, 1), max(1, programs // col_blocks)), block_r) * block_r
    row_chunks = cdiv(N, rows_per_program)
    db_part = torch.empty((row_chunks if bias is not None else 0, C), dtype=torch.float32, device=x.device)
    if N:
        dy2, x2 = as_rows(dy), as_rows(x)
        launchable(_bias_gelu_bwd_kernel, x2)[(row_chunks, col_blocks)](
            dy2, x2, bias, dx, db_part, dy2.stride(0), x2.stride(0), N, C, rows_per_program, BLOCK_R=block_r,
            BLOCK_C=block_c, HAS_BIAS=bias is not None, TANH=approximate == "tanh", RTNE_BF16=INTERPRET,
            num_warps=num_warps)
    if bias is None:
        return dx, x.new_empty((0,))
    dbias = db_part.sum(0) if N else torch.zeros(C, dtype=torch.float32, device=x.device)
    return dx, dbias.to(bias.dtype)


# ----------------------------------------------------------------------------------------------------
# Operators and autograd
# ----------------------------------------------------------------------------------------------------


@kernel_op("gpt1_kernels::bias_gelu")
def bias_gelu_op(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    """gelu(x + bias), differentiable in x and bias (the backward is bias_gelu_backward_op)."""
    return _forward(x, bias, approximate)


@bias_gelu_op.register_fake
def _(x, bias, approximate):
    return x.new_empty(x.shape)


@kernel_op("gpt1_kernels::bias_gelu_backward")
def bias_gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                          approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias), contiguous, in the dtypes of x and bias; dbias an empty tensor of x's dtype without bias."""
    return _backward(dy, x, bias, approximate)


@bias_gelu_backward_op.register_fake
def _(dy, x, bias, approximate):
    return x.new_empty(x.shape), bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,))


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


@first_order("fused_bias_gelu")
def _op_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = bias_gelu_backward_op(dy, x, bias, ctx.approximate)
    return dx, dbias if bias is not None else None, None


bias_gelu_op.register_autograd(_op_backward, setup_context=_setup_context)


class BiasGELUFunction(torch.autograd.Function):
    """The eager path: the launchers the operators wrap, without a custom op's dispatcher round trip."""

    @staticmethod
    def forward(ctx, x, bias, approximate):
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        return _forward(x, bias, approximate)

    @staticmethod
    @first_order("fused_bias_gelu")
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, dbias = _backward(dy, x, bias, ctx.approximate)
        return dx, dbias if bias is not None else None, None


def fused_bias_gelu(x, bias=None, *, approximate="tanh"):
    """F.gelu(x + bias, approximate=approximate) for x (..., C) and bias (C,) or None, in one kernel each way;
    y in x's dtype (see the module docstring). `approximate`: "tanh" (GPT-1's) or "none" (erf), as F.gelu's."""
    _check_inputs(x, bias, approximate)
    if torch.compiler.is_compiling():
        return bias_gelu_op(x, bias, approximate)
    return BiasGELUFunction.apply(x, bias, approximate)
