"""FlashFFN: the module that replaces a model's MLP, its weights read from flash.

Per layer and per forward pass (one token when decoding, many when prefilling):
- `naive`: every neuron of the layer is streamed from flash in large sequential blocks and the
  FFN is computed densely (the paper's naive baseline);
- `hybrid`: the first neurons that fit the budget stay in memory, the rest are streamed;
- `flash`: the active neurons are selected (exactly, from the resident gate / up projection,
  or by a predictor), the neuron cache says which of them are missing, the reader fetches
  their bundles, the cache inserts them and evicts what left the window, and the FFN is
  computed on the cache's first `used` rows. A prefill streams the layer like `naive` and
  seeds the window with the last prompt tokens' active sets.

Computing on more neurons than are active is never wrong: a cached neuron that does not fire
for this token adds exactly zero under ReLU, and its true value otherwise.
The one exception is deliberate: with predictor selection on a model that is not ReLU-sparse
(SwiGLU, GELU: the predictors learned thresholded active sets), the cached neurons that were not
predicted for this token are zeroed (`NeuronCache.active_mask`), so that a token's output
depends only on its own predicted set, not on what earlier tokens left in the window: the model
is then the same sparse model at every token, the one `python -m mlx_flash.predictors eval`
measures against sparsity.

Quantized folders: every path reads the stored fields (`FlashReader.submit(raw=True)`), the
cache and the resident rows hold them as they are, and `ffn_block` computes with
``mx.quantized_matmul`` (float32 activations on a CPU, where it is fast), the exact selector
included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .budget import BudgetError
from .cache import CacheCapacityError

if TYPE_CHECKING:  # pragma: no cover
    from .layout import Quantization
    from .runtime import FlashRuntime


def drelu(x: mx.array) -> mx.array:
    """dReLU's activation: relu, applied to the up projection too (see `applies_to_up`)."""
    return nn.relu(x)


drelu.applies_to_up = True

ACTIVATION_FUNCTIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_approx": nn.gelu_approx,
    "drelu": drelu,
}


def applies_to_up(act: Callable) -> bool:
    """Whether a gated FFN applies `act` to its up projection as well (dReLU)."""
    return getattr(act, "applies_to_up", False)


def ffn_block(
    x: mx.array,
    parts: dict[str, mx.array],
    act: Callable,
    up_bias: mx.array | None = None,
    mask: mx.array | None = None,
    quant: Quantization | None = None,
) -> mx.array:
    """The FFN over a block of neurons whose rows are in `parts` (each [k, d]; "down" holds the
    down projection's columns as rows). Gated: down(act(gate x) * up x) (dReLU: act(up x));
    two-matrix:
    down(act(up x + b1)). No output bias: the caller adds it once. `mask` ([k], 0 or 1) zeroes
    the neurons it marks 0. With `quant`, `parts` holds each part's quantized fields
    ("gate.weight", "gate.scales", "gate.biases", ...), rows quantized along d."""
    if quant is not None and parts["up.weight"].shape[0] == 0:  # quantized_matmul cannot take 0 rows
        return mx.zeros(x.shape, dtype=x.dtype)
    if "gate" in parts or "gate.weight" in parts:
        up = project(x, parts, "up", quant)
        h = act(project(x, parts, "gate", quant)) * (act(up) if applies_to_up(act) else up)
    else:
        h = project(x, parts, "up", quant)
        if up_bias is not None:
            h = h + up_bias
        h = act(h)
    if mask is not None:
        h = h * mask
    return project(h, parts, "down", quant, transpose=False)


def project(
    x: mx.array,
    parts: dict[str, mx.array],
    name: str,
    quant: Quantization | None = None,
    transpose: bool = True,
) -> mx.array:
    """x @ part.T (transpose) or x @ part, the part's rows float or quantized (`quant`)."""
    if quant is None:
        w = parts[name]
        return x @ (w.T if transpose else w)
    return mx.quantized_matmul(
        x,
        parts[f"{name}.weight"],
        parts[f"{name}.scales"],
        parts[f"{name}.biases"],
        transpose=transpose,
        group_size=quant.group_size,
        bits=quant.bits,
    )


