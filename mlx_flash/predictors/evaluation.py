"""Evaluating predictors on held-out text.

- Per layer (teacher-forced, on the dense model's FFN inputs): recall of the truly active
  neurons, precision, and the fraction of neurons predicted against the fraction truly active,
  all pooled over tokens (`training.set_counts`).
- For the model: perplexity of the dense model (the `naive` path: every FFN neuron, the same
  arithmetic as mlx-lm's dense model) against the flash model with predictor selection, over
  every held-out token in windows of `seq_len` tokens, and greedy-token agreement (the fraction
  of positions where both models' most likely next token is the same). The flash model's
  perplexity is computed teacher-forced in batched forward passes that compute, in every layer
  and for every token, exactly the neurons the flash decode path computes: the union of the
  predicted sets of the token and the `window - 1` tokens before it (the neuron cache; ReLU
  models), or the token's own predicted set (other activations, whose cached neurons not
  predicted for the token are masked). Then, on the first `decode_tokens` tokens, the flash
  model itself token by token through the decode path (neuron cache, reads from flash) checks
  it: on the first window (the cache starts empty in both) the two give the same perplexity.
- For models whose active sets are thresholded (not ReLU): the perplexity of the thresholded
  model itself (every neuron with |activation| above the threshold for a sparsity s, computed
  exactly) for each s of a grid, so that a user can choose the sparsity to train for.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .. import layout
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


def window_union(predicted: np.ndarray, seq: int, window: int) -> np.ndarray:
    """bool [B*T, n]: for each token of B windows of T = `seq` tokens (rows in order), the union
    of the predicted sets of it and of the `window - 1` tokens before it in its window: the
    neurons the neuron cache holds when that token is computed (unbounded capacity)."""
    m = predicted.reshape(-1, seq, predicted.shape[-1])
    out = m.copy()
    for k in range(1, min(window, seq)):
        out[:, k:] |= m[:, :-k]
    return out.reshape(predicted.shape)


def _predicted_mask(predictors: Predictors, window: int = 1, batch: dict | None = None):
    """mask_for(layer, x) of `calibration.run_windows`: each token's predicted set, or with
    `window` > 1 its union with the sets of the tokens before it (`window_union`; batch["seq"]:
    the tokens per window of the pass)."""

    def mask_for(layer: int, x: np.ndarray):
        m = predictors.predict_mask(layer, x)
        if window > 1:
            m = window_union(m, batch["seq"], window)
        m = m.astype(np.float32)
        return lambda lo, hi: m[:, lo:hi]

    return mask_for


def _threshold_mask(ffns: list[cal.LayerFFN], thresholds: list[float]):
    """mask_for(layer, x): the neurons whose |activation| exceeds the layer's threshold (the
    thresholded model of CATS / TEAL, computed exactly)."""

    def mask_for(layer: int, x: np.ndarray):
        f, t = ffns[layer], thresholds[layer]
        masks = {lo: np.abs(f.activations(x, rows, lo, hi)) > t for lo, hi, rows in f.blocks()}
        return lambda lo, hi: masks[lo].astype(np.float32)

    return mask_for


def _score(
    model, token_ids, spans, batch_tokens, progress, desc, mask_for=None, keep_inputs=None, batch=None
) -> _Scorer:
    """Teacher-forced scores of the windows (numpy BLAS), optionally masked per layer; one pass
    at a time, `batch["seq"]` set to its windows' length."""
    sc = _Scorer(token_ids)
    batch = {} if batch is None else batch

    def on_batch(windows, logits, layer_x):
        if keep_inputs is not None:
            keep_inputs.add(layer_x)
        for b, (lo, hi) in enumerate(windows):
            sc.add(_positions(lo, hi), logits[b, : hi - lo - 1])

    n_rows = sum(hi - lo for lo, hi in spans)
    with tqdm(total=n_rows, desc=desc, unit="tok", disable=not progress) as bar:
        for windows in cal.passes(spans, batch_tokens):
            batch["seq"] = windows[0][1] - windows[0][0]
            cal.run_windows(
                model, token_ids, windows, on_batch, batch_tokens=n_rows, progress=bar, mask_for=mask_for
            )
    return sc


