"""Fused (causal) attention with in-kernel dropout: FlashAttention-2 forward and backward in Triton.

Algorithm (FlashAttention-2, Tri Dao 2023; kernel structure after Triton's tutorial 06 "fused attention"):

- Forward: one program per (query block, batch*head). It makes one pass over the K/V blocks with an online
  softmax in fp32 (running max m and sum l, rescaling the accumulator as the max grows), in base 2: the
  scores are multiplied by softmax_scale * log2(e) once, so every exponential is an exp2. Only the per-row
  log-sum-exp (natural log, fp32, (B, H, T)) is saved for the backward; the T x T matrix never exists.
- Causal: key blocks left of the diagonal are processed without any mask, the diagonal block(s) with the
  causal mask, blocks above the diagonal are never visited. Tails (T not a multiple of a block) are masked.
- Backward: a preprocess computes delta = rowsum(dO * O); then one kernel owns a key block and accumulates
  dK, dV over the query blocks at or below the diagonal, and another owns a query block and accumulates dQ
  over the key blocks. Each output block is written by exactly one program, with no atomics, so two
  backward passes on the same inputs give bitwise identical gradients.
- Dropout (GPT-1 trains with attn_pdrop=0.1; the tutorial and FlashAttention-3 have none): the keep-mask
  of element (b, h, i, j) is `tl.rand(seed, ((b*H + h)*T + i)*T + j) > p` (Philox-4x32-10), generated in
  the forward, regenerated in both backward kernels, never stored. The seed is drawn from torch's default
  CPU generator, so torch.manual_seed reproduces it; `attention_dropout_mask` rebuilds the mask for tests.

Dtypes: fp16, bf16 and fp32 inputs; outputs and gradients are in the input dtype. Dot products take
their operands in the input dtype and accumulate in fp32; all elementwise math is fp32. fp32 inputs use
TF32 dot products on Ampere/Hopper (about 1e-3 relative error, like torch with allow_tf32=True).

Shapes: q, k, v of shape (B, H, T, D) with any strides (the model passes permuted views of its fused
qkv projection); D in {16, 32, 64, 128}; any T >= 1, B, H >= 1. The output is laid out as (B, T, H, D)
and returned as a (B, H, T, D) view, so the model's transpose back to (B, T, C) is free.

Limits: self-attention only (q, k, v share T); B*H <= 65535 (CUDA grid y); offsets within one
(batch, head) slice (T * stride of T) must fit in int32; the Philox stream costs one call per score,
so dropout makes the kernels noticeably slower (FlashAttention-2 has the same cost).
Launch configurations come from a table keyed by (arch, head dim, fp32 or not); see `_CONFIGS`. Under the
Triton interpreter (TRITON_INTERPRET=1, CPU tests) bf16 dot operands are rounded by bit arithmetic and fed
as fp32 (EMULATE_BF16), because the interpreter multiplies bf16 as raw integers; GPU code is unaffected.
"""

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _rounded(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x rounded to the input dtype DTYPE, as a tl.dot operand or for a store. The interpreter multiplies bf16
    dot operands as raw integers and truncates fp32 -> bf16, so under it (EMULATE_BF16) the value is rounded
    to nearest-even bf16 by bit arithmetic and kept in fp32, which tl.dot and tl.store then take exactly."""
    if EMULATE_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _dropout_keep(SEED, BH, T, rows, cols, DROPOUT_P):
    # Philox counter = flat int64 index of element (bh, row, col) of the (B*H, T, T) probabilities
    offs = (BH * T + rows) * T + cols
    return tl.rand(SEED, offs) > DROPOUT_P


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lo, hi, qk_scale,
                    SEED, BH, T, DROPOUT_P,
                    BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,
                    DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    DTYPE: tl.constexpr = k_ptrs.dtype.element_ty
    k_ptrs += lo * stride_kt
    v_ptrs += lo * stride_vt
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if BOUND_MASK:
            kT = tl.load(k_ptrs, mask=offs_n[None, :] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            kT = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        kT, v = _rounded(kT, DTYPE, EMULATE_BF16), _rounded(v, DTYPE, EMULATE_BF16)
        s = tl.dot(q, kT) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, base-2 logits
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
        if DROPOUT:
            p = tl.where(_dropout_keep(SEED, BH, T, offs_m[:, None], offs_n[None, :], DROPOUT_P), p, 0.0)
        acc = tl.dot(_rounded(p, DTYPE, EMULATE_BF16), v, acc)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, qk_scale, SEED, DROPOUT_P,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     stride_ob, stride_oh, stride_ot, stride_od,
                     H, T,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    q = _rounded(tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0), O.dtype.element_ty, EMULATE_BF16)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # stage 1: key blocks left of the diagonal, unmasked; stage 2: the diagonal block, masked
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                                        0, start_m, qk_scale, SEED, bh, T, DROPOUT_P,
                                        BLOCK_N, False, False, DROPOUT, EMULATE_BF16)
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                                        start_m, tl.minimum(start_m + BLOCK_M, T), qk_scale, SEED, bh, T,
                                        DROPOUT_P, BLOCK_N, True, True, DROPOUT, EMULATE_BF16)
    else:
        full = (T // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                                        0, full, qk_scale, SEED, bh, T, DROPOUT_P,
                                        BLOCK_N, False, False, DROPOUT, EMULATE_BF16)
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                                        full, T, qk_scale, SEED, bh, T, DROPOUT_P,
                                        BLOCK_N, False, True, DROPOUT, EMULATE_BF16)

    inv_l = 1.0 / l_i
    if DROPOUT:
        inv_l = inv_l / (1.0 - DROPOUT_P)
    o = acc * inv_l[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, _rounded(o, O.dtype.element_ty, EMULATE_BF16).to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(LSE + bh * T + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=offs_m < T)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA,
                                stride_ob, stride_oh, stride_ot, stride_od,
                                stride_dob, stride_doh, stride_dot, stride_dod,
                                H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < T
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, LSE, DELTA, stride_qt, stride_dot, offs_n, lo, hi,
                         qk_scale, SEED, BH, T, DROPOUT_P,
                         BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,
                         DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    DTYPE: tl.constexpr = qT_ptrs.dtype.element_ty
    # works on transposed scores sT = k q^T (BLOCK_N, BLOCK_M) so that dK, dV come out row-major
    qT_ptrs += lo * stride_qt
    do_ptrs += lo * stride_dot
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
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
        qT, do = _rounded(qT, DTYPE, EMULATE_BF16), _rounded(do, DTYPE, EMULATE_BF16)
        sT = tl.dot(k, qT) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :] * 1.4426950408889634)
        if BOUND_MASK:
            valid = offs_m[None, :] < T
            if CAUSAL_MASK:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(valid, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do))  # d(dropped P)^T
        if DROPOUT:
            keep = _dropout_keep(SEED, BH, T, offs_m[None, :], offs_n[:, None], DROPOUT_P)
            inv_keep = 1.0 / (1.0 - DROPOUT_P)
            dv = tl.dot(_rounded(tl.where(keep, pT * inv_keep, 0.0), DTYPE, EMULATE_BF16), do, dv)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            dv = tl.dot(_rounded(pT, DTYPE, EMULATE_BF16), do, dv)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(_rounded(dsT, DTYPE, EMULATE_BF16), tl.trans(qT), dk)
        qT_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, qk_scale, sm_scale, SEED, DROPOUT_P,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd,
                          stride_dob, stride_doh, stride_dot, stride_dod,
                          stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                          H, T,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = bh // H, bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = offs_n[:, None] < T
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    k = _rounded(k, DK.dtype.element_ty, EMULATE_BF16)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    v = _rounded(v, DK.dtype.element_ty, EMULATE_BF16)
    qT_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
    LSE += bh * T
    DELTA += bh * T

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    full = (T // BLOCK_M) * BLOCK_M  # query rows below this index need no bound mask
    if CAUSAL:
        # the diagonal block (masked), then the full query blocks below it, then the query tail
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, LSE, DELTA, stride_qt, stride_dot, offs_n,
                                      start_n, tl.minimum(start_n + BLOCK_N, T), qk_scale, SEED, bh, T,
                                      DROPOUT_P, BLOCK_M, True, True, DROPOUT, EMULATE_BF16)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, LSE, DELTA, stride_qt, stride_dot, offs_n,
                                      start_n + BLOCK_N, full, qk_scale, SEED, bh, T,
                                      DROPOUT_P, BLOCK_M, False, False, DROPOUT, EMULATE_BF16)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, LSE, DELTA, stride_qt, stride_dot, offs_n,
                                      tl.maximum(full, start_n + BLOCK_N), T, qk_scale, SEED, bh, T,
                                      DROPOUT_P, BLOCK_M, False, True, DROPOUT, EMULATE_BF16)
    else:
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, LSE, DELTA, stride_qt, stride_dot, offs_n,
                                      0, full, qk_scale, SEED, bh, T,
                                      DROPOUT_P, BLOCK_M, False, False, DROPOUT, EMULATE_BF16)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, LSE, DELTA, stride_qt, stride_dot, offs_n,
                                      full, T, qk_scale, SEED, bh, T,
                                      DROPOUT_P, BLOCK_M, False, True, DROPOUT, EMULATE_BF16)

    dk *= sm_scale
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             _rounded(dk, DK.dtype.element_ty, EMULATE_BF16).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             _rounded(dv, DV.dtype.element_ty, EMULATE_BF16).to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, offs_m, lo, hi,
                       qk_scale, SEED, BH, T, DROPOUT_P,
                       BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,
                       DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    DTYPE: tl.constexpr = kT_ptrs.dtype.element_ty
    kT_ptrs += lo * stride_kt
    vT_ptrs += lo * stride_vt
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if BOUND_MASK:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < T, other=0.0)
            vT = tl.load(vT_ptrs, mask=offs_n[None, :] < T, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        kT, vT = _rounded(kT, DTYPE, EMULATE_BF16), _rounded(vT, DTYPE, EMULATE_BF16)
        s = tl.dot(q, kT) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if BOUND_MASK:
            valid = offs_n[None, :] < T
            if CAUSAL_MASK:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, vT)
        if DROPOUT:
            keep = _dropout_keep(SEED, BH, T, offs_m[:, None], offs_n[None, :], DROPOUT_P)
            dp = tl.where(keep, dp * (1.0 / (1.0 - DROPOUT_P)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(_rounded(ds, DTYPE, EMULATE_BF16), tl.trans(kT), dq)
        kT_ptrs += BLOCK_N * stride_kt
        vT_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, qk_scale, sm_scale, SEED, DROPOUT_P,
                        stride_qb, stride_qh, stride_qt, stride_qd,
                        stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd,
                        stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                        H, T,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < T
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_mask[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :] * stride_dod, mask=row_mask[:, None], other=0.0)
    q, do = _rounded(q, DQ.dtype.element_ty, EMULATE_BF16), _rounded(do, DQ.dtype.element_ty, EMULATE_BF16)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_mask, other=0.0)
    kT_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    vT_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, offs_m,
                                0, start_m, qk_scale, SEED, bh, T, DROPOUT_P, BLOCK_N, False, False, DROPOUT, EMULATE_BF16)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, offs_m,
                                start_m, tl.minimum(start_m + BLOCK_M, T), qk_scale, SEED, bh, T, DROPOUT_P,
                                BLOCK_N, True, True, DROPOUT, EMULATE_BF16)
    else:
        full = (T // BLOCK_N) * BLOCK_N
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, offs_m,
                                0, full, qk_scale, SEED, bh, T, DROPOUT_P, BLOCK_N, False, False, DROPOUT, EMULATE_BF16)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, offs_m,
                                full, T, qk_scale, SEED, bh, T, DROPOUT_P, BLOCK_N, False, True, DROPOUT, EMULATE_BF16)

    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             _rounded(dq, DQ.dtype.element_ty, EMULATE_BF16).to(DQ.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _dropout_mask_kernel(MASK, SEED, DROPOUT_P, T, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # rows [program 0 * BLOCK_R, ...) of head program 1, with the counter formula of the attention kernels
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    for start in range(0, T, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        keep = _dropout_keep(SEED, bh, T, rows[:, None], cols[None, :], DROPOUT_P)
        tl.store(MASK + (bh * T + rows[:, None]) * T + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < T) & (cols[None, :] < T))


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed by (compute capability major, head dim, is fp32).
# fwd and dq need BLOCK_M % BLOCK_N == 0, dkdv needs BLOCK_N % BLOCK_M == 0 (the causal stages step through
# the diagonal block in the smaller block). Chosen with `python -m bench.compile_report`: the largest tiles
# that compile with dropout (Philox costs registers) without spilling, using wgmma on sm_90 (whose M is
# BLOCK_M for fwd/dq and BLOCK_N for dkdv, so those stay >= 64 per warpgroup).
_SMALL_D = (16, 32, 64)
_CONFIGS = {
    **{(9, d, False): dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 8, 3)) for d in _SMALL_D},
    (9, 128, False): dict(fwd=(128, 32, 8, 3), dkdv=(16, 64, 8, 3), dq=(64, 32, 8, 3)),
    **{(9, d, True): dict(fwd=(64, 32, 4, 2), dkdv=(16, 64, 4, 2), dq=(64, 32, 4, 2)) for d in _SMALL_D},
    # fp32 k, v, dK, dV tiles of 64 x 128 do not fit one warpgroup's registers: mma.sync (no wgmma) there
    (9, 128, True): dict(fwd=(64, 16, 4, 2), dkdv=(16, 32, 4, 2), dq=(64, 16, 4, 2)),
    **{(8, d, False): dict(fwd=(128, 64, 8, 2), dkdv=(32, 128, 8, 2), dq=(128, 32, 8, 2)) for d in (32, 64)},
    (8, 16, False): dict(fwd=(128, 64, 8, 2), dkdv=(32, 128, 8, 2), dq=(64, 32, 4, 2)),
    (8, 128, False): dict(fwd=(64, 32, 4, 2), dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 2)),
    **{(8, d, True): dict(fwd=(64, 32, 4, 2), dkdv=(16, 32, 4, 2), dq=(64, 32, 8, 2)) for d in _SMALL_D},
    (8, 128, True): dict(fwd=(64, 32, 8, 2), dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 2)),
}
# The interpreter runs each program in Python: small blocks keep the tests quick and exercise the
# multi-block, diagonal-stage and tail paths on small T.
_INTERPRETER_CONFIG = dict(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1))


def _compile_specs():
    """COMPILE_SPECS for bench.compile_report (format in its docstring): each table entry for its arch at the
    GPT-1 shapes (T=512, H=12, q/k/v strided views of a (B, T, 3, H, D) tensor), causal with dropout (the
    training case, the most registers); for D=64 also without dropout and in fp16."""
    specs = []
    tensors = dict(fwd="QKVO", dkdv=("Q", "K", "V", "DO", "DK", "DV"), dq=("Q", "K", "V", "DO", "DQ"))
    fns = dict(fwd=_attn_fwd_kernel, dkdv=_attn_bwd_dkdv_kernel, dq=_attn_bwd_dq_kernel)
    for (major, d, fp32), cfg in _CONFIGS.items():
        variants = [("fp32" if fp32 else "bf16", True)]
        if d == 64 and not fp32:
            variants += [("bf16", False), ("fp16", True)]
        for dtype, dropout in variants:
            for kind, fn in fns.items():
                block_m, block_n, num_warps, num_stages = cfg[kind]
                sig = {n: "i32:16" for n in fn.arg_names if n.startswith("stride") and not n.endswith("d")}
                sig.update({n: f"*{dtype}:16" for n in tensors[kind]})
                sig.update(LSE="*fp32:16", DELTA="*fp32:16", qk_scale="fp32", sm_scale="fp32", SEED="i32",
                           DROPOUT_P="fp32", H="i32", T="i32:16")
                sig = {n: t for n, t in sig.items() if n in fn.arg_names}
                consts = {n: 1 for n in fn.arg_names if n.startswith("stride") and n.endswith("d")}
                consts.update(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=True, DROPOUT=dropout,
                              EMULATE_BF16=False)
                name = f"attn_{kind} D={d} {dtype} causal{' dropout' if dropout else ''}"
                specs.append((name, fn, sig, consts, num_warps, num_stages, (major * 10,)))
    for d in HEAD_DIMS:
        sig = {n: "i32:16" for n in _attn_bwd_preprocess_kernel.arg_names if n.startswith("stride")}
        sig = {n: t for n, t in sig.items() if not n.endswith("d")}
        sig.update(O="*bf16:16", DO="*bf16:16", DELTA="*fp32:16", H="i32", T="i32:16")
        consts = dict(stride_od=1, stride_dod=1, HEAD_DIM=d, BLOCK_M=128)
        specs.append((f"attn_bwd_preprocess D={d} bf16", _attn_bwd_preprocess_kernel, sig, consts, 4, 1))
    specs.append(("attn_dropout_mask", _dropout_mask_kernel,
                  dict(MASK="*i8:16", SEED="i32", DROPOUT_P="fp32", T="i32:16"), dict(BLOCK_R=16, BLOCK_C=128), 4, 1))
    return specs


def _config(q):
    """The launch configuration table entry for q's device, head dim and dtype."""
    if q.device.type != "cuda":
        return _INTERPRETER_CONFIG
    major = torch.cuda.get_device_capability(q.device)[0]
    return _CONFIGS[(9 if major >= 9 else 8, q.shape[-1], q.dtype == torch.float32)]


COMPILE_SPECS = _compile_specs()


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, dropout_p=0.0):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
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


