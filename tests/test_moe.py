"""Mixture-of-experts models from flash: routed experts streamed through the expert cache, exact."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from tiny_models import TOKENIZER_TEXT, make_moe_source, make_tiny_model, run_module

import mlx_flash
from mlx_flash import layout
from mlx_flash.budget import BudgetError
from mlx_flash.convert import convert
from mlx_flash.expert_policies import LRUPolicy
from mlx_flash.experts import ExpertChecksumError
from mlx_flash.model import load_dense
from mlx_flash.switch import expert_groups

PROMPT = TOKENIZER_TEXT[:120]
MAX_TOKENS = 10
CONTEXT = 128
FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]


def budget_for_slots(folder, slots: int) -> int:
    """A budget whose expert pools hold `slots` experts per layer."""
    _, rt = load(folder)
    plan = rt.plan
    rt.close()
    return plan.total_bytes - plan.cache_bytes + slots * plan.neuron_bytes_all_layers


def load(folder, **kw):
    model, _ = mlx_flash.load(folder, context=CONTEXT, **kw)
    return model, model.flash


def reference(src):
    dense = load_dense(src)
    tok = mlx_lm.utils.load_tokenizer(src)
    tokens = [r.token for r in mlx_lm.stream_generate(dense, tok, PROMPT, max_tokens=MAX_TOKENS)]
    x = mx.array(tok.encode(PROMPT))[None]
    return tokens, np.array(dense(x)), x


@pytest.fixture(scope="module", params=FAMILIES + ["qwen3_moe-4bit"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = make_moe_source(root / "src", request.param)
    convert(src, root / "flash", progress=False)
    return src, root / "flash", reference(src)


@pytest.mark.parametrize("slots", ["all", "half", "min"])
def test_moe_equals_mlx_lm(family, slots):
    src, flash, (ref_tokens, ref_logits, x) = family
    manifest = layout.read_manifest(flash)
    n = manifest.experts[0].num_experts
    k = json.loads((src / "config.json").read_text())["num_experts_per_tok"]
    want = {"all": n, "half": n // 2, "min": k}[slots]
    model, rt = load(flash, memory_budget=budget_for_slots(flash, want))
    try:
        assert rt.plan.cache_capacity == want
        tokens = [r.token for r in mlx_flash.stream_generate(model, _tok(src), PROMPT, max_tokens=MAX_TOKENS)]
        assert tokens == ref_tokens
        logits = np.array(model(x))
        if slots == "all":
            np.testing.assert_array_equal(logits, ref_logits)  # one call: the same gather_mm
        else:
            np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
        s = mlx_flash.flash_stats(model)
        ex = s.extra["experts"]
        assert ex["misses"] > 0 and ex["bytes_read"] > 0
        assert ex["hits"] + ex["misses"] == sum(v["hits"] + v["misses"] for v in ex["layers"].values())
        if slots != "all":  # a pool smaller than the layer: decoding reads experts from flash
            assert s.bytes_per_token > 0
    finally:
        rt.close()


def _tok(src):
    return mlx_lm.utils.load_tokenizer(src)


def test_moe_manifest_format(family):
    _, flash, _ = family
    m = layout.read_manifest(flash)
    assert m.format_version == layout.MOE_FORMAT_VERSION and m.is_moe and not m.layers
    for e in m.experts:
        assert e.expert_bytes % layout.EXPERT_ALIGNMENT == 0 and e.data_offset % layout.DATA_ALIGNMENT == 0
        assert len(e.checksums) == e.num_experts
        with open(flash / e.file, "rb") as f:
            f.seek(e.expert_offset(3))
            assert layout.expert_digest(f.read(e.expert_bytes)) == e.checksums[3]


def test_quantized_experts_stay_quantized(family):
    src, flash, _ = family
    m = layout.read_manifest(flash)
    quantized = "quantization" in json.loads((src / "config.json").read_text())
    assert all((e.bits == 4) == quantized for e in m.experts)
    assert any(f.dtype == "uint32" for f in m.experts[0].fields) == quantized


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    src = make_tiny_model(root / "src", "qwen3_moe")
    convert(src, root / "flash", progress=False)
    return src, root / "flash"


def test_load_converts_an_moe_model_folder_once(qwen, tmp_path, monkeypatch):
    """`mlx_flash.load(model folder)` converts an MoE folder into the cache, as a dense one."""
    src, _ = qwen
    monkeypatch.setenv("MLX_FLASH_CACHE", str(tmp_path / "cache"))
    ref, _, _ = reference(src)
    model, rt = load(src, memory_budget="55%")
    try:
        tokens = [r.token for r in mlx_flash.stream_generate(model, _tok(src), PROMPT, max_tokens=MAX_TOKENS)]
        assert tokens == ref
        assert mlx_flash.flash_stats(model).extra["experts"]["misses"] > 0
    finally:
        rt.close()
    (cached,) = [p for p in (tmp_path / "cache").iterdir() if layout.is_flash_folder(p)]
    assert (cached / layout.EXPERTS_DIR).is_dir()


def test_corrupt_expert_with_verify_is_a_checksum_error(qwen, tmp_path):
    import shutil

    _, flash = qwen
    bad = tmp_path / "bad"
    shutil.copytree(flash, bad)
    e = layout.read_manifest(bad).experts[0]
    with open(bad / e.file, "r+b") as f:  # every expert of the first MoE layer
        for x in range(e.num_experts):
            f.seek(e.expert_offset(x) + 8)
            f.write(b"\xff\xfe\xfd\xfc")
    model, rt = load(bad, verify=True)
    try:
        with pytest.raises(ExpertChecksumError, match="does not match its checksum"):
            mlx_flash.generate(model, _tok(qwen[0]), PROMPT, max_tokens=2)
    finally:
        rt.close()


def test_truncated_expert_shard_is_an_error_at_load(qwen, tmp_path):
    import shutil

    _, flash = qwen
    bad = tmp_path / "bad"
    shutil.copytree(flash, bad)
    e = layout.read_manifest(bad).experts[-1]
    with open(bad / e.file, "r+b") as f:
        f.truncate(e.expert_offset(e.num_experts - 1) + 100)
    with pytest.raises(layout.FlashFormatError, match="truncated"):
        load(bad)


def test_budget_below_k_experts_names_the_smallest(qwen):
    import re

    _, flash = qwen
    with pytest.raises(BudgetError, match="2 experts per layer") as e:
        load(flash, memory_budget=1000)
    smallest = int(re.search(r"memory_budget >= (\d+)", str(e.value)).group(1))
    with pytest.raises(BudgetError, match=f"memory_budget >= {smallest}"):
        load(flash, memory_budget=smallest - 1)
    _, rt = load(flash, memory_budget=smallest)
    assert rt.plan.cache_capacity == 2 and rt.plan.total_bytes <= smallest
    rt.close()


@pytest.mark.parametrize(
    "model_type, experts",
    [
        ("llama", {"num_local_experts": 4}),  # experts mlx-lm does not build as switch modules
        ("dbrx", {"ffn_config": {"moe_num_experts": 4, "moe_top_k": 2}}),  # mlx-lm's own DBRX experts
    ],
)
def test_unstreamable_moe_layout_names_the_architecture(tmp_path, model_type, experts):
    src = make_tiny_model(tmp_path / "src", "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type=model_type, **experts)
    (src / "config.json").write_text(json.dumps(cfg))
    r = run_module("convert", "--model", str(src), "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"'{model_type}'" in r.stderr and "experts" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_lru_never_evicts_a_slot_in_use():
    p = LRUPolicy(4)
    p.touch(np.array([0, 1, 2, 3]), 1)
    p.touch(np.array([0]), 2)
    protected = np.array([False, True, False, False])
    v = p.victims(2, protected, np.zeros(4, bool))
    assert list(v) == [2, 3]
    assert 1 not in p.victims(3, protected, np.zeros(4, bool))


def test_expert_groups_fit_the_pool_resident_first():
    needed = np.array([0, 2, 3, 5, 7])
    groups = expert_groups(needed, np.array([False, True, False, False, True]), 2)
    assert [g.tolist() for g in groups] == [[2, 7], [0, 3], [5]]
    assert [g.tolist() for g in expert_groups(needed, np.zeros(5, bool), 5)] == [needed.tolist()]


def test_prefill_split_for_a_small_pool_reads_each_expert_once(qwen):
    """A prompt needing more experts than the pool holds is computed in groups of experts:
    each layer reads each expert it needs at most once, and the logits stay mlx-lm's."""
    src, flash = qwen
    ref_tokens, ref_logits, x = reference(src)
    model, rt = load(flash, memory_budget=budget_for_slots(flash, 2))
    try:
        logits = np.array(model(x))  # one call per layer for the whole prompt
        for pool in rt.experts.pools:
            assert pool.stats.needed > pool.slots  # the call was split
            assert pool.stats.misses == pool.stats.needed <= pool.entry.num_experts
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    finally:
        rt.close()


