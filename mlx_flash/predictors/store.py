"""The predictors file: per layer a low-rank activation predictor, and how it is applied.

Layer l's predictor scores every FFN neuron from that layer's FFN input x (a [d] vector):

    z = B (A x) + b        A: [r, d], B: [n, r], b: [n]  (P(x) = sigmoid(z))
    active ids = { i : z_i >= t }                         t: the layer's decision threshold

(the paper's P(x) = sigmoid(B(A x)), plus a per-neuron bias, which costs n numbers and lets
each neuron have its own base rate). The threshold is kept as a logit so that no sigmoid is
computed per token; `threshold_probability` in the metadata is sigmoid(t).

`predictors.safetensors` in a flash folder holds, per layer i, the factors in 8-bit MLX affine
quantization (format 2: ``layers.{i}.Aq`` [r, d/4] uint32 with ``.scales`` and ``.biases``
[r, d/g], quantized along d; ``layers.{i}.Btq`` = B transposed [r, n/4] uint32 with ``.scales``
and ``.biases`` [r, n/g], quantized along n; g = 64, or 32 where 64 does not divide d and every
n), else (d or an n not a multiple of 32, and every format 1 file) plain ``layers.{i}.A`` and
``layers.{i}.B``; and ``layers.{i}.bias`` and ``layers.{i}.threshold`` (shape [1]). Float tensors
are in the flash folder's dtype (float16 for bfloat16 folders). 8-bit factors cost 1.06-1.13
bytes a weight against 2-4, so the same bytes hold 1.8-3.6x the rank, and MLX's
``quantized_matmul`` with float32 inputs is as fast on a CPU as the float32 product. Under the
metadata key ``mlx_flash_predictors`` a JSON object: ``format``, ``quantization`` (``bits``,
``group_size``; absent for plain factors), ``rule`` (how "active" was defined for
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
from ..quantize import dequantize_raw
from ..safetensors_file import SafetensorsError, read_header

FORMAT = 2  # 2: 8-bit factors (format 1, plain float factors, still loads)
METADATA_KEY = "mlx_flash_predictors"
QUANT_BITS = 8
FLOAT_TENSORS = ("A", "B", "bias", "threshold")
QUANT_TENSORS = ("Aq", "Aq.scales", "Aq.biases", "Btq", "Btq.scales", "Btq.biases", "bias", "threshold")


class PredictorError(MlxFlashError):
    """A predictors file that is missing, malformed, or does not match its flash folder."""


def tensor_name(layer: int, what: str) -> str:
    return f"layers.{layer}.{what}"


def storage_dtype(flash_dtype: str) -> np.dtype:
    """The dtype of the predictors' float tensors: the flash folder's (float16 for bfloat16
    folders, which numpy cannot hold)."""
    return np.dtype(np.float32) if flash_dtype == "float32" else np.dtype(np.float16)


def quant_group(d: int, ns: list[int]) -> int | None:
    """The group size of 8-bit factors for hidden size d and the layers' neuron counts ns (A is
    quantized along d, B transposed along n): 64 or 32, the larger that divides them all; None
    where neither does (plain float factors)."""
    return next((g for g in (64, 32) if d % g == 0 and all(n % g == 0 for n in ns)), None)


@dataclass(frozen=True)
class Storage:
    """How a folder's predictors are stored: float tensors in `dtype`; the factors in 8-bit
    groups of `group` (None: in `dtype` too). The one place that says what a predictor costs."""

    dtype: np.dtype
    group: int | None

    @classmethod
    def of(cls, manifest: layout.Manifest) -> Storage:
        ns = [e.num_neurons for e in manifest.layers]
        return cls(storage_dtype(manifest.dtype), quant_group(manifest.hidden_size, ns))

    @property
    def st_dtype(self) -> str:
        return "F32" if self.dtype == np.float32 else "F16"

    def rank_bytes(self, d: int, n: int) -> int:
        """Bytes one more rank adds to a layer's predictor (a row of A, a column of B)."""
        size = self.dtype.itemsize
        if self.group is None:
            return (d + n) * size
        return (d + n) * QUANT_BITS // 8 + 2 * (d + n) // self.group * size

    def layer_bytes(self, d: int, n: int, rank: int) -> int:
        """Bytes of a layer's predictor of `rank` (factors, bias, threshold)."""
        return rank * self.rank_bytes(d, n) + n * self.dtype.itemsize + 4

    def info(self) -> dict:
        return {} if self.group is None else {"quantization": {"bits": QUANT_BITS, "group_size": self.group}}

    def _quantize(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from ..dtypes import from_float32
        from ..quantize import quantize_rows

        st = self.st_dtype
        return quantize_rows(from_float32(rows, st), st, QUANT_BITS, self.group)

    def tensors(self, layer: int, p: LayerPredictor) -> dict[str, np.ndarray]:
        """The file's tensors for layer `layer`'s predictor `p`."""
        out = {}
        if self.group is None:
            out["A"], out["B"] = (np.ascontiguousarray(a, dtype=self.dtype) for a in (p.A, p.B))
        else:
            for name, rows in (("Aq", p.A), ("Btq", np.asarray(p.B).T)):
                out[name], out[name + ".scales"], out[name + ".biases"] = self._quantize(rows)
        out["bias"] = np.ascontiguousarray(p.bias, dtype=self.dtype)
        out["threshold"] = np.array([p.threshold], dtype=np.float32)
        return {tensor_name(layer, k): v for k, v in out.items()}

    def round_trip(self, p: LayerPredictor) -> LayerPredictor:
        """`p` as a save and load gives it back (factors rounded or quantized), in float32: what
        thresholds are chosen on."""
        r = lambda a: np.asarray(a).astype(self.dtype).astype(np.float32)  # noqa: E731
        if self.group is None:
            return LayerPredictor(r(p.A), r(p.B), r(p.bias), float(p.threshold))
        st = self.st_dtype
        A, Bt = (
            dequantize_raw(*self._quantize(a), st, QUANT_BITS, self.group, "F32")
            for a in (p.A, np.asarray(p.B).T)
        )
        return LayerPredictor(A, np.ascontiguousarray(Bt.T), r(p.bias), float(p.threshold))


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


def save_predictors(
    path: str | os.PathLike, layers: list[LayerPredictor], info: dict, storage: Storage
) -> None:
    """Write `layers` (one per model layer, in order) and the JSON `info` to `path`."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for i, p in enumerate(layers):
        tensors.update(storage.tensors(i, p))
    info = {k: v for k, v in info.items() if k not in ("format", "quantization")}
    meta = {METADATA_KEY: json.dumps({"format": FORMAT, **info, **storage.info()})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def install_predictors(
    folder: str | os.PathLike, layers: list[LayerPredictor], info: dict, summary: dict | None = None
) -> Path:
    """Save `layers` as the folder's predictors file (in `Storage.of` the folder) and record it
    in the manifest (``predictors_file``; ``extra["predictors"]`` = `summary`). Returns the
    file's path."""
    manifest = layout.read_manifest(folder)
    path = Path(folder) / layout.PREDICTORS_NAME
    save_predictors(path, layers, info, Storage.of(manifest))
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


def _group_of(info: dict, path: Path) -> int | None:
    q = info.get("quantization")
    if q is None:
        return None
    if q.get("bits") != QUANT_BITS or q.get("group_size") not in (32, 64):
        raise PredictorError(
            f"{path}: unsupported predictor quantization {q}; re-run python -m mlx_flash.predictors train"
        )
    return int(q["group_size"])


def _want_shapes(names: dict, d: int, n: int, group: int | None) -> dict:
    """The shapes a layer's tensors must have, for the rank its first factor says."""
    if group is None:
        r = names.get("A", (0,))[0]
        return {"A": (r, d), "B": (n, r), "bias": (n,), "threshold": (1,)}
    r = names.get("Aq", (0,))[0]
    packs = 32 // QUANT_BITS
    return {
        "Aq": (r, d // packs),
        "Aq.scales": (r, d // group),
        "Aq.biases": (r, d // group),
        "Btq": (r, n // packs),
        "Btq.scales": (r, n // group),
        "Btq.biases": (r, n // group),
        "bias": (n,),
        "threshold": (1,),
    }


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
    group = _group_of(info, path)
    d = manifest.hidden_size
    for e in manifest.layers:
        n = e.num_neurons
        shapes = {
            name: tensors[tensor_name(e.layer, name)].shape
            for name in (FLOAT_TENSORS if group is None else QUANT_TENSORS)
            if tensor_name(e.layer, name) in tensors
        }
        want = _want_shapes(shapes, d, n, group)
        if shapes != want or next(iter(want.values()))[0] < 1:
            kind = "A [r, d], B [n, r]" if group is None else "8-bit A [r, d], B^T [r, n]"
            raise PredictorError(
                f"{path}: layer {e.layer}'s predictor does not match the model (want {kind} with d = {d}, "
                f"n = {n}, bias [{n}]); re-run python -m mlx_flash.predictors train"
            )
    return tensors, info


def predictor_sizes(folder: str | os.PathLike, manifest: layout.Manifest) -> tuple[int, int]:
    """(float elements, bytes of packed 8-bit factors) of all layers' predictors, as held in
    memory: the float part in the compute dtype (what the memory planner counts)."""
    tensors, _ = read_predictors_header(folder, manifest)
    floats = sum(
        t.numel for name, t in tensors.items() if t.dtype != "U32" and not name.endswith(".threshold")
    )
    packed = sum(t.nbytes for t in tensors.values() if t.dtype == "U32")
    return floats, packed


class Predictors:
    """All layers' predictors, resident in memory as MLX arrays (8-bit factors as stored, or
    float factors); `predict(layer, x)` gives the ids of the neurons predicted active for one
    token."""

    def __init__(self, raw: list[dict[str, np.ndarray]], info: dict, group: int | None, dtype: mx.Dtype):
        """`raw`: per layer the file's tensors by short name (`FLOAT_TENSORS` or `QUANT_TENSORS`)."""
        self.info = info
        self.dtype = dtype
        self.group = group
        f = lambda a: mx.array(np.asarray(a, np.float32)).astype(dtype)  # noqa: E731
        if group is None:
            self._A = [(f(t["A"]),) for t in raw]
            self._B = [(f(t["B"]),) for t in raw]
        else:
            self._A = [(mx.array(t["Aq"]), f(t["Aq.scales"]), f(t["Aq.biases"])) for t in raw]
            self._B = [(mx.array(t["Btq"]), f(t["Btq.scales"]), f(t["Btq.biases"])) for t in raw]
        self._bias = [f(t["bias"]) for t in raw]
        self.thresholds = [float(t["threshold"][0]) for t in raw]
        self._float: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        mx.eval(self._A, self._B, self._bias)

    @classmethod
    def load(
        cls, folder: str | os.PathLike, manifest: layout.Manifest | None = None, dtype: mx.Dtype = mx.float32
    ) -> Predictors:
        from safetensors.numpy import load_file

        manifest = manifest or layout.read_manifest(folder)
        path = predictors_path(folder, manifest)
        _, info = read_predictors_header(folder, manifest)
        group = _group_of(info, path)
        names = FLOAT_TENSORS if group is None else QUANT_TENSORS
        tensors = load_file(str(path))
        raw = [{k: tensors[tensor_name(i, k)] for k in names} for i in range(manifest.num_layers)]
        return cls(raw, info, group, dtype)

    @property
    def num_layers(self) -> int:
        return len(self._A)

    def ranks(self) -> list[int]:
        return [int(a[0].shape[0]) for a in self._A]

    @property
    def num_elems(self) -> int:
        """Weights of all layers' predictors (a factor's weight counts one, quantized or not)."""
        return sum(self.layer_elems(i) for i in range(self.num_layers))

    def layer_elems(self, layer: int) -> int:
        (r, cols), n = self._A[layer][0].shape, self._bias[layer].size
        d = cols * (1 if self.group is None else 32 // QUANT_BITS)
        return r * (d + n) + n + 1

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return sum(a.nbytes for layer in (*self._A, *self._B) for a in layer) + sum(
            b.nbytes for b in self._bias
        )

    def logits(self, layer: int, x: mx.array) -> mx.array:
        """z for inputs x [..., d]."""
        x = x.astype(self.dtype)
        if self.group is None:
            (A,), (B,) = self._A[layer], self._B[layer]
            return (x @ A.T) @ B.T + self._bias[layer]
        q = dict(group_size=self.group, bits=QUANT_BITS)
        h = mx.quantized_matmul(x, *self._A[layer], transpose=True, **q)
        return mx.quantized_matmul(h, *self._B[layer], transpose=False, **q) + self._bias[layer]

    def predict(self, layer: int, x: mx.array) -> np.ndarray:
        """Sorted ids of the neurons predicted active for one token's FFN input x ([1, d])."""
        z = self.logits(layer, x.reshape(1, -1)).reshape(-1)
        mx.eval(z)
        return np.flatnonzero(np.array(z) >= self.thresholds[layer]).astype(np.int64)

    def float_factors(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(A [r, d], B [n, r]) of a layer as float32 numpy (8-bit factors widened, kept)."""
        if layer not in self._float:
            if self.group is None:
                self._float[layer] = (_numpy(self._A[layer][0]), _numpy(self._B[layer][0]))
            else:
                A, Bt = (
                    _numpy(mx.dequantize(*f, group_size=self.group, bits=QUANT_BITS))
                    for f in (self._A[layer], self._B[layer])
                )
                self._float[layer] = (A, np.ascontiguousarray(Bt.T))
        return self._float[layer]

    def predict_mask(self, layer: int, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """bool [N, n]: predicted active, for a batch of inputs x [N, d] (numpy, computed with
        numpy's BLAS: MLX's Linux CPU one is 30-40x slower for batches)."""
        A, B = self.float_factors(layer)
        b = _numpy(self._bias[layer])
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
