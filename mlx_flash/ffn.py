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

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .budget import BudgetError
from .cache import CacheCapacityError

if TYPE_CHECKING:  # pragma: no cover
    from .layout import Quantization
    from .runtime import FlashRuntime, NeuronBlock


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


def activate(act: Callable, gate_pre, up_pre):
    """The FFN's nonlinearity on pre-activations, as (a, h): `a` decides whether a neuron is
    active, `h` is what the down projection takes. Gated (`gate_pre` given): a = act(gate x)
    (dReLU: times act(up x)), h = a * (up x) (dReLU: a); without `up_pre` (a selector that holds
    the gate rows only), h is None and a = act(gate x), a superset of dReLU's active set.
    Two-matrix (`gate_pre` None): a = h = act(up x + b1), the bias already in `up_pre`.
    Only `act`, `*` and `+`: numpy arrays work as MLX arrays do, given an `act` for them."""
    if gate_pre is None:
        a = act(up_pre)
        return a, a
    a = act(gate_pre)
    if up_pre is None:
        return a, None
    if applies_to_up(act):
        a = a * act(up_pre)
        return a, a
    return a, a * up_pre


def neuron_activations(
    x, parts: dict, act: Callable, up_bias=None, quant: Quantization | None = None, *, hidden: bool = False
):
    """The activation of every neuron whose rows are in `parts` (see `activate`) for inputs x
    [..., d]; with `hidden`, (a, h). `parts` may hold the selector's rows alone ("gate", or "up"
    in a two-matrix FFN). The float path uses only `@`, `.T`, `+`, `*` and `act` (numpy works)."""
    gated = "gate" in parts or "gate.weight" in parts
    has_up = "up" in parts or "up.weight" in parts
    gate_pre = project(x, parts, "gate", quant) if gated else None
    up_pre = None
    if has_up and (not gated or hidden or applies_to_up(act)):
        up_pre = project(x, parts, "up", quant)
        if not gated and up_bias is not None:
            up_pre = up_pre + up_bias
    a, h = activate(act, gate_pre, up_pre)
    return (a, h) if hidden else a


def ffn_block(
    x,
    parts: dict,
    act: Callable,
    up_bias=None,
    mask=None,
    quant: Quantization | None = None,
    min_activation: float | None = None,
):
    """The FFN over a block of neurons whose rows are in `parts` (each [k, d]; "down" holds the
    down projection's columns as rows): down(h) with h from `activate` (gated: act(gate x) *
    up x; dReLU: act(gate x) act(up x); two-matrix: act(up x + b1)). No output bias: the caller
    adds it once. `mask` ([k], 0 or 1) zeroes the neurons it marks 0; `min_activation` zeroes
    those whose |activation| is at most it (the thresholded model of CATS / TEAL). With
    `quant`, `parts` holds each part's quantized fields ("gate.weight", "gate.scales",
    "gate.biases", ...), rows quantized along d. The one FFN formula: inference, the dense
    reference, calibration and evaluation all compute through it."""
    if quant is not None and parts["up.weight"].shape[0] == 0:  # quantized_matmul cannot take 0 rows
        return mx.zeros(x.shape, dtype=x.dtype)
    a, h = neuron_activations(x, parts, act, up_bias, quant, hidden=True)
    if min_activation is not None:
        h = h * (abs(a) > min_activation)
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
    # the neurons [first, stop) this process owns (all of them alone; a part under mlx.launch,
    # see distributed.py): it selects, reads, caches and computes only these
    first: int = 0
    stop: int = -1  # -1: num_neurons
    resident: dict[str, mx.array] = field(default_factory=dict)  # hybrid: rows [:resident]
    num_resident: int = 0
    # flash + exact: gate (or up) rows of all neurons; quantized: {"weight", "scales", "biases"}
    selector: mx.array | dict[str, mx.array] | None = None
    up_bias: mx.array | None = None  # two-matrix: per-neuron bias, all neurons
    down_bias: mx.array | None = None
    cache: object | None = None  # NeuronCache in flash mode

    def __post_init__(self):
        if self.stop < 0:
            self.stop = self.num_neurons


