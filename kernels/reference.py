"""Eager PyTorch versions of the fused kernels: the source of truth for tests and benchmarks.

Each function has the signature of its fused counterpart in `kernels`, runs in the input dtype
(softmax statistics in fp32, as the model's eager path does) and is differentiable by autograd.
"""

import math

import torch
import torch.nn.functional as F


def attention(q, k, v, *, causal=True, softmax_scale=None, dropout_p=0.0, dropout_mask=None):
    """softmax(q k^T * scale [+ causal mask]) v on (B, H, T, D) tensors.

    dropout_mask, if given, is the boolean keep-mask (B, H, T, T) to apply instead of drawing one,
    so a test can replay exactly the mask that the fused kernel generated.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, T)
    if causal:
        t_q, t_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Softmax cross-entropy of (N, V) logits against (N,) targets, computed in fp32 (fp64 stays fp64).

    Unlike torch's, the mean over a batch whose targets are all ignored is 0 rather than NaN.
    """
    upcast = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(upcast, target, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="none")
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp(min=1)


def linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, label_smoothing=0.0,
                         reduction="mean", chunk_size=None):
    """cross_entropy(hidden @ weight^T + bias, target): materializes the whole (N, V) logits."""
    logits = F.linear(hidden, weight, bias)
    return cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         reduction=reduction)


def add_dropout_layer_norm(x, h, weight, bias=None, dropout_p=0.0, eps=1e-5, dropout_mask=None, branch_dtype=None):
    """layer_norm(x + dropout(h), (C,), weight, bias, eps) on (..., C) tensors, computed in fp32 (float64 stays
    float64) and returned in promote_types(x.dtype, h.dtype), as the fused op does; with branch_dtype, (y, the
    result rounded once to branch_dtype).

    dropout_mask, if given, is the boolean keep-mask of h's shape to apply instead of drawing one (kept elements
    scaled by 1 / (1 - dropout_p)), so a test can replay exactly the mask that the fused kernel generated.
    """
    out_dtype = torch.promote_types(x.dtype, h.dtype)
    compute = torch.promote_types(out_dtype, torch.float32)
    h = h.to(compute)
    if dropout_mask is not None:
        h = h * dropout_mask.to(compute) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        h = F.dropout(h, p=dropout_p)
    weight, bias = weight.to(compute), bias.to(compute) if bias is not None else None
    y = F.layer_norm(x.to(compute) + h, x.shape[-1:], weight, bias, eps)
    if branch_dtype is not None:
        return y.to(out_dtype), y.to(branch_dtype if compute != torch.float64 else compute)
    return y.to(out_dtype)


def bias_gelu(x, bias=None, approximate="tanh"):
    """F.gelu(x + bias, approximate=approximate) computed in fp32 (float64 stays float64) and returned in x's
    dtype, as the fused op does."""
    compute = torch.promote_types(x.dtype, torch.float32)
    z = x.to(compute) + bias.to(compute) if bias is not None else x.to(compute)
    return F.gelu(z, approximate=approximate).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Peers for the benchmarks: other libraries' versions of the same ops, under the signatures above.
# Each imports its optional package inside the call, so kernels/ still depends on torch and triton only;
# an ImportError (or torch's RuntimeError for a backend it cannot run) tells the caller to skip it.
# ----------------------------------------------------------------------------------------------------

SDPA_BACKENDS = ("flash", "efficient", "cudnn")


def sdpa_attention(q, k, v, *, causal=True, softmax_scale=None, dropout_p=0.0, backend="flash"):
    """torch's scaled_dot_product_attention on (B, H, T, D), forced to one backend (flash, efficient, cudnn)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    with sdpa_kernel(chosen):  # raises RuntimeError when that backend cannot take these inputs
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=softmax_scale)


def flash_attn_attention(q, k, v, *, causal=True, softmax_scale=None, dropout_p=0.0):
    """flash-attn's flash_attn_func, which takes (B, T, H, D): the transposes are free views."""
    from flash_attn import flash_attn_func

    o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                        softmax_scale=softmax_scale, causal=causal)
    return o.transpose(1, 2)  # (B, H, T, D)


def liger_cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Liger-Kernel's cross-entropy (like ours, it writes the gradient into the logits buffer)."""
    from liger_kernel.transformers.functional import liger_cross_entropy as liger_ce

    return liger_ce(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)


def liger_fused_linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, label_smoothing=0.0,
                                     reduction="mean"):
    """Liger-Kernel's chunked linear + cross-entropy, which never materializes the whole (N, V) logits."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger_flce

    return liger_flce(hidden, weight, target, bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
                      reduction=reduction)
