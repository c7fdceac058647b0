"""Calibration data for predictors: a text file's tokens, each layer's FFN inputs, and which
neurons are truly active for each of them.

The model runs in `naive` mode (the dense weights resident, every layer's FFN streamed from
flash in blocks), so a model larger than memory can be calibrated; a recorder in front of each
FlashFFN keeps its input. A neuron's activation is the FFN's activation function applied to
its pre-activation: act(gate_i . x) in a gated FFN, act(up_i . x + b_i) in a two-matrix one.
What counts as *active* (an `ActiveRule`):
- ``relu``: activation > 0, the exact set ReLU leaves (ReLU models: nothing else fires; dReLU,
  which applies relu to the up projection too: the activation is relu(gate x) relu(up x));
- ``threshold``: |activation| > the layer's threshold, calibrated so that a target fraction of
  activations fall under it (CATS, TEAL): for SwiGLU / GELU models, which are not sparse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from ..errors import MlxFlashError
from ..ffn import FlashFFN, applies_to_up, ffn_block, neuron_activations

TEXT_CHUNK_CHARS = 1 << 16


def read_tokens(tokenizer, path: str | Path, max_tokens: int | None = None) -> np.ndarray:
    """The tokens of a UTF-8 text file (at most `max_tokens`), encoded piece by piece at line
    breaks so that a large file is not encoded whole. One-line MlxFlashError if unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MlxFlashError(f"{path}: no such text file") from None
    except UnicodeDecodeError:
        raise MlxFlashError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise MlxFlashError(f"{path}: cannot read ({e.strerror or e})") from None
    out: list[int] = []
    pos = 0
    while pos < len(text) and (max_tokens is None or len(out) < max_tokens):
        end = min(len(text), pos + TEXT_CHUNK_CHARS)
        if end < len(text):
            nl = text.rfind("\n", pos, end)
            end = nl + 1 if nl > pos else end
        out.extend(_encode(tokenizer, text[pos:end]))
        pos = end
    if max_tokens is not None:
        out = out[:max_tokens]
    if len(out) < 2:
        raise MlxFlashError(f"{path}: has fewer than 2 tokens of text; pass a larger text file")
    return np.asarray(out, dtype=np.int64)


def _encode(tokenizer, text: str) -> list[int]:
    try:  # verbose=False: no warning that a piece is longer than the model's context
        return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    except TypeError:
        return list(tokenizer.encode(text))


