"""End to end: flash, hybrid and naive generation equal the dense model, for every family."""

from __future__ import annotations

import mlx_lm
import pytest
from mlx.utils import tree_flatten
from tiny_models import TOKENIZER_TEXT, make_tiny_model, run_module

import mlx_flash
from mlx_flash.budget import KV_STEP, BudgetError, parse_budget, plan_memory
from mlx_flash.convert import convert
from mlx_flash.model import load_dense

FAMILIES = [
    ("llama", {"hidden_act": "relu"}),  # ReluLLaMA-style, GQA
    ("llama", {"hidden_act": "drelu"}),  # dReLU (TurboSparse): relu on gate and up
    ("llama", {"hidden_act": "silu", "tie_word_embeddings": True, "num_key_value_heads": 4}),
    ("qwen2", {"hidden_act": "silu"}),
    ("qwen3", {"hidden_act": "relu"}),
    ("phi", {}),
    ("opt", {}),
]
PROMPT = TOKENIZER_TEXT[:160]  # about 40 tokens: longer than the window
MAX_TOKENS = 24


@pytest.fixture(
    scope="module", params=FAMILIES, ids=[f"{f[0]}-{f[1].get('hidden_act', 'default')}" for f in FAMILIES]
)
def family(request, tmp_path_factory):
    model_type, over = request.param
    root = tmp_path_factory.mktemp(model_type)
    src = make_tiny_model(root / "src", model_type, **over)
    convert(src, root / "flash", progress=False)
    dense = load_dense(src)
    tok = mlx_lm.utils.load_tokenizer(src)
    ref = greedy_tokens(dense, tok)
    return src, root / "flash", ref


def greedy_tokens(model, tok, generate=mlx_lm.stream_generate) -> list[int]:
    return [r.token for r in generate(model, tok, PROMPT, max_tokens=MAX_TOKENS)]


def budget_for_capacity(folder, fraction: float, context: int = 128) -> int:
    """A budget whose neuron caches hold `fraction` of each layer's neurons."""
    m, rt = load(folder, mode="flash", context=context)
    plan = rt.plan
    rt.close()
    n = m.flash.manifest.layers[0].num_neurons
    fixed = plan.total_bytes - plan.cache_bytes
    return fixed + int(fraction * n) * plan.neuron_bytes_all_layers


def load(folder, **kw):
    model, _ = mlx_flash.load(folder, **kw)
    return model, model.flash


def test_modes_equal_dense(family):
    src, folder, ref = family
    tok = mlx_lm.utils.load_tokenizer(folder)
    cases = [
        dict(mode="naive"),
        dict(mode="hybrid", memory_budget=budget_for_hybrid(folder)),
        dict(mode="flash", window=3),
        dict(mode="flash", window=3, lookahead=True),  # look-ahead reads: the guess only warms the cache
    ]
    names = None
    for kw in cases:
        model, _ = mlx_flash.load(folder, context=128, **kw)
        got = greedy_tokens(model, tok)
        assert got == ref, kw
        # the look-ahead's taps on the norms leave the parameters and their names as they are
        keys = [k for k, _ in tree_flatten(model.parameters())]
        assert names is None or keys == names, kw
        names = keys
        # the same model object through mlx-lm itself
        assert [r.token for r in mlx_lm.stream_generate(model, tok, PROMPT, max_tokens=MAX_TOKENS)] == ref
        stats = mlx_flash.flash_stats(model)
        model.flash.close()
    assert stats.decode_tokens >= MAX_TOKENS - 1