def test_cli_convert_verify_generate(qwen, tmp_path):
    src, flash = qwen
    budget = str(budget_for_slots(flash, 3))
    out = tmp_path / "cli"
    r = run_module("convert", "--model", str(src), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "MoE layers x 8 experts" in r.stdout
    r = run_module("convert", "--verify", str(out), "--quiet")
    assert r.returncode == 0 and "MB of experts" in r.stdout, r.stderr
    r = run_module(
        "generate",
        "--model",
        str(out),
        "--prompt",
        "The quick",
        "--max-tokens",
        "4",
        "--memory-budget",
        budget,
        "--stats",
    )
    assert r.returncode == 0, r.stderr
    assert "experts:" in r.stdout + r.stderr


@pytest.mark.parametrize("model_type", FAMILIES)
def test_transformers_per_expert_source_converts_to_the_same_model(model_type, tmp_path):
    """A checkpoint with the experts as transformers saves them (per expert; gpt-oss fused and
    transposed) converts, through mlx-lm's sanitize, to the model of the stacked folder."""
    from tiny_models import write_transformers_experts

    stacked = make_tiny_model(tmp_path / "stacked", model_type)
    hf = write_transformers_experts(stacked, tmp_path / "hf")
    names = list(mx.load(str(hf / "model.safetensors")))
    assert not any("switch_mlp" in n for n in names)
    assert any((".experts.gate_up_proj" if model_type == "gpt_oss" else ".experts.7.") in n for n in names)
    convert(hf, tmp_path / "flash", progress=False)
    ref_tokens, ref_logits, x = reference(stacked)
    model, rt = load(tmp_path / "flash", memory_budget=budget_for_slots(tmp_path / "flash", 4))
    try:
        np.testing.assert_allclose(np.array(model(x)), ref_logits, rtol=1e-5, atol=1e-5)
        tokens = [
            r.token for r in mlx_flash.stream_generate(model, _tok(stacked), PROMPT, max_tokens=MAX_TOKENS)
        ]
        assert tokens == ref_tokens
    finally:
        rt.close()
