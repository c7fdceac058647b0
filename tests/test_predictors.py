"""Low-rank activation predictors: training, storage, evaluation, selection at load."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn
import mlx_lm
import numpy as np
import pytest
from tiny_models import TOKENIZER_TEXT, make_tiny_model

import mlx_flash
from mlx_flash import layout
from mlx_flash.budget import ModelSizes, plan_with_selection
from mlx_flash.convert import convert
from mlx_flash.errors import MlxFlashError
from mlx_flash.ffn import ffn_block
from mlx_flash.model import FlashOptions, load_dense, load_flash_model
from mlx_flash.predictors import Predictors, fitting, training
from mlx_flash.predictors import calibration as cal
from mlx_flash.predictors.__main__ import main as cli
from mlx_flash.predictors.evaluation import agreement, evaluate, layer_metrics, window_union
from mlx_flash.predictors.store import LayerPredictor, Storage, install_predictors

FAST = ["--epochs", "4", "--quiet"]


@pytest.fixture(scope="module")
def relu_flash(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred_relu")
    src = make_tiny_model(root / "src", "llama", hidden_act="relu")
    convert(src, root / "flash", progress=False)
    text = root / "text.txt"
    text.write_text(TOKENIZER_TEXT)
    return src, root / "flash", text


@pytest.fixture(scope="module")
def relu_trained(relu_flash, tmp_path_factory):
    src, flash, text = relu_flash
    folder = tmp_path_factory.mktemp("pred_relu_trained") / "flash"
    convert(src, folder, progress=False)
    assert cli(["train", "--model", str(folder), "--data", str(text), *FAST]) == 0
    return src, folder, text


def calibration_data(folder, text, tokens=1024):
    model, rt = load_flash_model(folder, FlashOptions(mode="naive", context=128))
    tok = mlx_lm.utils.load_tokenizer(folder)
    ids = cal.read_tokens(tok, text, tokens)
    xs = [[] for _ in model.layers]
    cal.run_windows(
        model,
        ids,
        cal.windows(len(ids), 128),
        lambda b, logits, layer_x: [xs[i].append(np.array(x)) for i, x in enumerate(layer_x)],
    )
    x0 = np.concatenate(xs[0])
    y0 = cal.active_sets(cal.flash_layers(model)[0], x0, cal.ActiveRule("relu"))
    rt.close()
    return x0, y0


def recall_at_true_size(p: LayerPredictor, x, y) -> float:
    """Recall when the predictor picks as many (token, neuron) pairs as are truly active."""
    z = p.logits(x)
    t = np.sort(z.reshape(-1))[-int(y.sum())]
    return layer_metrics(z >= t, y)["recall"]


# -- training ------------------------------------------------------------------------------------


def test_numpy_forward_matches_the_mlx_model(relu_flash):
    """Calibration's forward (every product in numpy, the FFN by ffn.ffn_block on numpy rows)
    gives the flash model's own logits and FFN inputs."""
    _, folder, text = relu_flash
    model, rt = load_flash_model(folder, FlashOptions(mode="naive", context=128))
    ids = cal.read_tokens(mlx_lm.utils.load_tokenizer(folder), text, 64)
    inputs = mx.array(ids[None])
    ref_x = []
    saved = [layer.mlp for layer in model.layers]

    class Keep(mlx.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, x):
            ref_x.append(np.array(x.reshape(-1, x.shape[-1])))
            return self.inner(x)

    for layer, ffn in zip(model.layers, saved):
        layer.mlp = Keep(ffn)
    ref = np.array(model(inputs))
    for layer, ffn in zip(model.layers, saved):
        layer.mlp = ffn
    got = []
    cal.run_windows(model, ids, [(0, len(ids))], lambda b, logits, xs: got.append((np.array(logits), xs)))
    rt.close()
    ((logits, xs),) = got
    assert np.allclose(logits, ref, atol=1e-4)
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(xs, ref_x))
    # and the one FFN formula gives the same on numpy as on MLX
    rng = np.random.default_rng(0)
    parts = {k: rng.standard_normal((6, 4), dtype=np.float32) for k in ("gate", "up", "down")}
    x = rng.standard_normal((3, 4), dtype=np.float32)
    want = np.array(ffn_block(mx.array(x), {k: mx.array(v) for k, v in parts.items()}, mlx.nn.relu))
    assert np.allclose(ffn_block(x, parts, cal.numpy_activation(mlx.nn.relu)), want, atol=1e-5)


