"""Converting a mixture-of-experts model: its routed experts into per-expert bundles on flash.

Which modules are routed experts is found generically: the architecture's mlx-lm model is built
(weights not evaluated) and every `SwitchGLU` / `SwitchMLP` in it (`switch_modules`) is one. The
source's tensor names are mapped to mlx-lm's by the model's own ``sanitize`` (Hugging Face
per-expert tensors, gpt-oss's fused ``gate_up_proj``, ... become the stacked
``switch_mlp.gate_proj.weight [E, out, in]`` mlx-lm loads), applied one layer at a time so that
memory stays bounded by a layer: the layer's tensors are renamed as layer 0's (some sanitizers
look for layer 0 only), sanitized, and renamed back. What the sanitizer puts under a switch
module is written as that layer's expert bundles (`layout`: one aligned bundle per expert);
everything else goes to ``dense.safetensors``. An MLX-quantized source's experts (mlx-community,
``mlx_lm.convert -q``: packed ``weight``, ``scales``, ``biases``) stay quantized as they are.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from . import layout
from .dtypes import FLOAT_ST_DTYPES, convert_raw
from .errors import MlxFlashError, one_line
from .families import UnsupportedModelError, check_moe_config, config_experts
from .layout import DTYPE_TO_ST, ST_TO_DTYPE, ExpertLayer, Manifest
from .quantize import to_mx, to_raw
from .safetensors_file import PlannedTensor, SafetensorsWriter, TensorInfo, read_tensor

PROJECTION_ORDER = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")
FIELD_ORDER = ("weight", "scales", "biases", "bias")
BLOCK_BYTES = 64 << 20  # expert bundles are assembled and written in blocks of about this size
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class SwitchModule:
    """One routed-experts module of a model: its path, its layer and the module."""

    path: str
    layer: int
    module: nn.Module


def switch_modules(model: nn.Module) -> list[SwitchModule]:
    """Every mlx-lm `SwitchGLU` / `SwitchMLP` of `model`, in layer order."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    found = []
    for path, m in model.named_modules():
        if isinstance(m, (SwitchGLU, SwitchMLP)):
            layer = _LAYER.search(path)
            if layer is None:
                raise UnsupportedModelError(f"routed experts at {path!r} are not inside a numbered layer")
            found.append(SwitchModule(path, int(layer.group(2)), m))
    return sorted(found, key=lambda s: s.layer)


def moe_skeleton(config: dict) -> tuple[nn.Module, list[SwitchModule]] | None:
    """The config's mlx-lm model (weights not evaluated) and its switch modules, when it has
    routed experts that mlx_flash streams; None for a model without experts. A model whose
    config declares experts that are not switch modules is a one-line UnsupportedModelError."""
    from .models import get_model_classes

    if not config_experts(config):
        return None
    try:
        model_cls, args_cls = get_model_classes(config)
    except Exception:  # an architecture mlx-lm does not have
        check_moe_config(config)
        raise
    try:
        model = model_cls(args_cls.from_dict(config))
    except Exception as e:  # a config mlx-lm's model cannot be built from
        raise UnsupportedModelError(
            f"architecture {config.get('model_type')!r} has routed experts, but mlx-lm's model cannot be built from "
            f"its config.json ({type(e).__name__}: {one_line(e)})"
        ) from None
    switches = switch_modules(model)
    if not switches:
        check_moe_config(config)
        return None
    return model, switches


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(2)) if m else None


def _relabel(name: str, src: int, dst: int) -> str:
    return re.sub(rf"(^|\.)layers\.{src}\.", rf"\g<1>layers.{dst}.", name, count=1)


def _load(tensors: dict[str, tuple[Path, TensorInfo]], name: str) -> mx.array:
    path, info = tensors[name]
    raw = read_tensor(path, info)
    return to_mx(raw, info.dtype) if info.dtype in FLOAT_ST_DTYPES else mx.array(raw)