class FlashFFN(nn.Module):
    """Drop-in replacement for a model layer's `mlp`; holds no parameters of its own.

    Public surface for code that computes on a layer without running it (calibration,
    evaluation, the benchmarks): `layer`, `num_neurons`, `act`, `quantization`, `up_bias`,
    `down_bias`, `cache`, `blocks()` (the layer's rows streamed from flash) and `streamed(x)`
    (its FFN computed from them)."""

    def __init__(self, state: LayerState, runtime: FlashRuntime):
        super().__init__()
        self._state = state
        self._rt = runtime
        self._deferred: tuple[np.ndarray, dict[str, np.ndarray]] | None = None  # rows to insert (`_finish`)
        # look-ahead's guess input (see `tap_residuals`): the norm that feeds this FFN (its plain
        # call), the residual stream at its input in this call and at the last token's
        self._norm: Callable | None = None
        self._residual: mx.array | None = None
        self._last_residual: mx.array | None = None
        self._seen: np.ndarray | None = None  # per neuron, the last decoded token that selected it
        self._tokens = 0  # decoded tokens

    # -- the public surface ---------------------------------------------------------------------
    @property
    def layer(self) -> int:
        return self._state.layer

    @property
    def num_neurons(self) -> int:
        return self._state.num_neurons

    @property
    def act(self) -> Callable:
        return self._rt.act

    @property
    def quantization(self) -> Quantization | None:
        return self._rt.manifest.quantization

    @property
    def up_bias(self) -> mx.array | None:
        """Two-matrix FFNs: the per-neuron bias b1 of every neuron (compute dtype), else None."""
        return self._state.up_bias

    @property
    def down_bias(self) -> mx.array | None:
        return self._state.down_bias

    @property
    def cache(self):
        """The layer's NeuronCache in flash mode, else None."""
        return self._state.cache

    def resident_arrays(self) -> list[mx.array]:
        """The MLX arrays this layer keeps in memory besides its cache (to evaluate at load)."""
        st = self._state
        arrays = list(st.resident.values())
        if isinstance(st.selector, dict):
            arrays += list(st.selector.values())
        elif st.selector is not None:
            arrays.append(st.selector)
        return arrays + [a for a in (st.up_bias, st.down_bias) if a is not None]

    def blocks(self, start: int | None = None, *, floats: bool = False) -> Iterator[NeuronBlock]:
        """Neurons [start, stop) of the layer (default: all this process owns, [first, stop);
        everything in one process) streamed from flash in blocks (`FlashRuntime.stream_blocks`:
        large sequential reads, the next block read while the caller works on this one; a block's
        arrays are valid until the next is asked for, and whatever was computed from them must be
        evaluated by then). floats: float32 rows even in a quantized folder (else its fields)."""
        st = self._state
        ids = np.arange(st.first if start is None else start, st.stop, dtype=np.int64)
        return self._rt.stream_blocks(self._state.layer, ids, floats=floats)

    def streamed(self, x: mx.array, min_activation: float | None = None) -> mx.array:
        """The layer's FFN of x computed over all its neurons streamed from flash, output bias
        included (the naive path); `min_activation`: see `ffn_block`."""
        xc = x.astype(self._rt.compute_dtype)
        y = self._computed_blocks(xc, self.blocks(), min_activation)
        if self._state.down_bias is not None:
            y = y + self._state.down_bias
        return y.astype(x.dtype)

    # -- the layer ------------------------------------------------------------------------------
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
                    y = self._stream(x, start=st.first + st.num_resident)
                    if st.num_resident:
                        y = y + ffn_block(
                            x,
                            st.resident,
                            rt.act,
                            _range(st.up_bias, st.first, st.first + st.num_resident),
                            quant=self.quantization,
                        )
                y = rt.all_sum(y)  # the other ranks' neurons (one process: y itself)
                if st.down_bias is not None:
                    y = y + st.down_bias
                y = y.astype(x.dtype)
                mx.eval(y, *self._keep_residuals())
                self._finish()
            except BaseException as exc:
                self._deferred = None
                self._residual = self._last_residual = None
                rt.drop_staged()
                if st.cache is not None:
                    st.cache.clear()
                if isinstance(exc, CacheCapacityError):
                    raise BudgetError(f"layer {st.layer}: {exc}") from None
                raise
        return y

    # -- streaming: naive, hybrid, prefill ---------------------------------------------------
    def _stream(self, x: mx.array, start: int) -> mx.array:
        """Stream neurons [start, stop) of the layer from flash in blocks and compute densely. In
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

        def seeding(blocks: Iterator[NeuronBlock]) -> Iterator[NeuronBlock]:
            for b in blocks:
                t0 = time.perf_counter()
                lo, hi = b.ids[0], b.ids[-1] + 1  # a block is a range of neurons
                pick = wanted[(wanted >= lo) & (wanted < hi)]
                if len(pick):
                    st.cache.insert(pick, {k: v[pick - lo] for k, v in b.host.items()})
                rt.add_time("memory", time.perf_counter() - t0)
                yield b

        blocks = self.blocks(start)
        return self._computed_blocks(xc, seeding(blocks) if len(wanted) else blocks)

    def _computed_blocks(
        self, xc: mx.array, blocks: Iterator[NeuronBlock], min_activation: float | None = None
    ) -> mx.array:
        """The FFN of xc summed over blocks of neurons as they arrive from flash (each block
        is evaluated before the next is asked for)."""
        rt = self._rt
        y = mx.zeros(xc.shape, dtype=rt.compute_dtype)
        for b in blocks:
            t0 = time.perf_counter()
            y = y + self._rows_ffn(xc, b.ids, b.rows, min_activation)
            mx.eval(y)
            rt.add_time("streamed", time.perf_counter() - t0)
        return y

    def _seed_sets(self, xc: mx.array) -> list[np.ndarray]:
        """Active sets of the last `window` prompt positions, oldest first."""
        rt = self._rt
        flat = xc.reshape(-1, xc.shape[-1])
        last = flat[-rt.window :]
        return [self._select(last[i : i + 1])[0] for i in range(last.shape[0])]

    # -- flash decode -----------------------------------------------------------------------
    def _decode_flash(self, x: mx.array) -> mx.array:
        """One decoded token: select, read what the cache misses, compute on the cached rows.
        With look-ahead, the next layer's neurons are scored on a guess of its input
        (`_guess_input`) in the same evaluation as this layer's selection; the rows read ahead
        for this layer are collected, the rest is read, and the next layer's guess is read
        behind it (`stage`) while this layer waits and computes. When the cached rows are many
        (`FlashRuntime.overlap_min_elems`) they are computed on while the rest is read, and the
        missing rows' share of the FFN is added from the read buffer when they arrive (they
        enter the cache once the layer's output is evaluated: `_finish`). A token that selects
        more neurons than the cache holds caches what fits (`_split_overflow`) and reads the
        rest for itself, in the same request when it fits the missing buffer."""
        rt, st = self._rt, self._state
        xc = x.astype(rt.compute_dtype).reshape(1, -1)
        nxt = rt.layers[st.layer + 1] if rt.lookahead and st.layer + 1 < len(rt.layers) else None
        guess = nxt.scores(self._guess_input(nxt, xc)) if nxt is not None else None
        ids, guess = self._select(xc, guess)
        staged = rt.take_staged(st.layer) if rt.lookahead else None  # waits (I/O) if in flight
        t0 = time.perf_counter()
        ids, rest = self._split_overflow(ids)
        missing = st.cache.begin_token(ids)
        needed, selected = len(missing) + len(rest), len(ids) + len(rest)
        hits = 0
        rest_staged = None  # (ids, numpy rows) of the rest, read ahead
        if staged is not None:  # the rows read ahead while the layer before computed
            sids, srows, _ = staged
            hit, pos = _found(sids, missing)
            hits = int(hit.sum())
            if hits:
                st.cache.insert(missing[hit], {k: v[pos[hit]] for k, v in srows.items()})
            missing = missing[~hit]
            hit, pos = _found(sids, rest)
            if hit.any():  # copied: the look-ahead buffer is read into again before y is evaluated
                rest_staged = (rest[hit], {k: v[pos[hit]] for k, v in srows.items()})
                hits += int(hit.sum())
                rest = rest[~hit]
        if rt.lookahead:
            rt.count_lookahead(
                st.layer, needed=needed, hits=hits, fetched=None if staged is None else len(staged[0])
            )

        def stage() -> None:  # after this layer's own read, so that it goes first
            if nxt is not None:
                t = time.perf_counter()
                rt.stage(nxt.layer, nxt.guessed(guess))
                rt.add_time("selection", time.perf_counter() - t)  # the next layer's selection

        rt.count_token_layer(
            st.layer, active=selected, loaded=needed, used=st.cache.used, overflow=selected > len(ids)
        )
        mask = st.cache.active_mask(partial=True) if rt.mask_inactive else None
        bias = mx.take(st.up_bias, st.cache.resident_rows(partial=True)) if st.up_bias is not None else None
        extra = []  # the FFN's share of the neurons read for this token only
        if rest_staged is not None:
            extra.append(
                self._rows_ffn(xc, rest_staged[0], {k: mx.array(v) for k, v in rest_staged[1].items()})
            )
        overlap = (
            rt.lookahead
            and not len(rest)
            and 0 < len(missing) <= rt.stream_block
            and st.cache.used * xc.shape[-1] >= rt.overlap_min_elems
        )
        if overlap:  # compute on the rows at hand while the rest is read
            host, arrays = rt.missing_buffer()
            future = rt.submit(st.layer, missing, host)
            ready = st.cache.ready_mask()
            rt.add_time("memory", time.perf_counter() - t0)
            stage()
            y = ffn_block(
                xc,
                st.cache.views(partial=True),
                rt.act,
                bias,
                ready if mask is None else ready * mask,
                quant=self.quantization,
            )
            mx.async_eval(y)
            rows = future.result()
            n = len(missing)
            y = y + self._rows_ffn(xc, missing, {k: v[:n] for k, v in arrays.items()})
            self._deferred = (missing, {k: v[:n] for k, v in rows.items()})
        else:
            rt.add_time("memory", time.perf_counter() - t0)
            joint = len(rest) and len(missing) + len(rest) <= rt.stream_block
            want = np.union1d(missing, rest) if joint else missing  # disjoint, sorted
            streamed = len(rest) and not joint
            pending = rt.read_missing(st.layer, want) if len(want) else None
            if not streamed:
                stage()  # while this layer's own read runs
            if pending is not None:
                rows = pending.result()
                t1 = time.perf_counter()
                if joint:  # the rest computed from the missing buffer, the cache's rows copied out
                    arrays = rt.missing_buffer()[1]
                    n = len(want)
                    at = mx.array(np.searchsorted(want, rest))
                    extra.append(
                        self._rows_ffn(xc, rest, {k: mx.take(v[:n], at, axis=0) for k, v in arrays.items()})
                    )
                    pos = np.searchsorted(want, missing)
                    rows = {k: v[pos] for k, v in rows.items()}
                st.cache.insert(missing, rows)
                rt.add_time("memory", time.perf_counter() - t1)
            if streamed:  # many: in blocks after the cache's read (streaming drops what is staged)
                extra.append(self._computed_blocks(xc, rt.stream_blocks(st.layer, rest)))
                stage()
            y = ffn_block(xc, st.cache.views(), rt.act, bias, mask, quant=self.quantization)
        for e in extra:
            y = y + e
        return y.reshape(x.shape)

    def _rows_ffn(
        self, xc: mx.array, ids: np.ndarray, rows: dict[str, mx.array], min_activation: float | None = None
    ) -> mx.array:
        """The FFN of xc over neurons `ids` whose rows are `rows` (outside the cache)."""
        bias = mx.take(self._state.up_bias, mx.array(ids)) if self._state.up_bias is not None else None
        return ffn_block(xc, rows, self._rt.act, bias, quant=self.quantization, min_activation=min_activation)

    def _split_overflow(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the token's neurons to cache, the rest): all of `ids` when they fit the cache; else
        every one already cached and, up to the capacity, the uncached ones this layer selected
        most recently before (a neuron that fired lately fires again: the window's bet), the
        rest read and computed for this token only (sorted, disjoint)."""
        st = self._state
        if self._seen is None:
            self._seen = np.full(st.num_neurons, -1, np.int64)
        self._tokens += 1
        keep, rest, cap = ids, np.zeros(0, np.int64), st.cache.capacity
        if len(ids) > cap:
            cached = st.cache.slots(ids) >= 0
            new = ids[~cached]
            admit = np.zeros(len(new), bool)
            admit[np.argsort(-self._seen[new], kind="stable")[: cap - int(cached.sum())]] = True
            rest = new[~admit]
            keep = np.sort(np.concatenate([ids[cached], new[admit]]))
        self._seen[ids] = self._tokens
        return keep, rest

    def _finish(self) -> None:
        """After the layer's output is evaluated: the rows read this token enter the cache."""
        if self._deferred is not None:
            t0 = time.perf_counter()
            ids, rows = self._deferred
            self._deferred = None
            self._state.cache.insert(ids, rows)
            self._rt.add_time("memory", time.perf_counter() - t0)

    def _keep_residuals(self) -> list[mx.array]:
        """The residual stream at the FFN's input at this call's last position, kept for the
        next token's guess; to evaluate with the output."""
        h, self._residual = self._residual, None
        if h is None:
            return []
        self._last_residual = h.reshape(-1, h.shape[-1])[-1:]
        return [self._last_residual]

    def _tap_residual(self, h: mx.array) -> None:
        self._residual = h

    def _guess_input(self, nxt: FlashFFN, xc: mx.array) -> mx.array:
        """The next layer's FFN input as guessed now, before this layer's FFN runs: the residual
        stream here (after this layer's attention) plus what this layer's FFN and the next
        layer's attention added to it at the last token, through the next layer's norm. Without
        the residuals (no tap, the first token): this layer's own input."""
        h, last, nxt_last = self._residual, self._last_residual, nxt._last_residual
        if h is None or last is None or nxt_last is None or nxt._norm is None:
            return xc
        est = h.reshape(1, -1) + (nxt_last - last)
        return nxt._norm(est).astype(self._rt.compute_dtype)

    def scores(self, x: mx.array) -> mx.array:
        """Lazy per-neuron scores of this layer for an input x ([1, d]): larger means more likely
        active, >= 0 for a neuron the selector picks (the predictor's logit minus its threshold,
        or the exact selector's activation input)."""
        rt, st = self._rt, self._state
        if rt.selection == "predictor":
            return rt.predictors.logits(st.layer, x.reshape(-1)) - rt.predictors.thresholds[st.layer]
        q = self.quantization
        sel = "gate" if "gate" in rt.manifest.part_names else "up"
        parts = {f"{sel}.{k}": v for k, v in st.selector.items()} if q is not None else {sel: st.selector}
        pre = project(x, parts, sel, q)  # the owned neurons' rows
        if sel == "up" and st.up_bias is not None:
            pre = pre + _range(st.up_bias, st.first, st.stop)
        return pre.reshape(-1)

    def guessed(self, scores: np.ndarray) -> np.ndarray:
        """The neurons to read ahead for this layer from its `scores` on its guessed input: the
        best-scored ones not cached, as many as the runtime allows for the number of uncached
        neurons the guess selects (`FlashRuntime.lookahead_size`), sorted."""
        st = self._state
        if len(scores) == st.num_neurons:  # a predictor scores every neuron: the owned ones
            scores = scores[st.first : st.stop]
        owned = np.arange(st.first, st.first + len(scores), dtype=np.int64)
        cand = np.flatnonzero(st.cache.slots(owned) < 0)
        k = self._rt.lookahead_size(st.layer, int(np.count_nonzero(scores[cand] >= 0)))
        if k <= 0 or not len(cand):
            return np.zeros(0, np.int64)
        if k < len(cand):
            cand = cand[np.argpartition(-scores[cand], k - 1)[:k]]
        return np.sort(cand).astype(np.int64) + st.first

    def _select(self, xc: mx.array, guess: mx.array | None = None):
        """(ids of the owned neurons this token needs, exact (the resident selector, whose rows
        are the owned neurons') or predicted; the next layer's `guess` scores as numpy, or None),
        evaluated together: one synchronisation with the host for both. selection_ms counts the
        host's work after it; the evaluation also finishes the layer's attention, so it counts
        as compute."""
        rt, st = self._rt, self._state
        if rt.selection == "predictor":
            z = rt.predictors.logits(st.layer, xc.reshape(-1))
            pick, t = z, rt.predictors.thresholds[st.layer]
        else:
            q = self.quantization
            sel = "gate" if "gate" in rt.manifest.part_names else "up"
            parts = {f"{sel}.{k}": v for k, v in st.selector.items()} if q is not None else {sel: st.selector}
            pick, t = neuron_activations(xc, parts, rt.act, _range(st.up_bias, st.first, st.stop), q), None
        mx.eval(pick, *([] if guess is None else [guess]))
        t1 = time.perf_counter()  # the evaluation above finished the attention too: counted as compute
        a = np.array(pick).reshape(-1)
        if t is not None:  # predicted: every neuron scored, the owned ones kept
            ids = np.flatnonzero(a >= t).astype(np.int64)
            if st.stop - st.first < st.num_neurons:
                ids = ids[(ids >= st.first) & (ids < st.stop)]
        else:
            ids = np.flatnonzero(a).astype(np.int64) + st.first
        g = np.array(guess) if guess is not None else None
        rt.add_time("selection", time.perf_counter() - t1)
        return ids, g