def _low_rank_problem(seed=0, n_tok=3000, d=24, n=200, r=4):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.geomspace(3, 0.1, d)  # anisotropic inputs
    x = (rng.standard_normal((n_tok, d)) @ mix + 0.5).astype(np.float32)
    W = (rng.standard_normal((n, r)) @ rng.standard_normal((r, d)) / d).astype(np.float32)
    b1 = (-np.quantile(x @ W.T, 0.9, axis=0)).astype(np.float32)  # each neuron fires for ~10% of tokens
    return x, W, b1, (x @ W.T + b1) > 0


def test_selector_svd_recovers_a_low_rank_selector():
    x, W, b1, y = _low_rank_problem()
    stats = fitting.InputStats.of(x)
    svd = fitting.SelectorSVD.of(W, b1, stats, k=4)
    z = svd.whitened_logits(stats.whiten(x), 4) + svd.offset
    assert np.allclose(z, x @ W.T + b1, atol=1e-3)
    p = fitting.fold(stats, *svd.factors(4), svd.offset.astype(np.float32))
    assert np.allclose(p.logits(x), x @ W.T + b1, atol=1e-3)
    assert fitting.ratio_at_recall(p.logits(x), y, 0.95) <= 0.96  # exact: recall 0.95 at 0.95x
    low = svd.whitened_logits(stats.whiten(x), 2) + svd.offset  # too small a rank over-predicts
    assert fitting.ratio_at_recall(low, y, 0.95) > 1.3


def test_balanced_training_learns_from_a_poor_start():
    x, W, b1, y = _low_rank_problem(seed=1)
    stats = fitting.InputStats.of(x)
    u = stats.whiten(x)
    rng = np.random.default_rng(0)
    A0 = (0.1 * rng.standard_normal((4, x.shape[1]))).astype(np.float32)
    B0 = (0.1 * rng.standard_normal((W.shape[0], 4))).astype(np.float32)
    c0 = np.zeros(W.shape[0], np.float32)
    before = fitting.ratio_at_recall((u @ A0.T) @ B0.T + c0, y, 0.95)
    A, B, c = fitting.train_balanced(u, y, A0, B0, c0, epochs=20, batch=256, lr=1e-2)
    after = fitting.ratio_at_recall((u @ A.T) @ B.T + c, y, 0.95)
    assert after < 0.5 * before and after < 2.5, (before, after)
    w = fitting.class_weights(y)
    assert fitting.balanced_bce((u @ A.T) @ B.T + c, y, *w) < fitting.balanced_bce(
        (u @ A0.T) @ B0.T + c0, y, *w
    )


