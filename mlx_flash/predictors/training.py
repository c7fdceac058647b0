"""Training the predictors: per layer, a low-rank classifier of which FFN neurons fire.

1. Calibration: the model runs over the calibration text (teacher-forced windows, its FFN
   streamed from flash, every matrix product in numpy: `calibration.run_windows`), and each
   layer's FFN inputs are written to a memmap on disk (bounded memory for any --tokens; an
   interrupted run resumes at the forward pass it was on). The last 10% of the tokens are held
   out: they choose ranks and thresholds, never train.
2. Per layer, the selector's SVD (`fitting.SelectorSVD`: the gate or up rows, whitened by the
   inputs' covariance) at the largest rank the budget allows, and on the held-out tokens the
   predicted / truly active ratio at the recall target for each rank of a ladder (8, 10, 12, 14, 16, 20, ...).
3. Ranks from the byte budget (all predictors at most `max_size` of the model's bytes, as stored): every
   layer starts at the smallest rank; the budget goes, step by step, to the layer where one
   more rung of the ladder removes the most predicted neurons per added byte, while that
   removes at least `min_gain` of the layer's true active set, and while the neurons it stops
   predicting would cost more to compute than the rung's weights (a token reads every predictor
   weight once, and each predicted neuron's rows once: past that point a larger predictor makes
   the token slower; on the synthetic OPT presets this stops every layer at the selector's
   knee, rank 128, where the budget alone went on to 192-320 for 1.07 against 1.14 predicted
   neurons per active one; `spend_budget` (`--spend-budget`) drops this limit).
4. Per layer, from the SVD factors at its rank, Adam on the balanced binary cross-entropy
   (`fitting.train_balanced`); the trained predictor is kept when its held-out ratio is lower
   than the SVD's, else the SVD's (both are recorded), each measured as stored (8-bit
   factors: `store.Storage`). The threshold is the highest logit whose held-out recall reaches
   the target.

Every layer's work is saved as it finishes (in FLASHDIR/predictors.work), so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import layout
from ..errors import MlxFlashError
from . import calibration as cal
from . import fitting as fit
from .fitting import choose_threshold, set_counts  # noqa: F401 (part of this module's interface)
from .store import FORMAT, LayerPredictor, Storage, install_predictors, sigmoid

WORK_DIR_NAME = "predictors.work"
SPARSITY_GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # quantiles kept for eval's sparsity sweep
MIN_RANK = 8
# default calibration tokens: about the forward work of 8,192 tokens of a 1.3B float32 model
DEFAULT_TOKENS, MAX_DEFAULT_TOKENS, REFERENCE_MODEL_BYTES = 8192, 65536, 5_260_000_000


@dataclass(frozen=True)
class TrainOptions:
    recall: float = 0.95  # target recall of truly active neurons, per layer, on new text
    # thresholds are set for recall + recall_margin on the held-out calibration tokens: on other
    # text recall falls by a few tenths of a point (the demo model: 95.00% -> 94.3-94.7%)
    recall_margin: float = 0.01
    rank: int | None = None  # a fixed rank for every layer (else chosen per layer from the budget)
    max_size: float = 0.05  # all predictors at most this fraction of the model's bytes (as stored)
    max_rank: int = 512  # the largest rank a layer may get
    min_gain: float = 0.05  # a doubling of rank must cut predicted / true by at least this
    # ranks also where a larger predictor costs a token more compute than it saves (budget alone)
    spend_budget: bool = False
    sparsity: float = 0.5  # threshold rule only: fraction of activations counted as inactive
    epochs: int = 4
    batch: int = 512
    lr: float = 1e-3
    train_tokens: int = 32768  # at most this many calibration tokens feed the Adam steps
    val_fraction: float = 0.1
    seed: int = 0

    @property
    def threshold_recall(self) -> float:
        """The recall each threshold reaches on the held-out calibration tokens."""
        return min(self.recall + self.recall_margin, (1 + self.recall) / 2)

    def check(self) -> None:
        if not 0 < self.recall < 1:
            raise MlxFlashError(f"--recall must be between 0 and 1 (exclusive), got {self.recall}")
        if self.rank is not None and self.rank < 1:
            raise MlxFlashError(f"--rank must be a positive integer, got {self.rank}")
        if self.max_rank < 1:
            raise MlxFlashError(f"--max-rank must be a positive integer, got {self.max_rank}")
        if not 0 <= self.recall_margin < 1:
            raise MlxFlashError(f"--recall-margin must be in [0, 1), got {self.recall_margin}")
        if not 0 < self.max_size <= 1:
            raise MlxFlashError(f"--max-size must be a fraction in (0, 1], got {self.max_size}")
        if not 0 < self.sparsity < 1:
            raise MlxFlashError(f"--sparsity must be between 0 and 1 (exclusive), got {self.sparsity}")
        if self.epochs < 0 or self.batch < 1 or self.lr <= 0 or self.train_tokens < 1:
            raise MlxFlashError("--epochs must be >= 0; --batch, --lr and --train-tokens positive")
        if not 0 < self.val_fraction < 0.5:
            raise MlxFlashError(f"validation fraction must be in (0, 0.5), got {self.val_fraction}")


def rank_ladder(d: int, n: int, max_rank: int) -> list[int]:
    """Four ranks an octave from 8 (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...) up to max_rank
    (included), at most min(d, n)."""
    top = min(d, n, max_rank)
    ranks, r = [], MIN_RANK
    while r < top:
        ranks += [k for k in (r, r * 5 // 4, r * 3 // 2, r * 7 // 4) if k < top]
        r *= 2
    return ranks + [top] if top >= 1 else ranks


def allocate_ranks(
    curves: list[dict[int, float]],
    active: list[float],
    d: int,
    ns: list[int],
    budget: int,
    min_gain: float,
    *,
    neuron_elems: int | None,
    storage: Storage,
) -> list[int]:
    """Ranks per layer within `budget` bytes (as `storage` stores them): start each layer at
    its smallest rank, then repeatedly move the layer whose next rank removes the most
    predicted neurons per token (ratio drop x truly active per token) per added byte, while the
    drop is at least `min_gain` per doubling of the rank, the neurons removed times
    `neuron_elems` (the weights computing one neuron reads: its row of each FFN part) are at
    least the weights added (a quantized weight costs a token about what a float one does; None:
    no such limit), and the budget holds. curves[l]: rank -> predicted/true on held-out tokens."""
    ladders = [sorted(c) for c in curves]
    pos = [0] * len(curves)
    used = sum(storage.layer_bytes(d, n, lad[0]) for lad, n in zip(ladders, ns))
    while True:
        best, best_eff = None, 0.0
        for l, (lad, c) in enumerate(zip(ladders, curves)):
            if pos[l] + 1 >= len(lad):
                continue
            r0, r1 = lad[pos[l]], lad[pos[l] + 1]
            drop = c[r0] - c[r1]
            extra = (r1 - r0) * storage.rank_bytes(d, ns[l])
            if drop < min_gain * math.log2(r1 / r0) or used + extra > budget:
                continue
            added = (r1 - r0) * (d + ns[l])  # weights a token computes more
            if neuron_elems is not None and drop * active[l] * neuron_elems < added:
                continue  # costs the token more than it saves
            eff = drop * active[l] / extra
            if eff > best_eff:
                best, best_eff = l, eff
        if best is None:
            return [lad[p] for lad, p in zip(ladders, pos)]
        lad = ladders[best]
        used += (lad[pos[best] + 1] - lad[pos[best]]) * storage.rank_bytes(d, ns[best])
        pos[best] += 1


def pre_activation_threshold(act, t: float) -> float:
    """The pre-activation p* above which act(p) > t on the positive branch (0 for t = 0 and a
    ReLU): the SVD's logits are centred there."""
    if t <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while float(act(np.array([hi], np.float32))[0]) <= t and hi < 1e6:
        hi *= 2
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(act(np.array([mid], np.float32))[0]) <= t else (lo, mid)
    return hi


