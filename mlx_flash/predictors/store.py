"""The predictors file: per layer a low-rank activation predictor, and how it is applied.

Layer l's predictor scores every FFN neuron from that layer's FFN input x (a [d] vector):

    z = B (A x) + b        A: [r, d], B: [n, r], b: [n]  (P(x) = sigmoid(z))
    active ids = { i : z_i >= t }                         t: the layer's decision threshold

(the paper's P(x) = sigmoid(B(A x)), plus a per-neuron bias, which costs n numbers and lets
each neuron have its own base rate). The threshold is kept as a logit so that no sigmoid is
computed per token; `threshold_probability` in the metadata is sigmoid(t).

`predictors.safetensors` in a flash folder holds, per layer i, the tensors
``layers.{i}.A``, ``layers.{i}.B``, ``layers.{i}.bias`` and ``layers.{i}.threshold`` (shape
[1]), in the flash folder's dtype (float16 for bfloat16 folders), and under the metadata key
``mlx_flash_predictors`` a JSON object: ``format`` (1), ``rule`` (how "active" was defined for
training: ``relu`` = activation > 0, or ``threshold`` = |activation| > the layer's
``activation_threshold``), and ``layers``: per layer rank, threshold, and the recall and
predicted/true ratio measured on the calibration text's validation split. The manifest's
``predictors_file`` names the file and its ``extra["predictors"]`` repeats the per-layer summary.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import layout
from ..errors import MlxFlashError
from ..safetensors_file import SafetensorsError, read_header

FORMAT = 1
METADATA_KEY = "mlx_flash_predictors"
TENSORS = ("A", "B", "bias", "threshold")


class PredictorError(MlxFlashError):
    """A predictors file that is missing, malformed, or does not match its flash folder."""


def tensor_name(layer: int, what: str) -> str:
    return f"layers.{layer}.{what}"


def storage_dtype(flash_dtype: str) -> np.dtype:
    """The dtype predictors are stored in: the flash folder's (float16 for bfloat16 folders,
    which numpy cannot hold)."""
    return np.dtype(np.float32) if flash_dtype == "float32" else np.dtype(np.float16)


@dataclass
class LayerPredictor:
    """One layer's predictor as numpy arrays (float32 while training)."""

    A: np.ndarray  # [r, d]
    B: np.ndarray  # [n, r]
    bias: np.ndarray  # [n]
    threshold: float  # on the logit z

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def num_elems(self) -> int:
        return int(self.A.size + self.B.size + self.bias.size + 1)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """z for a batch of inputs x [N, d] (float32)."""
        return (np.asarray(x, np.float32) @ self.A.T.astype(np.float32)) @ self.B.T.astype(
            np.float32
        ) + self.bias.astype(np.float32)

    def rounded(self, dtype: np.dtype) -> LayerPredictor:
        """The same predictor with its factors rounded to `dtype` and held as float32 (what
        is applied after a save and load)."""
        r = lambda a: np.asarray(a).astype(dtype).astype(np.float32)  # noqa: E731
        return LayerPredictor(r(self.A), r(self.B), r(self.bias), float(self.threshold))


def save_predictors(
    path: str | os.PathLike, layers: list[LayerPredictor], info: dict, dtype: np.dtype
) -> None:
    """Write `layers` (one per model layer, in order) and the JSON `info` to `path`."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for i, p in enumerate(layers):
        tensors[tensor_name(i, "A")] = np.ascontiguousarray(p.A, dtype=dtype)
        tensors[tensor_name(i, "B")] = np.ascontiguousarray(p.B, dtype=dtype)
        tensors[tensor_name(i, "bias")] = np.ascontiguousarray(p.bias, dtype=dtype)
        tensors[tensor_name(i, "threshold")] = np.array([p.threshold], dtype=np.float32)
    meta = {METADATA_KEY: json.dumps({"format": FORMAT, **info})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def install_predictors(
    folder: str | os.PathLike, layers: list[LayerPredictor], info: dict, summary: dict | None = None
) -> Path:
    """Save `layers` as the folder's predictors file and record it in the manifest
    (``predictors_file``; ``extra["predictors"]`` = `summary`). Returns the file's path."""
    manifest = layout.read_manifest(folder)
    path = Path(folder) / layout.PREDICTORS_NAME
    save_predictors(path, layers, info, storage_dtype(manifest.dtype))
    manifest.predictors_file = layout.PREDICTORS_NAME
    manifest.extra["predictors"] = summary if summary is not None else {"file": layout.PREDICTORS_NAME}
    layout.write_manifest(folder, manifest)
    return path


def predictors_path(folder: str | os.PathLike, manifest: layout.Manifest) -> Path:
    if not manifest.predictors_file:
        raise PredictorError(
            f"{folder}: the flash folder has no predictors; train them with "
            f"`python -m mlx_flash.predictors train --model {folder} --data TEXTFILE` or use selection='exact'"
        )
    return Path(folder) / manifest.predictors_file


