"""Reliability: it keeps working or fails clearly, never with silently wrong text.

Bad folders are caught at load (cheap checks; checksums with verify=True, then every neuron
read is checked too); read faults, truncated shards and Ctrl-C during generation raise clear
errors, leak no thread or descriptor, and leave a model that still generates exactly; an
interrupted conversion leaves nothing that loads; generations from several threads take
turns; config files are data (no code runs, no pickle loads); and a fuzz of manifests and
configs only ever gives MlxFlashError. The soak test lives in test_reliability_soak.py.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from tiny_models import TOKENIZER_TEXT, make_tiny_model, run_module

import mlx_flash
from mlx_flash import layout
from mlx_flash.api import ContextLengthError
from mlx_flash.budget import BudgetError
from mlx_flash.convert import convert
from mlx_flash.errors import MlxFlashError, run_cli
from mlx_flash.layout import FlashFormatError
from mlx_flash.model import load_dense, load_flash_model
from mlx_flash.reader import FlashReadError, ThreadEngine
from mlx_flash.runtime import FlashChecksumError

PROMPT = TOKENIZER_TEXT[:60]
MAX_TOKENS = 10


def tokens(
    model, tok, prompt=PROMPT, max_tokens=MAX_TOKENS, generate=mlx_flash.stream_generate, **kw
) -> list[int]:
    return [r.token for r in generate(model, tok, prompt, max_tokens=max_tokens, **kw)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A ReLU llama, its flash folder (float32), its tokenizer and the dense model's tokens."""
    root = tmp_path_factory.mktemp("reliability")
    src = make_tiny_model(root / "src", "llama", hidden_act="relu", seed=7)
    folder = root / "flash"
    convert(src, folder, progress=False)
    tok = mlx_lm.utils.load_tokenizer(src)
    ref = tokens(load_dense(src), tok, generate=mlx_lm.stream_generate)
    return src, folder, tok, ref


