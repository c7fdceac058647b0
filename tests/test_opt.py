"""OPT for MLX (mlx_flash.models.opt) against a numpy reference, its KV cache, mlx-lm's
generation, and (when torch is installed) Hugging Face's OPTForCausalLM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from tiny_models import make_tiny_model

from mlx_flash.models import get_model_classes, opt

ATOL = 1e-4


def load_weights(folder: Path) -> dict[str, mx.array]:
    return mx.load(str(folder / "model.safetensors"))


def build(folder: Path, weights: dict[str, mx.array] | None = None) -> opt.Model:
    config = json.loads((folder / "config.json").read_text())
    model = opt.Model(opt.ModelArgs.from_dict(config))
    weights = load_weights(folder) if weights is None else weights
    model.load_weights(list(model.sanitize(dict(weights)).items()), strict=True)
    mx.eval(model.parameters())
    return model


def tokens(n: int, seed: int = 1, batch: int = 1, vocab: int = 300) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, n))


def logits(model: opt.Model, toks: np.ndarray, cache=None) -> np.ndarray:
    out = model(mx.array(toks), cache=cache)
    return np.array(out.astype(mx.float32))


# ---- the numpy reference: OPT written out, in float64 ----------------------------------------


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


REF_ACTIVATIONS = {"relu": lambda x: np.maximum(x, 0), "gelu": _gelu, "gelu_new": _gelu_tanh}


def reference_logits(weights: dict[str, mx.array], config: dict, toks: np.ndarray) -> np.ndarray:
    w = {
        k.removeprefix("model."): np.array(v.astype(mx.float32), dtype=np.float64) for k, v in weights.items()
    }
    act = REF_ACTIVATIONS[config.get("activation_function", "relu")]
    heads = config["num_attention_heads"]

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w[f"{p}.weight"] + w[f"{p}.bias"]

    def lin(x, p):
        return x @ w[f"{p}.weight"].T + w[f"{p}.bias"]

    B, L = toks.shape
    x = w["decoder.embed_tokens.weight"][toks] + w["decoder.embed_positions.weight"][np.arange(L) + 2]
    causal = np.tril(np.ones((L, L), dtype=bool))
    for i in range(config["num_hidden_layers"]):
        p = f"decoder.layers.{i}"
        a = ln(x, f"{p}.self_attn_layer_norm")
        q, k, v = (
            lin(a, f"{p}.self_attn.{n}_proj").reshape(B, L, heads, -1).transpose(0, 2, 1, 3) for n in "qkv"
        )
        q = q * q.shape[-1] ** -0.5
        s = np.where(causal, q @ k.transpose(0, 1, 3, 2), -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(0, 2, 1, 3).reshape(B, L, -1)
        h = x + lin(o, f"{p}.self_attn.out_proj")
        x = h + lin(act(lin(ln(h, f"{p}.final_layer_norm"), f"{p}.fc1")), f"{p}.fc2")
    x = ln(x, "decoder.final_layer_norm")
    head = (
        w["lm_head.weight"]
        if "lm_head.weight" in w and not config["tie_word_embeddings"]
        else w["decoder.embed_tokens.weight"]
    )
    return x @ head.T


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("opt"), "opt", tokenizer=False)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("opt_tok"), "opt", tokenizer=True)


@pytest.fixture(scope="module")
def model(tiny) -> opt.Model:
    return build(tiny)


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ---- tests -------------------------------------------------------------------------------------


def test_logits_match_numpy_reference(tiny, model):
    toks = tokens(12, batch=2)
    out = logits(model, toks)
    assert out.shape == (2, 12, 300)
    np.testing.assert_allclose(
        out, reference_logits(load_weights(tiny), config_of(tiny), toks), atol=ATOL, rtol=1e-4
    )


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_gelu_variants_match_reference(tmp_path, act):
    folder = make_tiny_model(tmp_path, "opt", tokenizer=False, activation_function=act)
    m = build(folder)
    assert m.layers[0].mlp.activation == act
    toks = tokens(7)
    np.testing.assert_allclose(
        logits(m, toks), reference_logits(load_weights(folder), config_of(folder), toks), atol=ATOL, rtol=1e-4
    )


def test_untied_lm_head(tmp_path):
    folder = make_tiny_model(tmp_path, "opt", tokenizer=False, tie_word_embeddings=False)
    weights = load_weights(folder)
    weights["lm_head.weight"] = mx.array(
        np.random.default_rng(5).normal(0, 0.1, (300, 64)).astype(np.float32)
    )
    m = build(folder, weights)
    assert "lm_head.weight" in dict(tree_flatten(m.parameters()))
    toks = tokens(6)
    np.testing.assert_allclose(
        logits(m, toks), reference_logits(weights, config_of(folder), toks), atol=ATOL, rtol=1e-4
    )


def test_tied_checkpoint_with_lm_head_drops_it(tiny, model):
    weights = load_weights(tiny)
    weights["lm_head.weight"] = weights["model.decoder.embed_tokens.weight"]
    m = build(tiny, weights)  # strict: an extra lm_head.weight would fail
    assert "lm_head.weight" not in dict(tree_flatten(m.parameters()))
    toks = tokens(5)
    np.testing.assert_allclose(logits(m, toks), logits(model, toks), atol=1e-6)


def test_sanitize_names(tiny, model):
    weights = load_weights(tiny)
    sanitized = model.sanitize(dict(weights))
    params = dict(tree_flatten(model.parameters()))
    assert set(sanitized) == set(params)
    assert "model.decoder.layers.1.mlp.fc1.weight" in sanitized
    assert "model.decoder.layers.1.fc1.weight" not in sanitized
    assert "model.decoder.layers.0.self_attn.q_proj.bias" in sanitized
    # names without the "model." prefix (the original facebook/opt-* checkpoints)
    bare = {k.removeprefix("model."): v for k, v in weights.items()}
    assert set(model.sanitize(bare)) == set(params)
    # idempotent: the module's own names pass unchanged
    assert set(model.sanitize(dict(params))) == set(params)


def test_load_model_through_mlx_lm(tiny, model):
    from mlx_lm.utils import load_model

    loaded, _ = load_model(tiny, get_model_classes=get_model_classes)
    assert isinstance(loaded, opt.Model)
    toks = tokens(8)
    np.testing.assert_allclose(logits(loaded, toks), logits(model, toks), atol=1e-6)


def test_incremental_decoding_with_kv_cache(model):
    toks = tokens(11, seed=3)
    full = logits(model, toks)
    cache = make_prompt_cache(model)
    steps = [logits(model, toks[:, :5], cache)]
    for t in range(5, 11):
        steps.append(logits(model, toks[:, t : t + 1], cache))
    assert cache[0].offset == 11
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=ATOL, rtol=1e-4)


def test_input_embeddings_and_batch(model):
    toks = tokens(6, seed=4, batch=2)
    out = logits(model, toks)
    emb = model.model.decoder.embed_tokens(mx.array(toks))
    np.testing.assert_allclose(np.array(model(mx.array(toks), input_embeddings=emb)), out, atol=1e-6)
    for b in range(2):
        np.testing.assert_allclose(logits(model, toks[b : b + 1]), out[b : b + 1], atol=ATOL, rtol=1e-4)


def test_mlp_is_a_swappable_submodule(model):
    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.calls = 0

        def __call__(self, x):
            self.calls += 1
            return self.inner(x)

    toks = tokens(4, seed=6)
    expected = logits(model, toks)
    originals = [layer.mlp for layer in model.layers]
    try:
        for layer in model.layers:
            layer.mlp = Counting(layer.mlp)
        np.testing.assert_allclose(logits(model, toks), expected, atol=1e-6)
        assert [layer.mlp.calls for layer in model.layers] == [1, 1]
    finally:
        for layer, mlp in zip(model.layers, originals):
            layer.mlp = mlp


def test_too_many_positions_is_a_clear_error(model):
    with pytest.raises(ValueError, match="learned positions for 512 tokens"):
        model(mx.array(tokens(513)))


def test_greedy_generation_matches_full_recompute(model):
    from mlx_lm.generate import generate_step

    prompt = tokens(5, seed=7)[0]
    got = [int(t) for t, _ in zip((tok for tok, _ in generate_step(mx.array(prompt), model)), range(6))]
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(logits(model, np.array([seq]))[0, -1].argmax()))
    assert got == seq[5:]


def test_mlx_lm_generate(tiny_tok):
    from mlx_lm import generate, stream_generate
    from mlx_lm.utils import load_tokenizer

    m = build(tiny_tok)
    tokenizer = load_tokenizer(tiny_tok)
    text = generate(m, tokenizer, prompt="The quick brown fox", max_tokens=8)
    assert isinstance(text, str)
    responses = list(stream_generate(m, tokenizer, prompt="A flash of light", max_tokens=5))
    assert responses[-1].generation_tokens == 5


def test_mlx_lm_batch_generate_matches_one_by_one(tiny_tok):
    """A left-padded batch (BatchKVCache: per-sequence offsets) gives each prompt's own text."""
    from mlx_lm import batch_generate, generate
    from mlx_lm.utils import load_tokenizer

    m = build(tiny_tok)
    tokenizer = load_tokenizer(tiny_tok)
    prompts = [tokenizer.encode("The quick brown fox jumps"), tokenizer.encode("A flash")]
    batch = batch_generate(m, tokenizer, prompts, max_tokens=4).texts
    assert batch == [generate(m, tokenizer, p, max_tokens=4) for p in prompts]


@pytest.mark.parametrize(
    "over, match",
    [
        ({"do_layer_norm_before": False}, "do_layer_norm_before=false"),
        ({"word_embed_proj_dim": 32}, "word_embed_proj_dim=32"),
        ({"activation_function": "tanh"}, "activation 'tanh'"),
    ],
)
def test_unsupported_variants_are_clear_errors(over, match):
    from tiny_models import base_config

    with pytest.raises(ValueError, match=match):
        opt.ModelArgs.from_dict(base_config("opt", **over))


def test_model_args_ignore_unknown_keys():
    from tiny_models import base_config

    args = opt.ModelArgs.from_dict(
        {**base_config("opt"), "_name_or_path": "x", "dropout": 0.1, "torch_dtype": "float16"}
    )
    assert args.hidden_size == 64 and args.word_embed_proj_dim == 64


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_matches_transformers(tmp_path, act):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = make_tiny_model(tmp_path, "opt", tokenizer=False, activation_function=act)
    hf = transformers.OPTForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    toks = tokens(9, seed=8, batch=2)
    with torch.no_grad():
        expected = hf(torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(logits(build(folder), toks), expected, atol=ATOL, rtol=1e-4)