def read_predictors_header(folder: str | os.PathLike, manifest: layout.Manifest) -> tuple[dict, dict]:
    """(tensor infos by name, info JSON) of a folder's predictors file, checked against the
    manifest's shapes without reading the tensors. Raises a one-line PredictorError."""
    path = predictors_path(folder, manifest)
    if not path.is_file():
        raise PredictorError(
            f"{path}: missing (the manifest names it); re-run python -m mlx_flash.predictors train"
        )
    try:
        tensors, meta = read_header(path)
    except SafetensorsError as e:
        raise PredictorError(f"{e}; re-run python -m mlx_flash.predictors train") from None
    try:
        info = json.loads(meta[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise PredictorError(
            f"{path}: no {METADATA_KEY} metadata; not written by mlx_flash.predictors"
        ) from None
    if info.get("format", 0) > FORMAT:
        raise PredictorError(
            f"{path}: predictors format {info.get('format')} is newer than this mlx_flash reads; upgrade"
        )
    d = manifest.hidden_size
    for e in manifest.layers:
        n = e.num_neurons
        shapes = {
            name: tensors[tensor_name(e.layer, name)].shape
            for name in TENSORS
            if tensor_name(e.layer, name) in tensors
        }
        r = shapes.get("A", (0,))[0]
        want = {"A": (r, d), "B": (n, r), "bias": (n,), "threshold": (1,)}
        if shapes != want or r < 1:
            raise PredictorError(
                f"{path}: layer {e.layer}'s predictor does not match the model (want A [r, {d}], B [{n}, r], bias [{n}]); "
                "re-run python -m mlx_flash.predictors train"
            )
    return tensors, info


def predictor_elems(folder: str | os.PathLike, manifest: layout.Manifest) -> int:
    """Elements of all layers' predictors (what the memory planner counts)."""
    tensors, _ = read_predictors_header(folder, manifest)
    return sum(t.numel for t in tensors.values())


class Predictors:
    """All layers' predictors, resident in memory as MLX arrays; `predict(layer, x)` gives the
    ids of the neurons predicted active for one token."""

    def __init__(self, layers: list[LayerPredictor], info: dict, dtype: mx.Dtype = mx.float32):
        self.info = info
        self.dtype = dtype
        self._A = [mx.array(np.asarray(p.A, np.float32)).astype(dtype) for p in layers]
        self._B = [mx.array(np.asarray(p.B, np.float32)).astype(dtype) for p in layers]
        self._bias = [mx.array(np.asarray(p.bias, np.float32)).astype(dtype) for p in layers]
        self.thresholds = [float(p.threshold) for p in layers]
        mx.eval(self._A, self._B, self._bias)

    @classmethod
    def load(
        cls, folder: str | os.PathLike, manifest: layout.Manifest | None = None, dtype: mx.Dtype = mx.float32
    ) -> Predictors:
        from safetensors.numpy import load_file

        manifest = manifest or layout.read_manifest(folder)
        _, info = read_predictors_header(folder, manifest)
        raw = load_file(str(predictors_path(folder, manifest)))
        layers = [
            LayerPredictor(
                raw[tensor_name(i, "A")],
                raw[tensor_name(i, "B")],
                raw[tensor_name(i, "bias")],
                float(raw[tensor_name(i, "threshold")][0]),
            )
            for i in range(manifest.num_layers)
        ]
        return cls(layers, info, dtype)

    @property
    def num_layers(self) -> int:
        return len(self._A)

    @property
    def num_elems(self) -> int:
        return sum(a.size + b.size + c.size + 1 for a, b, c in zip(self._A, self._B, self._bias))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes + c.nbytes for a, b, c in zip(self._A, self._B, self._bias))

    def ranks(self) -> list[int]:
        return [int(a.shape[0]) for a in self._A]

    def logits(self, layer: int, x: mx.array) -> mx.array:
        """z for inputs x [..., d]."""
        x = x.astype(self.dtype)
        return (x @ self._A[layer].T) @ self._B[layer].T + self._bias[layer]

    def predict(self, layer: int, x: mx.array) -> np.ndarray:
        """Sorted ids of the neurons predicted active for one token's FFN input x ([1, d])."""
        z = self.logits(layer, x.reshape(-1))
        mx.eval(z)
        return np.flatnonzero(np.array(z) >= self.thresholds[layer]).astype(np.int64)

    def predict_mask(self, layer: int, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """bool [N, n]: predicted active, for a batch of inputs x [N, d] (numpy, computed with
        numpy's BLAS: MLX's Linux CPU one is 30-40x slower for batches)."""
        A, B, b = (_numpy(a) for a in (self._A[layer], self._B[layer], self._bias[layer]))
        t = self.thresholds[layer]
        out = [
            ((np.asarray(x[lo : lo + chunk], np.float32) @ A.T) @ B.T + b) >= t
            for lo in range(0, len(x), chunk)
        ]
        return np.concatenate(out) if out else np.zeros((0, B.shape[0]), bool)


def _numpy(a: mx.array) -> np.ndarray:
    """float32 numpy of an MLX array (a view when it is float32)."""
    return np.asarray(a) if a.dtype == mx.float32 else np.array(a.astype(mx.float32))


def logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))
