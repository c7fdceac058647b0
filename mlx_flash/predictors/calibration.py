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
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxFlashError
from ..ffn import FlashFFN, neuron_activations

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


class _Recorder(nn.Module):
    """Passes x through to the wrapped FFN and keeps it."""

    def __init__(self, inner: nn.Module, sink: list):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_sink", sink)

    def __call__(self, x: mx.array) -> mx.array:
        self._sink.append(x)
        return self.inner(x)


@contextmanager
def recording(model: nn.Module) -> Iterator[list[list[mx.array]]]:
    """Within the block, each layer's FFN inputs are appended to sinks[layer]."""
    layers = model.layers
    sinks: list[list[mx.array]] = [[] for _ in layers]
    inner = [layer.mlp for layer in layers]
    for layer, ffn, sink in zip(layers, inner, sinks):
        layer.mlp = _Recorder(ffn, sink)
    try:
        yield sinks
    finally:
        for layer, ffn in zip(layers, inner):
            layer.mlp = ffn


def run_windows(
    model: nn.Module,
    tokens: np.ndarray,
    spans: list[tuple[int, int]],
    on_batch: Callable[[list[tuple[int, int]], mx.array, list[mx.array]], None],
    batch_tokens: int = 2048,
    progress=None,
) -> None:
    """Teacher-forced forward passes over the windows `spans` of `tokens`, several windows of
    equal length per pass (about `batch_tokens` tokens); for each pass calls
    on_batch(spans, logits [B, T, vocab], ffn_inputs per layer [B*T, d]) (evaluated)."""
    by_len: dict[int, list[tuple[int, int]]] = {}
    for s in spans:
        by_len.setdefault(s[1] - s[0], []).append(s)
    for length, group in by_len.items():
        per = max(1, batch_tokens // length)
        for i in range(0, len(group), per):
            batch = group[i : i + per]
            inputs = mx.array(np.stack([tokens[lo:hi] for lo, hi in batch]))
            with recording(model) as sinks:
                logits = model(inputs)
                xs = [mx.concatenate([x.reshape(-1, x.shape[-1]) for x in sink]) for sink in sinks]
                mx.eval(logits, xs)
            on_batch(batch, logits, xs)
            if progress is not None:
                progress.update(sum(hi - lo for lo, hi in batch))


class LayerInputs:
    """Every layer's FFN inputs of a calibration run, one ``[rows, d]`` .npy memmap per layer,
    rows in the order of the forward passes (float32 for a float32 model, else float16: the
    way training and evaluation both keep them). `add` takes run_windows' ffn inputs."""

    def __init__(self, paths: list[Path], rows: int, hidden: int, model_dtype: str):
        dtype = np.float32 if model_dtype == "float32" else np.float16
        self.arrays = [
            np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=(rows, hidden)) for p in paths
        ]
        self.rows = 0

    def add(self, layer_x: list[mx.array]) -> None:
        k = layer_x[0].shape[0]
        for buf, x in zip(self.arrays, layer_x):
            buf[self.rows : self.rows + k] = np.array(x.astype(mx.float32))
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


def activation_blocks(
    ffn: FlashFFN, x: np.ndarray, token_chunk: int = 4096
) -> Iterator[tuple[int, int, np.ndarray]]:
    """The layer's neuron activations (`ffn.neuron_activations`) for inputs x [N, d], a block
    of neurons at a time: yields (lo, hi, act [N, hi - lo] float32), the block's rows streamed
    from flash."""
    for b in ffn.blocks(floats=True):
        lo, hi = int(b.ids[0]), int(b.ids[-1]) + 1
        parts = {k: v for k, v in b.rows.items() if k != "down"}
        bias = ffn.up_bias[lo:hi].astype(mx.float32) if ffn.up_bias is not None else None
        out = np.empty((len(x), hi - lo), np.float32)
        for t in range(0, len(x), token_chunk):
            xb = mx.array(np.asarray(x[t : t + token_chunk], np.float32))
            a = neuron_activations(xb, parts, ffn.act, bias)
            mx.eval(a)
            out[t : t + token_chunk] = np.array(a)
        yield lo, hi, out


def active_sets(ffn: FlashFFN, x: np.ndarray, rule: ActiveRule) -> np.ndarray:
    """bool [N, n]: the neurons active for each input under `rule`."""
    y = np.zeros((len(x), ffn.num_neurons), dtype=bool)
    for lo, hi, a in activation_blocks(ffn, x):
        y[:, lo:hi] = rule.active(ffn.layer, a)
    return y


def activation_quantiles(
    ffn: FlashFFN, x: np.ndarray, sparsities: list[float], max_tokens: int = 2048, seed: int = 0
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
