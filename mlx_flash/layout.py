"""The flash folder format: the one source of truth for names, offsets, alignment and checksums.

A flash folder holds:
- ``config.json`` and tokenizer files, copied from the source model;
- ``dense.safetensors``: every weight that is not an FFN neuron;
- ``ffn/layer_NNN.safetensors``: per layer, the neuron bundles. Bundled (the default): one 2-D
  tensor ``[num_neurons, bundle_elems]`` whose row i is neuron i's parts side by side, in the
  order of the manifest's ``parts`` (gate row, up row, down column). Unbundled (``--no-bundle``,
  the paper's baseline): one ``[num_neurons, elems]`` tensor per part. Every such tensor's data
  starts at a file offset that is a multiple of ``DATA_ALIGNMENT`` (16 KiB);
- ``flash_manifest.json``: described by `Manifest`; a reader takes every offset from it.

Quantized bundles (``convert --quantize 4|8``): each part of a neuron's row is stored as MLX's
affine quantization of that row along the hidden dimension (``mx.quantize(row, group_size,
bits)``): the packed ``uint32`` weights, then the ``scales``, then the ``biases`` (one each per
group of `group_size` elements, in the manifest's float `dtype`), parts one after the other in
the manifest's part order, no padding. Such a bundle tensor is stored as bytes (``U8``,
``[num_neurons, bundle_bytes]``) and the manifest records `quantization` (bits, group size,
mode, what was done to each part) and, per part, its `fields` (name, dtype, elements and byte
offset inside the part), so a reader takes every byte position from the manifest. The down
projection's column of neuron i is quantized as a row too (along hidden), which is what lets a
neuron's bundle be read alone.

Versions: a float folder is written with ``format_version`` 1, as before (a reader of version
1 reads it right). A quantized folder is written with version 2: a version-1 reader would
take its packed bytes for float rows, and it refuses a version above 1 ("newer than this
mlx_flash reads"). A mixture-of-experts folder is written with version 3 (see below). This
module reads all three.

Mixture-of-experts folders (format_version 3): the routed experts of every MoE layer are on
flash, everything else (attention, embeddings, routers, shared experts, dense FFN layers such
as DeepSeek's first ones) is in ``dense.safetensors``. Per MoE layer, ``experts/layer_NNN
.safetensors`` holds one tensor ``[num_experts, expert_bytes]`` (bytes, ``U8``) whose row e is
expert e's bundle: each of its fields (`ExpertField`: ``gate_proj.weight``, ``gate_proj.scales``,
``gate_proj.biases``, ``gate_proj.bias``, ``up_proj...``, ``down_proj...``, as mlx-lm's stacked
`SwitchGLU` / `SwitchMLP` parameters name them, sliced at expert e) one after the other at the
byte offsets the manifest lists, then zeros up to `expert_bytes`, a multiple of `EXPERT_ALIGNMENT`:
every expert starts on a 4 KiB boundary and is read with one O_DIRECT read. The manifest's
`experts` lists, per MoE layer (`ExpertLayer`), the model layer, the path of the module in the
mlx-lm model, file, tensor, data offset, the fields, the quantization of its weights (bits and
group size, or none) and the sha256 of every expert's bundle; its `layers` and `parts` are empty.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import MlxFlashError

FORMAT_VERSION = 3  # the newest version this module reads
FLOAT_FORMAT_VERSION = 1  # written for float folders (unchanged since version 1)
QUANTIZED_FORMAT_VERSION = 2  # written for quantized folders; version-1 readers refuse them
MOE_FORMAT_VERSION = 3  # written for mixture-of-experts folders
EXPERTS_DIR = "experts"
EXPERT_ALIGNMENT = 4096  # every expert's bundle starts (and its stride is) a multiple of this
EXPERT_FIELD_ALIGNMENT = 16  # every field inside a bundle starts on this boundary
MANIFEST_NAME = "flash_manifest.json"
DENSE_NAME = "dense.safetensors"
FFN_DIR = "ffn"
PREDICTORS_NAME = "predictors.safetensors"
DATA_ALIGNMENT = 16 * 1024  # every neuron tensor's data starts on this boundary
SECTOR = 4096  # O_DIRECT granularity assumed by readers
CHECKSUM = "sha256"

# Manifest dtype names <-> safetensors dtype names and element sizes.
DTYPE_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Quantized bundles: MLX's affine scheme, the bit widths and group sizes convert writes.
QUANT_MODE = "affine"
QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
QUANT_FIELDS = ("weight", "scales", "biases")  # in this order inside a part


class FlashFormatError(MlxFlashError):
    """A flash folder that is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class Field:
    """One stored field of a quantized part: the packed weights, the scales or the biases."""

    name: str  # weight | scales | biases
    dtype: str  # uint32 for weight; the manifest's float dtype for scales and biases
    elems: int  # elements of this field in one neuron's row
    offset: int  # bytes from the start of the part inside a row

    @property
    def nbytes(self) -> int:
        return self.elems * FIELD_DTYPE_BYTES[self.dtype]


