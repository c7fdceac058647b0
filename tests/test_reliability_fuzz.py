"""Fuzz: malformed flash_manifest.json and config.json (keys deleted, retyped, mutated, added;
files cut short) only ever give an MlxFlashError with a one-line message, or load a model that
still generates exactly (a manifest change that does not matter), and leak nothing."""

from __future__ import annotations

import gc
import json
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import TOKENIZER_TEXT, make_tiny_model

import mlx_flash
from mlx_flash import layout
from mlx_flash.convert import convert
from mlx_flash.errors import MlxFlashError

PROMPT = TOKENIZER_TEXT[:40]
MAX_TOKENS = 4
ADDED_KEYS = [
    "model_file",
    "auto_map",
    "quantization",
    "quantization_config",
    "head_dim",
    "num_key_value_heads",
    "rope_scaling",
    "architectures",
    "extra",
    "predictors_file",
    "max_position_embeddings",
]


def tokens(model, tok) -> list[int]:
    return [r.token for r in mlx_flash.stream_generate(model, tok, PROMPT, max_tokens=MAX_TOKENS)]


@pytest.fixture(scope="module", params=["llama", "opt"])
def base(tmp_path_factory, request):
    """A flash folder, and a scratch folder whose two JSON files the fuzz rewrites (every other
    file a link to the folder's). OPT: the architecture this package defines itself."""
    root = tmp_path_factory.mktemp("fuzz")
    src = make_tiny_model(root / "src", request.param, hidden_act="relu", seed=5)
    folder = root / "flash"
    convert(src, folder, progress=False)
    scratch = root / "scratch"
    scratch.mkdir()
    for p in folder.iterdir():
        if p.name not in ("config.json", layout.MANIFEST_NAME):
            (scratch / p.name).symlink_to(p)
    model, tok = mlx_flash.load(folder, window=2)
    ref = tokens(model, tok)
    model.flash.close()
    files = {name: json.loads((folder / name).read_text()) for name in ("config.json", layout.MANIFEST_NAME)}
    return folder, scratch, files, tok, ref


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated(draw, doc):
    """`doc` with 1-3 mutations; or, now and then, text that is not a JSON object at all."""
    if draw(st.integers(0, 19)) == 0:
        text = json.dumps(doc)
        return draw(
            st.sampled_from([text[: draw(st.integers(0, len(text) - 1))], "[]", "null", "", "\xff\xfe"])
        )
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _get(doc, path[:-1]), path[-1]
        value = parent[key]
        op = draw(st.sampled_from(["delete", "replace", "tweak", "retype", "add"]))
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "tweak" and isinstance(value, int) and not isinstance(value, bool):
            parent[key] = draw(
                st.sampled_from(
                    [
                        value + 1,
                        value - 1,
                        value * 2,
                        value // 2,
                        0,
                        -value,
                        value + 4096,
                        value - 16384,
                        2**40,
                    ]
                )
            )
        elif op == "retype":
            parent[key] = draw(st.sampled_from([str(value), [value], {"v": value}, None, True, 1.5]))
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(ADDED_KEYS))] = draw(json_values)
        elif op == "add" and isinstance(parent, list) and parent:
            parent.append(json.loads(json.dumps(parent[-1])))
        else:
            parent[key] = draw(json_values)
    return json.dumps(doc)


def try_load(base, name: str, text: str) -> None:
    folder, scratch, files, tok, ref = base
    for n, doc in files.items():
        (scratch / n).write_text(text if n == name else json.dumps(doc), errors="surrogateescape")
    try:
        model, t = mlx_flash.load(scratch, window=2)
    except MlxFlashError as e:
        assert str(e) and "\n" not in str(e), str(e)
        return
    try:
        if name == layout.MANIFEST_NAME:  # it loaded: then it must be exactly right
            assert tokens(model, t) == ref, text
    finally:
        model.flash.close()


def _leaks_checked(fn):
    def run(base):
        fds = set(os.listdir("/proc/self/fd"))
        threads = len(threading.enumerate())
        readers = {t for t in threading.enumerate() if t.name.startswith("mlx_flash-reader")}
        fn(base)
        gc.collect()
        assert {t for t in threading.enumerate() if t.name.startswith("mlx_flash-reader")} <= readers
        assert len(threading.enumerate()) <= threads and set(os.listdir("/proc/self/fd")) <= fds

    return run


FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def test_fuzzed_manifest(base):
    @FUZZ
    @given(data=st.data())
    def fuzz(data):
        try_load(base, layout.MANIFEST_NAME, data.draw(mutated(base[2][layout.MANIFEST_NAME])))

    _leaks_checked(lambda b: fuzz())(base)


def test_fuzzed_config(base):
    @FUZZ
    @given(data=st.data())
    def fuzz(data):
        try_load(base, "config.json", data.draw(mutated(base[2]["config.json"])))

    _leaks_checked(lambda b: fuzz())(base)
