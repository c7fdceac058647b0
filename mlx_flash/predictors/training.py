"""Training the predictors: per layer, a low-rank classifier of which FFN neurons fire.

For each layer (in order, each saved as it finishes, so an interrupted run resumes at the
layer it was on):
1. the layer's true active sets on the calibration tokens (`calibration.active_sets`);
2. for ranks r on a ladder (8, 16, 32, ... up to what the size budget leaves for the layer),
   train P(x) = sigmoid(B(A x) + b) with Adam on a balanced binary cross-entropy (positives and
   negatives weigh half each, whatever the layer's sparsity), on 90% of the tokens;
3. on the other 10% (the validation split, the tokens after the training ones), choose the
   decision threshold as the highest one whose recall of truly active neurons reaches the
   target, and measure how many neurons it then predicts against how many are truly active;
4. keep the smallest rank whose predicted/true ratio is within `max_ratio` (so layers that
   are harder to predict get more rank), or the best ratio when none is.

The inputs are standardized per dimension while training, and the standardization is folded
into A and b before saving, so the stored predictor takes the raw FFN input.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from tqdm import tqdm

from .. import layout
from ..errors import MlxFlashError
from . import calibration as cal
from .store import LayerPredictor, install_predictors, sigmoid, storage_dtype

WORK_DIR_NAME = "predictors.work"
SPARSITY_GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # quantiles kept for eval's sparsity sweep
MIN_RANK = 8


@dataclass(frozen=True)
class TrainOptions:
    recall: float = 0.95  # target recall of truly active neurons, per layer, on validation tokens
    max_ratio: float = 3.0  # predicted / truly active the chosen rank must reach at that recall
    rank: int | None = None  # a fixed rank for every layer (else chosen per layer)
    max_size: float = 0.05  # all predictors at most this fraction of the model's bytes (as stored)
    sparsity: float = 0.5  # threshold rule only: fraction of activations counted as inactive
    epochs: int = 8
    batch: int = 256
    lr: float = 2e-3
    val_fraction: float = 0.1
    seed: int = 0

    def check(self) -> None:
        if not 0 < self.recall < 1:
            raise MlxFlashError(f"--recall must be between 0 and 1 (exclusive), got {self.recall}")
        if self.max_ratio < 1:
            raise MlxFlashError(f"--max-ratio must be at least 1, got {self.max_ratio}")
        if self.rank is not None and self.rank < 1:
            raise MlxFlashError(f"--rank must be a positive integer, got {self.rank}")
        if not 0 < self.max_size <= 1:
            raise MlxFlashError(f"--max-size must be a fraction in (0, 1], got {self.max_size}")
        if not 0 < self.sparsity < 1:
            raise MlxFlashError(f"--sparsity must be between 0 and 1 (exclusive), got {self.sparsity}")
        if self.epochs < 1 or self.batch < 1 or self.lr <= 0:
            raise MlxFlashError("--epochs, --batch and --lr must be positive")
        if not 0 < self.val_fraction < 0.5:
            raise MlxFlashError(f"validation fraction must be in (0, 0.5), got {self.val_fraction}")


# -- one predictor ---------------------------------------------------------------------------


class LowRank(nn.Module):
    """z = B(A x) + b."""

    def __init__(self, d: int, n: int, r: int):
        super().__init__()
        self.A = nn.Linear(d, r, bias=False)
        self.B = nn.Linear(r, n, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.B(self.A(x))


def balanced_bce(z: mx.array, y: mx.array, w_pos: float, w_neg: float) -> mx.array:
    """Binary cross-entropy on logits z against 0/1 labels y, positives weighted w_pos and
    negatives w_neg (balanced: w_pos = 1 / (2 p), w_neg = 1 / (2 (1 - p)) for a positive rate
    p, so each class carries half the loss). Written with one softplus, as
    (w_pos y + w_neg (1 - y)) softplus(z) - w_pos y z, since softplus(-z) = softplus(z) - z:
    transcendental functions dominate a step on a CPU."""
    softplus = mx.maximum(z, 0) + mx.log1p(mx.exp(-mx.abs(z)))
    return mx.mean((w_neg + (w_pos - w_neg) * y) * softplus - w_pos * y * z)


def class_weights(y: np.ndarray) -> tuple[float, float]:
    p = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    return 0.5 / p, 0.5 / (1 - p)


def fit(
    x: np.ndarray,
    y: np.ndarray,
    rank: int,
    opts: TrainOptions,
    progress: bool = False,
    desc: str = "",
    epochs: int | None = None,
) -> LayerPredictor:
    """Train one rank-`rank` predictor on inputs x [N, d] and labels y [N, n] (bool) for
    `epochs` (default opts.epochs; 0: the untrained initialization); returns it with threshold
    0 (P >= 0.5), the standardization folded in."""
    epochs = opts.epochs if epochs is None else epochs
    n_tok, d = x.shape
    n = y.shape[1]
    rank = min(rank, d, n)
    mu = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    sd = (x.std(axis=0, dtype=np.float64) + 1e-6).astype(np.float32)
    mx.random.seed(opts.seed)
    model = LowRank(d, n, rank)
    w_pos, w_neg = class_weights(y)
    model.B.bias = mx.zeros((n,))  # the balanced loss's prior: even odds
    steps_per_epoch = max(1, n_tok // opts.batch)
    total = max(1, steps_per_epoch * epochs)
    sched = optim.cosine_decay(opts.lr, total, opts.lr * 0.05)
    opt = optim.Adam(learning_rate=sched)
    mu_a, sd_a = mx.array(mu), mx.array(sd)

    def loss_fn(m, xb, yb):
        return balanced_bce(m((xb - mu_a) / sd_a), yb, w_pos, w_neg)

    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(xb, yb):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, xb, yb)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(opts.seed)
    bar = tqdm(total=total, desc=desc, leave=False, disable=not progress, unit="step")
    for _ in range(epochs):
        order = rng.permutation(n_tok)
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * opts.batch : (s + 1) * opts.batch])
            loss = step(mx.array(x[idx].astype(np.float32)), mx.array(y[idx].astype(np.float32)))
            mx.eval(state)
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    A = np.array(model.A.weight) / sd[None, :]
    B = np.array(model.B.weight)
    b = np.array(model.B.bias) - B @ (np.array(model.A.weight) @ (mu / sd))
    return LayerPredictor(A.astype(np.float32), B.astype(np.float32), b.astype(np.float32), 0.0)


def logits_chunks(p: LayerPredictor, x: np.ndarray, chunk: int = 4096):
    A, B, b = (mx.array(np.asarray(a, np.float32)) for a in (p.A, p.B, p.bias))
    for lo in range(0, len(x), chunk):
        z = (mx.array(np.asarray(x[lo : lo + chunk], np.float32)) @ A.T) @ B.T + b
        mx.eval(z)
        yield lo, np.array(z)


def choose_threshold(p: LayerPredictor, x: np.ndarray, y: np.ndarray, recall: float) -> tuple[float, dict]:
    """The highest logit threshold t whose recall (predicted z >= t among truly active,
    pooled over tokens) is at least `recall` on (x, y), and the counts it gives."""
    pos = np.concatenate([z[y[lo : lo + len(z)]] for lo, z in logits_chunks(p, x)])
    num_pos = len(pos)
    if num_pos == 0:
        t = float(np.finfo(np.float32).max)
    else:
        pos.sort()
        t = float(pos[int(math.floor((1 - recall) * num_pos + 1e-9))])
    predicted = hit = 0
    for lo, z in logits_chunks(p, x):
        m = z >= t
        predicted += int(m.sum())
        hit += int((m & y[lo : lo + len(z)]).sum())
    return t, set_counts(hit=hit, predicted=predicted, active=num_pos, total=y.size)


def set_counts(*, hit: int, predicted: int, active: int, total: int) -> dict:
    """Recall, precision and sizes of a predicted set against the true one, from counts pooled
    over tokens: hit = |predicted ∩ active|; total = tokens x neurons."""
    return {
        "recall": hit / active if active else 1.0,
        "precision": hit / predicted if predicted else 1.0,
        "predicted_fraction": predicted / total if total else 0.0,
        "active_fraction": active / total if total else 0.0,
        "ratio": predicted / active if active else (0.0 if predicted == 0 else math.inf),
    }


def rank_ladder(d: int, n: int, max_rank: int) -> list[int]:
    """8, 16, 32, ... up to max_rank (included), at most min(d, n)."""
    top = min(d, n, max_rank)
    ranks, r = [], MIN_RANK
    while r < top:
        ranks.append(r)
        r *= 2
    if top >= 1:
        ranks.append(top)
    return ranks


def predictor_elems(d: int, n: int, rank: int) -> int:
    return rank * (d + n) + n + 1


def train_layer(
    x: np.ndarray,
    y: np.ndarray,
    opts: TrainOptions,
    max_rank: int,
    *,
    store_dtype: np.dtype,
    progress: bool = False,
    layer: int = 0,
) -> tuple[LayerPredictor, dict]:
    """Train the layer's predictor: a rank from the ladder (or opts.rank) and its threshold."""
    n_val = max(1, int(round(len(x) * opts.val_fraction)))
    xt, yt, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
    d, n = x.shape[1], y.shape[1]
    ranks = [min(opts.rank, d, n)] if opts.rank else rank_ladder(d, n, max_rank)
    tried = []
    for r in ranks:
        p = fit(xt, yt, r, opts, progress=progress, desc=f"layer {layer} rank {r}").rounded(store_dtype)
        t, m = choose_threshold(p, xv, yv, opts.recall)
        p.threshold = t
        tried.append((r, p, m))
        if m["ratio"] <= opts.max_ratio:
            break
    met = [e for e in tried if e[2]["ratio"] <= opts.max_ratio]
    r, p, m = met[0] if met else min(tried, key=lambda e: e[2]["ratio"])
    record = {
        "layer": layer,
        "rank": r,
        "threshold": p.threshold,
        "threshold_probability": sigmoid(p.threshold),
        "elems": p.num_elems,
        "validation": {k: round(v, 6) for k, v in m.items()},
        "ranks_tried": {str(rr): round(mm["ratio"], 4) for rr, _, mm in tried},
        "met_max_ratio": m["ratio"] <= opts.max_ratio,
        "train_tokens": int(len(xt)),
        "validation_tokens": int(n_val),
    }
    return p, record


