"""Fused (causal) attention with in-kernel dropout: FlashAttention-2 forward and backward in Triton.

Algorithm (FlashAttention-2, Tri Dao 2023; kernel structure after Triton's tutorial 06 "fused attention"):

- Forward: one program per (query block, batch*head). It makes one pass over the K/V blocks with an online
  softmax in fp32 (running max m and sum l, rescaling the accumulator as the max grows), in base 2: the
  scores are multiplied by softmax_scale * log2(e) once, so every exponential is an exp2. Only the per-row
  log-sum-exp (natural log, fp32, (B, H, T)) is saved for the backward; the T x T matrix never exists.
- Causal: key blocks left of the diagonal are processed without any mask, the diagonal block(s) with the
  causal mask, blocks above the diagonal are never visited. Tails (T not a multiple of a block) are masked.
- Backward: one kernel owns a query block, computes delta = rowsum(dO * O) for its rows (saving it) and
  accumulates dQ over the key blocks; then another owns a key block and accumulates dK, dV over the query
  blocks at or below the diagonal, reading delta. Each output block is written by exactly one program, with
  no atomics, so two backward passes on the same inputs give bitwise identical gradients.
- Short sequences (fine-tuning batches: T <= 128): a tiled program there owns one or two key blocks and waits
  on its loads with nothing to hide them behind. _attn_fwd_short_kernel and _attn_bwd_short_kernel instead launch
  a few programs per SM that walk the (batch, head) pairs, a head's whole (T, T) scores per loop trip, the loop
  over heads being the software-pipelined one (the next head's tiles load while this one computes). The forward
  takes one exact softmax per row (no running max); the backward holds a head's k and v, takes its queries 64 rows
  at a time and makes dQ, dK and dV in one pass, five dots per tile against the two tiled kernels' seven, with
  delta computed in place. Which lengths, warps and programs: _SHORT_CONFIGS (the backward's whole-head tiles
  spill past T = 64, where the tiled backward runs).
- Dropout (GPT-1 trains with attn_pdrop=0.1; the tutorial and FlashAttention-3 have none): one
  Philox-4x32-7 call with counter (j // 8, i, b*H + h, seed) gives eight 16-bit draws, for columns j of row i
  in one group of 8; element (b, h, i, j) is kept iff its draw >= round(p * 65536) (kernels._common's
  dropout_words), so the dropout rate is p quantized to 1/65536 (FlashAttention-2 uses 8-bit draws, 1/256);
  kept values are scaled by 1/(1 - p). The mask is drawn once per forward, packed one bit per score (a
  (B*H, T, W) uint8 tensor, W = T/8 rounded up to 16 bytes: 12 MiB per layer at GPT-1's B=32, T=512), by
  _dropout_mask_kernel just before the forward kernel (MASK_DRAW "kernel"; causal, only the bytes up to the
  diagonal are drawn, the rest written 0); the forward and both backward kernels read their tiles' bits, so a
  training step draws each score's dropout once where regenerating it would draw it three times. The forward can
  also draw the bits itself between its dots and store them (MASK_DRAW "inline"; the same bits, bit for bit).
  The 32-bit seed is a 1-element int64 tensor drawn with torch.randint on the inputs' device (so torch.manual_seed
  reproduces it) and read by the kernels with tl.load: no host sync, and under torch.compile a graph tensor, so
  neither a recompile per value nor a value frozen into a CUDA graph.
  `attention_dropout_mask` rebuilds the mask of a seed for tests; `attention_backward` (the seed API)
  rebuilds the packed one.
  Cost (static, from the compile report under triton 3.6, sm_90, D=64, bf16, the tuned 64x64 tiles; SASS
  instructions per key block of the forward's loop): 319 without dropout; 796 drawing inline (the Philox calls,
  and the keep-mask's trip through shared memory into the MMA layout of the scores: 43 shared-memory loads and 10
  barriers in its loops against 23 and 4); 477 reading the mask kernel's bits, which costs about 75 per Philox call
  and thread at 26 registers. On an H200 (d74f03d, T=512) the inline draw took the forward from 0.068 to 0.142 ms,
  where cuDNN's went from 0.067 to 0.114: about 3x the time that issuing its instructions takes, latency that
  the forward's 8 warps per SM could not hide, which the mask kernel's many small programs can.
  The backward kernels apply the dropout scale once to their outputs rather than to every dP (and P) element,
  and on sm_90 load their mask bytes a loop trip ahead (PREFETCH_MASK, see _attn_bwd_dq_inner), as the forward
  does.

Dtypes: fp16, bf16 and fp32 inputs; outputs and gradients are in the input dtype. Dot products take
their operands in the input dtype and accumulate in fp32; all elementwise math is fp32. fp32 dots follow torch's
fp32 matmul precision, read at every launch as cuBLAS reads it at every matmul (torch.set_float32_matmul_precision;
torch.backends.cuda.matmul.allow_tf32 and .fp32_precision are views of the same setting): at torch's default
"highest" they are exact fp32 products (tl.dot's input_precision="ieee", on the FMA units, whose peak is about
1/7 of the TF32 tensor cores' on an H100); at "high" or "medium" TF32 on Ampere/Hopper (about 1e-3 relative
error, like torch's TF32 matmuls), with the operands rounded to nearest TF32 by the kernels, since the tensor
cores would truncate them. fp16 and bf16 dots are the same under every setting.

Shapes: q, k, v of shape (B, H, T, D) with any strides (the model passes permuted views of its fused
qkv projection); D in {16, 32, 64, 128}; any T >= 1, B, H >= 1. The output is laid out as (B, T, H, D)
and returned as a (B, H, T, D) view, so the model's transpose back to (B, T, C) is free.

Operators: `gpt1_kernels::attention(q, k, v, seed?, causal, softmax_scale, dropout_p) -> (o, lse, mask)` (mask:
the packed keep-mask, empty without dropout) and
`gpt1_kernels::attention_backward(do, q, k, v, o, lse, mask?, causal, softmax_scale, dropout_p) -> (dq, dk, dv)`,
torch.library triton_ops (custom ops under the interpreter: kernels._common.kernel_op) with fake (meta)
implementations of the real output strides (o is the (B, H, T, D) view of a (B, T, H, D) buffer) and the backward
registered with register_autograd, so torch.compile(fullgraph=True) traces fused_attention forward and backward
without a graph break. Inductor calls the ops, opaque to it, or with kernels.set_inline(True) (--inline-kernels)
launches the Triton kernels itself from its generated code, the ops' Python gone from the step (the backward of
the packed form then hands its kernels d qkv itself, not views of it, which Inductor would copy out and scatter
back: the dK/dV kernel's PACKED). In eager mode fused_attention
skips the dispatcher and calls the same launchers through FusedAttentionFunction: a custom op's Python
dispatch costs tens of microseconds per call, and the per-call host work is kept to the checks, a cached
config lookup, the seed draw (only with dropout) and the output allocation.

fused_attention_qkv(qkv) takes the packed projections (B, T, 3, H, D) that the model's q/k/v linear makes, runs
the same kernels on the same views (gpt1_kernels::attention_qkv and attention_qkv_backward, eager path
FusedAttentionQKVFunction) and returns d qkv as one contiguous tensor in that layout: with three separate
gradients, Inductor stacked dq, dk, dv into it with a copy (0.45 ms of an H200's training step, commit 53af6d7).

Limits: self-attention only (q, k, v share T); B*H <= 65535 (CUDA grid y); offsets within one
(batch, head) slice (T * stride of T) must fit in int32; the dropout mask costs one Philox call per 8
scores in the forward and T * W bytes per (batch, head) until the backward; a dropout p below 2^-17 rounds to
no dropout; no double backward (create_graph=True raises: kernels._common.first_order). Under torch.compile,
causal, softmax_scale and dropout_p are constants of the graph (a new value recompiles); the seed is not, nor is the
fp32 matmul precision, which the operators read when they run (a CUDA graph keeps the kernels it captured, and so the
precision of then).
Launch configurations come from `_CONFIGS`, keyed by (arch, head dim, fp32 or not), overridden per kernel by the
measured table kernels/attention_tuned.json (written by `python -m bench.tune_attention` on a GPU), keyed also by
the sequence-length bucket (T rounded up to a power of two in [128, 2048]) and dropout; see `_config_for`. Under the
Triton interpreter (TRITON_INTERPRET=1, CPU tests) bf16 dot operands are rounded by bit arithmetic and fed
as fp32 (ROUNDING="bf16"), because the interpreter multiplies bf16 as raw integers; GPU code is unaffected.
"""

