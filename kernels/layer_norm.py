"""Fused dropout + residual add + LayerNorm in Triton: y = layer_norm(x + dropout(h)), GPT-1's post-LN block glue
(`x = ln_1(x + dropout(attn(x)))`, `x = ln_2(x + dropout(mlp(x)))`), forward and backward.

Algorithm (the structure of Triton's tutorial 05 "layer norm" and Apex's fused LayerNorm, written anew here):

- Forward: one program per BLOCK_R rows holds each row whole in registers (BLOCK_C = next power of 2 >= C).
  It forms r = x + keep * h / (1 - p) in fp32, the mean, the variance of (r - mean) (two passes over the
  registers, no E[r^2] - E[r]^2 cancellation), rstd = 1 / sqrt(var + eps), and stores
  y = (r - mean) * rstd * weight + bias, rounded once to the output dtype (and, with a branch_dtype, once more
  to that dtype: a second output for the next sublayer). Only mean and rstd (fp32, one per row) are saved: the
  sum r is never written, the backward recomputes it from x and h.
- Backward: a few hundred programs (4 per SM on a GPU) each own a contiguous chunk of rows, walk it BLOCK_R
  rows at a time, read the output's gradient dy (the sum of the gradients of y and of its branch copy, added
  here rather than by autograd in a pass of its own), recompute r, xhat = (r - mean) * rstd and the keep-mask,
  and write
  dr = rstd * (w dy - xhat * mean(xhat * w dy) - mean(w dy)) as dx and dr * keep / (1 - p) as dh. The
  d weight = sum(dy * xhat) and d bias = sum(dy) partials of the chunk stay in fp32 registers and are stored
  once per program as (n_programs, C) fp32 rows, which a third small kernel sums in a fixed order and stores in
  the parameters' dtypes: no atomics, so the gradients are bitwise reproducible.
- Dropout: kernels._common's Philox draws (dropout_words / keep_from_words), stream 0, counter
  (column // 8, row, 0, seed): element (i, j) is kept iff its 16-bit draw >= round(p * 65536) (p quantized
  to 1/65536), kept elements scaled by 1/(1 - p). The forward draws the mask; the backward draws it again from
  the same seed (one Philox call per 8 elements, cheaper than storing and reading a mask).
  `add_dropout_layer_norm_mask` gives the boolean mask of a seed, for tests. The 32-bit seed is a 1-element
  int64 tensor drawn with torch.randint on the inputs' device (new_dropout_seed): torch.manual_seed reproduces
  it, no host sync, and under torch.compile it is a graph tensor.

Dtypes: x and h each fp16, bf16 or fp32, possibly different (under torch.autocast the residual stream x is
fp32 and the sublayer's output h bf16); weight (C,) and bias (C,) or None, each in any of those dtypes. All
arithmetic is fp32. y is in torch.promote_types(x.dtype, h.dtype) (what eager `layer_norm(x + dropout(h))`
gives without autocast); under torch.autocast, which runs layer_norm in fp32, y is fp32 (16-bit x is read as
fp32); dx in x's dtype, dh in h's, d weight and d bias in the parameters' dtypes.

Shapes: x and h of the same shape (..., C); the leading dims are flattened into N rows (any N >= 0, N = 0 gives
empty results); rows may have any stride, columns must have stride 1 or are copied first; weight and bias of a
stride other than 1 are copied first (kernels._common.unit_stride).

Operators: `gpt1_kernels::add_dropout_layer_norm(x, h, weight, bias?, seed?, dropout_p, eps, branch_dtype?) ->
(y, y_branch, mean, rstd)` and `gpt1_kernels::add_dropout_layer_norm_backward(dy?, dy_branch?, x, h, weight, bias?,
mean, rstd, seed?, dropout_p) -> (dx, dh, dweight, dbias)` (y_branch empty without a branch_dtype, dbias without
bias: an operator cannot return None), torch.library triton_ops (kernels._common.kernel_op: opaque to Inductor
unless kernels.set_inline(True)) with fake implementations and the backward registered with register_autograd,
so torch.compile(fullgraph=True) traces fused_add_dropout_layer_norm forward and backward without a graph break.
In eager mode the public function calls the same launchers through AddDropoutLayerNormFunction (no dispatcher
round trip), as fused_attention does.

Limits: 1 <= C <= 8192 (a row lives in registers: beyond that it would spill); offsets are int64; no double backward
(create_graph=True raises: kernels._common.first_order). Under torch.compile dropout_p and eps are graph constants (a
new value recompiles); the seed is not. Under the Triton interpreter (TRITON_INTERPRET=1, CPU tests), bf16 stores
round to nearest by bit arithmetic (the interpreter truncates); GPU code is unaffected.
"""

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._common import (
    INTERPRET,
    as_rows,
    cdiv,
    check_tensors,
    dropout_args,
    dropout_words,
    first_order,
    interpreter_rows,
    is_number,
    keep_from_words,
    kernel_op,
    launchable,
    new_dropout_seed,
    next_power_of_2,
    seed_tensor,
    stored,
    unit_stride,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_C = 8192

# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _keep(SEED, DROP_THRESHOLD, rows, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) keep-mask of rows x [0, BLOCK_C): stream 0, the draws of kernels._common."""
    r0, r1, r2, r3 = dropout_words(SEED, tl.zeros([], dtype=tl.int32), rows, 0, BLOCK_R, BLOCK_C)
    return keep_from_words(r0, r1, r2, r3, DROP_THRESHOLD, BLOCK_R, BLOCK_C)


@triton.jit
def _residual(x, h, SEED, rows, mask, DROP_THRESHOLD, DROPOUT_SCALE, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              DROPOUT: tl.constexpr):
    """(r, keep): r = x + dropout(h) in fp32 of a (BLOCK_R, BLOCK_C) tile of loaded x and h (0 where masked) and
    the keep-mask (the load mask without dropout: a jit function cannot return None in a tuple)."""
    h = h.to(tl.float32)
    keep = mask
    if DROPOUT:
        keep = _keep(SEED, DROP_THRESHOLD, rows, BLOCK_R, BLOCK_C)
        h = tl.where(keep, h * DROPOUT_SCALE, 0.0)
    return x.to(tl.float32) + h, keep


@triton.jit
def _add_ln_fwd_kernel(X, H, W, B, Y, Y_BRANCH, MEAN, RSTD, SEED, DROP_THRESHOLD, DROPOUT_SCALE, eps,
                       stride_x, stride_h, N, C,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_BRANCH: tl.constexpr, RTNE_BF16: tl.constexpr):
    """Y and Y_BRANCH (the same values in the branch dtype, if HAS_BRANCH) are contiguous (N, C)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows[:, None] < N) & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
    r, _ = _residual(x, h, SEED, rows, mask, DROP_THRESHOLD, DROPOUT_SCALE, BLOCK_R, BLOCK_C, DROPOUT)
    mean = tl.sum(r, axis=1) / C
    d = tl.where(mask, r - mean[:, None], 0.0)
    # sqrt_rn / div_rn: IEEE-rounded like torch's; the fast approximate ones are a few ulp off in fp32
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(d * d, axis=1) / C + eps))
    y = d * rstd[:, None] * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    offs = rows[:, None] * C + cols[None, :]
    tl.store(Y + offs, stored(y, Y.dtype.element_ty, RTNE_BF16), mask=mask)
    if HAS_BRANCH:
        tl.store(Y_BRANCH + offs, stored(y, Y_BRANCH.dtype.element_ty, RTNE_BF16), mask=mask)
    tl.store(MEAN + rows, mean, mask=rows < N)
    tl.store(RSTD + rows, rstd, mask=rows < N)


@triton.jit
def _bwd_loads(X, H, DY, DY_BRANCH, MEAN, RSTD, rows, cols, row_ok, col_ok, stride_x, stride_h, stride_dy,
               stride_dyb, HAS_DY: tl.constexpr, HAS_DY_BRANCH: tl.constexpr):
    """The backward's inputs of the rows `rows` (where row_ok), as stored (converted where they are used, a loop
    trip later: see _add_ln_bwd_kernel): x, h, dy, dy_branch (x and h where absent, never read), mean, rstd."""
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
    dy = x
    if HAS_DY:
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    dy_branch = h
    if HAS_DY_BRANCH:
        dy_branch = tl.load(DY_BRANCH + rows[:, None] * stride_dyb + cols[None, :], mask=mask, other=0.0)
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    return x, h, dy, dy_branch, mean, rstd


@triton.jit
def _add_ln_bwd_kernel(X, H, W, DY, DY_BRANCH, DX, DH, DW_PART, DB_PART, MEAN, RSTD, SEED, DROP_THRESHOLD,
                       DROPOUT_SCALE, stride_x, stride_h, stride_dy, stride_dyb, N, C, rows_per_program,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_DY: tl.constexpr, HAS_DY_BRANCH: tl.constexpr, RTNE_BF16: tl.constexpr):
    """Rows [pid * rows_per_program, ...) (rows_per_program a multiple of BLOCK_R); the output's gradient is
    DY + DY_BRANCH (each read only if present: the gradients of y and of its branch copy); DX and DH are
    contiguous (N, C), DW_PART and DB_PART (n_programs, C) fp32, one row per program.

    Each loop trip issues the loads of the next tile before it works on the current one, whose loads the trip
    before issued: a program keeps a tile's reads in flight while its reductions (two across the program's warps,
    with their barriers) and stores run, where loading a tile and then using it left the loads' latency exposed
    once per tile (a program walks ~30 tiles of one row)."""
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    rows_next = row_start + tl.arange(0, BLOCK_R)
    x_n, h_n, dy_n, dyb_n, mean_n, rstd_n = _bwd_loads(X, H, DY, DY_BRANCH, MEAN, RSTD, rows_next, cols,
                                                       rows_next < row_end, col_ok, stride_x, stride_h, stride_dy,
                                                       stride_dyb, HAS_DY, HAS_DY_BRANCH)
    for start in range(row_start, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        x, h, dy_raw, dyb_raw, mean, rstd = x_n, h_n, dy_n, dyb_n, mean_n, rstd_n
        rows_next = rows + BLOCK_R
        x_n, h_n, dy_n, dyb_n, mean_n, rstd_n = _bwd_loads(X, H, DY, DY_BRANCH, MEAN, RSTD, rows_next, cols,
                                                           rows_next < row_end, col_ok, stride_x, stride_h,
                                                           stride_dy, stride_dyb, HAS_DY, HAS_DY_BRANCH)
        r, keep = _residual(x, h, SEED, rows, mask, DROP_THRESHOLD, DROPOUT_SCALE, BLOCK_R, BLOCK_C, DROPOUT)
        xhat = tl.where(mask, (r - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        if HAS_DY:
            dy += dy_raw.to(tl.float32)
        if HAS_DY_BRANCH:
            dy += dyb_raw.to(tl.float32)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dr = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        offs = rows[:, None] * C + cols[None, :]
        tl.store(DX + offs, stored(dr, DX.dtype.element_ty, RTNE_BF16), mask=mask)
        if DROPOUT:
            dr = tl.where(keep, dr * DROPOUT_SCALE, 0.0)
        tl.store(DH + offs, stored(dr, DH.dtype.element_ty, RTNE_BF16), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * C + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * C + cols, db, mask=col_ok)


@triton.jit
def _add_ln_param_grads_kernel(DW_PART, DB_PART, DW, DB, n_parts, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                               HAS_BIAS: tl.constexpr, RTNE_BF16: tl.constexpr):
    """DW[c] = the sum over p of DW_PART[p, c] (and DB of DB_PART), in fp32, in a fixed order, stored in DW's (DB's)
    dtype: the backward's per-program partial rows in one launch, where torch's sums and casts took four."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    dw = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(0, n_parts, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        offs = parts[:, None] * C + cols[None, :]
        mask = (parts[:, None] < n_parts) & col_ok[None, :]
        dw += tl.load(DW_PART + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            db += tl.load(DB_PART + offs, mask=mask, other=0.0)
    tl.store(DW + cols, stored(tl.sum(dw, axis=0), DW.dtype.element_ty, RTNE_BF16), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + cols, stored(tl.sum(db, axis=0), DB.dtype.element_ty, RTNE_BF16), mask=col_ok)


@triton.jit
def _add_ln_dropout_mask_kernel(MASK, SEED, DROP_THRESHOLD, N, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # the keep-mask of rows [program * BLOCK_R, ...) as (N, C) uint8, drawn as the forward and backward draw it
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    keep = _keep(SEED, DROP_THRESHOLD, rows, BLOCK_R, BLOCK_C)
    tl.store(MASK + rows[:, None] * C + cols[None, :], keep.to(tl.uint8),
             mask=(rows[:, None] < N) & (cols[None, :] < C))


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------

# (BLOCK_R, num_warps) on a GPU, from the row width. Forward: tiles of 2048 elements while a row is shorter, about 16
# elements per thread (two 16-byte loads of a 16-bit row), 4 to 16 warps. Backward: tiles of 1024 elements, about 8
# per thread: it holds x, h, both output gradients and the mask bits of a tile at once, and at 2048 elements on 4
# warps it kept 8 bytes on the stack (bf16, dropout, sm_90, triton 3.6) and needed up to 166 registers, at which
# only 3 of its 4 programs per SM fit at once; at 1024 it needs 70-80 (8 warps on 2048 also avoid the stack but
# need 105-116). It runs 4 programs per SM (enough partial d weight rows to fill the GPU, few enough that their sum
# is cheap). Checked with `python -m bench.compile_report --filter add_ln`: no spills at C = 768 on sm_80 and sm_90.
_BWD_PROGRAMS_PER_SM = 4
# (BLOCK_P, BLOCK_C) of the kernel that sums the backward's partial d weight / d bias rows (16 fp32 per thread and
# tensor on 4 warps). Its time is load latency, one round trip per loop trip: at (32, 64), 12 programs at C = 768
# each walked the 528 partial rows of an H200 in 17 trips, 23 us per call (0.56 ms of the step's 24 calls,
# bench/results/nvidia-h200/e2e); at (128, 16), 48 programs take 5 trips each.
_PARAM_GRADS_TILE = (128, 16)
# The interpreter runs each program, and each tile a program visits, in Python, at a cost per tile: forward tiles
# of at least 8 rows (2 made the model's dropout test spend 136 s in 64 programs per call), backward tiles of at
# least 2 rows in 3 programs, both larger for many rows (interpreter_rows). The kernel tests' shapes still run
# several programs, several tiles per program, a partial tile and more than one partial d weight row.
_INTERPRETER_PROGRAMS = 3


def _gpu_tile(block_c, backward=False):
    elements, per_thread = (1024, 8) if backward else (2048, 16)
    rows = max(1, elements // block_c)
    return rows, min(16, max(4, rows * block_c // (32 * per_thread)))


def _config_for(device, block_c, n_rows):
    """{"fwd": (BLOCK_R, num_warps), "bwd": (BLOCK_R, num_warps), "programs": the most backward programs}."""
    if device.type != "cuda":
        return dict(fwd=(interpreter_rows(n_rows, block_c, 8, 4), 1), bwd=(interpreter_rows(n_rows, block_c, 2, 8), 1),
                    programs=_INTERPRETER_PROGRAMS)
    return _gpu_config(device, block_c)


@functools.cache
def _gpu_config(device, block_c):
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return dict(fwd=_gpu_tile(block_c), bwd=_gpu_tile(block_c, backward=True), programs=_BWD_PROGRAMS_PER_SM * sms)


def _block_c(C):
    return max(16, next_power_of_2(C))  # dropout draws come in groups of 8 columns


def _compile_specs():
    """COMPILE_SPECS for bench.compile_report (format in its docstring): both kernels at GPT-1's C = 768 with bias
    and a bf16 branch copy (as the model runs them), in the GPU configuration, for bf16 x and h (bf16 weights) and
    for an fp32 residual x with bf16 h (fp32 weights, torch.autocast), each with dropout (the training case) and
    without (SEED None); and the mask kernel."""
    C, block_c = 768, _block_c(768)
    specs = []
    for x_t, h_t, w_t in (("bf16", "bf16", "bf16"), ("fp32", "bf16", "fp32")):
        y_t = "fp32" if "fp32" in (x_t, h_t) else x_t
        for dropout in (True, False):
            common = dict(SEED="*i64:16", DROP_THRESHOLD="i32", DROPOUT_SCALE="fp32", C="i32:16", N="i32")
            fwd = dict(X=f"*{x_t}:16", H=f"*{h_t}:16", W=f"*{w_t}:16", B=f"*{w_t}:16", Y=f"*{y_t}:16",
                       Y_BRANCH="*bf16:16", MEAN="*fp32:16", RSTD="*fp32:16", eps="fp32", stride_x="i32:16",
                       stride_h="i32:16", **common)
            bwd = dict(X=f"*{x_t}:16", H=f"*{h_t}:16", W=f"*{w_t}:16", DY=f"*{y_t}:16", DY_BRANCH="*bf16:16",
                       DX=f"*{x_t}:16", DH=f"*{h_t}:16", DW_PART="*fp32:16", DB_PART="*fp32:16", MEAN="*fp32:16",
                       RSTD="*fp32:16", stride_x="i32:16", stride_h="i32:16", stride_dy="i32:16",
                       stride_dyb="i32:16", rows_per_program="i32", **common)
            for kind, fn, sig, flags in (("fwd", _add_ln_fwd_kernel, fwd, dict(HAS_BRANCH=True)),
                                         ("bwd", _add_ln_bwd_kernel, bwd, dict(HAS_DY=True, HAS_DY_BRANCH=True))):
                block_r, num_warps = _gpu_tile(block_c, backward=kind == "bwd")
                consts = dict(BLOCK_R=block_r, BLOCK_C=block_c, DROPOUT=dropout, HAS_BIAS=True, RTNE_BF16=False,
                              **flags)
                if not dropout:
                    del sig["SEED"]
                    consts.update(SEED=None)
                name = f"add_ln_{kind} C={C} x {x_t} h {h_t}{' dropout' if dropout else ''}"
                specs.append(dict(name=name, fn=fn, signature=sig, constexprs=consts, num_warps=num_warps,
                                  num_stages=1))
    block_p, block_pc = _PARAM_GRADS_TILE
    for w_t in ("bf16", "fp32"):
        specs.append(dict(name=f"add_ln_param_grads C={C} {w_t}", fn=_add_ln_param_grads_kernel,
                          signature=dict(DW_PART="*fp32:16", DB_PART="*fp32:16", DW=f"*{w_t}:16", DB=f"*{w_t}:16",
                                         n_parts="i32", C="i32:16"),
                          constexprs=dict(BLOCK_P=block_p, BLOCK_C=block_pc, HAS_BIAS=True, RTNE_BF16=False),
                          num_warps=4, num_stages=1))
    specs.append(dict(name=f"add_ln_dropout_mask C={C}", fn=_add_ln_dropout_mask_kernel,
                      signature=dict(MASK="*u8:16", SEED="*i64:16", DROP_THRESHOLD="i32", N="i32", C="i32:16"),
                      constexprs=dict(BLOCK_R=2, BLOCK_C=block_c), num_warps=4, num_stages=1))
    return specs


COMPILE_SPECS = _compile_specs()


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------


def _fail(message, exc=ValueError):
    raise exc(f"fused_add_dropout_layer_norm: {message}")


def _check_inputs(x, h, weight, bias, dropout_p):
    check_tensors("fused_add_dropout_layer_norm: ", x=x, h=h, weight=weight, bias=bias)
    for name, t in (("x", x), ("h", h), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in DTYPES:
            _fail(f"{name} dtype {t.dtype} is not supported (use float16, bfloat16 or float32)", TypeError)
    if x.dim() == 0 or x.shape != h.shape:
        _fail(f"x and h must have the same shape (..., C), got {tuple(x.shape)} and {tuple(h.shape)}")
    C = x.shape[-1]
    if not 1 <= C <= MAX_C:
        _fail(f"C = {C} is not supported (1 <= C <= {MAX_C})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (C,):
            _fail(f"{name} must have shape ({C},), got {tuple(t.shape)}")
    devices = [t.device for t in (x, h, weight, bias) if t is not None]
    if len(set(devices)) > 1:
        _fail(f"x, h, weight, bias must be on the same device, got {', '.join(map(str, devices))}")
    if not is_number(dropout_p) or not 0.0 <= dropout_p < 1.0:
        _fail(f"dropout_p must be a number in [0, 1), got {dropout_p}")


def _check_eps(eps):
    if not is_number(eps) or not 0.0 < eps < math.inf:
        _fail(f"eps must be a positive finite number, got {eps}")


def add_dropout_layer_norm_forward(x, h, weight, bias=None, *, dropout_p=0.0, eps=1e-5, seed=0):
    """(y, mean, rstd): y = layer_norm(x + dropout(h)) of x's shape in promote_types(x.dtype, h.dtype); mean and
    rstd (fp32, x.shape[:-1]) for the backward. seed: an int or a 1-element int64 tensor on x's device (see
    new_dropout_seed); read only when dropout_p > 0."""
    _check_inputs(x, h, weight, bias, dropout_p)
    _check_eps(eps)
    y, _, mean, rstd = _forward(x, h, weight, bias, seed_tensor(seed, x.device) if dropout_p > 0.0 else None,
                                dropout_p, eps)
    return y, mean, rstd


def _forward(x, h, weight, bias, seed, dropout_p, eps, branch_dtype=None):
    """(y, y_branch, mean, rstd); y_branch (y in branch_dtype) is None without a branch_dtype."""
    weight, bias = unit_stride(weight), unit_stride(bias)
    C = x.shape[-1]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, h.dtype), device=x.device)
    y_branch = torch.empty(x.shape, dtype=branch_dtype, device=x.device) if branch_dtype is not None else None
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    N = mean.numel()
    if N == 0:
        return y, y_branch, mean, rstd
    x2, h2, block_c = as_rows(x), as_rows(h), _block_c(C)
    block_r, num_warps = _config_for(x.device, block_c, N)["fwd"]
    launchable(_add_ln_fwd_kernel, x2)[(cdiv(N, block_r),)](
        x2, h2, weight, bias, y, y_branch, mean, rstd, seed, *dropout_args(dropout_p), eps, x2.stride(0),
        h2.stride(0), N, C, BLOCK_R=block_r, BLOCK_C=block_c, DROPOUT=dropout_p > 0.0, HAS_BIAS=bias is not None,
        HAS_BRANCH=y_branch is not None, RTNE_BF16=INTERPRET, num_warps=num_warps)
    return y, y_branch, mean, rstd


def add_dropout_layer_norm_backward(dy, x, h, weight, bias, mean, rstd, *, dropout_p=0.0, seed=0):
    """(dx, dh, dweight, dbias) in the dtypes of x, h, weight, bias (dbias None without bias), given the output
    gradient dy and the forward's mean and rstd. seed and dropout_p must be the forward's: the keep-mask is
    drawn again from them."""
    _check_inputs(x, h, weight, bias, dropout_p)
    seed = seed_tensor(seed, x.device) if dropout_p > 0.0 else None
    dx, dh, dweight, dbias = _backward(dy, None, x, h, weight, bias, mean, rstd, seed, dropout_p)
    return dx, dh, dweight, dbias if bias is not None else None


def _backward(dy, dy_branch, x, h, weight, bias, mean, rstd, seed, dropout_p):
    """(dx, dh, dweight, dbias), dbias an empty tensor without bias (contiguous, in the inputs' dtypes). The
    output's gradient is dy + dy_branch, either of them None where that output got no gradient."""
    weight, bias = unit_stride(weight), unit_stride(bias)
    C = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    N = dx.numel() // C
    cfg = _config_for(x.device, _block_c(C), N)
    block_r, num_warps = cfg["bwd"]
    rows_per_program = cdiv(cdiv(max(N, 1), cfg["programs"]), block_r) * block_r
    n_programs = cdiv(N, rows_per_program)
    # every program writes its whole partial row(s); no program is empty
    dw_part = torch.empty((n_programs, C), dtype=torch.float32, device=x.device)
    db_part = torch.empty((n_programs if bias is not None else 0, C), dtype=torch.float32, device=x.device)
    if N:
        x2, h2 = as_rows(x), as_rows(h)
        dy2 = as_rows(dy) if dy is not None else None
        dyb2 = as_rows(dy_branch) if dy_branch is not None else None
        launchable(_add_ln_bwd_kernel, x2)[(n_programs,)](
            x2, h2, weight, dy2, dyb2, dx, dh, dw_part, db_part, mean, rstd, seed, *dropout_args(dropout_p),
            x2.stride(0), h2.stride(0), dy2.stride(0) if dy2 is not None else 0,
            dyb2.stride(0) if dyb2 is not None else 0, N, C, rows_per_program, BLOCK_R=block_r,
            BLOCK_C=_block_c(C), DROPOUT=dropout_p > 0.0, HAS_BIAS=bias is not None, HAS_DY=dy2 is not None,
            HAS_DY_BRANCH=dyb2 is not None, RTNE_BF16=INTERPRET, num_warps=num_warps)
    dweight = torch.empty(C, dtype=weight.dtype, device=x.device)
    dbias = torch.empty(C, dtype=bias.dtype, device=x.device) if bias is not None else weight.new_empty((0,))
    parts_tile, cols_tile = _PARAM_GRADS_TILE
    launchable(_add_ln_param_grads_kernel, dw_part)[(cdiv(C, cols_tile),)](
        dw_part, db_part, dweight, dbias, n_programs, C, BLOCK_P=parts_tile, BLOCK_C=cols_tile,
        HAS_BIAS=bias is not None, RTNE_BF16=INTERPRET, num_warps=4)
    return dx, dh, dweight, dbias


def add_dropout_layer_norm_mask(seed, n_rows, C, p, device="cpu"):
    """The boolean keep-mask (n_rows, C) (True = kept) that the kernels draw for this seed (an int or the kernels'
    1-element int64 tensor) and dropout probability p, for replaying in
    `kernels.reference.add_dropout_layer_norm(..., dropout_mask=mask)` (reshaped to the inputs' shape)."""
    seed = seed_tensor(seed, torch.device(device))
    mask = torch.empty((n_rows, C), dtype=torch.uint8, device=seed.device)
    if mask.numel():
        block_c = _block_c(C)
        _add_ln_dropout_mask_kernel[(cdiv(n_rows, 2),)](mask, seed, dropout_args(p)[0], n_rows, C,
                                                               BLOCK_R=2, BLOCK_C=block_c)
    return mask.bool()


# ----------------------------------------------------------------------------------------------------
# Operators and autograd
# ----------------------------------------------------------------------------------------------------


@kernel_op("gpt1_kernels::add_dropout_layer_norm")
def add_dropout_layer_norm_op(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              seed: Optional[torch.Tensor], dropout_p: float, eps: float,
                              branch_dtype: Optional[torch.dtype] = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, y_branch, mean, rstd) of the forward kernel, y_branch an empty tensor without a branch_dtype (an
    operator cannot return None); differentiable in x, h, weight, bias (the backward is
    add_dropout_layer_norm_backward_op)."""
    y, y_branch, mean, rstd = _forward(x, h, weight, bias, seed, dropout_p, eps, branch_dtype)
    return y, y_branch if y_branch is not None else y.new_empty((0,)), mean, rstd


@add_dropout_layer_norm_op.register_fake
def _(x, h, weight, bias, seed, dropout_p, eps, branch_dtype=None):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, h.dtype))
    y_branch = x.new_empty(x.shape, dtype=branch_dtype) if branch_dtype is not None else y.new_empty((0,))
    return y, y_branch, stats, torch.empty_like(stats)


@kernel_op("gpt1_kernels::add_dropout_layer_norm_backward")
def add_dropout_layer_norm_backward_op(dy: Optional[torch.Tensor], dy_branch: Optional[torch.Tensor],
                                       x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                                       bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                                       seed: Optional[torch.Tensor], dropout_p: float
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dh, dweight, dbias), contiguous, in the dtypes of x, h, weight, bias, for the output gradient
    dy + dy_branch (either may be None); dbias is an empty tensor of weight's dtype without bias."""
    return _backward(dy, dy_branch, x, h, weight, bias, mean, rstd, seed, dropout_p)


@add_dropout_layer_norm_backward_op.register_fake
def _(dy, dy_branch, x, h, weight, bias, mean, rstd, seed, dropout_p):
    dbias = bias.new_empty(bias.shape) if bias is not None else weight.new_empty((0,))
    return x.new_empty(x.shape), h.new_empty(h.shape), weight.new_empty(weight.shape), dbias


def _setup_context(ctx, inputs, output):
    x, h, weight, bias, seed, dropout_p, _eps, branch_dtype = inputs
    _, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an output without a gradient is not read (dy or dy_branch None)
    ctx.save_for_backward(x, h, weight, bias, mean, rstd, seed)
    ctx.dropout_p, ctx.branch = dropout_p, branch_dtype is not None


@first_order("fused_add_dropout_layer_norm")
def _op_backward(ctx, dy, dy_branch, _dmean, _drstd):
    x, h, weight, bias, mean, rstd, seed = ctx.saved_tensors
    dx, dh, dweight, dbias = add_dropout_layer_norm_backward_op(dy, dy_branch if ctx.branch else None, x, h, weight,
                                                                bias, mean, rstd, seed, ctx.dropout_p)
    return dx, dh, dweight, dbias if bias is not None else None, None, None, None, None


add_dropout_layer_norm_op.register_autograd(_op_backward, setup_context=_setup_context)


class AddDropoutLayerNormFunction(torch.autograd.Function):
    """The eager path: the launchers the operators wrap, without a custom op's dispatcher round trip. Returns y,
    or (y, y_branch) with a branch_dtype; an output that gets no gradient is not read as zeros."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, seed, dropout_p, eps, branch_dtype):
        y, y_branch, mean, rstd = _forward(x, h, weight, bias, seed, dropout_p, eps, branch_dtype)
        ctx.save_for_backward(x, h, weight, bias, mean, rstd, seed)
        ctx.dropout_p = dropout_p
        ctx.set_materialize_grads(False)
        return y if y_branch is None else (y, y_branch)

    @staticmethod
    @first_order("fused_add_dropout_layer_norm")
    def backward(ctx, dy, dy_branch=None):
        x, h, weight, bias, mean, rstd, seed = ctx.saved_tensors
        dx, dh, dweight, dbias = _backward(dy, dy_branch, x, h, weight, bias, mean, rstd, seed, ctx.dropout_p)
        return dx, dh, dweight, dbias if bias is not None else None, None, None, None, None


def fused_add_dropout_layer_norm(x, h, weight, bias=None, *, dropout_p=0.0, eps=1e-5, branch_dtype=None,
                                 residual_in_fp32=True, _seed=None):
    """layer_norm(x + dropout(h, dropout_p), (C,), weight, bias, eps) for (..., C) tensors, in one kernel each way;
    same signature and result as `kernels.reference.add_dropout_layer_norm` (with the keep-mask drawn here).

    branch_dtype: also return the output rounded to that dtype, as (y, y_branch). A post-LN block's output feeds
    both the next residual add (y, in the residual stream's dtype) and the next sublayer (y_branch, in its compute
    dtype: bf16 under torch.autocast); the backward then adds the two gradients inside its kernel, where autograd
    would add them in a kernel of its own (one more pass over an (N, C) fp32 tensor per LayerNorm), and the
    sublayer needs no cast.

    residual_in_fp32 matters under torch.autocast only. True (the default) does what autocast's own layer_norm
    does: a 16-bit x is read as fp32 and y is fp32, so the residual stream stays fp32. False keeps y in
    promote_types(x.dtype, h.dtype) as without autocast: with a 16-bit x and h the residual stream is 16-bit,
    as Megatron-LM and flash-attention's fused add-LayerNorm keep it by default, and the kernels move half the
    bytes (the sum x + dropout(h) and the statistics are fp32 either way; only the stored y is rounded).
    `_seed` (tests only; an int or a 1-element int64 tensor) fixes the dropout seed; by default one is drawn on
    x's device when dropout_p > 0 (new_dropout_seed)."""
    _check_inputs(x, h, weight, bias, dropout_p)
    _check_eps(eps)
    if branch_dtype is not None and branch_dtype not in DTYPES:
        _fail(f"branch_dtype {branch_dtype} is not supported (use float16, bfloat16 or float32)", TypeError)
    if residual_in_fp32 and x.dtype != torch.float32 and torch.is_autocast_enabled(x.device.type):
        x = x.float()  # autocast's layer_norm output is fp32 (the residual stream it feeds stays fp32)
    dropout_p, eps = float(dropout_p), float(eps)
    seed = None
    if dropout_p > 0.0:
        seed = seed_tensor(_seed, x.device) if _seed is not None else new_dropout_seed(x.device)
    if torch.compiler.is_compiling():
        y, y_branch, _, _ = add_dropout_layer_norm_op(x, h, weight, bias, seed, dropout_p, eps, branch_dtype)
        return y if branch_dtype is None else (y, y_branch)
    return AddDropoutLayerNormFunction.apply(x, h, weight, bias, seed, dropout_p, eps, branch_dtype)