def test_ranks_from_the_budget_by_hand():
    assert training.rank_ladder(64, 1000, 40) == [8, 10, 12, 14, 16, 20, 24, 28, 32, 40]
    # layer 0 gains a lot from rank 10, layer 1 nothing: the budget goes to layer 0
    curves = [{8: 3.0, 10: 1.5, 12: 1.499}, {8: 1.2, 10: 1.199, 12: 1.198}]
    d, ns = 10, [90, 90]
    f32, q8 = Storage(np.dtype(np.float32), None), Storage(np.dtype(np.float32), 32)
    one = f32.layer_bytes(d, 90, 8)
    assert one == (8 * (10 + 90) + 90) * 4 + 4 and q8.rank_bytes(d, 90) == 100 + 2 * (100 // 32) * 4
    ranks = lambda budget, gain, ne=10**6, st=f32: training.allocate_ranks(  # noqa: E731
        curves, [5.0, 5.0], d, ns, budget, min_gain=gain, neuron_elems=ne, storage=st
    )
    assert ranks(10 * one, 0.05) == [10, 8]
    assert ranks(2 * one, 0.05) == [8, 8]  # no room
    assert ranks(2 * one, 0.05, st=q8) == [10, 8]  # room for 8-bit factors in the same bytes
    assert ranks(10 * one, 0.0) == [12, 12]
    # rank 8 -> 10 adds 2 x (10 + 90) = 200 weights a token and layer 0 predicts 1.5 x 5 = 7.5
    # neurons fewer: worth it when a neuron's rows are more than 200 / 7.5 = 26.7 weights
    assert ranks(10 * one, 0.05, ne=27) == [10, 8]
    assert ranks(10 * one, 0.05, ne=26) == [8, 8]
    assert ranks(10 * one, 0.05, ne=None) == [10, 8]  # --spend-budget: no compute limit


def test_train_saves_file_manifest_and_metadata(relu_trained):
    _, folder, _ = relu_trained
    m = layout.read_manifest(folder)
    assert m.predictors_file == layout.PREDICTORS_NAME
    extra = m.extra["predictors"]
    assert extra["rule"] == "relu" and len(extra["layers"]) == m.num_layers
    p = Predictors.load(folder)
    assert p.ranks() == [r["rank"] for r in extra["layers"]]
    assert p.info["fraction_of_model"] <= 0.05
    assert p.info["threshold_recall"] == pytest.approx(0.96)  # the default margin of a point
    for r in p.info["layers"]:
        assert r["validation"]["recall"] >= 0.96
        assert r["rank"] >= 1 and "threshold" in r
    assert not (folder / training.WORK_DIR_NAME).exists()
    ids = p.predict(0, mx.ones((1, m.hidden_size)))
    assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)


def test_stored_factors_are_8_bit_and_apply_what_thresholds_were_chosen_on(relu_trained, tmp_path):
    """A float32 folder of d = 64 keeps 8-bit factors (group 64): the file is under a third of
    float32 factors' bytes, the runtime's quantized product gives the logits of the round trip
    the thresholds were chosen on, and a file of float factors (format 1's layout) still loads and predicts."""
    import shutil

    from mlx_flash.predictors import store
    from mlx_flash.predictors.store import save_predictors
    from mlx_flash.safetensors_file import read_header

    _, folder, _ = relu_trained
    m = layout.read_manifest(folder)
    d, ns = m.hidden_size, [e.num_neurons for e in m.layers]
    st = Storage.of(m)
    assert st.group == 64
    assert store.quant_group(96, ns) == 32 and store.quant_group(100, ns) is None
    p = Predictors.load(folder)
    assert p.group == 64 and p.info["quantization"] == {"bits": 8, "group_size": 64}
    header, _ = read_header(folder / layout.PREDICTORS_NAME)
    file_bytes = sum(t.nbytes for t in header.values())
    float_bytes = sum(4 * (r * (d + n) + n + 1) for r, n in zip(p.ranks(), ns))
    assert file_bytes == sum(st.layer_bytes(d, n, r) for r, n in zip(p.ranks(), ns)) < float_bytes / 3
    x = np.random.default_rng(0).standard_normal((5, d)).astype(np.float32)
    plain = []
    for i, t in enumerate(p.thresholds):
        A, B = p.float_factors(i)
        lp = LayerPredictor(A, B, np.array(p._bias[i]), t)
        assert np.allclose(np.array(p.logits(i, mx.array(x))), lp.logits(x), atol=1e-4)
        assert np.array_equal(st.round_trip(lp).A, A)  # quantizing what was quantized changes nothing
        assert np.array_equal(p.predict_mask(i, x), lp.logits(x) >= t)
        plain.append(lp)
    old = tmp_path / "flash"
    shutil.copytree(folder, old)
    save_predictors(old / layout.PREDICTORS_NAME, plain, p.info, Storage(np.dtype(np.float32), None))
    info = json.loads(read_header(old / layout.PREDICTORS_NAME)[1][store.METADATA_KEY])
    assert "quantization" not in info
    q = Predictors.load(old)
    assert q.group is None and q.ranks() == p.ranks() and q.num_elems == p.num_elems
    for i in range(len(plain)):
        assert np.array_equal(
            q.predict(i, mx.array(x[:1])), np.flatnonzero(plain[i].logits(x[:1])[0] >= plain[i].threshold)
        )
    planned, _ = mlx_flash.load(old, selection="predictor", context=128)
    assert planned.flash.plan.predictor_bytes == planned.flash.predictors.nbytes == float_bytes - 4 * len(ns)
    planned.flash.close()


