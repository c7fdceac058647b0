"""Build an mlx-lm model from a flash folder, each layer's MLP replaced by a FlashFFN.

The model class comes from mlx-lm (or from `mlx_flash.models` for OPT); its MLPs are swapped
for FlashFFNs right after construction, so no FFN neuron weight is ever loaded: the dense
weights come from `dense.safetensors` alone, and the FFN's per-neuron and output biases are
taken out of them and kept by the FlashFFN.

A quantized folder's dense part is made quantized as mlx-lm makes an mlx-community model
(`quantize.quantize_loaded`, from config.json's `quantization`), and its FFN rows stay quantized
wherever they are held: the neuron caches, the hybrid's resident rows, the exact selector.

Under `mlx.launch -n N` each process owns a part of every layer's neurons (distributed.py): the
memory plan is made for the dense part and this rank's neurons (a budget, and a percentage, are
of this rank's memory), and only its neurons' selector, resident and cached rows are read.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import layout, vocab
from .budget import ModelSizes, parse_budget, plan_with_selection
from .cache import NeuronCache
from .distributed import Shard, balanced, process_shard
from .errors import MlxFlashError, closed_on_error, one_line
from .families import ACTIVATIONS, architecture_for
from .ffn import ACTIVATION_FUNCTIONS, FlashFFN, LayerState, activate, tap_residuals
from .models import get_model_classes
from .quantize import quantize_loaded
from .reader import FlashReader
from .runtime import FlashRuntime, VerifyingReader
from .safetensors_file import read_header

DEFAULT_WINDOW = 5  # the paper keeps the last 4-5 tokens' neurons
DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class FlashOptions:
    mode: str = "flash"
    memory_budget: int | float | str | None = None
    window: int | None = None
    selection: str | None = None
    threads: int | None = None
    context: int | None = None  # tokens of KV cache the plan reserves
    verify: bool = False
    shard: Shard | None = None  # this process's part of each layer's neurons; None: the launch's
    lookahead: bool = False  # flash decode: read ahead the next layer's guessed neurons (see ffn.py)
    expert_policy: str = "lru"  # MoE: the expert pools' eviction policy (lru, lfu, pinned; naive: no reuse)
    overlap: bool = True  # MoE decode: compute resident experts while the missing ones are read


def compute_dtype_for(flash_dtype: str) -> mx.Dtype:
    """fp32 on a CPU (fp16/bf16 matmuls are several times slower there), else the flash dtype."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    return {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[flash_dtype]


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise layout.FlashFormatError(f"{folder}: no config.json; re-run mlx_flash.convert") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise layout.FlashFormatError(f"{folder / 'config.json'}: not valid JSON") from None
    if not isinstance(config, dict):
        raise layout.FlashFormatError(f"{folder / 'config.json'}: not a JSON object")
    return config


def build_model_skeleton(config: dict) -> nn.Module:
    """The architecture's model with random weights (mlx-lm's, or ours for OPT)."""
    try:
        model_cls, args_cls = get_model_classes(config)
        return model_cls(args_cls.from_dict(config))
    except Exception as e:  # a malformed config can fail anywhere in the model's constructor
        raise MlxFlashError(
            f"cannot build a {config.get('model_type')!r} model from config.json ({type(e).__name__}: {one_line(e)})"
        ) from None


def check_config(folder: Path, manifest: layout.Manifest, config: dict):
    """config.json against the manifest: the same architecture, activation, layer count, hidden
    size and neurons per layer; returns the Architecture. A mismatch is a FlashFormatError."""
    try:
        arch = architecture_for(config)
        act = arch.activation(config)
    except TypeError:  # an unhashable model_type or activation
        raise layout.FlashFormatError(
            f"{folder / 'config.json'}: malformed model_type or activation"
        ) from None
    neurons = config.get(arch.intermediate_key)
    checks = [
        ("model_type", config.get("model_type"), manifest.model_type),
        ("FFN family", arch.family.name, manifest.family),
        ("FFN parts", arch.family.part_names, manifest.part_names),
        ("activation", ACTIVATIONS[act], ACTIVATIONS.get(manifest.activation)),
        ("num_hidden_layers", config.get("num_hidden_layers"), manifest.num_layers),
        ("hidden_size", config.get("hidden_size"), manifest.hidden_size),
    ]
    checks += [(f"elements of part {p.name!r}", manifest.hidden_size, p.elems) for p in manifest.parts]
    checks += [
        (f"{arch.intermediate_key} (layer {e.layer})", neurons, e.num_neurons) for e in manifest.layers
    ]
    for what, want, got in checks:
        if want != got or type(want) is not type(got):
            raise layout.FlashFormatError(
                f"{folder}: config.json and {layout.MANIFEST_NAME} disagree on {what} ({want!r} vs {got!r}); "
                "re-run mlx_flash.convert"
            )
    return arch


