"""Fitting one layer's predictor, in numpy (its wheel's OpenBLAS: MLX's Linux CPU BLAS is 30-40x
slower for these products).

The predictor scores neuron i by z_i = B_i (A x) + b_i and predicts it active when z_i >= t.

1. Initialisation from the selector (`SelectorSVD`): the layer's true pre-activations are
   W x + b1 (W: the selector, its gate or up rows). On the calibration inputs, with mean mu and
   covariance C = L L^T (Cholesky, a small ridge added), the rank-r factors that best
   reproduce them in least squares over the data are the truncated SVD of G = L^T W^T
   (d x n): G ~ U_r S_r V_r^T gives z = (V_r S_r) (U_r^T L^{-1}) (x - mu) + W mu + b1. One
   randomized SVD at the largest rank serves every smaller one (truncation).
2. Training with the balanced loss (`train_balanced`): binary cross-entropy on the true active
   sets in which positives and negatives weigh half each, whatever the sparsity, by Adam on
   the whitened inputs u = L^{-1} (x - mu) (the factors balanced as A' = sqrt(S) U^T,
   B' = V sqrt(S) times a logit scale fitted first), then folded back to raw inputs.
3. The threshold (`choose_threshold`): the highest logit whose recall of the truly active
   neurons of held-out calibration tokens reaches the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .store import LayerPredictor

RIDGE = 1e-4  # of the mean input variance, added to C before its Cholesky factor
CHUNK = 4096  # tokens per product when streaming over calibration inputs


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


def _chunks(n: int, size: int = CHUNK):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def threshold_for_recall(z_pos: np.ndarray, recall: float) -> float:
    """The highest t such that a fraction >= `recall` of the scores `z_pos` are >= t."""
    if len(z_pos) == 0:
        return float(np.finfo(np.float32).max)
    k = int(math.floor((1 - recall) * len(z_pos) + 1e-9))
    return float(np.partition(z_pos, k)[k])


def choose_threshold(p: LayerPredictor, x: np.ndarray, y: np.ndarray, recall: float) -> tuple[float, dict]:
    """The highest logit threshold t whose recall (z >= t among truly active, pooled over
    tokens) is at least `recall` on (x, y), and the counts it gives."""
    zs = [p.logits(x[lo:hi]) for lo, hi in _chunks(len(x))]
    t = threshold_for_recall(
        np.concatenate([z[y[lo:hi]] for (lo, hi), z in zip(_chunks(len(x)), zs)]), recall
    )
    return t, counts_at(zs, y, t)


def counts_at(zs: list[np.ndarray], y: np.ndarray, t: float) -> dict:
    predicted = hit = 0
    for (lo, hi), z in zip(_chunks(len(y)), zs):
        m = z >= t
        predicted += int(m.sum())
        hit += int((m & y[lo:hi]).sum())
    return set_counts(hit=hit, predicted=predicted, active=int(y.sum()), total=y.size)


def ratio_at_recall(z: np.ndarray, y: np.ndarray, recall: float) -> float:
    """Predicted / truly active at the threshold that reaches `recall` on (z, y)."""
    t = threshold_for_recall(z[y], recall)
    active = int(y.sum())
    return float((z >= t).sum() / active) if active else 0.0


@dataclass
class InputStats:
    """Mean and Cholesky factor of the covariance of a layer's calibration inputs."""

    mu: np.ndarray  # [d] float64
    L: np.ndarray  # [d, d] lower triangular, C + ridge = L L^T
    Linv: np.ndarray  # [d, d], L^{-1}

    @classmethod
    def of(cls, x: np.ndarray, rows: np.ndarray | None = None) -> InputStats:
        """Of x [N, d] (a memmap is read a chunk at a time), or of its `rows` only."""
        rows = np.arange(len(x)) if rows is None else rows
        n, d = len(rows), x.shape[1]
        s = np.zeros(d)
        ss = np.zeros((d, d))
        for lo, hi in _chunks(n):
            xb = np.asarray(x[rows[lo:hi]], np.float32)
            s += xb.sum(0, dtype=np.float64)
            ss += (xb.T @ xb).astype(np.float64)
        mu = s / n
        C = ss / n - np.outer(mu, mu)
        C += RIDGE * max(float(np.trace(C)) / d, 1e-12) * np.eye(d)
        L = np.linalg.cholesky(C)
        Linv = np.linalg.solve(L, np.eye(d))  # LAPACK's general solve: within 2x of a triangular one here
        return cls(mu, L, Linv)

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """u = L^{-1} (x - mu), float32 [N, d]."""
        return (np.asarray(x, np.float32) - self.mu.astype(np.float32)) @ self.Linv.T.astype(np.float32)


