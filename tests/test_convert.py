"""The converter: round trip of every bundle and dense weight, alignment, verify, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from tiny_models import make_tiny_model, run_module

from mlx_flash import layout
from mlx_flash.convert import ConvertError, convert, verify
from mlx_flash.dtypes import convert_raw
from mlx_flash.families import UnsupportedModelError
from mlx_flash.layout import DTYPE_TO_ST
from mlx_flash.safetensors_file import read_header, read_tensor

CASES = [
    # (model_type, source dtype, flash dtype, shards, config overrides)
    ("llama", "float32", None, 1, {}),
    ("llama", "bfloat16", "float16", 2, {"hidden_act": "silu", "tie_word_embeddings": True}),
    ("qwen2", "float16", "float32", 1, {"hidden_act": "silu"}),
    ("qwen3", "bfloat16", None, 3, {"hidden_act": "silu"}),
    ("phi", "float16", None, 1, {}),
    ("opt", "float32", "bfloat16", 2, {}),
]


def source_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        header, _ = read_header(f)
        for name, info in header.items():
            out[name] = (info.dtype, read_tensor(f, info))
    return out


def read_rows_through_manifest(folder, manifest, entry, seg, ids):
    """Read rows of one segment using only the manifest's offsets (what a reader does)."""
    st = DTYPE_TO_ST[manifest.dtype]
    from mlx_flash.safetensors_file import DTYPES

    np_dtype = DTYPES[st][0]
    fd = os.open(folder / entry.file, os.O_RDONLY)
    try:
        rows = [np.frombuffer(os.pread(fd, seg.row_bytes, seg.row_offset(i)), dtype=np_dtype) for i in ids]
    finally:
        os.close(fd)
    return np.stack(rows)


@pytest.mark.parametrize("bundle", [True, False], ids=["bundled", "unbundled"])
@pytest.mark.parametrize(
    "model_type,src_dtype,dtype,shards,over", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES]
)
def test_round_trip(tmp_path, model_type, src_dtype, dtype, shards, over, bundle):
    src = make_tiny_model(
        tmp_path / "src", model_type, dtype=src_dtype, shards=shards, tokenizer=False, **over
    )
    out = tmp_path / "flash"
    m = convert(src, out, dtype=dtype, bundle=bundle, progress=False)
    assert m == layout.read_manifest(out)
    flash_st = DTYPE_TO_ST[m.dtype]
    source = source_tensors(src)
    cfg = json.loads((src / "config.json").read_text())
    n = cfg.get("intermediate_size", cfg.get("ffn_dim"))
    d = cfg["hidden_size"]
    assert m.hidden_size == d and m.num_layers == cfg["num_hidden_layers"]
    assert m.bundled == bundle and m.dtype == (dtype or src_dtype)
    prefix = "model.decoder.layers.{i}." if model_type == "opt" else "model.layers.{i}.mlp."
    names = {"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"}
    if model_type in ("opt", "phi"):
        names = {"up": "fc1.weight", "down": "fc2.weight"}
    assert m.part_names == tuple(names)
    ffn_names = set()
    rng = np.random.default_rng(0)
    for e in m.layers:
        assert e.num_neurons == n
        for s in e.segments:
            assert s.data_offset % layout.DATA_ALIGNMENT == 0
        ids = np.concatenate([[0, n - 1], rng.choice(n, 20, replace=False)])
        for s in e.segments:
            got = read_rows_through_manifest(out, m, e, s, ids)
            col = 0
            for part in s.parts:
                name = prefix.format(i=e.layer) + names[part]
                ffn_names.add(name)
                st, raw = source[name]
                want = raw if part != "down" else raw.T
                want = convert_raw(np.ascontiguousarray(want[ids]), st, flash_st)
                assert got[:, col : col + d].tobytes() == want.tobytes(), (e.layer, part)
                col += d
        # the shard is a valid safetensors file any reader opens
        with safe_open(str(out / e.file), framework="np") as f:
            assert set(f.keys()) >= {s.tensor for s in e.segments}
    dense = load_file(str(out / m.dense_file)) if m.dtype != "bfloat16" else None
    dense_header, _ = read_header(out / m.dense_file)
    assert set(dense_header) == set(source) - ffn_names
    for name, (st, raw) in source.items():
        if name in ffn_names:
            continue
        got = read_tensor(out / m.dense_file, dense_header[name])
        assert got.tobytes() == convert_raw(raw, st, flash_st).tobytes(), name
        if dense is not None:
            assert dense[name].shape == raw.shape
    assert (out / "config.json").read_text() == (src / "config.json").read_text()