def model_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(l, "mlp") for l in layers):
        raise MlxFlashError(f"{type(model).__module__}: model layers have no `mlp` to replace")
    return list(layers)


def model_sizes(
    manifest: layout.Manifest, config: dict, dense_elems: int, model: nn.Module, dense_bytes: int = 0
) -> ModelSizes:
    args = getattr(model, "args", None)
    heads = _config_int(config, "num_attention_heads")
    kv_heads = _config_int(config, "num_key_value_heads", heads)
    head_dim = _config_int(
        config, "head_dim", getattr(args, "head_dim", None) or manifest.hidden_size // heads
    )
    return ModelSizes(
        dense_elems=dense_elems,
        num_layers=manifest.num_layers,
        num_neurons=manifest.layers[0].num_neurons,
        hidden_size=manifest.hidden_size,
        num_parts=len(manifest.parts),
        kv_elems_per_token=manifest.num_layers * 2 * kv_heads * head_dim,
        **(_quantized_sizes(manifest, dense_bytes) if manifest.quantized else {}),
    )


def _quantized_sizes(manifest: layout.Manifest, dense_bytes: int) -> dict:
    """Byte sizes of a quantized folder in memory: packed uint32 and float32 scales and
    biases in the caches and the selector (4 bytes an element, as the reader returns them)."""
    fields = manifest.row_fields()
    selector = "gate" if "gate" in manifest.part_names else "up"
    return dict(
        dense_bytes=dense_bytes,
        neuron_bytes=sum(e * 4 for e, _ in fields.values()),
        selector_neuron_bytes=sum(e * 4 for k, (e, _) in fields.items() if k.startswith(selector + ".")),
    )


