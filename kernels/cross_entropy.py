"""Fused softmax cross-entropy and fused linear cross-entropy in Triton.

Algorithm (the idea of Liger-Kernel's cross-entropy, written anew here): one program per row of the
(N, V) logits makes two passes over the row in blocks of BLOCK_V columns. The first keeps an online
max and sum of exponentials in fp32 (as in online softmax / FlashAttention) per lane, a thread's 16 bytes of
each block: the lane's max of the block, then one exp per element against it and one per lane to rescale
the sum. The lanes combine once at the end of the row: no reduction across threads, so no barrier, inside
the loop. It gives the log-sum-exp, the loss and, for label smoothing, the sum of the logits. The second
rewrites the row with the gradient of the loss, d loss / d x_j = scale * (softmax_j - (1 - eps) [j == y] -
eps / V), computed in fp32 and rounded to the logits dtype only at the store (the true-class term is not
rounded first): scale * (softmax_j - eps / V) for every class, then, after a barrier, the target's own
value stored over its column. Both passes stop at the last class (padding columns get zeros apart), so no
element's work depends on its column: 71 + 70 SASS instructions per block of 4096 bf16 columns on sm_90,
against 120 + 131 with per-element class and target tests.
The gradient goes INTO the logits buffer, so no second N x V tensor exists; the backward only scales
it, in place, by the incoming gradient, and each of its programs returns at once when that factor is exactly 1
(loss.backward() on a bf16 or fp32 mean): tested on the device, so no host sync. Rows are walked in
16-byte groups whatever V is (_row_segments), so that the passes move 16 bytes per access, UNROLL blocks at a
time with all their loads issued first (_tie_blocks); the launch of long rows comes from a measured table
(_long_row_config). That table may instead say UNROLL "row": the program then loads its whole row at once into
registers and makes both passes there (_resident_row), so the logits are read from memory once, not twice (the
second streaming pass hits L2 only while the rows in flight fit in it); a 16-bit row stays as loaded, two logits to
a register, so that two 8-warp programs per SM hold a bf16 row of GPT-1's vocabulary each.

fused_linear_cross_entropy never builds the full logits: it walks the tokens in chunks, computes a
chunk's logits with one matmul, runs the kernel on them in place and turns the chunk's gradient into
d hidden (a matmul with the weight) and d weight / d bias (accumulated) before the next chunk, all
three in fp32. All of that happens in the forward; the backward scales the stored gradients and rounds
them to the inputs' dtype, once (a 16-bit d hidden rounded in the forward and again after the scaling
had up to 2.2x eager's error). The chunk size follows a memory budget (see _default_chunk_size).

Dtypes: logits / hidden / weight in fp32, bf16 or fp16; target int64; the loss is fp32. Label
smoothing follows torch.nn.functional.cross_entropy: loss = (1 - eps) nll + eps mean_j(-log p_j).
A row whose target is ignore_index has loss 0 and a zero gradient; the mean is over the other rows
and is 0 (not NaN) when every row is ignored.

Operators (torch.library custom ops in the gpt1_kernels namespace, with fake implementations, so that
torch.compile(fullgraph=True) traces all three functions, forward and backward, without a graph break; opaque to
Inductor also under kernels.set_inline(True), unlike the other kernel files' operators: the linear cross-entropy's
chunk loop writes one logits buffer and the d weight accumulator in place, chunk after chunk, through out=
matmuls, which traced into the graph would become a new buffer per chunk, and it decides once, with a host sync,
whether the GPU's baddbmm accumulates in fp32):
- cross_entropy_(logits!, target, grad_scale, ignore_index, label_smoothing) -> loss rows: declared as
  mutating its logits, which it overwrites with the gradient; cross_entropy_scale_grad_(grad!, grad_output,
  post_scale) scales that gradient in place; cross_entropy_loss(...) is the no-gradient variant, which
  leaves the logits alone. register_autograd refuses mutating ops, so CrossEntropyFunction (an
  autograd.Function that Dynamo traces) calls the first two. In eager mode the declared mutation bumps the
  logits' autograd version (see below) and nothing is copied. Under torch.compile, AOTAutograd
  functionalizes the mutation (the graph sees a new tensor, so no silent aliasing), and Inductor's
  re-inplacing writes it back into the same buffer when nothing else reads the logits.
- linear_cross_entropy(hidden, weight, target, bias?, ..., need_hidden, need_weight, need_bias) ->
  (loss, d hidden, d weight, d bias, post_scale), all fp32, differentiable via register_autograd, whose
  backward scales the gradients computed in the forward. A gradient whose need flag is off (the input does
  not require grad, or grad mode is off) is an empty (0,) tensor, as an op cannot return None.
  linear_cross_entropy_backward(...) is the recomputing backward of reduction="none".
The count of valid targets, the 1 / n of the mean and the fp16 power-of-two factors are device scalars
that the kernels read through pointers: no value goes through the host.

Limits and side effects:
- fused_cross_entropy OVERWRITES its input logits with the (unscaled) gradient when the logits
  require grad: do not read them after the call. The call bumps the tensor's autograd version, so an
  earlier op that saved these logits for its own backward raises autograd's in-place error instead
  of silently using the gradient. Gradients are returned in the buffer itself (logits that are a leaf get it
  as their .grad, not a copy: the backward returns a fresh alias, which autograd's accumulation keeps as it
  is), so a second backward through the same graph (retain_graph=True) is not supported.
- Bad targets (outside [0, V) and not ignore_index). Eager mode: ValueError before any kernel runs; the
  check costs one reduction and one host sync per call (the only one). Under torch.compile nothing is
  checked on the host (a data-dependent check would be a graph break or a sync): the kernel gives such a
  row a NaN loss (so a mean loss is NaN) and a NaN gradient row, and never reads out of bounds.
- fp16: the 1 / n_valid factor of the mean is not folded into the stored fp16 gradient (p_j / n
  would underflow fp16 for most classes at GPT-1 batch sizes). The kernel stores the gradient times
  2^k / n_valid, in [1, 2) (2 when n_valid <= 1), and the backward multiplies by 2^-k and the loss scale
  in fp32, which is exact (one rounding in all) when the loss scale is a power of two. bf16 and fp32 fold
  1 / n_valid in the kernel.
- The in-place design rounds a 16-bit gradient twice when the incoming gradient is not a power of two (a
  loss divided by 3 for gradient accumulation): once at the kernel's store, once at the backward's scaling,
  up to ~1 ulp where eager's one rounding is half an ulp (measured on bf16 and fp16 rows, N=64, V=1000). The
  linear cross-entropy keeps its gradients in fp32 until the scaling and rounds once.
- Logits whose rows overlap in memory (an expanded row, an as_strided window) or whose columns are not
  contiguous get a contiguous copy, which then holds the gradient: the kernel must not write a row that
  another program reads.
- V = 0 (no classes) is admitted as torch admits it: every target must then be ignored; the loss is 0.
- fused_linear_cross_entropy with reduction="none" cannot fold the per-row incoming gradient into
  d weight during the forward, so it computes only the loss there and recomputes the chunks in the
  backward (twice the matmuls).
- Under torch.compile the options (ignore_index, label_smoothing, reduction, chunk_size) are graph constants.
- No double backward, in either function: create_graph=True raises (kernels._common.first_order).
"""

import functools
import math
import os
from itertools import repeat
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._common import (
    INTERPRET,
    LOG2E,
    TUNED_ARCHS,
    autocast_inputs,
    check_tensors,
    first_order,
    is_number,
    next_power_of_2,
    read_tuned_json,
    round_fp32,
)

_REDUCTIONS = ("mean", "sum", "none")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One row per program of 16 warps, each thread loading 16 bytes per block (4096 bf16 / 2048 fp32 columns):
# 31-40 registers (sm_80, sm_90), so three or four programs (1536-2048 threads) share an SM. The kernel is bound
# by the bytes its loads have in flight, which that occupancy sets. At 32 warps over 8192 columns (Liger-Kernel's
# choice, and ours until the H200 run of d6fcf61: 182 us per 1920 x 40478 bf16 chunk of the linear cross-entropy,
# ~40% of the copy rate) 49-64 registers left one 1024-thread program per SM. Shorter rows get fewer warps
# (_row_config).
_NUM_WARPS = 16
_BYTES_PER_THREAD = 16
# The measured table (kernels/cross_entropy_tuned.json, written by `python -m bench.tune_cross_entropy` on a GPU and
# committed): per (arch, element size) the (num_warps, UNROLL) of rows at least one full block long, where one beat
# (_NUM_WARPS, 1) there. UNROLL blocks' loads are issued before any of them is used (1, 2 or 4 16-byte loads a thread
# in flight, for more registers): the lanes and the order in which each folds its columns stay, so the results do
# too, bit for bit. num_warps sets the lanes (BLOCK_V) and how many programs share an SM: it changes the fp32
# summation order of a row's statistics, so results may differ in the last bits from one width to another.
_TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cross_entropy_tuned.json")
# UNROLL "row": the whole row's loads in flight at once and the row kept in registers, read once (_resident_row),
# where it fits in a thread's registers (_resident_budget); a longer row streams with UNROLL 1.
ROW = "row"
UNROLLS = (1, 2, 4, ROW)
_RESIDENT_REGS = 80
# Device memory fused_linear_cross_entropy may allocate at once, all its buffers together (see _default_chunk_size).
_EXTRA_BYTES = 400 * 1024 * 1024
_MIN_CHUNK_ROWS = 1024
# 16-bit d weight goes through an fp32 buffer of this many classes at a time (see _chunk_grads)
_DW_SLICE = 8192
_CHUNK_ALIGN = 128  # default chunks are whole multiples of this many rows
# fused_linear_cross_entropy pads the vocabulary to a multiple of this (see linear_cross_entropy_chunks):
# 64 classes are 128 bytes in bf16, so each padded logits row starts on its own cache line.
_VOCAB_ALIGN = 64


