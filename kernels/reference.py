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
    """Softmax cross-entropy of (N, V) logits against (N,) targets, computed in fp32.

    Unlike torch's, the mean over a batch whose targets are all ignored is 0 rather than NaN.
    """
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index,
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
