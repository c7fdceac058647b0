"""Evaluating predictors on held-out text.

- Per layer (teacher-forced, on the dense model's FFN inputs): recall of the truly active
  neurons, precision, and the fraction of neurons predicted against the fraction truly active,
  all pooled over tokens (`training.set_counts`).
- For the model: perplexity of the dense model (the `naive` path: every FFN neuron, the same
  arithmetic as mlx-lm's dense model) against the flash model with predictor selection, run
  token by token through the decode path (the neuron cache, its window, reads from flash), in
  windows of `seq_len` tokens whose KV cache starts empty; and greedy-token agreement, the
  fraction of positions where both models' most likely next token is the same.
- For models whose active sets are thresholded (not ReLU): the perplexity of the thresholded
  model itself (every neuron with |activation| above the threshold for a sparsity s, computed
  exactly) for each s of a grid, so that a user can choose the sparsity to train for.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .. import layout
from ..ffn import FlashFFN
from . import calibration as cal
from .store import Predictors, read_predictors_header
from .training import default_seq_len, set_counts


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions where two token sequences agree."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("agreement of sequences of different or zero length")
    return float(np.mean(a == b))


def mask_counts(predicted: np.ndarray, active: np.ndarray) -> np.ndarray:
    """[hit, predicted, active, total] of two bool [tokens, neurons] masks."""
    return np.array([(predicted & active).sum(), predicted.sum(), active.sum(), active.size], np.int64)


def layer_metrics(predicted: np.ndarray, active: np.ndarray) -> dict:
    """Recall, precision, predicted and active fractions and their ratio, pooled over tokens."""
    hit, pred, act, total = (int(v) for v in mask_counts(predicted, active))
    return set_counts(hit=hit, predicted=pred, active=act, total=total)


class _Scorer:
    """Accumulates per-position NLL and argmax of teacher-forced logits."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens
        self.nll: dict[int, float] = {}
        self.argmax: dict[int, int] = {}

    def add(self, positions: np.ndarray, logits: mx.array) -> None:
        """logits[k] predicts tokens[positions[k] + 1]."""
        targets = mx.array(self.tokens[positions + 1])
        nll = cal.log_softmax_nll(logits, targets)
        am = mx.argmax(logits, axis=-1)
        mx.eval(nll, am)
        for p, v, a in zip(positions.tolist(), np.array(nll).tolist(), np.array(am).tolist()):
            self.nll[p] = v
            self.argmax[p] = a

    def result(self) -> tuple[float, int]:
        return float(sum(self.nll.values())), len(self.nll)


def _positions(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi - 1)


class ThresholdFFN(nn.Module):
    """A layer's FFN streamed from flash with every neuron whose |activation| is at most
    `threshold` zeroed (the thresholded model of CATS / TEAL, computed exactly)."""

    def __init__(self, inner: FlashFFN, threshold: float):
        super().__init__()
        object.__setattr__(self, "_inner", inner)
        self.threshold = threshold

    def __call__(self, x: mx.array) -> mx.array:
        return self._inner.streamed(x, min_activation=self.threshold)