@dataclass
class LayerState:
    """What one FlashFFN keeps in memory besides the shared runtime."""

    layer: int
    num_neurons: int
    resident: dict[str, mx.array] = field(default_factory=dict)  # hybrid: rows [:resident]
    num_resident: int = 0
    # flash + exact: gate (or up) rows of all neurons; quantized: {"weight", "scales", "biases"}
    selector: mx.array | dict[str, mx.array] | None = None
    up_bias: mx.array | None = None  # two-matrix: per-neuron bias, all neurons
    down_bias: mx.array | None = None
    cache: object | None = None  # NeuronCache in flash mode


class FlashFFN(nn.Module):
    """Drop-in replacement for a model layer's `mlp`; holds no parameters of its own."""

    def __init__(self, state: LayerState, runtime: FlashRuntime):
        super().__init__()
        self._state = state
        self._rt = runtime

    def __call__(self, x: mx.array) -> mx.array:
        """The layer's FFN of x. It holds the runtime's lock and evaluates its output before
        returning, so that calls from several threads (mlx_lm.generate on one model at once)
        take turns per layer and never see a neuron cache another call is changing. On any
        error (a failed read, Ctrl-C) the layer's neuron cache is emptied, never left half
        updated: the next call reads what it needs again."""
        rt, st = self._rt, self._state
        with rt.lock:
            try:
                rt.begin_layer(st.layer, tokens=x.size // x.shape[-1])
                if rt.mode == "flash" and x.shape[-2] == 1 and x.size // x.shape[-1] == 1:
                    y = self._decode_flash(x)
                else:
                    y = self._stream(x, start=st.num_resident)
                    if st.num_resident:
                        y = y + ffn_block(
                            x,
                            st.resident,
                            rt.act,
                            _first(st.up_bias, st.num_resident),
                            quant=rt.manifest.quantization,
                        )
                if st.down_bias is not None:
                    y = y + st.down_bias
                y = y.astype(x.dtype)
                mx.eval(y)
            except BaseException as exc:
                if st.cache is not None:
                    st.cache.clear()
                if isinstance(exc, CacheCapacityError):
                    raise BudgetError(f"layer {st.layer}: {exc}") from None
                raise
        return y

    # -- streaming: naive, hybrid, prefill ---------------------------------------------------
    def _stream(self, x: mx.array, start: int) -> mx.array:
        """Stream neurons [start, n) of the layer from flash in blocks and compute densely. In
        flash mode, also seed the window with the last prompt tokens' active sets: the cache
        reserves their rows first and each is written as its block goes by."""
        rt, st = self._rt, self._state
        xc = x.astype(rt.compute_dtype)
        seed = rt.mode == "flash" and st.cache is not None
        wanted = np.zeros(0, np.int64)
        if seed:
            mx.eval(xc)
            sets = [s for s in self._seed_sets(xc) if len(s) <= st.cache.capacity]  # larger: never cached
            t0 = time.perf_counter()
            wanted = st.cache.seed(sets)
            rt.add_time("memory", time.perf_counter() - t0)
            if len(wanted) and wanted[0] < start:
                raise RuntimeError(
                    f"layer {st.layer}: neurons below {start} are not streamed and cannot seed the cache"
                )

        def blocks():
            for ids, rows, arrays in rt.stream_blocks(
                st.layer, np.arange(start, st.num_neurons, dtype=np.int64)
            ):
                if len(wanted):
                    t0 = time.perf_counter()
                    lo, hi = ids[0], ids[-1] + 1  # a block is a range of neurons
                    pick = wanted[(wanted >= lo) & (wanted < hi)]
                    if len(pick):
                        st.cache.insert(pick, {k: v[pick - lo] for k, v in rows.items()})
                    rt.add_time("memory", time.perf_counter() - t0)
                yield ids, arrays

        return self._computed_blocks(xc, blocks())

    def _computed_blocks(self, xc: mx.array, blocks) -> mx.array:
        """The FFN of xc summed over (ids, MLX rows) blocks of neurons as they arrive from flash
        (`FlashRuntime.stream_blocks`: each block is evaluated before the next is asked for)."""
        rt, st = self._rt, self._state
        y = mx.zeros(xc.shape, dtype=rt.compute_dtype)
        for ids, arrays in blocks:
            t0 = time.perf_counter()
            bias = mx.take(st.up_bias, mx.array(ids)) if st.up_bias is not None else None
            y = y + ffn_block(xc, arrays, rt.act, bias, quant=rt.manifest.quantization)
            mx.eval(y)
            rt.add_time("streamed", time.perf_counter() - t0)
        return y

    def _seed_sets(self, xc: mx.array) -> list[np.ndarray]:
        """Active sets of the last `window` prompt positions, oldest first."""
        rt = self._rt
        flat = xc.reshape(-1, xc.shape[-1])
        last = flat[-rt.window :]
        return [self._select(last[i : i + 1]) for i in range(last.shape[0])]

    # -- flash decode -----------------------------------------------------------------------
    def _decode_flash(self, x: mx.array) -> mx.array:
        rt, st = self._rt, self._state
        xc = x.astype(rt.compute_dtype).reshape(1, -1)
        mx.eval(xc)  # the attention above this FFN (counted as compute)
        t1 = time.perf_counter()
        ids = self._select(xc)
        t2 = time.perf_counter()
        rt.add_time("selection", t2 - t1)
        if len(ids) > st.cache.capacity:
            return self._decode_overflow(xc, ids).reshape(x.shape)
        missing = st.cache.begin_token(ids)
        t3 = time.perf_counter()
        rows = rt.read_missing(st.layer, missing) if len(missing) else {}
        t4 = time.perf_counter()
        if len(missing):
            st.cache.insert(missing, rows)
        views = st.cache.views()
        bias = mx.take(st.up_bias, st.cache.resident_rows()) if st.up_bias is not None else None
        t5 = time.perf_counter()
        rt.add_time("memory", (t3 - t2) + (t5 - t4))
        rt.add_time("io", t4 - t3)
        rt.count_token_layer(st.layer, active=len(ids), loaded=len(missing), used=st.cache.used)
        mask = st.cache.active_mask() if rt.mask_inactive else None
        y = ffn_block(xc, views, rt.act, bias, mask, quant=rt.manifest.quantization)
        return y.reshape(x.shape)

    def _decode_overflow(self, xc: mx.array, ids: np.ndarray) -> mx.array:
        """A token whose active set is larger than the cache: its neurons are read in blocks
        of the streaming buffer's size and computed block by block, the cache left as it is.
        Slower (nothing is reused), never wrong, and within the memory plan."""
        rt, st = self._rt, self._state
        y = self._computed_blocks(xc, ((b, arrays) for b, _, arrays in rt.stream_blocks(st.layer, ids)))
        rt.count_token_layer(st.layer, active=len(ids), loaded=len(ids), used=0, overflow=True)
        return y

    def _select(self, xc: mx.array) -> np.ndarray:
        """Ids of the neurons this token needs: exact (the resident selector) or predicted."""
        rt, st = self._rt, self._state
        if rt.selection == "predictor":
            return rt.predict(st.layer, xc)
        q = rt.manifest.quantization
        if q is not None:
            pre = project(xc, {f"sel.{k}": v for k, v in st.selector.items()}, "sel", q)
        else:
            pre = xc @ st.selector.T
        if st.up_bias is not None:
            pre = pre + st.up_bias
        a = rt.act(pre)
        mx.eval(a)
        return np.flatnonzero(np.array(a).reshape(-1)).astype(np.int64)


def _first(a: mx.array | None, n: int) -> mx.array | None:
    return None if a is None else a[:n]
