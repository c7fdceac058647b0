"""Quantized neuron bundles (convert --quantize 4|8): the format against mx.quantize, the
reader's raw fields, generation equal to mlx-lm running the same quantized weights in every
mode, mlx-community (already quantized) sources, and the errors."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx.nn
import mlx_lm
import numpy as np
import pytest
from tiny_models import TOKENIZER_TEXT, make_mlx_quantized_model, make_tiny_model, run_module

import mlx_flash
from mlx_flash import layout
from mlx_flash.convert import ConvertError, convert, verify
from mlx_flash.model import load_dense
from mlx_flash.reader import FlashReader
from mlx_flash.runtime import FlashChecksumError
from mlx_flash.safetensors_file import read_header, read_tensor

PROMPT = TOKENIZER_TEXT[:160]
MAX_TOKENS = 16
NAMES = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def source_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        header, _ = read_header(f)
        out.update({name: read_tensor(f, info) for name, info in header.items()})
    return out


def to_mx(raw: np.ndarray) -> mx.array:
    return mx.array(raw.view(np.uint16)).view(mx.bfloat16) if raw.dtype == np.uint16 else mx.array(raw)


def stored_fields(folder, m, entry, ids):
    """{part.field: rows} read with os.pread at the manifest's byte offsets only."""
    out = {}
    fd = os.open(folder / entry.file, os.O_RDONLY)
    try:
        for seg in entry.segments:
            rows = np.stack(
                [np.frombuffer(os.pread(fd, seg.row_bytes, seg.row_offset(i)), np.uint8) for i in ids]
            )
            for c in m.columns(seg):
                dtype = {
                    "uint32": np.uint32,
                    "float16": np.float16,
                    "bfloat16": np.uint16,
                    "float32": np.float32,
                }[c.dtype]
                out[c.key] = np.ascontiguousarray(rows[:, c.start : c.stop]).view(dtype)
    finally:
        os.close(fd)
    return out


