"""Soak: 2,000 tokens with heavy window churn. The neuron caches keep their invariants (maps
consistent, used <= capacity, every used row equal to its neuron's data read straight from
flash) and memory does not grow (beyond the KV cache the tokens need)."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file, save_file
from tiny_models import make_tiny_model

import mlx_flash
from mlx_flash.convert import convert

TOKENS = 2000
CONTEXT = 2048
CHECK_EVERY = 250


def sparse_relu_opt(folder):
    """A tiny ReLU OPT whose fc1 biases are pushed down: about 10% of neurons fire per token,
    and which ones changes from token to token (the paper's regime, in miniature)."""
    src = make_tiny_model(
        folder, "opt", num_hidden_layers=2, ffn_dim=256, max_position_embeddings=CONTEXT + 64
    )
    f = src / "model.safetensors"
    w = load_file(str(f))
    for name in w:
        if name.endswith("fc1.bias"):
            w[name] = (w[name] - 1.3).astype(w[name].dtype)
    save_file(w, str(f))
    return src


def flash_rows(folder, manifest):
    """Every layer's neuron rows, per part, as stored (float32), read without the reader."""
    out = []
    cols = manifest.part_columns()
    for e in manifest.layers:
        (seg,) = e.segments
        data = np.fromfile(
            folder / e.file,
            dtype=np.float32,
            count=e.num_neurons * seg.row_bytes // 4,
            offset=seg.data_offset,
        )
        data = data.reshape(e.num_neurons, -1)
        out.append({p: data[:, c0:c1] for p, (c0, c1) in cols.items()})
    return out


def check_cache(cache, truth) -> None:
    used, ids = cache.used, cache.resident_ids()
    assert 0 < used <= cache.capacity and len(ids) == used
    assert len(np.unique(ids)) == used and ids.min() >= 0
    np.testing.assert_array_equal(cache.slots(ids), np.arange(used))  # slot <-> neuron maps agree
    window = set().union(*(set(h.tolist()) for h in cache._history))
    assert set(ids.tolist()) == window, "resident neurons are exactly the window's"
    assert 1 <= cache.effective_window <= cache.window
    for part, rows in truth.items():
        np.testing.assert_array_equal(cache.host_view(part), rows[ids])
        np.testing.assert_array_equal(np.array(cache.views()[part]), rows[ids])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_soak_2000_tokens_heavy_churn(tmp_path):
    src = sparse_relu_opt(tmp_path / "src")
    folder = tmp_path / "flash"
    convert(src, folder, progress=False)
    model, tok = mlx_flash.load(folder, context=CONTEXT)
    plan, n = model.flash.plan, model.flash.manifest.layers[0].num_neurons
    model.flash.close()
    capacity = 64  # a quarter of the neurons; a token needs about 26, a window of 2 about 45
    budget = plan.total_bytes - (n - capacity) * plan.neuron_bytes_all_layers
    model, tok = mlx_flash.load(folder, context=CONTEXT, window=2, memory_budget=budget)
    rt = model.flash
    assert rt.plan.cache_capacity == capacity
    caches = [layer.mlp.cache for layer in model.layers]
    truth = flash_rows(folder, rt.manifest)
    kv_per_token = rt.plan.kv_bytes // CONTEXT

    mx.random.seed(0)
    count, warm = 0, None
    vocab = model.args.vocab_size

    # the next token drawn uniformly (never end-of-text, id 0): inputs vary, so active sets do
    def sampler(logprobs):
        return mx.random.randint(1, vocab, logprobs.shape[:1])

    for _r in mlx_flash.stream_generate(model, tok, "The", max_tokens=TOKENS, sampler=sampler):
        count += 1
        if count % CHECK_EVERY == 0:
            for cache, t in zip(caches, truth):
                check_cache(cache, t)
        if count == CHECK_EVERY:
            mx.clear_cache()
            warm = (mx.get_active_memory(), rss_bytes(), count)
    assert count == TOKENS, "the generation stopped early (an end-of-text token?)"
    for cache, t in zip(caches, truth):
        check_cache(cache, t)

    stats = [c.stats for c in caches]
    assert all(s.tokens >= TOKENS for s in stats)
    assert all(s.evicted >= 5 * TOKENS and s.inserted >= 5 * TOKENS for s in stats), (
        "too little churn to mean anything"
    )
    assert any(s.moved for s in stats) and any(s.window_shrinks for s in stats)

    mx.clear_cache()
    active, rss = mx.get_active_memory(), rss_bytes()
    kv_growth = (TOKENS - warm[2] + 256) * kv_per_token  # mlx-lm grows its KV cache 256 tokens at a time
    assert active - warm[0] <= kv_growth + (1 << 20), (active, warm, kv_growth)
    assert rss - warm[1] <= 48 << 20, (rss, warm)
    rt.close()
