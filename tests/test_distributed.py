"""Several processes sharing each FlashFFN layer's neurons (mlx_flash/distributed.py).

In one process: the shards of a layer cover its neurons (its experts) once, and the partial
outputs of two shards add up to the layer's output in every mode (an MoE layer's: bit for bit). Under `mlx.launch -n 2 --backend ring` on
this machine (benchmarks/bench_distributed.py's launcher): the demo model, tiny dense models and
a tiny MoE model give both ranks the greedy tokens of one process, and each rank reads about
half of one process's bytes (the MoE model: its experts' bytes); the ranks convert the demo model into one fresh cache at once
(the conversion lock); chat prints only on rank 0."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import openai
import pytest
from mlx_lm.sample_utils import make_sampler
from tiny_models import make_tiny_model

import mlx_flash
from mlx_flash import layout
from mlx_flash.convert import conversion_lock, convert, verify
from mlx_flash.distributed import LOADS_FILE, Shard, broadcast_text, part_bounds
from mlx_flash.distributed import main as distributed_main
from mlx_flash.model import FlashOptions, load_flash_model

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 16


import bench_distributed as bench  # noqa: E402 (benchmarks/, on the path from conftest)


def _env(**over) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(over)
    return env


@pytest.mark.parametrize("n", [1, 7, 256, 1024])
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shards_cover_every_neuron_once(n, size):
    ranges = [Shard(r, size).neurons(n) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


@pytest.mark.parametrize("n", [1, 8, 60, 128])
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_expert_shards_own_every_expert_once(n, size):
    owned = [Shard(r, size).experts(n) for r in range(size)]
    assert sorted(np.concatenate(owned).tolist()) == list(range(n))
    assert max(map(len, owned)) - min(map(len, owned)) <= 1
    ids = np.random.default_rng(n).integers(0, n, (5, 3))
    if size > 1:
        masks = [Shard(r, size).owned_entries(ids, n) for r in range(size)]
        assert (sum(m.astype(int) for m in masks) == 1).all()
        assert all(np.isin(ids[m], o).all() for m, o in zip(masks, owned))


def test_one_process_is_the_group_of_one():
    s = Shard()
    y = mx.arange(4)
    assert s.all_sum(y) is y and s.primary and broadcast_text("hi", s) == "hi"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_llama")
    src = make_tiny_model(root / "src", "llama", hidden_act="relu", intermediate_size=1024)
    convert(src, root / "flash", progress=False)
    return src, root / "flash"


@pytest.mark.parametrize(
    "mode,budget", [("naive", None), ("hybrid", "60%"), ("flash", None), ("flash", "95%")]
)
def test_two_shards_add_up_to_the_layer(tiny_llama, mode, budget):
    """Rank 0's and rank 1's FlashFFN outputs (each loaded alone, its all_sum that of a group of
    one) sum to the whole layer's, when decoding and when prefilling; each rank's cache holds
    only its own neurons, and its plan (made for its own neurons) fits the budget. (A random
    model fires half its neurons: with the budget, flash's active sets overflow the cache.)"""
    _, folder = tiny_llama
    opts = FlashOptions(mode=mode, memory_budget=budget, context=16)
    whole, rt = load_flash_model(folder, opts)
    parts = [load_flash_model(folder, replace(opts, shard=Shard(r, 2))) for r in (0, 1)]
    rng = np.random.default_rng(0)
    d = rt.manifest.hidden_size
    for shape in [(1, 1, d), (1, 1, d), (1, 6, d), (1, 1, d)]:
        x = mx.array(rng.standard_normal(shape).astype(np.float32))
        for layer in range(len(whole.layers)):
            want = whole.layers[layer].mlp(x)
            got = sum(m.layers[layer].mlp(x) for m, _ in parts)
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)
    n = rt.manifest.layers[0].num_neurons
    for r, (m, prt) in enumerate(parts):
        first, stop = Shard(r, 2).neurons(n)
        if mode == "flash" and budget is None:
            ids = m.layers[0].mlp._state.cache.resident_ids()
            assert len(ids) and ids.min() >= first and ids.max() < stop
        if budget is not None:
            assert prt.plan.total_bytes <= prt.plan.budget_bytes
        assert prt.stats().extra["group_size"] == 2
    for _, prt in [(whole, rt), *parts]:
        prt.close()


def _switches(model) -> list:
    from mlx_flash.switch import FlashSwitch

    return [m for _, m in model.named_modules() if isinstance(m, FlashSwitch)]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("budget", [None, "2 slots"])
