"""python -m mlx_flash.convert: a Hugging Face / mlx-lm model folder -> a flash folder.

The conversion streams: it reads the source one tensor (or one block of rows) at a time with
pread and writes as it goes, so a model larger than memory converts; peak memory is a small
multiple of the largest tensor (a layer's down projection, held once as read and once
transposed). It writes into a temporary folder beside the destination and renames it at the
end, so an interrupted conversion never leaves a folder that looks complete.

Quantized folders (``--quantize 4|8``, see `layout`): from a float source, every neuron row is
quantized along hidden with ``mx.quantize`` and the dense part is quantized as mlx-lm quantizes
a model, with `dense_bits` (default 8; config.json gains its `quantization`). The dense part
is resident, so its bits cost memory, not I/O, and 4-bit attention costs far more accuracy than
4-bit neurons: on the demo model, held-out perplexity rose 2.7% with 4-bit bundles and an
8-bit dense part, 7.1% with everything at 4 bits. From an MLX-quantized source (an mlx-community
folder), the gate and up rows, already quantized along hidden, are copied as they are (when
the bits and group size asked for are the source's), the down projection, quantized along the
neurons, is dequantized and quantized again per neuron along hidden, and the dense part stays
as the source has it. The manifest's `quantization.origin` says which was done.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import layout
from . import quantize as q
from .dtypes import FLOAT_ST_DTYPES, convert_raw
from .errors import MlxFlashError, run_cli
from .families import (
    ACTIVATIONS,
    Architecture,
    architecture_for,
    check_moe_config,
    config_experts,
    mlx_quantization,
)
from .layout import (
    DATA_ALIGNMENT,
    DTYPE_TO_ST,
    ST_TO_DTYPE,
    LayerEntry,
    Manifest,
    Part,
    Quantization,
    Segment,
    quantized_fields,
)
from .safetensors_file import PlannedTensor, SafetensorsWriter, TensorInfo, read_header, read_tensor

# Files copied as they are from the source folder (config, tokenizer, chat template).
COPIED_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".jsonl")
SKIPPED_FILES = {"model.safetensors.index.json", layout.MANIFEST_NAME}
ROW_BLOCK_BYTES = 8 << 20  # neuron rows are converted and written in blocks of about this size
DEFAULT_DENSE_BITS = 8  # a quantized folder's dense part (see the module docstring)


class ConvertError(MlxFlashError):
    """The source model cannot be converted."""


@dataclass
class SourceModel:
    """A source checkpoint: its folder, config, and where each tensor lives."""

    path: Path
    config: dict
    arch: Architecture
    tensors: dict[str, tuple[Path, TensorInfo]]
    quantization: dict | None = None  # config.json's MLX `quantization` (mlx-community folders)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        path, info = self.tensors[name]
        return read_tensor(path, info, rows)


def resolve_source(src: str) -> Path:
    """A local folder, or a Hugging Face repo id fetched through mlx-lm's download."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConvertError(
                f"{src}: not a folder (give a model folder with config.json and *.safetensors)"
            )
        return path
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise ConvertError(f"{src}: no such folder")
    try:
        from mlx_lm.utils import _download

        return Path(_download(src))
    except Exception as e:  # network, auth, missing repo: all are one line for the user
        raise ConvertError(
            f"{src}: no such folder, and it could not be fetched from the Hugging Face hub ({type(e).__name__})"
        ) from None


def source_config(path: Path) -> dict:
    """A source folder's config.json, parsed; a one-line ConvertError when it cannot be."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{path}: no config.json: not a model folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConvertError(f"{config_path}: unreadable config ({e})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{config_path}: config is not a JSON object")
    return config


def check_source(path: Path) -> None:
    """Fail now, in one line, on a folder `convert` cannot convert (dense or mixture of experts),
    reading only config.json and the safetensors headers."""
    config = source_config(path)
    if config_experts(config):
        from .expert_convert import moe_skeleton

        moe_skeleton(config)  # an architecture whose experts mlx_flash cannot stream
        source_tensors(path)
    else:
        open_source(path)


def open_source(path: Path) -> SourceModel:
    config = source_config(path)
    check_moe_config(config)  # an MoE model is converted by expert_convert, not here
    arch = architecture_for(config)
    quantization = mlx_quantization(config)
    return SourceModel(path, config, arch, source_tensors(path), quantization)


def source_tensors(path: Path) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor of a source folder's safetensors files: name -> (file, header entry)."""
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConvertError(f"{index}: malformed index") from None
    if not files:
        raise ConvertError(f"{path}: no *.safetensors weights (only safetensors checkpoints are read)")
    tensors: dict[str, tuple[Path, TensorInfo]] = {}
    for f in files:
        if not f.is_file():
            raise ConvertError(f"{f}: listed in the index but missing")
        header, _ = read_header(f)
        for name, info in header.items():
            tensors[name] = (f, info)
    return tensors