def _emulate_bf16(q):
    return q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _scale(q, softmax_scale):
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def attention_forward(q, k, v, *, causal=True, softmax_scale=None, dropout_p=0.0, seed=0, config=None):
    """Returns (o, lse): o (B, H, T, D) in q's dtype (a view of a (B, T, H, D) buffer), lse (B, H, T) fp32
    natural-log log-sum-exp of the scaled, masked scores of each row."""
    _check_inputs(q, k, v, dropout_p)
    B, H, T, D = q.shape
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return o, lse
    block_m, block_n, num_warps, num_stages = (config or _config(q))["fwd"]
    sm_scale = _scale(q, softmax_scale)
    grid = (triton.cdiv(T, block_m), B * H)
    _attn_fwd_kernel[grid](q, k, v, o, lse, sm_scale * LOG2E, seed, float(dropout_p),
                           *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, T,
                           HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
                           DROPOUT=dropout_p > 0.0, EMULATE_BF16=_emulate_bf16(q), num_warps=num_warps, num_stages=num_stages)
    return o, lse


def attention_backward(do, q, k, v, o, lse, *, causal=True, softmax_scale=None, dropout_p=0.0, seed=0,
                       config=None):
    """Returns (dq, dk, dv) in q's dtype, given the output gradient do and the forward's o and lse.
    seed and dropout_p must be those of the forward: the keep-mask is regenerated from them."""
    _check_inputs(q, k, v, dropout_p)
    B, H, T, D = q.shape
    dq, dk, dv = (torch.empty((B, H, T, D), dtype=q.dtype, device=q.device) for _ in range(3))
    if q.numel() == 0:
        return dq, dk, dv
    cfg = config or _config(q)
    sm_scale = _scale(q, softmax_scale)
    delta = torch.empty_like(lse)
    bm = cfg["dq"][0]
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, bm), B * H)](o, do, delta, *o.stride(), *do.stride(), H, T,
                                                             HEAD_DIM=D, BLOCK_M=bm)
    common = dict(HEAD_DIM=D, CAUSAL=bool(causal), DROPOUT=dropout_p > 0.0, EMULATE_BF16=_emulate_bf16(q))
    block_m, block_n, num_warps, num_stages = cfg["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, block_n), B * H)](
        q, k, v, do, dk, dv, lse, delta, sm_scale * LOG2E, sm_scale, seed, float(dropout_p),
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), H, T,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)
    block_m, block_n, num_warps, num_stages = cfg["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(T, block_m), B * H)](
        q, k, v, do, dq, lse, delta, sm_scale * LOG2E, sm_scale, seed, float(dropout_p),
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), H, T,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **common)
    return dq, dk, dv


