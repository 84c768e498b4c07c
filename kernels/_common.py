"""Pieces shared by the Triton kernel files: the exp2/log2 constants, bit-exact rounding of fp32 values to
bf16 or TF32, whether Triton's CPU interpreter runs the kernels (TRITON_INTERPRET=1), and torch.autocast's
cast of a matmul's inputs."""

import os

import torch
import triton
import triton.language as tl

# Global constexprs, so that @triton.jit code may read them; `.value` is the plain float for host code.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2

# Triton's CPU interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even (and multiplies bf16
# dot operands as raw integers), so the kernels round by hand there to show the GPU's numerics.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_fp32(x, DROP_BITS: tl.constexpr):
    """fp32 x rounded to nearest-even with its low DROP_BITS mantissa bits cleared (16: bf16, 13: tf32),
    still as fp32. Infinities stay infinite; values past the format's largest round to infinity."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    if DROP_BITS == 16:
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    else:
        tl.static_assert(DROP_BITS == 13)
        bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


def autocast_inputs(*tensors):
    """The tensors as torch.autocast hands them to a matmul (F.linear, SDPA): floating ones cast to the
    autocast dtype when autocast is on for their device type; unchanged otherwise (None passes through).
    Without it an fp32 input under autocast (a LayerNorm's output, an fp32 master weight) would run the
    kernels and their matmuls in fp32. The cast is differentiable: its gradient returns in the input's dtype."""
    device_type = next(t.device.type for t in tensors if t is not None)
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
