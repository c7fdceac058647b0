"""python -m mlx_flash.convert: a Hugging Face / mlx-lm model folder -> a flash folder.

The conversion streams: it reads the source one tensor (or one block of rows) at a time with
pread and writes as it goes, so a model larger than memory converts; peak memory is a small
multiple of the largest tensor (a layer's down projection, held once as read and once
transposed). It writes into a temporary folder beside the destination and renames it at the
end, so an interrupted conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import layout
from .dtypes import FLOAT_ST_DTYPES, convert_raw
from .errors import MlxFlashError, run_cli
from .families import Architecture, architecture_for
from .layout import DATA_ALIGNMENT, DTYPE_TO_ST, ST_TO_DTYPE, LayerEntry, Manifest, Part, Segment
from .safetensors_file import PlannedTensor, SafetensorsWriter, TensorInfo, read_header, read_tensor

# Files copied as they are from the source folder (config, tokenizer, chat template).
COPIED_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".jsonl")
SKIPPED_FILES = {"model.safetensors.index.json", layout.MANIFEST_NAME}
ROW_BLOCK_BYTES = 8 << 20  # neuron rows are converted and written in blocks of about this size


class ConvertError(MlxFlashError):
    """The source model cannot be converted."""


@dataclass
class SourceModel:
    """A source checkpoint: its folder, config, and where each tensor lives."""

    path: Path
    config: dict
    arch: Architecture
    tensors: dict[str, tuple[Path, TensorInfo]]

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
            raise ConvertError(f"{src}: not a folder (give a model folder with config.json and *.safetensors)")
        return path
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise ConvertError(f"{src}: no such folder")
    try:
        from mlx_lm.utils import _download

        return Path(_download(src))
    except Exception as e:  # network, auth, missing repo: all are one line for the user
        raise ConvertError(f"{src}: no such folder, and it could not be fetched from the Hugging Face hub ({type(e).__name__})") from None


def open_source(path: Path) -> SourceModel:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{path}: no config.json: not a model folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConvertError(f"{config_path}: unreadable config ({e})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{config_path}: config is not a JSON object")
    arch = architecture_for(config)
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
    return SourceModel(path, config, arch, tensors)


@dataclass
class FFNLayout:
    """Where one layer's FFN parts are in the source checkpoint."""

    part_names: dict[str, str]  # part -> source tensor name
    bias_names: dict[str, str]  # role -> source tensor name (kept in dense.safetensors)


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
        biases = {}
        for role, suffix in arch.family.biases.items():
            name = _find_tensor(src, arch, i, suffix)
            if name is not None:
                biases[role] = name
        layers.append(FFNLayout(parts, biases))
    return layers


def _find_tensor(src: SourceModel, arch: Architecture, layer: int, suffix: str) -> str | None:
    name = arch.source_name(layer, suffix)
    for candidate in (name, name.removeprefix("model.")):
        if candidate in src.tensors:
            return candidate
    return None