def test_default_tokens_keep_the_forward_work_of_8192_tokens_of_a_13b_model():
    """Without --tokens: 8,192 calibration tokens for opt-1.3b in float32 (5.26 GB) and larger,
    more for a smaller model at about the same forward work, at most 65,536 (a 15 MB model
    calibrated on 8,192 tokens drifted +1.6% in perplexity on other text, on 65,536 +0.9%)."""
    assert training.default_tokens(5_260_000_000) == 8192
    assert training.default_tokens(26_600_000_000) == 8192
    assert training.default_tokens(2_630_000_000) == 16384
    assert training.default_tokens(15_095_040) == 65536
    assert training.default_tokens(0) == 65536


def test_train_resumes_per_layer(relu_flash, tmp_path):
    src, _, text = relu_flash
    folder = tmp_path / "flash"
    convert(src, folder, progress=False)
    args = dict(tokens=512, opts=training.TrainOptions(epochs=2, rank=8), progress=False)
    training.train(folder, text, keep_work=True, **args)
    work = folder / training.WORK_DIR_NAME
    first = np.load(work / "layer_000.npz")["A"]  # as stored: 8-bit factors, widened
    (work / "layer_001.npz").unlink()
    logs = []
    training.train(folder, text, log=logs.append, **args)
    assert any("already collected" in s for s in logs) and any(
        "1 layer(s) already trained" in s for s in logs
    )
    assert np.allclose(Predictors.load(folder).float_factors(0)[0], first, rtol=0, atol=1e-6)
    assert not work.exists()


def test_fixed_rank_and_cli_errors(relu_flash, tmp_path, capsys):
    from mlx_flash.errors import run_cli

    _, folder, text = relu_flash
    assert (
        run_cli(cli, ["train", "--model", str(folder), "--data", str(tmp_path / "missing.txt")], prog="p")
        == 1
    )
    assert (
        run_cli(cli, ["train", "--model", str(folder), "--data", str(text), "--recall", "1.5"], prog="p") == 1
    )
    assert run_cli(cli, ["eval", "--model", str(folder), "--data", str(text)], prog="p") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 3 and "no such text file" in err[0] and "--recall" in err[1] and "no predictors" in err[2]
    )


# -- evaluation arithmetic ----------------------------------------------------------------------


def test_layer_metrics_by_hand():
    pred = np.array([[1, 1, 0, 0], [0, 1, 1, 0]], bool)
    true = np.array([[1, 0, 0, 0], [0, 1, 0, 1]], bool)
    m = layer_metrics(pred, true)
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == pytest.approx(1 / 2)
    assert m["predicted_fraction"] == pytest.approx(4 / 8) and m["active_fraction"] == pytest.approx(3 / 8)
    assert m["ratio"] == pytest.approx(4 / 3)
    assert agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75


def test_threshold_choice_by_hand():
    # one token, x = [0]: z_i = bias_i; truly active neurons 0, 2, 4 (z = .1, .3, .5)
    p = LayerPredictor(
        np.ones((1, 1), np.float32),
        np.ones((5, 1), np.float32),
        np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32),
        0.0,
    )
    y = np.array([[1, 0, 1, 0, 1]], bool)
    t, m = training.choose_threshold(p, np.zeros((1, 1), np.float32), y, recall=0.6)
    assert t == pytest.approx(0.3)  # may miss floor(0.4 * 3) = 1 of 3: z >= .3 keeps 2 of them
    assert (
        m["recall"] == pytest.approx(2 / 3)
        and m["precision"] == pytest.approx(2 / 3)
        and m["ratio"] == pytest.approx(1.0)
    )
    t, m = training.choose_threshold(p, np.zeros((1, 1), np.float32), y, recall=0.95)
    assert t == pytest.approx(0.1) and m["recall"] == 1.0 and m["predicted_fraction"] == 1.0


