"""Models whose vocabulary dominates (tiny-random checkpoints): "55%" fits by leaving the token
embedding table and the lm_head on flash and by reserving the KV cache for a shorter context;
the output stays mlx-lm's."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_models import TOKENIZER_TEXT, make_mlx_quantized_model, make_tiny_model

import mlx_flash
from mlx_flash.budget import BudgetError, kv_tokens
from mlx_flash.convert import convert
from mlx_flash.model import load_dense
from mlx_flash.vocab import FlashEmbedding, FlashHead

PROMPT = TOKENIZER_TEXT[:60]
MAX_TOKENS = 8
BIG_VOCAB = dict(vocab_size=4096, max_position_embeddings=2048)  # embeddings most of the bytes

CASES = {
    "qwen3_moe": ("qwen3_moe", {}),
    "mixtral-tied": ("mixtral", {"tie_word_embeddings": True}),
    "deepseek_v3": ("deepseek_v3", {}),
    "llama-dense": ("llama", {"hidden_act": "silu"}),
    "qwen3_moe-4bit-g64": ("qwen3_moe", {"bits": 4, "group_size": 64, "moe_intermediate_size": 64}),
    "qwen3_moe-8bit-g128": (
        "qwen3_moe",
        {"bits": 8, "group_size": 128, "hidden_size": 128, "moe_intermediate_size": 128},
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model_type, over = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    over = dict(over)
    if "bits" in over:
        bits, group = over.pop("bits"), over.pop("group_size")
        src = make_mlx_quantized_model(
            root / "src", model_type, bits=bits, group_size=group, **BIG_VOCAB, **over
        )
    else:
        src = make_tiny_model(root / "src", model_type, **BIG_VOCAB, **over)
    convert(src, root / "flash", progress=False)
    dense = load_dense(src)
    tok = mlx_lm.utils.load_tokenizer(src)
    tokens = [r.token for r in mlx_lm.stream_generate(dense, tok, PROMPT, max_tokens=MAX_TOKENS)]
    x = mx.array(tok.encode(PROMPT))[None]
    return src, root / "flash", tokens, np.array(dense(x)), x, tok


def resident_bytes(model) -> int:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def check(model, tok, ref_tokens, ref_logits, x):
    rt = model.flash
    plan = rt.plan
    assert plan.total_bytes <= plan.budget_bytes
    assert resident_bytes(model) <= plan.dense_bytes  # the tables on flash are not in memory
    tokens = [r.token for r in mlx_flash.stream_generate(model, tok, PROMPT, max_tokens=MAX_TOKENS)]
    assert tokens == ref_tokens
    decode = [r for r in rt.records if not r.is_prefill]
    assert sum(r.bytes_read for r in decode) > 0  # rows (and experts) read while decoding
    np.testing.assert_allclose(np.array(model(x)), ref_logits, rtol=1e-4, atol=1e-4)
    return decode


def test_55_percent_fits_and_equals_mlx_lm(case):
    src, flash, ref_tokens, ref_logits, x, tok = case
    model, tok = mlx_flash.load(flash, memory_budget="55%")
    try:
        plan = model.flash.plan
        assert plan.dense_bytes + plan.vocab_flash_bytes > plan.budget_bytes / 2  # vocabulary-heavy
        assert plan.embed_on_flash
        assert isinstance(model.model.embed_tokens, FlashEmbedding)
        decode = check(model, tok, ref_tokens, ref_logits, x)
        experts = getattr(model.flash, "experts", None)
        if experts is not None and plan.cache_capacity < experts.entries[0].num_experts:
            assert sum(r.neurons_loaded for r in decode) > 0  # experts read from flash while decoding
    finally:
        model.flash.close()


def test_smallest_budget_streams_the_head_and_stays_exact(case):
    """At the smallest budget the error names, the lm_head (or the tied table) streams from
    flash in blocks, the context is the shortest the planner reserves, and nothing changes."""
    src, flash, ref_tokens, ref_logits, x, tok = case
    with pytest.raises(BudgetError) as e:
        mlx_flash.load(flash, memory_budget=1000)
    assert len(str(e.value).splitlines()) == 1
    smallest = int(re.search(r"memory_budget >= (\d+)", str(e.value)).group(1))
    with pytest.raises(BudgetError):
        mlx_flash.load(flash, memory_budget=smallest - 1)
    model, tok = mlx_flash.load(flash, memory_budget=smallest)
    try:
        plan = model.flash.plan
        assert plan.embed_on_flash and plan.head_on_flash
        assert plan.context >= len(x[0]) + MAX_TOKENS
        head = model.get("lm_head")
        assert isinstance(head, FlashHead) or isinstance(model.model.embed_tokens, FlashEmbedding)
        check(model, tok, ref_tokens, ref_logits, x)
        cache = model.make_cache()  # the KV cache reserves what the plan counts
        assert all(c.step <= kv_tokens(plan.context) for c in cache if hasattr(c, "step"))
    finally:
        model.flash.close()