def _config_int(config: dict, key: str, default: int | None = None) -> int:
    """A positive integer setting of config.json (`default` when absent or null); ValueError else."""
    value = config.get(key)
    if value is None and default is not None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def load_flash_model(
    folder: str | Path, options: FlashOptions = FlashOptions()
) -> tuple[nn.Module, FlashRuntime]:
    """The model of a flash folder, its FFNs on flash; returns (model, runtime)."""
    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    layout.check_files(folder, manifest)
    if manifest.is_moe:
        from .moe_model import load_moe_model

        return load_moe_model(folder, manifest, options)
    row_checksums = _verify(folder, manifest) if options.verify else None
    config = read_config(folder)
    arch = check_config(folder, manifest, config)
    dtype = compute_dtype_for(manifest.dtype)
    model = build_model_skeleton(config)
    layers = model_layers(model)
    dense = _DenseFile.read(folder, manifest, arch, dtype.size)
    vocab_sizes, tables = vocab.vocab_sizes(
        model, dense.header, manifest.hidden_size, dtype.size, config.get("vocab_size")
    )
    try:
        sizes = model_sizes(manifest, config, dense.elems, model, dense.bytes)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise layout.FlashFormatError(
            f"{folder / 'config.json'}: malformed attention settings ({e})"
        ) from None
    shard = options.shard or process_shard()
    if options.mode == "flash":  # parts that balance the ranks' reads, where the folder is calibrated
        shard = balanced(shard, folder, manifest.num_layers, sizes.num_neurons)
    owned = shard.most_neurons(sizes.num_neurons, manifest.num_layers)
    if shard.neurons(sizes.num_neurons)[1] == shard.neurons(sizes.num_neurons)[0]:
        raise MlxFlashError(
            f"{shard.size} processes share {sizes.num_neurons} FFN neurons a layer: rank {shard.rank} would own "
            "none; launch fewer processes"
        )
    if owned < sizes.num_neurons:  # the plan is of this rank's memory: its largest part of a layer
        sizes = replace(sizes, num_neurons=owned)
    mode = options.mode
    window = _positive_int("window", DEFAULT_WINDOW if options.window is None else options.window)
    if options.threads is not None:
        _positive_int("threads", options.threads)
    context = _context(config, options.context)
    budget = parse_budget(options.memory_budget, sizes.model_bytes(dtype.size))
    if options.selection == "predictor" and not manifest.predictors_file:
        raise MlxFlashError(
            f"{folder}: selection='predictor' but the folder has no predictors; train them with "
            f"python -m mlx_flash.predictors train --model {folder} --data TEXTFILE, or use selection='exact'"
        )
    if mode == "flash" and manifest.predictors_file and options.selection in (None, "predictor"):
        from .predictors.store import predictor_sizes

        floats, packed = predictor_sizes(folder, manifest)
        sizes = replace(sizes, predictor_elems=floats, predictor_packed_bytes=packed)
    plan, selection = plan_with_selection(
        sizes,
        mode=mode,
        budget_bytes=budget,
        dtype_bytes=dtype.size,
        context=context,
        selection=options.selection,
        has_predictors=sizes.predictor_elems > 0,
        vocab=vocab_sizes,
        auto_context=options.context is None,
    )

    act = ACTIVATION_FUNCTIONS[ACTIVATIONS[manifest.activation]]
    if row_checksums is not None:
        reader = VerifyingReader(folder, manifest, row_checksums, threads=options.threads)
    else:
        reader = FlashReader(folder, manifest, threads=options.threads)
    with closed_on_error(reader):
        runtime = FlashRuntime(
            manifest,
            reader,
            mode=mode,
            selection=selection,
            window=window,
            plan=plan,
            act=act,
            compute_dtype=dtype,
            shard=shard,
        )
    with closed_on_error(runtime):
        if mode == "flash" and selection == "predictor":
            from .predictors.store import Predictors

            runtime.predictors = Predictors.load(folder, manifest, dtype)
            # Not ReLU: a cached neuron not predicted for this token is zeroed (see ffn.py).
            runtime.mask_inactive = ACTIVATIONS[manifest.activation] not in ("relu", "drelu")
        weights = dense_weights(folder, manifest, dtype)
        biases = {key: weights.pop(name) for key, name in dense.bias_names.items()}
        for i, layer in enumerate(layers):
            st = _layer_state(i, manifest, reader, runtime, biases)
            layer.mlp = FlashFFN(st, runtime)
        skip = vocab.install(model, folder, manifest.dense_file, tables, plan, runtime)
        load_dense_weights(model, config, weights, folder / manifest.dense_file, skip)
        vocab.plan_kv_cache(model, plan.context)
        runtime.layers = [layer.mlp for layer in layers]
        runtime.lookahead = options.lookahead and mode == "flash"
        if runtime.lookahead:  # layer l+1's input guessed from the residual stream
            runtime.lookahead_tapped = tap_residuals(layers)
        mx.eval([a for l in layers for a in l.mlp.resident_arrays()])
    model.eval()
    return model, runtime


def dense_weights(folder: Path, manifest: layout.Manifest, dtype: mx.Dtype) -> dict[str, mx.array]:
    """The dense file's tensors, floats in the compute dtype (lazy: read when evaluated)."""
    weights = mx.load(str(folder / manifest.dense_file))
    return {
        n: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a
        for n, a in weights.items()
        if not n.startswith("__padding")
    }


def load_dense_weights(
    model: nn.Module, config: dict, weights: dict[str, mx.array], path: Path, skip: set[str] = frozenset()
) -> None:
    """Load the dense weights into `model` as mlx-lm loads a model (its `sanitize`, the
    quantization config.json names), strictly, and evaluate them; a mismatch is one line.
    `skip`: names (after sanitize) left on flash (`vocab.install`), not loaded."""
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    for name in skip:
        weights.pop(name, None)
    try:
        quantize_loaded(model, config, weights)
        model.load_weights(list(weights.items()), strict=True)
    except (ValueError, TypeError) as e:
        raise layout.FlashFormatError(
            f"{path}: weights do not match config.json ({one_line(e)}); re-run mlx_flash.convert"
        ) from None
    mx.eval(model.parameters())


def _verify(folder: Path, manifest: layout.Manifest) -> list:
    """verify=True: every checksum now (the dense file's and each neuron row's); returns the
    rows' checksums, against which every neuron read later is checked."""
    row_checksums = [layout.verify_layer(folder, e) for e in manifest.layers]
    layout.verify_dense(folder, manifest)
    return row_checksums