FIELD_DTYPE_BYTES = {"uint32": 4, **DTYPE_BYTES}


@dataclass(frozen=True)
class Part:
    name: str  # gate | up | down
    elems: int  # elements of this part in one neuron's row (the hidden size), before quantization
    fields: tuple[Field, ...] = ()  # quantized folders: how the part's bytes are laid out

    @property
    def nbytes_quantized(self) -> int:
        return sum(f.nbytes for f in self.fields)


@dataclass(frozen=True)
class Quantization:
    """How a quantized folder's bundles were made (MLX affine quantization along hidden)."""

    bits: int
    group_size: int
    mode: str = QUANT_MODE
    # What was done, for people and tools: per part "quantized" (from float weights),
    # "copied" (the source's packed rows, scales and biases taken as they are) or
    # "requantized" (the source's quantization dequantized and quantized again per neuron,
    # along hidden); "dense": "quantized" | "copied" (as in the source); "source": the
    # source's quantization config, if it had one.
    origin: dict = field(default_factory=dict)


def quantized_fields(elems: int, bits: int, group_size: int, dtype: str) -> tuple[Field, ...]:
    """The byte layout of one part of `elems` elements quantized with (bits, group_size):
    packed uint32 weights, then scales, then biases (MLX's mx.quantize output, per row)."""
    packed = elems * bits // 32
    groups = elems // group_size
    w = Field("weight", "uint32", packed, 0)
    s = Field("scales", dtype, groups, w.nbytes)
    b = Field("biases", dtype, groups, s.offset + s.nbytes)
    return (w, s, b)


@dataclass(frozen=True)
class Column:
    """Where one output array of a reader comes from in a segment's rows: bytes [start, stop)
    of each row, stored as `dtype` (uint32 or a float dtype)."""

    key: str  # the part ("gate") in float folders, "part.field" ("gate.scales") in quantized ones
    start: int
    stop: int
    dtype: str


@dataclass(frozen=True)
class Segment:
    """One neuron-major tensor of a layer: row i holds `parts` of neuron i, side by side."""

    tensor: str
    parts: tuple[str, ...]
    data_offset: int  # bytes from the start of the layer's file
    row_bytes: int

    def row_offset(self, neuron: int) -> int:
        return self.data_offset + neuron * self.row_bytes


@dataclass(frozen=True)
class LayerEntry:
    layer: int
    file: str  # relative to the flash folder
    num_neurons: int
    bundle_bytes: int  # bytes of one whole neuron (all parts)
    checksum: str  # sha256 of the layer's segment data, in segment order
    segments: tuple[Segment, ...]

    @property
    def tensor(self) -> str:
        return self.segments[0].tensor

    @property
    def data_offset(self) -> int:
        return self.segments[0].data_offset

    @property
    def data_bytes(self) -> int:
        return self.num_neurons * self.bundle_bytes


EXPERT_DTYPES = {"uint32": 4, **DTYPE_BYTES}  # what an expert's fields are stored as