def test_two_expert_shards_add_up_to_the_layer(tmp_path, family, budget):
    """Rank 0's and rank 1's routed-expert outputs (each loaded alone: its all_sum that of a
    group of one) add up to one process's, bit for bit when every expert fits, when decoding
    and when prefilling; each rank's pools hold only its own experts. With a budget of 2 slots
    for each rank's 4 experts, a prefill needs more experts than fit and is computed in parts
    (its sum then equal to rounding: other shapes, other kernels), and the plan fits."""
    src = make_tiny_model(tmp_path / "src", family)
    folder = convert(src, tmp_path / "flash", progress=False) and tmp_path / "flash"
    opts = FlashOptions(context=16)
    whole, rt = load_flash_model(folder, opts)
    shards = [Shard(r, 2) for r in (0, 1)]
    if budget:
        _, alone = load_flash_model(folder, replace(opts, shard=shards[0]))
        p = alone.plan
        opts = replace(opts, memory_budget=p.total_bytes - p.cache_bytes + 2 * p.neuron_bytes_all_layers)
        alone.close()
    parts = [load_flash_model(folder, replace(opts, shard=s)) for s in shards]
    n, d = rt.experts.entries[0].num_experts, rt.manifest.hidden_size
    rng = np.random.default_rng(0)
    for tokens in (1, 1, 40, 1):
        x = mx.array(rng.standard_normal((1, tokens, d)).astype(np.float32))
        ids = mx.array(rng.integers(0, n, (1, tokens, 2)).astype(np.uint32))
        for j, sw in enumerate(_switches(whole)):
            want = np.array(sw(x, ids))
            got = np.array(sum(_switches(m)[j](x, ids) for m, _ in parts))
            if budget is None:
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for s, (_, prt) in zip(shards, parts):
        for pool in prt.experts.pools:
            assert set(np.flatnonzero(pool.slot_of >= 0)) <= set(s.experts(n).tolist())
            assert pool.slots == (2 if budget else 4)
        assert prt.stats().extra["experts"]["owned"] == 4
        if budget:
            assert prt.plan.total_bytes <= prt.plan.budget_bytes
    for _, prt in [(whole, rt), *parts]:
        prt.close()


@pytest.mark.parametrize("size", [2, 3, 5])
def test_balanced_parts_share_the_reads(size):
    """Contiguous parts with about equal reads (within one neuron's), each at least one neuron."""
    rng = np.random.default_rng(size)
    for loads in [rng.integers(0, 50, 64) * (np.arange(64) < 16), np.zeros(7), rng.integers(0, 9, 300)]:
        b = part_bounds(loads, size)
        assert b[0] == 0 and b[-1] == len(loads) and all(x < y for x, y in zip(b, b[1:]))
        if loads.sum():
            parts = [loads[x:y].sum() for x, y in zip(b, b[1:])]
            assert max(parts) - min(parts) <= 2 * loads.max()


def test_calibrated_parts_add_up_to_the_layer(tiny_llama, tmp_path):
    """A calibrated folder (calibrate's loads file: here every read in the first quarter of each
    layer's neurons) gives the two ranks uneven parts, balanced per layer, planned for the
    larger; their outputs still add up to the layer's, and one process ignores the file."""
    src, folder = tiny_llama
    cal = tmp_path / "flash"
    shutil.copytree(folder, cal)
    assert (
        distributed_main(
            ["calibrate", "--model", str(cal), "--text", str(src / "tokenizer.json"), "--max-tokens", "24"]
        )
        == 0
    )
    loads = np.load(cal / LOADS_FILE)
    assert loads.shape == (2, 1024) and loads.sum() > 0
    loads[:, 256:] = 0
    np.save(cal / LOADS_FILE, loads)
    opts = FlashOptions(context=16)
    whole, rt = load_flash_model(cal, opts)
    parts = [load_flash_model(cal, replace(opts, shard=Shard(r, 2))) for r in (0, 1)]
    for layer in range(2):
        first, stop = parts[0][1].shard.neurons(1024, layer)
        assert first == 0 and stop < 256 and parts[1][1].shard.neurons(1024, layer) == (stop, 1024)
        assert parts[1][0].layers[layer].mlp._state.first == stop
    assert parts[1][1].stream_block >= parts[0][1].stream_block
    rng = np.random.default_rng(1)
    for shape in [(1, 1, 64), (1, 5, 64), (1, 1, 64)]:
        x = mx.array(rng.standard_normal(shape).astype(np.float32))
        for layer in range(2):
            want = whole.layers[layer].mlp(x)
            got = sum(m.layers[layer].mlp(x) for m, _ in parts)
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)
    assert rt.shard.bounds is None
    for _, prt in [(whole, rt), *parts]:
        prt.close()