def evaluate(
    folder: str | Path,
    data: str | Path,
    *,
    tokens: int | None = 16384,
    seq_len: int | None = None,
    window: int | None = None,
    batch_tokens: int = 2048,
    sweep: bool = True,
    progress: bool = True,
    log=None,
) -> dict:
    """Measure a flash folder's predictors on the text of `data`; returns a JSON-able dict."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_tokenizer

    from ..model import FlashOptions, load_flash_model, read_config

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    header, info = read_predictors_header(folder, manifest)
    predictor_bytes = sum(t.nbytes for t in header.values())
    config = read_config(folder)
    seq_len = seq_len or info.get("calibration", {}).get("seq_len") or default_seq_len(config)
    tokenizer = load_tokenizer(folder)
    token_ids = cal.read_tokens(tokenizer, data, tokens)
    spans = cal.windows(len(token_ids), seq_len)
    predictors = Predictors.load(folder, manifest)
    kind = info.get("rule", "relu")
    layer_info = info.get("layers", [])
    rule = cal.ActiveRule(
        kind, {i: float(r.get("activation_threshold", 0.0)) for i, r in enumerate(layer_info)}
    )

    # 1. dense: teacher-forced logits, and every layer's FFN inputs
    model, rt = load_flash_model(folder, FlashOptions(mode="naive", context=seq_len))
    dense = _Scorer(token_ids)
    n_rows = sum(hi - lo for lo, hi in spans)
    with tempfile.TemporaryDirectory(prefix="mlx_flash_eval_") as tmp:
        inputs = cal.LayerInputs(
            [Path(tmp) / f"x{i}.npy" for i in range(manifest.num_layers)],
            n_rows,
            manifest.hidden_size,
            manifest.dtype,
        )
        xs = inputs.arrays

        def keep(batch, logits, layer_x):
            inputs.add(layer_x)
            for b, (lo, hi) in enumerate(batch):
                dense.add(_positions(lo, hi), logits[b, : hi - lo - 1])

        try:
            with tqdm(total=n_rows, desc="dense forward", unit="tok", disable=not progress) as bar:
                cal.run_windows(model, token_ids, spans, keep, batch_tokens=batch_tokens, progress=bar)

            # 2. per layer: predicted against truly active
            layers = []
            ffns = cal.flash_layers(model)
            for i in tqdm(
                range(manifest.num_layers), desc="per-layer metrics", unit="layer", disable=not progress
            ):
                x = xs[i]
                counts = np.zeros(4, np.int64)
                for lo in range(0, n_rows, 4096):
                    xb = np.asarray(x[lo : lo + 4096], dtype=np.float32)
                    counts += mask_counts(predictors.predict_mask(i, xb), cal.active_sets(ffns[i], xb, rule))
                c = set_counts(
                    hit=int(counts[0]), predicted=int(counts[1]), active=int(counts[2]), total=int(counts[3])
                )
                layers.append(
                    {"layer": i, "rank": predictors.ranks()[i], **{k: round(v, 6) for k, v in c.items()}}
                )

            # 3. the thresholded model's perplexity against sparsity
            curve = []
            if kind == "threshold" and sweep and layer_info and "activation_quantiles" in layer_info[0]:
                grid = sorted(layer_info[0]["activation_quantiles"], key=float)
                for s in tqdm(grid, desc="sparsity sweep", unit="point", disable=not progress):
                    sc = _Scorer(token_ids)
                    saved = [layer.mlp for layer in model.layers]
                    for layer, ffn, rec in zip(model.layers, saved, layer_info):
                        layer.mlp = ThresholdFFN(ffn, float(rec["activation_quantiles"][s]))
                    try:
                        cal.run_windows(
                            model,
                            token_ids,
                            spans,
                            lambda batch, logits, _x: [
                                sc.add(_positions(lo, hi), logits[b, : hi - lo - 1])  # noqa: B023 (called within this iteration)
                                for b, (lo, hi) in enumerate(batch)
                            ],
                            batch_tokens=batch_tokens,
                        )
                    finally:
                        for layer, ffn in zip(model.layers, saved):
                            layer.mlp = ffn
                    nll, cnt = sc.result()
                    curve.append({"sparsity": float(s), "perplexity": cal.perplexity(nll, cnt)})
        finally:
            rt.close()
            del xs

    # 4. flash with predictors, token by token through the decode path
    fmodel, frt = load_flash_model(
        folder, FlashOptions(mode="flash", selection="predictor", window=window, context=seq_len)
    )
    flash = _Scorer(token_ids)
    try:
        with tqdm(
            total=n_rows - len(spans), desc="flash decode (predictors)", unit="tok", disable=not progress
        ) as bar:
            for lo, hi in spans:
                cache = make_prompt_cache(fmodel)
                for j in range(lo, hi - 1):
                    logits = fmodel(mx.array(token_ids[j : j + 1])[None], cache=cache)
                    flash.add(np.array([j]), logits[0, -1:])
                    bar.update(1)
        stats = frt.stats()
    finally:
        frt.close()

    d_nll, count = dense.result()
    f_nll, _ = flash.result()
    pos = sorted(dense.nll)
    ppl_dense, ppl_flash = cal.perplexity(d_nll, count), cal.perplexity(f_nll, count)
    result = {
        "model": str(folder),
        "data": str(data),
        "tokens": int(len(token_ids)),
        "predicted_positions": count,
        "seq_len": seq_len,
        "window": frt.window,
        "rule": kind,
        "sparsity": info.get("sparsity"),
        "layers": layers,
        "perplexity_dense": ppl_dense,
        "perplexity_predictor": ppl_flash,
        "perplexity_change": ppl_flash / ppl_dense - 1,
        "greedy_agreement": agreement([dense.argmax[p] for p in pos], [flash.argmax[p] for p in pos]),
        "predictor_elems": predictors.num_elems,
        "predictor_bytes": predictor_bytes,
        "model_bytes": info.get("model_bytes"),
        "predictor_fraction_of_model": predictor_bytes / info["model_bytes"]
        if info.get("model_bytes")
        else None,
        "decode": {
            "ms_per_token": stats.ms_per_token,
            "neurons_loaded_per_token": stats.neurons_loaded_per_token,
            "bytes_per_token": stats.bytes_per_token,
            "window_hit_rate": stats.window_hit_rate,
        },
    }
    if curve:
        result["sparsity_curve"] = curve
    return result


def format_result(r: dict) -> str:
    active = (
        "activation > 0"
        if r["rule"] == "relu"
        else f"|activation| above the sparsity-{r['sparsity']} threshold"
    )
    lines = [
        f"{r['model']}: {r['tokens']} tokens of {r['data']} (windows of {r['seq_len']}, active = {active})",
        f"{'layer':>5} {'rank':>5} {'recall':>8} {'precision':>9} {'predicted':>9} {'active':>8} {'pred/true':>9}",
    ]
    for l in r["layers"]:
        lines.append(
            f"{l['layer']:>5} {l['rank']:>5} {100 * l['recall']:>7.2f}% {100 * l['precision']:>8.2f}% "
            f"{100 * l['predicted_fraction']:>8.2f}% {100 * l['active_fraction']:>7.2f}% {l['ratio']:>9.2f}"
        )
    lines.append(
        f"perplexity: dense {r['perplexity_dense']:.3f}, flash with predictors {r['perplexity_predictor']:.3f} "
        f"({100 * r['perplexity_change']:+.2f}%), window {r['window']}"
    )
    lines.append(
        f"greedy-token agreement: {100 * r['greedy_agreement']:.2f}% of {r['predicted_positions']} positions"
    )
    if r.get("predictor_fraction_of_model") is not None:
        lines.append(
            f"predictors: {r['predictor_bytes']} bytes ({r['predictor_elems']} weights), "
            f"{100 * r['predictor_fraction_of_model']:.2f}% of the model's {r['model_bytes']} bytes"
        )
    dec = r["decode"]
    lines.append(
        f"decode: {dec['ms_per_token']:.1f} ms/token, {dec['neurons_loaded_per_token']:.0f} neurons "
        f"({dec['bytes_per_token'] / 1e3:.1f} KB) read per token"
    )
    if r.get("sparsity_curve"):
        lines.append("thresholded model (exact active sets): sparsity -> perplexity")
        lines += [f"  {100 * c['sparsity']:5.1f}% -> {c['perplexity']:.3f}" for c in r["sparsity_curve"]]
    return "\n".join(lines)
