"""The model architectures mlx_flash takes, and where each keeps its FFN.

One table says, per `model_type` of a config.json: the names of the FFN's weights in a Hugging
Face checkpoint, which neuron-indexed parts they make (a gate row, an up row, a down column),
the activation, and how many layers / neurons there are. The converter uses it to cut the FFN
out of a checkpoint; the model loader uses it to build the FlashFFN that replaces the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MlxFlashError


class UnsupportedModelError(MlxFlashError):
    """The model folder's architecture is not one mlx_flash can run."""


@dataclass(frozen=True)
class PartSource:
    """One neuron-indexed part of an FFN: neuron i is row i ("row") or column i ("col") of the
    source weight `suffix` (a suffix of the layer prefix)."""

    name: str  # gate | up | down
    suffix: str
    orientation: str  # row | col


@dataclass(frozen=True)
class Family:
    """An FFN family: gated (down(act(gate x) * up x)) or two-matrix (fc2(act(fc1 x + b1)) + b2)."""

    name: str
    parts: tuple[PartSource, ...]
    # Weights of the FFN that are not neuron bundles but stay with the dense model, by role:
    # "up_bias" is indexed by neuron (kept resident, gathered into the cache), "down_bias" is
    # added to the output.
    biases: dict[str, str]

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)


GATED = Family(
    name="gated",
    parts=(
        PartSource("gate", "mlp.gate_proj.weight", "row"),
        PartSource("up", "mlp.up_proj.weight", "row"),
        PartSource("down", "mlp.down_proj.weight", "col"),
    ),
    biases={},
)

TWO_MATRIX_PHI = Family(
    name="two_matrix",
    parts=(PartSource("up", "mlp.fc1.weight", "row"), PartSource("down", "mlp.fc2.weight", "col")),
    biases={"up_bias": "mlp.fc1.bias", "down_bias": "mlp.fc2.bias"},
)

TWO_MATRIX_OPT = Family(
    name="two_matrix",
    parts=(PartSource("up", "fc1.weight", "row"), PartSource("down", "fc2.weight", "col")),
    biases={"up_bias": "fc1.bias", "down_bias": "fc2.bias"},
)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    family: Family
    layer_prefix: str  # format string with {i}
    intermediate_key: str  # config key holding the number of FFN neurons
    activation_key: str  # config key holding the activation's name
    default_activation: str

    def activation(self, config: dict) -> str:
        act = config.get(self.activation_key) or self.default_activation
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {act!r} of {self.model_type} is not supported "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})"
            )
        return act

    def num_neurons(self, config: dict) -> int:
        return int(config[self.intermediate_key])

    def source_name(self, layer: int, suffix: str) -> str:
        return self.layer_prefix.format(i=layer) + suffix


# Activation names as configs spell them -> the function mlx_flash applies.
ACTIVATIONS = {
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_approx",
    "gelu_pytorch_tanh": "gelu_approx",
    "gelu_fast": "gelu_approx",
    # dReLU (TurboSparse): relu on both the gate and the up projection of a gated FFN. Its
    # checkpoints run custom code, so convert --activation drelu says so where config.json cannot.
    "drelu": "drelu",
}

_GATED_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")

ARCHITECTURES: dict[str, Architecture] = {
    **{
        mt: Architecture(mt, GATED, "model.layers.{i}.", "intermediate_size", "hidden_act", "silu")
        for mt in _GATED_LLAMA_LIKE
    },
    "phi": Architecture(
        "phi", TWO_MATRIX_PHI, "model.layers.{i}.", "intermediate_size", "hidden_act", "gelu_new"
    ),
    "opt": Architecture(
        "opt", TWO_MATRIX_OPT, "model.decoder.layers.{i}.", "ffn_dim", "activation_function", "relu"
    ),
}


def architecture_for(config: dict) -> Architecture:
    """The Architecture of a config.json, or a one-line UnsupportedModelError naming it."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    mlx_quantization(config)
    return ARCHITECTURES[model_type]


def mlx_quantization(config: dict) -> dict | None:
    """config.json's MLX quantization (mlx-community folders: `quantization` with group_size,
    bits and mode "affine"), or None for a float model. Any other quantization (GPTQ, AWQ,
    bitsandbytes, MLX's fp4/fp8 modes) is a one-line UnsupportedModelError."""
    q = config.get("quantization")
    if q is None:
        if config.get("quantization_config"):
            method = (
                config["quantization_config"].get("quant_method")
                if isinstance(config["quantization_config"], dict)
                else None
            )
            raise UnsupportedModelError(
                f"quantization {method or 'quantization_config'!r} is not supported: convert from a float16/bfloat16/"
                "float32 checkpoint or an MLX (mlx-community) affine-quantized one"
            )
        return None
    if (
        not isinstance(q, dict)
        or not isinstance(q.get("group_size"), int)
        or not isinstance(q.get("bits"), int)
    ):
        raise UnsupportedModelError(
            "config.json: malformed `quantization` (needs integer group_size and bits)"
        )
    if q.get("mode", "affine") != "affine":
        raise UnsupportedModelError(
            f"MLX quantization mode {q.get('mode')!r} is not supported (only affine): convert from a float checkpoint"
        )
    return q


# Config keys that say a model routes tokens to experts (whatever the family calls them).
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def config_experts(config: dict) -> int:
    """The number of routed experts config.json declares (0: none); also in a nested settings
    block (DBRX's ``ffn_config``)."""
    for k in EXPERT_COUNT_KEYS:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 1:
            return v
    return next((n for v in config.values() if isinstance(v, dict) and (n := config_experts(v))), 0)


def check_moe_config(config: dict) -> None:
    """For the dense (neuron) path: a config with routed experts is not one it converts."""
    if config_experts(config):
        model_type = config.get("model_type")
        raise UnsupportedModelError(
            f"architecture {model_type!r} has routed experts but mlx_flash cannot stream them: its mlx-lm model "
            "does not build them from SwitchGLU/SwitchMLP modules (or mlx-lm has no such model)"
        )