def attention_dropout_mask(seed, B, H, T, p, device="cpu"):
    """The boolean keep-mask (B, H, T, T) that the kernels use for this seed and dropout probability p
    (True = kept), for replaying in `kernels.reference.attention(..., dropout_mask=mask)`."""
    mask = torch.empty((B, H, T, T), dtype=torch.int8, device=device)
    if mask.numel():
        grid = (triton.cdiv(T, 16), B * H)
        _dropout_mask_kernel[grid](mask, seed, float(p), T, BLOCK_R=16, BLOCK_C=min(128, triton.next_power_of_2(T)))
    return mask.bool()


def new_dropout_seed():
    """A Philox seed drawn from torch's default CPU generator, so torch.manual_seed reproduces it."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------


class FusedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, dropout_p, seed):
        o, lse = attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
                                   seed=seed)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = dict(causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p, seed=seed)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, **ctx.args)
        return dq, dk, dv, None, None, None, None


def fused_attention(q, k, v, *, causal=True, softmax_scale=None, dropout_p=0.0, _seed=None):
    """softmax(q k^T * scale [+ causal mask]) with dropout, times v, for (B, H, T, D) tensors; same signature
    and result as `kernels.reference.attention`. `_seed` (tests only) fixes the dropout seed; by default
    it is drawn from torch's default generator when dropout_p > 0."""
    if not isinstance(causal, bool):
        raise TypeError(f"fused_attention: causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"fused_attention: softmax_scale must be a positive number or None, got {softmax_scale}")
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"fused_attention: dropout_p must be a number in [0, 1), got {dropout_p}")
    _check_inputs(q, k, v, dropout_p)
    dropout_p = float(dropout_p)
    seed = 0 if dropout_p == 0.0 else (_seed if _seed is not None else new_dropout_seed())
    return FusedAttentionFunction.apply(q, k, v, causal, softmax_scale, dropout_p, int(seed))