@dataclass
class _DenseFile:
    """What the plan and the FFNs need of the dense file's header: its size in elements and in
    memory, and the names of the FFN biases it holds, by (layer, "up_bias" | "down_bias")."""

    elems: int
    bytes: int
    bias_names: dict[tuple[int, str], str]
    header: dict = field(default_factory=dict)  # the tensors, by name

    @classmethod
    def read(cls, folder: Path, manifest: layout.Manifest, arch, dtype_bytes: int) -> _DenseFile:
        header, _ = read_header(folder / manifest.dense_file)
        bias_names = {
            (i, role): name
            for i in range(manifest.num_layers)
            for role, suffix in arch.family.biases.items()
            for name in (arch.source_name(i, suffix), arch.source_name(i, suffix).removeprefix("model."))
            if name in header
        }
        bias_shapes = {"up_bias": (manifest.layers[0].num_neurons,), "down_bias": (manifest.hidden_size,)}
        for (_i, role), name in bias_names.items():
            if header[name].shape != bias_shapes[role]:
                raise layout.FlashFormatError(
                    f"{folder / manifest.dense_file}: {name} has shape {list(header[name].shape)}, expected "
                    f"{list(bias_shapes[role])}; re-run mlx_flash.convert"
                )
        tensors = {n: t for n, t in header.items() if not n.startswith("__padding")}
        return cls(
            elems=sum(t.numel for t in tensors.values()),
            bytes=vocab.memory_bytes(tensors.values(), dtype_bytes),
            bias_names=bias_names,
            header=tensors,
        )


def _context(config: dict, asked: int | None) -> int:
    """The context the plan reserves a KV cache for: `asked`, or the default capped at the
    model's max_position_embeddings; an error when `asked` is longer than the model's."""
    max_positions = config.get("max_position_embeddings")
    if not (isinstance(max_positions, int) and max_positions > 0):
        max_positions = None
    if asked is None:
        return min(DEFAULT_CONTEXT, max_positions or DEFAULT_CONTEXT)
    context = _positive_int("context", asked)
    if max_positions and context > max_positions:
        raise MlxFlashError(
            f"context {context} is longer than the model's max_position_embeddings ({max_positions}); "
            f"pass context <= {max_positions}"
        )
    return context


def _layer_state(
    i: int,
    manifest: layout.Manifest,
    reader: FlashReader,
    runtime: FlashRuntime,
    biases: dict[tuple[int, str], mx.array],
) -> LayerState:
    """Layer i's FFN state as the plan says: its biases, the resident rows (hybrid), and in
    flash mode the exact selector's rows and the neuron cache."""
    plan, dtype = runtime.plan, runtime.compute_dtype

    def as_mx(v: np.ndarray) -> mx.array:  # floats in the compute dtype, packed weights as they are
        a = mx.array(v)
        return a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a

    n = manifest.layers[i].num_neurons
    first, stop = runtime.shard.neurons(n, i)
    st = LayerState(layer=i, num_neurons=n, first=first, stop=stop)
    st.up_bias = biases.get((i, "up_bias"))
    st.down_bias = biases.get((i, "down_bias"))
    if plan.resident_neurons:
        rows = reader.read_rows(i, first, first + plan.resident_neurons, raw=True)
        st.resident = {k: as_mx(v) for k, v in rows.items()}
        st.num_resident = plan.resident_neurons
    if runtime.mode == "flash":
        if runtime.selection == "exact":
            selector_part = "gate" if "gate" in manifest.part_names else "up"
            rows = reader.read_rows(i, first, stop, raw=True)
            if manifest.quantized:
                st.selector = {f: as_mx(rows[f"{selector_part}.{f}"]) for f in layout.QUANT_FIELDS}
            else:
                st.selector = as_mx(rows[selector_part])
            del rows
        part_elems = {k: (e, np.dtype(t)) for k, (e, t) in manifest.row_fields().items()}
        st.cache = NeuronCache(
            part_elems, capacity=plan.cache_capacity, window=runtime.window, num_neurons=st.num_neurons
        )
    return st


def _positive_int(what: str, value) -> int:
    try:
        n = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        n = None
    if n is None or n < 1:
        raise MlxFlashError(f"{what} must be a positive integer, got {value!r}")
    return n


class DenseActMLP(nn.Module):
    """A dense gated MLP that applies the activation its config names (mlx-lm's llama always
    applies SiLU): the reference the flash path is compared with."""

    def __init__(self, mlp: nn.Module, act):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self._act = act

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(activate(self._act, self.gate_proj(x), self.up_proj(x))[1])