@dataclass
class FFNLayout:
    """Where one layer's FFN parts are in the source checkpoint."""

    part_names: dict[str, str]  # part -> source tensor name
    bias_names: dict[str, str]  # role -> source tensor name (kept in dense.safetensors)
    # part -> (scales, biases) source tensor names, for parts quantized in the source
    quant_names: dict[str, tuple[str, str]] = None  # type: ignore[assignment]
    # part -> (bits, group_size) of the parts quantized in the source (from the shapes)
    source_quant: dict[str, tuple[int, int]] = None  # type: ignore[assignment]

    def names(self) -> set[str]:
        """Every source tensor that holds this layer's neurons."""
        return set(self.part_names.values()) | {n for pair in (self.quant_names or {}).values() for n in pair}


def find_ffn(src: SourceModel) -> list[FFNLayout]:
    arch, config = src.arch, src.config
    n_layers = int(config["num_hidden_layers"])
    layers = []
    for i in range(n_layers):
        parts = {}
        for p in arch.family.parts:
            name = _find_tensor(src, arch, i, p.suffix)
            if name is None:
                raise ConvertError(
                    f"{src.path}: FFN weight {arch.source_name(i, p.suffix)!r} of layer {i} not found "
                    f"(is this a {arch.model_type} checkpoint?)"
                )
            parts[p.name] = name
        quant = {}
        for part, name in parts.items():
            if src.info(name).dtype not in FLOAT_ST_DTYPES and name.endswith(".weight"):
                pair = (name[: -len("weight")] + "scales", name[: -len("weight")] + "biases")
                if all(n in src.tensors for n in pair):
                    quant[part] = pair
        biases = {}
        for role, suffix in arch.family.biases.items():
            name = _find_tensor(src, arch, i, suffix)
            if name is not None:
                biases[role] = name
        layers.append(FFNLayout(parts, biases, quant, {}))
    return layers


def _find_tensor(src: SourceModel, arch: Architecture, layer: int, suffix: str) -> str | None:
    name = arch.source_name(layer, suffix)
    for candidate in (name, name.removeprefix("model.")):
        if candidate in src.tensors:
            return candidate
    return None


def check_shapes(src: SourceModel, ffn: list[FFNLayout], hidden: int, neurons: int) -> None:
    """Each FFN weight has the shape config.json implies; a weight quantized in the source
    (packed uint32, with scales and biases) has a shape that the bits and group size inferred
    from it explain. Fills `layer.source_quant`."""
    for _i, layer in enumerate(ffn):
        for part, name in layer.part_names.items():
            info = src.info(name)
            orient = next(p.orientation for p in src.arch.family.parts if p.name == part)
            want = (neurons, hidden) if orient == "row" else (hidden, neurons)
            if part in layer.quant_names:
                layer.source_quant[part] = _source_quant(src, name, layer.quant_names[part], want)
                continue
            if info.dtype not in FLOAT_ST_DTYPES:
                raise ConvertError(
                    f"{name}: dtype {info.dtype} is neither a float dtype nor MLX-quantized (uint32 with .scales and .biases)"
                )
            if info.shape != want:
                raise ConvertError(f"{name}: shape {info.shape}, expected {want} from config.json")


def _source_quant(
    src: SourceModel, name: str, pair: tuple[str, str], want: tuple[int, int]
) -> tuple[int, int]:
    """(bits, group_size) of an MLX-quantized source weight whose float shape is `want`."""
    w, s, b = src.info(name), src.info(pair[0]), src.info(pair[1])
    rows, elems = want
    if src.quantization is None:
        raise ConvertError(f"{name}: quantized (uint32 with .scales) but config.json has no `quantization`")
    ok = w.dtype == "U32" and len(w.shape) == 2 and w.shape[0] == rows and s.shape == b.shape
    ok = ok and len(s.shape) == 2 and s.shape[0] == rows and s.shape[1] > 0 and elems % s.shape[1] == 0
    ok = ok and s.dtype in FLOAT_ST_DTYPES and b.dtype == s.dtype
    bits = w.shape[1] * 32 // elems if ok else 0
    if not ok or bits not in (2, 3, 4, 5, 6, 8) or w.shape[1] * 32 != bits * elems:
        raise ConvertError(
            f"{name}: quantized shape {w.dtype} {list(w.shape)} with scales {s.dtype} {list(s.shape)} does not fit "
            f"{list(want)} from config.json"
        )
    return bits, elems // s.shape[1]