def test_verify_catches_a_flipped_byte_anywhere(tmp_path):
    src = make_tiny_model(tmp_path / "src", "llama", tokenizer=False)
    out = tmp_path / "flash"
    m = convert(src, out, progress=False)
    verify(out, progress=False)
    rng = np.random.default_rng(1)
    targets = [
        (out / e.file, s.data_offset, s.data_offset + s.row_bytes * e.num_neurons)
        for e in m.layers
        for s in e.segments
    ]
    dense_size = (out / m.dense_file).stat().st_size
    targets.append((out / m.dense_file, 0, dense_size))
    for path, start, end in targets:
        for _ in range(3):
            pos = int(rng.integers(start, end))
            data = bytearray(path.read_bytes())
            data[pos] ^= 0x01
            path.write_bytes(bytes(data))
            with pytest.raises(layout.FlashFormatError, match="checksum mismatch|corrupt"):
                verify(out, progress=False)
            data[pos] ^= 0x01
            path.write_bytes(bytes(data))
    verify(out, progress=False)


def one_line_error(r):
    assert r.returncode == 1, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_cli_converts_and_verifies(tmp_path):
    src = make_tiny_model(tmp_path / "src", "llama", tokenizer=False)
    r = run_module(
        "convert", "--model", str(src), "--out", str(tmp_path / "f"), "--quiet", "--dtype", "float16"
    )
    assert r.returncode == 0, r.stderr
    assert "peak memory" in r.stdout
    r = run_module("convert", "--verify", str(tmp_path / "f"), "--quiet")
    assert r.returncode == 0 and "OK" in r.stdout
    # an existing destination is not silently replaced
    assert "already exists" in one_line_error(
        run_module("convert", "--model", str(src), "--out", str(tmp_path / "f"))
    )


def test_cli_errors_are_one_line(tmp_path):
    assert "no such folder" in one_line_error(
        run_module("convert", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    )
    (tmp_path / "empty").mkdir()
    assert "config.json" in one_line_error(
        run_module("convert", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    )
    src = make_tiny_model(tmp_path / "gpt", "llama", tokenizer=False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (src / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(run_module("convert", "--model", str(src), "--out", str(tmp_path / "o")))
    assert "gpt_bigcode" in line and "llama" in line and "opt" in line
    # truncated source shard
    src = make_tiny_model(tmp_path / "trunc", "llama", tokenizer=False)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert "truncated" in one_line_error(
        run_module("convert", "--model", str(src), "--out", str(tmp_path / "o"))
    )
    # an FFN tensor missing
    src = make_tiny_model(tmp_path / "noffn", "llama", tokenizer=False)
    from safetensors.numpy import save_file

    w = load_file(str(src / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(src / "model.safetensors"))
    assert "up_proj" in one_line_error(
        run_module("convert", "--model", str(src), "--out", str(tmp_path / "o"))
    )
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.partial-*")), "a failed conversion left a partial folder"
    # a truncated flash shard is caught by --verify
    src = make_tiny_model(tmp_path / "ok", "llama", tokenizer=False)
    m = convert(src, tmp_path / "ok_flash", progress=False)
    shard = tmp_path / "ok_flash" / m.layers[1].file
    shard.write_bytes(shard.read_bytes()[:-4096])
    assert "truncated" in one_line_error(run_module("convert", "--verify", str(tmp_path / "ok_flash")))


def test_unsupported_architecture_api(tmp_path):
    src = make_tiny_model(tmp_path / "src", "llama", tokenizer=False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="mamba"):
        convert(src, tmp_path / "o", progress=False)
    with pytest.raises(ConvertError):
        convert(tmp_path / "missing", tmp_path / "o", progress=False)


def test_stale_partial_folders_of_dead_conversions_are_removed(tmp_path):
    """A conversion killed outright leaves `.NAME.partial-PID-*`; the next conversion to NAME
    removes it when PID is gone, and leaves a running conversion's folder alone."""
    from mlx_flash.convert import convert

    src = make_tiny_model(tmp_path / "src", "llama", tokenizer=False)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".o.partial-{int(dead.stdout)}-abc"
    running = tmp_path / f".o.partial-{os.getpid()}-def"
    other = tmp_path / f".other.partial-{int(dead.stdout)}-ghi"
    for p in (stale, running, other):
        (p / "ffn").mkdir(parents=True)
    convert(src, tmp_path / "o", progress=False)
    assert not stale.exists() and running.is_dir() and other.is_dir()
    assert layout.is_flash_folder(tmp_path / "o")
