"""Conversions between the dtypes weights are stored in and numpy arrays.

bfloat16 has no numpy dtype: its values travel as their raw uint16 bits. A bfloat16 is the top
half of a float32, so widening is a shift, and narrowing rounds to nearest even.
"""

from __future__ import annotations

import numpy as np

from .safetensors_file import DTYPES

FLOAT_ST_DTYPES = ("F32", "F16", "BF16")


def to_float32(raw: np.ndarray, st_dtype: str) -> np.ndarray:
    """Widen raw stored values (safetensors dtype name) to float32."""
    if st_dtype == "F32":
        return raw.astype(np.float32, copy=False)
    if st_dtype == "F16":
        return raw.astype(np.float32)
    if st_dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"not a float dtype: {st_dtype}")


def from_float32(x: np.ndarray, st_dtype: str) -> np.ndarray:
    """Narrow float32 values to the raw stored representation of `st_dtype`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if st_dtype == "F32":
        return x
    if st_dtype == "F16":
        return x.astype(np.float16)
    if st_dtype == "BF16":
        bits = x.view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
        out = (rounded >> 16).astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            out[nan] = 0x7FC0
        return out
    raise ValueError(f"not a float dtype: {st_dtype}")


def convert_raw(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Raw values of dtype `src` as raw values of dtype `dst` (no change when equal)."""
    if src == dst or src not in FLOAT_ST_DTYPES:
        return raw
    return from_float32(to_float32(raw, src), dst)


def raw_dtype(st_dtype: str) -> np.dtype:
    return DTYPES[st_dtype][0]
