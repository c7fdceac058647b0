"""The vocabulary-sized tensors on flash: the token embedding table and the lm_head.

In a model whose vocabulary is large beside its hidden size (small models, and the tiny-random
checkpoints tests use) these tables are most of the resident bytes. When the budget planner
says so (`budget.fit_budget`), they stay in the flash folder's dense file and are read from it,
page cache bypassed, by a FlashReader of their own: a one-layer view of the dense file whose
"neurons" are the table's vocabulary rows (one segment per stored field: the weight, and the
scales and biases of a quantized table).

- `FlashEmbedding` replaces the model's `nn.Embedding` / `nn.QuantizedEmbedding`: a call reads
  the rows of the tokens it is given (each distinct token once) and returns what the resident
  table would (the same rows in the compute dtype; quantized rows dequantized as mlx's
  `QuantizedEmbedding` does). Its `as_linear` (a tied lm_head) streams the table.
- `FlashHead` replaces an untied `lm_head` (`nn.Linear` / `nn.QuantizedLinear`).

Streaming (`VocabTableReader.project`): the table in blocks of rows through two reused aligned
buffers, the next block read while the current one is multiplied (each block's logits are the
same matmul as the resident head's, on the same rows), so memory stays bounded by the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import host_writable_buffer
from .layout import SECTOR, Field, LayerEntry, Manifest, Part, Segment
from .reader import FlashReader
from .safetensors_file import TensorInfo

ST_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
HEAD_BLOCK_BYTES = 4 << 20  # a streamed lm_head block holds at most this many bytes of rows
HEAD_BUFFERS = 3  # blocks of memory the streaming uses: two read buffers, one computed from them
VOCAB_READ_THREADS = 8


def memory_bytes(tensors, compute_bytes: int) -> int:
    """Bytes of safetensors tensors once loaded: floats in the compute dtype, the rest as stored."""
    return sum(
        t.numel * (compute_bytes if t.dtype in ST_FLOATS else t.nbytes // max(t.numel, 1)) for t in tensors
    )


@dataclass(frozen=True)
class VocabTable:
    """A vocabulary-indexed table of the dense file: the module it is, and its stored fields."""

    module: str  # path in the mlx-lm model ("model.embed_tokens", "lm_head")
    fields: dict[str, TensorInfo]  # "weight" (and "scales", "biases" when quantized) -> tensor
    hidden: int
    bits: int = 0  # quantized: bits and group size (inferred from the shapes); 0: float
    group_size: int = 0

    @property
    def rows(self) -> int:
        return self.fields["weight"].shape[0]

    def memory_bytes(self, compute_bytes: int) -> int:
        return memory_bytes(self.fields.values(), compute_bytes)

    def read_row_bytes(self) -> int:
        """Bytes of one row as the reader returns it (packed words, floats as float32)."""
        return sum(4 * t.shape[1] for t in self.fields.values())

    def block_rows(self) -> int:
        """Rows per streamed block: at least 8 blocks a table, at most HEAD_BLOCK_BYTES a block."""
        return max(1, min(-(-self.rows // 8), HEAD_BLOCK_BYTES // self.read_row_bytes()))

    def stream_bytes(self) -> int:
        """Memory of streaming the table (HEAD_BUFFERS blocks)."""
        return HEAD_BUFFERS * self.block_rows() * self.read_row_bytes()

    def rows_manifest(self, dense_file: str) -> Manifest:
        """The table as a one-layer row manifest a FlashReader reads (raw fields per row)."""
        names = list(self.fields)
        parts = []
        for name in names:
            t = self.fields[name]
            dtype = "uint32" if t.dtype == "U32" else ST_FLOATS[t.dtype]
            parts.append(Part(name, t.shape[1], (Field("v", dtype, t.shape[1], 0),)))
        segments = tuple(
            Segment(t.name, (name,), t.offset, t.nbytes // t.shape[0]) for name, t in self.fields.items()
        )
        entry = LayerEntry(0, dense_file, self.rows, sum(s.row_bytes for s in segments), "", segments)
        return Manifest(
            source_model="",
            model_type="",
            family="vocab",
            activation="",
            dtype="float32",
            hidden_size=self.hidden,
            num_layers=1,
            bundled=False,
            parts=tuple(parts),
            layers=[entry],
        )


def find_tables(
    model: nn.Module, header: dict[str, TensorInfo], hidden: int, vocab_size
) -> dict[str, VocabTable]:
    """The model's token embedding ("embed") and untied lm_head ("head") that can be read from
    the dense file by rows: an `nn.Embedding` / `nn.Linear` (of vocabulary rows, no bias) whose
    weight (and scales/biases) the header holds under the module's own name, in a layout the
    reader returns (float, or affine-quantized uint32 with float scales and biases)."""
    out: dict[str, VocabTable] = {}
    for path, module in model.named_modules():
        role = (
            "embed"
            if isinstance(module, nn.Embedding)
            else "head"
            if isinstance(module, nn.Linear) and path.split(".")[-1] == "lm_head" and "bias" not in module
            else None
        )
        if role is None or role in out or module.weight.shape[0] != vocab_size:
            continue
        table = _table(path, header, hidden, int(module.weight.shape[0]))
        if table is not None:
            out[role] = table
    return out


def _table(path: str, header: dict[str, TensorInfo], hidden: int, rows: int) -> VocabTable | None:
    fields = {f: header.get(f"{path}.{f}") for f in ("weight", "scales", "biases")}
    fields = {k: v for k, v in fields.items() if v is not None}
    w = fields.get("weight")
    if w is None or len(w.shape) != 2 or w.shape[0] != rows or f"{path}.bias" in header:
        return None
    if set(fields) == {"weight"}:
        if w.dtype not in ST_FLOATS or w.shape[1] != hidden:
            return None
        return VocabTable(path, fields, hidden)
    s, b = fields.get("scales"), fields.get("biases")
    if w.dtype != "U32" or s is None or b is None or s.dtype not in ST_FLOATS or b.dtype != s.dtype:
        return None
    if s.shape != b.shape or s.shape[0] != rows or hidden % s.shape[1] or (32 * w.shape[1]) % hidden:
        return None
    return VocabTable(path, fields, hidden, bits=32 * w.shape[1] // hidden, group_size=hidden // s.shape[1])


class VocabTableReader:
    """Reads one VocabTable from the dense file: rows of given tokens, or all of it in blocks."""

    def __init__(self, folder, dense_file: str, table: VocabTable, compute_dtype: mx.Dtype, runtime):
        self.table = table
        self.dtype = compute_dtype
        self.runtime = runtime
        self.reader = FlashReader(folder, table.rows_manifest(dense_file), threads=VOCAB_READ_THREADS)
        self._buffers: list[tuple[dict[str, np.ndarray], dict[str, mx.array]]] = []

    def _arrays(self, rows: dict[str, np.ndarray]) -> dict[str, mx.array]:
        return {k.split(".")[0]: self._mx(mx.array(v)) for k, v in rows.items()}

    def _mx(self, a: mx.array) -> mx.array:
        return a.astype(self.dtype) if mx.issubdtype(a.dtype, mx.floating) else a

    def rows(self, ids: mx.array) -> mx.array:
        """The table's rows of token ids `ids` (any shape): [*ids.shape, hidden], exact."""
        flat = np.array(ids).reshape(-1).astype(np.int64)
        uniq, inverse = np.unique(flat, return_inverse=True)
        self.runtime.begin_pass(len(flat))
        f = self._arrays(self.reader.read(0, uniq, raw=True))
        at = mx.array(inverse.astype(np.uint32))
        t = self.table
        if t.bits:
            x = mx.dequantize(
                f["weight"][at], f["scales"][at], f["biases"][at], group_size=t.group_size, bits=t.bits
            )
        else:
            x = f["weight"][at]
        return x.reshape(*ids.shape, t.hidden)

    def project(self, x: mx.array) -> mx.array:
        """``x @ table.T`` (quantized: `quantized_matmul` as mlx's QuantizedLinear), the table
        streamed in blocks, each block's logits evaluated before its buffer is read into again."""
        t = self.table
        n, step = t.rows, t.block_rows()
        buffers = self._streaming_buffers()
        blocks = [(lo, min(lo + step, n)) for lo in range(0, n, step)]

        def submit(i: int):
            lo, hi = blocks[i]
            host = {k: v[: hi - lo] for k, v in buffers[i % 2][0].items()}
            return self.reader.submit(0, np.arange(lo, hi, dtype=np.int64), out=host, raw=True)

        outs, pending = [], submit(0)
        try:
            for i, (lo, hi) in enumerate(blocks):
                pending.result()
                pending = submit(i + 1) if i + 1 < len(blocks) else None
                f = {k.split(".")[0]: self._mx(v[: hi - lo]) for k, v in buffers[i % 2][1].items()}
                if t.bits:
                    y = mx.quantized_matmul(
                        x,
                        f["weight"],
                        f["scales"],
                        f["biases"],
                        transpose=True,
                        group_size=t.group_size,
                        bits=t.bits,
                    )
                else:
                    y = x @ f["weight"].T
                mx.eval(y)  # block i+2 is read into this buffer
                outs.append(y)
        finally:
            if pending is not None:  # abandoned: the read must land before the buffer is reused
                try:
                    pending.result()
                except BaseException:  # noqa: BLE001 - its error is not this caller's
                    pass
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)

    def _streaming_buffers(self):
        if not self._buffers:
            rows = self.table.block_rows()
            for _ in range(2):
                pairs = {
                    k: host_writable_buffer((rows, v.shape[1]), v.dtype, align=SECTOR)
                    for k, v in self.reader.empty_rows(0, raw=True).items()
                }
                self._buffers.append(
                    ({k: h for k, (_, h) in pairs.items()}, {k: b for k, (b, _) in pairs.items()})
                )
        return self._buffers

    def close(self) -> None:
        self.reader.close()