def _args(model, **over) -> Namespace:
    args = Namespace(
        model=model, max_tokens=TOKENS, mode="flash", memory_budget=None, threads=None, prompt_chars=200
    )
    for k, v in over.items():
        setattr(args, k, v)
    return args


def _one_process(model) -> dict:
    """The reference: this (test) process, the group of one."""
    a = _args(model)
    return bench.measure(model, prompt=bench.prompt_text(a.prompt_chars), max_tokens=a.max_tokens)


def _two_ranks(tmp_path, model, env=None) -> list[dict]:
    return bench.launch(
        2, tmp_path / "run-2", bench.worker_args(_args(model)), timeout=240, env=env or _env()
    )


def _check_two_ranks(one: dict, two: list[dict]) -> None:
    assert [r["rank"] for r in two] == [0, 1] and all(r["size"] == 2 for r in two)
    assert one["size"] == 1 and len(one["tokens"]) == TOKENS
    for r in two:
        assert r["tokens"] == one["tokens"], f"rank {r['rank']}"
        share = r["bytes_per_token"] / one["bytes_per_token"]
        assert 0.25 <= share <= 0.75, f"rank {r['rank']} reads {share:.2f} of one process's bytes"
        assert r["all_sum_ms"] > 0
    total = sum(r["bytes_per_token"] for r in two) / one["bytes_per_token"]
    assert 0.8 <= total <= 1.2  # the ranks' shares add up to about one process's bytes