@contextlib.contextmanager
def conversion_lock(out: str | os.PathLike):
    """Hold an exclusive lock on the flash folder `out` (a `.NAME.lock` file beside it,
    `flock`ed), waiting while another process holds it: processes that may convert the same
    folder (the ranks of one launch on one machine, two programs opening the same cached
    conversion) check and convert under it, so that one converts and the others then find the
    finished folder, instead of each replacing the folder another is opening. The lock goes
    with the process (a killed converter leaves no stale lock)."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_partials(out: Path, progress: bool) -> None:
    """Remove the `.NAME.partial-PID-*` folders of earlier conversions to `out` whose process is
    gone (killed before it could clean up: SIGKILL, a power cut). A live PID's folder is another
    conversion still running, and is left alone."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.removeprefix(f".{out.name}.partial-").split("-", 1)[0]
        if not (p.is_dir() and pid.isdigit()) or _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if progress:
            print(f"removed {p}: a conversion killed before it finished", file=sys.stderr)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    bundle: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    quantize: int | None = None,
    group_size: int | None = None,
    dense_bits: int | None = DEFAULT_DENSE_BITS,
    activation: str | None = None,
) -> Manifest:
    """Convert the model at `source` into a flash folder at `out`; returns its manifest.

    quantize: 4 or 8: neuron bundles quantized with that many bits (MLX affine, in groups of
        `group_size` elements along hidden, default 64). An MLX-quantized source is always
        converted to a quantized folder, with the source's bits and group size unless these
        are given, and its dense part as it is.
    dense_bits: with `quantize`, the bits of the dense part (attention, embeddings, lm_head),
        4 or 8 (default 8), or None to keep it in `dtype`.
    dtype: the float dtype on flash (of the rows; of the scales and biases when quantized);
        default: the source's.
    activation: the FFN's activation when config.json does not say it right (e.g. "drelu" for
        TurboSparse's relu on gate and up); written into the flash folder's config.json."""
    path = resolve_source(str(source))
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ConvertError(f"{out}: already exists (pass --overwrite to replace it)")
    if config_experts(source_config(path)):  # a mixture of experts (mlx is imported only then)
        from . import expert_convert

        if activation is not None or not bundle:
            raise ConvertError("--activation and --no-bundle do not apply to a mixture-of-experts model")
        return expert_convert.convert_moe(
            path,
            out,
            source_label=str(source),
            dtype=dtype,
            overwrite=overwrite,
            progress=progress,
            quantize=quantize,
            group_size=group_size,
        )
    src = open_source(path)
    config, arch = src.config, src.arch
    hidden = int(config["hidden_size"])
    neurons = arch.num_neurons(config)
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ConvertError(
                f"unknown activation {activation!r} (supported: {', '.join(sorted(ACTIVATIONS))})"
            )
        config = {**config, arch.activation_key: activation}
    activation = arch.activation(config)
    ffn = find_ffn(src)
    check_shapes(src, ffn, hidden, neurons)
    first = ffn[0].part_names[arch.family.parts[0].name]
    src_dtype = src.info(first).dtype
    if src_dtype not in FLOAT_ST_DTYPES:  # MLX-quantized: the float dtype is the scales'
        src_dtype = next(src.info(l.quant_names[p][0]).dtype for l in ffn for p in l.quant_names)
    dtype = dtype or ST_TO_DTYPE[src_dtype]
    if dtype not in DTYPE_TO_ST:
        raise ConvertError(f"dtype {dtype!r} not supported (float16, bfloat16, float32)")
    st_dtype = DTYPE_TO_ST[dtype]
    quant = _quantization(src, quantize, group_size, hidden)
    if dense_bits is not None and dense_bits not in layout.QUANT_BITS:
        raise ConvertError(
            f"cannot quantize the dense part to {dense_bits} bits: choose --dense-bits 4, 8 or float"
        )
    dense_quant = None
    if quant is not None and src.quantization is None and dense_bits is not None:
        dense_quant = Quantization(dense_bits, quant.group_size)

    with staged_folder(out, progress) as tmp:
        (tmp / layout.FFN_DIR).mkdir()
        ffn_names = {n for layer in ffn for n in layer.names()}
        dense_names = [n for n in src.tensors if n not in ffn_names]
        total = sum(src.info(n).nbytes for n in src.tensors)
        bar = tqdm(
            total=total, unit="B", unit_scale=True, desc="convert", disable=not progress, file=sys.stderr
        )
        dense_quantized = set()
        if dense_quant is not None:
            dense_quantized = _dense_to_quantize(src, dense_names, dense_quant)
        dense_checksum = _write_dense(
            src, dense_names, tmp / layout.DENSE_NAME, st_dtype, bar, dense_quantized, dense_quant
        )
        fields = (lambda: quantized_fields(hidden, quant.bits, quant.group_size, dtype)) if quant else tuple
        parts = tuple(Part(p.name, hidden, fields()) for p in arch.family.parts)
        origins: dict[str, set[str]] = {}
        entries = [
            _write_layer(src, i, layer, parts, tmp, st_dtype, bundle, bar, quant, origins)
            for i, layer in enumerate(ffn)
        ]
        bar.close()
        if quant is not None:
            origin = {p: "+".join(sorted(o)) for p, o in origins.items()}
            origin["dense"] = (
                "copied"
                if src.quantization is not None
                else f"quantized ({dense_bits}-bit)"
                if dense_quant is not None
                else dtype
            )
            if src.quantization is not None:
                origin["source"] = dict(src.quantization)
            quant = Quantization(quant.bits, quant.group_size, quant.mode, origin)
        manifest = Manifest(
            source_model=str(source),
            model_type=arch.model_type,
            family=arch.family.name,
            activation=activation,
            dtype=dtype,
            hidden_size=hidden,
            num_layers=len(ffn),
            bundled=bundle,
            parts=parts,
            layers=entries,
            dense_checksum=dense_checksum,
            extra={"intermediate_size": neurons, "source_dtype": ST_TO_DTYPE.get(src_dtype, src_dtype)},
            quantization=quant,
            format_version=layout.QUANTIZED_FORMAT_VERSION if quant else layout.FLOAT_FORMAT_VERSION,
        )
        _copy_side_files(src.path, tmp)
        if dense_quant is not None or config is not src.config:
            cfg = dict(config)
            if dense_quant is not None:  # the dense part loads as mlx-lm loads it
                cfg["quantization"] = {
                    "group_size": dense_quant.group_size,
                    "bits": dense_quant.bits,
                    "mode": dense_quant.mode,
                }
                cfg["quantization_config"] = cfg["quantization"]
            (tmp / "config.json").write_text(json.dumps(cfg, indent=4))
        layout.write_manifest(tmp, manifest)
    return manifest


