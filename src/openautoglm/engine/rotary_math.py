"""The rotary's arithmetic in Triton, shared by the in-place rotary (``models/fused_ops``) and the attention
backend's rotate-and-cache kernel (``attention/triton_paged``), so both round alike."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rotate_pairs(x1, x2, cos, sin, dtype: tl.constexpr):
    """Rotated ``(x1, x2)`` pairs in float32, each product rounded to ``dtype`` before the sum as the torch path
    rounds ``x1 * cos - x2 * sin`` (launch with ``enable_fp_fusion=False``, or the two fuse into one FMA)."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    o1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    o2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    return o1, o2