# The norm whose input is the residual stream an FFN reads, by attribute name in a decoder layer
# (mlx-lm's Llama-like models, OPT, Gemma).
FFN_NORMS = ("post_attention_layernorm", "final_layer_norm", "pre_feedforward_layernorm")
_TAPPED: dict[type, type] = {}


def tap_residuals(layers: list[nn.Module]) -> int:
    """For look-ahead: the norm that feeds each layer's FlashFFN hands it its input, the
    residual stream, as it normalises it (the norm's class becomes a subclass whose call also
    does that: parameters, names and outputs unchanged), and each FlashFFN gets the plain call
    of its norm (to normalise a guessed residual). Returns the layers tapped; a layer whose norm
    is not found (a parallel-attention block such as Phi's) is guessed from the layer before's
    input. The first layer is not guessed: its input changes with every token (its guess from
    the embeddings recalled 40% at 60% waste on the tiny preset, and cost more than it hid)."""
    n = 0
    for layer in layers:
        ffn = layer.get("mlp") if isinstance(layer, dict) else None
        name = next((k for k in FFN_NORMS if isinstance(layer.get(k), nn.Module)), None)
        if not isinstance(ffn, FlashFFN) or name is None:
            continue
        ffn._norm = functools.partial(tap_input(layer[name], ffn._tap_residual), layer[name])
        n += 1
    return n


def tap_input(norm: nn.Module, record: Callable[[mx.array], None]) -> Callable:
    """Make `norm` call `record(x)` with its input before normalising it; returns its plain call."""
    base = type(norm)
    if base in _TAPPED.values():
        base = base.__mro__[1]
    else:
        if base not in _TAPPED:
            _TAPPED[base] = type(f"Tapped{base.__name__}", (base,), {"__call__": _tapped_call})
        norm.__class__ = _TAPPED[base]
    object.__setattr__(norm, "_flash_record", record)  # not a child module: the parameters stay the same
    return base.__call__


def _tapped_call(self, x, *args, **kwargs):
    self._flash_record(x)
    return type(self).__mro__[1].__call__(self, x, *args, **kwargs)


def _found(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bool mask of the `ids` that are in `sorted_ids`, their positions there)."""
    pos = np.searchsorted(sorted_ids, ids)
    hit = pos < len(sorted_ids)
    hit[hit] = sorted_ids[pos[hit]] == ids[hit]
    return hit, pos


def _range(a: mx.array | None, lo: int, hi: int) -> mx.array | None:
    return None if a is None else a[lo:hi]
