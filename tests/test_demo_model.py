"""The bundled demo model (mlx_flash/demo_model, made by tools/train_demo_model.py)."""

import json
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "mlx_flash" / "demo_model"


def test_folder_exists_and_is_small():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "demo_model_card.json"):
        assert (DEMO / name).is_file(), name
    size = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert size <= 30 * 1024 * 1024


def test_config_is_relu_llama():
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_act"] == "relu"
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"


def test_card_says_every_layer_is_sparse():
    config = json.loads((DEMO / "config.json").read_text())
    card = json.loads((DEMO / "demo_model_card.json").read_text())
    per_layer = card["held_out"]["inactive_fraction_per_layer"]
    assert len(per_layer) == config["num_hidden_layers"]
    assert all(v >= 0.90 for v in per_layer), per_layer
    assert card["held_out"]["perplexity"] > 1


def test_weights_have_hf_names_and_shapes():
    from safetensors import safe_open

    config = json.loads((DEMO / "config.json").read_text())
    d, f, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    with safe_open(str(DEMO / "model.safetensors"), framework="numpy") as st:
        keys = set(st.keys())
        assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys
        for i in range(n):
            p = f"model.layers.{i}."
            for proj in ("q", "k", "v", "o"):
                assert f"{p}self_attn.{proj}_proj.weight" in keys
            assert st.get_slice(f"{p}mlp.gate_proj.weight").get_shape() == [f, d]
            assert st.get_slice(f"{p}mlp.up_proj.weight").get_shape() == [f, d]
            assert st.get_slice(f"{p}mlp.down_proj.weight").get_shape() == [d, f]
            assert f"{p}input_layernorm.weight" in keys
            assert f"{p}post_attention_layernorm.weight" in keys
        assert len(keys) == 3 + 9 * n
        assert st.get_slice("lm_head.weight").get_dtype() == "F32"


def test_tokenizer_round_trips():
    pytest.importorskip("mlx_lm")
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(DEMO)
    text = 'The "pass" statement — def f(x):\n    return x ** 2  # ünïcode'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert 0 < len(ids) < len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>"


def test_trains_on_text_files_and_holds_whole_files_out(tmp_path, capsys):
    """--text FILE...: a model trained on other text than pydoc's topics, one document a file;
    the held-out files are never trained on, and --evaluate measures the held-out ones again."""
    pytest.importorskip("mlx_lm")
    import train_demo_model as tool  # tools/, on the path from conftest

    topics = tool.load_topics()
    files = []
    for k, name in enumerate(sorted(topics)[:40]):
        f = tmp_path / "text" / f"doc{k:02d}.txt"
        f.parent.mkdir(exist_ok=True)
        f.write_text(topics[name][:3000] + "\n", encoding="utf-8")
        files.append(str(f))
    out = tmp_path / "model"
    shape = ["--hidden-size", "32", "--num-hidden-layers", "1", "--intermediate-size", "64"]
    tool.main(["--out", str(out), "--steps", "10", "--num-attention-heads", "2", *shape, "--text", *files])
    card = json.loads((out / "demo_model_card.json").read_text())
    held = card["held_out_topics"]
    assert card["data"]["text_files"] == sorted(files)
    assert held and set(held) < set(files)
    assert card["data"]["train_topics"] == len(files) - len(held)
    capsys.readouterr()
    tool.main(["--evaluate", str(out)])
    printed = capsys.readouterr().out
    assert f"({len(held)} topics)" in printed
    assert f"{card['held_out']['perplexity']:.4f}" in printed.split("card says")[0]