def test_perplexity_by_hand():
    logits = mx.array([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    nll = np.array(cal.log_softmax_nll(logits, mx.array([1, 1])))
    assert np.allclose(nll, [math.log(4 / 3), math.log(4)], atol=1e-6)
    assert cal.perplexity(float(nll.sum()), 2) == pytest.approx(math.sqrt(4 / 3 * 4))
    assert cal.windows(10, 4) == [(0, 4), (4, 8), (8, 10)] and cal.windows(9, 4) == [(0, 4), (4, 8)]


def test_eval_perplexities_match_dense_model_by_hand(relu_trained, tmp_path):
    """eval's dense perplexity equals mlx-lm's dense model scored by hand; with predictors that
    select every neuron the flash decode path gives the same perplexity and agrees on every
    greedy token; the trained predictors' per-layer figures are consistent."""
    src, folder, text = relu_trained
    r = evaluate(folder, text, tokens=96, seq_len=32, progress=False)
    dense = load_dense(src)
    ids = cal.read_tokens(mlx_lm.utils.load_tokenizer(src), text, 96)
    nll = 0.0
    for lo, hi in cal.windows(len(ids), 32):
        logits = dense(mx.array(ids[lo:hi])[None])[0, :-1]
        nll += float(cal.log_softmax_nll(logits, mx.array(ids[lo + 1 : hi])).sum())
    assert r["predicted_positions"] == 93
    assert r["perplexity_dense"] == pytest.approx(math.exp(nll / 93), rel=1e-4)
    for layer in r["layers"]:
        assert layer["ratio"] == pytest.approx(
            layer["predicted_fraction"] / layer["active_fraction"], rel=1e-4
        )
        assert 0 < layer["recall"] <= 1

    everything = tmp_path / "flash"
    convert(src, everything, progress=False)
    m = layout.read_manifest(everything)
    n, d = m.layers[0].num_neurons, m.hidden_size
    all_on = [
        LayerPredictor(
            np.zeros((1, d), np.float32), np.zeros((n, 1), np.float32), np.zeros(n, np.float32), -1.0
        )
    ] * m.num_layers
    install_predictors(everything, all_on, {"rule": "relu", "layers": []})
    r2 = evaluate(everything, text, tokens=96, seq_len=32, progress=False)
    assert r2["perplexity_predictor"] == pytest.approx(r2["perplexity_dense"], rel=1e-4)
    assert r2["greedy_agreement"] == 1.0
    assert all(l["recall"] == 1.0 and l["predicted_fraction"] == 1.0 for l in r2["layers"])


def test_window_union_by_hand():
    m = np.zeros((2 * 4, 3), bool)  # two windows of 4 tokens
    m[0, 0] = m[2, 1] = m[3, 2] = m[4, 2] = True
    u = window_union(m, 4, 2)
    assert u[:4].tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert u[4:].tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0]]  # windows do not mix
    assert (window_union(m, 4, 1) == m).all() and window_union(m, 4, 9)[3].tolist() == [1, 1, 1]


def test_eval_teacher_forced_flash_equals_decode_path(relu_trained):
    """The teacher-forced flash perplexity (each token's neurons: the window's union of
    predicted sets) is the decode path's, token by token, when both start with an empty cache."""
    _, folder, text = relu_trained
    for window in (1, 3):
        r = evaluate(folder, text, tokens=32, seq_len=32, window=window, decode_tokens=32, progress=False)
        assert r["decode_positions"] == r["predicted_positions"] == 31 and r["flash_window"] == window
        assert r["perplexity_flash"] == pytest.approx(r["perplexity_predictor"], rel=1e-4)
        assert r["greedy_agreement_flash"] == r["greedy_agreement"]
    assert r["perplexity_flash"] <= r["perplexity_predicted_sets"] * 1.05