@dataclass(frozen=True)
class ExpertField:
    """One field of an expert's bundle: a parameter of mlx-lm's stacked switch module
    (``gate_proj.weight``, ``down_proj.scales``, ``up_proj.bias``, ...) at one expert."""

    name: str
    dtype: str  # uint32 (packed quantized weights) or a float dtype, as stored
    shape: tuple[int, ...]  # of one expert (the stacked parameter's shape without its first axis)
    offset: int  # bytes from the start of the bundle

    @property
    def nbytes(self) -> int:
        n = EXPERT_DTYPES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ExpertLayer:
    """The routed experts of one MoE layer on flash."""

    layer: int  # the model's layer index
    module: str  # path of the routed-experts module in the mlx-lm model ("model.layers.3.mlp.switch_mlp")
    file: str
    tensor: str
    data_offset: int  # bytes from the start of the file to expert 0's bundle
    num_experts: int
    expert_bytes: int  # the stride of the bundles: a multiple of EXPERT_ALIGNMENT
    fields: tuple[ExpertField, ...]
    checksums: tuple[str, ...]  # sha256 of each expert's bundle (expert_bytes bytes)
    bits: int = 0  # quantized weights: bits and group size (0: float weights)
    group_size: int = 0

    def expert_offset(self, expert: int) -> int:
        return self.data_offset + expert * self.expert_bytes

    @property
    def data_bytes(self) -> int:
        return self.num_experts * self.expert_bytes