@contextmanager
def staged_folder(out: Path, progress: bool):
    """A temporary folder beside `out` to write a conversion into; renamed to `out` (replacing
    it) when the block ends normally, removed when it raises: an interrupted conversion never
    leaves a folder that looks complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out, progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"  # a folder being replaced
    try:
        yield tmp
        if out.exists():  # renamed away, not deleted, until the new folder is in its place
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _quantization(
    src: SourceModel, bits: int | None, group_size: int | None, hidden: int
) -> Quantization | None:
    """The bundles' quantization asked for (or the source's), checked; None for float bundles."""
    sq = src.quantization
    if bits is None and group_size is None and sq is None:
        return None
    if bits is None:
        if sq is None:
            raise ConvertError("--group-size needs --quantize 4 or 8")
        bits = sq["bits"]
    group_size = group_size or (sq["group_size"] if sq is not None else layout.DEFAULT_GROUP_SIZE)
    if bits not in layout.QUANT_BITS:
        raise ConvertError(
            f"cannot quantize to {bits} bits: choose --quantize {' or '.join(map(str, layout.QUANT_BITS))}"
        )
    if group_size not in layout.QUANT_GROUP_SIZES:
        raise ConvertError(
            f"group size {group_size} not supported: choose --group-size {', '.join(map(str, layout.QUANT_GROUP_SIZES))}"
        )
    if hidden % group_size:
        fits = [g for g in layout.QUANT_GROUP_SIZES if hidden % g == 0]
        raise ConvertError(
            f"group size {group_size} does not divide hidden_size {hidden}"
            + (
                f": choose --group-size {' or '.join(map(str, fits))}"
                if fits
                else ": this model cannot be quantized"
            )
        )
    return Quantization(bits, group_size)


def _dense_to_quantize(src: SourceModel, names: list[str], quant: Quantization) -> set[str]:
    """The dense `*.weight` tensors mlx-lm would quantize (those of Linear and Embedding modules
    whose input dimension the group size divides), found on the architecture's model built
    without weights; each source name is mapped to the model's through its `sanitize`."""
    import mlx.core as mx

    from .models import get_model_classes

    try:
        model_cls, args_cls = get_model_classes(src.config)
        model = model_cls(args_cls.from_dict(src.config))
    except Exception as e:  # a config mlx-lm cannot build: the load would fail as well
        raise ConvertError(
            f"cannot build a {src.arch.model_type!r} model from config.json ({type(e).__name__}: {e})"
        ) from None
    paths = q.quantized_paths(model, quant.bits, quant.group_size)
    chosen = set()
    for name in names:
        info = src.info(name)
        if not name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in FLOAT_ST_DTYPES:
            continue
        mapped = model.sanitize({name: mx.zeros((1,))}) if hasattr(model, "sanitize") else {name: None}
        if len(mapped) == 1 and next(iter(mapped)).removesuffix(".weight") in paths:
            chosen.add(name)
    return chosen