def test_eval_cli_json(relu_trained, tmp_path, capsys):
    _, folder, text = relu_trained
    out = tmp_path / "eval.json"
    assert (
        cli(
            [
                "eval",
                "--model",
                str(folder),
                "--data",
                str(text),
                "--tokens",
                "64",
                "--seq-len",
                "32",
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert {
        "layers",
        "perplexity_dense",
        "perplexity_predictor",
        "greedy_agreement",
        "predictor_elems",
    } <= set(r)
    assert "pred/true" in capsys.readouterr().out


# -- loading with predictors ---------------------------------------------------------------------


def test_selection_predictor_without_predictors_is_one_line_error(relu_flash):
    _, folder, _ = relu_flash
    with pytest.raises(MlxFlashError) as e:
        mlx_flash.load(folder, selection="predictor")
    assert "no predictors" in str(e.value) and "\n" not in str(e.value)


def test_missing_or_mismatched_predictors_file_is_one_line_error(relu_trained, tmp_path):
    import shutil

    from mlx_flash.predictors.store import save_predictors

    _, folder, _ = relu_trained
    copy = tmp_path / "flash"
    shutil.copytree(folder, copy)
    p = Predictors.load(copy)
    layers = []
    for i, t in enumerate(p.thresholds):
        A, B = p.float_factors(i)
        layers.append(LayerPredictor(A[:, :-1], B, np.zeros(len(B), np.float32), t))  # A one column short
    save_predictors(copy / layout.PREDICTORS_NAME, layers, p.info, Storage(np.dtype(np.float32), None))
    for broken in ("mismatched", "missing"):
        with pytest.raises(MlxFlashError) as e:
            mlx_flash.load(copy, selection="predictor")
        assert "\n" not in str(e.value) and (
            "does not match" in str(e.value) if broken == "mismatched" else "missing" in str(e.value)
        )
        (copy / layout.PREDICTORS_NAME).unlink(missing_ok=True)


def test_predictor_selection_generates_and_is_planned(relu_trained):
    _, folder, _ = relu_trained
    model, tok = mlx_flash.load(folder, selection="predictor", context=128)
    rt = model.flash
    assert rt.selection == "predictor" and rt.plan.predictor_bytes == rt.predictors.nbytes
    assert rt.plan.selector_bytes == 0 and not rt.mask_inactive
    text = mlx_flash.generate(model, tok, TOKENIZER_TEXT[:80], max_tokens=8)
    assert isinstance(text, str) and mlx_flash.flash_stats(model).decode_tokens >= 7
    rt.close()


def test_default_selection_is_predictor_when_exact_selector_does_not_fit(relu_trained):
    _, folder, _ = relu_trained
    model, _ = mlx_flash.load(folder, context=128)
    assert model.flash.selection == "exact"  # no budget: the exact selector fits
    plan = model.flash.plan
    model.flash.close()
    pred, _ = mlx_flash.load(folder, context=128, selection="predictor")
    p = pred.flash.plan
    pred.flash.close()
    fixed = p.total_bytes - p.cache_bytes
    budget = fixed + (plan.selector_bytes - p.predictor_bytes) // 2  # room for predictors, not the selector
    model, _ = mlx_flash.load(folder, context=128, memory_budget=budget)
    assert model.flash.selection == "predictor" and model.flash.plan.cache_capacity >= 1
    model.flash.close()


def test_planner_counts_predictor_bytes():
    sizes = ModelSizes(
        dense_elems=1000,
        num_layers=2,
        num_neurons=100,
        hidden_size=10,
        num_parts=3,
        kv_elems_per_token=40,
        predictor_elems=500,
    )
    kw = dict(mode="flash", dtype_bytes=4, context=10)
    plan, sel = plan_with_selection(sizes, budget_bytes=None, selection=None, has_predictors=True, **kw)
    assert sel == "exact" and plan.predictor_bytes == 0 and plan.selector_bytes == 2 * 100 * 10 * 4
    plan, sel = plan_with_selection(
        sizes, budget_bytes=None, selection="predictor", has_predictors=True, **kw
    )
    assert sel == "predictor" and plan.predictor_bytes == 2000 and plan.selector_bytes == 0
    fixed = plan.total_bytes - plan.cache_bytes
    plan, sel = plan_with_selection(
        sizes, budget_bytes=fixed + 10 * 240, selection=None, has_predictors=True, **kw
    )
    assert sel == "predictor" and plan.cache_capacity == 10


# -- SwiGLU: thresholded activations ------------------------------------------------------------


@pytest.fixture(scope="module")
def silu_trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred_silu")
    src = make_tiny_model(root / "src", "llama", hidden_act="silu")
    convert(src, root / "flash", progress=False)
    text = root / "text.txt"
    text.write_text(TOKENIZER_TEXT)
    assert (
        cli(["train", "--model", str(root / "flash"), "--data", str(text), "--sparsity", "0.7", *FAST]) == 0
    )
    return src, root / "flash", text


def test_swiglu_thresholded_active_sets_and_sweep(silu_trained):
    _, folder, text = silu_trained
    info = Predictors.load(folder).info
    assert info["rule"] == "threshold" and info["sparsity"] == 0.7
    for r in info["layers"]:
        assert r["calibration_active_fraction"] == pytest.approx(0.3, abs=0.05)
        assert r["activation_threshold"] > 0
    r = evaluate(folder, text, tokens=64, seq_len=32, progress=False)
    curve = r["sparsity_curve"]
    assert [c["sparsity"] for c in curve] == sorted(c["sparsity"] for c in curve) and len(curve) >= 5
    assert all(c["perplexity"] > 1 for c in curve)
    assert all(l["active_fraction"] == pytest.approx(0.3, abs=0.1) for l in r["layers"])


def test_swiglu_predictor_output_does_not_depend_on_window(silu_trained):
    """Non-ReLU: cached neurons not predicted for this token are masked, so the model is the
    same sparse model whatever the window holds."""
    _, folder, _ = silu_trained
    tok = mlx_lm.utils.load_tokenizer(folder)
    outs = []
    for window in (1, 5):
        model, _ = mlx_flash.load(folder, selection="predictor", window=window, context=128)
        assert model.flash.mask_inactive
        outs.append(
            [
                (r.token, r.logprobs[r.token].item())
                for r in mlx_lm.stream_generate(model, tok, TOKENIZER_TEXT[:60], max_tokens=12)
            ]
        )
        model.flash.close()
    assert [t for t, _ in outs[0]] == [t for t, _ in outs[1]]
    assert np.allclose(
        [lp for _, lp in outs[0]], [lp for _, lp in outs[1]], atol=1e-4
    )  # unmasked: ~0.5 apart


@pytest.mark.parametrize(
    "model_type,over,rule",
    [("opt", {}, "relu"), ("phi", {}, "threshold"), ("llama", {"hidden_act": "drelu"}, "relu")],
)
def test_other_families_train_and_generate(model_type, over, rule, tmp_path):
    """OPT (ReLU, FFN biases) learns activation > 0; Phi (GELU) thresholded active sets; dReLU
    (relu on gate and up) the neurons where both fire, fewer than where the gate alone does."""
    src = make_tiny_model(tmp_path / "src", model_type, **over)
    folder = tmp_path / "flash"
    convert(src, folder, progress=False)
    text = tmp_path / "text.txt"
    text.write_text(TOKENIZER_TEXT)
    assert (
        cli(
            [
                "train",
                "--model",
                str(folder),
                "--data",
                str(text),
                "--tokens",
                "512",
                "--rank",
                "8",
                "--epochs",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    info = Predictors.load(folder).info
    assert info["rule"] == rule
    if over.get("hidden_act") == "drelu":  # random weights: half the gates fire, a quarter of both
        assert all(0.1 < r["calibration_active_fraction"] < 0.4 for r in info["layers"])
    model, tok = mlx_flash.load(folder, selection="predictor", context=128)
    assert model.flash.mask_inactive == (rule == "threshold")
    assert len(list(mlx_lm.stream_generate(model, tok, TOKENIZER_TEXT[:40], max_tokens=4))) == 4
    model.flash.close()
