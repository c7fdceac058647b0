"""Tiny random models of several architectures, written as Hugging Face folders for tests.

Nothing is downloaded: weights come from a seeded generator, the tokenizer is a byte-level BPE
trained in a fraction of a second on a few sentences. mlx-lm's architectures (llama, qwen2,
qwen3, phi) are instantiated from mlx-lm itself so their tensor names are the real ones; OPT,
which mlx-lm lacks, is written with the Hugging Face checkpoint's names.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. A flash of light, a page of text, a model "
    "that reads its neurons from the disk. Python is a programming language; numbers 0123456789. "
) * 20


def base_config(model_type: str, **over) -> dict:
    cfg = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "hidden_act": "relu",
    }
    if model_type == "qwen3":
        cfg["head_dim"] = 16
    if model_type == "phi":
        cfg.update(
            partial_rotary_factor=0.5, layer_norm_eps=1e-5, hidden_act="gelu_new", num_key_value_heads=4
        )
    if model_type == "opt":
        cfg = {
            "model_type": "opt",
            "hidden_size": 64,
            "word_embed_proj_dim": 64,
            "num_hidden_layers": 2,
            "ffn_dim": 256,
            "num_attention_heads": 4,
            "vocab_size": 300,
            "max_position_embeddings": 512,
            "activation_function": "relu",
            "do_layer_norm_before": True,
            "enable_bias": True,
            "layer_norm_elementwise_affine": True,
            "tie_word_embeddings": True,
        }
    if model_type in MOE_CONFIGS:
        cfg.update(MOE_CONFIGS[model_type])
    cfg.update(over)
    return cfg


# Tiny mixtures of experts: 8 experts, 2 per token (mlx-lm's own architectures).
_MOE = {"num_experts_per_tok": 2, "hidden_act": "silu"}
MOE_CONFIGS = {
    "qwen3_moe": {
        **_MOE,
        "num_experts": 8,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "head_dim": 16,
        "norm_topk_prob": True,
    },
    "mixtral": {**_MOE, "num_local_experts": 8, "intermediate_size": 32},
    "olmoe": {**_MOE, "num_experts": 8, "intermediate_size": 32, "norm_topk_prob": False},
    "deepseek_v3": {  # a first dense layer, shared experts, grouped sigmoid routing
        **_MOE,
        "num_hidden_layers": 3,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "num_key_value_heads": 4,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
    },
    "gpt_oss": {
        **_MOE,
        "num_local_experts": 8,
        "intermediate_size": 32,
        "head_dim": 16,
        "num_key_value_heads": 2,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}


def make_tiny_model(
    folder: Path,
    model_type: str = "llama",
    *,
    dtype: str = "float32",
    seed: int = 0,
    shards: int = 1,
    tokenizer: bool = True,
    **config_over,
) -> Path:
    """Write a random model of `model_type` into `folder` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = base_config(model_type, **config_over)
    if model_type == "opt":
        weights = _opt_weights(cfg, seed)
    else:
        mx.random.seed(seed)
        mod = importlib.import_module(f"mlx_lm.models.{model_type}")
        model = mod.Model(mod.ModelArgs.from_dict(cfg))
        weights = dict(tree_flatten(model.parameters()))
        for k, v in weights.items():  # routers mlx-lm starts at zero (DeepSeek's): random, or all tie
            if v.ndim and not mx.any(v != 0).item() and (k.endswith("gate.weight") or "correction" in k):
                weights[k] = mx.random.normal(v.shape) * (0.5 if v.ndim > 1 else 0.1)
    weights = {k: v.astype(MX_DTYPES[dtype]) for k, v in weights.items()}
    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), weights)
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[s::shards]}
            mx.save_safetensors(str(folder / fname), part)
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    cfg["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    if tokenizer:
        write_tokenizer(folder, cfg["vocab_size"])
    return folder


def _opt_weights(cfg: dict, seed: int) -> dict[str, mx.array]:
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"]
    w: dict[str, np.ndarray] = {}

    def lin(name: str, out_dim: int, in_dim: int) -> None:
        w[f"{name}.weight"] = rng.normal(0, in_dim**-0.5, (out_dim, in_dim))
        w[f"{name}.bias"] = rng.normal(0, 0.02, (out_dim,))

    def norm(name: str) -> None:
        w[f"{name}.weight"] = 1 + rng.normal(0, 0.05, (d,))
        w[f"{name}.bias"] = rng.normal(0, 0.02, (d,))

    w["model.decoder.embed_tokens.weight"] = rng.normal(0, 0.5, (v, d))
    w["model.decoder.embed_positions.weight"] = rng.normal(0, 0.1, (cfg["max_position_embeddings"] + 2, d))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.decoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lin(f"{p}.self_attn.{proj}", d, d)
        norm(f"{p}.self_attn_layer_norm")
        lin(f"{p}.fc1", f, d)
        lin(f"{p}.fc2", d, f)
        norm(f"{p}.final_layer_norm")
    norm("model.decoder.final_layer_norm")
    return {k: mx.array(a.astype(np.float32)) for k, a in w.items()}


_TOKENIZER_CACHE: dict[int, Path] = {}


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of at most `vocab_size` tokens, saved with transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))


