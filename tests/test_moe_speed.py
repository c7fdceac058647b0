"""MoE decode speed-ups stay exact: overlap (resident experts computed while the missing ones are
read), look-ahead (the next layer's router names experts read ahead), the eviction policies and
the naive baseline all give mlx-lm's greedy tokens; the look-ahead's reads are not calls."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import pytest
from tiny_models import TOKENIZER_TEXT, make_moe_source

import mlx_flash
from mlx_flash import layout
from mlx_flash.convert import convert
from mlx_flash.model import load_dense

PROMPT = TOKENIZER_TEXT[:120]
MAX_TOKENS = 12
CONTEXT = 128


@pytest.fixture(scope="module", params=["qwen3_moe-4bit", "mixtral", "gpt_oss"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = make_moe_source(root / "src", request.param)
    convert(src, root / "flash", progress=False)
    tok = mlx_lm.utils.load_tokenizer(src)
    ref = [r.token for r in mlx_lm.stream_generate(load_dense(src), tok, PROMPT, max_tokens=MAX_TOKENS)]
    _, rt = _load(root / "flash")
    plan = rt.plan
    rt.close()
    return root / "flash", tok, ref, plan


def _load(folder, slots=None, plan=None, **kw):
    budget = (
        None if slots is None else plan.total_bytes - plan.cache_bytes + slots * plan.neuron_bytes_all_layers
    )
    model, _ = mlx_flash.load(folder, context=CONTEXT, memory_budget=budget, **kw)
    return model, model.flash


def _generate(model, tok):
    return [r.token for r in mlx_flash.stream_generate(model, tok, PROMPT, max_tokens=MAX_TOKENS)]


@pytest.mark.parametrize(
    "kw",
    [
        {"overlap": False},
        {},
        {"lookahead": True},
        {"lookahead": True, "expert_policy": "lfu"},
        {"lookahead": True, "expert_policy": "pinned"},
        {"expert_policy": "naive"},
    ],
    ids=["cache", "overlap", "lookahead", "lookahead-lfu", "lookahead-pinned", "naive"],
)
def test_decode_paths_give_mlx_lm_tokens(family, kw):
    folder, tok, ref, plan = family
    n = layout.read_manifest(folder).experts[0].num_experts
    model, rt = _load(folder, max(2, n // 2), plan, **kw)
    try:
        assert _generate(model, tok) == ref
        ex = mlx_flash.flash_stats(model).extra["experts"]
        assert ex["policy"] == kw.get("expert_policy", "lru")
        if kw.get("expert_policy") == "naive":
            assert ex["hits"] == 0 and ex["misses"] > 0
        if not kw.get("lookahead"):
            assert ex["ahead_reads"] == 0
    finally:
        rt.close()


def test_lookahead_reads_are_not_calls_and_report_guesses(family):
    """With half the experts cached, the look-ahead reads guessed experts (some used, counted as
    the guess's hits), the layers see as many calls as without it, and recall / guess hit rate
    are in every stats surface."""
    folder, tok, ref, plan = family
    n = layout.read_manifest(folder).experts[0].num_experts
    runs = {}
    for la in (False, True):
        model, rt = _load(folder, max(2, n // 2), plan, lookahead=la)
        try:
            assert _generate(model, tok) == ref
            s = mlx_flash.flash_stats(model)
            runs[la] = (s, [st.calls for _, st in rt.experts.layer_stats()])
        finally:
            rt.close()
    (_, calls), (s, calls_la) = runs[False], runs[True]
    assert calls == calls_la
    ex = s.extra["experts"]
    assert ex["ahead_reads"] > 0 and 0 <= ex["ahead_hits"] <= ex["ahead_reads"]
    assert ex["guess_hit_rate"] == ex["ahead_hits"] / ex["ahead_reads"]
    assert 0.0 <= s.lookahead_recall <= 1.0
    assert s.to_json()["lookahead_recall"] == s.lookahead_recall


def test_naive_reads_every_routed_expert(family):
    """The naive baseline reads each decoded token's experts in every layer: far more bytes
    than the LRU cache holding half the experts."""
    folder, tok, ref, plan = family
    n = layout.read_manifest(folder).experts[0].num_experts
    got = {}
    for policy in ("naive", "lru"):
        model, rt = _load(folder, max(2, n // 2), plan, expert_policy=policy)
        try:
            assert _generate(model, tok) == ref
            got[policy] = mlx_flash.flash_stats(model)
        finally:
            rt.close()
    naive = got["naive"].extra["experts"]
    assert naive["misses"] == naive["hits"] + naive["misses"]
    assert got["naive"].bytes_per_token > got["lru"].bytes_per_token


def test_unknown_policy_is_one_line(family):
    folder, *_ = family
    with pytest.raises(mlx_flash.MlxFlashError, match="unknown expert policy 'mru'"):
        _load(folder, expert_policy="mru")


def test_lookahead_guesses_from_the_residual_stream(tiny_moe_preset, monkeypatch):
    """On the tiny-moe preset (its routing has real models' locality across tokens), the next
    layer's router on the guessed residual stream (this layer's, plus what the last token added
    between the two layers) names the experts read ahead far better than on this layer's input
    renormalised; the tokens are the same either way."""
    import mlx_flash.moe_model as moe_model

    folder, _ = tiny_moe_preset
    got = {}
    for how in ("residual", "input"):
        if how == "input":  # no taps: every guess falls back to the renormalised input
            monkeypatch.setattr(moe_model, "tap_residuals", lambda model, path: None)
        model, tok = mlx_flash.load(folder, memory_budget="50%", context=CONTEXT, lookahead=True)
        try:
            toks = _generate(model, tok)
            assert all(s.residuals is not None for s in model.flash.switches) == (how == "residual")
            got[how] = toks, mlx_flash.flash_stats(model).extra["experts"]["guess_hit_rate"]
        finally:
            model.flash.close()
    assert got["residual"][0] == got["input"][0]
    assert got["residual"][1] > got["input"][1] + 0.2, got  # 0.79 against 0.40 when written


def test_lookahead_guesses_the_first_layer_too(tiny_moe_preset):
    """The first MoE layer, which no layer before it guesses, reads its experts ahead when a
    decoded token enters its decoder layer (its router on the token's input plus what the last
    token's attention added), and some of them are used; the tokens are mlx-lm's."""
    folder, _ = tiny_moe_preset
    runs = {}
    for la in (False, True):
        model, tok = mlx_flash.load(folder, memory_budget="50%", context=CONTEXT, lookahead=la)
        try:
            runs[la] = _generate(model, tok), model.flash.experts.layer_stats()
        finally:
            model.flash.close()
    assert runs[True][0] == runs[False][0]
    (_, first), (_, plain) = runs[True][1][0], runs[False][1][0]
    assert first.ahead_reads > 0 and first.ahead_hits > 0, first
    assert plain.ahead_reads == 0


def test_lookahead_takes_bfloat16_guesses(family):
    """On a GPU a bfloat16 folder computes in bfloat16, so the routers' guesses are bfloat16
    (numpy has no such type): a layer reads ahead from them as from float32 ones."""
    folder, tok, ref, plan = family
    n = layout.read_manifest(folder).experts[0].num_experts
    model, rt = _load(folder, max(2, n // 2), plan, lookahead=True)
    try:
        switch = rt.switches[-1]
        scores = mx.arange(n, dtype=mx.float32)  # the last experts score best
        rt.lookahead_read_rows = 8  # room for the cap: two experts
        switch.prefetch(scores.astype(mx.bfloat16), 2)
        ahead = rt.experts.layer_stats()[-1][1].ahead_reads
        assert ahead >= 1
        rt.experts.finish_ahead()
    finally:
        rt.close()