def _write_dense(
    src: SourceModel,
    names: list[str],
    path: Path,
    st_dtype: str,
    bar: tqdm,
    quantized: set[str] = frozenset(),
    quant: Quantization | None = None,
) -> str:
    """dense.safetensors: every non-FFN tensor in the flash dtype (integer tensors, and a
    quantized source's packed weights, as they are); the `quantized` ones as mlx-lm quantizes
    them (name.weight packed uint32, name.scales, name.biases)."""
    planned = []
    for n in names:
        info = src.info(n)
        dt = st_dtype if info.dtype in FLOAT_ST_DTYPES else info.dtype
        if n in quantized:
            rows, cols = info.shape
            groups = cols // quant.group_size
            stem = n[: -len("weight")]
            planned += [
                PlannedTensor(n, "U32", (rows, cols * quant.bits // 32)),
                PlannedTensor(stem + "scales", st_dtype, (rows, groups)),
                PlannedTensor(stem + "biases", st_dtype, (rows, groups)),
            ]
        else:
            planned.append(PlannedTensor(n, dt, info.shape))
    with SafetensorsWriter(path, planned) as w:
        for t in planned:
            if t.name not in src.tensors:
                continue  # scales and biases: written with their weight
            info = src.info(t.name)
            raw = convert_raw(src.read(t.name), info.dtype, st_dtype if t.name in quantized else t.dtype)
            if t.name in quantized:
                stem = t.name[: -len("weight")]
                qw, qs, qb = q.quantize_rows(raw, st_dtype, quant.bits, quant.group_size)
                w.write(t.name, qw)
                w.write(stem + "scales", qs)
                w.write(stem + "biases", qb)
            else:
                w.write(t.name, raw)
            bar.update(info.nbytes)
    return layout.file_digest(path)


def _write_layer(
    src: SourceModel,
    i: int,
    layer: FFNLayout,
    parts: tuple[Part, ...],
    folder: Path,
    st_dtype: str,
    bundle: bool,
    bar: tqdm,
    quant: Quantization | None = None,
    origins: dict[str, set[str]] | None = None,
) -> LayerEntry:
    """Write layer i's neuron tensors: bundled rows (gate | up | down column) or one tensor per
    part, each with its data 16 KiB-aligned. Streams gate/up in row blocks; the down projection
    (a column per neuron) is read whole once and transposed. Quantized: each part's rows as
    packed weights, scales and biases side by side (bytes), per `layout.quantized_fields`."""
    n = src.arch.num_neurons(src.config)  # check_shapes made sure every part has as many
    esize = 1 if quant else layout.DTYPE_BYTES[ST_TO_DTYPE[st_dtype]]
    groups = [tuple(p.name for p in parts)] if bundle else [(p.name,) for p in parts]
    width = {p.name: (p.nbytes_quantized if quant else p.elems) for p in parts}  # stored elements of a row
    planned = [
        PlannedTensor(
            layout.bundle_tensor_name(i) if bundle else layout.part_tensor_name(i, g[0]),
            "U8" if quant else st_dtype,
            (n, sum(width[p] for p in g)),
            align=DATA_ALIGNMENT,
        )
        for g in groups
    ]
    columns = {}  # parts stored as columns in the source, transposed once (neuron-major)
    for name in width:
        if _orientation(src, name) == "col":
            columns[name] = np.ascontiguousarray(_float_source(src, layer, name, st_dtype).T)

    def float_rows(name: str, start: int, stop: int) -> np.ndarray:
        if name in columns:
            return columns[name][start:stop]
        return _float_source(src, layer, name, st_dtype, slice(start, stop))

    def rows(name: str, start: int, stop: int) -> np.ndarray:
        if quant is None:
            return float_rows(name, start, stop)
        if (
            name in layer.quant_names
            and name not in columns
            and layer.source_quant[name] == (quant.bits, quant.group_size)
        ):
            s_name, b_name = layer.quant_names[name]
            qw = src.read(layer.part_names[name], slice(start, stop))
            qs, qb = (
                convert_raw(src.read(x, slice(start, stop)), src.info(x).dtype, st_dtype)
                for x in (s_name, b_name)
            )
            origin = "copied"
        else:
            qw, qs, qb = q.quantize_rows(
                float_rows(name, start, stop), st_dtype, quant.bits, quant.group_size
            )
            origin = "requantized" if name in layer.quant_names else "quantized"
        if origins is not None:
            origins.setdefault(name, set()).add(origin)
        return np.concatenate(
            [np.ascontiguousarray(a).view(np.uint8).reshape(stop - start, -1) for a in (qw, qs, qb)], axis=1
        )

    rel = layout.layer_file(i)
    h = hashlib.new(layout.CHECKSUM)
    with SafetensorsWriter(folder / rel, planned) as w:
        for t, g in zip(planned, groups):
            block = max(1, ROW_BLOCK_BYTES // (t.shape[1] * esize))
            for start in range(0, n, block):
                stop = min(n, start + block)
                chunk = (
                    np.concatenate([rows(p, start, stop) for p in g], axis=1)
                    if len(g) > 1
                    else rows(g[0], start, stop)
                )
                chunk = np.ascontiguousarray(chunk)
                w.write(t.name, chunk)
                h.update(memoryview(chunk).cast("B"))
                bar.update(sum(_source_bytes(src, layer, p) * (stop - start) // n for p in g))
    segments = tuple(
        Segment(t.name, g, w.offsets[t.name], t.shape[1] * esize) for t, g in zip(planned, groups)
    )
    return LayerEntry(i, rel, n, sum(s.row_bytes for s in segments), h.hexdigest(), segments)


def _orientation(src: SourceModel, part: str) -> str:
    return next(p.orientation for p in src.arch.family.parts if p.name == part)


def _float_source(
    src: SourceModel, layer: FFNLayout, part: str, st_dtype: str, rows: slice | None = None
) -> np.ndarray:
    """A part's source weight (or rows of it) as raw `st_dtype` floats; a quantized source
    weight is dequantized (``mx.dequantize``) first."""
    name = layer.part_names[part]
    if part not in layer.quant_names:
        return convert_raw(src.read(name, rows), src.info(name).dtype, st_dtype)
    s_name, b_name = layer.quant_names[part]
    bits, group_size = layer.source_quant[part]
    scale_st = src.info(s_name).dtype
    return q.dequantize_raw(
        src.read(name, rows),
        src.read(s_name, rows),
        src.read(b_name, rows),
        scale_st,
        bits,
        group_size,
        st_dtype,
    )


def _source_bytes(src: SourceModel, layer: FFNLayout, part: str) -> int:
    names = [layer.part_names[part], *layer.quant_names.get(part, ())]
    return sum(src.info(x).nbytes for x in names)


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix in COPIED_SUFFIXES and f.name not in SKIPPED_FILES:
            shutil.copy2(f, dst / f.name)


def verify(folder: str | os.PathLike, progress: bool = True) -> Manifest:
    """Re-read every file of a flash folder and check every checksum; raises FlashFormatError."""
    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    layout.check_files(folder, manifest)
    for e in tqdm(manifest.layers, desc="verify", unit="layer", disable=not progress, file=sys.stderr):
        if layout.layer_digest(folder, e) != e.checksum:
            raise layout.FlashFormatError(
                f"{folder / e.file}: checksum mismatch in layer {e.layer}: the file is corrupt; re-run mlx_flash.convert"
            )
    for e in tqdm(manifest.experts, desc="verify", unit="layer", disable=not progress, file=sys.stderr):
        bad = layout.corrupt_experts(folder, e)
        if bad:
            raise layout.FlashFormatError(
                f"{folder / e.file}: checksum mismatch in expert {bad[0]} of layer {e.layer}: the file is corrupt; "
                "re-run mlx_flash.convert"
            )
    layout.verify_dense(folder, manifest)
    return manifest


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.convert",
        description="Convert a Hugging Face / mlx-lm model folder into a flash folder (FFN neurons bundled on flash).",
    )
    p.add_argument("--model", help="source model folder, or a Hugging Face repo id")
    p.add_argument("--out", help="destination flash folder")
    p.add_argument("--dtype", choices=sorted(DTYPE_TO_ST), help="dtype on flash (default: the source's)")
    p.add_argument(
        "--quantize",
        type=int,
        choices=layout.QUANT_BITS,
        metavar="BITS",
        help="quantize neuron bundles (and the dense part) to 4 or 8 bits, MLX affine along hidden "
        "(default: float; an MLX-quantized source keeps its bits)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=layout.QUANT_GROUP_SIZES,
        metavar="N",
        help=f"elements per quantization group: 32, 64 or 128 (default {layout.DEFAULT_GROUP_SIZE}, or the source's)",
    )
    p.add_argument(
        "--dense-bits",
        default=str(DEFAULT_DENSE_BITS),
        choices=("4", "8", "float"),
        help=f"with --quantize: bits of the dense part (attention, embeddings), or float (default {DEFAULT_DENSE_BITS})",
    )
    p.add_argument(
        "--activation",
        choices=sorted(ACTIVATIONS),
        help="the FFN's activation, when config.json does not say it right (drelu: relu on gate and up, TurboSparse)",
    )
    p.add_argument(
        "--no-bundle",
        action="store_true",
        help="store each FFN part as its own tensor (the paper's unbundled baseline)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--verify", metavar="DIR", help="re-read a flash folder and check every checksum, then exit"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.verify:
        m = verify(args.verify, progress=not args.quiet)
        what = (
            f"{sum(e.data_bytes for e in m.experts) / 1e6:.1f} MB of experts"
            if m.is_moe
            else f"{m.ffn_bytes() / 1e6:.1f} MB of FFN neurons"
        )
        print(f"{args.verify}: OK ({m.num_layers} layers, {what}, checksums match)")
        return 0
    if not args.model or not args.out:
        p.error("--model and --out are required (or --verify DIR)")
    t0 = time.perf_counter()
    m = convert(
        args.model,
        args.out,
        dtype=args.dtype,
        bundle=not args.no_bundle,
        overwrite=args.overwrite,
        progress=not args.quiet,
        quantize=args.quantize,
        group_size=args.group_size,
        dense_bits=None if args.dense_bits == "float" else int(args.dense_bits),
        activation=args.activation,
    )
    dt = time.perf_counter() - t0
    if m.is_moe:
        e = m.experts[0]
        kind = f"{e.bits}-bit, groups of {e.group_size}" if e.bits else m.dtype
        print(
            f"wrote {args.out}: {len(m.experts)} MoE layers x {e.num_experts} experts, {e.expert_bytes} B per expert "
            f"({kind}), {sum(x.data_bytes for x in m.experts) / 1e6:.1f} MB of experts on flash; {dt:.1f} s; "
            f"peak memory {peak_rss_bytes() / 1e6:.0f} MB"
        )
        return 0
    kind = (
        m.dtype
        if m.quantization is None
        else f"{m.quantization.bits}-bit, groups of {m.quantization.group_size}, {m.dtype} scales"
    )
    print(
        f"wrote {args.out}: {m.num_layers} layers x {m.layers[0].num_neurons} neurons, "
        f"{m.layers[0].bundle_bytes} B per neuron ({'bundled' if m.bundled else 'unbundled'}, {kind}), "
        f"{m.ffn_bytes() / 1e6:.1f} MB of FFN on flash; {dt:.1f} s; peak memory {peak_rss_bytes() / 1e6:.0f} MB"
    )
    return 0


def cli() -> None:
    """The `mlx-flash-convert` command: main() with errors as one line and an exit status."""
    sys.exit(run_cli(main, prog="mlx_flash.convert"))


if __name__ == "__main__":
    cli()
