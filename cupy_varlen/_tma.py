"""Tensor maps (CUtensorMap) for the sm90 kernels' TMA copies and reductions: the forward's K and V
tiles (16-bit) and the backward's fp32 dQ accumulator.

A map describes a (rows, heads, head_dim) tensor in global memory and the box one copy moves:
``box_rows`` rows x 128 bytes of one head (64 16-bit elements, or 32 fp32), stored with the 128-byte
swizzle, which is the layout of one panel of ``SmemTile`` (cuda_src/tiles.cuh) and of the dQ
staging (``stage_accumulator_f32``, cuda_src/epilogue.cuh). It is encoded on the host by the
driver's ``cuTensorMapEncodeTiled`` (through ctypes: CuPy does not wrap it) and travels to the
kernel inside its ``__grid_constant__`` parameters; nothing is allocated on the device.

Where the driver entry point is missing or the tensor does not meet TMA's rules (16-byte aligned
base, strides multiples of 16 bytes), ``tile_map`` returns None and the kernel falls back to
cp.async (K/V) or atomics (dQ).
"""

from __future__ import annotations

import ctypes
import functools
import sys

MAP_BYTES = 128
PANEL_BYTES = 128  # one box's width in bytes: the 128-byte swizzle's span

# cuda.h enumerators (CUtensorMapDataType, ...Interleave, ...Swizzle, ...L2promotion,
# ...FloatOOBfill).
_DATA_TYPE = {"fp16": 6, "bf16": 9, "fp32": 7}
_ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZEROS = 0  # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: elements outside the tensor read as 0
_MAX_STRIDE = 1 << 40
_MAX_DIM = 1 << 32


@functools.lru_cache(maxsize=None)
def _encode_tiled():
    """cuTensorMapEncodeTiled from the driver library, or None where there is none (no GPU)."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        fn = ctypes.CDLL(name).cuTensorMapEncodeTiled
    except (OSError, AttributeError):
        return None
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p,
                   u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


def tma_addressable(ptr: int, row_stride: int, head_stride: int, head_dim: int,
                    element_bytes: int = 2) -> bool:
    """TMA's rules for the tensor, strides in elements: a 16-byte aligned base, strides that are
    multiples of 16 bytes and below 2^40, rows a multiple of 16 bytes."""
    b = element_bytes
    return (ptr % 16 == 0 and all(s > 0 and (b * s) % 16 == 0 and b * s < _MAX_STRIDE
                                  for s in (row_stride, head_stride))
            and (b * head_dim) % 16 == 0)


@functools.lru_cache(maxsize=256)
def tile_map(ptr: int, dtype: str, rows: int, heads: int, head_dim: int, row_stride: int,
             head_stride: int, box_rows: int):
    """The 128-byte map of the tensor at ``ptr`` (strides in elements), or None (see above).

    Cached: a map depends only on these numbers, and calls over the same buffers (inference
    loops, benchmarks, graph captures) then skip the driver call."""
    encode = _encode_tiled()
    b = _ELEMENT_BYTES[dtype]
    if (encode is None or not tma_addressable(ptr, row_stride, head_stride, head_dim, b)
            or max(rows, heads, head_dim) >= _MAX_DIM or rows <= 0):
        return None
    dims = (ctypes.c_uint64 * 3)(head_dim, heads, rows)
    strides = (ctypes.c_uint64 * 2)(b * head_stride, b * row_stride)
    box = (ctypes.c_uint32 * 3)(PANEL_BYTES // b, 1, box_rows)
    unit = (ctypes.c_uint32 * 3)(1, 1, 1)
    # CUtensorMap is a 64-byte aligned type; ctypes buffers are only malloc-aligned.
    buf = ctypes.create_string_buffer(MAP_BYTES + 64)
    at = -ctypes.addressof(buf) % 64
    status = encode(ctypes.addressof(buf) + at, _DATA_TYPE[dtype], 3, ctypes.c_void_p(ptr), dims,
                    strides, box, unit, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B,
                    _OOB_FILL_ZEROS)
    return buf.raw[at:at + MAP_BYTES] if status == 0 else None
