"""A synthetic mixture-of-experts model as transformers saves one (per-expert bf16 tensors),
written layer by layer (memory: one tensor at a time), to measure the conversion's memory.

    python tools/make_synthetic_moe.py --out DIR [--layers 16 --experts 64 --hidden 1024 --moe-intermediate 512]

The architecture is qwen3_moe (mlx-lm's), random weights, one safetensors shard per layer with
an index, as a Hugging Face folder has; the defaults make about 3.3 GB. The tokenizer is the
tests' byte-level BPE (tests/tiny_models.py), so the folder loads and generates too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_flash.dtypes import from_float32  # noqa: E402
from mlx_flash.safetensors_file import PlannedTensor, SafetensorsWriter  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--vocab", type=int, default=300)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d, f, e, heads = args.hidden, args.moe_intermediate, args.experts, 8
    cfg = {
        "model_type": "qwen3_moe",
        "hidden_size": d,
        "num_hidden_layers": args.layers,
        "intermediate_size": 4 * d,
        "moe_intermediate_size": f,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": d // heads,
        "num_experts": e,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "vocab_size": args.vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    rng = np.random.default_rng(0)
    hd = d // heads
    weight_map = {}

    def shard(name: str, tensors: dict[str, tuple[int, ...]]) -> None:
        planned = [PlannedTensor(n, "BF16", s) for n, s in tensors.items()]
        with SafetensorsWriter(out / name, planned) as w:
            for n, s in tensors.items():
                ones = n.endswith("norm.weight")
                x = (
                    np.ones(s, np.float32)
                    if ones
                    else rng.standard_normal(s, dtype=np.float32) * s[-1] ** -0.5
                )
                w.write(n, from_float32(x, "BF16"))
        weight_map.update({n: name for n in tensors})

    shard(
        "model-embed.safetensors",
        {
            "model.embed_tokens.weight": (args.vocab, d),
            "model.norm.weight": (d,),
            "lm_head.weight": (args.vocab, d),
        },
    )
    for i in range(args.layers):
        pre = f"model.layers.{i}"
        t = {
            f"{pre}.input_layernorm.weight": (d,),
            f"{pre}.post_attention_layernorm.weight": (d,),
            f"{pre}.self_attn.q_proj.weight": (heads * hd, d),
            f"{pre}.self_attn.k_proj.weight": (2 * hd, d),
            f"{pre}.self_attn.v_proj.weight": (2 * hd, d),
            f"{pre}.self_attn.o_proj.weight": (d, heads * hd),
            f"{pre}.self_attn.q_norm.weight": (hd,),
            f"{pre}.self_attn.k_norm.weight": (hd,),
            f"{pre}.mlp.gate.weight": (e, d),
        }
        for x in range(e):
            t[f"{pre}.mlp.experts.{x}.gate_proj.weight"] = (f, d)
            t[f"{pre}.mlp.experts.{x}.up_proj.weight"] = (f, d)
            t[f"{pre}.mlp.experts.{x}.down_proj.weight"] = (d, f)
        shard(f"model-layer-{i:03d}.safetensors", t)
        print(f"layer {i + 1}/{args.layers}", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    from tiny_models import write_tokenizer

    write_tokenizer(out, args.vocab)
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {total / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