def test_demo_model_on_two_ranks(tmp_path):
    """The issue's check: the demo model under mlx.launch -n 2 --backend ring, the same 16
    greedy tokens on both ranks as one process, each rank reading a quarter to three quarters
    of its bytes per token. Both ranks start with an empty cache and convert the demo model
    at once into it: one converts, the other waits and opens the finished folder."""
    cache = tmp_path / "cache"
    _check_two_ranks(_one_process(None), _two_ranks(tmp_path, None, env=_env(MLX_FLASH_CACHE=str(cache))))
    folders = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and layout.is_flash_folder(folders[0])
    assert not [p for p in cache.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    verify(folders[0], progress=False)


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_tiny_dense_models_on_two_ranks(tmp_path, model_type):
    """A gated (llama, ReLU) and a two-matrix model with per-neuron and output biases (OPT)."""
    size = {"intermediate_size" if model_type == "llama" else "ffn_dim": 2048}  # enough reads a token
    src = make_tiny_model(tmp_path / "src", model_type, **size)
    folder = convert(src, tmp_path / "flash", progress=False) and tmp_path / "flash"
    _check_two_ranks(_one_process(str(folder)), _two_ranks(tmp_path, str(folder)))


def test_tiny_moe_on_two_ranks(tmp_path):
    """A tiny Qwen3-MoE (16 experts, 4 a token) under mlx.launch -n 2: both ranks decode one
    process's greedy tokens; each reads only its own experts, so (every pool holding all its
    experts) the ranks' expert bytes add up to exactly one process's, each about half."""
    src = make_tiny_model(tmp_path / "src", "qwen3_moe", num_experts=16, num_experts_per_tok=4)
    folder = convert(src, tmp_path / "flash", progress=False) and tmp_path / "flash"
    one, two = _one_process(str(folder)), _two_ranks(tmp_path, str(folder))
    assert [r["rank"] for r in two] == [0, 1] and all(r["size"] == 2 for r in two)
    assert len(one["tokens"]) == TOKENS and one["experts"]["owned"] == 16
    for r in two:
        assert r["tokens"] == one["tokens"], f"rank {r['rank']}"
        assert r["experts"]["owned"] == 8 and r["all_sum_ms"] > 0
        share = r["experts"]["bytes_read"] / one["experts"]["bytes_read"]
        assert 0.25 <= share <= 0.75, f"rank {r['rank']} reads {share:.2f} of one process's expert bytes"
    assert sum(r["experts"]["bytes_read"] for r in two) == one["experts"]["bytes_read"]


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
def test_a_second_process_waits_for_the_conversion(tmp_path):
    """While one process holds the conversion lock of the demo model's cached folder, a second
    one asking for the folder waits on the lock (seen in /proc/locks), then finds the folder
    the first converted and opens it without converting again."""
    from mlx_flash.api import DEMO_SOURCE

    env = _env(MLX_FLASH_CACHE=str(tmp_path))
    code = "from mlx_flash.api import resolve_flash_folder as r; print(r(None))"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    out = Path(first.stdout.strip())
    assert first.returncode == 0 and out.parent == tmp_path, first.stderr
    shutil.rmtree(out)  # the folder's name is known: now two processes want it at once
    with conversion_lock(out):
        p = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while not any(
            "-> FLOCK" in l and f" {p.pid} " in l for l in Path("/proc/locks").read_text().splitlines()
        ):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the second process never waited on the lock"
            time.sleep(0.05)
        convert(DEMO_SOURCE, out, progress=False)  # as the first process would
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert Path(stdout.strip()) == out and "converting" not in stderr


def _ranks_by_hand(tmp_path, module_args: list[str], **popen) -> list[subprocess.Popen]:
    """Two processes of `python -m MODULE ARGS`, rank 0 and 1 of a ring group on this machine
    (the environment mlx.launch would set), converting the demo model into tmp_path/cache."""
    port = bench.free_port(2)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = _env(MLX_HOSTFILE=str(hosts), MLX_FLASH_CACHE=str(tmp_path / "cache"))
    return [
        subprocess.Popen(
            [sys.executable, "-m", *module_args],
            env=dict(env, MLX_RANK=str(r)),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            **popen,
        )
        for r in (0, 1)
    ]


def test_chat_prints_only_on_rank_zero(tmp_path):
    """Two chat processes started by hand (the ring backend's environment, as mlx.launch sets
    it): rank 0 reads the terminal and prints the answer; rank 1 gets each line from rank 0,
    computes its share, and prints nothing."""
    procs = _ranks_by_hand(
        tmp_path, ["mlx_flash.chat", "--max-tokens", "8"], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    outs = []
    for r, p in enumerate(procs):
        try:
            outs.append(p.communicate("The for statement\n/stats\n/quit\n" if r == 0 else "", timeout=180))
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, 9)
            raise
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "mlx_flash chat" in outs[0][0] and "group: rank 0 of 2" in outs[0][0]
    assert outs[1][0] == ""


def _one_process_texts(requests) -> list[str]:
    """What one process answers (prompt, temperature, seed) with: mlx-lm's sampler, 16 tokens."""
    model, tok = mlx_flash.load(None)
    out = []
    for prompt, temp, seed in requests:
        if seed is not None:
            mx.random.seed(seed)
        rs = mlx_flash.stream_generate(model, tok, prompt, max_tokens=TOKENS, sampler=make_sampler(temp))
        out.append("".join(r.text for r in rs))
    model.flash.close()
    return out


def test_server_listens_on_rank_zero_and_the_others_follow(tmp_path):
    """Two server processes started by hand (the ring backend's environment): rank 0 alone
    listens and prints; rank 1 follows its requests. A greedy and a seeded sampled completion
    are one process's; a streamed request its client drops after two chunks ends on both ranks
    at the same token (the next request is answered: the ranks are still in step); SIGTERM to
    rank 0 stops both, exit status 0."""
    requests = [("The for statement", 0.0, None), ("The while", 0.8, 3)]
    want = _one_process_texts(requests)
    procs = _ranks_by_hand(
        tmp_path, ["mlx_flash.server", "--port", "0"], stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    lines: list[list[str]] = [[], []]
    readers = [
        threading.Thread(target=lambda i=i: lines[i].extend(procs[i].stdout), daemon=True) for i in (0, 1)
    ]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + 180
        while not (serving := [line for line in lines[0] if "serving" in line]):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, lines
            time.sleep(0.1)
        url = re.search(r"(http://\S+)/v1", serving[0]).group(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)

        def complete(prompt, temp, seed):
            r = client.completions.create(
                model="mlx_flash-demo", prompt=prompt, max_tokens=TOKENS, temperature=temp, seed=seed
            )
            return r.choices[0].text, r.usage.model_extra["flash"]

        text, flash = complete(*requests[0])
        assert text == want[0] and flash["group_size"] == 2 and flash["rank"] == 0
        stream = client.completions.create(
            model="mlx_flash-demo", prompt=requests[0][0], max_tokens=200, temperature=0, stream=True
        )
        for i, _ in enumerate(stream):
            if i == 1:
                break
        stream.response.close()
        assert complete(*requests[1])[0] == want[1]
        assert complete(*requests[0])[0] == want[0]
        procs[0].send_signal(signal.SIGTERM)
        assert [p.wait(timeout=60) for p in procs] == [0, 0], lines
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    for t in readers:
        t.join(timeout=10)
    assert any("stopped" in line for line in lines[0])
    assert "".join(lines[1]) == ""  # rank 1 printed nothing, its conversion included
