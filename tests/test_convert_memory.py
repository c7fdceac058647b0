"""The converter streams: converting a model takes far less memory than the model's size."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mlx_flash.safetensors_file import PlannedTensor, SafetensorsWriter

HIDDEN, NEURONS, LAYERS, VOCAB = 1024, 4096, 8, 256


def write_big_llama(folder):
    """A ~400 MB float32 llama checkpoint written tensor by tensor (never whole in memory)."""
    folder.mkdir()
    cfg = dict(
        model_type="llama",
        hidden_size=HIDDEN,
        intermediate_size=NEURONS,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=VOCAB,
        hidden_act="relu",
        rms_norm_eps=1e-5,
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "mlp.gate_proj.weight": (NEURONS, HIDDEN),
                p + "mlp.up_proj.weight": (NEURONS, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, NEURONS),
                p + "input_layernorm.weight": (HIDDEN,),
            }
        )
    planned = [PlannedTensor(n, "F32", s) for n, s in shapes.items()]
    rng = np.random.default_rng(0)
    with SafetensorsWriter(folder / "model.safetensors", planned) as w:
        for t in planned:
            w.write(t.name, rng.standard_normal(t.shape, dtype=np.float32))
    return sum(t.nbytes for t in planned), max(t.nbytes for t in planned)


def peak_rss_of(code: str) -> int:
    """Peak resident memory of a fresh interpreter running `code` (bytes). The high-water mark
    is reset first: on Linux a child starts with its parent's (pytest's) peak otherwise."""
    prefix = "open('/proc/self/clear_refs', 'w').write('5'); "
    report = "; print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    out = subprocess.run(
        [sys.executable, "-c", prefix + code + report], check=True, capture_output=True, text=True
    ).stdout
    return int(out.split()[-1]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc high-water mark")
def test_conversion_memory_is_a_small_multiple_of_the_largest_tensor(tmp_path):
    model_bytes, largest = write_big_llama(tmp_path / "src")
    baseline = peak_rss_of("import mlx_flash.convert")
    peak = peak_rss_of(
        "from mlx_flash.convert import convert; "
        f"convert({str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, progress=False)"
    )
    used = max(0, peak - baseline)
    assert (tmp_path / "out" / "flash_manifest.json").is_file()
    print(
        f"model {model_bytes / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB, conversion peak {used / 1e6:.0f} MB over a {baseline / 1e6:.0f} MB baseline"
    )
    assert used < 4 * largest, (
        f"conversion used {used / 1e6:.0f} MB over baseline; largest tensor {largest / 1e6:.0f} MB"
    )
    assert used < model_bytes / 4, (
        f"conversion used {used / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"
    )
