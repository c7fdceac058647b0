"""The bundled demo model through the flash path: the README's command, exactness, memory."""

from __future__ import annotations

import gc
import re
import shlex
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

import mlx_flash
from mlx_flash.api import DEMO_SOURCE, resolve_flash_folder
from mlx_flash.model import load_dense

README = Path(__file__).parent.parent / "README.md"
PROMPT = "The for statement is used to iterate over the elements of a sequence"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_main_command_runs():
    main, tests = readme_commands()
    assert main.startswith("pip install . && ") and tests.startswith("pip install -e")
    cmd = shlex.split(main.split("&&", 1)[1])
    assert cmd[:3] == ["python", "-m", "mlx_flash.generate"]
    r = subprocess.run([sys.executable, *cmd[1:], "--max-tokens", "16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert re.search(r"flash: [0-9.]+ MB in \d+ reads per token", r.stdout), r.stdout
    assert "per token:" in r.stdout and "I/O wait" in r.stdout


@pytest.fixture(scope="module")
def demo():
    folder = resolve_flash_folder(None)
    tok = mlx_lm.utils.load_tokenizer(DEMO_SOURCE)
    ref = [r.token for r in mlx_lm.stream_generate(load_dense(DEMO_SOURCE), tok, PROMPT, max_tokens=48)]
    return folder, tok, ref


def test_demo_flash_exact_equals_dense(demo):
    folder, tok, ref = demo
    model, _ = mlx_flash.load(folder, mode="flash", selection="exact")
    got = [r.token for r in mlx_flash.stream_generate(model, tok, PROMPT, max_tokens=48)]
    assert got == ref
    s = mlx_flash.flash_stats(model)
    # a sparse model: a token loads a small part of each layer's FFN
    assert s.neurons_loaded_per_token < 0.25 * 1024 * model.flash.manifest.num_layers
    model.flash.close()


# What MLX allocates beyond the plan: activations, logits, the sampled token, and a block of
# rows converted from flash in flight. Measured at 0.1-0.2 MB on the demo model (the printed line).
FIXED_OVERHEAD_BYTES = 1_000_000


@pytest.mark.parametrize("mode", ["hybrid", "flash"])
def test_demo_ffn_twice_its_budget_keeps_peak_memory_within_it(demo, mode):
    """The memory given to the FFN is half its size; the plan, and MLX's peak, keep inside the
    budget plus a fixed overhead, and the text is still exactly the dense model's."""
    folder, tok, ref = demo
    probe, _ = mlx_flash.load(folder, context=256)
    plan = probe.flash.plan
    ffn_bytes = plan.neuron_bytes_all_layers * probe.flash.manifest.layers[0].num_neurons
    probe.flash.close()
    del probe
    gc.collect()
    budget = plan.dense_bytes + plan.kv_bytes + ffn_bytes // 2
    mx.clear_cache()
    mx.reset_peak_memory()
    model, _ = mlx_flash.load(folder, mode=mode, memory_budget=budget, context=256)
    assert model.flash.plan.total_bytes <= budget
    got = [r.token for r in mlx_flash.stream_generate(model, tok, PROMPT, max_tokens=48)]
    assert got == ref
    peak = mx.get_peak_memory()
    print(
        f"{mode}: budget {budget / 1e6:.2f} MB, plan {model.flash.plan.total_bytes / 1e6:.2f} MB, MLX peak {peak / 1e6:.2f} MB"
    )
    assert peak <= budget + FIXED_OVERHEAD_BYTES, f"peak {peak / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB"
    model.flash.close()