def copy_folder(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def load(folder, **kw):
    kw.setdefault("window", 2)
    model, tok = mlx_flash.load(folder, **kw)
    return model, tok


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mlx_flash-reader")]


def lock_is_free(model) -> bool:
    """Whether another thread can take the model's generation lock now."""
    got = []

    def take():
        if model.flash.lock.acquire(blocking=False):
            model.flash.lock.release()
            got.append(True)

    t = threading.Thread(target=take)
    t.start()
    t.join()
    return got == [True]


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    return msg


# -- load: cheap checks of the folder against its manifest and config.json ------------------------


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _manifest_edit(fn):
    def edit(f: Path, root: Path) -> None:
        d = json.loads((f / layout.MANIFEST_NAME).read_text())
        fn(d)
        (f / layout.MANIFEST_NAME).write_text(json.dumps(d))

    return edit


def _other_conversion(root: Path, src: Path, **kw) -> Path:
    out = root / f"other-{len(list(root.iterdir()))}"
    convert(src, out, progress=False, **kw)
    return out


def _truncate(path: Path, by: int) -> None:
    os.truncate(path, path.stat().st_size - by)


def _patch_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


BAD_FOLDERS = {
    # name: (edit(folder, scratch root), what the message must say)
    "config hidden_size": (
        lambda f, r: _edit_json(f / "config.json", hidden_size=128),
        ["hidden_size", "config.json", "convert"],
    ),
    "config intermediate_size": (
        lambda f, r: _edit_json(f / "config.json", intermediate_size=512),
        ["intermediate_size", "convert"],
    ),
    "config num_hidden_layers": (
        lambda f, r: _edit_json(f / "config.json", num_hidden_layers=3),
        ["num_hidden_layers", "convert"],
    ),
    "config activation": (
        lambda f, r: _edit_json(f / "config.json", hidden_act="silu"),
        ["activation", "convert"],
    ),
    "config model_type": (
        lambda f, r: _edit_json(f / "config.json", model_type="qwen2"),
        ["model_type", "convert"],
    ),
    "config not JSON": (lambda f, r: (f / "config.json").write_text("{nope"), ["config.json", "JSON"]),
    "config missing": (lambda f, r: (f / "config.json").unlink(), ["config.json", "convert"]),
    "shard truncated": (
        lambda f, r: _truncate(f / "ffn/layer_001.safetensors", 4096),
        ["layer_001", "truncated", "convert"],
    ),
    "shard missing": (
        lambda f, r: (f / "ffn/layer_000.safetensors").unlink(),
        ["layer_000", "missing", "convert"],
    ),
    "shard of another layer": (
        lambda f, r: shutil.copy(f / "ffn/layer_001.safetensors", f / "ffn/layer_000.safetensors"),
        ["layer_000", "layers.0.bundles", "not from this conversion", "convert"],
    ),
    "shard of a float16 conversion": (
        lambda f, r: shutil.copy(
            _other_conversion(r, r.parent / "src", dtype="float16") / "ffn/layer_001.safetensors",
            f / "ffn/layer_001.safetensors",
        ),
        ["layer_001", "truncated", "convert"],
    ),
    "shard header of another dtype": (
        lambda f, r: _patch_bytes(f / "ffn/layer_000.safetensors", b'"dtype":"F32"', b'"dtype":"I32"'),
        ["layer_000", "I32", "not from this conversion", "convert"],
    ),
    "shard of an unbundled conversion": (
        lambda f, r: shutil.copy(
            _other_conversion(r, r.parent / "src", bundle=False) / "ffn/layer_000.safetensors",
            f / "ffn/layer_000.safetensors",
        ),
        ["layer_000", "missing", "convert"],
    ),
    "dense of another model": (
        lambda f, r: shutil.copy(
            _other_conversion(r, make_tiny_model(r / "wide", "llama", tokenizer=False, vocab_size=280))
            / "dense.safetensors",
            f / "dense.safetensors",
        ),
        ["dense.safetensors", "do not match", "convert"],
    ),
    "dense truncated": (
        lambda f, r: _truncate(f / "dense.safetensors", 100),
        ["dense.safetensors", "truncated"],
    ),
    "dense missing": (
        lambda f, r: (f / "dense.safetensors").unlink(),
        ["dense.safetensors", "missing", "convert"],
    ),
    "manifest newer": (
        _manifest_edit(lambda d: d.update(format_version=layout.FORMAT_VERSION + 1)),
        ["format_version", "newer", "upgrade mlx_flash"],
    ),
    "manifest version 0": (
        _manifest_edit(lambda d: d.update(format_version=0)),
        ["format_version", "convert"],
    ),
    "manifest not JSON": (
        lambda f, r: (f / layout.MANIFEST_NAME).write_text('{"format_version": 1,'),
        ["flash_manifest.json", "JSON", "convert"],
    ),
    "manifest missing": (lambda f, r: (f / layout.MANIFEST_NAME).unlink(), ["not a flash folder", "convert"]),
    "manifest offset moved": (
        _manifest_edit(
            lambda d: d["layers"][0]["segments"][0].update(
                data_offset=d["layers"][0]["segments"][0]["data_offset"] - 16384
            )
        ),
        ["layer_000", "not from this conversion", "convert"],
    ),
    "manifest neuron count": (
        _manifest_edit(lambda d: d["layers"][1].update(num_neurons=d["layers"][1]["num_neurons"] // 2)),
        ["layer_001", "convert"],
    ),
    "manifest activation": (_manifest_edit(lambda d: d.update(activation="silu")), ["activation", "convert"]),
    "manifest checksum algorithm": (
        _manifest_edit(lambda d: d.update(checksum_algorithm="md5")),
        ["md5", "convert"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_load_catches_a_folder_that_does_not_match(tiny, tmp_path, case):
    _, folder, _, _ = tiny
    edit, words = BAD_FOLDERS[case]
    (tmp_path / "src").symlink_to(tiny[0])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    f = copy_folder(folder, tmp_path / "f")
    edit(f, scratch)
    threads, fds = len(threading.enumerate()), open_fds()
    with pytest.raises(MlxFlashError) as info:
        load_flash_model(f)
    msg = one_line(info.value)
    for w in words:
        assert w in msg, (w, msg)
    del info  # its traceback holds the failed load's locals (MLX's lazy dense arrays hold their file)
    gc.collect()
    assert len(threading.enumerate()) <= threads and open_fds() <= fds, "a failed load leaked"


def test_verify_catches_a_flipped_byte_at_load(tiny, tmp_path):
    _, folder, tok, ref = tiny
    m = layout.read_manifest(folder)
    for target, offset in [
        (m.layers[1].file, m.layers[1].data_offset + 3 * m.layers[1].bundle_bytes + 5),
        (m.dense_file, (folder / m.dense_file).stat().st_size - 10),  # in the last tensor's data
    ]:
        f = copy_folder(folder, tmp_path / f"flip-{Path(target).stem}")
        with open(f / target, "r+b") as fh:
            fh.seek(offset)
            b = fh.read(1)
            fh.seek(offset)
            fh.write(bytes([b[0] ^ 0x10]))
        with pytest.raises(FlashFormatError, match="checksum mismatch") as info:
            load(f, verify=True)
        assert target in one_line(info.value) and "convert" in str(info.value)
        # without verify, only the cheap checks run (documented): it loads
        model, _ = load(f)
        model.flash.close()
    model, _ = load(folder, verify=True)
    assert tokens(model, tok) == ref
    model.flash.close()


def test_verify_checks_every_neuron_read_after_load(tiny, tmp_path):
    """A byte flipped in place after a verified load is caught by the read that fetches it."""
    _, folder, tok, ref = tiny
    f = copy_folder(folder, tmp_path / "f")
    model, _ = load(f, verify=True)
    assert tokens(model, tok) == ref
    m = model.flash.manifest
    e = m.layers[0]
    neuron = 17
    with open(f / e.file, "r+b") as fh:  # the same inode the reader holds open
        pos = e.data_offset + neuron * e.bundle_bytes + e.bundle_bytes - 4  # in its down column
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(FlashChecksumError) as info:
        tokens(model, tok)  # the prefill streams every neuron of every layer
    msg = one_line(info.value)
    assert str(f / e.file) in msg and f"neuron {neuron} of layer 0" in msg and "--verify" in msg
    assert isinstance(info.value, MlxFlashError) and isinstance(info.value, FlashReadError)
    model.flash.close()


# -- faults during generation --------------------------------------------------------------------


class Fault:
    """Gives a reader a thread engine whose low-level read this is: after `arm()`, the `at`-th
    read fails."""

    def __init__(self, reader, kind: str, at: int = 1):
        self.kind, self.at, self.calls, self.armed = kind, at, 0, False
        self.lock = threading.Lock()
        self.orig = os.preadv
        reader.swap_engine(ThreadEngine(reader.threads, pread=self))

    def arm(self) -> None:
        with self.lock:
            self.armed, self.calls = True, 0

    def disarm(self) -> None:
        with self.lock:
            self.armed = False

    def __call__(self, fd, bufs, offset):
        with self.lock:
            if self.armed:
                self.calls += 1
            hit = self.armed and self.calls == self.at
        if hit and self.kind == "eio":
            raise OSError(errno.EIO, "Input/output error")
        if hit and self.kind == "short":
            return 0
        if hit and self.kind == "interrupt":  # Ctrl-C while the main thread waits for a read
            raise KeyboardInterrupt
        return self.orig(fd, bufs, offset)


def check_cache_consistent(model) -> None:
    for layer in model.layers:
        c = layer.mlp.cache
        ids = c.resident_ids()
        assert c.used <= c.capacity and len(set(ids.tolist())) == c.used
        np.testing.assert_array_equal(c.slots(ids), np.arange(c.used))
        c.views()  # raises if a token's rows were left half inserted


@pytest.mark.parametrize("kind", ["eio", "short", "interrupt"])
@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_read_fault_during_generation(tiny, kind, when):
    """The fault reaches the caller as a clear error; the model then generates exactly again,
    another thread can take its turn, and closing it leaks no thread or descriptor."""
    _, folder, tok, ref = tiny
    load(folder)[0].flash.close()  # warm-up: lazy imports open what they open once
    fds, threads = open_fds(), threading.enumerate()
    readers = set(reader_threads())
    model, _ = load(folder)
    fault = Fault(model.flash.reader, kind)
    expected = KeyboardInterrupt if kind == "interrupt" else FlashReadError
    gen = mlx_flash.stream_generate(model, tok, PROMPT, max_tokens=40)
    if when == "decode":
        for _ in range(3):
            next(gen)
    fault.arm()
    with pytest.raises(expected) as info:
        for _ in gen:
            pass
    assert fault.calls >= 1
    if expected is FlashReadError:
        msg = one_line(info.value)
        assert "layer_00" in msg and "(layer " in msg and ("failed" in msg or "short read" in msg)
    fault.disarm()
    check_cache_consistent(model)
    assert lock_is_free(model), "the generation's lock was not released"
    assert tokens(model, tok) == ref
    model.flash.close()
    assert set(reader_threads()) <= readers and open_fds() <= fds
    assert {t.ident for t in threading.enumerate()} <= {t.ident for t in threads}
    model, _ = load(folder)
    assert tokens(model, tok) == ref
    model.flash.close()


def test_interrupt_in_the_cache_update_leaves_a_working_model(tiny, monkeypatch):
    """Ctrl-C between a layer's begin_token and insert (rows reserved, not yet written)."""
    _, folder, tok, ref = tiny
    model, _ = load(folder)
    cache = model.layers[1].mlp.cache
    orig, calls = cache.insert, []

    def insert(ids, rows):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return orig(ids, rows)

    monkeypatch.setattr(cache, "insert", insert)
    with pytest.raises(KeyboardInterrupt):
        tokens(model, tok, max_tokens=40)
    check_cache_consistent(model)
    assert tokens(model, tok) == ref
    model.flash.close()


def test_shard_truncated_under_a_loaded_model(tiny, tmp_path):
    _, folder, tok, ref = tiny
    f = copy_folder(folder, tmp_path / "f")
    fds, readers = open_fds(), set(reader_threads())
    model, _ = load(f)
    assert tokens(model, tok) == ref
    e = model.flash.manifest.layers[1]
    os.truncate(f / e.file, e.data_offset)  # only the header is left
    with pytest.raises(FlashReadError) as info:
        tokens(model, tok)
    msg = one_line(info.value)
    assert str(f / e.file) in msg and "changed since it was opened" in msg
    model.flash.close()
    assert set(reader_threads()) <= readers and open_fds() <= fds
    with pytest.raises(FlashFormatError, match="truncated"):
        load(f)


def test_shard_replaced_under_a_loaded_model_keeps_the_file_it_opened(tiny, tmp_path):
    """os.replace of a shard (what a re-conversion does) does not change an open model: it
    keeps reading the file it opened, so its text stays exact; a new load sees the new file."""
    src, folder, tok, ref = tiny
    f = copy_folder(folder, tmp_path / "f")
    model, _ = load(f)
    other = make_tiny_model(tmp_path / "other", "llama", hidden_act="relu", seed=99, tokenizer=False)
    convert(other, tmp_path / "other_flash", progress=False)
    for name in ("ffn/layer_000.safetensors", "ffn/layer_001.safetensors"):
        shutil.copy(tmp_path / "other_flash" / name, f / (name + ".new"))
        os.replace(f / (name + ".new"), f / name)
    assert tokens(model, tok) == ref
    model.flash.close()


def test_read_errors_are_one_line_in_the_cli(capsys):
    def main(argv):
        raise FlashReadError(
            "/x/ffn/layer_003.safetensors: short read at offset 16384 (layer 3)", path="/x", offset=0, layer=3
        )

    assert run_cli(main, [], prog="mlx_flash.generate") == 1
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "mlx_flash.generate: error: /x/ffn/layer_003.safetensors: short read at offset 16384 (layer 3)"
    )


# -- bad input -----------------------------------------------------------------------------------


def test_bad_arguments_are_clear_errors(tiny):
    _, folder, tok, _ = tiny
    cases = [
        (dict(mode="turbo"), BudgetError, "unknown mode 'turbo'"),
        (dict(selection="oracle"), BudgetError, "unknown selection 'oracle'"),
        (dict(selection="predictor"), MlxFlashError, "no predictors"),
        (dict(window=0), MlxFlashError, "window must be a positive integer"),
        (dict(window="3"), MlxFlashError, "window must be a positive integer"),
        (dict(threads=-1), MlxFlashError, "threads must be a positive integer"),
        (dict(context=0), MlxFlashError, "context must be a positive integer"),
        (dict(context=100_000), MlxFlashError, "max_position_embeddings"),
        (dict(memory_budget="10KB"), BudgetError, "too small"),
        (dict(memory_budget="lots"), BudgetError, "cannot read memory budget"),
        (dict(memory_budget=-1), BudgetError, "must be positive"),
    ]
    fds, readers = open_fds(), set(reader_threads())
    for kw, err, words in cases:
        with pytest.raises(err) as info:
            load(folder, **kw)
        assert words in one_line(info.value), (kw, str(info.value))
    assert set(reader_threads()) <= readers and open_fds() <= fds


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("capacity", [4, 12])
def test_a_token_needing_more_neurons_than_the_cache_holds(tiny, capacity, lookahead):
    """A budget whose caches cannot hold one token's active neurons: such a token caches what
    fits (its cached neurons, then the ones selected most recently) and reads the rest for
    itself, in the cache's request or, when they are many (a small streaming block here), in
    blocks after it: the text is still exactly the dense model's, and cached neurons are reused."""
    _, folder, tok, ref = tiny
    m, _ = load(folder, context=128)
    plan = m.flash.plan
    m.flash.close()
    n = m.flash.manifest.layers[0].num_neurons
    budget = plan.total_bytes - (n - capacity) * plan.neuron_bytes_all_layers
    for stream_block in (None, 4):
        model, _ = load(folder, context=128, memory_budget=budget, lookahead=lookahead)
        rt = model.flash
        assert rt.plan.cache_capacity == capacity
        if stream_block:
            rt.stream_block = stream_block  # before the streaming buffers are made (first use)
        for _ in range(2):
            assert tokens(model, tok) == ref
            check_cache_consistent(model)
        decoded = [r for r in rt.records if not r.is_prefill]
        assert sum(r.overflow_layers for r in decoded) > 0
        assert sum(r.neurons_loaded for r in decoded) < sum(r.neurons_active for r in decoded)
        rt.close()


def test_prompt_and_context_errors(tiny):
    _, folder, tok, ref = tiny
    model, _ = load(folder, context=64)
    n_prompt = len(tok.encode(PROMPT))
    for empty in ("", [], mx.array([], dtype=mx.int32)):
        with pytest.raises(MlxFlashError, match="the prompt is empty"):
            tokens(model, tok, prompt=empty)
    with pytest.raises(ContextLengthError) as info:
        tokens(model, tok, max_tokens=64 - n_prompt + 1)
    msg = one_line(info.value)
    assert f"{n_prompt} prompt tokens" in msg and "context of 64" in msg
    with pytest.raises(ContextLengthError):
        tokens(model, tok, prompt=TOKENIZER_TEXT[:600], max_tokens=1)
    assert tokens(model, tok, max_tokens=64 - n_prompt)[:MAX_TOKENS] == ref
    # a prompt cache (the chat CLI's) counts too
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    tokens(model, tok, max_tokens=20, prompt_cache=cache)
    with pytest.raises(ContextLengthError, match="cached"):
        tokens(model, tok, max_tokens=64 - n_prompt, prompt_cache=cache)
    model.flash.close()


# -- threads -------------------------------------------------------------------------------------


def run_threads(fns) -> list:
    barrier = threading.Barrier(len(fns))
    out: list = [None] * len(fns)

    def run(i, fn):
        barrier.wait()
        try:
            out[i] = fn()
        except BaseException as e:  # reported by the assertion below
            out[i] = e
        finally:
            mx.clear_streams()  # MLX 0.32: a thread that used MLX must, or the process may abort at exit

    ts = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def test_two_threads_generating_on_one_model(tiny):
    """mlx_flash.generate from two threads takes turns; mlx_lm.stream_generate called directly
    from two threads at once, or beside mlx_flash.generate, interleaves per layer and still
    never corrupts a neuron cache: every thread gets the dense model's tokens."""
    _, folder, tok, ref = tiny
    model, _ = load(folder, window=3)

    def flash():
        return tokens(model, tok, max_tokens=MAX_TOKENS)

    def direct():
        return tokens(model, tok, max_tokens=MAX_TOKENS, generate=mlx_lm.stream_generate)

    for fns in ([flash, flash], [direct, direct], [flash, direct, direct]):
        for _ in range(2):
            assert run_threads(fns) == [ref] * len(fns)
            check_cache_consistent(model)
    model.flash.close()


# -- config files are data -----------------------------------------------------------------------

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("code from the model folder ran")
class Model: pass
class ModelArgs: pass
"""


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickle loaded')",))


def _plant(folder: Path, marker: Path) -> None:
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(
        model_file="evil.py",
        auto_map={
            "AutoConfig": "evil.Config",
            "AutoModelForCausalLM": "evil.Model",
            "AutoTokenizer": ["evil.Tok", None],
        },
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    tc = folder / "tokenizer_config.json"
    if tc.exists():
        d = json.loads(tc.read_text())
        d.update(auto_map={"AutoTokenizer": ["evil.Tok", None]})
        tc.write_text(json.dumps(d))


def test_no_code_from_a_model_folder_runs_and_no_pickle_loads(tiny, tmp_path):
    src, folder, tok, ref = tiny
    marker = tmp_path / "MARKER"
    # a source folder (converted into the cache on load) and a flash folder, both with code
    s = copy_folder(src, tmp_path / "src")
    _plant(s, marker)
    f = copy_folder(folder, tmp_path / "flash")
    _plant(f, marker)
    for path in (s, f):
        model, t = mlx_flash.load(path, window=2)
        assert tokens(model, t) == ref
        model.flash.close()
    # a folder with only a pickle checkpoint: a clear error, the pickle is never opened
    pt = tmp_path / "pt"
    pt.mkdir()
    shutil.copy(src / "config.json", pt / "config.json")
    (pt / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(MlxFlashError, match="no \\*.safetensors") as info:
        mlx_flash.load(pt)
    one_line(info.value)
    r = run_module("convert", "--model", str(pt), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "safetensors" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()


# -- interrupted conversion ----------------------------------------------------------------------


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if ".partial-" in p.name]


def test_conversion_interrupted_at_any_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    src, folder, tok, ref = tiny
    from mlx_flash.safetensors_file import SafetensorsWriter

    orig = SafetensorsWriter.write
    calls = []
    monkeypatch.setattr(SafetensorsWriter, "write", lambda self, *a: (calls.append(1), orig(self, *a))[1])
    convert(src, tmp_path / "count", progress=False)
    total = len(calls)
    assert total > 5
    good = copy_folder(folder, tmp_path / "good")
    for stop_at in sorted({1, 2, total // 2, total - 1, total}):
        for out in (tmp_path / "out", good):  # a new folder, and overwriting a complete one
            calls.clear()

            def write(self, *a, stop_at=stop_at):
                calls.append(1)
                if len(calls) == stop_at:
                    raise KeyboardInterrupt
                return orig(self, *a)

            monkeypatch.setattr(SafetensorsWriter, "write", write)
            with pytest.raises(KeyboardInterrupt):
                convert(src, out, progress=False, overwrite=True)
            assert not _leftovers(tmp_path)
            if out == good:  # the old folder is untouched and still right
                model, _ = load(good)
                assert tokens(model, tok) == ref
                model.flash.close()
            else:
                assert not out.exists()
                with pytest.raises(MlxFlashError):
                    load_flash_model(out)
    monkeypatch.setattr(SafetensorsWriter, "write", orig)
    # interrupted between moving the old folder away and putting the new one in its place
    replace = os.replace

    def interrupted_replace(a, b):
        if ".partial-" in str(a) and Path(b) == good:
            raise KeyboardInterrupt
        return replace(a, b)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        convert(src, good, progress=False, overwrite=True)
    monkeypatch.setattr(os, "replace", replace)
    assert not _leftovers(tmp_path) and not [p for p in tmp_path.iterdir() if ".old-" in p.name]
    model, _ = load(good)
    assert tokens(model, tok) == ref
    model.flash.close()
    convert(
        src, good, progress=False, overwrite=True
    )  # and a replacement that finishes leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["count", "good"]
    # interrupted after every file, while the manifest is written
    monkeypatch.setattr(layout, "write_manifest", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


CONVERT_SLOWLY = """
import pathlib, signal, sys, time
import mlx_flash.convert as c
# Ctrl-C raises KeyboardInterrupt even when the test runs as a background job (nohup ... &),
# whose children inherit SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
ready = pathlib.Path(sys.argv[1])
orig = c._write_layer
def write_layer(src, i, *a, **k):
    if i == 1:  # layer 0 and the dense weights are on disk: signal, then take a while
        ready.write_text("ready")
        time.sleep(120)
    return orig(src, i, *a, **k)
c._write_layer = write_layer
sys.exit(c.run_cli(c.main, sys.argv[2:], prog="mlx_flash.convert"))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_conversion_killed_midway_leaves_no_folder_that_loads(tiny, tmp_path, sig):
    src, folder, tok, ref = tiny
    ready, out = tmp_path / "ready", tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, "-c", CONVERT_SLOWLY, str(ready), "--model", str(src), "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not ready.exists() and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    p.send_signal(sig)
    _, err = p.communicate()
    assert not out.exists()
    if sig == signal.SIGINT:  # cleaned up, one line, exit code 130
        assert p.returncode == 130 and err.strip() == "mlx_flash.convert: interrupted", err
        assert not _leftovers(tmp_path)
    else:  # no chance to clean up: the partial folder is left, and is not a flash folder
        (partial,) = _leftovers(tmp_path)
        assert (partial / "dense.safetensors").exists() and not layout.is_flash_folder(partial)
        with pytest.raises(MlxFlashError):
            load_flash_model(partial)
        with pytest.raises(MlxFlashError):
            mlx_flash.load(partial)
    convert(src, out, progress=False)  # the next conversion works, and removes what a killed one left
    assert not _leftovers(tmp_path)
    model, _ = load(out)
    assert tokens(model, tok) == ref
    model.flash.close()
