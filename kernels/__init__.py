"""Fused Triton kernels for GPT-1 training. Depends only on torch and triton."""

from .attention import fused_attention, fused_attention_qkv
from .cross_entropy import fused_cross_entropy, fused_linear_cross_entropy
from .layer_norm import fused_add_dropout_layer_norm

__all__ = ["fused_add_dropout_layer_norm", "fused_attention", "fused_attention_qkv", "fused_cross_entropy",
           "fused_linear_cross_entropy"]
