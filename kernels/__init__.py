"""Fused Triton kernels for GPT-1 training. Depends only on torch and triton."""

import torch

from ._common import inline_enabled, set_inline
from .attention import fused_attention, fused_attention_qkv
from .cross_entropy import fused_cross_entropy, fused_linear_cross_entropy
from .gelu import fused_bias_gelu
from .layer_norm import fused_add_dropout_layer_norm

__all__ = ["fused_add_dropout_layer_norm", "fused_attention", "fused_attention_qkv", "fused_bias_gelu",
           "fused_cross_entropy", "fused_linear_cross_entropy", "inline_enabled", "register_inductor_fallbacks",
           "set_inline"]

# every operator of ours, by its name under torch.ops.gpt1_kernels
OPS = ("attention", "attention_backward", "attention_qkv", "attention_qkv_backward", "cross_entropy_",
       "cross_entropy_loss", "cross_entropy_scale_grad_", "linear_cross_entropy", "linear_cross_entropy_backward",
       "add_dropout_layer_norm", "add_dropout_layer_norm_backward", "bias_gelu", "bias_gelu_backward")


def register_inductor_fallbacks():
    """Register Inductor's fallback lowering for each of our operators before anything is compiled, with the
    layout constraint Inductor itself would give it. Returns the operators registered by this call.

    Left to Inductor, an operator gets its fallback at its first call in a graph, after an info-level message that
    torch 2.11 formats even when nobody logs it: the text of every input's IR, with all of that input's producers
    written out again for each use. Along GPT-1's chain of our operators (attention, then the fused add-LayerNorm,
    in every layer) that text grows ~2.6x per layer at the head's loss call: at 12 layers, Inductor was still
    formatting it minutes later (gpt1.train with --compile-mode reduce-overhead --norm-impl triton on an H200). Here
    the registration needs no inputs and writes no text. Calling it again does nothing; on a torch without these
    internals it does nothing, and Inductor registers the operators itself as before."""
    try:
        from torch._inductor import lowering
        from torch._library.utils import get_layout_constraint_tag

        lowerings, make_fallback, tag_to_constraint = (lowering.lowerings, lowering.make_fallback,
                                                       lowering.tag_to_layout_constraint)
    except (ImportError, AttributeError):
        return []
    done = []
    for name in OPS:
        op = getattr(torch.ops.gpt1_kernels, name).default
        if op not in lowerings:  # (op, layout constraint): as Inductor's own implicit registration calls it
            make_fallback(op, tag_to_constraint(get_layout_constraint_tag(op, with_default=True)))
            done.append(op)
    return done