def selector_rows(f: cal.LayerFFN) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's selector (gate or up rows, float32 [n, d]) and its bias (up: b1)."""
    parts = [(rows["gate"] if "gate" in rows else rows["up"]).copy() for _, _, rows in f.blocks()]
    gated = "gate" in next(f.blocks())[2]  # (the blocks' buffers are reused: copied above)
    return np.concatenate(parts), (None if gated else f.up_bias)


def held_out_split(rows: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of the calibration inputs: every 1/fraction-th run of up
    to 32 consecutive rows is held out, so that the held-out tokens are spread over the text."""
    k = max(2, int(round(1 / fraction)))
    run = max(1, min(32, rows // (10 * k)))
    held = (np.arange(rows) // run) % k == k - 1
    if not held.any():
        held[-1] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def even_sample(n: int, k: int) -> np.ndarray:
    """min(n, k) indices spread evenly over range(n)."""
    return np.arange(n) if n <= k else np.linspace(0, n - 1, k).astype(np.int64)


# -- the whole model -----------------------------------------------------------------------------


def model_bytes(folder: Path, manifest: layout.Manifest) -> int:
    """Bytes of every weight of the model as the flash folder stores them (dense part plus FFN
    neurons; quantized folders: their packed weights, scales and biases)."""
    from ..safetensors_file import PADDING_PREFIX, read_header

    header, _ = read_header(folder / manifest.dense_file)
    dense = sum(t.nbytes for name, t in header.items() if not name.startswith(PADDING_PREFIX))
    return dense + manifest.ffn_bytes()


def default_tokens(nbytes: int) -> int:
    """Calibration tokens when --tokens is not given: 8,192 for a model of 5.3 GB (a 1.3B model in
    float32) or more, more for a smaller model at about the same forward work, at most 65,536 (a
    small ReLU model calibrated on 8,192 tokens kept 96% recall on the held-out calibration tokens
    but 93.3% on other text, +1.6% perplexity; on 65,536, 94.1-95.0% and +0.9%, RESULTS.md)."""
    scaled = DEFAULT_TOKENS * REFERENCE_MODEL_BYTES // max(1, nbytes)
    return int(min(MAX_DEFAULT_TOKENS, max(DEFAULT_TOKENS, scaled // 1024 * 1024)))


def _file_sha(path: Path) -> str:
    return layout.file_digest(path)[:16]


def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train(
    folder: str | Path,
    data: str | Path,
    *,
    tokens: int | None = None,
    seq_len: int | None = None,
    opts: TrainOptions = TrainOptions(),
    batch_tokens: int = 4096,
    work: str | Path | None = None,
    fresh: bool = False,
    keep_work: bool = False,
    progress: bool = True,
    log=None,
) -> dict:
    """Train and save a flash folder's predictors; returns the info saved with them. `tokens`:
    calibration tokens (None: `default_tokens` of the model's bytes)."""
    from ..model import FlashOptions, load_flash_model, read_config

    opts.check()
    if tokens is not None and tokens < 16:
        raise MlxFlashError(f"--tokens must be at least 16, got {tokens}")
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    m_bytes = model_bytes(folder, manifest)
    tokens = default_tokens(m_bytes) if tokens is None else tokens
    config = read_config(folder)
    seq_len = seq_len or default_seq_len(config)
    model, rt = load_flash_model(folder, FlashOptions(mode="naive", context=seq_len))
    try:
        from mlx_lm.utils import load_tokenizer

        tokenizer = load_tokenizer(folder)
        token_ids = cal.read_tokens(tokenizer, data, tokens)
        kind = cal.rule_kind_for(manifest.activation)
        d, L = manifest.hidden_size, manifest.num_layers
        n_tok = len(token_ids)
        work = Path(work) if work else folder / WORK_DIR_NAME
        model_fp = _fingerprint(
            {"dense": manifest.dense_checksum, "layers": [e.checksum for e in manifest.layers]}
        )
        collect_fp = _fingerprint(
            {
                "model": model_fp,
                "data": _file_sha(Path(data)),
                "tokens": n_tok,
                "seq_len": seq_len,
                "batch_tokens": batch_tokens,
            }
        )
        train_opts = asdict(opts)
        if kind == "relu":
            train_opts.pop("sparsity")
        train_fp = _fingerprint({"collect": collect_fp, "opts": train_opts, "format": FORMAT})
        meta = _open_work(work, collect_fp, train_fp, fresh, log)
        xs_paths = [work / f"x_layer_{i:03d}.npy" for i in range(L)]

        spans = cal.windows(n_tok, seq_len)
        n_rows = sum(hi - lo for lo, hi in spans)
        if not meta.get("collected"):
            _collect(
                model,
                token_ids,
                spans,
                xs_paths,
                n_rows,
                d,
                batch_tokens,
                meta,
                work,
                progress,
            )
        xs = [np.load(p, mmap_mode="r") for p in xs_paths]
        ffns = [cal.LayerFFN(f) for f in cal.flash_layers(model)]
        train_rows, val_rows = held_out_split(n_rows, opts.val_fraction)
        n_val = len(val_rows)
        storage = Storage.of(manifest)
        budget = int(opts.max_size * m_bytes)  # in bytes, as stored
        ns = [e.num_neurons for e in manifest.layers]
        if budget < sum(storage.layer_bytes(d, n, 1) for n in ns):
            raise MlxFlashError(f"--max-size {opts.max_size} leaves no room for even rank-1 predictors")
        # the largest rank one layer can get (the others at the smallest rank, or all equal)
        others = sum(storage.layer_bytes(d, n, MIN_RANK) for n in ns[1:])
        k_max = max(
            (budget - others - storage.layer_bytes(d, ns[0], 0)) // storage.rank_bytes(d, ns[0]),
            (budget // L - storage.layer_bytes(d, max(ns), 0)) // storage.rank_bytes(d, max(ns)),
        )
        k_max = max(1, min(opts.rank or opts.max_rank, k_max))

        # 2. per layer: the selector's SVD and its held-out ratio per rank
        analyses = []
        for i in tqdm(range(L), desc="selector SVD", unit="layer", disable=not progress):
            path = work / f"svd_{i:03d}.npz"
            if not path.is_file():
                _analyse_layer(path, ffns[i], xs[i], train_rows, val_rows, kind, opts, k_max)
            with np.load(path) as z:
                analyses.append(json.loads(str(z["record"])))

        # 3. ranks from the byte budget
        if opts.rank:
            ranks = [min(opts.rank, int(a["svd_rank"])) for a in analyses]
        else:
            curves = [{int(r): v for r, v in a["svd_ratio"].items()} for a in analyses]
            active = [a["active_fraction"] * n for a, n in zip(analyses, ns)]
            parts = len(manifest.part_names)  # rows of d weights a neuron's FFN reads (up, down, gate)
            ranks = allocate_ranks(
                curves,
                active,
                d,
                ns,
                budget,
                opts.min_gain,
                neuron_elems=None if opts.spend_budget else parts * d,
                storage=storage,
            )
        log(f"ranks from the budget ({budget} bytes, {100 * opts.max_size:.1f}% of the model): {ranks}")

        # 4. per layer: training from the SVD, threshold
        predictors: list[LayerPredictor] = []
        records: list[dict] = []
        for i in tqdm(range(L), desc="predictors", unit="layer", disable=not progress):
            done = work / f"layer_{i:03d}.npz"
            if done.is_file():
                p, rec = _load_layer(done)
            else:
                p, rec = _train_layer(
                    ffns[i],
                    xs[i],
                    train_rows,
                    val_rows,
                    analyses[i],
                    ranks[i],
                    opts,
                    storage,
                    progress,
                    work / f"svd_{i:03d}.npz",
                )
                _save_layer(done, p, rec)
                v = rec["validation"]
                log(
                    f"layer {i}: rank {rec['rank']} ({rec['kept']}), held-out recall {v['recall']:.4f}, "
                    f"predicted/true {v['ratio']:.2f} ({100 * v['predicted_fraction']:.2f}% vs "
                    f"{100 * v['active_fraction']:.2f}% of neurons; SVD alone {rec['svd']['ratio']:.2f})"
                )
            predictors.append(p)
            records.append(rec)

        elems = sum(p.num_elems for p in predictors)
        nbytes = sum(storage.layer_bytes(d, p.B.shape[0], p.rank) for p in predictors)
        info = {
            "rule": kind,
            "kind": "trained",
            "sparsity": opts.sparsity if kind == "threshold" else None,
            "recall_target": opts.recall,
            "threshold_recall": opts.threshold_recall,
            "options": train_opts,
            "calibration": {
                "data": Path(data).name,
                "tokens": int(n_tok),
                "seq_len": seq_len,
                "held_out_tokens": n_val,
            },
            "elems": elems,
            "bytes": nbytes,
            "model_bytes": m_bytes,
            "fraction_of_model": round(nbytes / m_bytes, 6),
            "layers": records,
        }
        summary = {
            "file": layout.PREDICTORS_NAME,
            "rule": kind,
            "kind": "trained",
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
        del xs
        install_predictors(folder, predictors, info, summary)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
        return info
    finally:
        rt.close()


def _collect(model, token_ids, spans, xs_paths, n_rows, d, batch_tokens, meta, work, progress) -> None:
    """The calibration forward, each layer's FFN inputs into its memmap; resumable per pass."""
    passes = cal.passes(spans, batch_tokens)
    done = int(meta.get("passes_done", 0))
    rows_done = sum(hi - lo for batch in passes[:done] for lo, hi in batch)
    inputs = cal.LayerInputs(xs_paths, n_rows, d, resume=done > 0, rows_done=rows_done)
    if inputs.rows != rows_done:  # a memmap was missing: start over
        done = 0
    state = {"done": done}

    def keep(_batch, _logits, layer_x):
        inputs.add(layer_x)
        inputs.flush()
        state["done"] += 1
        meta["passes_done"] = state["done"]
        _write_meta(work, meta)

    with tqdm(
        total=n_rows, initial=inputs.rows, desc="calibration forward", unit="tok", disable=not progress
    ) as bar:
        cal.run_windows(
            model, token_ids, spans, keep, batch_tokens=batch_tokens, progress=bar, logits=False, skip=done
        )
    inputs.flush()
    meta["collected"] = True
    meta["rows"] = n_rows
    _write_meta(work, meta)


def _rule(f: cal.LayerFFN, x_train: np.ndarray, kind: str, opts: TrainOptions) -> tuple[cal.ActiveRule, dict]:
    if kind == "relu":
        return cal.ActiveRule("relu"), {"pre_activation_threshold": 0.0}
    qs = cal.activation_quantiles(f, x_train, list(SPARSITY_GRID) + [opts.sparsity], seed=opts.seed)
    t_act = qs[-1]
    return cal.ActiveRule("threshold", {f.layer: t_act}), {
        "activation_threshold": t_act,
        "activation_quantiles": {str(s): q for s, q in zip(SPARSITY_GRID, qs)},
        "pre_activation_threshold": pre_activation_threshold(f.act, t_act),
    }


def _analyse_layer(
    path: Path,
    f: cal.LayerFFN,
    x: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    kind: str,
    opts: TrainOptions,
    k_max: int,
) -> None:
    """Stage 2 for one layer: the selector's whitened SVD at rank k_max and its held-out curve."""
    x_val = np.asarray(x[val_rows], np.float32)
    rule, extra = _rule(f, x[train_rows[even_sample(len(train_rows), 4096)]], kind, opts)
    stats = fit.InputStats.of(x, train_rows)
    W, b1 = selector_rows(f)
    svd = fit.SelectorSVD.of(W, b1, stats, k_max, seed=opts.seed)
    del W
    y_val = cal.active_sets(f, x_val, rule)
    u_val = stats.whiten(x_val)
    shift = svd.offset - extra["pre_activation_threshold"]
    curve = {
        str(r): fit.ratio_at_recall(z + shift, y_val, opts.threshold_recall)
        for r, z in svd.logits_by_rank(u_val, rank_ladder(len(svd.U), len(svd.V), svd.rank))
    }
    record = {
        "layer": f.layer,
        "svd_rank": svd.rank,
        "svd_ratio": curve,
        "active_fraction": float(y_val.mean()),
        **extra,
    }
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, U=svd.U, S=svd.S, V=svd.V, offset=svd.offset, record=json.dumps(record))
    tmp.replace(path)


def _train_layer(
    f: cal.LayerFFN,
    x: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    analysis: dict,
    rank: int,
    opts: TrainOptions,
    storage: Storage,
    progress: bool,
    svd_path: Path,
) -> tuple[LayerPredictor, dict]:
    """Stage 4 for one layer: SVD factors at `rank`, balanced-loss training, the better of the
    two on held-out tokens, its threshold."""
    x_val = np.asarray(x[val_rows], np.float32)
    rule = (
        cal.ActiveRule("relu")
        if "activation_threshold" not in analysis
        else cal.ActiveRule("threshold", {f.layer: analysis["activation_threshold"]})
    )
    stats = fit.InputStats.of(x, train_rows)
    with np.load(svd_path) as z:
        svd = fit.SelectorSVD(z["U"], z["S"], z["V"], z["offset"])
    shift = svd.offset - analysis["pre_activation_threshold"]
    pick = train_rows[even_sample(len(train_rows), opts.train_tokens)]
    x_pick = np.asarray(x[pick], np.float32)
    u = stats.whiten(x_pick)
    y = cal.active_sets(f, x_pick, rule)
    del x_pick
    w = fit.class_weights(y)
    probe = even_sample(len(u), 2048)
    scale = fit.fit_scale(svd.whitened_logits(u[probe], rank), shift, y[probe], w)
    A0, B0 = svd.factors(rank, scale)
    c0 = (scale * shift).astype(np.float32)
    y_val = cal.active_sets(f, x_val, rule)
    candidates = {"svd": storage.round_trip(fit.fold(stats, A0, B0, c0))}
    if opts.epochs:
        steps = max(1, len(u) // opts.batch) * opts.epochs
        with tqdm(
            total=steps, desc=f"layer {f.layer} rank {rank}", unit="step", leave=False, disable=not progress
        ) as bar:
            A, B, c = fit.train_balanced(
                u,
                y,
                A0,
                B0,
                c0,
                epochs=opts.epochs,
                batch=opts.batch,
                lr=opts.lr,
                seed=opts.seed,
                progress=bar,
            )
        candidates["trained"] = storage.round_trip(fit.fold(stats, A, B, c))
    measured = {}
    for name, p in candidates.items():
        t, m = choose_threshold(p, x_val, y_val, opts.threshold_recall)
        p.threshold = t
        measured[name] = m
    kept = min(measured, key=lambda k: measured[k]["ratio"])
    p, m = candidates[kept], measured[kept]
    record = {
        "layer": f.layer,
        "rank": rank,
        "kept": kept,
        "threshold": p.threshold,
        "threshold_probability": sigmoid(p.threshold),
        "logit_scale": scale,
        "elems": p.num_elems,
        "validation": {k: round(v, 6) for k, v in m.items()},
        **{name: {k: round(v, 6) for k, v in mm.items()} for name, mm in measured.items()},
        "svd_ratio_by_rank": analysis["svd_ratio"],
        "train_tokens": int(len(pick)),
        "validation_tokens": int(len(val_rows)),
        "calibration_active_fraction": round(float(y.mean()), 6),
        **{k: analysis[k] for k in ("activation_threshold", "activation_quantiles") if k in analysis},
    }
    return p, record


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
    elif meta.get("passes_done"):
        log(f"resuming from {work}: calibration forward from pass {meta['passes_done'] + 1}")
    if meta.get("train") != train_fp:
        for pattern in ("svd_*.npz", "layer_*.npz"):
            for f in work.glob(pattern) if work.exists() else []:
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