# -- the whole model -----------------------------------------------------------------------------


def model_bytes(folder: Path, manifest: layout.Manifest) -> int:
    """Bytes of every weight of the model as the flash folder stores them (dense part plus FFN
    neurons; quantized folders: their packed weights, scales and biases)."""
    from ..safetensors_file import PADDING_PREFIX, read_header

    header, _ = read_header(folder / manifest.dense_file)
    dense = sum(t.nbytes for name, t in header.items() if not name.startswith(PADDING_PREFIX))
    return dense + manifest.ffn_bytes()


def _file_sha(path: Path) -> str:
    return layout.file_digest(path)[:16]


def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train(
    folder: str | Path,
    data: str | Path,
    *,
    tokens: int = 65536,
    seq_len: int | None = None,
    opts: TrainOptions = TrainOptions(),
    batch_tokens: int = 2048,
    work: str | Path | None = None,
    fresh: bool = False,
    keep_work: bool = False,
    progress: bool = True,
    log=None,
) -> dict:
    """Train and save a flash folder's predictors; returns the info saved with them."""
    from ..model import FlashOptions, load_flash_model, read_config

    opts.check()
    if tokens < 16:
        raise MlxFlashError(f"--tokens must be at least 16, got {tokens}")
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    config = read_config(folder)
    seq_len = seq_len or default_seq_len(config)
    model, rt = load_flash_model(folder, FlashOptions(mode="naive", context=seq_len))
    try:
        from mlx_lm.utils import load_tokenizer

        tokenizer = load_tokenizer(folder)
        token_ids = cal.read_tokens(tokenizer, data, tokens)
        ffns = cal.flash_layers(model)
        kind = cal.rule_kind_for(manifest.activation)
        d = manifest.hidden_size
        n_tok = len(token_ids)
        work = Path(work) if work else folder / WORK_DIR_NAME
        model_fp = _fingerprint(
            {"dense": manifest.dense_checksum, "layers": [e.checksum for e in manifest.layers]}
        )
        collect_fp = _fingerprint(
            {"model": model_fp, "data": _file_sha(Path(data)), "tokens": n_tok, "seq_len": seq_len}
        )
        train_opts = asdict(opts)
        if kind == "relu":
            train_opts.pop("sparsity")
        train_fp = _fingerprint({"collect": collect_fp, "opts": train_opts})
        meta = _open_work(work, collect_fp, train_fp, fresh, log)
        xs_paths = [work / f"x_layer_{i:03d}.npy" for i in range(manifest.num_layers)]

        if not meta.get("collected"):
            spans = cal.windows(n_tok, seq_len)
            n_rows = sum(hi - lo for lo, hi in spans)
            inputs = cal.LayerInputs(xs_paths, n_rows, d, manifest.dtype)
            with tqdm(total=n_rows, desc="calibration forward", unit="tok", disable=not progress) as bar:
                cal.run_windows(
                    model,
                    token_ids,
                    spans,
                    lambda _b, _l, layer_x: inputs.add(layer_x),
                    batch_tokens=batch_tokens,
                    progress=bar,
                )
            inputs.flush()
            del inputs
            meta["collected"] = True
            meta["rows"] = n_rows
            _write_meta(work, meta)

        st_dtype = storage_dtype(manifest.dtype)
        m_bytes = model_bytes(folder, manifest)
        total_budget = int(opts.max_size * m_bytes / st_dtype.itemsize)  # in predictor elements
        predictors: list[LayerPredictor] = []
        records: list[dict] = []
        layer_bar = tqdm(range(manifest.num_layers), desc="predictors", unit="layer", disable=not progress)
        for i in layer_bar:
            done = work / f"layer_{i:03d}.npz"
            if done.is_file():
                p, rec = _load_layer(done)
                predictors.append(p)
                records.append(rec)
                continue
            x = np.load(xs_paths[i], mmap_mode="r")
            x = np.asarray(x, dtype=np.float32)
            ffn = ffns[i]
            rec_extra: dict = {}
            if kind == "relu":
                rule = cal.ActiveRule("relu")
            else:
                qs = cal.activation_quantiles(ffn, x, list(SPARSITY_GRID) + [opts.sparsity], seed=opts.seed)
                t_act = qs[-1]
                rule = cal.ActiveRule("threshold", {i: t_act})
                rec_extra = {
                    "activation_threshold": t_act,
                    "activation_quantiles": {str(s): q for s, q in zip(SPARSITY_GRID, qs)},
                }
            y = cal.active_sets(ffn, x, rule)
            n = y.shape[1]
            used = sum(p.num_elems for p in predictors)
            left_layers = manifest.num_layers - i
            cap_elems = total_budget - used - (left_layers - 1) * predictor_elems(d, n, MIN_RANK)
            max_rank = max(1, (cap_elems - n - 1) // (d + n))
            p, rec = train_layer(x, y, opts, max_rank, store_dtype=st_dtype, progress=progress, layer=i)
            rec.update(rec_extra)
            rec["calibration_active_fraction"] = round(float(y.mean()), 6)
            _save_layer(done, p, rec)
            predictors.append(p)
            records.append(rec)
            v = rec["validation"]
            log(
                f"layer {i}: rank {rec['rank']}, recall {v['recall']:.4f}, predicted/true {v['ratio']:.2f} "
                f"({100 * v['predicted_fraction']:.1f}% vs {100 * v['active_fraction']:.1f}% of neurons)"
                + (
                    ""
                    if rec["met_max_ratio"]
                    else f" (ratio above --max-ratio {opts.max_ratio}: "
                    + ("the rank is fixed by --rank)" if opts.rank else "the size budget capped the rank)")
                )
            )
        layer_bar.close()

        elems = sum(p.num_elems for p in predictors)
        info = {
            "rule": kind,
            "sparsity": opts.sparsity if kind == "threshold" else None,
            "recall_target": opts.recall,
            "max_ratio": opts.max_ratio,
            "options": train_opts,
            "calibration": {"data": Path(data).name, "tokens": int(n_tok), "seq_len": seq_len},
            "elems": elems,
            "bytes": elems * st_dtype.itemsize,
            "model_bytes": m_bytes,
            "fraction_of_model": round(elems * st_dtype.itemsize / m_bytes, 6),
            "layers": records,
        }
        summary = {
            "file": layout.PREDICTORS_NAME,
            "rule": kind,
            "sparsity": info["sparsity"],
            "recall_target": opts.recall,
            "fraction_of_model": info["fraction_of_model"],
            "layers": [
                {
                    "layer": r["layer"],
                    "rank": r["rank"],
                    "threshold": r["threshold"],
                    "recall": r["validation"]["recall"],
                    "ratio": r["validation"]["ratio"],
                    **(
                        {"activation_threshold": r["activation_threshold"]}
                        if "activation_threshold" in r
                        else {}
                    ),
                }
                for r in records
            ],
        }
        install_predictors(folder, predictors, info, summary)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
        return info
    finally:
        rt.close()


def default_seq_len(config: dict) -> int:
    return int(min(256, config.get("max_position_embeddings") or 256))


def _open_work(work: Path, collect_fp: str, train_fp: str, fresh: bool, log) -> dict:
    """The work folder's state: kept when it was made for the same model, data and options
    (a resumed run), partly or wholly cleared otherwise."""
    meta_path = work / "meta.json"
    meta = {}
    if meta_path.is_file() and not fresh:
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, OSError):
            meta = {}
    if meta.get("collect") != collect_fp:
        if work.exists():
            shutil.rmtree(work)
        meta = {"collect": collect_fp}
    elif meta.get("collected"):
        log(f"resuming from {work}: calibration inputs already collected")
    if meta.get("train") != train_fp:
        for f in work.glob("layer_*.npz") if work.exists() else []:
            f.unlink()
        meta["train"] = train_fp
    else:
        done = sorted(work.glob("layer_*.npz"))
        if done:
            log(f"resuming from {work}: {len(done)} layer(s) already trained")
    work.mkdir(parents=True, exist_ok=True)
    _write_meta(work, meta)
    return meta


def _write_meta(work: Path, meta: dict) -> None:
    tmp = work / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(work / "meta.json")


def _save_layer(path: Path, p: LayerPredictor, record: dict) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, A=p.A, B=p.B, bias=p.bias, threshold=np.float64(p.threshold), record=json.dumps(record))
    tmp.replace(path)


def _load_layer(path: Path) -> tuple[LayerPredictor, dict]:
    z = np.load(path)
    return LayerPredictor(z["A"], z["B"], z["bias"], float(z["threshold"])), json.loads(str(z["record"]))