class FlashHead(nn.Module):
    """An untied lm_head streamed from flash (see the module docstring); no parameters."""

    def __init__(self, table: VocabTableReader):
        super().__init__()
        object.__setattr__(self, "_table", table)

    def __call__(self, x: mx.array) -> mx.array:
        with self._table.runtime.lock:
            return self._table.project(x)


class FlashEmbedding(FlashHead):
    """A token embedding table read from flash (see the module docstring); no parameters.
    `as_linear` (a tied lm_head) streams the table."""

    def __call__(self, ids: mx.array) -> mx.array:
        with self._table.runtime.lock:
            return self._table.rows(ids)

    def as_linear(self, x: mx.array) -> mx.array:
        return FlashHead.__call__(self, x)


def vocab_sizes(model: nn.Module, header: dict[str, TensorInfo], hidden: int, compute_bytes: int, vocab_size):
    """(budget.VocabSizes, the tables found): what the planner may leave on flash."""
    from .budget import VocabSizes

    tables = find_tables(model, header, hidden, vocab_size)
    embed, head = tables.get("embed"), tables.get("head")
    tied = embed is not None and not any(p.split(".")[-1] == "lm_head" for p, _ in model.named_modules())
    sizes = VocabSizes(
        embed_bytes=embed.memory_bytes(compute_bytes) if embed else 0,
        head_bytes=head.memory_bytes(compute_bytes) if head else 0,
        tied=tied,
        embed_stream_bytes=embed.stream_bytes() if embed and tied else 0,
        head_stream_bytes=head.stream_bytes() if head else 0,
    )
    return sizes, tables