def as_np(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


@pytest.mark.parametrize("bundle", [True, False], ids=["bundled", "unbundled"])
@pytest.mark.parametrize(
    "src_dtype,bits,group_size,dense_bits",
    [("float32", 4, 64, 8), ("bfloat16", 8, 32, 4), ("float16", 4, 128, None)],
)
def test_round_trip_against_mx_quantize(tmp_path, src_dtype, bits, group_size, dense_bits, bundle):
    d = 128 if group_size == 128 else 64
    src = make_tiny_model(tmp_path / "src", "llama", dtype=src_dtype, tokenizer=False, hidden_size=d)
    out = tmp_path / "flash"
    m = convert(
        src, out, quantize=bits, group_size=group_size, bundle=bundle, dense_bits=dense_bits, progress=False
    )
    assert m == layout.read_manifest(out) and m.format_version == layout.QUANTIZED_FORMAT_VERSION
    assert (m.quantization.bits, m.quantization.group_size, m.dtype) == (bits, group_size, src_dtype)
    dense = f"quantized ({dense_bits}-bit)" if dense_bits else src_dtype
    assert m.quantization.origin == {
        "gate": "quantized",
        "up": "quantized",
        "down": "quantized",
        "dense": dense,
    }
    assert m.layers[0].bundle_bytes == 3 * (
        d * bits // 8 + 2 * (d // group_size) * layout.DTYPE_BYTES[src_dtype]
    )
    raw = source_tensors(src)
    rng = np.random.default_rng(0)
    n = m.layers[0].num_neurons
    ids = np.concatenate([[0, n - 1], rng.choice(n, 12, replace=False)])
    with FlashReader(out, m) as reader:
        for e in m.layers:
            got = stored_fields(out, m, e, ids)
            fields = reader.read(e.layer, ids, raw=True)
            rows = reader.read(e.layer, ids)
            for part, name in NAMES.items():
                w = raw[f"model.layers.{e.layer}.{name}.weight"]
                w = (
                    w.T if part == "down" else w
                )  # the down projection: neuron i's column, quantized along hidden
                want = mx.quantize(to_mx(np.ascontiguousarray(w[ids])), group_size=group_size, bits=bits)
                for field, a in zip(layout.QUANT_FIELDS, want):
                    assert np.array_equal(got[f"{part}.{field}"], as_np(a)), (e.layer, part, field)
                    assert np.array_equal(
                        fields[f"{part}.{field}"], np.array(a.astype(mx.float32) if field != "weight" else a)
                    )
                deq = mx.dequantize(
                    *(x.astype(mx.float32) if x.dtype != mx.uint32 else x for x in want),
                    group_size=group_size,
                    bits=bits,
                )
                np.testing.assert_allclose(rows[part], np.array(deq), rtol=1e-6, atol=1e-6)
    # the dense part, quantized as mlx-lm quantizes it (with dense_bits); config.json says so
    dense_header, _ = read_header(out / m.dense_file)
    q = dense_header["model.layers.1.self_attn.q_proj.weight"]
    cfg = json.loads((out / "config.json").read_text())
    assert dense_header["model.norm.weight"].shape == (d,)
    if dense_bits is None:
        assert q.shape == (d, d) and "quantization" not in cfg
    else:
        assert q.dtype == "U32" and q.shape == (d, d * dense_bits // 32)
        want = mx.quantize(
            to_mx(raw["model.layers.1.self_attn.q_proj.weight"]), group_size=group_size, bits=dense_bits
        )
        assert np.array_equal(
            read_tensor(out / m.dense_file, dense_header["model.layers.1.self_attn.q_proj.scales"]),
            as_np(want[1]),
        )
        assert cfg["quantization"] == {"group_size": group_size, "bits": dense_bits, "mode": "affine"}
    verify(out, progress=False)


def test_format_versions(tmp_path, monkeypatch):
    """Float folders stay version 1; quantized ones are version 2, which a version-1 reader
    (FORMAT_VERSION = 1) refuses, and whose fields must be MLX's layout."""
    src = make_tiny_model(tmp_path / "src", "llama", tokenizer=False)
    assert convert(src, tmp_path / "f", progress=False).format_version == 1
    m = convert(src, tmp_path / "q", quantize=4, progress=False)
    assert "quantization" not in layout.read_manifest(tmp_path / "f").to_json()
    assert m.bundle_elems == 3 * 64 and m.storage_st_dtype == "U8"
    doc = json.loads(layout.manifest_path(tmp_path / "q").read_text())
    assert doc["parts"][0]["fields"][1] == {"name": "scales", "dtype": "float32", "elems": 1, "offset": 32}
    monkeypatch.setattr(layout, "FORMAT_VERSION", 1)
    with pytest.raises(layout.FlashFormatError, match="newer than this mlx_flash reads"):
        layout.read_manifest(tmp_path / "q")
    monkeypatch.undo()
    for mutate in (
        lambda d: d.update(format_version=1),
        lambda d: d["parts"][1]["fields"][0].update(offset=4),
        lambda d: d["quantization"].update(bits=3),
    ):
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        with pytest.raises(layout.FlashFormatError):
            layout.Manifest.from_json(bad)


REFERENCE_CASES = [  # (model_type, bits, group size, dense bits, config)
    ("llama", 4, 64, 8, {"hidden_act": "relu"}),
    ("qwen3", 8, 32, 8, {"hidden_act": "silu"}),
    ("phi", 4, 32, 4, {}),
    ("opt", 8, 64, None, {}),
]


def greedy(model, tok, generate=mlx_lm.stream_generate):
    return [r.token for r in generate(model, tok, PROMPT, max_tokens=MAX_TOKENS)]


def hybrid_budget(folder) -> int:
    model, _ = mlx_flash.load(folder, mode="hybrid", context=128)
    plan, n = model.flash.plan, model.flash.manifest.layers[0].num_neurons
    model.flash.close()
    return plan.total_bytes - (n - n // 2) * plan.neuron_bytes_all_layers


def assert_modes_equal(folder, tok, ref):
    for kw in (
        dict(mode="naive"),
        dict(mode="hybrid", memory_budget=hybrid_budget(folder)),
        dict(mode="flash", window=3),
    ):
        model, _ = mlx_flash.load(folder, context=128, **kw)
        try:
            assert greedy(model, tok, mlx_flash.stream_generate) == ref, kw
            if kw["mode"] == "hybrid":
                assert 0 < model.flash.plan.resident_neurons < model.flash.manifest.layers[0].num_neurons
        finally:
            model.flash.close()


@pytest.mark.parametrize(
    "model_type,bits,group_size,dense_bits,over",
    REFERENCE_CASES,
    ids=[f"{c[0]}-{c[1]}bit-dense{c[3]}" for c in REFERENCE_CASES],
)
def test_modes_equal_mlx_lm_on_the_same_quantized_weights(
    tmp_path, model_type, bits, group_size, dense_bits, over
):
    src = make_tiny_model(tmp_path / "src", model_type, **over)
    folder = tmp_path / "flash"
    convert(src, folder, quantize=bits, group_size=group_size, dense_bits=dense_bits, progress=False)
    tok = mlx_lm.utils.load_tokenizer(src)
    ref_model = load_dense(src, quantize=bits, group_size=group_size, dense_bits=dense_bits)
    assert isinstance(
        ref_model.layers[0].mlp.up_proj if model_type not in ("phi", "opt") else ref_model.layers[0].mlp.fc1,
        mlx.nn.QuantizedLinear,
    )
    ref = greedy(ref_model, tok)
    assert_modes_equal(folder, tok, ref)


def test_flash_tight_budget_evicts_quantized_rows(tmp_path):
    """The cache's uint32 and float buffers move and refill rows together: exact under eviction."""
    src = make_tiny_model(tmp_path / "src", "llama", hidden_act="relu", seed=3)
    folder = tmp_path / "flash"
    convert(src, folder, quantize=4, progress=False)
    tok = mlx_lm.utils.load_tokenizer(src)
    ref = greedy(load_dense(src, quantize=4), tok)
    model, _ = mlx_flash.load(folder, mode="flash", context=128)
    plan, n = model.flash.plan, model.flash.manifest.layers[0].num_neurons
    model.flash.close()
    budget = plan.total_bytes - plan.cache_bytes + int(0.8 * n) * plan.neuron_bytes_all_layers
    model, _ = mlx_flash.load(folder, mode="flash", window=4, memory_budget=budget, context=128, verify=True)
    try:
        assert model.flash.plan.cache_capacity == int(0.8 * n)
        assert greedy(model, tok, mlx_flash.stream_generate) == ref
        caches = [layer.mlp.cache for layer in model.layers]
        assert any(c.stats.window_shrinks for c in caches) and any(c.stats.moved for c in caches)
        assert caches[0].host_view("gate.weight").dtype == np.uint32
        # a byte changed on flash after load is caught at the read, not computed on
        entry = model.flash.manifest.layers[1]
        path = folder / entry.file
        data = bytearray(path.read_bytes())
        data[entry.data_offset + 5] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(FlashChecksumError):
            model.flash.reader.read(1, [0])
    finally:
        model.flash.close()


def test_mlx_community_source(tmp_path):
    """An MLX-quantized source: gate and up rows copied, down requantized along hidden, the
    dense part as it is; every mode equals mlx-lm with that down projection."""
    src = make_mlx_quantized_model(tmp_path / "src", "llama", bits=4, group_size=64, hidden_act="relu")
    folder = tmp_path / "flash"
    m = convert(src, folder, progress=False)
    assert (m.quantization.bits, m.quantization.group_size) == (4, 64)
    origin = m.quantization.origin
    assert (origin["gate"], origin["up"], origin["down"], origin["dense"]) == (
        "copied",
        "copied",
        "requantized",
        "copied",
    )
    raw = source_tensors(src)
    ids = np.array([0, 7, 100, 255])
    e = m.layers[1]
    got = stored_fields(folder, m, e, ids)
    for part in ("gate", "up"):
        for field in layout.QUANT_FIELDS:
            assert np.array_equal(
                got[f"{part}.{field}"], raw[f"model.layers.1.{NAMES[part]}.{field}"][ids]
            ), (part, field)
    down = [raw[f"model.layers.1.mlp.down_proj.{f}"] for f in layout.QUANT_FIELDS]
    w = mx.dequantize(*(mx.array(x) for x in down), group_size=64, bits=4)
    want = mx.quantize(w.T[mx.array(ids)], group_size=64, bits=4)
    for field, a in zip(layout.QUANT_FIELDS, want):
        assert np.array_equal(got[f"down.{field}"], np.array(a)), field
    dense_header, _ = read_header(folder / m.dense_file)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.scales", "lm_head.biases"):
        assert np.array_equal(read_tensor(folder / m.dense_file, dense_header[name]), raw[name]), name
    assert not any(".mlp." in n for n in dense_header)
    tok = mlx_lm.utils.load_tokenizer(src)
    assert_modes_equal(folder, tok, greedy(load_dense(src, quantize=4), tok))


def one_line_error(r):
    assert r.returncode != 0, r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_cli_quantize_and_its_errors(tmp_path):
    src = make_tiny_model(tmp_path / "src", "llama", tokenizer=False)  # hidden 64
    r = run_module(
        "convert",
        "--model",
        str(src),
        "--out",
        str(tmp_path / "q"),
        "--quantize",
        "8",
        "--group-size",
        "32",
        "--dense-bits",
        "4",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "8-bit, groups of 32" in r.stdout
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == 4
    line = one_line_error(
        run_module(
            "convert",
            "--model",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--quantize",
            "4",
            "--group-size",
            "128",
        )
    )
    assert "group size 128 does not divide hidden_size 64" in line and "32 or 64" in line
    r = run_module(
        "convert", "--model", str(src), "--out", str(tmp_path / "o"), "--quantize", "3"
    )  # argparse: usage + the error
    assert r.returncode == 2 and "invalid choice: 3 (choose from 4, 8)" in r.stderr
    assert "needs --quantize" in one_line_error(
        run_module("convert", "--model", str(src), "--out", str(tmp_path / "o"), "--group-size", "32")
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConvertError, match="does not divide hidden_size"):
        convert(src, tmp_path / "o", quantize=4, group_size=128, progress=False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    assert "gptq" in one_line_error(run_module("convert", "--model", str(src), "--out", str(tmp_path / "o")))


def test_bundle_bytes_at_4_bits_are_under_30_percent_of_float16(tmp_path):
    """At d = 4096 (the paper's size) and the default group size: 4-bit bundles with float16
    scales are 28% of float16 bundles; bytes read per token follow (a neuron is one read)."""
    src = make_tiny_model(
        tmp_path / "src",
        "llama",
        tokenizer=False,
        dtype="float16",
        hidden_size=256,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    f16 = convert(src, tmp_path / "f16", progress=False)
    q4 = convert(src, tmp_path / "q4", quantize=4, progress=False)
    q8 = convert(src, tmp_path / "q8", quantize=8, progress=False)
    assert q4.layers[0].bundle_bytes / f16.layers[0].bundle_bytes == pytest.approx(0.28125)
    assert q8.layers[0].bundle_bytes / f16.layers[0].bundle_bytes == pytest.approx(0.53125)
    assert q4.ffn_bytes() <= 0.3 * f16.ffn_bytes()
