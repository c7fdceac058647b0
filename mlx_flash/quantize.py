"""Quantized neuron rows: MLX's affine quantization, between raw stored values and numpy.

The converter quantizes each neuron's row (gate row, up row, down column) along the hidden
dimension with ``mx.quantize(rows, group_size, bits)``, or takes a quantized source's packed
rows as they are; the reader hands the packed fields to the FFN, which computes with
``mx.quantized_matmul`` (see `ffn.ffn_block`), or widens them to float32 rows for callers that
want plain rows (`dequantize`). Raw values are what a safetensors file holds (bfloat16 as its
uint16 bits, see `dtypes`).

The dense part of a model (attention, embeddings, lm_head) is quantized as mlx-lm quantizes a
model (`dense_predicate`, `quantize_dense`) and loads as mlx-lm loads one (`quantize_loaded`).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .layout import QUANT_MODE

_MX = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


def to_mx(raw: np.ndarray, st_dtype: str) -> mx.array:
    """Raw stored float values (safetensors dtype name) as an MLX array of that dtype."""
    if st_dtype == "BF16":
        return mx.array(np.ascontiguousarray(raw).view(np.uint16)).view(mx.bfloat16)
    return mx.array(raw).astype(_MX[st_dtype])


def to_raw(a: mx.array, st_dtype: str) -> np.ndarray:
    """An MLX float array as raw stored values of `st_dtype` (bfloat16: uint16 bits)."""
    a = a.astype(_MX[st_dtype])
    if st_dtype == "BF16":
        return np.array(a.view(mx.uint16))
    return np.array(a)


def quantize_rows(
    rows: np.ndarray, st_dtype: str, bits: int, group_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize rows [k, d] of raw `st_dtype` values along d: (packed uint32 [k, d*bits/32],
    scales and biases [k, d/group_size] as raw `st_dtype`), exactly ``mx.quantize``'s output."""
    w, s, b = mx.quantize(to_mx(rows, st_dtype), group_size=group_size, bits=bits)
    return np.array(w), to_raw(s, st_dtype), to_raw(b, st_dtype)


def dequantize_raw(
    w: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    scale_st: str,
    bits: int,
    group_size: int,
    out_st: str,
) -> np.ndarray:
    """``mx.dequantize`` of a quantized source tensor (scales/biases raw `scale_st`), as raw
    `out_st` values: the float weights the quantization stands for."""
    x = mx.dequantize(
        mx.array(w), to_mx(scales, scale_st), to_mx(biases, scale_st), group_size=group_size, bits=bits
    )
    return to_raw(x, out_st)


def unpack(w: np.ndarray, bits: int) -> np.ndarray:
    """The integer values packed in uint32 rows [k, p] (MLX's order: low bits first): uint8
    [k, p * 32 / bits]. For 4 and 8 bits."""
    b = np.ascontiguousarray(w).view(np.uint8)
    if bits == 8:
        return b
    if bits == 4:
        out = np.empty(b.shape[:-1] + (b.shape[-1], 2), np.uint8)
        np.bitwise_and(b, 0x0F, out=out[..., 0])
        np.right_shift(b, 4, out=out[..., 1])
        return out.reshape(b.shape[:-1] + (2 * b.shape[-1],))
    raise ValueError(f"unpack: {bits}-bit values are not supported")


def dequantize(
    w: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    bits: int,
    group_size: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """float32 rows [k, d] from packed rows and float32 scales/biases [k, d/group_size]
    (numpy: runs in reader threads). Equals ``mx.dequantize`` computed in float32."""
    q = unpack(w, bits)
    k, d = q.shape
    groups = d // group_size
    if out is None:
        out = np.empty((k, d), np.float32)
    g = out.reshape(k, groups, group_size)
    np.multiply(q.reshape(k, groups, group_size), scales.reshape(k, groups, 1), out=g, dtype=np.float32)
    g += biases.reshape(k, groups, 1)
    return out


# -- the dense part, as mlx-lm quantizes and loads it ----------------------------------------


def dense_predicate(model: nn.Module, group_size: int) -> Callable[[str, nn.Module], bool]:
    """mlx-lm's rule (`mlx_lm.utils.quantize_model`): a module with `to_quantized` whose input
    dimension the group size divides, and which the model's own `quant_predicate` (if any) keeps."""
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        return own(path, module) if own is not None else True

    return predicate


def quantized_paths(model: nn.Module, bits: int, group_size: int) -> set[str]:
    """Paths of the modules of `model` (its weights not evaluated) that mlx-lm would quantize."""
    paths: set[str] = set()
    predicate = dense_predicate(model, group_size)

    def record(path: str, module: nn.Module):
        keep = predicate(path, module)
        if keep:
            paths.add(path)
        return False  # nothing is quantized here: only the decision is wanted

    nn.quantize(model, group_size=group_size, bits=bits, mode=QUANT_MODE, class_predicate=record)
    return paths


def quantize_loaded(model: nn.Module, config: dict, weights: dict[str, mx.array]) -> None:
    """Make the modules of `model` quantized where the weights to be loaded are (their
    ``.scales`` present), with config.json's `quantization`: what mlx_lm.utils.load_model does."""
    quantization = config.get("quantization")
    if not quantization:
        return
    try:
        from mlx_lm.utils import infer_quant_config
    except ImportError:  # pragma: no cover - older mlx-lm
        infer_quant_config = None

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):  # e.g. a vocabulary table left on flash
            return False
        if path in quantization:
            return quantization[path]
        if f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights) if infer_quant_config else True

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", QUANT_MODE),
        class_predicate=predicate,
    )