def windows(num_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping [start, stop) windows of at most seq_len tokens (the last may be shorter;
    one of a single token is dropped: it predicts nothing)."""
    out = [(lo, min(num_tokens, lo + seq_len)) for lo in range(0, num_tokens, seq_len)]
    return [w for w in out if w[1] - w[0] >= 2]


def flash_layers(model: nn.Module) -> list[FlashFFN]:
    mlps = [layer.mlp for layer in model.layers]
    if not all(isinstance(m, FlashFFN) for m in mlps):
        raise TypeError("the model was not loaded by mlx_flash (its layers' mlp are not FlashFFN)")
    return mlps


class StopForward(Exception):
    """Raised by the last layer's FFN recorder when no logits are wanted: the rest of the
    forward (the last FFN, the final norm, the vocabulary projection) is skipped."""


def numpy_f32(a: mx.array) -> np.ndarray:
    """An MLX array as a float32 numpy array (a zero-copy view when it is float32 already)."""
    a = a if a.dtype == mx.float32 else a.astype(mx.float32)
    mx.eval(a)
    return np.asarray(a)


class NumpyLinear(nn.Module):
    """An nn.Linear whose product runs in numpy (the OpenBLAS that numpy's wheel bundles; MLX's
    Linux CPU wheel has a reference BLAS 30-40x slower for these products). Same weights."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        object.__setattr__(self, "_inner", inner)

    def __call__(self, x: mx.array) -> mx.array:
        w = numpy_f32(self._inner.weight)
        y = numpy_f32(x) @ w.T
        if "bias" in self._inner:
            y += numpy_f32(self._inner.bias)
        return mx.array(y).astype(x.dtype)


class NumpyEmbedding(nn.Module):
    """An nn.Embedding whose `as_linear` (a tied vocabulary projection) runs in numpy."""

    def __init__(self, inner: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "_inner", inner)

    def __call__(self, ids: mx.array) -> mx.array:
        return self._inner(ids)

    def as_linear(self, x: mx.array) -> mx.array:
        return mx.array(numpy_f32(x) @ numpy_f32(self._inner.weight).T).astype(x.dtype)


def _numpy_module(m: nn.Module) -> nn.Module:
    if type(m) is nn.Linear:
        return NumpyLinear(m)
    if type(m) is nn.Embedding:
        return NumpyEmbedding(m)
    return m


def numpy_activation(act: Callable) -> Callable[[np.ndarray], np.ndarray]:
    """The FFN's activation function on numpy arrays (ReLU in numpy, the others through MLX,
    elementwise: no BLAS), marked like `act` for `applies_to_up` (dReLU)."""
    if act in (nn.relu,) or getattr(act, "__name__", "") in ("relu", "drelu"):

        def f(h: np.ndarray) -> np.ndarray:
            return np.maximum(h, 0)
    else:

        def f(h: np.ndarray) -> np.ndarray:
            return numpy_f32(act(mx.array(h)))

    f.applies_to_up = applies_to_up(act)
    return f


class LayerFFN:
    """What calibration and evaluation need of one flash layer, in numpy: its rows streamed from
    flash, its biases, its activation, and the FFN and neuron activations computed by the one
    FFN formula (`ffn.ffn_block`) on numpy arrays."""

    def __init__(self, ffn: FlashFFN):
        self._ffn = ffn
        self.layer = ffn.layer
        self.num_neurons = ffn.num_neurons
        self.act = numpy_activation(ffn.act)
        self.up_bias = None if ffn.up_bias is None else numpy_f32(ffn.up_bias)
        self.down_bias = None if ffn.down_bias is None else numpy_f32(ffn.down_bias)

    def blocks(self) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(lo, hi, float32 rows by part) of the layer's neurons, streamed from flash (each
        block's rows are valid until the next is asked for)."""
        for b in self._ffn.blocks(floats=True):
            yield int(b.ids[0]), int(b.ids[-1]) + 1, b.host

    def output(self, x: np.ndarray, mask: Callable[[int, int], np.ndarray] | None = None) -> np.ndarray:
        """The layer's FFN of x [N, d] (numpy float32); `mask(lo, hi)` ([N, hi - lo] or [hi - lo],
        0/1) zeroes the neurons it marks 0 in the block [lo, hi)."""
        y = np.zeros(x.shape, np.float32)
        for lo, hi, rows in self.blocks():
            bias = None if self.up_bias is None else self.up_bias[lo:hi]
            y += ffn_block(x, rows, self.act, bias, None if mask is None else mask(lo, hi))
        if self.down_bias is not None:
            y += self.down_bias
        return y

    def activations(self, x: np.ndarray, rows: dict[str, np.ndarray], lo: int, hi: int) -> np.ndarray:
        """The neuron activations of the block [lo, hi) for x [N, d] (`ffn.neuron_activations`):
        act(gate x) (dReLU: times act(up x)), or act(up x + b1) for a two-matrix FFN."""
        bias = None if self.up_bias is None else self.up_bias[lo:hi]
        return neuron_activations(x, {k: v for k, v in rows.items() if k != "down"}, self.act, bias)


class _NumpyFFN(nn.Module):
    """In place of a layer's FlashFFN during a calibration forward: hands its input to
    `on_input(layer, x)` and computes the FFN in numpy (`LayerFFN.output`, optionally masked by
    `mask_for(layer, x)`), or stops the forward (`StopForward`) when `stop`."""

    def __init__(self, ffn: LayerFFN, on_input, mask_for=None, stop: bool = False):
        super().__init__()
        object.__setattr__(self, "_ffn", ffn)
        object.__setattr__(self, "_on_input", on_input)
        object.__setattr__(self, "_mask_for", mask_for)
        self.stop = stop

    def __call__(self, x: mx.array) -> mx.array:
        xn = numpy_f32(x).reshape(-1, x.shape[-1])
        if self._on_input is not None:
            self._on_input(self._ffn.layer, xn)
        if self.stop:
            raise StopForward
        mask = self._mask_for(self._ffn.layer, xn) if self._mask_for is not None else None
        return mx.array(self._ffn.output(xn, mask).reshape(x.shape)).astype(x.dtype)


@contextmanager
def numpy_forward(model: nn.Module, on_input=None, mask_for=None, logits: bool = True):
    """Within the block, `model`'s forward runs its matrix products in numpy: every nn.Linear
    and nn.Embedding (its tied projection) is computed by numpy, and each layer's FFN by
    `_NumpyFFN` (its input given to `on_input(layer, x)`; without `logits`, the forward stops
    after the last layer's FFN input). The model's modules are put back after."""
    leaves = model.leaf_modules()
    model.update_modules(tree_map(_numpy_module, leaves, is_leaf=lambda m: isinstance(m, nn.Module)))
    layers = model.layers
    inner = [layer.mlp for layer in layers]
    ffns = [LayerFFN(f) for f in flash_layers(model)]
    for i, (layer, f) in enumerate(zip(layers, ffns)):
        layer.mlp = _NumpyFFN(f, on_input, mask_for, stop=not logits and i == len(layers) - 1)
    try:
        yield ffns
    finally:
        for layer, ffn in zip(layers, inner):
            layer.mlp = ffn
        model.update_modules(leaves)


def run_windows(
    model: nn.Module,
    tokens: np.ndarray,
    spans: list[tuple[int, int]],
    on_batch: Callable[[list[tuple[int, int]], mx.array | None, list[np.ndarray]], None],
    batch_tokens: int = 2048,
    progress=None,
    logits: bool = True,
    mask_for=None,
    skip: int = 0,
) -> None:
    """Teacher-forced forward passes over the windows `spans` of `tokens`, several windows of
    equal length per pass (about `batch_tokens` tokens), with numpy's BLAS (`numpy_forward`);
    for each pass calls on_batch(spans, logits [B, T, vocab] or None without `logits`,
    ffn_inputs per layer [B*T, d] numpy float32). `mask_for(layer, x)`: see `LayerFFN.output`.
    The first `skip` passes are not run (a resumed calibration)."""
    passes_ = passes(spans, batch_tokens)
    for k, batch in enumerate(passes_):
        if k < skip:
            continue
        inputs = mx.array(np.stack([tokens[lo:hi] for lo, hi in batch]))
        sink: list[np.ndarray] = []
        out = None
        with numpy_forward(model, partial(_keep, sink), mask_for, logits=logits):
            try:
                out = model(inputs)
                mx.eval(out)
            except StopForward:
                pass
        on_batch(batch, out, sink)
        if progress is not None:
            progress.update(sum(hi - lo for lo, hi in batch))


def _keep(sink: list, _layer: int, x: np.ndarray) -> None:
    sink.append(x)


def passes(spans: list[tuple[int, int]], batch_tokens: int) -> list[list[tuple[int, int]]]:
    """The forward passes `run_windows` makes: windows of equal length grouped by about
    `batch_tokens` tokens."""
    by_len: dict[int, list[tuple[int, int]]] = {}
    for s in spans:
        by_len.setdefault(s[1] - s[0], []).append(s)
    out = []
    for length, group in by_len.items():
        per = max(1, batch_tokens // length)
        out += [group[i : i + per] for i in range(0, len(group), per)]
    return out


class LayerInputs:
    """Every layer's FFN inputs of a calibration run, one ``[rows, d]`` float16 .npy memmap per
    layer on disk (so memory stays bounded whatever the number of tokens; float16 halves the
    disk: 100k tokens of a 2048-wide, 24-layer model take 9.8 GB), rows in the order of the
    forward passes. `add` takes run_windows' ffn inputs. With `resume`, memmaps of the right
    shape already on disk are reopened and writing goes on at row `rows_done`."""

    def __init__(self, paths: list[Path], rows: int, hidden: int, resume: bool = False, rows_done: int = 0):
        dtype = np.float16
        self.arrays = []
        for p in paths:
            a = None
            if resume and Path(p).is_file():
                a = np.load(p, mmap_mode="r+")
                if a.shape != (rows, hidden) or a.dtype != dtype:
                    a = None
            if a is None:
                rows_done = 0 if resume else rows_done
                a = np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=(rows, hidden))
            self.arrays.append(a)
        self.rows = rows_done

    def add(self, layer_x: list[np.ndarray]) -> None:
        k = layer_x[0].shape[0]
        for buf, x in zip(self.arrays, layer_x):
            buf[self.rows : self.rows + k] = x
        self.rows += k

    def flush(self) -> None:
        for buf in self.arrays:
            buf.flush()


# -- activations and the active sets -----------------------------------------------------------


@dataclass(frozen=True)
class ActiveRule:
    """What counts as an active neuron: ``relu`` (activation > 0) or ``threshold`` (|activation|
    > thresholds[layer])."""

    kind: str
    thresholds: dict[int, float] = field(default_factory=dict)  # by layer

    def active(self, layer: int, act: np.ndarray) -> np.ndarray:
        if self.kind == "relu":
            return act > 0
        return np.abs(act) > self.thresholds[layer]


def rule_kind_for(activation: str) -> str:
    """``relu`` for ReLU and dReLU FFNs (exactly sparse), ``threshold`` for every other activation."""
    from ..families import ACTIVATIONS

    return "relu" if ACTIVATIONS.get(activation, activation) in ("relu", "drelu") else "threshold"


def _layer_ffn(ffn: FlashFFN | LayerFFN) -> LayerFFN:
    return ffn if isinstance(ffn, LayerFFN) else LayerFFN(ffn)


def activation_blocks(
    ffn: FlashFFN | LayerFFN, x: np.ndarray, token_chunk: int = 4096
) -> Iterator[tuple[int, int, np.ndarray]]:
    """The layer's neuron activations for inputs x [N, d], a block of neurons at a time:
    yields (lo, hi, act [N, hi - lo] float32), the block's rows streamed from flash, the
    products in numpy."""
    f = _layer_ffn(ffn)
    for lo, hi, rows in f.blocks():
        out = np.empty((len(x), hi - lo), np.float32)
        for t in range(0, len(x), token_chunk):
            out[t : t + token_chunk] = f.activations(
                np.asarray(x[t : t + token_chunk], np.float32), rows, lo, hi
            )
        yield lo, hi, out


def active_sets(ffn: FlashFFN | LayerFFN, x: np.ndarray, rule: ActiveRule) -> np.ndarray:
    """bool [N, n]: the neurons active for each input under `rule`."""
    f = _layer_ffn(ffn)
    y = np.zeros((len(x), f.num_neurons), dtype=bool)
    for lo, hi, a in activation_blocks(f, x):
        y[:, lo:hi] = rule.active(f.layer, a)
    return y


def activation_quantiles(
    ffn: FlashFFN | LayerFFN, x: np.ndarray, sparsities: list[float], max_tokens: int = 2048, seed: int = 0
) -> list[float]:
    """Per target sparsity s, the |activation| under which a fraction s of the layer's
    activations fall (on at most `max_tokens` of the inputs, drawn at random)."""
    if len(x) > max_tokens:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), max_tokens, replace=False))
        x = x[idx]
    mags = np.concatenate([np.abs(a).reshape(-1) for _, _, a in activation_blocks(ffn, x)])
    return [float(np.quantile(mags, s)) for s in sparsities]


def log_softmax_nll(logits: mx.array, targets: mx.array) -> mx.array:
    """Negative log-likelihood of `targets` under `logits` [..., vocab] (float32)."""
    logits = logits.astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean negative log-likelihood)."""
    if count <= 0:
        raise ValueError("perplexity of no tokens")
    return math.exp(nll_sum / count)