def install(
    model: nn.Module, folder, dense_file: str, tables: dict[str, VocabTable], plan, runtime
) -> set[str]:
    """Replace the tables the plan leaves on flash by their flash modules (readers kept in
    `runtime.vocab`); returns the dense file's names that are not to be loaded."""
    chosen = {"embed": plan.embed_on_flash, "head": plan.head_on_flash}
    skip: set[str] = set()
    for role, cls in (("embed", FlashEmbedding), ("head", FlashHead)):
        table = tables.get(role)
        if table is None or not chosen[role]:
            continue
        reader = VocabTableReader(folder, dense_file, table, runtime.compute_dtype, runtime)
        runtime.vocab[role] = reader
        set_module(model, table.module, cls(reader))
        skip.update(t.name for t in table.fields.values())
    return skip


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` of `model` (list items by index)."""
    parent: object = model
    *parents, last = path.split(".")
    for p in parents:
        parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        setattr(parent, last, module)


def plan_kv_cache(model: nn.Module, context: int) -> None:
    """Make the model's KV caches grow by `budget.kv_step(context)` tokens (mlx-lm's caches
    grow by 256: a context shorter than that would reserve more than the plan counts)."""
    from mlx_lm.models import cache as mlx_cache

    from .budget import kv_step

    step = kv_step(context)
    own = getattr(model, "make_cache", None)

    def make_cache():
        caches = own() if own is not None else [mlx_cache.KVCache() for _ in model.layers]
        _set_step(caches, step)
        return caches

    object.__setattr__(model, "make_cache", make_cache)


def _set_step(caches, step: int) -> None:
    for c in caches:
        if hasattr(c, "caches"):
            _set_step(c.caches, step)
        elif hasattr(c, "step"):
            c.step = min(c.step, step)