def budget_for_hybrid(folder) -> int:
    """Half of every layer's neurons resident, the rest read each token."""
    m, rt = load(folder, mode="hybrid", context=128)
    n = rt.manifest.layers[0].num_neurons
    plan = rt.plan
    rt.close()
    return plan.total_bytes - (n - n // 2) * plan.neuron_bytes_all_layers


def test_flash_under_a_tight_budget_evicts_and_stays_exact(tmp_path):
    """ReLU model, cache smaller than the window's union: the window shrinks, tokens do not change."""
    src = make_tiny_model(tmp_path / "src", "llama", hidden_act="relu", seed=3)
    folder = tmp_path / "flash"
    convert(src, folder, progress=False)
    tok = mlx_lm.utils.load_tokenizer(src)
    ref = greedy_tokens(load_dense(src), tok)
    budget = budget_for_capacity(folder, 0.8)
    model, rt = load(folder, mode="flash", window=4, memory_budget=budget, context=128)
    n = rt.manifest.layers[0].num_neurons
    assert rt.plan.cache_capacity == int(0.8 * n)
    assert greedy_tokens(model, tok) == ref
    s = mlx_flash.flash_stats(model)
    assert 0 < s.neurons_loaded_per_token and s.bytes_per_token > 0
    caches = [l.mlp.cache for l in model.layers]
    assert all(c.used <= c.capacity for c in caches)
    assert any(c.stats.window_shrinks for c in caches), "the budget should have forced the window to shrink"
    rt.close()


def test_kv_cache_holds_what_the_plan_counts(family):
    """A context of 300 tokens, filled by a prompt and then a token at a time: the KV caches
    hold exactly the plan's KV bytes (two steps of 150 tokens; mlx-lm's step would hold 512)."""
    import mlx.core as mx

    _, folder, _ = family
    model, rt = load(folder, mode="flash", context=300)
    try:
        cache = model.make_cache()
        logits = model(mx.array([list(range(1, 41))]), cache=cache)
        for t in range(300 - 40):
            logits = model(mx.array([[1 + t % 50]]), cache=cache)
        mx.eval(logits)
        held = sum(c.keys.nbytes + c.values.nbytes for c in cache)
        assert held == rt.plan.kv_bytes, (held, rt.plan.kv_bytes)
        assert all(c.keys.shape[2] == 300 for c in cache)
    finally:
        rt.close()


def test_lookahead_under_a_tight_budget_stays_exact_and_reports(tmp_path):
    """Look-ahead reads and compute overlapped with the reads, with a cache that evicts: the
    greedy tokens do not change, and the stats say what the look-ahead did."""
    src = make_tiny_model(tmp_path / "src", "opt", seed=5)
    folder = tmp_path / "flash"
    convert(src, folder, progress=False)
    tok = mlx_lm.utils.load_tokenizer(src)
    ref = greedy_tokens(load_dense(src), tok)
    budget = budget_for_capacity(folder, 0.5)
    model, rt = load(folder, mode="flash", window=4, memory_budget=budget, context=128, lookahead=True)
    assert rt.lookahead and rt.lookahead_tapped == len(model.layers)  # guesses from the residual stream
    assert greedy_tokens(model, tok) == ref
    # the hard cap: were every row read ahead and not yet used wasted, still under a quarter
    assert 0 < rt.lookahead_wasted_rows <= 0.25 * rt.lookahead_read_rows
    rt.overlap_min_elems = 0  # every layer computes on its cached rows while the rest is read
    assert greedy_tokens(model, tok) == ref
    s = mlx_flash.flash_stats(model)
    assert s.reader_busy_ms > 0 and s.io_ms >= 0 and s.bytes_per_token > 0
    # the FFN's wait, layer by layer, is all of it here (no vocabulary table on flash)
    assert not rt.vocab and len(s.io_ms_by_layer) == len(model.layers)
    assert abs(sum(s.io_ms_by_layer) - s.io_ms) <= 1e-9 * max(1.0, s.io_ms)
    assert 0 < s.lookahead_recall <= 1
    assert s.lookahead_wasted_fraction <= 0.25 + 1e-9  # the cap: waste under a quarter of what is read
    recs = [r for r in rt.records if not r.is_prefill]
    assert sum(r.lookahead_rows for r in recs) > 0 and "look-ahead recall" in s.format()
    rt.close()


def test_budget_planner_arithmetic():
    from mlx_flash.budget import ModelSizes

    sizes = ModelSizes(
        dense_elems=1000, num_layers=2, num_neurons=100, hidden_size=10, num_parts=3, kv_elems_per_token=40
    )
    assert (
        parse_budget("50%", 4000) == 2000 and parse_budget("2KB", 0) == 2048 and parse_budget(123, 0) == 123
    )
    assert parse_budget("1.5GB", 0) == int(1.5 * (1 << 30))
    for bad in ("lots", "-5", "0", "5 parsecs"):
        with pytest.raises(BudgetError):
            parse_budget(bad, 100)
    # fixed: dense 4000 B, kv 40*10*4 = 1600 B (10 tokens of context: the flash model's KV
    # cache grows by the context when it is shorter than mlx-lm's step of 256), stream 3 blocks
    # of 13 neurons*30*4 = 4680 B, selector 2*100*10*4 = 8000 B
    kv = 40 * 10 * 4
    plan = plan_memory(
        sizes, mode="flash", budget_bytes=4000 + kv + 4680 + 8000 + 50 * 240, dtype_bytes=4, context=10
    )
    assert (plan.dense_bytes, plan.kv_bytes, plan.stream_bytes, plan.selector_bytes) == (4000, kv, 4680, 8000)
    assert plan.cache_capacity == 50 and plan.total_bytes == plan.budget_bytes
    hybrid = plan_memory(
        sizes, mode="hybrid", budget_bytes=4000 + kv + 4680 + 30 * 240, dtype_bytes=4, context=10
    )
    assert hybrid.resident_neurons == 30 and hybrid.cache_capacity == 0
    assert (
        plan_memory(sizes, mode="naive", budget_bytes=10**6, dtype_bytes=4, context=257).kv_bytes
        == 40 * 258 * 4  # two steps of 129 tokens, where mlx-lm's step of 256 would hold 512
    )
    from mlx_lm.models.cache import KVCache

    assert KVCache.step == KV_STEP  # the planner's assumption about mlx-lm's KV cache
    with pytest.raises(BudgetError, match="at least 18.5 KB"):
        plan_memory(sizes, mode="flash", budget_bytes=1000, dtype_bytes=4, context=10)


def test_budget_planner_puts_vocabulary_tables_on_flash_and_shortens_the_context():
    """What does not fit goes, cheapest first: the embedding rows, a shorter context (down to
    one KV step), the lm_head streamed, then a shorter context still; an explicit context is
    kept; a budget below all of it names the smallest."""
    import re

    from mlx_flash.budget import KV_STEP, MIN_AUTO_CONTEXT, ModelSizes, VocabSizes

    sizes = ModelSizes(
        dense_elems=100_000, num_layers=2, num_neurons=100, hidden_size=10, num_parts=3, kv_elems_per_token=40
    )
    vocab = VocabSizes(embed_bytes=150_000, head_bytes=150_000, head_stream_bytes=6_000)

    def plan(budget, **kw):
        kw.setdefault("auto_context", True)
        return plan_memory(
            sizes, mode="flash", budget_bytes=budget, dtype_bytes=4, context=2048, vocab=vocab, **kw
        )

    full = plan(None)
    assert not (full.embed_on_flash or full.head_on_flash) and full.context == 2048
    # fixed apart from the KV cache: dense 400 KB + stream 4680 + selector 8000; one slot 240 B
    rest, kv = 400_000 + 4680 + 8000 + 240, 160 * 2048
    p = plan(rest + kv)  # holds it all at one slot: nothing moves
    assert not p.embed_on_flash and p.cache_capacity == 1 and p.context == 2048
    p = plan(rest + kv - 1)
    assert p.embed_on_flash and not p.head_on_flash and p.context == 2048
    p = plan(rest - 150_000 + 160 * 300)  # room for 300 tokens: the context shrinks first
    assert p.embed_on_flash and not p.head_on_flash and p.context == KV_STEP
    assert p.total_bytes <= p.budget_bytes
    p = plan(rest - 294_000 + kv)  # shortening to 1024 tokens beats streaming the head
    assert not p.head_on_flash and p.context == 1024
    p = plan(rest - 294_000 + kv, auto_context=False)  # the context asked for: the head streams
    assert p.head_on_flash and p.context == 2048 and p.vocab_stream_bytes == 6000
    p = plan(rest - 294_000 + 160 * 100)
    assert p.head_on_flash and p.context == 100 and p.total_bytes <= p.budget_bytes
    with pytest.raises(BudgetError, match="2048 tokens"):
        plan(rest - 294_000 + 160 * 100, auto_context=False)
    with pytest.raises(BudgetError) as e:
        plan(rest - 294_000 + 160 * (MIN_AUTO_CONTEXT - 1))
    smallest = int(re.search(r"memory_budget >= (\d+)", str(e.value)).group(1))
    assert smallest == rest - 294_000 + 160 * MIN_AUTO_CONTEXT
    assert plan(smallest).context == MIN_AUTO_CONTEXT


def test_generate_cli(family):
    src, folder, _ = family
    r = run_module(
        "generate",
        "--model",
        str(folder),
        "--prompt",
        "The quick",
        "--max-tokens",
        "5",
        "--stats",
        "--window",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert "per token:" in r.stdout and "I/O wait" in r.stdout and "memory plan" in r.stderr


def test_generate_cli_errors(tmp_path):
    def one_line(r):
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1, r.stderr
        return lines[0]

    assert "no such folder" in one_line(run_module("generate", "--model", str(tmp_path / "missing")))
    bad = make_tiny_model(tmp_path / "bad", "llama", tokenizer=False)
    (bad / "config.json").write_text('{"model_type": "rwkv"}')
    assert "rwkv" in one_line(run_module("generate", "--model", str(bad)))
    src = make_tiny_model(tmp_path / "src", "llama")
    convert(src, tmp_path / "flash", progress=False)
    assert "too small" in one_line(
        run_module("generate", "--model", str(tmp_path / "flash"), "--memory-budget", "10KB")
    )


def test_chat_cli(family):
    src, folder, _ = family
    chat = ("chat", "--model", folder, "--max-tokens", 4)
    r = run_module(*chat, input="hello there\n/stats\nmore\n/reset\n/nonsense\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "decode:" in r.stdout and "(conversation cleared)" in r.stdout and "commands:" in r.stdout
    # a turn past the context is refused with a note; /reset and the next turn work
    r = run_module(
        *chat, "--context", 24, input="hello there\n" + "and more words " * 6 + "\n/reset\nhi\n/quit\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("(the conversation is full") == 1 and "(conversation cleared)" in r.stdout, r.stdout


def test_convert_activation_override_writes_config(tmp_path):
    """convert --activation drelu: the manifest and the flash folder's config.json say drelu, and
    the flash model computes relu on gate and up: it differs from the relu model it came from."""
    src = make_tiny_model(tmp_path / "src", "llama", hidden_act="relu", seed=5)
    r = run_module(
        "convert", "--model", str(src), "--out", str(tmp_path / "f"), "--activation", "drelu", "--quiet"
    )
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads((tmp_path / "f" / "config.json").read_text())["hidden_act"] == "drelu"
    from mlx_flash.layout import read_manifest

    assert read_manifest(tmp_path / "f").activation == "drelu"
    tok = mlx_lm.utils.load_tokenizer(src)
    model, _ = mlx_flash.load(tmp_path / "f", context=128)
    drelu_tokens = greedy_tokens(model, tok)
    model.flash.close()
    (src / "config.json").write_text((src / "config.json").read_text().replace('"relu"', '"drelu"'))
    assert drelu_tokens == greedy_tokens(load_dense(src), tok)
