"""tools/make_synthetic_model.py: the tiny presets' FFN statistics are a real ReLU model's, the
folder is a Hugging Face model that mlx-lm and mlx_flash load, and the statistics the tool
prints are those of the model it wrote, run by MLX."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


import make_synthetic_model as msm  # noqa: E402 (tools/, on the path from conftest)

# The statistics a ReLU model like the paper's OPT-6.7B has (3% active; a predictor keeping
# 10% of neurons; a window of 5 tokens holds about 24% of them, 2.4% new per token), with room
# for a 4-layer model measured on 256 tokens.
RANGES = {
    "active": (0.02, 0.045),
    "overlap_prev": (0.10, 0.70),
    "window_union": (0.05, 0.16),
    "new_per_token": (0.005, 0.025),
    "predictor_recall": (0.85, 1.0),
    "predicted_window_union": (0.15, 0.36),
    "predicted_new_per_token": (0.01, 0.04),
}


@pytest.fixture(scope="module", params=["tiny", "tiny-llama"])
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / request.param
    mp = pytest.MonkeyPatch()
    mp.setattr(msm, "SHARD_BYTES", 1 << 20)  # several shards and an index, as a large model has
    try:
        card = msm.build(request.param, out, log=lambda *a: None)
    finally:
        mp.undo()
    return request.param, out, card


def test_statistics_in_range(built):
    name, out, card = built
    assert card == json.loads((out / "synthetic_model_card.json").read_text())
    for key, (lo, hi) in RANGES.items():
        assert lo <= card["mean"][key] <= hi, (key, card["mean"][key])
    for layer in card["per_layer"]:
        assert 0.015 <= layer["active"] <= 0.06, layer
    assert card["mean"]["hot_share"] > 0.05  # heavy-tailed firing rates: some neurons fire often


def test_hugging_face_folder(built):
    name, out, card = built
    config = json.loads((out / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    from safetensors import safe_open

    names = set()
    for s in shards:
        with safe_open(str(s), framework="numpy") as f:
            for k in f.keys():
                assert f.get_slice(k).get_dtype() == "F16"
                names.add(k)
    assert names == set(index["weight_map"]) and len(names) == len(msm.tensor_plan(msm.PRESETS[name]))
    assert config["model_type"] == ("opt" if name == "tiny" else "llama")
    assert (out / "tokenizer.json").is_file()


def _mlx_activations(folder: Path, tokens: np.ndarray) -> list[np.ndarray]:
    """Which FFN neurons fire, per layer, when mlx-lm runs the written model (float32)."""
    import mlx.nn as nn

    from mlx_flash.model import load_dense

    model = load_dense(folder)
    seen: list[np.ndarray] = []

    class Recorder(nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.inner = mlp

        def __call__(self, x):
            sel = self.inner.fc1 if hasattr(self.inner, "fc1") else self.inner.gate_proj
            seen.append(np.array(sel(x) > 0))
            return self.inner(x)

    for layer in model.layers:
        layer.mlp = Recorder(layer.mlp)
    mx.eval(model(mx.array(tokens)))
    return seen


def test_printed_statistics_are_the_written_models(built):
    """The tool measures with its own numpy forward while it builds; mlx-lm running the fp16
    files it wrote must see the same active neurons (up to the few near the threshold)."""
    name, out, card = built
    p = msm.PRESETS[name]
    _, ev_text = msm.text_split()
    tokens = msm.token_batches(out, ev_text, p.eval_seqs, p.seq_len)
    acts = _mlx_activations(out, tokens)
    assert len(acts) == p.layers
    for layer, a in enumerate(acts):
        st = msm.activation_stats(a)
        want = card["per_layer"][layer]
        assert abs(st["active"] - want["active"]) < 0.002, (layer, st["active"], want["active"])
        assert abs(st["new_per_token"] - want["new_per_token"]) < 0.002


def test_deterministic_from_seed(tmp_path):
    small = msm.Preset("opt", 64, 1, 2, 512, 512, 512, rank=8, calib_seqs=2, eval_seqs=1, seq_len=64)

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    a = msm.build(small, tmp_path / "a", seed=7, log=lambda *x: None)
    b = msm.build(small, tmp_path / "b", seed=7, log=lambda *x: None)
    msm.build(small, tmp_path / "c", seed=8, log=lambda *x: None)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert a["mean"] == b["mean"]


def test_cli_errors(tmp_path):
    import subprocess

    def run(*args):
        return subprocess.run(
            [sys.executable, str(ROOT / "tools" / "make_synthetic_model.py"), *args],
            capture_output=True,
            text=True,
        )

    r = run("--preset", "opt-175b", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown preset" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "exists").mkdir()
    r = run("--preset", "tiny", "--out", str(tmp_path / "exists"))
    assert r.returncode == 2 and "already exists" in r.stderr


# -- the mixture of experts ------------------------------------------------------------------------
# Qwen3-30B-A3B's published routing locality (45% repeat, 80% within 8 tokens, LRU over 40% of the
# experts 90-95%, the next layer's router 46-70%), with room for 4 layers measured on 510 tokens.
MOE_RANGES = {
    "repeat_prev": (0.35, 0.60),
    "within_8": (0.70, 0.93),
    "lru_40": (0.82, 0.99),
    "lookahead_recall": (0.20, 0.90),
}


@pytest.fixture(scope="module")
def built_moe(tiny_moe_preset):
    return tiny_moe_preset


def test_moe_routing_statistics_in_range(built_moe):
    out, card = built_moe
    assert card == json.loads((out / "synthetic_model_card.json").read_text())
    for key, (lo, hi) in MOE_RANGES.items():
        assert lo <= card["mean"][key] <= hi, (key, card["mean"][key])
    m = card["mean"]
    assert m["lru_25"] < m["lru_40"] < m["lru_50"] and m["repeat_prev"] < m["within_8"]
    # uniform routing would repeat k/E = 6% from the previous token: the locality is built in
    assert all(layer["repeat_prev"] > 0.25 for layer in card["per_layer"])


def test_moe_folder_is_an_mlx_community_4bit_folder(built_moe):
    """The names, shapes, dtypes and quantization config are mlx-lm's own: mlx-lm loads the folder
    strictly (every tensor present, none left over) as a quantized qwen3_moe."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    from mlx_lm.utils import load_model

    out, card = built_moe
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert config["model_type"] == "qwen3_moe" and (q["group_size"], q["bits"]) == (64, 4)
    assert q["model.layers.0.mlp.gate"]["bits"] == 8  # mlx-lm's predicate keeps routers at 8 bits
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = load_model(out)
    mlp = model.layers[0].mlp
    assert isinstance(mlp.switch_mlp.gate_proj, QuantizedSwitchLinear)
    assert isinstance(mlp.gate, nn.QuantizedLinear) and mlp.gate.bits == 8
    assert mlp.switch_mlp.down_proj.weight.shape == (128, 128, 64 * 4 // 32)
    assert card["bytes"] == sum(s.stat().st_size for s in out.glob("model*.safetensors")) - sum(
        8 + int.from_bytes(s.read_bytes()[:8], "little") for s in out.glob("model*.safetensors")
    )


def test_moe_routing_is_the_written_models(built_moe):
    """mlx-lm running the written 4-bit model (float32 activations) routes the evaluation text as
    the tool measured while it built it."""
    from mlx_lm.utils import load_model

    from mlx_flash.routing_stats import locality

    out, card = built_moe
    p = msm.PRESETS["tiny-moe"]
    _, ev_text = msm.text_split()
    tokens = msm.token_batches(out, ev_text, p.eval_seqs, p.seq_len)
    model, _ = load_model(out)
    model.set_dtype(mx.float32)
    seen = []

    class Recorder:
        def __init__(self, moe):
            self.moe = moe

        def __call__(self, x):
            gates = self.moe.gate(x)
            seen.append(np.array(mx.argpartition(gates, kth=-p.top_k, axis=-1)[..., -p.top_k :]))
            return self.moe(x)

    for layer in model.layers:
        layer.mlp = Recorder(layer.mlp)
    mx.eval(model(mx.array(tokens)))
    assert len(seen) == p.layers
    for layer, inds in enumerate(seen):
        got, want = locality(inds, p.experts), card["per_layer"][layer]
        for key in ("repeat_prev", "within_8", "lru_40"):
            assert abs(got[key] - want[key]) < 0.03, (layer, key, got[key], want[key])
