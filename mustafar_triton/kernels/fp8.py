"""float8_e4m3fn values, rounded and widened with integer operations (format.py: fp8 values).

Why not `x.to(tl.float8e4nv)`: the Triton interpreter's fp16 -> fp8 cast drops the rounding carry
out of the mantissa and rounds subnormals wrongly (triton 3.6.0 and 3.9.0; upstream issue #8322),
and GPU paths have double-rounded through fp16 (triton PR #11753). These helpers give the same
bits on both, the bits torch's float -> float8_e4m3fn cast gives for finite values within +-448
(reference.to_fp8 is their torch twin).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fp8_e4m3_bits(x, inv_scale):
    """x * inv_scale (float32) as float8_e4m3fn bits (uint8): nearest value, ties to even; finite
    values beyond +-448 saturate to +-448, NaN and +-inf give NaN (0x7f or 0xff: a NaN's sign is
    kept by the interpreter, not by GPUs' float conversions)."""
    y = x.to(tl.float32) * inv_scale
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    # |y| >= 2^-6 (e4m3's normals): drop 20 of float32's 23 mantissa bits, ties to even (a carry
    # into the exponent is the right next value), then rebias the exponent from 127 to 7
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    # |y| < 2^-6: multiples of 2^-9 (0..8; 8 is the smallest normal's code), rounded to even by
    # the float32 adder: |y| * 512 + 2^23 keeps no bit below the units
    sub = (tl.abs(y) * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(a < 0x3C800000, sub, tl.minimum(normal, 0x7E))
    code = tl.where(a >= 0x7F800000, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def fp8_e4m3_value(raw):
    """float8_e4m3fn bits (uint8) as the float32 value they hold, exactly: the sign, exponent and
    mantissa bits moved into an fp16 whose exponent bias is 8 too high (so subnormals stay
    subnormals), then times 2^8; NaN (0x7f / 0xff) stays NaN."""
    b = raw.to(tl.int32)
    half = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    value = half.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    return tl.where((b & 0x7F) == 0x7F, float("nan"), value)