def evaluate(
    folder: str | Path,
    data: str | Path,
    *,
    tokens: int | None = 16384,
    seq_len: int | None = None,
    window: int | None = None,
    decode_tokens: int = 256,
    batch_tokens: int = 4096,
    sweep: bool = True,
    progress: bool = True,
    log=None,
) -> dict:
    """Measure a flash folder's predictors on the text of `data`; returns a JSON-able dict.

    Teacher-forced over every token (numpy BLAS): the dense model's perplexity and FFN inputs,
    per layer the predicted against the truly active sets, the perplexity of the flash model
    (every layer computes what the decode path computes with a neuron window of `window`
    tokens: see the module docstring) and of the model in which every layer computes only each
    token's predicted neurons (window 1: the pessimistic case). Then, on the first
    `decode_tokens` tokens (0: none), the flash model with predictor selection token by token
    through the decode path (neuron cache, window, reads from flash), against the dense model
    on the same tokens."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_tokenizer

    from ..families import ACTIVATIONS
    from ..model import DEFAULT_WINDOW, FlashOptions, load_flash_model, read_config

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
    n_rows = sum(hi - lo for lo, hi in spans)
    window = DEFAULT_WINDOW if window is None else window
    # the flash path masks cached neurons not predicted for the token unless the model is ReLU
    cache_window = window if ACTIVATIONS[manifest.activation] in ("relu", "drelu") else 1

    model, rt = load_flash_model(folder, FlashOptions(mode="naive", context=seq_len))
    try:
        ffns = [cal.LayerFFN(f) for f in cal.flash_layers(model)]
        with tempfile.TemporaryDirectory(prefix="mlx_flash_eval_") as tmp:
            # 1. dense: teacher-forced logits, and every layer's FFN inputs
            inputs = cal.LayerInputs(
                [Path(tmp) / f"x{i}.npy" for i in range(manifest.num_layers)],
                n_rows,
                manifest.hidden_size,
            )
            dense = _score(
                model, token_ids, spans, batch_tokens, progress, "dense forward", keep_inputs=inputs
            )
            inputs.flush()

            # 2. per layer: predicted against truly active
            layers = []
            for i in tqdm(
                range(manifest.num_layers), desc="per-layer metrics", unit="layer", disable=not progress
            ):
                x = inputs.arrays[i]
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
            del x, inputs

        # 3. the flash model, teacher-forced: every layer computes what the decode path does
        #    (the window's union of predicted sets), and the predicted sets alone (window 1)
        batch: dict = {}
        flash_tf = _score(
            model,
            token_ids,
            spans,
            batch_tokens,
            progress,
            f"flash model (window {cache_window})",
            _predicted_mask(predictors, cache_window, batch),
            batch=batch,
        )
        masked = (
            flash_tf
            if cache_window == 1
            else _score(
                model,
                token_ids,
                spans,
                batch_tokens,
                progress,
                "predicted sets only",
                _predicted_mask(predictors),
            )
        )

        # 4. the thresholded model's perplexity against sparsity
        curve = []
        if kind == "threshold" and sweep and layer_info and "activation_quantiles" in layer_info[0]:
            grid = sorted(layer_info[0]["activation_quantiles"], key=float)
            for s in tqdm(grid, desc="sparsity sweep", unit="point", disable=not progress):
                ts = [float(rec["activation_quantiles"][s]) for rec in layer_info]
                sc = _score(model, token_ids, spans, batch_tokens, False, "", _threshold_mask(ffns, ts))
                nll, cnt = sc.result()
                curve.append({"sparsity": float(s), "perplexity": cal.perplexity(nll, cnt)})
    finally:
        rt.close()

    # 5. flash with predictors, token by token through the decode path
    flash = _Scorer(token_ids)
    dec_spans, left = [], max(0, decode_tokens)
    for lo, hi in spans:
        if left < 2:
            break
        dec_spans.append((lo, min(hi, lo + left)))
        left -= dec_spans[-1][1] - lo
    stats = None
    if dec_spans:
        fmodel, frt = load_flash_model(
            folder, FlashOptions(mode="flash", selection="predictor", window=window, context=seq_len)
        )
        try:
            with tqdm(
                total=sum(hi - lo - 1 for lo, hi in dec_spans),
                desc="flash decode (predictors)",
                unit="tok",
                disable=not progress,
            ) as bar:
                for lo, hi in dec_spans:
                    cache = make_prompt_cache(fmodel)
                    for j in range(lo, hi - 1):
                        logits = fmodel(mx.array(token_ids[j : j + 1])[None], cache=cache)
                        flash.add(np.array([j]), logits[0, -1:])
                        bar.update(1)
            stats = frt.stats()
        finally:
            frt.close()

    d_nll, count = dense.result()
    m_nll, _ = masked.result()
    f_nll, _ = flash_tf.result()
    ppl_dense, ppl_masked = cal.perplexity(d_nll, count), cal.perplexity(m_nll, count)
    ppl_flash = cal.perplexity(f_nll, count)
    pos = sorted(dense.nll)
    dec_pos = sorted(flash.nll)
    result = {
        "model": str(folder),
        "data": str(data),
        "tokens": int(len(token_ids)),
        "predicted_positions": count,
        "seq_len": seq_len,
        "window": window,
        "rule": kind,
        "sparsity": info.get("sparsity"),
        "layers": layers,
        "min_recall": min(l["recall"] for l in layers),
        "max_ratio": max(l["ratio"] for l in layers),
        "mean_ratio": sum(l["ratio"] for l in layers) / len(layers),
        "perplexity_dense": ppl_dense,
        "perplexity_flash": ppl_flash,
        "perplexity_change_flash": ppl_flash / ppl_dense - 1,
        "greedy_agreement_flash": agreement(
            [dense.argmax[p] for p in pos], [flash_tf.argmax[p] for p in pos]
        ),
        "flash_window": cache_window,
        "perplexity_predicted_sets": ppl_masked,
        "perplexity_change_predicted_sets": ppl_masked / ppl_dense - 1,
        "greedy_agreement_predicted_sets": agreement(
            [dense.argmax[p] for p in pos], [masked.argmax[p] for p in pos]
        ),
        "decode_positions": len(dec_pos),
        "predictor_elems": predictors.num_elems,
        "predictor_bytes": predictor_bytes,
        "model_bytes": info.get("model_bytes"),
        "predictor_fraction_of_model": predictor_bytes / info["model_bytes"]
        if info.get("model_bytes")
        else None,
    }
    if dec_pos:
        d_dec = cal.perplexity(sum(dense.nll[p] for p in dec_pos), len(dec_pos))
        f_dec = cal.perplexity(sum(flash.nll[p] for p in dec_pos), len(dec_pos))
        result.update(
            perplexity_dense_decoded=d_dec,
            perplexity_predictor=f_dec,
            perplexity_change=f_dec / d_dec - 1,
            greedy_agreement=agreement(
                [dense.argmax[p] for p in dec_pos], [flash.argmax[p] for p in dec_pos]
            ),
            decode={
                "ms_per_token": stats.ms_per_token,
                "neurons_loaded_per_token": stats.neurons_loaded_per_token,
                "bytes_per_token": stats.bytes_per_token,
                "window_hit_rate": stats.window_hit_rate,
            },
        )
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
        f"held-out recall: lowest layer {100 * r['min_recall']:.2f}%; predicted / truly active: "
        f"mean {r['mean_ratio']:.2f}, highest layer {r['max_ratio']:.2f}"
    )
    lines.append(
        f"perplexity over {r['predicted_positions']} positions (teacher-forced): dense {r['perplexity_dense']:.3f}, "
        f"flash with predictors (the neurons the decode path computes, window {r['flash_window']}) "
        f"{r['perplexity_flash']:.3f} ({100 * r['perplexity_change_flash']:+.2f}%, greedy-token agreement "
        f"{100 * r['greedy_agreement_flash']:.2f}%)"
    )
    if r["flash_window"] > 1:
        lines.append(
            f"  each token's predicted neurons only (window 1) {r['perplexity_predicted_sets']:.3f} "
            f"({100 * r['perplexity_change_predicted_sets']:+.2f}%, greedy-token agreement "
            f"{100 * r['greedy_agreement_predicted_sets']:.2f}%)"
        )
    if r.get("decode_positions"):
        lines.append(
            f"check, flash decode path (window {r['window']}) over the first {r['decode_positions']} positions: "
            f"dense {r['perplexity_dense_decoded']:.3f}, flash with predictors {r['perplexity_predictor']:.3f} "
            f"({100 * r['perplexity_change']:+.2f}%), greedy-token agreement {100 * r['greedy_agreement']:.2f}%"
        )
    if r.get("predictor_fraction_of_model") is not None:
        lines.append(
            f"predictors: {r['predictor_bytes']} bytes ({r['predictor_elems']} weights), "
            f"{100 * r['predictor_fraction_of_model']:.2f}% of the model's {r['model_bytes']} bytes"
        )
    dec = r.get("decode")
    if dec:
        lines.append(
            f"decode: {dec['ms_per_token']:.1f} ms/token, {dec['neurons_loaded_per_token']:.0f} neurons "
            f"({dec['bytes_per_token'] / 1e3:.1f} KB) read per token"
        )
    if r.get("sparsity_curve"):
        lines.append("thresholded model (exact active sets): sparsity -> perplexity")
        lines += [f"  {100 * c['sparsity']:5.1f}% -> {c['perplexity']:.3f}" for c in r["sparsity_curve"]]
    return "\n".join(lines)