def make_mlx_quantized_model(
    folder: Path,
    model_type: str = "llama",
    *,
    bits: int = 4,
    group_size: int = 64,
    seed: int = 0,
    **config_over,
) -> Path:
    """An mlx-community-style quantized folder: a tiny float model quantized by mlx-lm itself
    (`mlx_lm.utils.quantize_model`), saved as mlx_lm.convert saves one: packed `*.weight`
    (uint32), `*.scales`, `*.biases`, and `quantization` in config.json."""
    import shutil

    from mlx_lm.utils import load_model, quantize_model, save_config

    from mlx_flash.models import get_model_classes

    folder = Path(folder)
    float_src = make_tiny_model(folder.parent / f".{folder.name}-float", model_type, seed=seed, **config_over)
    model, config = load_model(float_src, get_model_classes=get_model_classes)
    model, config = quantize_model(model, config, group_size, bits)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"}
    )
    save_config(config, folder / "config.json")
    for f in float_src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, folder / f.name)
    shutil.rmtree(float_src)
    return folder


def write_transformers_experts(src: Path, dst: Path) -> Path:
    """A copy of the mlx-lm-named MoE folder `src` with its routed experts as transformers saves
    them (the inverse of mlx-lm's sanitize): one tensor per expert and projection
    (``mlp.experts.{e}.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``),
    gpt-oss's fused, interleaved ``experts.gate_up_proj [E, hidden, 2I]`` with its bias and
    ``experts.down_proj [E, I, hidden]``. The other tensors keep mlx-lm's names."""
    import shutil

    dst = Path(dst)
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    out: dict[str, mx.array] = {}
    mixtral = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for name, a in weights.items():
        if cfg["model_type"] == "gpt_oss" and ".mlp.experts." in name:
            stem, proj, field = name.rsplit(".", 2)
            if proj == "down_proj":
                out[f"{stem}.down_proj" + ("_bias" if field == "bias" else "")] = (
                    a if field == "bias" else a.swapaxes(-1, -2)
                )
            elif proj == "gate_proj":
                up = weights[f"{stem}.up_proj.{field}"]
                fused = mx.stack([a, up], axis=-2 if field == "weight" else -1)  # interleaved rows
                fused = (
                    fused.reshape(a.shape[0], -1, a.shape[-1])
                    if field == "weight"
                    else fused.reshape(a.shape[0], -1)
                )
                out[f"{stem}.gate_up_proj" + ("_bias" if field == "bias" else "")] = (
                    fused if field == "bias" else fused.swapaxes(-1, -2)
                )
            continue
        if ".switch_mlp." in name:
            stem, rest = name.split(".switch_mlp.")
            proj, field = rest.split(".")
            if cfg["model_type"] == "mixtral":
                proj = mixtral[proj]
            for e in range(a.shape[0]):
                out[f"{stem}.experts.{e}.{proj}.{field}"] = a[e]
            continue
        out[name] = a
    mx.save_safetensors(str(dst / "model.safetensors"), out)
    return dst


def make_moe_source(folder, name: str):
    """A tiny MoE source folder: `name` a family of make_tiny_model, or FAMILY-4bit (mlx-lm's
    own 4-bit quantization of it, groups of 32)."""
    if name.endswith("-4bit"):
        return make_mlx_quantized_model(folder, name.split("-")[0], bits=4, group_size=32)
    return make_tiny_model(folder, name)


def run_module(module: str, *args, input: str | None = None) -> subprocess.CompletedProcess:
    """`python -m mlx_flash.MODULE ARGS...` in a child process, its output captured as text."""
    cmd = [sys.executable, "-m", f"mlx_flash.{module}", *map(str, args)]
    return subprocess.run(cmd, input=input, capture_output=True, text=True)