def expert_field_layout(
    fields: list[tuple[str, str, tuple[int, ...]]],
) -> tuple[tuple[ExpertField, ...], int]:
    """Offsets of (name, dtype, shape) fields packed into one bundle, and the bundle's stride."""
    out, pos = [], 0
    for name, dtype, shape in fields:
        f = ExpertField(name, dtype, tuple(int(d) for d in shape), pos)
        out.append(f)
        pos = -(-(pos + f.nbytes) // EXPERT_FIELD_ALIGNMENT) * EXPERT_FIELD_ALIGNMENT
    return tuple(out), max(EXPERT_ALIGNMENT, -(-pos // EXPERT_ALIGNMENT) * EXPERT_ALIGNMENT)


@dataclass
class Manifest:
    source_model: str
    model_type: str
    family: str  # gated | two_matrix
    activation: str  # as the config names it (relu, silu, gelu_new, ...)
    dtype: str  # float32 | float16 | bfloat16
    hidden_size: int
    num_layers: int
    bundled: bool
    parts: tuple[Part, ...]
    layers: list[LayerEntry]
    format_version: int = FORMAT_VERSION
    checksum_algorithm: str = CHECKSUM
    dense_file: str = DENSE_NAME
    dense_checksum: str = ""
    predictors_file: str | None = None
    extra: dict = field(default_factory=dict)
    quantization: Quantization | None = None
    experts: list[ExpertLayer] = field(default_factory=list)  # MoE folders: the routed experts

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)

    def expert_layer(self, layer: int) -> ExpertLayer:
        """The ExpertLayer of model layer `layer`."""
        return next(e for e in self.experts if e.layer == layer)

    def expert_rows(self) -> Manifest:
        """The experts as a neuron-row manifest a `FlashReader` reads: its layer j is MoE layer
        j (`self.experts[j]`), its "neurons" the experts, each row one whole bundle returned
        as raw words (``{"expert.bundle": uint32 [n, expert_bytes / 4]}`` with ``raw=True``)."""
        entries = [
            LayerEntry(
                j,
                e.file,
                e.num_experts,
                e.expert_bytes,
                "",
                (Segment(e.tensor, ("expert",), e.data_offset, e.expert_bytes),),
            )
            for j, e in enumerate(self.experts)
        ]
        stride = self.experts[0].expert_bytes
        if any(e.expert_bytes != stride for e in self.experts):
            raise FlashFormatError(f"{MANIFEST_NAME}: MoE layers with different expert strides")
        return Manifest(
            source_model=self.source_model,
            model_type=self.model_type,
            family="experts",
            activation="",
            dtype="float32",  # rows are raw words: read straight into the outputs where aligned
            hidden_size=self.hidden_size,
            num_layers=len(entries),
            bundled=True,
            parts=(Part("expert", stride // 4, (Field("bundle", "uint32", stride // 4, 0),)),),
            layers=entries,
            format_version=self.format_version,
        )

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one float element (of the rows; of the scales and biases when quantized)."""
        return DTYPE_BYTES[self.dtype]

    @property
    def quantized(self) -> bool:
        return self.quantization is not None

    @property
    def storage_st_dtype(self) -> str:
        """The safetensors dtype of the neuron tensors: bytes (U8) when quantized."""
        return "U8" if self.quantized else DTYPE_TO_ST[self.dtype]

    @property
    def storage_elem_bytes(self) -> int:
        return 1 if self.quantized else self.dtype_bytes

    def part_bytes(self, name: str) -> int:
        """Bytes of one neuron's part `name` on flash."""
        p = next(p for p in self.parts if p.name == name)
        return p.nbytes_quantized if p.fields else p.elems * self.dtype_bytes

    def columns(self, seg: Segment) -> list[Column]:
        """The reader's outputs held by each row of `seg`, with their byte ranges in a row."""
        cols, pos = [], 0
        by_name = {p.name: p for p in self.parts}
        for name in seg.parts:
            p = by_name[name]
            if p.fields:
                cols += [
                    Column(f"{name}.{f.name}", pos + f.offset, pos + f.offset + f.nbytes, f.dtype)
                    for f in p.fields
                ]
            else:
                cols.append(Column(name, pos, pos + p.elems * self.dtype_bytes, self.dtype))
            pos += self.part_bytes(name)
        return cols

    def row_fields(self) -> dict[str, tuple[int, str]]:
        """What a reader returns per neuron: {key: (elements, numpy dtype name)}. Float folders:
        {part: (elems, "float32")}; quantized: {"part.weight": (packed, "uint32"),
        "part.scales": (groups, "float32"), "part.biases": (groups, "float32")} per part."""
        if not any(p.fields for p in self.parts):
            return {p.name: (p.elems, "float32") for p in self.parts}
        return {
            f"{p.name}.{f.name}": (f.elems, "uint32" if f.dtype == "uint32" else "float32")
            for p in self.parts
            for f in p.fields
        }

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    @property
    def bundle_elems(self) -> int:
        return sum(p.elems for p in self.parts)

    def part_columns(self) -> dict[str, tuple[int, int]]:
        """Element range [start, stop) of each part inside a whole-neuron bundle row."""
        cols, start = {}, 0
        for p in self.parts:
            cols[p.name] = (start, start + p.elems)
            start += p.elems
        return cols

    def ffn_bytes(self) -> int:
        return sum(e.data_bytes for e in self.layers)

    def to_json(self) -> dict:
        parts = [{"name": p.name, "elems": p.elems} for p in self.parts]
        if self.quantized:
            for j, p in zip(parts, self.parts):
                j["fields"] = [asdict(f) for f in p.fields]
        d = {
            "format_version": self.format_version,
            "source_model": self.source_model,
            "model_type": self.model_type,
            "family": self.family,
            "activation": self.activation,
            "dtype": self.dtype,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "bundled": self.bundled,
            "parts": parts,
            "dense_file": self.dense_file,
            "dense_checksum": self.dense_checksum,
            "predictors_file": self.predictors_file,
            "checksum_algorithm": self.checksum_algorithm,
            "layers": [],
            "extra": self.extra,
        }
        if self.quantized:
            d["quantization"] = asdict(self.quantization)
        for e in self.layers:
            entry = {
                "layer": e.layer,
                "file": e.file,
                "num_neurons": e.num_neurons,
                "bundle_bytes": e.bundle_bytes,
                "checksum": e.checksum,
                "segments": [
                    {
                        "tensor": s.tensor,
                        "parts": list(s.parts),
                        "data_offset": s.data_offset,
                        "row_bytes": s.row_bytes,
                    }
                    for s in e.segments
                ],
            }
            if self.bundled:  # the single bundle tensor, at the layer's top level too
                entry["tensor"] = e.tensor
                entry["data_offset"] = e.data_offset
            d["layers"].append(entry)
        if self.experts:
            d["experts"] = [
                {
                    "layer": e.layer,
                    "module": e.module,
                    "file": e.file,
                    "tensor": e.tensor,
                    "data_offset": e.data_offset,
                    "num_experts": e.num_experts,
                    "expert_bytes": e.expert_bytes,
                    "bits": e.bits,
                    "group_size": e.group_size,
                    "fields": [
                        {"name": f.name, "dtype": f.dtype, "shape": list(f.shape), "offset": f.offset}
                        for f in e.fields
                    ],
                    "checksums": list(e.checksums),
                }
                for e in self.experts
            ]
        return d

    @classmethod
    def from_json(cls, d: dict, where: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate a manifest dict; every problem is a one-line FlashFormatError."""
        if not isinstance(d, dict):
            raise FlashFormatError(f"{where}: not a JSON object")
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise FlashFormatError(
                f"{where}: missing or invalid format_version ({version!r}); re-run mlx_flash.convert"
            )
        if version > FORMAT_VERSION:
            raise FlashFormatError(
                f"{where}: format_version {version} is newer than this mlx_flash reads ({FORMAT_VERSION}); upgrade mlx_flash"
            )
        try:
            parts = tuple(
                Part(
                    str(p["name"]),
                    _pos_int(p["elems"]),
                    tuple(
                        Field(str(f["name"]), str(f["dtype"]), _pos_int(f["elems"]), _nonneg_int(f["offset"]))
                        for f in p.get("fields") or ()
                    ),
                )
                for p in d["parts"]
            )
            q = d.get("quantization")
            quantization = None
            if q is not None:
                if version < QUANTIZED_FORMAT_VERSION:
                    raise ValueError(f"quantization needs format_version {QUANTIZED_FORMAT_VERSION}")
                quantization = Quantization(
                    _pos_int(q["bits"]),
                    _pos_int(q["group_size"]),
                    str(q.get("mode", QUANT_MODE)),
                    dict(q.get("origin") or {}),
                )
            layers = []
            for e in d["layers"]:
                segs = tuple(
                    Segment(
                        str(s["tensor"]),
                        tuple(str(x) for x in s["parts"]),
                        _nonneg_int(s["data_offset"]),
                        _pos_int(s["row_bytes"]),
                    )
                    for s in e["segments"]
                )
                layers.append(
                    LayerEntry(
                        _nonneg_int(e["layer"]),
                        _rel_path(e["file"]),
                        _pos_int(e["num_neurons"]),
                        _pos_int(e["bundle_bytes"]),
                        str(e["checksum"]),
                        segs,
                    )
                )
            m = cls(
                source_model=str(d.get("source_model", "")),
                model_type=str(d["model_type"]),
                family=str(d["family"]),
                activation=str(d["activation"]),
                dtype=str(d["dtype"]),
                hidden_size=_pos_int(d["hidden_size"]),
                num_layers=_pos_int(d["num_layers"]),
                bundled=bool(d["bundled"]),
                parts=parts,
                layers=layers,
                format_version=version,
                checksum_algorithm=str(d.get("checksum_algorithm", CHECKSUM)),
                dense_file=_rel_path(d.get("dense_file", DENSE_NAME)),
                dense_checksum=str(d.get("dense_checksum", "")),
                predictors_file=_rel_path(d["predictors_file"]) if d.get("predictors_file") else None,
                extra=dict(d.get("extra") or {}),
                quantization=quantization,
                experts=[_expert_layer(e) for e in d.get("experts") or ()],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FlashFormatError(
                f"{where}: malformed manifest ({_describe(exc)}); re-run mlx_flash.convert"
            ) from None
        if m.checksum_algorithm != CHECKSUM:
            raise FlashFormatError(
                f"{where}: checksum_algorithm {m.checksum_algorithm!r} is not {CHECKSUM!r}; re-run mlx_flash.convert"
            )
        m.validate(where)
        return m

    def validate(self, where: str = MANIFEST_NAME) -> None:
        """Internal consistency: sizes, alignment, parts. Raises FlashFormatError."""
        if self.dtype not in DTYPE_BYTES:
            raise FlashFormatError(f"{where}: unknown dtype {self.dtype!r}")
        if self.experts:
            self._validate_experts(where)
            return
        if len(self.layers) != self.num_layers or [e.layer for e in self.layers] != list(
            range(self.num_layers)
        ):
            raise FlashFormatError(f"{where}: layers do not list 0..{self.num_layers - 1} in order")
        names = self.part_names
        if len(set(names)) != len(names) or not names:
            raise FlashFormatError(f"{where}: parts {names} malformed")
        self._validate_quantization(where)
        for e in self.layers:
            seg_parts = [p for s in e.segments for p in s.parts]
            if tuple(seg_parts) != names:
                raise FlashFormatError(
                    f"{where}: layer {e.layer} segments do not hold parts {names} in order"
                )
            if self.bundled and len(e.segments) != 1:
                raise FlashFormatError(f"{where}: bundled layer {e.layer} has {len(e.segments)} tensors")
            for s in e.segments:
                if s.row_bytes != sum(self.part_bytes(p) for p in s.parts):
                    raise FlashFormatError(
                        f"{where}: layer {e.layer} tensor {s.tensor}: row_bytes does not match its parts"
                    )
                if s.data_offset % DATA_ALIGNMENT:
                    raise FlashFormatError(
                        f"{where}: layer {e.layer} tensor {s.tensor}: data_offset not {DATA_ALIGNMENT}-aligned"
                    )
            if e.bundle_bytes != sum(s.row_bytes for s in e.segments):
                raise FlashFormatError(f"{where}: layer {e.layer}: bundle_bytes does not match its parts")

    def _validate_experts(self, where: str) -> None:
        """An MoE folder: no neuron layers; each MoE layer's bundles aligned, fields inside."""
        if self.format_version < MOE_FORMAT_VERSION:
            raise FlashFormatError(f"{where}: an MoE folder needs format_version {MOE_FORMAT_VERSION}")
        if self.layers or self.parts:
            raise FlashFormatError(f"{where}: an MoE folder lists neuron layers")
        seen = set()
        for e in self.experts:
            what = f"{where}: MoE layer {e.layer}"
            if e.layer >= self.num_layers or e.layer in seen:
                raise FlashFormatError(f"{what}: not a layer of the model, or listed twice")
            seen.add(e.layer)
            if e.data_offset % DATA_ALIGNMENT or e.expert_bytes % EXPERT_ALIGNMENT:
                raise FlashFormatError(f"{what}: bundles not {EXPERT_ALIGNMENT}-aligned")
            if len(e.checksums) != e.num_experts:
                raise FlashFormatError(f"{what}: {len(e.checksums)} checksums for {e.num_experts} experts")
            for f in e.fields:
                if f.dtype not in EXPERT_DTYPES or f.offset % EXPERT_FIELD_ALIGNMENT:
                    raise FlashFormatError(
                        f"{what}: field {f.name!r} has dtype {f.dtype!r} or a misaligned offset"
                    )
                if f.offset + f.nbytes > e.expert_bytes:
                    raise FlashFormatError(f"{what}: field {f.name!r} lies past the bundle's end")
            if e.bits and (e.bits not in (2, 3, 4, 5, 6, 8) or e.group_size < 1):
                raise FlashFormatError(f"{what}: quantization {e.bits}-bit group {e.group_size} is malformed")

    def _validate_quantization(self, where: str) -> None:
        """A quantized folder's parts must hold exactly the fields MLX's scheme makes."""
        q = self.quantization
        if q is None:
            if any(p.fields for p in self.parts):
                raise FlashFormatError(f"{where}: parts have quantized fields but there is no quantization")
            return
        if self.format_version < QUANTIZED_FORMAT_VERSION:
            raise FlashFormatError(
                f"{where}: a quantized folder needs format_version {QUANTIZED_FORMAT_VERSION}"
            )
        if q.mode != QUANT_MODE or q.bits not in QUANT_BITS or q.group_size not in QUANT_GROUP_SIZES:
            raise FlashFormatError(
                f"{where}: quantization {q.mode} {q.bits}-bit group {q.group_size} is not one this mlx_flash reads "
                f"({QUANT_MODE}, bits {QUANT_BITS}, group sizes {QUANT_GROUP_SIZES})"
            )
        for p in self.parts:
            if p.elems % q.group_size:
                raise FlashFormatError(
                    f"{where}: part {p.name!r} has {p.elems} elements, not a multiple of group size {q.group_size}"
                )
            if p.fields != quantized_fields(p.elems, q.bits, q.group_size, self.dtype):
                raise FlashFormatError(
                    f"{where}: part {p.name!r}: fields do not match {q.bits}-bit quantization in groups of {q.group_size}"
                )


def _expert_layer(e: dict) -> ExpertLayer:
    return ExpertLayer(
        layer=_nonneg_int(e["layer"]),
        module=str(e["module"]),
        file=_rel_path(e["file"]),
        tensor=str(e["tensor"]),
        data_offset=_nonneg_int(e["data_offset"]),
        num_experts=_pos_int(e["num_experts"]),
        expert_bytes=_pos_int(e["expert_bytes"]),
        fields=tuple(
            ExpertField(
                str(f["name"]),
                str(f["dtype"]),
                tuple(_pos_int(x) for x in f["shape"]),
                _nonneg_int(f["offset"]),
            )
            for f in e["fields"]
        ),
        checksums=tuple(str(c) for c in e["checksums"]),
        bits=_nonneg_int(e.get("bits", 0)),
        group_size=_nonneg_int(e.get("group_size", 0)),
    )


def _pos_int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
        raise ValueError(f"expected a positive integer, got {x!r}")
    return x


def _nonneg_int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"expected a non-negative integer, got {x!r}")
    return x


def _rel_path(x) -> str:
    p = str(x)
    if not p or os.path.isabs(p) or ".." in Path(p).parts:
        raise ValueError(f"file path {p!r} must be relative and inside the folder")
    return p


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc.args[0]!r}"
    return str(exc)


def expert_file(layer: int) -> str:
    return f"{EXPERTS_DIR}/layer_{layer:03d}.safetensors"


def expert_tensor_name(layer: int) -> str:
    return f"layers.{layer}.experts"


def expert_digest(bundle: bytes | memoryview | np.ndarray) -> str:
    """The checksum of one expert's bundle as stored (its `expert_bytes` bytes)."""
    return hashlib.new(CHECKSUM, memoryview(bundle).cast("B")).hexdigest()


def layer_file(layer: int) -> str:
    return f"{FFN_DIR}/layer_{layer:03d}.safetensors"


def bundle_tensor_name(layer: int) -> str:
    return f"layers.{layer}.bundles"


def part_tensor_name(layer: int, part: str) -> str:
    return f"layers.{layer}.{part}"


def manifest_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / MANIFEST_NAME


def is_flash_folder(folder: str | os.PathLike) -> bool:
    return manifest_path(folder).is_file()


def read_manifest(folder: str | os.PathLike) -> Manifest:
    path = manifest_path(folder)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise FlashFormatError(
            f"{folder}: not a flash folder (no {MANIFEST_NAME}); create one with python -m mlx_flash.convert"
        ) from None
    except OSError as e:
        raise FlashFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        d = json.loads(raw)
    except json.JSONDecodeError:
        raise FlashFormatError(f"{path}: not valid JSON; re-run mlx_flash.convert") from None
    return Manifest.from_json(d, str(path))


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    manifest.validate()
    path = manifest_path(folder)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1))
    os.replace(tmp, path)


def check_files(folder: str | os.PathLike, manifest: Manifest) -> None:
    """Cheap checks of the files against the manifest: each exists, is long enough, and its
    safetensors header holds each of the layer's tensors with the manifest's name, dtype,
    shape and data offset (so a shard of another conversion, or of another layer, is caught)."""
    from .safetensors_file import read_header  # the format's reader, below this module

    folder = Path(folder)
    headers: dict[str, dict] = {}
    for e in manifest.layers:
        path = folder / e.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FlashFormatError(f"{path}: missing; re-run mlx_flash.convert") from None
        except OSError as exc:
            raise FlashFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
        end = max(s.data_offset + s.row_bytes * e.num_neurons for s in e.segments)
        if size < end:
            raise FlashFormatError(
                f"{path}: truncated ({size} bytes, manifest needs {end}); re-run mlx_flash.convert"
            )
        if e.file not in headers:
            headers[e.file] = read_header(path)[0]
        for s in e.segments:
            t = headers[e.file].get(s.tensor)
            want = (
                manifest.storage_st_dtype,
                (e.num_neurons, s.row_bytes // manifest.storage_elem_bytes),
                s.data_offset,
            )
            if t is None or (t.dtype, t.shape, t.offset) != want:
                got = "missing" if t is None else f"{t.dtype} {list(t.shape)} at byte {t.offset}"
                raise FlashFormatError(
                    f"{path}: tensor {s.tensor!r} is {got}, {MANIFEST_NAME} says {want[0]} {list(want[1])} at byte "
                    f"{want[2]}: the file is not from this conversion; re-run mlx_flash.convert"
                )
    for e in manifest.experts:
        _check_expert_file(folder, manifest, e, headers)
    dense = folder / manifest.dense_file
    if not dense.is_file():
        raise FlashFormatError(f"{dense}: missing; re-run mlx_flash.convert")


def _check_expert_file(folder: Path, manifest: Manifest, e: ExpertLayer, headers: dict) -> None:
    from .safetensors_file import read_header

    path = folder / e.file
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FlashFormatError(f"{path}: missing; re-run mlx_flash.convert") from None
    end = e.data_offset + e.data_bytes
    if size < end:
        raise FlashFormatError(
            f"{path}: truncated ({size} bytes, manifest needs {end}); re-run mlx_flash.convert"
        )
    if e.file not in headers:
        headers[e.file] = read_header(path)[0]
    t = headers[e.file].get(e.tensor)
    want = ("U8", (e.num_experts, e.expert_bytes), e.data_offset)
    if t is None or (t.dtype, t.shape, t.offset) != want:
        got = "missing" if t is None else f"{t.dtype} {list(t.shape)} at byte {t.offset}"
        raise FlashFormatError(
            f"{path}: tensor {e.tensor!r} is {got}, {MANIFEST_NAME} says U8 {list(want[1])} at byte {want[2]}: "
            "the file is not from this conversion; re-run mlx_flash.convert"
        )


def file_digest(
    path: str | os.PathLike, ranges: list[tuple[int, int]] | None = None, chunk: int = 8 << 20
) -> str:
    """Checksum of byte ranges [start, end) of a file (the whole file when None), streamed."""
    h = hashlib.new(CHECKSUM)
    fd = os.open(path, os.O_RDONLY)
    try:
        for pos, end in ranges if ranges is not None else [(0, os.fstat(fd).st_size)]:
            while pos < end:
                b = os.pread(fd, min(chunk, end - pos), pos)
                if not b:
                    raise FlashFormatError(f"{path}: truncated at byte {pos}; re-run mlx_flash.convert")
                h.update(b)
                pos += len(b)
    finally:
        os.close(fd)
    return h.hexdigest()


def corrupt_experts(folder: str | os.PathLike, entry: ExpertLayer) -> list[int]:
    """The experts of a layer whose bundle on flash does not match its checksum."""
    from .safetensors_file import pread_exact

    path = Path(folder) / entry.file
    fd = os.open(path, os.O_RDONLY)
    try:
        return [
            x
            for x in range(entry.num_experts)
            if expert_digest(pread_exact(fd, entry.expert_bytes, entry.expert_offset(x), str(path)))
            != entry.checksums[x]
        ]
    finally:
        os.close(fd)


def layer_data_ranges(entry: LayerEntry) -> list[tuple[int, int]]:
    """The byte ranges of a layer's file that hold its neurons, in segment order."""
    return [(s.data_offset, s.data_offset + s.row_bytes * entry.num_neurons) for s in entry.segments]


def layer_digest(folder: str | os.PathLike, entry: LayerEntry) -> str:
    """Checksum of a layer's neuron data as stored on flash."""
    return file_digest(Path(folder) / entry.file, layer_data_ranges(entry))


def verify_layer(folder: str | os.PathLike, entry: LayerEntry, chunk: int = 8 << 20) -> list[np.ndarray]:
    """Check a layer's checksum (a FlashFormatError when it does not match) and return, per
    segment, the crc32 of every neuron's row as stored: a reader made with them
    (`runtime.VerifyingReader`) checks every row it delivers afterwards, cheaply."""
    from .safetensors_file import pread_exact

    path = Path(folder) / entry.file
    h = hashlib.new(CHECKSUM)
    crcs = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for s in entry.segments:
            crc = np.empty(entry.num_neurons, dtype=np.uint32)
            per = max(1, chunk // s.row_bytes)
            for lo in range(0, entry.num_neurons, per):
                hi = min(entry.num_neurons, lo + per)
                data = memoryview(pread_exact(fd, (hi - lo) * s.row_bytes, s.row_offset(lo), str(path)))
                h.update(data)
                for j in range(hi - lo):
                    crc[lo + j] = zlib.crc32(data[j * s.row_bytes : (j + 1) * s.row_bytes])
            crcs.append(crc)
    finally:
        os.close(fd)
    if h.hexdigest() != entry.checksum:
        raise FlashFormatError(
            f"{path}: checksum mismatch in layer {entry.layer}: the file is corrupt; re-run mlx_flash.convert"
        )
    return crcs


def verify_dense(folder: str | os.PathLike, manifest: Manifest) -> None:
    """Check the dense file's checksum (a FlashFormatError when it does not match; nothing to
    check when the manifest has none)."""
    path = Path(folder) / manifest.dense_file
    if manifest.dense_checksum and file_digest(path) != manifest.dense_checksum:
        raise FlashFormatError(f"{path}: checksum mismatch: the file is corrupt; re-run mlx_flash.convert")