def _gpt_oss_transformers(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """gpt-oss as transformers writes it (``experts.gate_up_proj [E, hidden, 2I]`` and
    ``experts.down_proj [E, I, hidden]``, no ``.weight``) in the layout mlx-lm's sanitize reads
    (OpenAI's: ``[E, 2I, hidden]`` / ``[E, hidden, I]``, named ``.weight``)."""
    out = {}
    for n, a in weights.items():
        if n.endswith((".experts.gate_up_proj", ".experts.down_proj")) and a.ndim == 3:
            n, a = n + ".weight", mx.contiguous(a.swapaxes(-1, -2))
        out[n] = a
    return out


# Source layouts mlx-lm's sanitize does not read, put into one it does (by model_type).
SOURCE_LAYOUTS = {"gpt_oss": _gpt_oss_transformers}


def sanitize_layer(
    model: nn.Module, tensors: dict[str, tuple[Path, TensorInfo]], names: list[str], layer: int
) -> dict[str, mx.array]:
    """Layer `layer`'s source tensors as mlx-lm names them (the model's own `sanitize`)."""
    weights = {_relabel(n, layer, 0): _load(tensors, n) for n in names}
    adapt = SOURCE_LAYOUTS.get(getattr(model, "model_type", None) or getattr(model.args, "model_type", ""))
    if adapt is not None:
        weights = adapt(weights)
    if hasattr(model, "sanitize"):
        try:
            weights = _sanitize_one_layer(model, weights)
        except Exception as e:  # a sanitizer meeting a layout it does not know
            raise MlxFlashError(
                f"layer {layer}: mlx-lm's sanitize of {type(model).__module__} failed ({type(e).__name__}: {one_line(e)})"
            ) from None
    return {_relabel(n, 0, layer): a for n, a in weights.items()}


def _sanitize_one_layer(model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """`model.sanitize` of one layer's tensors (named as layer 0's). A sanitizer that walks
    every layer (granitemoe's: ``for l in range(args.num_hidden_layers)``) is run as if the
    model had one layer."""
    try:
        return model.sanitize(dict(weights))
    except KeyError:
        args = getattr(model, "args", None)
        layers = getattr(args, "num_hidden_layers", None)
        if not isinstance(layers, int) or layers <= 1:
            raise
        args.num_hidden_layers = 1
        try:
            return model.sanitize(dict(weights))
        finally:
            args.num_hidden_layers = layers


def _st_of(a: mx.array) -> str:
    return {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16"}.get(a.dtype, "")


def expert_fields(
    sw: SwitchModule, experts: dict[str, mx.array], float_dtype: str
) -> tuple[list[tuple[str, str, tuple[int, ...]]], int, int]:
    """The stored fields of a layer's experts (name, dtype, per-expert shape) in bundle order,
    checked against the module mlx-lm builds; and the weights' (bits, group size), (0, 0) when
    they are floats."""
    want = dict(tree_flatten(sw.module.parameters()))
    num_experts = next(iter(want.values())).shape[0]
    missing = [n for n in want if n not in experts]
    if missing:
        raise MlxFlashError(f"{sw.path}: expert tensor {missing[0]!r} not found in the checkpoint")
    projections = sorted({n.split(".")[0] for n in want}, key=PROJECTION_ORDER.index)
    bits = group = 0
    fields = []
    for proj in projections:
        w_name = f"{proj}.weight"
        in_dims = want[w_name].shape[-1]
        quantized = f"{proj}.scales" in experts
        for f in FIELD_ORDER:
            name = f"{proj}.{f}"
            if name not in experts:
                continue
            a = experts[name]
            if a.ndim < 2 or a.shape[0] != num_experts:
                raise MlxFlashError(f"{sw.path}.{name}: shape {list(a.shape)} is not [{num_experts}, ...]")
            if name == w_name and quantized:
                if a.dtype != mx.uint32 or a.shape[-1] * 32 % in_dims:
                    raise MlxFlashError(
                        f"{sw.path}.{name}: quantized weight {a.dtype} {list(a.shape)} does not fit"
                    )
                b = a.shape[-1] * 32 // in_dims
                g = in_dims // experts[f"{proj}.scales"].shape[-1]
                if (bits, group) not in ((0, 0), (b, g)):
                    raise MlxFlashError(
                        f"{sw.path}: projections quantized with different bits or group sizes"
                    )
                bits, group = b, g
                fields.append((name, "uint32", tuple(a.shape[1:])))
                continue
            if not _st_of(a):
                raise UnsupportedModelError(
                    f"{sw.path}.{name}: dtype {a.dtype} is not a float or MLX affine quantization: "
                    "convert from a float checkpoint or an mlx_lm.convert -q folder"
                )
            if (name == w_name or f == "bias") and tuple(a.shape) != tuple(want[name].shape):
                raise MlxFlashError(
                    f"{sw.path}.{name}: shape {list(a.shape)}, expected {list(want[name].shape)} from config.json"
                )
            fields.append((name, float_dtype, tuple(a.shape[1:])))
    extra = sorted(set(experts) - {f[0] for f in fields})
    if extra:
        raise MlxFlashError(f"{sw.path}: unexpected expert tensor {extra[0]!r}")
    return fields, bits, group


def write_experts(
    folder: Path, sw: SwitchModule, experts: dict[str, mx.array], float_dtype: str
) -> ExpertLayer:
    """Layer `sw.layer`'s experts as bundles [E, expert_bytes] in one aligned tensor."""
    spec, bits, group = expert_fields(sw, experts, float_dtype)
    fields, stride = layout.expert_field_layout(spec)
    st = DTYPE_TO_ST[float_dtype]
    num_experts = experts[spec[0][0]].shape[0]
    raw = {
        f.name: (np.array(experts[f.name]) if f.dtype == "uint32" else to_raw(experts[f.name], st)).reshape(
            num_experts, -1
        )
        for f in fields
    }
    rel, tensor = layout.expert_file(sw.layer), layout.expert_tensor_name(sw.layer)
    planned = [PlannedTensor(tensor, "U8", (num_experts, stride), align=layout.DATA_ALIGNMENT)]
    checksums = []
    per_block = max(1, BLOCK_BYTES // stride)
    with SafetensorsWriter(folder / rel, planned) as w:
        for lo in range(0, num_experts, per_block):
            hi = min(num_experts, lo + per_block)
            block = np.zeros((hi - lo, stride), np.uint8)
            for f in fields:
                block[:, f.offset : f.offset + f.nbytes] = raw[f.name][lo:hi].view(np.uint8)
            checksums += [layout.expert_digest(row) for row in block]
            w.write(tensor, block)
    return ExpertLayer(
        layer=sw.layer,
        module=sw.path,
        file=rel,
        tensor=tensor,
        data_offset=w.offsets[tensor],
        num_experts=num_experts,
        expert_bytes=stride,
        fields=fields,
        checksums=tuple(checksums),
        bits=bits,
        group_size=group,
    )


def convert_moe(
    path: Path,
    out: Path,
    *,
    source_label: str,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    quantize: int | None = None,
    group_size: int | None = None,
) -> Manifest:
    """Convert the MoE model at `path` into a flash folder at `out` (see the module docstring)."""
    from .convert import ConvertError, _copy_side_files, source_config, source_tensors, staged_folder

    config = source_config(path)
    if quantize is not None or group_size is not None:
        raise ConvertError(
            "--quantize/--group-size are not supported for mixture-of-experts models yet: quantize with "
            "mlx_lm.convert -q and convert that folder (its experts stay quantized)"
        )
    if config.get("quantization") is not None:
        from .families import mlx_quantization

        mlx_quantization(config)  # only MLX affine quantization
    model, switches = moe_skeleton(config)
    tensors = source_tensors(path)
    by_layer: dict[int | None, list[str]] = {}
    for n in tensors:
        by_layer.setdefault(_layer_of(n), []).append(n)
    floats = [info.dtype for _, info in tensors.values() if info.dtype in FLOAT_ST_DTYPES]
    src_dtype = max(set(floats), key=floats.count) if floats else "F32"
    dtype = dtype or ST_TO_DTYPE[src_dtype]
    if dtype not in DTYPE_TO_ST:
        raise ConvertError(f"dtype {dtype!r} not supported (float16, bfloat16, float32)")
    st = DTYPE_TO_ST[dtype]
    moe_layers = {sw.layer: sw for sw in switches}
    with staged_folder(out, progress) as tmp:
        (tmp / layout.EXPERTS_DIR).mkdir()
        dense: dict[str, tuple[np.ndarray, str]] = {}  # sanitized non-expert tensors: (raw, dtype)
        raw_dense = [n for n in tensors if _layer_of(n) not in moe_layers]
        entries = []
        for i in tqdm(
            sorted(moe_layers), desc="convert", unit="layer", disable=not progress, file=sys.stderr
        ):
            sw = moe_layers[i]
            weights = sanitize_layer(model, tensors, by_layer.get(i, []), i)
            prefix = sw.path + "."
            experts = {n[len(prefix) :]: a for n, a in weights.items() if n.startswith(prefix)}
            entries.append(write_experts(tmp, sw, experts, dtype))
            for n, a in weights.items():
                if not n.startswith(prefix):
                    dense[n] = (
                        (to_raw(a, st), st) if _st_of(a) else (np.array(a), _ST[np.dtype(_NP[a.dtype])])
                    )
            del weights, experts
        dense_checksum = _write_dense(tmp / layout.DENSE_NAME, tensors, raw_dense, dense, st)
        manifest = Manifest(
            source_model=source_label,
            model_type=str(config.get("model_type")),
            family="moe",
            activation="",
            dtype=dtype,
            hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_hidden_layers"]),
            bundled=True,
            parts=(),
            layers=[],
            dense_checksum=dense_checksum,
            extra={"source_dtype": ST_TO_DTYPE.get(src_dtype, src_dtype)},
            experts=entries,
            format_version=layout.MOE_FORMAT_VERSION,
        )
        _copy_side_files(path, tmp)
        layout.write_manifest(tmp, manifest)
    return manifest


def _write_dense(
    path: Path,
    tensors: dict[str, tuple[Path, TensorInfo]],
    raw_names: list[str],
    sanitized: dict[str, tuple[np.ndarray, str]],
    st: str,
) -> str:
    """dense.safetensors: the source tensors outside MoE layers (read one at a time, floats in
    the flash dtype) and the MoE layers' sanitized non-expert tensors."""
    infos = {n: tensors[n][1] for n in raw_names}
    planned = [
        PlannedTensor(n, st if i.dtype in FLOAT_ST_DTYPES else i.dtype, i.shape) for n, i in infos.items()
    ]
    planned += [PlannedTensor(n, dt, a.shape) for n, (a, dt) in sanitized.items()]
    with SafetensorsWriter(path, planned) as w:
        for n, info in infos.items():
            w.write(n, convert_raw(read_tensor(tensors[n][0], info), info.dtype, st))
        for n, (a, _) in sanitized.items():
            w.write(n, a)
    return layout.file_digest(path)


_NP = {mx.uint32: np.uint32, mx.int32: np.int32, mx.uint8: np.uint8, mx.int64: np.int64, mx.uint16: np.uint16}
_ST = {
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint16): "U16",
}
