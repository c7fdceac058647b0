"""OPT (Zhang et al. 2022, Meta's "Open Pre-trained Transformers") for MLX, in mlx-lm's style.

mlx-lm has no OPT, and OPT-6.7B is the main model of "LLM in a flash". This module follows
mlx-lm's model protocol (`ModelArgs.from_dict`, `Model(args)`, `Model.__call__(inputs, cache,
input_embeddings) -> logits`, `.layers`, `sanitize(weights)`), so `mlx_lm.generate`,
`stream_generate`, `generate_step` and `mlx_lm.utils.load_model(get_model_classes=...)` take it.

Supported: the pre-LayerNorm OPTs (125m, 1.3b, 2.7b, 6.7b, 13b, 30b, 66b), with learned
positions (position p reads row p + 2 of `embed_positions`), biased projections, and an
lm_head tied to the token embeddings (or not). Not supported, with a clear error: OPT-350m's
post-LayerNorm layers and its embedding projections (`word_embed_proj_dim != hidden_size`).

Parameter names mirror the Hugging Face checkpoint's (`model.decoder.layers.N.self_attn.q_proj`
...), except that each layer's FFN is a submodule `mlp` (`...layers.N.mlp.fc1`, `mlp.fc2`): the
layer computes `h + self.mlp(self.final_layer_norm(h))`, so another module (mlx_flash's
FlashFFN) can replace `layer.mlp`. `sanitize` maps the checkpoint's `...layers.N.fc1.*` there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention

from ..families import ACTIVATIONS, UnsupportedModelError

# OPT's learned positional embedding is offset by 2 (a fairseq legacy): position p uses row p+2.
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which OPT uses


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "opt"
    hidden_size: int = 768
    ffn_dim: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    vocab_size: int = 50272
    max_position_embeddings: int = 2048
    activation_function: str = "relu"
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if not self.do_layer_norm_before:
            raise UnsupportedModelError(
                "this OPT applies LayerNorm after attention and FFN (do_layer_norm_before=false, "
                "as OPT-350m does): only pre-LayerNorm OPTs are supported (125m, 1.3b, 2.7b, 6.7b, ...)"
            )
        if self.word_embed_proj_dim != self.hidden_size:
            raise UnsupportedModelError(
                f"this OPT projects its embeddings (word_embed_proj_dim={self.word_embed_proj_dim} "
                f"!= hidden_size={self.hidden_size}, as OPT-350m does): not supported"
            )
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedModelError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {self.activation_function!r} of opt is not supported "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})"
            )


def activation_fn(name: str):
    """The MLX function for a config's activation name ("relu", "gelu", "gelu_new", ...)."""
    return getattr(nn, ACTIVATIONS[name])


def _layer_norm(args: ModelArgs) -> nn.LayerNorm:
    return nn.LayerNorm(args.hidden_size, eps=LAYER_NORM_EPS, affine=args.layer_norm_elementwise_affine)


class OPTAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d = args.hidden_size
        self.num_heads = args.num_attention_heads
        self.head_dim = d // self.num_heads
        self.scale = self.head_dim**-0.5
        bias = args.enable_bias
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def __call__(self, x: mx.array, mask: Any | None = None, cache: Any | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class OPTMLP(nn.Module):
    """fc2(act(fc1 x + b1)) + b2. A layer's `mlp` attribute: replaceable by any module with the
    same call (mlx_flash's FlashFFN)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.activation = args.activation_function
        self.fc1 = nn.Linear(args.hidden_size, args.ffn_dim, bias=args.enable_bias)
        self.fc2 = nn.Linear(args.ffn_dim, args.hidden_size, bias=args.enable_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(activation_fn(self.activation)(self.fc1(x)))


class OPTDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = OPTAttention(args)
        self.self_attn_layer_norm = _layer_norm(args)
        self.mlp = OPTMLP(args)
        self.final_layer_norm = _layer_norm(args)

    def __call__(self, x: mx.array, mask: Any | None = None, cache: Any | None = None) -> mx.array:
        h = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache)
        return h + self.mlp(self.final_layer_norm(h))


class OPTDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.max_positions = args.max_position_embeddings
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.embed_positions = nn.Embedding(args.max_position_embeddings + POSITION_OFFSET, args.hidden_size)
        self.layers = [OPTDecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.final_layer_norm = _layer_norm(args)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        L = h.shape[1]
        if cache is None:
            cache = [None] * len(self.layers)
        offset = cache[0].offset if cache[0] is not None else 0
        if isinstance(offset, int):
            if offset + L > self.max_positions:
                raise ValueError(
                    f"OPT has learned positions for {self.max_positions} tokens; this call "
                    f"needs {offset + L} (prompt plus generated tokens): use a shorter prompt or max_tokens"
                )
            positions = mx.arange(offset, offset + L)
        else:
            # A batch cache's per-sequence offsets ([B], negative for left padding): padded
            # positions, masked anyway, are clipped to 0.
            positions = mx.maximum(offset[:, None] + mx.arange(L), 0)
        h = h + self.embed_positions(positions + POSITION_OFFSET).astype(h.dtype)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.final_layer_norm(h)


class OPTModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = OPTDecoder(args)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None) -> mx.array:
        return self.decoder(inputs, cache, input_embeddings)


# A checkpoint's layer FFN names, moved under the layer's `mlp`.
_FFN_NAME = re.compile(r"^(model\.decoder\.layers\.\d+\.)(fc[12]\.)")


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OPTModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None) -> mx.array:
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.decoder.embed_tokens.as_linear(out)
        return self.lm_head(out)

    @property
    def layers(self):
        return self.model.decoder.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hugging Face names -> this module's: `decoder.*` gets the `model.` prefix that some
        checkpoints lack, `...layers.N.fc1/fc2` move to `...layers.N.mlp.fc1/fc2`, a tied
        `lm_head.weight` is dropped. Names already in this module's form pass unchanged."""
        out = {}
        for name, w in weights.items():
            if name.startswith("decoder."):
                name = "model." + name
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            out[_FFN_NAME.sub(r"\1mlp.\2", name)] = w
        return out