import contextlib
import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._common import (
    INTERPRET,
    LN2,
    LOG2E,
    TUNED_ARCHS,
    autocast_inputs,
    bits_from_words,
    cdiv,
    check_tensors,
    dropout_args,
    dropout_words,
    first_order,
    is_number,
    kernel_op,
    launchable,
    new_dropout_seed,
    next_power_of_2,
    read_tuned_json,
    round_fp32,
    seed_tensor,
)

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The stages of a program's loop over the other side's blocks (the tutorial's STAGE): which blocks it visits
# (see _key_range, _query_range) and which masks they need. Whole blocks off the diagonal need none, so the
# hot loop carries no mask arithmetic.
STAGE_FULL = tl.constexpr(1)  # whole blocks: left of the diagonal (causal) or all of them (not causal); no mask
STAGE_DIAG = tl.constexpr(2)  # the block(s) on the diagonal (causal only): causal mask and bound mask
STAGE_TAIL = tl.constexpr(3)  # the blocks past the last whole block (T not a multiple of the block): bound mask


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _operand(x, DTYPE: tl.constexpr, ROUNDING: tl.constexpr):
    """x as a _dot operand of the input dtype DTYPE (ROUNDING: see _rounding).
    ROUNDING "tf32" (fp32 inputs with TF32 matmuls allowed): the tensor cores read only the top 19 bits of an
    fp32 operand, i.e. truncate it to TF32, which biases every product towards zero (seen on an H200: the lse
    of a row came out ~1e-3 low, systematically). Rounding to nearest first makes the error unbiased, as in
    cuBLAS's TF32. ROUNDING "ieee" (fp32 inputs, exact fp32 dots): x as it is.
    ROUNDING "bf16" (bf16 under the interpreter, which multiplies bf16 dot operands as raw integers and
    truncates fp32 -> bf16): rounded to bf16 by bit arithmetic and kept in fp32, which tl.dot takes exactly."""
    if ROUNDING == "tf32":
        return round_fp32(x, 13)
    elif ROUNDING == "bf16":
        return round_fp32(x, 16)
    else:
        return x.to(DTYPE)


@triton.jit
def _dot(a, b, acc, ROUNDING: tl.constexpr):
    """tl.dot(a, b, acc) of two _operand tiles with the input precision of ROUNDING: for fp32 "ieee" (exact
    products, on the FMA units) or "tf32" (tensor cores; also when TRITON_F32_DEFAULT says otherwise); 16-bit
    tiles get no input_precision argument, so their dots are tl.dot's own."""
    if ROUNDING == "ieee":
        return tl.dot(a, b, acc, input_precision="ieee")
    elif ROUNDING == "tf32":
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _stored(x, DTYPE: tl.constexpr, ROUNDING: tl.constexpr):
    """x converted for a store to a DTYPE tensor (round-to-nearest also under the interpreter)."""
    if ROUNDING == "bf16":
        x = round_fp32(x, 16)
    return x.to(DTYPE)


@triton.jit
def _mask_bytes(MASK, W, rows, col_start, row_end, col_end, DIAG: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The packed keep-mask bytes (uint8) of rows x [col_start, col_start + BLOCK_C) (row-major rows of W bytes):
    (BLOCK_R, BLOCK_C // 8), or (BLOCK_C // 8, BLOCK_R) if TRANSPOSED. Only bytes that the forward wrote are read:
    rows < row_end, a first column < col_end (both <= T), and on the diagonal (DIAG) a first column <= the row
    (the forward visits every key up to the end of the row's diagonal block); the others are 0. The backward
    loops pass their own end as the bound of the side they walk, so that the load of the block after their last,
    issued a trip ahead (see _attn_bwd_dq_inner), reads nothing."""
    groups = col_start // 8 + tl.arange(0, BLOCK_C // 8)
    if TRANSPOSED:
        ptrs = MASK + rows[None, :] * W + groups[:, None]
        ok = (rows[None, :] < row_end) & (groups[:, None] * 8 < col_end)
        if DIAG:
            ok = ok & (groups[:, None] * 8 <= rows[None, :])
    else:
        ptrs = MASK + rows[:, None] * W + groups[None, :]
        ok = (rows[:, None] < row_end) & (groups[None, :] * 8 < col_end)
        if DIAG:
            ok = ok & (groups[None, :] * 8 <= rows[:, None])
    return tl.load(ptrs, mask=ok, other=0)


@triton.jit
def _keep_of_bytes(bits, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) keep-mask of loaded bytes (BLOCK_R, BLOCK_C // 8) (_mask_bytes), for the forward and
    dQ. Each bit tested against its own one-bit mask, where a shift and an AND left the forward's loop (sm_90, D=64,
    64x64, triton 3.6) 70 SASS instructions longer per key block."""
    bits = bits.to(tl.int32)[:, :, None] & (1 << tl.arange(0, 8))[None, None, :]  # (R, C/8, 8): column 8g + b
    return tl.reshape(bits, [BLOCK_R, BLOCK_C]) != 0


@triton.jit
def _keep_of_bits(bits, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The forward's (BLOCK_R, BLOCK_C) keep-mask of the packed bytes (BLOCK_R, BLOCK_C // 8) it has just drawn.
    Unpacked by broadcasting alone, as _keep_of_bytes unpacks loaded bytes, these bytes would be recomputed, Philox
    and all, in the MMA layout of the scores (4x the draws on sm_90); made from the draws with tl.join
    (keep_from_words) they cross shared memory three times per key block (sm_90, D=64, triton 3.6: 59 shared-memory
    stores and 73 loads in the kernel). Split into nibbles by one join, only the small (R, C/8, 2) nibble tile does
    (11 stores, 43 loads)."""
    b = bits.to(tl.int32)
    b = tl.join(b, b >> 4)  # (R, C/8, 2): nibble h of byte g
    b = (b[:, :, :, None] >> tl.arange(0, 4)[None, None, None, :]) & 1  # (R, C/8, 2, 4): column 8g + 4h + k
    return tl.reshape(b, [BLOCK_R, BLOCK_C]) != 0


@triton.jit
def _keep_of_bytes_t(bits, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The same, transposed: (BLOCK_C, BLOCK_R) from (BLOCK_C // 8, BLOCK_R) bytes, for the dK/dV kernel's (key,
    query) tiles."""
    bits = (bits.to(tl.int32)[:, None, :] >> tl.arange(0, 8)[None, :, None]) & 1  # (C/8, 8, R): column 8g + b
    return tl.reshape(bits, [BLOCK_C, BLOCK_R]) != 0


@triton.jit
def _key_range(start_m, T, STAGE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys that the query block [start_m, start_m + BLOCK_M) visits in STAGE (fwd and dq)."""
    full = (T // BLOCK_N) * BLOCK_N  # keys below this index fill whole blocks
    if STAGE == STAGE_DIAG:
        lo, hi = start_m, tl.minimum(start_m + BLOCK_M, T)
    elif STAGE == STAGE_FULL:
        lo, hi = 0, start_m if CAUSAL else full
    else:
        lo, hi = full, T
    return lo, hi


@triton.jit
def _query_range(start_n, T, STAGE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """[lo, hi) of the queries that the key block [start_n, start_n + BLOCK_N) visits in STAGE (dkdv); causal,
    the full and tail stages start below the diagonal block."""
    full = (T // BLOCK_M) * BLOCK_M  # queries below this index fill whole blocks
    below = start_n + BLOCK_N if CAUSAL else 0
    if STAGE == STAGE_DIAG:
        lo, hi = start_n, tl.minimum(start_n + BLOCK_N, T)
    elif STAGE == STAGE_FULL:
        lo, hi = below, full
    else:
        lo, hi = tl.maximum(full, below) if CAUSAL else full, T
    return lo, hi


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, start_m, qk_scale,
                    SEED, BH, T, DROP_THRESHOLD, MASK, W,
                    STAGE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DROPOUT: tl.constexpr, DRAW: tl.constexpr, PREFETCH_MASK: tl.constexpr,
                    ROUNDING: tl.constexpr):
    DTYPE: tl.constexpr = k_ptrs.dtype.element_ty
    BOUND_MASK: tl.constexpr = STAGE != STAGE_FULL
    CAUSAL_MASK: tl.constexpr = STAGE == STAGE_DIAG
    LOAD_MASK: tl.constexpr = DROPOUT and not DRAW  # the keep-mask drawn before, by _dropout_mask_kernel
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lo, hi = _key_range(start_m, T, STAGE=STAGE, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    k_ptrs += lo * stride_kt
    v_ptrs += lo * stride_vt
    bits = tl.zeros([1], dtype=tl.uint8)  # with PREFETCH_MASK: the next trip's mask bytes (_attn_bwd_dq_inner)
    if LOAD_MASK and PREFETCH_MASK:
        bits = _mask_bytes(MASK, W, offs_m, lo, T, hi, CAUSAL_MASK, BLOCK_M, BLOCK_N, TRANSPOSED=False)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if LOAD_MASK and PREFETCH_MASK:
            bits_here = bits
            bits = _mask_bytes(MASK, W, offs_m, start_n + BLOCK_N, T, hi, CAUSAL_MASK, BLOCK_M, BLOCK_N,
                               TRANSPOSED=False)
        if BOUND_MASK:
            kT = tl.load(k_ptrs, mask=offs_n[None, :] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            kT = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        kT, v = _operand(kT, DTYPE, ROUNDING), _operand(v, DTYPE, ROUNDING)
        s = _dot(q, kT, None, ROUNDING) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, base-2 logits
        if BOUND_MASK:
            valid = offs_n[None, :] < T
            if CAUSAL_MASK:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(valid, s, float("-inf"))
        # every row sees a valid key in its first block, so m_new is finite and alpha never NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normalizer counts dropped entries too
        acc = acc * alpha[:, None]
        if LOAD_MASK:
            if not PREFETCH_MASK:
                bits_here = _mask_bytes(MASK, W, offs_m, start_n, T, T, CAUSAL_MASK, BLOCK_M, BLOCK_N,
                                        TRANSPOSED=False)
            p = tl.where(_keep_of_bytes(bits_here, BLOCK_M, BLOCK_N), p, 0.0)
        elif DROPOUT:
            r0, r1, r2, r3 = dropout_words(SEED, BH, offs_m, start_n, BLOCK_M, BLOCK_N)
            # the mask, packed, for the backward: only bytes with a column < T (the buffer's padding is not
            # written) of rows < T
            groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)
            bits_drawn = bits_from_words(r0, r1, r2, r3, DROP_THRESHOLD)
            tl.store(MASK + offs_m[:, None] * W + groups[None, :], bits_drawn,
                     mask=(offs_m[:, None] < T) & (groups[None, :] * 8 < T))
            p = tl.where(_keep_of_bits(bits_drawn, BLOCK_M, BLOCK_N), p, 0.0)
        acc = _dot(_operand(p, DTYPE, ROUNDING), v, acc, ROUNDING)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, MASK, qk_scale, SEED, DROP_THRESHOLD, DROPOUT_SCALE, W,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     stride_ob, stride_oh, stride_ot, stride_od,
                     H, T,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DRAW: tl.constexpr, PREFETCH_MASK: tl.constexpr,
                     ROUNDING: tl.constexpr):
    # the causal stages step through the diagonal query block in key blocks
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "fwd needs BLOCK_M % BLOCK_N == 0")
    tl.static_assert(BLOCK_N % 8 == 0, "BLOCK_N must be a multiple of 8, the dropout draw group")
    DTYPE: tl.constexpr = O.dtype.element_ty
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = bh // H, bh % H
    # this program's (batch, head) slice of every tensor; from here on only (t, d) offsets. The outputs' are
    # added after the loop: a pointer held across it takes registers, a kernel argument does not.
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    if DROPOUT:
        MASK += bh * T * W
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    kT_ptrs = K + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    # q loaded after all three tiles' pointers exist: loading it first made the sm_90 fp32 D=128 config spill
    q = _operand(tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0), DTYPE, ROUNDING)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # the whole key blocks unmasked, then the diagonal block (causal) or the key tail, masked
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, kT_ptrs, v_ptrs, stride_kt, stride_vt, start_m, qk_scale,
                                    SEED, bh, T, DROP_THRESHOLD, MASK, W, STAGE=STAGE_FULL, CAUSAL=CAUSAL,
                                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DROPOUT=DROPOUT, DRAW=DRAW,
                                    PREFETCH_MASK=PREFETCH_MASK, ROUNDING=ROUNDING)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, kT_ptrs, v_ptrs, stride_kt, stride_vt, start_m, qk_scale,
                                    SEED, bh, T, DROP_THRESHOLD, MASK, W, STAGE=STAGE_DIAG if CAUSAL else STAGE_TAIL,
                                    CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DROPOUT=DROPOUT, DRAW=DRAW,
                                    PREFETCH_MASK=PREFETCH_MASK, ROUNDING=ROUNDING)

    inv_l = 1.0 / l_i
    if DROPOUT:
        inv_l = inv_l * DROPOUT_SCALE
    o = acc * inv_l[:, None]
    O += off_b * stride_ob + off_h * stride_oh
    LSE += bh * T
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, _stored(o, DTYPE, ROUNDING),
             mask=offs_m[:, None] < T)
    tl.store(LSE + offs_m, (m_i + tl.math.log2(l_i)) * LN2, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, LSE, DELTA, stride_qt, stride_dot, start_n, qk_scale,
                         MASK, W, T,
                         STAGE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DROPOUT: tl.constexpr, PREFETCH_MASK: tl.constexpr,
                         ROUNDING: tl.constexpr):
    DTYPE: tl.constexpr = qT_ptrs.dtype.element_ty
    BOUND_MASK: tl.constexpr = STAGE != STAGE_FULL
    CAUSAL_MASK: tl.constexpr = STAGE == STAGE_DIAG
    offs_n = start_n + tl.arange(0, BLOCK_N)
    lo, hi = _query_range(start_n, T, STAGE=STAGE, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    # works on transposed scores sT = k q^T (BLOCK_N, BLOCK_M) so that dK, dV come out row-major
    qT_ptrs += lo * stride_qt
    do_ptrs += lo * stride_dot
    bits = tl.zeros([1], dtype=tl.uint8)  # with PREFETCH_MASK: the next trip's mask bytes (_attn_bwd_dq_inner)
    if DROPOUT and PREFETCH_MASK:
        bits = _mask_bytes(MASK, W, lo + tl.arange(0, BLOCK_M), start_n, hi, T, CAUSAL_MASK, BLOCK_M, BLOCK_N,
                           TRANSPOSED=True)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if DROPOUT and PREFETCH_MASK:
            bits_here = bits
            bits = _mask_bytes(MASK, W, offs_m + BLOCK_M, start_n, hi, T, CAUSAL_MASK, BLOCK_M, BLOCK_N,
                               TRANSPOSED=True)
        if BOUND_MASK:
            qT = tl.load(qT_ptrs, mask=offs_m[None, :] < T, other=0.0)
            do = tl.load(do_ptrs, mask=offs_m[:, None] < T, other=0.0)
            lse = tl.load(LSE + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=offs_m < T, other=0.0)
        else:
            qT = tl.load(qT_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        qT, do = _operand(qT, DTYPE, ROUNDING), _operand(do, DTYPE, ROUNDING)
        sT = _dot(k, qT, None, ROUNDING) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :] * LOG2E)
        if BOUND_MASK:
            valid = offs_m[None, :] < T
            if CAUSAL_MASK:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(valid, pT, 0.0)
        dpT = _dot(v, tl.trans(do), None, ROUNDING)  # d(dropped P)^T
        if DROPOUT:
            # the forward's mask, stored in (query, key) orientation, read transposed into these tiles; the
            # dropout scale s is applied once to dK and dV (and DELTA holds delta / s: see _attn_bwd_dq_kernel)
            if not PREFETCH_MASK:
                bits_here = _mask_bytes(MASK, W, offs_m, start_n, T, T, CAUSAL_MASK, BLOCK_M, BLOCK_N,
                                        TRANSPOSED=True)
            keep = _keep_of_bytes_t(bits_here, BLOCK_M, BLOCK_N)
            pT_dropped = tl.where(keep, pT, 0.0)
            dpT = tl.where(keep, dpT, 0.0)
        else:
            pT_dropped = pT
        # dS is formed (and narrowed to the dot dtype) before the dV dot, so the mask and the fp32 pT and
        # dpT tiles are dead during both dots: this keeps the sm_80 dropout variant from spilling
        dsT = _operand(pT * (dpT - delta[None, :]), DTYPE, ROUNDING)
        dv = _dot(_operand(pT_dropped, DTYPE, ROUNDING), do, dv, ROUNDING)
        dk = _dot(dsT, tl.trans(qT), dk, ROUNDING)
        qT_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, MASK, qk_scale, sm_scale, DROPOUT_SCALE, W, stride_slot,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd,
                          stride_dob, stride_doh, stride_dot, stride_dod,
                          stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                          H, T,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ROUNDING: tl.constexpr,
                          PREFETCH_MASK: tl.constexpr, PACKED: tl.constexpr):
    # PACKED: DK is the packed gradient d qkv (B, T, 3, H, D) itself and DV is None: dK and dV go to its k and v
    # slots, stride_slot (H * D) and twice that many elements in (the d qkv strides given as dK's and dV's)
    # the causal stages step through the diagonal key block in query blocks
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "dkdv needs BLOCK_N % BLOCK_M == 0")
    tl.static_assert(BLOCK_N % 8 == 0, "BLOCK_N must be a multiple of 8, the dropout draw group")
    DTYPE: tl.constexpr = DK.dtype.element_ty
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = bh // H, bh % H
    # this program's (batch, head) slice of every tensor; from here on only (t, d) offsets (the outputs' after
    # the loop, see _attn_fwd_kernel)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += bh * T
    DELTA += bh * T
    if DROPOUT:
        MASK += bh * T * W
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = offs_n[:, None] < T
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    k = _operand(k, DTYPE, ROUNDING)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    v = _operand(v, DTYPE, ROUNDING)
    qT_ptrs = Q + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd
    do_ptrs = DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # causal: the diagonal block (masked) first; then the whole query blocks (below the diagonal when causal),
    # unmasked; then the query tail, masked
    if CAUSAL:
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, LSE, DELTA, stride_qt, stride_dot, start_n,
                                      qk_scale, MASK, W, T, STAGE=STAGE_DIAG,
                                      CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DROPOUT=DROPOUT,
                                      PREFETCH_MASK=PREFETCH_MASK, ROUNDING=ROUNDING)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, LSE, DELTA, stride_qt, stride_dot, start_n,
                                  qk_scale, MASK, W, T, STAGE=STAGE_FULL,
                                  CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DROPOUT=DROPOUT,
                                  PREFETCH_MASK=PREFETCH_MASK, ROUNDING=ROUNDING)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, LSE, DELTA, stride_qt, stride_dot, start_n,
                                  qk_scale, MASK, W, T, STAGE=STAGE_TAIL,
                                  CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DROPOUT=DROPOUT,
                                  PREFETCH_MASK=PREFETCH_MASK, ROUNDING=ROUNDING)

    # dV = s (keep P)^T dO and dS = s P (keep dP - delta / s): the dropout scale s (1 without dropout) once per output
    dk *= sm_scale * DROPOUT_SCALE
    dv *= DROPOUT_SCALE
    if PACKED:
        DV = DK + 2 * stride_slot
        DK += stride_slot
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd, _stored(dk, DTYPE, ROUNDING),
             mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd, _stored(dv, DTYPE, ROUNDING),
             mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, start_m, qk_scale,
                       MASK, W, T,
                       STAGE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DROPOUT: tl.constexpr, PREFETCH_MASK: tl.constexpr,
                       ROUNDING: tl.constexpr):
    DTYPE: tl.constexpr = kT_ptrs.dtype.element_ty
    BOUND_MASK: tl.constexpr = STAGE != STAGE_FULL
    CAUSAL_MASK: tl.constexpr = STAGE == STAGE_DIAG
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lo, hi = _key_range(start_m, T, STAGE=STAGE, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    kT_ptrs += lo * stride_kt
    vT_ptrs += lo * stride_vt
    # with PREFETCH_MASK, each trip loads the next trip's mask bytes and uses those the trip before loaded: their
    # load's latency passes during a block's dots, where a load issued in the trip that uses it had only the two
    # small score dots to cover it (and at 1 program per SM on sm_90, no other program to switch to)
    bits = tl.zeros([1], dtype=tl.uint8)
    if DROPOUT and PREFETCH_MASK:
        bits = _mask_bytes(MASK, W, offs_m, lo, T, hi, CAUSAL_MASK, BLOCK_M, BLOCK_N, TRANSPOSED=False)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if DROPOUT and PREFETCH_MASK:
            bits_here = bits
            bits = _mask_bytes(MASK, W, offs_m, start_n + BLOCK_N, T, hi, CAUSAL_MASK, BLOCK_M, BLOCK_N,
                               TRANSPOSED=False)
        if BOUND_MASK:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < T, other=0.0)
            vT = tl.load(vT_ptrs, mask=offs_n[None, :] < T, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        kT, vT = _operand(kT, DTYPE, ROUNDING), _operand(vT, DTYPE, ROUNDING)
        s = _dot(q, kT, None, ROUNDING) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if BOUND_MASK:
            valid = offs_n[None, :] < T
            if CAUSAL_MASK:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, vT, None, ROUNDING)
        if DROPOUT:
            if not PREFETCH_MASK:
                bits_here = _mask_bytes(MASK, W, offs_m, start_n, T, T, CAUSAL_MASK, BLOCK_M, BLOCK_N,
                                        TRANSPOSED=False)
            keep = _keep_of_bytes(bits_here, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp, 0.0)  # unscaled: see delta in _attn_bwd_dq_kernel
        ds = p * (dp - delta[:, None])
        dq = _dot(_operand(ds, DTYPE, ROUNDING), tl.trans(kT), dq, ROUNDING)
        kT_ptrs += BLOCK_N * stride_kt
        vT_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, MASK, qk_scale, sm_scale, DROPOUT_SCALE, W,
                        stride_qb, stride_qh, stride_qt, stride_qd,
                        stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd,
                        stride_ob, stride_oh, stride_ot, stride_od,
                        stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                        H, T,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ROUNDING: tl.constexpr,
                        PREFETCH_MASK: tl.constexpr):
    # the causal stages step through the diagonal query block in key blocks
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "dq needs BLOCK_M % BLOCK_N == 0")
    tl.static_assert(BLOCK_N % 8 == 0, "BLOCK_N must be a multiple of 8, the dropout draw group")
    DTYPE: tl.constexpr = DQ.dtype.element_ty
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = bh // H, bh % H
    # this program's (batch, head) slice of every tensor; from here on only (t, d) offsets (the output's after
    # the loop, see _attn_fwd_kernel)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += bh * T
    DELTA += bh * T
    if DROPOUT:
        MASK += bh * T * W
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_mask[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=row_mask[:, None], other=0.0)
    o = tl.load(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=row_mask[:, None], other=0.0)
    # delta = rowsum(dO * O) (O as stored, in the input dtype, as FlashAttention does). This kernel owns
    # these rows, so it computes delta here and saves it for the dK/dV kernel, which is launched after it:
    # no separate preprocess launch and no extra pass over O and dO.
    # With dropout, dS = P (s keep dP - delta) = s P (keep dP - delta / s): both kernels take delta / s and apply
    # the dropout scale s once to their outputs rather than to every dP (and P) element.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    if DROPOUT:
        delta = delta * (1.0 / DROPOUT_SCALE)
    tl.store(DELTA + offs_m, delta, mask=row_mask)
    q, do = _operand(q, DTYPE, ROUNDING), _operand(do, DTYPE, ROUNDING)
    lse = tl.load(LSE + offs_m, mask=row_mask, other=0.0) * LOG2E
    kT_ptrs = K + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    vT_ptrs = V + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # the whole key blocks unmasked, then the diagonal block (causal) or the key tail, masked
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, start_m, qk_scale,
                            MASK, W, T, STAGE=STAGE_FULL, CAUSAL=CAUSAL,
                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DROPOUT=DROPOUT,
                            PREFETCH_MASK=PREFETCH_MASK, ROUNDING=ROUNDING)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, start_m, qk_scale,
                            MASK, W, T, STAGE=STAGE_DIAG if CAUSAL else STAGE_TAIL,
                            CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DROPOUT=DROPOUT,
                            PREFETCH_MASK=PREFETCH_MASK, ROUNDING=ROUNDING)

    dq *= sm_scale * DROPOUT_SCALE  # the dropout scale s (1 without dropout), see delta above
    DQ += off_b * stride_dqb + off_h * stride_dqh
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd, _stored(dq, DTYPE, ROUNDING),
             mask=row_mask[:, None])


@triton.jit
def _short_tile(PTR, stride_t, stride_d, offs_t, offs_d, row_ok, DTYPE: tl.constexpr, ROUNDING: tl.constexpr):
    """A head's whole (BLOCK_T, HEAD_DIM) tile of q, k, v or dO as a _dot operand, rows >= T read as 0."""
    x = tl.load(PTR + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d, mask=row_ok[:, None], other=0.0)
    return _operand(x, DTYPE, ROUNDING)


@triton.jit
def _attn_fwd_short_kernel(Q, K, V, O, LSE, MASK, qk_scale, DROPOUT_SCALE, W,
                           stride_qb, stride_qh, stride_qt, stride_qd,
                           stride_kb, stride_kh, stride_kt, stride_kd,
                           stride_vb, stride_vh, stride_vt, stride_vd,
                           stride_ob, stride_oh, stride_ot, stride_od,
                           H, T, BH,
                           HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, CAUSAL: tl.constexpr,
                           DROPOUT: tl.constexpr, ROUNDING: tl.constexpr, HEAD_STAGES: tl.constexpr):
    """The forward for short sequences (T <= BLOCK_T): each program walks the (batch, head) pairs program_id,
    program_id + programs, ... and takes a head's whole (T, T) scores at once: one exact softmax, no running max.
    At T <= 128 the tiled kernel's programs each own one or two key blocks, so every one waits on its loads with
    nothing to hide them behind; here the loop over heads is the pipelined loop (HEAD_STAGES), the next head's
    tiles loading while this one computes. The dropout keep-mask is read from _dropout_mask_kernel's bytes."""
    tl.static_assert(BLOCK_T % 16 == 0, "BLOCK_T must be a multiple of 16")
    DTYPE: tl.constexpr = O.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_t < T
    # rows >= T keep their keys < T: finite scores, never a row of -inf (their outputs are not stored)
    valid = row_ok[None, :]
    if CAUSAL:
        valid = valid & (offs_t[:, None] >= offs_t[None, :])
    for bh in tl.range(tl.program_id(0), BH, tl.num_programs(0), num_stages=HEAD_STAGES):
        bh = tl.cast(bh, tl.int64)  # a Python int under the interpreter
        off_b, off_h = bh // H, bh % H
        q = _short_tile(Q + off_b * stride_qb + off_h * stride_qh, stride_qt, stride_qd, offs_t, offs_d, row_ok,
                        DTYPE, ROUNDING)
        k = _short_tile(K + off_b * stride_kb + off_h * stride_kh, stride_kt, stride_kd, offs_t, offs_d, row_ok,
                        DTYPE, ROUNDING)
        v = _short_tile(V + off_b * stride_vb + off_h * stride_vh, stride_vt, stride_vd, offs_t, offs_d, row_ok,
                        DTYPE, ROUNDING)
        s = tl.where(valid, _dot(q, tl.trans(k), None, ROUNDING) * qk_scale, float("-inf"))
        m = tl.max(s, 1)
        p = tl.math.exp2(s - m[:, None])
        inv_l = 1.0 / tl.sum(p, 1)  # the normalizer counts dropped entries too
        lse = (m - tl.math.log2(inv_l)) * LN2
        if DROPOUT:
            bits = _mask_bytes(MASK + bh * T * W, W, offs_t, 0, T, T, CAUSAL, BLOCK_T, BLOCK_T, TRANSPOSED=False)
            p = tl.where(_keep_of_bytes(bits, BLOCK_T, BLOCK_T), p, 0.0)
            inv_l = inv_l * DROPOUT_SCALE
        o = _dot(_operand(p, DTYPE, ROUNDING), v, None, ROUNDING) * inv_l[:, None]
        tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :] * stride_od,
                 _stored(o, DTYPE, ROUNDING), mask=row_ok[:, None])
        tl.store(LSE + bh * T + offs_t, lse, mask=row_ok)


@triton.jit
def _attn_bwd_short_kernel(Q, K, V, O, DO, DQ, DK, DV, LSE, MASK, qk_scale, sm_scale, DROPOUT_SCALE, W, stride_slot,
                           stride_qb, stride_qh, stride_qt, stride_qd,
                           stride_kb, stride_kh, stride_kt, stride_kd,
                           stride_vb, stride_vh, stride_vt, stride_vd,
                           stride_ob, stride_oh, stride_ot, stride_od,
                           stride_dob, stride_doh, stride_dot, stride_dod,
                           stride_gb, stride_gh, stride_gt, stride_gd,
                           H, T, BH,
                           HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                           CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ROUNDING: tl.constexpr,
                           HEAD_STAGES: tl.constexpr, PACKED: tl.constexpr):
    """The backward for short sequences (T <= BLOCK_T), walking the heads as _attn_fwd_short_kernel does. A
    program holds a head's whole k and v and takes its queries BLOCK_M rows at a time (the (BLOCK_M, T) score tiles
    of a 128-row head at once would not fit in registers): dQ of those rows is complete when they are done, dK and
    dV accumulate over them. Five dots per tile where the tiled backward's two kernels take seven (each recomputes
    the scores and dP), every tile loaded once, delta = rowsum(dO * O) computed in place, one launch. The three
    gradients share the strides stride_g*: DQ, DK, DV are three tensors of the same layout, or with PACKED DQ is the
    packed gradient d qkv (B, T, 3, H, D) itself and DK, DV are None, its k and v slots stride_slot and twice that
    many elements in (see _attn_bwd_dkdv_kernel's PACKED)."""
    tl.static_assert(BLOCK_T % BLOCK_M == 0, "BLOCK_T must be a multiple of BLOCK_M")
    tl.static_assert(BLOCK_M % 16 == 0, "BLOCK_M must be a multiple of 16")
    DTYPE: tl.constexpr = DQ.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_t < T
    g_offs = offs_t[:, None] * stride_gt + offs_d[None, :] * stride_gd
    for bh in tl.range(tl.program_id(0), BH, tl.num_programs(0), num_stages=HEAD_STAGES):
        bh = tl.cast(bh, tl.int64)  # a Python int under the interpreter
        off_b, off_h = bh // H, bh % H
        k = _short_tile(K + off_b * stride_kb + off_h * stride_kh, stride_kt, stride_kd, offs_t, offs_d, key_ok,
                        DTYPE, ROUNDING)
        v = _short_tile(V + off_b * stride_vb + off_h * stride_vh, stride_vt, stride_vd, offs_t, offs_d, key_ok,
                        DTYPE, ROUNDING)
        dk = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
        G = off_b * stride_gb + off_h * stride_gh
        for start_m in tl.static_range(0, BLOCK_T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q = _short_tile(Q + off_b * stride_qb + off_h * stride_qh, stride_qt, stride_qd, offs_m, offs_d, row_ok,
                            DTYPE, ROUNDING)
            do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot
                         + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
            o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot
                        + offs_d[None, :] * stride_od, mask=row_ok[:, None], other=0.0)
            # delta = rowsum(dO * O), O as stored (see _attn_bwd_dq_kernel); with dropout taken as delta / s, the
            # dropout scale s applied once to the outputs
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            if DROPOUT:
                delta = delta * (1.0 / DROPOUT_SCALE)
            do = _operand(do, DTYPE, ROUNDING)
            lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0) * LOG2E
            valid = row_ok[:, None] & key_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_t[None, :])
            p = tl.where(valid, tl.math.exp2(_dot(q, tl.trans(k), None, ROUNDING) * qk_scale - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), None, ROUNDING)
            if DROPOUT:
                bits = _mask_bytes(MASK + bh * T * W, W, offs_m, 0, T, T, CAUSAL, BLOCK_M, BLOCK_T, TRANSPOSED=False)
                keep = _keep_of_bytes(bits, BLOCK_M, BLOCK_T)
                dv = _dot(tl.trans(_operand(tl.where(keep, p, 0.0), DTYPE, ROUNDING)), do, dv, ROUNDING)
                dp = tl.where(keep, dp, 0.0)
            else:
                dv = _dot(tl.trans(_operand(p, DTYPE, ROUNDING)), do, dv, ROUNDING)
            ds = _operand(p * (dp - delta[:, None]), DTYPE, ROUNDING)
            dq = _dot(ds, k, None, ROUNDING) * (sm_scale * DROPOUT_SCALE)
            tl.store(DQ + G + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gd, _stored(dq, DTYPE, ROUNDING),
                     mask=row_ok[:, None])
            dk = _dot(tl.trans(ds), q, dk, ROUNDING)
        dk *= sm_scale * DROPOUT_SCALE
        dv *= DROPOUT_SCALE
        if PACKED:
            tl.store(DQ + stride_slot + G + g_offs, _stored(dk, DTYPE, ROUNDING), mask=key_ok[:, None])
            tl.store(DQ + 2 * stride_slot + G + g_offs, _stored(dv, DTYPE, ROUNDING), mask=key_ok[:, None])
        else:
            tl.store(DK + G + g_offs, _stored(dk, DTYPE, ROUNDING), mask=key_ok[:, None])
            tl.store(DV + G + g_offs, _stored(dv, DTYPE, ROUNDING), mask=key_ok[:, None])


@triton.jit
def _dropout_mask_kernel(MASK, SEED, DROP_THRESHOLD, T, W, CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """Every byte of the packed keep-mask's rows [program 0 * BLOCK_R, ...) of head program 1: byte g of row i
    holds the keep bits of keys 8g ... 8g + 7 (those >= T drawn 0) when 8g < T and, causal, 8g <= i (every byte the
    attention kernels read, see _mask_bytes); the others, above the diagonal and the row padding, are 0. A function
    of (seed, i, g) alone, whatever BLOCK_R and BLOCK_C: the Philox calls in their own layout, no tile changes
    register layout, and with a few registers many programs per SM hide the multiplies' latency."""
    bh = tl.program_id(1).to(tl.int64)
    row0 = tl.program_id(0) * BLOCK_R
    rows = row0 + tl.arange(0, BLOCK_R)
    MASK += bh * T * W
    ptrs = MASK + rows[:, None] * W + tl.arange(0, BLOCK_C // 8)[None, :]
    row_ok = rows[:, None] < T
    # keys drawn: all of them, or causal those up to the block's last row; the bytes past them are zeros
    drawn = tl.minimum(row0 + BLOCK_R, T) if CAUSAL else T
    for start in range(0, drawn, BLOCK_C):
        r0, r1, r2, r3 = dropout_words(SEED, bh, rows, start, BLOCK_R, BLOCK_C)
        first = start + tl.arange(0, BLOCK_C // 8)[None, :] * 8  # each byte's first key
        ok = first < T
        if CAUSAL:
            ok = ok & (first <= rows[:, None])
        bits = tl.where(ok, bits_from_words(r0, r1, r2, r3, DROP_THRESHOLD), 0).to(tl.uint8)
        tl.store(ptrs + start // 8, bits, mask=row_ok & (first < W * 8))
    zeros = tl.zeros([BLOCK_R, BLOCK_C // 8], dtype=tl.uint8)
    for start in range(tl.cdiv(drawn, BLOCK_C) * BLOCK_C, W * 8, BLOCK_C):
        first = start + tl.arange(0, BLOCK_C // 8)[None, :] * 8
        tl.store(ptrs + start // 8, zeros, mask=row_ok & (first < W * 8))


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed by (compute capability major, head dim, is fp32).
# fwd and dq need BLOCK_M % BLOCK_N == 0, dkdv needs BLOCK_N % BLOCK_M == 0 (the causal stages step through
# the diagonal block in the smaller block); BLOCK_N (the key block of every kernel) must be a multiple of
# 8, the dropout draw group (the kernels check both with tl.static_assert). Chosen with
# `python -m bench.compile_report`: the largest tiles that compile with dropout (Philox costs registers) without
# spilling, using wgmma on sm_90 (whose M is BLOCK_M for fwd/dq and BLOCK_N for dkdv, so those stay >= 64 per
# warpgroup). The fp32 entries are for exact fp32 dots (torch's default precision, see _rounding), which run on the
# FMA units: each thread holds its rows of one operand and its columns of the other over the whole reduction, so
# they take smaller tiles than 16-bit ones, no wgmma on sm_90. Tiles chosen when the dots were TF32 spilled that way:
# fwd D=64, 128 on both archs, D=32 on sm_90, dkdv and dq D=64 on sm_90 (under triton 3.6 and 3.9), dkdv D=128 on
# both (under 3.6). Those below spill under neither, most with 8 warps, which halve each thread's share. The TF32
# path ("high") uses the same tiles.
_SMALL_D = (16, 32, 64)
_CONFIGS = {
    **{(9, d, False): dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 8, 3)) for d in _SMALL_D},
    (9, 128, False): dict(fwd=(128, 32, 8, 3), dkdv=(16, 64, 8, 3), dq=(64, 32, 8, 3)),
    (9, 16, True): dict(fwd=(64, 32, 4, 2), dkdv=(16, 64, 4, 2), dq=(64, 32, 4, 2)),
    (9, 32, True): dict(fwd=(64, 32, 8, 1), dkdv=(16, 64, 4, 2), dq=(64, 32, 4, 2)),
    (9, 64, True): dict(fwd=(64, 16, 8, 2), dkdv=(32, 64, 8, 1), dq=(64, 32, 8, 2)),
    (9, 128, True): dict(fwd=(64, 16, 8, 2), dkdv=(16, 32, 8, 2), dq=(32, 16, 4, 2)),
    # fwd 128x64 spilled under triton 3.9 once it stored the packed dropout mask; 128x32 spills under neither
    **{(8, d, False): dict(fwd=(128, 32, 8, 2), dkdv=(32, 128, 8, 2), dq=(128, 32, 8, 2)) for d in (32, 64)},
    (8, 16, False): dict(fwd=(128, 64, 8, 2), dkdv=(32, 128, 8, 2), dq=(64, 32, 4, 2)),
    (8, 128, False): dict(fwd=(64, 32, 4, 2), dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 2)),
    (8, 16, True): dict(fwd=(64, 32, 4, 2), dkdv=(16, 32, 4, 2), dq=(64, 16, 4, 2)),
    # since the backward applies the dropout scale to its outputs, dq 64x32 w8 (D=64) spills a register under
    # triton 3.6 and dkdv 16x32 w4 (D=32, 64) under 3.9
    (8, 32, True): dict(fwd=(64, 32, 4, 2), dkdv=(16, 32, 8, 2), dq=(64, 32, 8, 2)),
    (8, 64, True): dict(fwd=(64, 16, 8, 2), dkdv=(16, 32, 8, 2), dq=(32, 32, 8, 2)),
    (8, 128, True): dict(fwd=(32, 16, 8, 2), dkdv=(32, 32, 8, 2), dq=(64, 32, 8, 2)),
}
# The interpreter runs each program in Python: small blocks keep the tests quick and exercise the
# multi-block, diagonal-stage and tail paths on small T.
_INTERPRETER_CONFIG = dict(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1))
# The short-sequence launches of 16-bit inputs per (arch, head dim) (see SHORT_BLOCK_M's comment for the format), in
# every launch config of those keys: _tuned_configs adds them. fp32 and D = 128 run the tiled kernels at every
# length. Registers (sm_90, D = 64, with dropout): forward 154 at BLOCK_T <= 64 (4 warps, three programs per SM),
# 254 at 128 (8 warps, one); backward 231 at BLOCK_T <= 64 (8 warps, one).
_SHORT_CONFIGS = {
    **{(9, d): dict(fwd=((64, 4, 2, 3), (128, 8, 2, 1)), bwd=((64, 8, 2, 1),)) for d in (16, 32, 64)},
    **{(8, d): dict(fwd=((64, 4, 1, 2), (128, 8, 1, 1)), bwd=((64, 8, 1, 1),)) for d in (16, 32)},
    (8, 64): dict(fwd=((64, 4, 1, 2), (128, 8, 1, 1)), bwd=()),
}


# Where the forward's dropout keep-mask comes from: "kernel", _dropout_mask_kernel launched just before it (the
# forward then reads the packed bytes as the backward kernels do), or "inline", drawn by the forward between its
# dots (see the module docstring's cost figures). A config dict may say "draw" (tests; bench.tune_attention times
# both ways in one run: the mask kernel + the forward against the forward drawing inline).
MASK_DRAW = "kernel"

# Short sequences: a launch config's "short" entry, dict(fwd=..., bwd=...), lists for each direction the launches
# (max BLOCK_T, num_warps, HEAD_STAGES, programs per SM) of _attn_fwd_short_kernel / _attn_bwd_short_kernel, where
# BLOCK_T is T rounded up to a power of two, at least 16 (_short_block): a T whose BLOCK_T is above every max runs
# the tiled kernels, as does a forward that draws its keep-mask inline (MASK_DRAW "inline"). Chosen with
# `python -m bench.compile_report` under triton 3.6: the backward's whole-head tiles spill at BLOCK_T = 128 on both
# archs (its dK and dV accumulators beside a (64, 128) score tile and dP), and on sm_80 at D = 64 already.
SHORT_BLOCK_M = 64  # the backward's query rows per tile
# _dropout_mask_kernel's (BLOCK_R, BLOCK_C, num_warps): a (BLOCK_R, BLOCK_C // 8) tile of Philox calls per loop trip
_MASK_CONFIG = (32, 64, 4)
_MASK_CONFIG_INTERPRETER = (16, 32, 4)


# The measured table (kernels/attention_tuned.json, written by `python -m bench.tune_attention` on a GPU and
# committed): per (arch, head dim, dtype class, T bucket, dropout, kernel) a config that beat _CONFIGS' there.
# The best tiles depend on T (short sequences want more, smaller programs) and on dropout (the mask bits cost
# registers and bandwidth), which _CONFIGS cannot express. A kernel without an entry keeps its _CONFIGS config.
_TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_tuned.json")
T_BUCKETS = (128, 256, 512, 1024, 2048)  # a T uses the smallest bucket >= T; T above 2048 uses 2048's entries
KINDS = ("fwd", "dq", "dkdv")
_DTYPE_CLASSES = {"16-bit": False, "fp32": True}  # fp16 and bf16 share their configs, as in _CONFIGS
_ENTRY_KEYS = ("arch", "head_dim", "dtype", "T_bucket", "dropout", "kind", "block_m", "block_n", "num_warps",
               "num_stages")
# where an entry came from: the GPU, versions and commit that measured it, its ms and the ms of the default
# config it replaced (and that default, [BLOCK_M, BLOCK_N, num_warps, num_stages])
_PROVENANCE_KEYS = ("gpu", "triton", "torch", "commit", "ms", "default_ms", "default")


def _t_bucket(T):
    """The tuned table's sequence-length bucket of T: the next power of two, clamped to [128, 2048]."""
    return min(max(1 << (T - 1).bit_length(), T_BUCKETS[0]), T_BUCKETS[-1])


def block_rule_error(kind, block_m, block_n, num_warps, num_stages):
    """Why (BLOCK_M, BLOCK_N, num_warps, num_stages) cannot launch `kind` (see _CONFIGS' rules), or None."""
    for name, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("num_warps", num_warps)):
        if type(value) is not int or value < 1 or value & (value - 1):
            return f"{name} = {value!r} is not a power of two"
    if not (16 <= block_m <= 256 and 16 <= block_n <= 256):
        return f"blocks {block_m}x{block_n}: each must be 16 to 256 (tl.dot's smallest side is 16)"
    if num_warps > 16 or type(num_stages) is not int or not 1 <= num_stages <= 8:
        return f"num_warps = {num_warps!r} (at most 16), num_stages = {num_stages!r} (1 to 8)"
    if kind in ("fwd", "dq") and block_m % block_n:
        return f"{kind} needs BLOCK_M % BLOCK_N == 0, got {block_m}x{block_n}"
    if kind == "dkdv" and block_n % block_m:
        return f"dkdv needs BLOCK_N % BLOCK_M == 0, got {block_m}x{block_n}"
    return None  # BLOCK_N % 8 == 0 (the dropout draw group) follows from a power of two >= 16


def _entry_label(e):
    if not isinstance(e, dict):
        return repr(e)[:60]
    return (f"({e.get('arch')} D={e.get('head_dim')} {e.get('dtype')} T<={e.get('T_bucket')} "
            f"{'dropout' if e.get('dropout') else 'no dropout'} {e.get('kind')})")


def _parse_entry(e):
    """(key, config) of one table entry, key = (major, head dim, fp32, T bucket, dropout, kind); ValueError says
    what is wrong with it."""
    if not isinstance(e, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in _ENTRY_KEYS if k not in e]
    unknown = sorted(set(e) - set(_ENTRY_KEYS) - set(_PROVENANCE_KEYS))
    if missing or unknown:
        raise ValueError(f"missing fields {missing}, unknown fields {unknown}")
    checks = ((e["arch"] in TUNED_ARCHS, f"arch {e['arch']!r} is not one of {sorted(TUNED_ARCHS)}"),
              (e["head_dim"] in HEAD_DIMS, f"head_dim {e['head_dim']!r} is not one of {HEAD_DIMS}"),
              (e["dtype"] in _DTYPE_CLASSES, f"dtype {e['dtype']!r} is not one of {sorted(_DTYPE_CLASSES)}"),
              (e["T_bucket"] in T_BUCKETS, f"T_bucket {e['T_bucket']!r} is not one of {T_BUCKETS}"),
              (isinstance(e["dropout"], bool), f"dropout {e['dropout']!r} is not true or false"),
              (e["kind"] in KINDS, f"kind {e['kind']!r} is not one of {KINDS}"))
    for ok, why in checks:
        if not ok:
            raise ValueError(why)
    cfg = (e["block_m"], e["block_n"], e["num_warps"], e["num_stages"])
    why = block_rule_error(e["kind"], *cfg)
    if why:
        raise ValueError(why)
    key = (TUNED_ARCHS[e["arch"]], e["head_dim"], _DTYPE_CLASSES[e["dtype"]], e["T_bucket"], e["dropout"], e["kind"])
    return key, cfg


def parse_tuned_table(data, source="tuned table"):
    """{(major, head dim, fp32, T bucket, dropout, kind): (BLOCK_M, BLOCK_N, num_warps, num_stages)} of a table:
    a JSON object whose "entries" is a list of objects with the fields _ENTRY_KEYS (and optionally
    _PROVENANCE_KEYS); other top-level fields ("about", "environment") are free. Raises ValueError naming the
    first bad entry: a field missing, unknown or out of range, a config that breaks the block rules, a duplicate."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f'{source}: expected a JSON object with an "entries" list')
    table = {}
    for i, e in enumerate(data["entries"]):
        try:
            key, cfg = _parse_entry(e)
            if key in table:
                raise ValueError("a second entry for the same key")
        except ValueError as exc:
            raise ValueError(f"{source}: entry {i} {_entry_label(e)}: {exc}") from None
        table[key] = cfg
    return table


def load_tuned_table(path=_TUNED_PATH):
    """The parsed table of a JSON file; {} when there is none (an install without the file runs on _CONFIGS)."""
    data = read_tuned_json(path, "tune_attention")
    return {} if data is None else parse_tuned_table(data, path)


_TUNED = load_tuned_table()


def _prefetch_mask(major, fp32):
    """Whether the backward kernels load their dropout mask bytes a loop trip ahead: on sm_90 (and under the
    interpreter, major 0, which tests the path) for 16-bit inputs. The two registers it holds spill at the sm_80
    dK/dV kernel's 255 (D=64, 16-bit) and in some fp32 variants (bench.compile_report), which load in the trip."""
    return not fp32 and (major == 0 or major >= 9)


@functools.cache
def _major(device):
    """The CUDA compute capability's major version of a device (0 off CUDA)."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0


def _kernel_spec(name, kind, d, dtype, dropout, cfg, major, draw=MASK_DRAW):
    """One COMPILE_SPECS entry: the `kind` kernel at the GPT-1 shapes (see _compile_specs), causal; the forward
    with its dropout mask drawn as `draw` says (see MASK_DRAW)."""
    fn = dict(fwd=_attn_fwd_kernel, dkdv=_attn_bwd_dkdv_kernel, dq=_attn_bwd_dq_kernel)[kind]
    tensors = dict(fwd="QKVO", dkdv=("Q", "K", "V", "DO", "DK", "DV"), dq=("Q", "K", "V", "O", "DO", "DQ"))[kind]
    block_m, block_n, num_warps, num_stages = cfg
    sig = {n: "i32:16" for n in fn.arg_names if n.startswith("stride") and not n.endswith("d")}
    sig.update({n: f"*{dtype}:16" for n in tensors})
    sig.update(LSE="*fp32:16", DELTA="*fp32:16", qk_scale="fp32", sm_scale="fp32", DROP_THRESHOLD="i32",
               DROPOUT_SCALE="fp32", H="i32", T="i32:16", W="i32:16")
    if dropout:
        sig.update(SEED="*i64:16", MASK="*u8:16")
    sig = {n: t for n, t in sig.items() if n in fn.arg_names}
    consts = {n: 1 for n in fn.arg_names if n.startswith("stride") and n.endswith("d")}
    consts.update(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=True, DROPOUT=dropout,
                  ROUNDING="ieee" if dtype == "fp32" else "none")  # fp32: torch's default precision
    if "PREFETCH_MASK" in fn.arg_names:
        consts.update(PREFETCH_MASK=_prefetch_mask(major, dtype == "fp32"))
    if "DRAW" in fn.arg_names:
        consts.update(DRAW=dropout and draw == "inline")
    if "PACKED" in fn.arg_names:  # the model's: d qkv written whole (fused_attention_qkv)
        consts.update(PACKED=True, DV=None)
        del sig["DV"]
    if not dropout:
        consts.update({n: None for n in ("SEED", "MASK") if n in fn.arg_names})
    return dict(name=name, fn=fn, signature=sig, constexprs=consts, num_warps=num_warps, num_stages=num_stages,
                archs=(major * 10,))


def _short_spec(name, kind, d, dtype, dropout, launch, major):
    """One COMPILE_SPECS entry of a short kernel (kind "fwd" or "bwd") at its largest BLOCK_T, causal, q/k/v strided
    views of a (B, T, 3, H, D) tensor as in _kernel_spec, the backward writing d qkv whole (PACKED)."""
    block_t, num_warps, stages, _ = launch
    fn = _attn_fwd_short_kernel if kind == "fwd" else _attn_bwd_short_kernel
    tensors = "QKVO" if kind == "fwd" else ("Q", "K", "V", "O", "DO", "DQ")
    sig = {n: "i32:16" for n in fn.arg_names if n.startswith("stride") and not n.endswith("d")}
    sig.update({n: f"*{dtype}:16" for n in tensors})
    sig.update(LSE="*fp32:16", qk_scale="fp32", sm_scale="fp32", DROPOUT_SCALE="fp32", H="i32", T="i32:16",
               W="i32:16", BH="i32")
    if dropout:
        sig.update(MASK="*u8:16")
    sig = {n: t for n, t in sig.items() if n in fn.arg_names}
    consts = {n: 1 for n in fn.arg_names if n.startswith("stride") and n.endswith("d")}
    consts.update(HEAD_DIM=d, BLOCK_T=block_t, CAUSAL=True, DROPOUT=dropout, ROUNDING="none", HEAD_STAGES=stages)
    if not dropout:
        consts.update(MASK=None)
    if kind == "bwd":
        consts.update(BLOCK_M=min(SHORT_BLOCK_M, block_t), PACKED=True, DK=None, DV=None)
    return dict(name=name, fn=fn, signature=sig, constexprs=consts, num_warps=num_warps, num_stages=stages,
                archs=(major * 10,))


def _kernel_specs(name, kind, d, dtype, dropout, cfg, major):
    """The spec of one launch, and for a bf16 D=64 forward with dropout its twin drawing the mask inline."""
    specs = [_kernel_spec(name, kind, d, dtype, dropout, cfg, major)]
    if kind == "fwd" and dropout and d == 64 and dtype == "bf16":
        specs.append(_kernel_spec(name + " inline draw", kind, d, dtype, dropout, cfg, major, draw="inline"))
    return specs


def _compile_specs():
    """COMPILE_SPECS for bench.compile_report (format in its docstring): each table entry for its arch at the
    GPT-1 shapes (T=512, H=12, q/k/v strided views of a (B, T, 3, H, D) tensor), causal with dropout (the
    training case, the most registers); for D=64 also without dropout (SEED is then None, as the launchers
    pass it) and in fp16. Then each distinct launch of the tuned table that is not its default, for its arch,
    dtype class and dropout, named by the T buckets that use it; the 16-bit D=64 forwards with dropout also with
    their mask drawn inline (MASK_DRAW's alternative), and the mask kernel."""
    specs = []
    for (major, d, fp32), cfg in _CONFIGS.items():
        variants = [("fp32" if fp32 else "bf16", True)]
        if d == 64 and not fp32:
            variants += [("bf16", False), ("fp16", True)]
        for dtype, dropout in variants:
            for kind in cfg:
                name = f"attn_{kind} D={d} {dtype} causal{' dropout' if dropout else ''}"
                specs += _kernel_specs(name, kind, d, dtype, dropout, cfg[kind], major)
    buckets = {}  # one spec per distinct tuned launch, naming the T buckets that use it
    for (major, d, fp32, bucket, dropout, kind), cfg in sorted(_TUNED.items()):
        if cfg != _CONFIGS[(major, d, fp32)][kind]:
            buckets.setdefault((major, d, fp32, dropout, kind, cfg), []).append(bucket)
    for (major, d, fp32, dropout, kind, cfg), ts in buckets.items():
        dtype = "fp32" if fp32 else "bf16"
        name = f"attn_{kind} D={d} {dtype} causal{' dropout' if dropout else ''} T<={','.join(map(str, ts))} tuned"
        specs += _kernel_specs(name, kind, d, dtype, dropout, cfg, major)
    for (major, d), short in _SHORT_CONFIGS.items():
        for kind, launches in short.items():
            for launch in launches:
                for dtype, dropout in [("bf16", True)] + ([("bf16", False)] if d == 64 else []):
                    name = f"attn_{kind}_short D={d} {dtype} causal{' dropout' if dropout else ''} T<={launch[0]}"
                    specs.append(_short_spec(name, kind, d, dtype, dropout, launch, major))
    block_r, block_c, num_warps = _MASK_CONFIG
    specs.append(dict(name="attn_dropout_mask causal", fn=_dropout_mask_kernel,
                      signature=dict(MASK="*u8:16", SEED="*i64:16", DROP_THRESHOLD="i32", T="i32:16", W="i32:16"),
                      constexprs=dict(CAUSAL=True, BLOCK_R=block_r, BLOCK_C=block_c), num_warps=num_warps,
                      num_stages=1))
    return specs


COMPILE_SPECS = _compile_specs()


def _tuned_configs(major, head_dim, fp32, bucket, dropout):
    """{fwd, dq, dkdv}: each kernel's tuned entry for these keys, else its _CONFIGS config; and "short", the
    short-sequence launches of _SHORT_CONFIGS for 16-bit inputs."""
    base = _CONFIGS[(major, head_dim, fp32)]
    cfg = {kind: _TUNED.get((major, head_dim, fp32, bucket, dropout, kind), c) for kind, c in base.items()}
    return dict(cfg, short=None if fp32 else _SHORT_CONFIGS.get((major, head_dim)))


@functools.cache
def _config_for(device, head_dim, fp32, T, dropout):
    """The launch configurations {fwd, dq, dkdv} for a device, head dim, dtype class, sequence length and dropout
    (cached: the capability query and the table lookups are not free and this runs on every call; keyed by T
    rather than its bucket, which saves the bucketing per call for a few entries more)."""
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    major = torch.cuda.get_device_capability(device)[0]
    return _tuned_configs(9 if major >= 9 else 8, head_dim, fp32, _t_bucket(T), dropout)


def _config(q, dropout):
    return _config_for(q.device, q.shape[-1], q.dtype == torch.float32, q.shape[2], dropout)


@contextlib.contextmanager
def short_configs(short):
    """For as long as the block runs, every launch's configuration has `short` as its short-sequence entry: None
    turns the short kernels off (the tiled kernels at every T), a dict like _SHORT_CONFIGS' values gives them to
    configurations that have none (the interpreter's). For the benchmarks and the tests."""
    global _config
    config = _config
    _config = lambda q, dropout: {**config(q, dropout), "short": short}  # noqa: E731
    try:
        yield
    finally:
        _config = config


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, dropout_p=0.0):
    check_tensors("fused_attention: ", q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"fused_attention: {name} must have shape (B, H, T, D), got rank {t.dim()} "
                             f"shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"fused_attention: q, k, v must have the same shape (B, H, T, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"fused_attention: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in DTYPES:
        raise TypeError(f"fused_attention: dtype {q.dtype} is not supported (use float16, bfloat16 or float32)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"fused_attention: q, k, v must be on the same device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"fused_attention: head dim {q.shape[-1]} is not supported (one of {HEAD_DIMS})")
    if q.shape[0] * q.shape[1] > 65535:
        raise ValueError(f"fused_attention: B*H = {q.shape[0] * q.shape[1]} exceeds the grid limit 65535")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"fused_attention: dropout_p must be in [0, 1), got {dropout_p}")


def _fp32_matmul_tf32():
    """Whether torch lets fp32 matmuls use TF32 on CUDA: set_float32_matmul_precision "high" or "medium" (its
    default, "highest", does not). torch 2.9 added the per-backend setting, which the old setters write too;
    once it is set directly, the old getters raise (they see the old and new APIs mixed), so it is read first."""
    try:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    except AttributeError:  # torch < 2.9
        return torch.get_float32_matmul_precision() != "highest"


def _rounding(q):
    """The ROUNDING constexpr of the kernels (see _operand and _dot), chosen at every launch, not cached: for
    fp32, "ieee" (exact fp32 dots) or "tf32" (operands rounded to nearest TF32, TF32 dots) as torch's fp32
    matmul precision says, on a GPU and under the interpreter alike (whose dots are exact either way); for
    bf16 under the interpreter "bf16" (bit-exact rounding); otherwise "none", a plain cast to the input dtype."""
    if q.dtype == torch.float32:
        return "tf32" if _fp32_matmul_tf32() else "ieee"
    return "bf16" if q.dtype == torch.bfloat16 and INTERPRET else "none"


def _scale(q, softmax_scale):
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _mask_row_bytes(T):
    """W, the bytes per row of the packed keep-mask: one bit per key, rows padded to 16 bytes (aligned loads)."""
    return cdiv(cdiv(T, 8), 16) * 16


def _new_mask(B, H, T, device, zeroed):
    """The packed keep-mask buffer (B*H, T, W) uint8. _dropout_mask_kernel writes every byte of it; a forward that
    draws inline writes the bytes of every (row, key) it visits (with a column < T), and the backward kernels read
    no other: for it the rest (above the causal diagonal, the row padding) is zeroed (`zeroed`, one memset), so
    that the operator's output is deterministic."""
    shape = (B * H, T, _mask_row_bytes(T))
    return (torch.zeros if zeroed else torch.empty)(shape, dtype=torch.uint8, device=device)


def _launch_mask(mask, seed, dropout_p, causal, T):
    """_dropout_mask_kernel into mask (B*H, T, W): the whole mask, or causal its bytes up to the diagonal."""
    block_r, block_c, num_warps = _MASK_CONFIG_INTERPRETER if INTERPRET else _MASK_CONFIG
    block_c = max(16, min(block_c, next_power_of_2(T)))
    return launchable(_dropout_mask_kernel, mask)[(cdiv(T, block_r), mask.shape[0])](
        mask, seed, dropout_args(dropout_p)[0], T, mask.shape[2], CAUSAL=causal, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=num_warps)


def attention_forward(q, k, v, *, causal=True, softmax_scale=None, dropout_p=0.0, seed=0, config=None):
    """Returns (o, lse): o (B, H, T, D) in q's dtype (a view of a (B, T, H, D) buffer), lse (B, H, T) fp32
    natural-log log-sum-exp of the scaled, masked scores of each row. seed: an int or a 1-element int64
    tensor on q's device (see new_dropout_seed); read only when dropout_p > 0."""
    _check_inputs(q, k, v, dropout_p)
    seed = seed_tensor(seed, q.device) if dropout_p > 0.0 else None
    return _forward(q, k, v, causal, _scale(q, softmax_scale), dropout_p, seed, config)[:2]


def _forward(q, k, v, causal, sm_scale, dropout_p, seed, config=None):
    """(o, lse, mask): mask is the packed keep-mask that the backward reads, None without dropout."""
    B, H, T, D = q.shape
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    cfg = config or _config(q, dropout_p > 0.0)
    inline = dropout_p > 0.0 and cfg.get("draw", MASK_DRAW) == "inline"
    short = None if inline else _short(cfg, T, "fwd")
    mask = _new_mask(B, H, T, q.device, zeroed=inline) if dropout_p > 0.0 else None
    if q.numel() == 0:
        return o, lse, mask
    if mask is not None and not inline:
        _launch_mask(mask, seed, dropout_p, causal, T)
    if short:
        _launch_fwd_short(q, k, v, o, lse, mask, causal, sm_scale, dropout_p, short)
    else:
        _launch_fwd(q, k, v, o, lse, mask, causal, sm_scale, dropout_p, seed, cfg["fwd"], inline)
    return o, lse, mask


def _short(cfg, T, kind):
    """The short kernel's launch (BLOCK_T, num_warps, HEAD_STAGES, programs per SM) of this launch config for
    direction `kind` ("fwd", "bwd") at length T, or None: the tiled kernels run (see _SHORT_CONFIGS)."""
    block_t = _short_block(T)
    for max_t, num_warps, stages, per_sm in (cfg.get("short") or {}).get(kind, ()):
        if block_t <= max_t:
            return block_t, num_warps, stages, per_sm
    return None


def _short_block(T):
    return max(16, next_power_of_2(T))


@functools.cache
def _sm_count(device):
    """Streaming multiprocessors of a CUDA device (1 off CUDA: the interpreter runs programs one by one)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _short_programs(q, per_sm):
    """The short kernels' grid: programs per SM times the SMs, at most one per (batch, head)."""
    return min(q.shape[0] * q.shape[1], _sm_count(q.device) * per_sm)


def _launch_fwd_short(q, k, v, o, lse, mask, causal, sm_scale, dropout_p, cfg):
    """_attn_fwd_short_kernel into o, lse with cfg = (BLOCK_T, num_warps, HEAD_STAGES, programs per SM) (_short);
    with dropout it reads the keep-mask from mask."""
    B, H, T, D = q.shape
    block_t, num_warps, head_stages, per_sm = cfg
    return launchable(_attn_fwd_short_kernel, q)[(_short_programs(q, per_sm),)](
        q, k, v, o, lse, mask, sm_scale * LOG2E.value, dropout_args(dropout_p)[1], _mask_row_bytes(T),
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, T, B * H,
        HEAD_DIM=D, BLOCK_T=block_t, CAUSAL=causal, DROPOUT=dropout_p > 0.0, ROUNDING=_rounding(q),
        HEAD_STAGES=head_stages, num_warps=num_warps, num_stages=head_stages)


def _launch_bwd_short(q, k, v, o, do, dq, dk, dv, lse, mask, causal, sm_scale, dropout_p, cfg, packed=None):
    """_attn_bwd_short_kernel into dq, dk, dv with cfg = (BLOCK_T, num_warps, HEAD_STAGES, programs per SM)
    (_short). With `packed` (see _backward) they are its slots, and the kernel gets the packed tensor itself (see
    _launch_dq)."""
    B, H, T, D = q.shape
    block_t, num_warps, head_stages, per_sm = cfg
    dq_arg, dk_arg, dv_arg, stride_slot = (dq, dk, dv, 0) if packed is None else (packed, None, None,
                                                                                  packed.stride(2))
    return launchable(_attn_bwd_short_kernel, q)[(_short_programs(q, per_sm),)](
        q, k, v, o, do, dq_arg, dk_arg, dv_arg, lse, mask, sm_scale * LOG2E.value, sm_scale,
        dropout_args(dropout_p)[1], _mask_row_bytes(T), stride_slot,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(), H, T, B * H,
        HEAD_DIM=D, BLOCK_T=block_t, BLOCK_M=min(SHORT_BLOCK_M, block_t), CAUSAL=causal,
        DROPOUT=dropout_p > 0.0, ROUNDING=_rounding(q), HEAD_STAGES=head_stages, PACKED=packed is not None,
        num_warps=num_warps, num_stages=head_stages)


def _launch_fwd(q, k, v, o, lse, mask, causal, sm_scale, dropout_p, seed, cfg, inline=False):
    """The forward kernel into o, lse with cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages); with dropout it reads the
    keep-mask from mask, or `inline` draws it and stores it there. Returns what the launch returns: on a GPU the
    compiled kernel, whose n_regs / n_spills bench.tune_attention reads (as do _launch_dq and _launch_dkdv)."""
    B, H, T, D = q.shape
    block_m, block_n, num_warps, num_stages = cfg
    fp32 = q.dtype == torch.float32
    return launchable(_attn_fwd_kernel, q)[(cdiv(T, block_m), B * H)](
        q, k, v, o, lse, mask, sm_scale * LOG2E.value, seed, *dropout_args(dropout_p), _mask_row_bytes(T),
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, T,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, DROPOUT=dropout_p > 0.0, DRAW=inline,
        PREFETCH_MASK=_prefetch_mask(_major(q.device), fp32), ROUNDING=_rounding(q), num_warps=num_warps,
        num_stages=num_stages)


def attention_backward(do, q, k, v, o, lse, *, causal=True, softmax_scale=None, dropout_p=0.0, seed=0,
                       config=None):
    """Returns (dq, dk, dv) in q's dtype, given the output gradient do and the forward's o and lse.
    seed and dropout_p must be those of the forward: the keep-mask is regenerated from them (the model's
    path, fused_attention, reads the mask that its forward stored instead)."""
    _check_inputs(q, k, v, dropout_p)
    mask = _packed_dropout_mask(seed_tensor(seed, q.device), *q.shape[:3], dropout_p) if dropout_p > 0 else None
    return _backward(do, q, k, v, o, lse, causal, _scale(q, softmax_scale), dropout_p, mask, config)


def _backward(do, q, k, v, o, lse, causal, sm_scale, dropout_p, mask, config=None, packed=None):
    """(dq, dk, dv); mask: the forward's packed keep-mask (None without dropout). packed: a (B, T, 3, H, D) tensor
    to write them into as its q, k and v slots (the gradient of packed projections: see _backward_qkv) and return
    as its views; by default they are new contiguous tensors."""
    B, H, T, D = q.shape
    if packed is None:
        dq, dk, dv = (torch.empty((B, H, T, D), dtype=q.dtype, device=q.device) for _ in range(3))
    else:
        dq, dk, dv = unpack_qkv(packed)
    if q.numel() == 0:
        return dq, dk, dv
    cfg = config or _config(q, dropout_p > 0.0)
    short = _short(cfg, T, "bwd")
    if short:
        _launch_bwd_short(q, k, v, o, do, dq, dk, dv, lse, mask, causal, sm_scale, dropout_p, short, packed)
        return dq, dk, dv
    delta = torch.empty_like(lse)  # rowsum(dO * O), times 1 - p with dropout: written by dq, read by dK/dV
    # dq first: it also computes delta, which the dK/dV kernel (next on the same stream) reads
    bwd = _bwd_args(q, mask, causal, sm_scale, dropout_p)
    _launch_dq(q, k, v, o, do, dq, lse, delta, bwd, cfg["dq"], packed)
    _launch_dkdv(q, k, v, do, dk, dv, lse, delta, bwd, cfg["dkdv"], packed)
    return dq, dk, dv


def _bwd_args(q, mask, causal, sm_scale, dropout_p):
    """The arguments that both backward kernels take beside their tensors: (positional, constexpr keywords),
    built once per backward (a few microseconds of host time)."""
    args = (mask, sm_scale * LOG2E.value, sm_scale, dropout_args(dropout_p)[1], _mask_row_bytes(q.shape[2]))
    return args, dict(HEAD_DIM=q.shape[3], CAUSAL=causal, DROPOUT=dropout_p > 0.0, ROUNDING=_rounding(q),
                      PREFETCH_MASK=_prefetch_mask(_major(q.device), q.dtype == torch.float32))


def _launch_dq(q, k, v, o, do, dq, lse, delta, bwd, cfg, packed=None):
    """The dQ kernel (which also writes delta) with bwd = _bwd_args(...) and cfg = (BLOCK_M, BLOCK_N, num_warps,
    num_stages). With `packed` (see _backward) dq is its q slot, at its start: the kernel gets the packed tensor
    itself, so that under torch.compile's tracing (kernels._common.kernel_op) the launch writes that tensor and no
    view of it, which torch would copy out and scatter back."""
    B, H, T, D = q.shape
    block_m, block_n, num_warps, num_stages = cfg
    args, common = bwd
    return launchable(_attn_bwd_dq_kernel, q)[(cdiv(T, block_m), B * H)](
        q, k, v, o, do, dq if packed is None else packed, lse, delta, *args,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(), H, T,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)


def _launch_dkdv(q, k, v, do, dk, dv, lse, delta, bwd, cfg, packed=None):
    """The dK/dV kernel (reading the dQ kernel's delta) with bwd = _bwd_args(...) and cfg = (BLOCK_M, BLOCK_N,
    num_warps, num_stages). With `packed` (see _backward) dk and dv are its k and v slots, and the kernel gets the
    packed tensor itself (PACKED; see _launch_dq)."""
    B, H, T, D = q.shape
    block_m, block_n, num_warps, num_stages = cfg
    args, common = bwd
    # packed: DK is d qkv itself, DV None, and the slots lie stride_slot elements apart
    dk_arg, dv_arg, stride_slot = (dk, dv, 0) if packed is None else (packed, None, packed.stride(2))
    return launchable(_attn_bwd_dkdv_kernel, q)[(cdiv(T, block_n), B * H)](
        q, k, v, do, dk_arg, dv_arg, lse, delta, *args, stride_slot,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), H, T,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, PACKED=packed is not None,
        **common)


def _packed_dropout_mask(seed, B, H, T, p):
    """The packed keep-mask (B*H, T, W) uint8 of a seed (1-element int64 tensor): every key's bit, not only the
    causal ones (the backward reads the same bits in either case)."""
    mask = _new_mask(B, H, T, seed.device, zeroed=False)
    if mask.numel():
        _launch_mask(mask, seed, p, False, T)
    return mask


def unpack_dropout_mask(mask, B, H, T):
    """The boolean keep-mask (B, H, T, T) of a packed one (B*H, T, W) uint8: bit b of byte g is key 8g + b."""
    bits = (mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=mask.device)) & 1
    return bits.flatten(-2)[..., :T].reshape(B, H, T, T).bool()


def attention_dropout_mask(seed, B, H, T, p, device="cpu"):
    """The boolean keep-mask (B, H, T, T) that the kernels use for this seed (an int or the kernels' 1-element
    int64 tensor) and dropout probability p (True = kept), for replaying in
    `kernels.reference.attention(..., dropout_mask=mask)`."""
    return unpack_dropout_mask(_packed_dropout_mask(seed_tensor(seed, torch.device(device)), B, H, T, p), B, H, T)


# ----------------------------------------------------------------------------------------------------
# Operators and autograd
# ----------------------------------------------------------------------------------------------------


@kernel_op("gpt1_kernels::attention")
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: Optional[torch.Tensor], causal: bool,
                 softmax_scale: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse, mask) of the forward kernel, mask the packed keep-mask (an empty uint8 tensor without dropout:
    an operator cannot return None); differentiable in q, k, v (the backward is attention_backward_op)."""
    o, lse, mask = _forward(q, k, v, causal, softmax_scale, dropout_p, seed)
    return o, lse, mask if mask is not None else q.new_empty((0,), dtype=torch.uint8)


@attention_op.register_fake
def _(q, k, v, seed, causal, softmax_scale, dropout_p):
    B, H, T, D = q.shape
    mask_shape = (B * H, T, _mask_row_bytes(T)) if dropout_p > 0.0 else (0,)
    return (q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T), dtype=torch.float32),
            q.new_empty(mask_shape, dtype=torch.uint8))


@kernel_op("gpt1_kernels::attention_backward")
def attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, mask: Optional[torch.Tensor], causal: bool, softmax_scale: float,
                          dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous (B, H, T, D); mask: the forward's packed keep-mask (None without dropout)."""
    return _backward(do, q, k, v, o, lse, causal, softmax_scale, dropout_p, mask)


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, mask, causal, softmax_scale, dropout_p):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _seed, *ctx.args = inputs  # args: causal, softmax_scale, dropout_p
    o, lse, mask = output
    ctx.mark_non_differentiable(lse, mask)
    ctx.set_materialize_grads(False)  # the backward reads do only: no zeros for lse and mask
    ctx.save_for_backward(q, k, v, o, lse, mask)


@first_order("fused_attention")
def _attention_op_backward(ctx, do, _dlse, _dmask):
    q, k, v, o, lse, mask = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(do, q, k, v, o, lse, mask if ctx.args[2] > 0.0 else None, *ctx.args)
    return dq, dk, dv, None, None, None, None


attention_op.register_autograd(_attention_op_backward, setup_context=_setup_context)


def unpack_qkv(qkv):
    """The (B, H, T, D) views q, k, v of packed projections qkv (B, T, 3, H, D): a fused q/k/v linear's output
    (B, T, 3 * H * D) viewed, as the model makes it."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _backward_qkv(do, qkv, o, lse, causal, sm_scale, dropout_p, mask):
    """d qkv, contiguous (B, T, 3, H, D): the two backward kernels write dq, dk and dv into its q, k and v slots,
    given d qkv itself (see _backward's `packed`)."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _backward(do, *unpack_qkv(qkv), o, lse, causal, sm_scale, dropout_p, mask, packed=dqkv)
    return dqkv


@kernel_op("gpt1_kernels::attention_qkv")
def attention_qkv_op(qkv: torch.Tensor, seed: Optional[torch.Tensor], causal: bool, softmax_scale: float,
                     dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_op on the views unpack_qkv(qkv); differentiable in qkv, whose gradient comes back packed
    (attention_qkv_backward_op)."""
    o, lse, mask = _forward(*unpack_qkv(qkv), causal, softmax_scale, dropout_p, seed)
    return o, lse, mask if mask is not None else qkv.new_empty((0,), dtype=torch.uint8)


@attention_qkv_op.register_fake
def _(qkv, seed, causal, softmax_scale, dropout_p):
    B, T, _, H, D = qkv.shape
    mask_shape = (B * H, T, _mask_row_bytes(T)) if dropout_p > 0.0 else (0,)
    return (qkv.new_empty((B, T, H, D)).transpose(1, 2), qkv.new_empty((B, H, T), dtype=torch.float32),
            qkv.new_empty(mask_shape, dtype=torch.uint8))


@kernel_op("gpt1_kernels::attention_qkv_backward")
def attention_qkv_backward_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                              mask: Optional[torch.Tensor], causal: bool, softmax_scale: float,
                              dropout_p: float) -> torch.Tensor:
    """d qkv, contiguous (B, T, 3, H, D); mask: the forward's packed keep-mask (None without dropout)."""
    return _backward_qkv(do, qkv, o, lse, causal, softmax_scale, dropout_p, mask)


@attention_qkv_backward_op.register_fake
def _(do, qkv, o, lse, mask, causal, softmax_scale, dropout_p):
    return qkv.new_empty(qkv.shape)


def _setup_context_qkv(ctx, inputs, output):
    qkv, _seed, *ctx.args = inputs  # args: causal, softmax_scale, dropout_p
    o, lse, mask = output
    ctx.mark_non_differentiable(lse, mask)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(qkv, o, lse, mask)


@first_order("fused_attention_qkv")
def _attention_qkv_op_backward(ctx, do, _dlse, _dmask):
    qkv, o, lse, mask = ctx.saved_tensors
    return (attention_qkv_backward_op(do, qkv, o, lse, mask if ctx.args[2] > 0.0 else None, *ctx.args),
            None, None, None, None)


attention_qkv_op.register_autograd(_attention_qkv_op_backward, setup_context=_setup_context_qkv)


class FusedAttentionFunction(torch.autograd.Function):
    """The eager path: the launchers the operators wrap, without the dispatcher round trip of a custom op
    (tens of microseconds of Python per call)."""

    @staticmethod
    def forward(ctx, q, k, v, seed, causal, softmax_scale, dropout_p):
        o, lse, mask = _forward(q, k, v, causal, softmax_scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.args = (causal, softmax_scale, dropout_p)
        return o

    @staticmethod
    @first_order("fused_attention")
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, *ctx.args, mask)
        return dq, dk, dv, None, None, None, None


class FusedAttentionQKVFunction(torch.autograd.Function):
    """FusedAttentionFunction on packed projections (fused_attention_qkv's eager path)."""

    @staticmethod
    def forward(ctx, qkv, seed, causal, softmax_scale, dropout_p):
        o, lse, mask = _forward(*unpack_qkv(qkv), causal, softmax_scale, dropout_p, seed)
        ctx.save_for_backward(qkv, o, lse, mask)
        ctx.args = (causal, softmax_scale, dropout_p)
        return o

    @staticmethod
    @first_order("fused_attention_qkv")
    def backward(ctx, do):
        qkv, o, lse, mask = ctx.saved_tensors
        return _backward_qkv(do, qkv, o, lse, *ctx.args, mask), None, None, None, None


def _check_options(causal, softmax_scale, dropout_p, name="fused_attention"):
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and not (is_number(softmax_scale) and 0 < softmax_scale < math.inf):
        raise ValueError(f"{name}: softmax_scale must be a positive finite number or None, got {softmax_scale}")
    if not is_number(dropout_p) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"{name}: dropout_p must be a number in [0, 1), got {dropout_p}")


def _dropout_seed(dropout_p, _seed, device):
    if dropout_p == 0.0:
        return None
    return seed_tensor(_seed, device) if _seed is not None else new_dropout_seed(device)


def fused_attention(q, k, v, *, causal=True, softmax_scale=None, dropout_p=0.0, _seed=None):
    """softmax(q k^T * scale [+ causal mask]) with dropout, times v, for (B, H, T, D) tensors; same signature
    and result as `kernels.reference.attention` (under torch.autocast q, k, v are cast to its dtype first, as
    SDPA casts them). `_seed` (tests only; an int or a 1-element int64 tensor)
    fixes the dropout seed; by default one is drawn on q's device when dropout_p > 0 (new_dropout_seed)."""
    _check_options(causal, softmax_scale, dropout_p)
    _check_inputs(q, k, v, dropout_p)  # before the cast, which would trip over a non-tensor
    q, k, v = autocast_inputs(q, k, v)  # as SDPA under torch.autocast: shapes and devices stay, dtypes agree
    dropout_p, sm_scale = float(dropout_p), float(_scale(q, softmax_scale))
    seed = _dropout_seed(dropout_p, _seed, q.device)
    if torch.compiler.is_compiling():
        return attention_op(q, k, v, seed, causal, sm_scale, dropout_p)[0]
    return FusedAttentionFunction.apply(q, k, v, seed, causal, sm_scale, dropout_p)


def fused_attention_qkv(qkv, *, causal=True, softmax_scale=None, dropout_p=0.0, _seed=None):
    """fused_attention(q, k, v) of packed projections qkv (B, T, 3, H, D), q, k, v = unpack_qkv(qkv): the same
    kernels on the same views, so the same result, bit for bit, with the same seed. Its backward writes d qkv
    into one (B, T, 3, H, D) tensor, the gradient of the q/k/v linear's output as it is, where fused_attention's
    three gradients are stacked into that layout by a copy (at GPT-1's shapes 75 MB read and 75 MB written per
    layer and step). Returns (B, H, T, D), like fused_attention."""
    _check_options(causal, softmax_scale, dropout_p, "fused_attention_qkv")
    check_tensors("fused_attention_qkv: ", qkv=qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"fused_attention_qkv: qkv must have shape (B, T, 3, H, D), got {tuple(qkv.shape)}")
    _check_inputs(*unpack_qkv(qkv), dropout_p)
    (qkv,) = autocast_inputs(qkv)
    dropout_p, sm_scale = float(dropout_p), float(_scale(qkv, softmax_scale))
    seed = _dropout_seed(dropout_p, _seed, qkv.device)
    if torch.compiler.is_compiling():
        return attention_qkv_op(qkv, seed, causal, sm_scale, dropout_p)[0]
    return FusedAttentionQKVFunction.apply(qkv, seed, causal, sm_scale, dropout_p)