@triton.jit
def _row_segments(start, row_len, ALIGN: tl.constexpr):
    """The row at element offsets [start, end = start + row_len) of a 16-byte aligned buffer, split at the
    16-byte boundaries inside it: (head_end, body_end, end) with a head [start, min(head_end, end)) and a tail
    [body_end, end) each shorter than ALIGN (the elements in 16 bytes) and a body [head_end, body_end) of whole
    16-byte groups (empty in a row shorter than that). A row of V = 40478 bf16 columns starts 12 bytes past a
    boundary every other row: only accesses whose offsets and bounds Triton can prove multiples of ALIGN, the
    body's, compile to 16-byte vector loads and stores (the whole row as one masked range stays in 2-byte
    ones). head_end and body_end are built from // ALIGN * ALIGN and a max alone, which Triton's analysis
    follows; clamping head_end to end with a min would lose that."""
    end = start + row_len
    head_end = (start + ALIGN - 1) // ALIGN * ALIGN
    body_end = tl.maximum(end // ALIGN * ALIGN, head_end)
    return head_end, body_end, end


@triton.jit
def _segment_lengths(start, head_end, body_end, end):
    """(head_len, body_len, tail_first) of _row_segments' split, int32: the head's and the body's lengths (the
    body's first column is head_len) and the tail's first column. Offsets within a segment are then int32 from 0,
    and whether one is a class or the target a comparison with a scalar, not a column index per element."""
    head_len = (tl.minimum(head_end, end) - start).to(tl.int32)
    return head_len, (body_end - head_end).to(tl.int32), (body_end - start).to(tl.int32)


@triton.jit
def _load_block(PTR, offs, mask):
    """PTR[offs] where mask, -inf elsewhere, in the logits' own dtype (a 16-bit block holds half the registers)."""
    return tl.load(PTR + offs, mask=mask, other=float("-inf"))


@triton.jit
def _load_blocks(PTR, offs, n, BLOCK_V: tl.constexpr, UNROLL: tl.constexpr):
    """UNROLL (1, 2 or 4) consecutive blocks PTR[offs + u * BLOCK_V] (where < n, -inf elsewhere), all loads in flight
    before any is used; the blocks past UNROLL are the first one again (unread). Loading them together is not enough:
    ptxas sinks each load to its first use, so the blocks come back tied to one another (_tie_blocks)."""
    tl.static_assert((UNROLL == 1) | (UNROLL == 2) | (UNROLL == 4), "UNROLL must be 1, 2 or 4")
    x0 = _load_block(PTR, offs, offs < n)
    x1 = x0
    x2 = x0
    x3 = x0
    if UNROLL >= 2:
        x1 = _load_block(PTR, offs + BLOCK_V, offs + BLOCK_V < n)
    if UNROLL == 4:
        x2 = _load_block(PTR, offs + 2 * BLOCK_V, offs + 2 * BLOCK_V < n)
        x3 = _load_block(PTR, offs + 3 * BLOCK_V, offs + 3 * BLOCK_V < n)
    if UNROLL > 1:
        x0, x1, x2, x3 = _tie_blocks(x0, x1, x2, x3, UNROLL)
    return x0, x1, x2, x3


@triton.jit
def _tie_blocks(x0, x1, x2, x3, UNROLL: tl.constexpr):
    """The UNROLL (2 or 4) blocks, each through min(x, the blocks' elementwise max): the same values bit for bit
    (NaN stays NaN: both propagate it), but each now depends on every block's load, which ptxas must therefore issue
    before the first computation on any of them. Without it ptxas sinks each load to its block's computation, and
    only one is in flight at a time (as it also sank a prefetch into the next loop trip). Two cheap ALU operations
    an element, no exp."""
    top = tl.maximum(x0, x1, propagate_nan=tl.PropagateNan.ALL)
    if UNROLL == 4:
        top = tl.maximum(top, tl.maximum(x2, x3, propagate_nan=tl.PropagateNan.ALL), propagate_nan=tl.PropagateNan.ALL)
    x0 = tl.minimum(x0, top, propagate_nan=tl.PropagateNan.ALL)
    x1 = tl.minimum(x1, top, propagate_nan=tl.PropagateNan.ALL)
    if UNROLL == 4:
        x2 = tl.minimum(x2, top, propagate_nan=tl.PropagateNan.ALL)
        x3 = tl.minimum(x3, top, propagate_nan=tl.PropagateNan.ALL)
    return x0, x1, x2, x3


@triton.jit
def _fold_lanes(x, mask, m, d, x_sum, SMOOTHING: tl.constexpr):
    """Fold the block x, (lanes, ALIGN) classes where mask and -inf elsewhere, into per-lane running statistics:
    each lane (a thread's 16 bytes of the block: the ALIGN elements of a row of x) keeps a max m and a sum of
    exp(x - m) d, and if SMOOTHING the row's sum of x (a scalar) grows. The lane's max of the block first, then one
    exp per element against the new max and one per lane to rescale d: all within the thread (axis 1), no reduction
    across threads (one per row, at the end, in _row_stats). A lane that has seen no class keeps m = -inf, d = 0
    (its exponentials are taken against 0 then: a -inf logit adds exp(-inf) = 0); a NaN makes its lane's d NaN, and
    with it the row's loss. The sum of x is reduced per block: as a third lane statistic it spilled at 32 warps (64
    registers a thread) on sm_90 when that was the launch, and GPT-1 pre-trains without smoothing."""
    x = x.to(tl.float32)
    m_new = tl.maximum(m, tl.max(x, axis=1))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    # subtract before scaling by log2(e): x - ref is exact near the max even for |x| ~ 1e4
    d = d * tl.exp2((m - ref) * LOG2E) + tl.sum(tl.exp2((x - ref[:, None]) * LOG2E), axis=1)
    if SMOOTHING:  # a masked class (-inf) makes the sum -inf: by column, not by value
        x_sum += tl.sum(tl.sum(tl.where(mask, x, 0.0), axis=1), axis=0)
    return m_new, d, x_sum


@triton.jit
def _lane_offsets(base, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr):
    """The (BLOCK_V // ALIGN, ALIGN) offsets base + r * ALIGN + c of a block: row r is one thread's 16 bytes, its
    lane (_fold_lanes)."""
    return base + tl.arange(0, BLOCK_V // ALIGN)[:, None] * ALIGN + tl.arange(0, ALIGN)[None, :]


@triton.jit
def _lane_lse(m, d, row_m):
    """sum over lanes of d * exp(m - row_m): each lane's sum of exponentials rescaled to the row's max (a lane
    that saw no class, d = 0, adds 0 even where m - row_m is -inf - -inf; a NaN d stays NaN)."""
    return tl.sum(tl.where(d == 0.0, 0.0, d * tl.exp2((m - row_m) * LOG2E)), axis=0)


@triton.jit
def _row_stats(LOGITS, start, n_cols, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, UNROLL: tl.constexpr,
               SMOOTHING: tl.constexpr):
    """One pass over the classes LOGITS[start : start + n_cols]: their max m, sum of exp(x - m), and sum of x
    (for label smoothing; 0 without SMOOTHING). The loop keeps BLOCK_V // ALIGN lanes of running statistics, one
    per thread (_fold_lanes), and the head and tail a lane each; the lanes are combined once, after the loop:
    without smoothing the loop has no reduction across the program's threads, hence no barrier, and its loads wait
    on nothing but themselves. The kernel's speed is the bytes its loads have in flight: one 16-byte load per
    thread and block, so the programs that fit on an SM at once set it (_NUM_WARPS)."""
    head_end, body_end, end = _row_segments(start, n_cols, ALIGN)
    head_len, body_len, tail_first = _segment_lengths(start, head_end, body_end, end)
    edge = _lane_offsets(0, ALIGN, ALIGN)  # (1, ALIGN): one lane
    m_e = tl.full([1], float("-inf"), tl.float32)
    d_e = tl.zeros([1], dtype=tl.float32)
    x_sum = tl.zeros([], dtype=tl.float32)
    head = edge < head_len
    m_e, d_e, x_sum = _fold_lanes(_load_block(LOGITS + start, edge, head), head, m_e, d_e, x_sum, SMOOTHING)
    tail = edge < n_cols - tail_first
    m_e, d_e, x_sum = _fold_lanes(_load_block(LOGITS + body_end, edge, tail), tail, m_e, d_e, x_sum, SMOOTHING)
    m_v = tl.full([BLOCK_V // ALIGN], float("-inf"), tl.float32)
    d_v = tl.zeros([BLOCK_V // ALIGN], dtype=tl.float32)
    BODY = LOGITS + head_end
    for k in range(0, body_len, BLOCK_V * UNROLL):
        offs = _lane_offsets(k, BLOCK_V, ALIGN)
        # UNROLL 16-byte loads a thread in flight; each lane folds its columns in the same order whatever UNROLL is
        x0, x1, x2, x3 = _load_blocks(BODY, offs, body_len, BLOCK_V, UNROLL)
        m_v, d_v, x_sum = _fold_lanes(x0, offs < body_len, m_v, d_v, x_sum, SMOOTHING)
        if UNROLL >= 2:
            m_v, d_v, x_sum = _fold_lanes(x1, offs + BLOCK_V < body_len, m_v, d_v, x_sum, SMOOTHING)
        if UNROLL == 4:
            m_v, d_v, x_sum = _fold_lanes(x2, offs + 2 * BLOCK_V < body_len, m_v, d_v, x_sum, SMOOTHING)
            m_v, d_v, x_sum = _fold_lanes(x3, offs + 3 * BLOCK_V < body_len, m_v, d_v, x_sum, SMOOTHING)
    m = tl.maximum(tl.max(m_v, axis=0), tl.max(m_e, axis=0))
    return m, _lane_lse(m_v, d_v, m) + _lane_lse(m_e, d_e, m), x_sum


@triton.jit
def _rounded_grad(g, PTR, RTNE_BF16: tl.constexpr):
    """g rounded to PTR's dtype."""
    if RTNE_BF16:
        g = round_fp32(g, 16)  # the interpreter would truncate
    return g.to(PTR.dtype.element_ty)


@triton.jit
def _store_grad(PTR, g, offs, mask, RTNE_BF16: tl.constexpr):
    """PTR[offs] = g where mask, rounded to PTR's dtype."""
    tl.store(PTR + offs, _rounded_grad(g, PTR, RTNE_BF16), mask=mask)


@triton.jit
def _write_row_grad(LOGITS, start, n_cols, row_len, y, x_y, m, d, eps, scale, BLOCK_V: tl.constexpr,
                    ALIGN: tl.constexpr, UNROLL: tl.constexpr, RTNE_BF16: tl.constexpr):
    """Second pass: overwrite the classes LOGITS[start : start + n_cols] with scale * (softmax - eps / V)
    (_store_probs), UNROLL blocks at a time, all their loads in flight together (_load_blocks), then the padding and
    the target's term (_finish_grad). The walk stops at the last class, so every element loaded is a class: nothing
    per element depends on its column."""
    head_end, body_end, end = _row_segments(start, n_cols, ALIGN)
    head_len, body_len, tail_first = _segment_lengths(start, head_end, body_end, end)
    inv_d = 1.0 / d
    smooth = eps / n_cols
    edge = tl.arange(0, ALIGN)
    head = edge < head_len
    _store_probs(LOGITS + start, _load_block(LOGITS + start, edge, head), edge, head, m, inv_d, smooth, scale,
                 RTNE_BF16)
    BODY = LOGITS + head_end
    for k in range(0, body_len, BLOCK_V * UNROLL):
        offs = k + tl.arange(0, BLOCK_V)
        x0, x1, x2, x3 = _load_blocks(BODY, offs, body_len, BLOCK_V, UNROLL)
        _store_probs(BODY, x0, offs, offs < body_len, m, inv_d, smooth, scale, RTNE_BF16)
        if UNROLL >= 2:
            offs = offs + BLOCK_V
            _store_probs(BODY, x1, offs, offs < body_len, m, inv_d, smooth, scale, RTNE_BF16)
        if UNROLL == 4:
            offs = offs + BLOCK_V
            _store_probs(BODY, x2, offs, offs < body_len, m, inv_d, smooth, scale, RTNE_BF16)
            offs = offs + BLOCK_V
            _store_probs(BODY, x3, offs, offs < body_len, m, inv_d, smooth, scale, RTNE_BF16)
    tail = edge < n_cols - tail_first
    _store_probs(LOGITS + body_end, _load_block(LOGITS + body_end, edge, tail), edge, tail, m, inv_d, smooth, scale,
                 RTNE_BF16)
    _finish_grad(LOGITS, start, n_cols, row_len, y, x_y, m, inv_d, smooth, eps, scale, BLOCK_V, ALIGN, RTNE_BF16)


@triton.jit
def _store_probs(PTR, x, offs, mask, m, inv_d, smooth, scale, RTNE_BF16: tl.constexpr):
    """PTR[offs] = scale * (softmax - eps / V) of the logits x (any shape) where mask; the target's term comes after
    (_finish_grad)."""
    _store_grad(PTR, (tl.exp2((x.to(tl.float32) - m) * LOG2E) * inv_d - smooth) * scale, offs, mask, RTNE_BF16)


@triton.jit
def _finish_grad(LOGITS, start, n_cols, row_len, y, x_y, m, inv_d, smooth, eps, scale, BLOCK_V: tl.constexpr,
                 ALIGN: tl.constexpr, RTNE_BF16: tl.constexpr):
    """After the classes' scale * (softmax - eps / V): the padding [n_cols, row_len) zeroed, then the target's
    gradient, scale * (softmax_y - eps / V - (1 - eps)), stored over the one written for it. The barrier orders it
    after the row's stores, which other threads made."""
    _fill_row(LOGITS, start + n_cols, row_len - n_cols, 0.0, BLOCK_V, ALIGN)
    tl.debug_barrier()
    g_y = (tl.exp2((x_y - m) * LOG2E) * inv_d - smooth - (1.0 - eps)) * scale
    tl.store(LOGITS + start + y, _rounded_grad(g_y, LOGITS, RTNE_BF16))


@triton.jit
def _part_offsets(base, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """The (ROWS, BLOCK_V) offsets base + r * BLOCK_V + c of one part of a row held in registers: each thread holds
    the same BLOCK_V lanes of every r, so a reduction over axis 0 stays in the thread."""
    return base + tl.arange(0, ROWS)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]


@triton.jit
def _part(BODY, base, body_len, NEG_INF_WORD, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, PACKED: tl.constexpr):
    """(offsets, logits) of one part of the row's body held in registers: ROWS x BLOCK_V columns from base on,
    -inf past body_len. PACKED (16-bit logits): loaded as (ROWS, BLOCK_V // 2) 32-bit words of two logits each
    (_halves), offsets in words, NEG_INF_WORD (two -inf) past the body."""
    if PACKED:
        offs = _part_offsets(base // 2, ROWS, BLOCK_V // 2)
        x = tl.load(BODY.to(tl.pointer_type(tl.int32)) + offs, mask=offs < body_len // 2, other=NEG_INF_WORD)
    else:
        offs = _part_offsets(base, ROWS, BLOCK_V)
        x = _load_block(BODY, offs, offs < body_len)
    return offs, x


@triton.jit
def _halves(w, DTYPE: tl.constexpr):
    """The two 16-bit logits (of dtype DTYPE) of each 32-bit word w as fp32: its lower half (the lower column) and
    its upper half."""
    lo = (w & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
    hi = (w >> 16).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _part_max(x, DTYPE: tl.constexpr, PACKED: tl.constexpr):
    """Per lane (axis 0) the max of one part of the row (_part)."""
    if PACKED:
        lo, hi = _halves(x, DTYPE)
        m = tl.maximum(tl.max(lo, axis=0), tl.max(hi, axis=0))
    else:
        m = tl.max(x, axis=0).to(tl.float32)
    return m


@triton.jit
def _part_sums(x, offs, body_len, m, zero, DTYPE: tl.constexpr, PACKED: tl.constexpr, SMOOTHING: tl.constexpr):
    """Per lane (axis 0) the sum of exp(x - m) of one part of the row (_part) and, if SMOOTHING, its sum of x (by
    column: a masked class, -inf, makes it -inf; the part's offsets stay live for it, which _row_config's register
    budget counts). PACKED: the words are widened from `x | zero` (see _resident_row)."""
    if PACKED:
        lo, hi = _halves(x | zero, DTYPE)
        d = _sum_exp(lo, m) + _sum_exp(hi, m)
        x_sum = d
        if SMOOTHING:
            x_sum = _sum_where(lo, offs < body_len // 2) + _sum_where(hi, offs < body_len // 2)
    else:
        d = _sum_exp(x, m)
        x_sum = d
        if SMOOTHING:
            x_sum = _sum_where(x, offs < body_len)
    return d, x_sum


@triton.jit
def _store_part(BODY, base, offs, body_len, x, zero, m, inv_d, smooth, scale, ROWS: tl.constexpr,
                BLOCK_V: tl.constexpr, PACKED: tl.constexpr, RTNE_BF16: tl.constexpr):
    """_store_probs of one part of the row (_part). PACKED: the words widened from `x ^ zero` and the offsets made
    again from `base // 2 + zero * 16` (see _resident_row); the two gradients of a word stored as one word."""
    if PACKED:
        DTYPE: tl.constexpr = BODY.dtype.element_ty
        offs = _part_offsets(base // 2 + zero * 16, ROWS, BLOCK_V // 2)
        lo, hi = _halves(x ^ zero, DTYPE)
        lo = _rounded_grad((tl.exp2((lo - m) * LOG2E) * inv_d - smooth) * scale, BODY, RTNE_BF16)
        hi = _rounded_grad((tl.exp2((hi - m) * LOG2E) * inv_d - smooth) * scale, BODY, RTNE_BF16)
        words = (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32)
                                                                         << 16)
        tl.store(BODY.to(tl.pointer_type(tl.int32)) + offs, words, mask=offs < body_len // 2)
    else:
        _store_probs(BODY, x, offs, offs < body_len, m, inv_d, smooth, scale, RTNE_BF16)


@triton.jit
def _sum_exp(x, m):
    """Per lane (axis 0: the thread's own elements; a 1-D block: all of it) the sum of exp(x - m) in fp32; a -inf
    logit adds 0."""
    return tl.sum(tl.exp2((x.to(tl.float32) - m) * LOG2E), axis=0)


@triton.jit
def _sum_where(x, mask):
    return tl.sum(tl.where(mask, x.to(tl.float32), 0.0), axis=0)


@triton.jit
def _resident_row(LOGITS, start, n_cols, row_len, y, eps, GRAD_SCALE, ROW_SCALE, row, zero, NEG_INF_WORD,
                  BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, ROWS1: tl.constexpr, ROWS2: tl.constexpr,
                  ROWS3: tl.constexpr, COMPUTE_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                  SMOOTHING: tl.constexpr, RTNE_BF16: tl.constexpr):
    """The row read once: all its loads issued at once into registers, then its max, its sum of exponentials and
    its gradient computed from those registers. The logits cross the memory bus once each way, and the program
    has its whole row's loads in flight. Returns the loss.

    Registers: an fp32 row is held as it is. A 16-bit row's body is held as it was loaded, two logits to a 32-bit
    word (PACKED), and widened to fp32 at each of its three uses: the max from the words, the exponentials (and sums)
    from `words | zero` and the gradient from `words ^ zero`, zero a run-time 0 that the compiler cannot see through.
    Widened the same way at each use, the three would be one expression, which the compiler computes once and keeps
    for all three: the whole row in fp32, twice the registers (a bf16 row of GPT-1's vocabulary took 128 registers
    at 16 warps, one program per SM; as words, sm_90 under triton 3.6, 125-127 at 8 warps, two programs per SM, and
    113 at 16, 64 of them but for the 16-byte stores, whose offsets are made again from `base // 2 + zero * 16` so
    that Triton still sees them aligned). _row_config admits a row whose registers (fp32 values, or words) fit in
    _resident_budget.

    The classes LOGITS[start : start + n_cols] are split as in _row_segments (head, tail, and a body held as up to
    three parts of ROWS1, ROWS2, ROWS3 blocks of BLOCK_V; a part of 0 rows is absent). Every loaded column is a
    class, the rest -inf, so nothing per element depends on its column: the statistics are a max and a sum of
    exponentials, each lane's first, and the gradient's target term is a scalar store after the row's (ordered by
    a barrier). The padding [n_cols, row_len) is zeroed apart. Lanes fold in another order than the streaming
    passes', so results may differ from theirs in the last bits of fp32."""
    DTYPE: tl.constexpr = LOGITS.dtype.element_ty
    PACKED: tl.constexpr = DTYPE.primitive_bitwidth == 16
    head_end, body_end, end = _row_segments(start, n_cols, ALIGN)
    head_len, body_len, tail_first = _segment_lengths(start, head_end, body_end, end)
    edge = tl.arange(0, ALIGN)
    head = edge < head_len
    tail = edge < n_cols - tail_first
    BODY = LOGITS + head_end
    o1, x1 = _part(BODY, 0, body_len, NEG_INF_WORD, ROWS1, BLOCK_V, PACKED)
    if ROWS2 > 0:
        o2, x2 = _part(BODY, ROWS1 * BLOCK_V, body_len, NEG_INF_WORD, ROWS2, BLOCK_V, PACKED)
    if ROWS3 > 0:
        o3, x3 = _part(BODY, (ROWS1 + ROWS2) * BLOCK_V, body_len, NEG_INF_WORD, ROWS3, BLOCK_V, PACKED)
    x_h = _load_block(LOGITS + start, edge, head)
    x_t = _load_block(LOGITS + body_end, edge, tail)
    # each statistic per lane first (in the thread), then across the threads once
    m_v = _part_max(x1, DTYPE, PACKED)
    if ROWS2 > 0:
        m_v = tl.maximum(m_v, _part_max(x2, DTYPE, PACKED))
    if ROWS3 > 0:
        m_v = tl.maximum(m_v, _part_max(x3, DTYPE, PACKED))
    m = tl.maximum(tl.max(m_v, axis=0), tl.maximum(tl.max(x_h, axis=0), tl.max(x_t, axis=0))).to(tl.float32)
    # with smoothing, the sum of x part by part beside the exponentials': both read one fp32 copy of the part, which
    # the compiler makes once; kept for a second pass, it would be the whole row's
    d_v, s_v = _part_sums(x1, o1, body_len, m, zero, DTYPE, PACKED, SMOOTHING)
    if ROWS2 > 0:
        d_2, s_2 = _part_sums(x2, o2, body_len, m, zero, DTYPE, PACKED, SMOOTHING)
        d_v += d_2
        s_v += s_2
    if ROWS3 > 0:
        d_3, s_3 = _part_sums(x3, o3, body_len, m, zero, DTYPE, PACKED, SMOOTHING)
        d_v += d_3
        s_v += s_3
    d = tl.sum(d_v, axis=0) + _sum_exp(x_h, m) + _sum_exp(x_t, m)
    x_sum = tl.zeros([], dtype=tl.float32)
    if SMOOTHING:
        x_sum = tl.sum(s_v, axis=0) + _sum_where(x_h, head) + _sum_where(x_t, tail)
    x_y = tl.load(LOGITS + start + y).to(tl.float32)
    loss = _row_loss(m, d, x_sum, x_y, eps, n_cols, SMOOTHING)
    if COMPUTE_GRAD:
        scale = _row_grad_scale(GRAD_SCALE, ROW_SCALE, row, HAS_ROW_SCALE)
        inv_d = 1.0 / d
        smooth = eps / n_cols
        _store_part(BODY, 0, o1, body_len, x1, zero, m, inv_d, smooth, scale, ROWS1, BLOCK_V, PACKED, RTNE_BF16)
        if ROWS2 > 0:
            _store_part(BODY, ROWS1 * BLOCK_V, o2, body_len, x2, zero, m, inv_d, smooth, scale, ROWS2, BLOCK_V,
                        PACKED, RTNE_BF16)
        if ROWS3 > 0:
            _store_part(BODY, (ROWS1 + ROWS2) * BLOCK_V, o3, body_len, x3, zero, m, inv_d, smooth, scale, ROWS3,
                        BLOCK_V, PACKED, RTNE_BF16)
        _store_probs(LOGITS + start, x_h, edge, head, m, inv_d, smooth, scale, RTNE_BF16)
        _store_probs(LOGITS + body_end, x_t, edge, tail, m, inv_d, smooth, scale, RTNE_BF16)
        _finish_grad(LOGITS, start, n_cols, row_len, y, x_y, m, inv_d, smooth, eps, scale, BLOCK_V, ALIGN,
                     RTNE_BF16)
    return loss


@triton.jit
def _row_loss(m, d, x_sum, x_y, eps, n_cols, SMOOTHING: tl.constexpr):
    """(1 - eps) (lse - x_y) + eps (lse - mean x) from the row's max m, sum of exp(x - m) d and sum of x."""
    lse = m + tl.log(d)
    loss = (1.0 - eps) * (lse - x_y)
    if SMOOTHING:  # only then: a -inf logit (a masked class) makes x_sum -inf, and 0 * inf would be NaN
        loss += eps * (lse - x_sum / n_cols)
    return loss


@triton.jit
def _row_grad_scale(GRAD_SCALE, ROW_SCALE, row, HAS_ROW_SCALE: tl.constexpr):
    scale = tl.load(GRAD_SCALE)
    if HAS_ROW_SCALE:
        scale = scale * tl.load(ROW_SCALE + row).to(tl.float32)
    return scale


@triton.jit
def _fill_row(LOGITS, start, row_len, value, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr):
    head_end, body_end, end = _row_segments(start, row_len, ALIGN)
    edge = tl.arange(0, ALIGN)
    tl.store(LOGITS + start + edge, tl.full([ALIGN], value, dtype=LOGITS.dtype.element_ty),
             mask=(start + edge < head_end) & (start + edge < end))
    BODY = LOGITS + head_end
    for k in range(0, body_end - head_end, BLOCK_V):
        offs = k + tl.arange(0, BLOCK_V)
        tl.store(BODY + offs, tl.full([BLOCK_V], value, dtype=LOGITS.dtype.element_ty),
                 mask=offs < body_end - head_end)
    tl.store(LOGITS + body_end + edge, tl.full([ALIGN], value, dtype=LOGITS.dtype.element_ty),
             mask=body_end + edge < end)


@triton.jit(do_not_specialize=["zero"])
def _cross_entropy_kernel(
    LOGITS, stride_row, TARGET, LOSS, ROW_SCALE, GRAD_SCALE, n_cols, row_len, ignore_index, eps, zero, NEG_INF_WORD,
    BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, UNROLL: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, SMOOTHING: tl.constexpr, RTNE_BF16: tl.constexpr,
    ROWS1: tl.constexpr = 0, ROWS2: tl.constexpr = 0, ROWS3: tl.constexpr = 0,
):
    """LOSS[r] = CE(LOGITS[r, :n_cols], TARGET[r]); if COMPUTE_GRAD, LOGITS[r, :n_cols] <- its gradient
    times GRAD_SCALE[0] (times ROW_SCALE[r] if HAS_ROW_SCALE) and LOGITS[r, n_cols:row_len] <- 0.
    GRAD_SCALE is a device scalar (it depends on the count of valid targets, which the host never reads).
    A target outside [0, n_cols) that is not ignore_index gets a NaN loss and a NaN gradient row.

    The n_cols classes are read, and with COMPUTE_GRAD all row_len >= n_cols columns written (the padding past the
    classes with zeros); ALIGN = 16 // element size. The classes are walked as a short head, a body of whole 16-byte
    groups and a short tail (_row_segments), so that whatever V and the row stride are, the body moves 16 bytes per
    access when LOGITS itself is 16-byte aligned.
    ROWS1 > 0: the row is read once into registers (_resident_row) rather than streamed twice in blocks of
    BLOCK_V (UNROLL is then unused); zero (0) and NEG_INF_WORD (two 16-bit -inf in a 32-bit word) serve it only.
    """
    row = tl.program_id(0).to(tl.int64)
    start = row * stride_row
    y = tl.load(TARGET + row)
    if y == ignore_index:  # loss 0, gradient 0, and the row is never read
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            _fill_row(LOGITS, start, row_len, 0.0, BLOCK_V, ALIGN)
        return
    if (y < 0) | (y >= n_cols):  # a bad target: visible as NaN, and LOGITS[start + y] is never read
        tl.store(LOSS + row, float("nan"))
        if COMPUTE_GRAD:
            _fill_row(LOGITS, start, row_len, float("nan"), BLOCK_V, ALIGN)
        return
    if ROWS1 > 0:
        tl.store(LOSS + row, _resident_row(LOGITS, start, n_cols, row_len, y, eps, GRAD_SCALE, ROW_SCALE, row, zero,
                                           NEG_INF_WORD, BLOCK_V, ALIGN, ROWS1, ROWS2, ROWS3, COMPUTE_GRAD,
                                           HAS_ROW_SCALE, SMOOTHING, RTNE_BF16))
        return
    m, d, x_sum = _row_stats(LOGITS, start, n_cols, BLOCK_V, ALIGN, UNROLL, SMOOTHING)
    x_y = tl.load(LOGITS + start + y).to(tl.float32)
    tl.store(LOSS + row, _row_loss(m, d, x_sum, x_y, eps, n_cols, SMOOTHING))
    if COMPUTE_GRAD:
        scale = _row_grad_scale(GRAD_SCALE, ROW_SCALE, row, HAS_ROW_SCALE)
        _write_row_grad(LOGITS, start, n_cols, row_len, y, x_y, m, d, eps, scale, BLOCK_V, ALIGN, UNROLL, RTNE_BF16)


@triton.jit
def _scale_block(PTR, offs, mask, factor, RTNE_BF16: tl.constexpr):
    g = tl.load(PTR + offs, mask=mask, other=0.0).to(tl.float32) * factor
    if RTNE_BF16:
        g = round_fp32(g, 16)  # the interpreter would truncate
    tl.store(PTR + offs, g.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _scale_grad_kernel(GRAD, stride_row, row_len, GRAD_OUT, stride_go, POST_SCALE,
                       BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, RTNE_BF16: tl.constexpr):
    """GRAD[r, :row_len] *= GRAD_OUT[r * stride_go] * POST_SCALE[0], in fp32 with one rounding to GRAD's dtype
    (stride_go = 0: one incoming gradient for every row). The backward of fused_cross_entropy, in place.
    A factor of exactly 1 (loss.backward() on a bf16 or fp32 mean) leaves the row as it is: the program reads
    two scalars and returns, so the usual backward costs a launch, not a pass over N x V, and no host sync."""
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(GRAD_OUT + row * stride_go).to(tl.float32) * tl.load(POST_SCALE)
    if factor != 1.0:
        start = row * stride_row
        head_end, body_end, end = _row_segments(start, row_len, ALIGN)
        edge = tl.arange(0, ALIGN)
        _scale_block(GRAD, start + edge, (start + edge < head_end) & (start + edge < end), factor, RTNE_BF16)
        BODY = GRAD + head_end
        for k in range(0, body_end - head_end, BLOCK_V):
            offs = k + tl.arange(0, BLOCK_V)
            _scale_block(BODY, offs, offs < body_end - head_end, factor, RTNE_BF16)
        _scale_block(GRAD, body_end + edge, body_end + edge < end, factor, RTNE_BF16)


# ----------------------------------------------------------------------------- host launchers


def _check_options(ignore_index, label_smoothing, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not is_number(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (the targets' dtype), got {ignore_index}")


def _check_target(target, n_rows, n_classes, ignore_index):
    """Validate dtype and shape; in eager mode also the values (one reduction and one host sync). Under
    torch.compile the values are not read on the host (that would be a graph break): the kernel turns a bad
    target into a NaN loss instead."""
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != n_rows:
        raise ValueError(f"target must have shape ({n_rows},), got {tuple(target.shape)}")
    if torch.compiler.is_compiling():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    n_bad = int(bad.sum())
    if n_bad:
        raise ValueError(f"{n_bad} target(s) outside [0, {n_classes}) and != ignore_index={ignore_index} "
                         f"(first: {int(target[bad][0])})")


def _check_ce_inputs(logits, target, ignore_index, label_smoothing, reduction):
    _check_options(ignore_index, label_smoothing, reduction)
    check_tensors(logits=logits, target=target)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"logits must be one of {_DTYPES}, got {logits.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    _check_target(target, logits.shape[0], logits.shape[1], ignore_index)


def _launch(logits, target, loss, ignore_index, eps, grad_scale, compute_grad, row_scale=None, n_cols=None,
            launch=None):
    """Run the kernel on (n, row_len) logits with unit column stride, of which the first n_cols (default
    all) are classes and the rest padding that gets a zero gradient; loss is an fp32 (n,) output.
    grad_scale: a float or an fp32 device scalar (what _grad_scales returns). launch: the (num_warps, UNROLL) of
    long rows (default: _long_row_config; bench.tune_cross_entropy and the tests pass others). Returns Triton's
    compiled kernel (None when nothing was launched)."""
    n_rows, row_len = logits.shape
    if n_rows == 0:
        return None
    n_cols = row_len if n_cols is None else n_cols
    if n_cols == 0:  # no classes (as torch allows): an ignored row's loss is 0, any other is a bad target, NaN
        loss.fill_(math.nan).masked_fill_(target == ignore_index, 0.0)
        return None
    if compute_grad and not isinstance(grad_scale, torch.Tensor):
        grad_scale = torch.full((), grad_scale, dtype=torch.float32, device=logits.device)
    size = logits.element_size()
    block_v, num_warps, unroll = _row_config(row_len, size, launch or _long_row_config(logits.device, size), eps > 0.0)
    rows = _resident_parts(row_len, block_v) if unroll == ROW else (0, 0, 0)
    # loss stands in for the pointers that the constexpr flags leave unread
    return _cross_entropy_kernel[(n_rows,)](
        logits, logits.stride(0), target, loss, row_scale if row_scale is not None else loss,
        grad_scale if compute_grad else loss, n_cols, row_len, ignore_index, eps, 0, _neg_inf_word(logits.dtype),
        BLOCK_V=block_v, ALIGN=16 // size, UNROLL=1 if unroll == ROW else unroll, COMPUTE_GRAD=compute_grad,
        HAS_ROW_SCALE=row_scale is not None, SMOOTHING=eps > 0.0,
        RTNE_BF16=INTERPRET and logits.dtype == torch.bfloat16, ROWS1=rows[0], ROWS2=rows[1], ROWS3=rows[2],
        num_warps=num_warps,
    )


@functools.cache
def _neg_inf_word(dtype):
    """Two -inf of a 16-bit dtype in one int32 word (the resident row's padding); 0 for fp32, which does not use it."""
    if dtype == torch.float32:
        return 0
    return torch.full((2,), -math.inf, dtype=dtype).view(torch.int32).item()


def _resident_parts(row_len, block_v):
    """(ROWS1, ROWS2, ROWS3): the blocks of block_v columns that hold a row of row_len in registers, as at most
    three powers of two (a tensor's shape must be one), the fewest blocks that cover the row (0: no such part).
    A block count with more than three bits set is rounded up to one with three: V = 40478 in bf16 at 16 warps is
    10 blocks of 4096, parts 8 + 2 (1.2% past the row); V = 50257, 13 blocks, 8 + 4 + 1."""
    blocks = -(-row_len // block_v)
    while bin(blocks).count("1") > 3:
        blocks += blocks & -blocks
    parts = [1 << b for b in reversed(range(blocks.bit_length())) if blocks >> b & 1]
    return tuple(parts + [0] * (3 - len(parts)))


def _row_config(row_len, element_size, long_rows=(_NUM_WARPS, 1), smoothing=False):
    """(BLOCK_V, num_warps, UNROLL) of the cross-entropy kernels for rows of row_len columns of element_size bytes:
    16 bytes per thread and block (one vector load). A row of at least a full block of long_rows' (num_warps,
    UNROLL) gets that launch (_long_row_config: the measured one); a shorter one the fewest warps that cover it, with
    UNROLL 1. UNROLL ROW stays only where the row's blocks (_resident_parts) fit in a thread's registers
    (_resident_budget): one register per fp32 value, one per two 16-bit ones (_resident_row), and with label
    smoothing as many again for the offsets its masked sum keeps (_part_sums); a longer row streams with UNROLL 1."""
    per_thread = _BYTES_PER_THREAD // element_size
    num_warps, unroll = long_rows
    if next_power_of_2(row_len) >= num_warps * 32 * per_thread:
        block_v = num_warps * 32 * per_thread
        registers = sum(_resident_parts(row_len, block_v)) * _BYTES_PER_THREAD // 4 * (2 if smoothing else 1)
        if unroll == ROW and registers > _resident_budget(num_warps):
            unroll = 1
        return block_v, num_warps, unroll
    block_v = max(per_thread, min(next_power_of_2(row_len), _NUM_WARPS * 32 * per_thread))  # a lane at least
    return block_v, max(1, block_v // (32 * per_thread)), 1


def _resident_budget(num_warps):
    """The registers a thread may spend on its part of a resident row (fp32 values, or words of two 16-bit ones):
    _RESIDENT_REGS, and 24 short of what one program of num_warps may take per thread (65536 per SM), for the
    pointers, the statistics and the exponentials in flight."""
    return min(_RESIDENT_REGS, 65536 // (32 * num_warps) - 24)


def check_launch(num_warps, unroll):
    """Why (num_warps, UNROLL) cannot launch the cross-entropy kernel, or None."""
    if type(num_warps) is not int or num_warps not in (1, 2, 4, 8, 16, 32):
        return f"num_warps = {num_warps!r} is not a power of two in [1, 32]"
    if unroll not in UNROLLS or type(unroll) not in (int, str):
        return f"unroll = {unroll!r} is not one of {UNROLLS}"
    return None


def parse_tuned_table(data, source="tuned table"):
    """{(major, element size): (num_warps, UNROLL)} of a table: a JSON object whose "entries" is a list of objects
    with "arch" (sm80, sm90), "element_size" (2 or 4), "num_warps" and "unroll" (other fields, such as the timings
    and the environment, are free). Raises ValueError naming the first bad entry."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f'{source}: expected a JSON object with an "entries" list')
    table = {}
    for i, e in enumerate(data["entries"]):
        why = None
        if not isinstance(e, dict) or any(k not in e for k in ("arch", "element_size", "num_warps", "unroll")):
            why = "needs arch, element_size, num_warps and unroll"
        elif e["arch"] not in TUNED_ARCHS or e["element_size"] not in (2, 4):
            why = f"arch {e['arch']!r} (one of {sorted(TUNED_ARCHS)}), element_size {e['element_size']!r} (2 or 4)"
        else:
            why = check_launch(e["num_warps"], e["unroll"])
            key = (TUNED_ARCHS[e["arch"]], e["element_size"])
            if why is None and key in table:
                why = "a second entry for the same arch and element size"
        if why:
            raise ValueError(f"{source}: entry {i}: {why}")
        table[key] = (e["num_warps"], e["unroll"])
    return table


def load_tuned_table(path=_TUNED_PATH):
    """The parsed table of a JSON file; {} when there is none (every GPU then runs (_NUM_WARPS, 1))."""
    data = read_tuned_json(path, "tune_cross_entropy")
    return {} if data is None else parse_tuned_table(data, path)


_TUNED = load_tuned_table()


@functools.cache
def _long_row_config(device, element_size):
    """(num_warps, UNROLL) of long rows on device: the tuned table's entry for its arch, else (_NUM_WARPS, 1)."""
    if device.type != "cuda":
        return _NUM_WARPS, 1
    major = torch.cuda.get_device_capability(device)[0]
    return _TUNED.get((9 if major >= 9 else 8, element_size), (_NUM_WARPS, 1))


def _grad_scales(target, ignore_index, reduction, dtype):
    """(n_valid, scale folded into the stored gradient, post_scale applied by the backward): fp32 device
    scalars (n_valid int64) computed with a few tiny device ops, never read on the host.

    The mean's 1 / n goes into the kernel, except for fp16, where p_j / n would underflow (module
    docstring). There the kernel stores the gradient times 2^k / n, with 2^k >= n > 2^(k-1), and the
    backward multiplies by 2^-k: for the usual incoming gradients (1, or a power-of-two loss scale) that
    product is exact, so each fp16 gradient element is rounded once, as in the eager reference.
    """
    n_valid = (target != ignore_index).sum()
    one = torch.ones((), dtype=torch.float32, device=target.device)
    if reduction != "mean":
        return n_valid, one, one
    n = n_valid.clamp(min=1).float()
    if dtype != torch.float16:
        return n_valid, 1.0 / n, one
    # floor(log2(n - 1)) + 127 is the fp32 exponent field of n - 1; both powers of two are built from their
    # bits, so they are exact (n = 1 gives k = 1: scale 2, post_scale 1/2, still a product of exactly 1; past
    # 2^24 valid rows n - 1 may round up to a power of two and k come out one larger, equally exact)
    biased = (n - 1).clamp(min=1).view(torch.int32) >> 23
    pow2 = ((biased + 1) << 23).view(torch.float32)  # 2^k
    return n_valid, pow2 / n, ((253 - biased) << 23).view(torch.float32)


def _reduce(loss_rows, reduction, n_valid):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / n_valid.clamp(min=1) if reduction == "mean" else total


def _unit_stride(logits):
    """logits with unit column stride and rows that do not overlap (the kernel writes each row's gradient in
    place while the other rows' programs read theirs: an expanded or as_strided view would be corrupted);
    otherwise a contiguous copy."""
    n_rows, n_cols = logits.shape
    if logits.stride(-1) == 1 and (n_rows <= 1 or logits.stride(0) >= n_cols):
        return logits
    return logits.contiguous()


def _cross_entropy_rows(logits, target, grad_scale, ignore_index, eps, compute_grad):
    loss_rows = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _launch(logits, target.contiguous(), loss_rows, ignore_index, eps, grad_scale, compute_grad)
    return loss_rows


def cross_entropy_forward(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                          compute_grad=True):
    """Loss of (N, V) logits; if compute_grad, the logits are overwritten with d loss / d logits
    divided by post_scale. Returns (loss, logits, post_scale): the backward multiplies by post_scale,
    an fp32 device scalar (1 except for fp16 mean, see the module docstring)."""
    _check_ce_inputs(logits, target, ignore_index, label_smoothing, reduction)
    logits = _unit_stride(logits)  # the gradient then lives in this copy, which we return
    n_valid, scale, post_scale = _grad_scales(target, ignore_index, reduction, logits.dtype)
    loss_rows = _cross_entropy_rows(logits, target, scale, ignore_index, float(label_smoothing), compute_grad)
    return _reduce(loss_rows, reduction, n_valid), logits, post_scale


def cross_entropy_backward(grad_logits, grad_output, post_scale):
    """Scale the stored gradient in place by grad_output (a scalar, or one per row) times post_scale, in fp32
    (an fp16 buffer multiplied by a tensor factor would round the factor to fp16 first); returns it.
    A row whose factor is exactly 1 is not touched: the kernel tests it on the device (no host sync)."""
    n_rows, row_len = grad_logits.shape
    if n_rows == 0 or row_len == 0:
        return grad_logits
    stride_go = grad_output.stride(0) if grad_output.dim() else 0
    block_v, num_warps, _ = _row_config(row_len, grad_logits.element_size())
    _scale_grad_kernel[(n_rows,)](grad_logits, grad_logits.stride(0), row_len, grad_output, stride_go, post_scale,
                                  BLOCK_V=block_v,
                                  ALIGN=16 // grad_logits.element_size(),
                                  RTNE_BF16=INTERPRET and grad_logits.dtype == torch.bfloat16, num_warps=num_warps)
    return grad_logits


@torch.library.custom_op("gpt1_kernels::cross_entropy_loss", mutates_args=())
def cross_entropy_loss_op(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                          label_smoothing: float) -> torch.Tensor:
    """(N,) fp32 losses of unit-column-stride logits, which stay untouched (the no-gradient case)."""
    return _cross_entropy_rows(logits, target, None, ignore_index, label_smoothing, False)


@cross_entropy_loss_op.register_fake
def _(logits, target, ignore_index, label_smoothing):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)


@torch.library.custom_op("gpt1_kernels::cross_entropy_", mutates_args=("logits",))
def cross_entropy_op_(logits: torch.Tensor, target: torch.Tensor, grad_scale: torch.Tensor, ignore_index: int,
                      label_smoothing: float) -> torch.Tensor:
    """(N,) fp32 losses; OVERWRITES the logits with d loss_r / d logits times grad_scale (a device scalar)."""
    return _cross_entropy_rows(logits, target, grad_scale, ignore_index, label_smoothing, True)


@cross_entropy_op_.register_fake
def _(logits, target, grad_scale, ignore_index, label_smoothing):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)


@torch.library.custom_op("gpt1_kernels::cross_entropy_scale_grad_", mutates_args=("grad",))
def cross_entropy_scale_grad_op_(grad: torch.Tensor, grad_output: torch.Tensor, post_scale: torch.Tensor) -> None:
    """grad *= grad_output (0-dim, or one per row) * post_scale, in place (cross_entropy_backward)."""
    cross_entropy_backward(grad, grad_output, post_scale)


@cross_entropy_scale_grad_op_.register_fake
def _(grad, grad_output, post_scale):
    return None


class CrossEntropyFunction(torch.autograd.Function):
    """Around the two in-place operators (register_autograd refuses ops that mutate their inputs). The forward
    op's declared mutation bumps the logits' autograd version in eager mode and is functionalized by
    torch.compile (AOTAutograd sees a new tensor; Inductor writes it back into the same buffer)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, reduction):
        n_valid, scale, post_scale = _grad_scales(target, ignore_index, reduction, logits.dtype)
        loss_rows = cross_entropy_op_(logits, target, scale, ignore_index, label_smoothing)
        ctx.save_for_backward(logits, post_scale)  # logits now hold the gradient
        return _reduce(loss_rows, reduction, n_valid)

    @staticmethod
    @first_order("fused_cross_entropy")
    def backward(ctx, grad_output):
        grad, post_scale = ctx.saved_tensors
        cross_entropy_scale_grad_op_(grad, grad_output, post_scale)
        return grad.detach(), None, None, None, None


def fused_cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Cross-entropy of (N, V) logits against (N,) int64 targets; fp32 loss.

    When logits require grad (and grad mode is on), their buffer is overwritten with the gradient (see
    module docstring); otherwise they are left alone.
    """
    _check_ce_inputs(logits, target, ignore_index, label_smoothing, reduction)
    eps = float(label_smoothing)
    if torch.is_grad_enabled() and logits.requires_grad:
        # a non-unit column stride gets a contiguous copy, which then holds the gradient
        return CrossEntropyFunction.apply(_unit_stride(logits), target, ignore_index, eps, reduction)
    loss_rows = cross_entropy_loss_op(_unit_stride(logits), target, ignore_index, eps)
    return _reduce(loss_rows, reduction, (target != ignore_index).sum())


# ----------------------------------------------------------------------------- fused linear


def _padded_vocab(n_classes):
    """V rounded up to a multiple of _VOCAB_ALIGN: the row length of the padded head (see the chunk loop)."""
    return -(-n_classes // _VOCAB_ALIGN) * _VOCAB_ALIGN


def _linear_extra_bytes(n_rows, n_classes, n_feat, dtype, chunk_rows, dw_slice=True):
    """Device bytes that the chunk loop allocates for (N, C) hidden and a (V, C) head in dtype with chunks of
    chunk_rows rows, every gradient and a bias asked for: the logits buffer, the zero-padded head (a copy when
    V is no multiple of _VOCAB_ALIGN), the fp32 d weight / d bias accumulators, the fp32 d weight slice
    (16-bit only, where d weight does not accumulate in its matmul: dw_slice), fp32 d hidden and the fp32 losses.
    All of it is live at once, at the end of the forward."""
    size, v_pad = torch.empty((), dtype=dtype).element_size(), _padded_vocab(n_classes)
    logits = min(chunk_rows, n_rows) * v_pad * size
    head = v_pad * n_feat * size if v_pad != n_classes else 0
    accumulators = (v_pad * n_feat + 2 * v_pad) * 4  # d weight, d bias and one chunk's d bias sum
    slice_bytes = min(_DW_SLICE, v_pad) * n_feat * 4 if size < 4 and dw_slice else 0
    return logits + head + accumulators + slice_bytes + n_rows * (n_feat + 1) * 4


def _free_bytes(device):
    """Memory that tensors on device could still take: the driver's free memory plus what torch's caching
    allocator holds unused. None off CUDA, and while a CUDA graph is being captured (torch.compile's
    "reduce-overhead"), where the chunk size is fixed for every replay anyway: the chunk rule then uses its
    budget alone."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _default_chunk_size(n_rows, n_classes, n_feat, dtype, free_bytes=None, dw_slice=True):
    """Rows per chunk: the fewest equal chunks, whole multiples of _CHUNK_ALIGN rows, that keep everything the
    chunk loop allocates (_linear_extra_bytes) within min(_EXTRA_BYTES, free_bytes / 2), but never under
    _MIN_CHUNK_ROWS rows. Half of the free memory leaves the other half to the backward's casts and to the
    allocator's fragmentation; free_bytes is _free_bytes(device), None on CPU. So on a nearly full GPU the
    chunking, and with it the fp32 summation order of d weight, can differ from call to call (pass chunk_size
    to pin it). dw_slice: whether a 16-bit d weight goes through the slice buffer (not where it accumulates in
    its matmul, _fp32_accumulate_ok).

    The fixed part does not depend on the chunk, the rest goes to the logits. GPT-1's 64 x 512 tokens, C = 768,
    V = 40478 (padded 40512) in bf16: head copy 59.3 MiB + fp32 d weight / d bias 119.0 MiB + d weight slice
    24 MiB + fp32 d hidden and losses 96.1 MiB = 298.5 MiB, which leaves 101.5 MiB, 1314 rows of 81024 bytes,
    for the logits: 1280 rows, 26 chunks (the last 768), 98.9 MiB of logits, 397.4 MiB in all (the rule used
    to give 514 MiB of logits chunks alone: ~800 MiB with a bf16 d weight buffer and bf16 d hidden). Without the
    slice: 1536 rows, 22 chunks, 393.2 MiB; at a 32 x 512 step (N = 16384) 8 chunks of 2048 rows where the slice
    leaves 9 of 1920.

    Chunks must not shrink below ~1k rows: each re-reads and re-writes the (V, C) fp32 d weight accumulator
    (with the slice buffer ~0.5 GB of traffic at GPT-1 size, ~0.15 ms on an H100), while its three matmuls
    cost ~0.3 us per row (Liger's small chunks make it slower than the unfused path). At 1280 rows that
    traffic is ~40% of the matmul time by this arithmetic; a larger _EXTRA_BYTES buys it back. Whole
    128-row chunks fill the matmuls' 128-row tiles and keep each chunk of hidden 16-byte aligned whatever C
    is. In fp32 the fixed part alone is 333.8 MiB at GPT-1 size and the chunks stay at 1024 rows (492 MiB).
    """
    budget = _EXTRA_BYTES if free_bytes is None else min(_EXTRA_BYTES, free_bytes // 2)
    row_bytes = max(1, _padded_vocab(n_classes)) * torch.empty((), dtype=dtype).element_size()
    fixed = _linear_extra_bytes(n_rows, n_classes, n_feat, dtype, 0, dw_slice)
    max_rows = max(_MIN_CHUNK_ROWS, (budget - fixed) // row_bytes // _CHUNK_ALIGN * _CHUNK_ALIGN)
    n_chunks = max(1, math.ceil(n_rows / max_rows))
    rows = -(-math.ceil(n_rows / n_chunks) // _CHUNK_ALIGN) * _CHUNK_ALIGN
    return max(1, min(n_rows, rows))


def _chunk_rows(hidden, weight):
    """_default_chunk_size for these inputs on their device: its free memory, and whether a 16-bit d weight needs
    the slice buffer there."""
    return _default_chunk_size(hidden.shape[0], *weight.shape, hidden.dtype, _free_bytes(hidden.device),
                               dw_slice=not _fp32_accumulate_ok(hidden.device))


def _check_linear_inputs(hidden, weight, target, bias):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, C) and weight (V, C); got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden has {hidden.shape[1]} features but weight has {weight.shape[1]}")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one of {_DTYPES}; got {hidden.dtype}, {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be ({weight.shape[0]},) {hidden.dtype}; got {tuple(bias.shape)} {bias.dtype}")
    devices = {hidden.device, weight.device, target.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError("hidden, weight, target and bias must be on the same device")


def _pad_rows(t, n_rows):
    """t (contiguous) with zero rows appended up to n_rows; t itself when it has that many already."""
    if t is None or t.shape[0] == n_rows:
        return t
    out = t.new_zeros((n_rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _mm_fp32(a, b, out):
    """out (fp32) = a @ b, rounded once, at the fp32 output, whatever the inputs' dtype. CUDA's mm has an fp32
    out_dtype for fp16 / bf16 inputs (torch >= 2.8); elsewhere the inputs are upcast, which is exact."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


# {device: whether torch.baddbmm with out_dtype=float32 adds a 16-bit product into an fp32 tensor in place on it}
_FP32_ACCUMULATE = {}


def _fp32_accumulate_ok(device):
    """Whether `_accumulate_fp32` may run on `device`: CUDA's baddbmm has an fp32 out_dtype for fp16 / bf16 inputs
    (torch >= 2.8), and with out aliasing self it is cuBLAS's beta = 1 into an fp32 C. Decided once per device by
    trying it on a small problem against the fp32 product (a host sync), never while a CUDA graph is captured
    (there the answer is False until it is known, and the loop takes the slice path)."""
    if device.type != "cuda":
        return False
    if device not in _FP32_ACCUMULATE:
        if torch.cuda.is_current_stream_capturing():
            return False
        # small integers and quarters, exact in every sum (and no draw from torch's generator)
        ints = torch.arange(40 * 96, device=device)
        a = (ints % 7 - 3).reshape(40, 96).to(torch.bfloat16).t()  # transposed, as logits^T is
        b = (ints[: 40 * 24] % 5 - 2).reshape(40, 24).to(torch.bfloat16)
        acc = (ints[: 96 * 24] % 1001).reshape(96, 24).float() + 0.25
        expected = acc + a.float() @ b.float()
        try:
            _accumulate_fp32(acc, a, b)  # beta = 0 would lose acc, a 16-bit result its quarters
            _FP32_ACCUMULATE[device] = bool(torch.equal(acc, expected))
        except (RuntimeError, TypeError):  # no such overload, or one that refuses an fp32 self
            _FP32_ACCUMULATE[device] = False
    return _FP32_ACCUMULATE[device]


def _accumulate_fp32(acc, a, b):
    """acc (fp32) += a @ b for 16-bit a, b, in the matmul (cuBLAS's beta = 1, fp32 C): no product buffer, no
    add of its own."""
    torch.baddbmm(acc[None], a[None], b[None], out_dtype=torch.float32, out=acc[None])


def _chunk_grads(logits, logits_blocks, h, weight, grad_hidden, grad_weight, grad_bias, dw_slices, first):
    """Turn one chunk's d logits into d hidden (fp32, written) and d weight, d bias (fp32, accumulated).

    No 16-bit rounding happens here: the backward scales these by the incoming gradient and rounds once.
    grad_weight is the fp32 accumulator, as a tuple of row blocks of S = _DW_SLICE classes for 16-bit inputs,
    whose products go through dw_slices, fp32 (S, C) buffers of the same heights: torch's addmm cannot portably
    add a half product into an fp32 tensor (a (V, C) buffer would cost another 119 MiB at GPT-1 size). fp32
    accumulates in the matmul itself (grad_weight a tensor, dw_slices None), and so does 16-bit where CUDA's
    baddbmm can (_fp32_accumulate_ok): one matmul per chunk where the slices took 2 operators per slice, whose
    fp32 additions cost 0.65 ms of an H200 training step (40 of them, d6fcf61). logits_blocks: the (S, n) blocks of
    logits^T that go with grad_weight's, made once per buffer: the host's cost per chunk is two operators per block.
    The first chunk writes the accumulators (allocated empty) instead of adding to them: no zero fill, and no
    product through a buffer for that chunk."""
    if grad_hidden is not None:
        _mm_fp32(logits, weight, grad_hidden)
    if grad_weight is not None and dw_slices is None:
        if first:
            _mm_fp32(logits.t(), h, grad_weight)
        elif logits.dtype == torch.float32:
            grad_weight.addmm_(logits.t(), h)
        else:
            _accumulate_fp32(grad_weight, logits.t(), h)
    elif grad_weight is not None:
        for part, acc, buf in zip(logits_blocks, grad_weight, dw_slices):
            if first:
                _mm_fp32(part, h, acc)
            else:
                acc += _mm_fp32(part, h, buf)
    if grad_bias is not None:
        if first:
            torch.sum(logits, 0, dtype=torch.float32, out=grad_bias)
        else:
            grad_bias += logits.sum(0, dtype=torch.float32)


def linear_cross_entropy_chunks(hidden, weight, target, bias, ignore_index, eps, grad_scale, chunk_size,
                                needs=(True, True, True), row_scale=None):
    """The chunk loop. Returns (loss_rows, d hidden, d weight, d bias), all fp32, each gradient
    None when its needs flag is off, and all scaled by grad_scale (times row_scale per row).

    The head is padded with zero rows to V_pad = _padded_vocab(V) classes. Unpadded, a bf16 logits row
    of V = 40478 is 80956 bytes, not a multiple of 16, which keeps cuBLAS off its fast (TMA) kernels
    for all three matmuls and the cross-entropy kernel off vector loads. Padded, every operand's rows
    are 16-byte aligned. The kernel reads the padded columns as -inf and writes them a zero gradient, so
    they add nothing to d hidden (their weight rows are zero too), and the d weight / d bias rows they
    produce are zero and cut off before returning.

    Every view the loop needs (the chunks of hidden, target, the losses and d hidden, the row blocks of the d
    weight accumulator) is made before it, by one split each: on a GPU each operator costs the host a few
    microseconds, and at GPT-1's shapes the loop runs 9-26 chunks per call.
    """
    n_rows, n_classes, n_feat = hidden.shape[0], weight.shape[0], weight.shape[1]
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    compute_grad = need_h or need_w or need_b
    v_pad = _padded_vocab(n_classes)
    weight, bias = _pad_rows(weight.contiguous(), v_pad), _pad_rows(bias, v_pad)
    weight_t = weight.t()
    f32 = {"dtype": torch.float32, "device": hidden.device}
    loss_rows = torch.empty(n_rows, **f32)
    grad_hidden = torch.empty(n_rows, n_feat, **f32) if need_h else None
    # written by the first chunk (there is always one: an empty input is one empty chunk, whose products are zero)
    grad_weight = torch.empty(v_pad, n_feat, **f32) if need_w else None
    grad_bias = torch.empty(v_pad, **f32) if need_b else None
    # one logits buffer, and for 16-bit inputs one fp32 d weight slice, serve every chunk
    buffer = hidden.new_empty((min(chunk_size, n_rows), v_pad))
    dw_blocks, dw_slices = grad_weight, None
    if need_w and weight.dtype != torch.float32 and not _fp32_accumulate_ok(hidden.device):
        dw_blocks = grad_weight.split(_DW_SLICE)
        dw_slice = torch.empty(min(_DW_SLICE, v_pad), n_feat, **f32)
        dw_slices = [dw_slice[: block.shape[0]] for block in dw_blocks]

    def logits_view(n):  # a chunk's logits, with their column blocks transposed for the d weight products
        logits = buffer[:n]
        return logits, logits.t().split(_DW_SLICE) if dw_slices is not None else None

    # by rows: every chunk is full but the last
    views = {n: logits_view(n) for n in {buffer.shape[0], n_rows - (n_rows - 1) // chunk_size * chunk_size}}
    chunks = zip(hidden.split(chunk_size), target.split(chunk_size), loss_rows.split(chunk_size),
                 grad_hidden.split(chunk_size) if need_h else repeat(None),
                 row_scale.split(chunk_size) if row_scale is not None else repeat(None))
    for i, (h, t, loss, gh, rs) in enumerate(chunks):
        logits, logits_blocks = views[h.shape[0]]  # (n, V_pad)
        if bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        _launch(logits, t, loss, ignore_index, eps, grad_scale, compute_grad, rs, n_cols=n_classes)
        if compute_grad:
            _chunk_grads(logits, logits_blocks, h, weight, gh, dw_blocks, grad_bias, dw_slices, first=i == 0)
    grad_weight = grad_weight[:n_classes] if need_w else None  # a prefix of rows: still contiguous
    grad_bias = grad_bias[:n_classes] if need_b else None
    return loss_rows, grad_hidden, grad_weight, grad_bias


def _empty(like, dtype=None):
    """The stand-in for a gradient that was not asked for (an operator cannot return None)."""
    return like.new_empty((0,), dtype=dtype)


@torch.library.custom_op("gpt1_kernels::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                            bias: Optional[torch.Tensor], ignore_index: int, label_smoothing: float, reduction: str,
                            chunk_size: int, need_hidden: bool, need_weight: bool,
                            need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
    """(loss, d hidden, d weight, d bias, post_scale), all fp32: the loss reduced as asked and the unscaled
    gradients (the backward multiplies them by the incoming gradient times post_scale), each an empty (0,)
    tensor when its need flag is off, and all of them empty for reduction="none" (the backward recomputes,
    see linear_cross_entropy_backward_op). chunk_size 0 picks _default_chunk_size."""
    hidden, target = hidden.contiguous(), target.contiguous()
    chunk = chunk_size or _chunk_rows(hidden, weight)
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    # "none" needs the per-row incoming gradient inside d weight: the backward recomputes
    defer = reduction == "none" and any(needs)
    # global 1 / n_valid: every chunk's gradient is scaled by the count over the whole batch (for fp16
    # only up to a power of two, which the backward applies: see _grad_scales)
    n_valid, scale, post_scale = _grad_scales(target, ignore_index, reduction, hidden.dtype)
    loss_rows, gh, gw, gb = linear_cross_entropy_chunks(hidden, weight, target, bias, ignore_index, label_smoothing,
                                                        scale, chunk, needs=(False, False, False) if defer else needs)
    return (_reduce(loss_rows, reduction, n_valid), _empty(hidden, torch.float32) if gh is None else gh,
            _empty(hidden, torch.float32) if gw is None else gw, _empty(hidden, torch.float32) if gb is None else gb,
            post_scale)


@linear_cross_entropy_op.register_fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size, need_hidden, need_weight,
      need_bias):
    f32 = torch.float32
    loss = hidden.new_empty(hidden.shape[:1] if reduction == "none" else (), dtype=f32)
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    live = [n and not (reduction == "none" and any(needs)) for n in needs]
    return (loss, hidden.new_empty(hidden.shape, dtype=f32) if live[0] else _empty(hidden, f32),
            hidden.new_empty(weight.shape, dtype=f32) if live[1] else _empty(hidden, f32),
            hidden.new_empty(weight.shape[:1], dtype=f32) if live[2] else _empty(hidden, f32),
            hidden.new_empty((), dtype=f32))


@torch.library.custom_op("gpt1_kernels::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                     bias: Optional[torch.Tensor], grad_loss: torch.Tensor, ignore_index: int,
                                     label_smoothing: float, chunk_size: int, need_hidden: bool, need_weight: bool,
                                     need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias), fp32, of reduction="none" for the per-row incoming gradient grad_loss:
    the chunk loop again, with the rows scaled inside the kernel (empty (0,) tensors where not needed)."""
    hidden, target = hidden.contiguous(), target.contiguous()
    chunk = chunk_size or _chunk_rows(hidden, weight)
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    _, gh, gw, gb = linear_cross_entropy_chunks(hidden, weight, target, bias, ignore_index, label_smoothing, 1.0,
                                                chunk, needs, row_scale=grad_loss.float().contiguous())
    return (_empty(hidden, torch.float32) if gh is None else gh, _empty(hidden, torch.float32) if gw is None else gw,
            _empty(hidden, torch.float32) if gb is None else gb)


@linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, target, bias, grad_loss, ignore_index, label_smoothing, chunk_size, need_hidden, need_weight,
      need_bias):
    f32 = torch.float32
    return (hidden.new_empty(hidden.shape, dtype=f32) if need_hidden else _empty(hidden, f32),
            hidden.new_empty(weight.shape, dtype=f32) if need_weight else _empty(hidden, f32),
            hidden.new_empty(weight.shape[:1], dtype=f32) if need_bias and bias is not None else _empty(hidden, f32))


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, eps, reduction, chunk, *needs = inputs
    _, grad_hidden, grad_weight, grad_bias, post_scale = output
    ctx.needs = (needs[0], needs[1], needs[2] and bias is not None)
    ctx.defer = reduction == "none" and any(ctx.needs)
    ctx.args = (ignore_index, eps, chunk)
    ctx.dtype = weight.dtype
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias, post_scale)
    # the backward reads only the loss's gradient: without this, autograd would hand it fp32 zeros of d hidden's
    # and d weight's sizes for these outputs in eager mode (an allocation and a fill of 175 MB per GPT-1 step)
    ctx.set_materialize_grads(False)
    if ctx.defer:
        ctx.save_for_backward(hidden, weight, target, bias)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, post_scale)


@first_order("fused_linear_cross_entropy")
def _linear_backward(ctx, grad_loss, *_):
    if ctx.defer:
        hidden, weight, target, bias = ctx.saved_tensors
        grads = linear_cross_entropy_backward_op(hidden, weight, target, bias, grad_loss, *ctx.args, *ctx.needs)
        scale = None  # the rows are scaled inside the recomputation
    else:
        *grads, post_scale = ctx.saved_tensors
        # these are (N, C) and (V, C): scaling them costs little next to the forward's matmuls
        scale = grad_loss.float() * post_scale
    grad_hidden, grad_weight, grad_bias = (_rounded(g, scale, ctx.dtype) if need else None
                                           for g, need in zip(grads, ctx.needs))
    return grad_hidden, grad_weight, None, grad_bias, *[None] * 7


def _rounded(grad, scale, dtype):
    """The one rounding of an fp32 gradient to the inputs' dtype, times scale (None: 1) in fp32 first, written
    straight into the result: no fp32 product of the (V, C) or (N, C) size beside the saved gradient (at N = 32768
    that was 215 MiB more at the backward's peak). The saved gradient is left as it was, so that a second backward
    (retain_graph) scales it again from scratch."""
    if scale is None:
        return grad.to(dtype)
    return torch.mul(grad, scale, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


linear_cross_entropy_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def fused_linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, label_smoothing=0.0,
                               reduction="mean", chunk_size=None):
    """cross_entropy(hidden @ weight^T + bias, target) without materializing the (N, V) logits.

    hidden (N, C), weight (V, C), bias (V,) or None, target (N,) int64; fp32 loss. chunk_size rows of
    logits exist at a time (default: _default_chunk_size). The gradients are computed in the forward.
    Under torch.autocast the inputs are cast to its dtype first, as F.linear casts them.
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_options(ignore_index, label_smoothing, reduction)
    check_tensors(hidden=hidden, weight=weight, target=target, bias=bias)  # before the cast reads their devices
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)  # as F.linear under torch.autocast
    _check_linear_inputs(hidden, weight, target, bias)
    _check_target(target, hidden.shape[0], weight.shape[0], ignore_index)
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    return linear_cross_entropy_op(hidden, weight, target, bias, ignore_index, float(label_smoothing), reduction,
                                   chunk_size or 0, *needs)[0]


def _compile_spec(name, dtype, compute_grad, n_classes=40478, padded=False, smoothing=False, launch=(_NUM_WARPS, 1)):
    """One ahead-of-time compile of _cross_entropy_kernel as _launch would run it for GPT-1: on (N, V)
    logits (row stride V = 40478, no alignment), or on fused_linear_cross_entropy's padded chunk (row stride
    _padded_vocab(V), a multiple of 16 that the JIT specializes on); launch: the long rows' (num_warps, UNROLL)."""
    row_len = _padded_vocab(n_classes) if padded else n_classes
    block_v, num_warps, unroll = _row_config(row_len, 4 if dtype == "fp32" else 2, launch, smoothing)
    rows = _resident_parts(row_len, block_v) if unroll == ROW else (0, 0, 0)
    return {
        "name": name,
        "fn": _cross_entropy_kernel,
        "signature": {"LOGITS": f"*{dtype}:16", "stride_row": "i32:16" if padded else "i32", "TARGET": "*i64:16",
                      "LOSS": "*fp32:16", "ROW_SCALE": "*fp32:16", "n_cols": "i32",
                      "row_len": "i32:16" if padded else "i32", "ignore_index": "i32", "eps": "fp32",
                      "zero": "i32", "NEG_INF_WORD": "i32", "GRAD_SCALE": "*fp32:16"},
        "constexprs": {"BLOCK_V": block_v, "ALIGN": 4 if dtype == "fp32" else 8,
                       "UNROLL": 1 if unroll == ROW else unroll, "COMPUTE_GRAD": compute_grad,
                       "HAS_ROW_SCALE": False, "SMOOTHING": smoothing,
                       "RTNE_BF16": False, "ROWS1": rows[0], "ROWS2": rows[1], "ROWS3": rows[2]},
        "num_warps": num_warps,
        "num_stages": 3,
    }


# For bench/compile_report.py: triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(...)).
COMPILE_SPECS = [
    _compile_spec("cross_entropy_fwd_bwd_bf16_V40478", "bf16", True),
    _compile_spec("cross_entropy_fwd_bwd_fp32_V40478", "fp32", True),
    _compile_spec("cross_entropy_fwd_bwd_bf16_V40478_smoothing", "bf16", True, smoothing=True),
    _compile_spec("cross_entropy_fwd_only_bf16_V40478", "bf16", False),
    _compile_spec("linear_ce_chunk_fwd_bwd_bf16_V40478_padded", "bf16", True, padded=True),
    # candidates that bench.tune_cross_entropy times beside the default (more loads in flight, other widths), named
    # _w<num_warps>_unroll<UNROLL>: those without spills under both triton 3.6 and 3.9. At UNROLL 4, 16 x 4 holds 85
    # registers on sm_90 under triton 3.6 (the GPU machines'), but 3.9 keeps it to 64 and spills, as it does 8 x 4,
    # 4 x 4 and fp32's 16 x 4; the tuner rejects a launch that spills on its GPU.
    *(_compile_spec(f"linear_ce_chunk_fwd_bwd_bf16_V40478_padded_w{w}_unroll{u}", "bf16", True, padded=True,
                    launch=(w, u)) for w, u in ((16, 2), (32, 1))),
    # the row read once into registers (UNROLL "row"), on the chunk and on the unaligned N x V logits. A 16-bit row
    # at 16 warps, 64 registers without 16-byte stores, takes 113 with them on sm_90 under triton 3.6 (the GPU
    # machines') and no spill; triton 3.9's ptxas keeps it to 64 on sm_80 and spills 16 bytes: the tuner times it, it
    # is not listed here (a launch that spills on its GPU is rejected there)
    *(_compile_spec(f"linear_ce_chunk_fwd_bwd_bf16_V40478_padded_w{w}_row", "bf16", True, padded=True,
                    launch=(w, ROW)) for w in (8, 32)),
    _compile_spec("cross_entropy_fwd_bwd_bf16_V40478_w8_row", "bf16", True, launch=(8, ROW)),
    _compile_spec("cross_entropy_fwd_bwd_fp32_V40478_w16_row", "fp32", True, launch=(16, ROW)),
    _compile_spec("cross_entropy_fwd_bwd_fp16_V40478_w16_row", "fp16", True, launch=(16, ROW)),
    _compile_spec("cross_entropy_fwd_bwd_bf16_V40478_smoothing_w16_row", "bf16", True, smoothing=True,
                  launch=(16, ROW)),
    # the backward's in-place scaling, by one incoming gradient (reduction="mean")
    {"name": "cross_entropy_scale_grad_bf16_V40478", "fn": _scale_grad_kernel,
     "signature": {"GRAD": "*bf16:16", "stride_row": "i32", "row_len": "i32", "GRAD_OUT": "*fp32:16",
                   "stride_go": "i32:16", "POST_SCALE": "*fp32:16"},  # stride 0: the JIT's divisible-by-16 case
     "constexprs": {"BLOCK_V": _row_config(40478, 2)[0], "ALIGN": 8, "RTNE_BF16": False}, "num_warps": _NUM_WARPS,
     "num_stages": 3},
]