@dataclass
class SelectorSVD:
    """The truncated SVD of G = L^T W^T at rank k: U [d, k], S [k], V [n, k], and the
    pre-activation at the mean input, W mu + b1 [n]."""

    U: np.ndarray
    S: np.ndarray
    V: np.ndarray
    offset: np.ndarray

    @classmethod
    def of(
        cls, W: np.ndarray, b1: np.ndarray | None, stats: InputStats, k: int, seed: int = 0
    ) -> SelectorSVD:
        n, d = W.shape
        G = (stats.L.T.astype(np.float32) @ W.T.astype(np.float32)).astype(np.float32)  # [d, n]
        k = min(k, d, n)
        if d <= n and k >= d // 2:  # from the eigenvectors of G G^T [d, d]
            lam, U = np.linalg.eigh((G @ G.T).astype(np.float64))
            order = np.argsort(lam)[::-1][:k]
            S = np.sqrt(np.maximum(lam[order], 0))
            U = U[:, order]
            Vt = ((G.T.astype(np.float64) @ U) / np.maximum(S, 1e-30)).T
        elif k >= min(d, n) // 2:
            U, S, Vt = np.linalg.svd(G, full_matrices=False)
        else:  # randomized range finder with two power iterations (Halko et al. 2011)
            rng = np.random.default_rng(seed)
            Q, _ = np.linalg.qr(G @ rng.standard_normal((n, min(k + 16, d)), dtype=np.float32))
            for _ in range(2):
                Q, _ = np.linalg.qr(G @ (G.T @ Q))
            Ub, S, Vt = np.linalg.svd(Q.T @ G, full_matrices=False)
            U = Q @ Ub
        offset = W.astype(np.float64) @ stats.mu
        if b1 is not None:
            offset = offset + b1
        return cls(U[:, :k].astype(np.float32), S[:k].astype(np.float32), Vt[:k].T.astype(np.float32), offset)

    @property
    def rank(self) -> int:
        return len(self.S)

    def factors(self, r: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(A', B') of rank r on whitened inputs, balanced: A' = sqrt(s S) U^T, B' = V sqrt(s S)."""
        g = np.sqrt(scale * self.S[:r])
        return (self.U[:, :r] * g).T.copy(), self.V[:, :r] * g

    def logits_by_rank(self, u: np.ndarray, ranks: list[int]):
        """whitened_logits(u, r) for each r of the increasing `ranks`, each from the last."""
        P = (u @ self.U) * self.S
        z = np.zeros((len(u), len(self.V)), np.float32)
        prev = 0
        for r in ranks:
            z += P[:, prev:r] @ self.V[:, prev:r].T
            prev = r
            yield r, z

    def whitened_logits(self, u: np.ndarray, r: int) -> np.ndarray:
        """Approximate pre-activations minus their value at the mean, on whitened inputs u."""
        return ((u @ self.U[:, :r]) * self.S[:r]) @ self.V[:, :r].T


def fold(stats: InputStats, A_w: np.ndarray, B: np.ndarray, c: np.ndarray) -> LayerPredictor:
    """The predictor on raw inputs of z = B (A_w u) + c with u = L^{-1} (x - mu):
    A = A_w L^{-1}, b = c - B (A mu)."""
    A = np.asarray(A_w, np.float64) @ stats.Linv
    bias = np.asarray(c, np.float64) - np.asarray(B, np.float64) @ (A @ stats.mu)
    return LayerPredictor(A.astype(np.float32), np.asarray(B, np.float32), bias.astype(np.float32), 0.0)


def class_weights(y: np.ndarray) -> tuple[float, float]:
    p = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    return 0.5 / p, 0.5 / (1 - p)


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def balanced_bce(z: np.ndarray, y: np.ndarray, w_pos: float, w_neg: float) -> float:
    """Binary cross-entropy on logits z against 0/1 labels y, positives weighted w_pos and
    negatives w_neg (balanced: w_pos = 1 / (2 p), w_neg = 1 / (2 (1 - p))), as
    (w_pos y + w_neg (1 - y)) softplus(z) - w_pos y z."""
    w = np.where(y, w_pos, w_neg)
    return float(np.mean(w * _softplus(z) - w_pos * y * z))


def fit_scale(zw: np.ndarray, offset: np.ndarray, y: np.ndarray, w: tuple[float, float]) -> float:
    """The logit scale s (z = s (zw + offset)) with the lowest balanced loss on (zw, y), on a
    log grid: the SVD's pre-activations are in the model's units, not in logits."""
    sd = float(np.std(zw)) or 1.0
    grid = [g / sd for g in np.geomspace(0.25, 64, 13)]
    return min(grid, key=lambda s: balanced_bce(s * (zw + offset), y, *w))


@dataclass
class Adam:
    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for k, g in grads.items():
            m = self.m.setdefault(k, np.zeros_like(g))
            v = self.v.setdefault(k, np.zeros_like(g))
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * (g * g)
            params[k] -= (lr / c1) * m / (np.sqrt(v / c2) + self.eps)


def train_balanced(
    u: np.ndarray,
    y: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    c: np.ndarray,
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int = 0,
    progress=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adam on the balanced loss of z = B (A u) + c against y, from (A, B, c); u whitened
    inputs [N, d] float32, y bool [N, n]. Returns the trained (A, B, c); `progress` gets one
    update per step."""
    n_tok = len(u)
    n = y.shape[1]
    w_pos, w_neg = class_weights(y)
    params = {
        "A": A.astype(np.float32).copy(),
        "B": B.astype(np.float32).copy(),
        "c": c.astype(np.float32).copy(),
    }
    opt = Adam(lr)
    rng = np.random.default_rng(seed)
    steps = max(1, n_tok // batch)
    total = steps * epochs
    k = 0
    for _ in range(epochs):
        order = rng.permutation(n_tok)
        for s in range(steps):
            idx = np.sort(order[s * batch : (s + 1) * batch])
            ub, yb = u[idx], y[idx]
            h = ub @ params["A"].T  # [b, r]
            z = h @ params["B"].T + params["c"]  # [b, n]
            # dL/dz of the mean balanced loss: w (sigmoid(z) - y) / (b n)
            sig = 0.5 * (1 + np.tanh(0.5 * z))
            g = np.where(yb, w_pos * (sig - 1), w_neg * sig).astype(np.float32) / (len(idx) * n)
            gB = g.T @ h
            gc = g.sum(0)
            gA = (g @ params["B"]).T @ ub
            lr_k = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * k / total)))  # cosine to 5%
            opt.step(params, {"A": gA, "B": gB, "c": gc}, lr_k)
            k += 1
            if progress is not None:
                progress.update(1)
    return params["A"], params["B"], params["c"]