class RowQuantizedDown(nn.Module):
    """A down projection (`nn.Linear` [d, n]) whose columns are quantized one by one along d, as
    a quantized flash folder stores them: ``x @ W.T`` computed as ``quantized_matmul(x, Q,
    transpose=False)`` with Q = mx.quantize(W.T). The reference for quantized flash folders."""

    def __init__(self, weight: mx.array, bias: mx.array | None, bits: int, group_size: int):
        super().__init__()
        self.weight, self.scales, self.biases = mx.quantize(weight.T, group_size=group_size, bits=bits)
        if bias is not None:
            self.bias = bias
        self.bits, self.group_size = bits, group_size
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(
            x,
            self.weight,
            self.scales,
            self.biases,
            transpose=False,
            group_size=self.group_size,
            bits=self.bits,
        )
        return y + self.bias if "bias" in self else y


def load_dense(
    source: str | Path,
    dtype: mx.Dtype | None = mx.float32,
    *,
    quantize: int | None = None,
    group_size: int | None = None,
    dense_bits: int | None = 8,
) -> nn.Module:
    """A source model folder loaded whole in memory through mlx-lm (the `dense` baseline),
    honouring `hidden_act`, cast to `dtype` (fp32: the same compute dtype as the flash path).

    An MLX-quantized source (mlx-community) loads quantized, as mlx-lm loads it. With
    `quantize` (bits; `group_size` default 64, or the source's), the model holds the weights of
    ``convert(source, quantize=bits, group_size=group_size, dense_bits=dense_bits)``'s flash
    folder: quantized as mlx-lm quantizes a model (`nn.quantize`, mlx-lm's predicate; the FFN
    with `quantize` bits, the rest with `dense_bits`, None: float), except the down projection,
    quantized per neuron along hidden as the folder stores it (`RowQuantizedDown`); the
    reference a quantized flash folder's naive, hybrid and exact modes equal. (For an
    MLX-quantized source, when `quantize` is the source's bits: its gate and up are kept.)"""
    from mlx_lm.utils import load_model

    from .families import mlx_quantization
    from .layout import DEFAULT_GROUP_SIZE
    from .quantize import dense_predicate

    source = Path(source)
    model, config = load_model(source, get_model_classes=get_model_classes)
    from .expert_convert import switch_modules

    if switch_modules(model):  # a mixture of experts: mlx-lm's model as it is, in `dtype`
        if quantize is not None:
            raise MlxFlashError("load_dense(quantize=...) is not supported for mixture-of-experts models")
        if dtype is not None:
            model.update(_tree_cast(model.parameters(), dtype))
        mx.eval(model.parameters())
        model.eval()
        return model
    arch = architecture_for(config)
    act = ACTIVATION_FUNCTIONS[ACTIVATIONS[arch.activation(config)]]
    if arch.family.name == "gated":
        for layer in model_layers(model):
            layer.mlp = DenseActMLP(layer.mlp, act)
    if quantize is not None:
        source_q = mlx_quantization(config)
        group_size = group_size or (source_q["group_size"] if source_q else DEFAULT_GROUP_SIZE)
        downs = []
        for layer in model_layers(model):
            name = "down_proj" if hasattr(layer.mlp, "down_proj") else "fc2"
            down = getattr(layer.mlp, name)
            w = down.weight
            if isinstance(down, nn.QuantizedLinear):
                w = mx.dequantize(w, down.scales, down.biases, group_size=down.group_size, bits=down.bits)
            downs.append((layer.mlp, name, RowQuantizedDown(w, down.get("bias"), quantize, group_size)))
        if source_q is None:  # a float model: quantized as convert --quantize does
            predicate = dense_predicate(model, group_size)
            ffn_ids = {id(m) for layer in model_layers(model) for _, m in layer.mlp.named_modules()}

            def bits_for(path: str, module: nn.Module):
                if not predicate(path, module):
                    return False
                bits = quantize if id(module) in ffn_ids else dense_bits
                return {"group_size": group_size, "bits": bits, "mode": "affine"} if bits else False

            nn.quantize(model, group_size=group_size, bits=quantize, class_predicate=bits_for)
        for mlp, name, module in downs:
            setattr(mlp, name, module)
    if dtype is not None:
        model.update(_tree_cast(model.parameters(), dtype))
    mx.eval(model.parameters())
    model.eval()
    return model


def _tree_cast(params, dtype):
    from mlx.utils import tree_map

    return tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, params)