def check_shapes(src: SourceModel, ffn: list[FFNLayout], hidden: int, neurons: int) -> None:
    for i, layer in enumerate(ffn):
        for part, name in layer.part_names.items():
            info = src.info(name)
            orient = next(p.orientation for p in src.arch.family.parts if p.name == part)
            want = (neurons, hidden) if orient == "row" else (hidden, neurons)
            if info.shape != want:
                raise ConvertError(f"{name}: shape {info.shape}, expected {want} from config.json")
            if info.dtype not in FLOAT_ST_DTYPES:
                raise ConvertError(f"{name}: dtype {info.dtype} is not a float dtype (quantized checkpoints are not supported yet)")


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    bundle: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Convert the model at `source` into a flash folder at `out`; returns its manifest."""
    src = open_source(resolve_source(str(source)))
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ConvertError(f"{out}: already exists (pass --overwrite to replace it)")
    config, arch = src.config, src.arch
    hidden = int(config["hidden_size"])
    neurons = arch.num_neurons(config)
    activation = arch.activation(config)
    ffn = find_ffn(src)
    check_shapes(src, ffn, hidden, neurons)
    src_dtype = src.info(ffn[0].part_names[arch.family.parts[0].name]).dtype
    dtype = dtype or ST_TO_DTYPE[src_dtype]
    if dtype not in DTYPE_TO_ST:
        raise ConvertError(f"dtype {dtype!r} not supported (float16, bfloat16, float32)")
    st_dtype = DTYPE_TO_ST[dtype]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"  # a folder being replaced
    try:
        (tmp / layout.FFN_DIR).mkdir()
        ffn_names = {n for layer in ffn for n in layer.part_names.values()}
        dense_names = [n for n in src.tensors if n not in ffn_names]
        total = sum(src.info(n).nbytes for n in src.tensors)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress, file=sys.stderr)
        dense_checksum = _write_dense(src, dense_names, tmp / layout.DENSE_NAME, st_dtype, bar)
        parts = tuple(Part(p.name, hidden) for p in arch.family.parts)
        entries = [
            _write_layer(src, i, layer, parts, tmp, st_dtype, bundle, bar) for i, layer in enumerate(ffn)
        ]
        bar.close()
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
        )
        _copy_side_files(src.path, tmp)
        layout.write_manifest(tmp, manifest)
        if out.exists():  # renamed away, not deleted, until the new folder is in its place
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def _write_dense(src: SourceModel, names: list[str], path: Path, st_dtype: str, bar: tqdm) -> str:
    planned = []
    for n in names:
        info = src.info(n)
        dt = st_dtype if info.dtype in FLOAT_ST_DTYPES else info.dtype
        planned.append(PlannedTensor(n, dt, info.shape))
    with SafetensorsWriter(path, planned) as w:
        for t in planned:
            info = src.info(t.name)
            w.write(t.name, convert_raw(src.read(t.name), info.dtype, t.dtype))
            bar.update(info.nbytes)
    return layout.file_digest(path)


def _write_layer(
    src: SourceModel, i: int, layer: FFNLayout, parts: tuple[Part, ...], folder: Path, st_dtype: str, bundle: bool, bar: tqdm
) -> LayerEntry:
    """Write layer i's neuron tensors: bundled rows (gate | up | down column) or one tensor per
    part, each with its data 16 KiB-aligned. Streams gate/up in row blocks; the down projection
    (a column per neuron) is read whole once and transposed."""
    n = src.info(layer.part_names[parts[0].name]).shape[0]
    esize = layout.DTYPE_BYTES[ST_TO_DTYPE[st_dtype]]
    groups = [tuple(p.name for p in parts)] if bundle else [(p.name,) for p in parts]
    elems = {p.name: p.elems for p in parts}
    planned = [
        PlannedTensor(
            layout.bundle_tensor_name(i) if bundle else layout.part_tensor_name(i, g[0]),
            st_dtype,
            (n, sum(elems[p] for p in g)),
            align=DATA_ALIGNMENT,
        )
        for g in groups
    ]
    orientation = {p.name: p.orientation for p in src.arch.family.parts}
    columns = {}  # parts stored as columns in the source, transposed once (neuron-major)
    for name in elems:
        if orientation[name] == "col":
            info = src.info(layer.part_names[name])
            columns[name] = np.ascontiguousarray(convert_raw(src.read(layer.part_names[name]), info.dtype, st_dtype).T)

    def rows(name: str, start: int, stop: int) -> np.ndarray:
        if name in columns:
            return columns[name][start:stop]
        info = src.info(layer.part_names[name])
        return convert_raw(src.read(layer.part_names[name], slice(start, stop)), info.dtype, st_dtype)

    rel = layout.layer_file(i)
    h = hashlib.new(layout.CHECKSUM)
    with SafetensorsWriter(folder / rel, planned) as w:
        for t, g in zip(planned, groups):
            block = max(1, ROW_BLOCK_BYTES // (t.shape[1] * esize))
            for start in range(0, n, block):
                stop = min(n, start + block)
                chunk = np.concatenate([rows(p, start, stop) for p in g], axis=1) if len(g) > 1 else rows(g[0], start, stop)
                chunk = np.ascontiguousarray(chunk)
                w.write(t.name, chunk)
                h.update(memoryview(chunk).cast("B"))
                bar.update(sum(src.info(layer.part_names[p]).nbytes * (stop - start) // n for p in g))
    segments = tuple(
        Segment(t.name, g, w.offsets[t.name], t.shape[1] * esize) for t, g in zip(planned, groups)
    )
    return LayerEntry(i, rel, n, sum(s.row_bytes for s in segments), h.hexdigest(), segments)


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
            raise layout.FlashFormatError(f"{folder / e.file}: checksum mismatch in layer {e.layer}: the file is corrupt; re-run mlx_flash.convert")
    if manifest.dense_checksum and layout.file_digest(folder / manifest.dense_file) != manifest.dense_checksum:
        raise layout.FlashFormatError(f"{folder / manifest.dense_file}: checksum mismatch: the file is corrupt; re-run mlx_flash.convert")
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
    p.add_argument("--no-bundle", action="store_true", help="store each FFN part as its own tensor (the paper's unbundled baseline)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--verify", metavar="DIR", help="re-read a flash folder and check every checksum, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.verify:
        m = verify(args.verify, progress=not args.quiet)
        print(f"{args.verify}: OK ({m.num_layers} layers, {m.ffn_bytes() / 1e6:.1f} MB of FFN neurons, checksums match)")
        return 0
    if not args.model or not args.out:
        p.error("--model and --out are required (or --verify DIR)")
    t0 = time.perf_counter()
    m = convert(args.model, args.out, dtype=args.dtype, bundle=not args.no_bundle, overwrite=args.overwrite, progress=not args.quiet)
    dt = time.perf_counter() - t0
    print(
        f"wrote {args.out}: {m.num_layers} layers x {m.layers[0].num_neurons} neurons, "
        f"{m.layers[0].bundle_bytes} B per neuron ({'bundled' if m.bundled else 'unbundled'}, {m.dtype}), "
        f"{m.ffn_bytes() / 1e6:.1f} MB of FFN on flash; {dt:.1f} s; peak memory {peak_rss_bytes() / 1e6:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="mlx_flash.convert"))
