"""Fused Triton kernels for GPT-1 training. Depends only on torch and triton."""

from .attention import fused_attention
from .cross_entropy import fused_cross_entropy, fused_linear_cross_entropy

__all__ = ["fused_attention", "fused_cross_entropy", "fused_linear_cross_entropy"]
