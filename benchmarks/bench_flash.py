"""The paper's Tables 2 and 3 measured side by side: per-token latency of generation with the
FFN on flash, technique by technique, against the dense model in memory.

    python benchmarks/bench_flash.py --model DIR --memory-budget 50% [--prompt-tokens 128]
        [--max-tokens 256] --out DIR

DIR is a Hugging Face / mlx-lm model folder (the demo model, a synthetic model from
tools/make_synthetic_model.py, a real checkpoint). The script converts it once into two flash
folders under --work (default OUT/flash): one unbundled (each FFN part its own tensor, the
paper's baseline layout) and one bundled; both float32 by default (the paper's CPU rows ran
fp32; the compute is fp32 on a CPU either way). Then, each row in its own process, cold (the
page cache dropped for every file of the model), with the same prompt of real text and the same
continuation (teacher-forced: the sampler returns the text's next token, so every row decodes
exactly the same tokens; --decode greedy lets the model choose):

  naive      every token streams each layer's whole FFN from flash (large sequential reads)
  hybrid     the FFN neurons that fit the budget stay in memory, the rest are streamed
  predictor  + only the neurons the selector picks are read, none reused from earlier tokens
  windowing  + the neurons of the last --window tokens stay cached; only new ones are read
  bundling   + the bundled layout: one read fetches a neuron's up row and down column (the
             full method)
  lookahead  + I/O off the critical path: while a layer computes, the next layer's neurons
             guessed from the residual stream are read (`mlx_flash.load(lookahead=True)`)
  dense      mlx-lm with the whole model in memory, float32 (when it fits in memory)

The first five rows use the unbundled folder except `bundling`. The selector is the folder's
trained low-rank predictor when it has one (python -m mlx_flash.predictors train; the bundled
folder's predictors are shared with the unbundled one), else the exact selector (the resident
up/gate projection: exact, but as large as a third to a half of the FFN, so it may not fit the
budget). Each row's selection is in its output.

Writes OUT/bench_flash.json (one object per row: name, ms_per_token, io_ms (the time the token
waited on reads; io_ms_by_layer, the same per FFN layer), reader_busy_ms (the reader had a read in flight), lookahead_recall,
lookahead_wasted_bytes_per_token, lookahead_wasted_fraction, mem_ms,
compute_ms, selection_ms, bytes_per_token, reads_per_token, flash_mbps, peak_memory_bytes,
peak_rss_bytes, tokens_per_s, speedup_vs_naive, ...), OUT/bench_flash.md (the table) and
OUT/bench_flash.png (stacked bars, as the paper's Figure 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ("naive", "hybrid", "predictor", "windowing", "bundling", "lookahead", "dense")
DEFAULT_WINDOW = 5
QUANT_GROUP = 64  # group size of the quantized rows' bundles (convert's default)
OPENBLAS_HINT = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"

# "LLM in a flash" (Alizadeh et al., 2024), OPT-6.7B at about 50% of the model in memory:
# Table 2 (I/O per token, M1 Max CPU) and end-to-end latency (Table 3 / Figure 1).
PAPER = {
    "model": "OPT-6.7B, ~50% of the model in memory, Apple M1 Max (fp32 on CPU, fp16 on GPU)",
    "io_ms": {"naive": 2196, "hybrid": 1090, "predictor": 738, "windowing": 164, "bundling": 87},
    "gb_per_token": {"naive": 13.4, "hybrid": 6.7, "predictor": 4.8, "windowing": 0.9, "bundling": 0.2},
    "end_to_end_ms": {"cpu": {"naive": 3182, "bundling": 669}, "gpu": {"naive": 2218, "bundling": 84}},
    "speedup": {"cpu": 4.8, "gpu": 26},
    "memory_management_share": 0.09,
}


@dataclass(frozen=True)
class Row:
    name: str
    mode: str  # naive | hybrid | flash | dense
    layout: str  # unbundled | bundled | source
    window: int  # tokens whose neurons stay cached (flash); 0: nothing reused
    what: str
    lookahead: bool = False


def row_specs(window: int, quantize: tuple[int, ...] = (), svd_rank: int | None = None) -> dict[str, Row]:
    """The rows by name; `quantize` adds, per bit width b, the full method on b-bit bundles
    (`bundling-qb`, its folder converted with ``--quantize b``); `svd_rank` the full method with
    the untrained rank-`svd_rank` SVD predictors (`bundling-svd`, a linked copy of the bundled
    folder with its own predictors)."""
    rows = {
        "naive": Row("naive", "naive", "unbundled", 0, "every token streams each layer's whole FFN"),
        "hybrid": Row(
            "hybrid", "hybrid", "unbundled", 0, "neurons that fit the budget resident, the rest streamed"
        ),
        "predictor": Row(
            "predictor", "flash", "unbundled", 0, "only selected neurons read, none reused across tokens"
        ),
        "windowing": Row(
            "windowing", "flash", "unbundled", window, f"+ window of {window} tokens: only new neurons read"
        ),
        "bundling": Row(
            "bundling", "flash", "bundled", window, "+ bundled up row/down column: the full method"
        ),
        "lookahead": Row(
            "lookahead",
            "flash",
            "bundled",
            window,
            "+ look-ahead reads of the next layer and compute overlapped with the reads",
            lookahead=True,
        ),
        "dense": Row("dense", "dense", "source", 0, "mlx-lm, whole model in memory, float32"),
    }
    for b in quantize:
        rows[f"bundling-q{b}"] = Row(
            f"bundling-q{b}",
            "flash",
            f"bundled-q{b}",
            window,
            f"the full method on {b}-bit bundles (float16 scales, {QUANT_GROUP}-wide groups)",
        )
    if svd_rank:
        rows["bundling-svd"] = Row(
            "bundling-svd",
            "flash",
            "bundled-svd",
            window,
            f"the full method with rank-{svd_rank} SVD predictors of the selector (untrained shortcut)",
        )
    return rows


class BenchError(Exception):
    pass


# -- text -----------------------------------------------------------------------------------


def default_text() -> str:
    """Real text: Python's documentation topics (the same held-out choice as
    tools/make_synthetic_model.py's evaluation text: every 7th topic by name)."""
    import pydoc_data.topics

    t = pydoc_data.topics.topics
    names = sorted(t)
    return "\n\n".join(t[n] for i, n in enumerate(names) if i % 7 == 3)


def text_tokens(tokenizer, text: str, prompt_tokens: int, max_tokens: int) -> tuple[list[int], list[int]]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    ids = [i for i in ids if i not in eos]
    if len(ids) < prompt_tokens + max_tokens:
        raise BenchError(f"the text has {len(ids)} tokens, fewer than --prompt-tokens + --max-tokens")
    return ids[:prompt_tokens], ids[prompt_tokens : prompt_tokens + max_tokens]


class ForcedSampler:
    """An mlx-lm sampler that returns the text's next token (teacher forcing): every row decodes
    the same tokens whatever its logits, so rows do the same work."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.i = tokens, 0

    def __call__(self, logprobs):
        import mlx.core as mx

        t = self.tokens[min(self.i, len(self.tokens) - 1)]
        self.i += 1
        return mx.array([t] * logprobs.shape[0], dtype=mx.uint32)


# -- flash folders, page cache ----------------------------------------------------------------


def source_stamp(source: Path) -> dict:
    return {
        "source": str(source.resolve()),
        "files": {
            f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(source.iterdir()) if f.is_file()
        },
    }


def calibration_text() -> str:
    """Python's documentation topics that `default_text` leaves out (never benchmarked on)."""
    import pydoc_data.topics

    t = pydoc_data.topics.topics
    names = sorted(t)
    return "\n\n".join(t[n] for i, n in enumerate(names) if i % 7 != 3)


def train_predictors(folder: Path, work: Path, tokens: int, log) -> None:
    """python -m mlx_flash.predictors train on the calibration text (Python's documentation
    topics the benchmark text leaves out), unless `folder` has trained predictors; its FFN inputs
    stay in WORK/calibration-inputs (for --svd-predictors RANK without a folder)."""

    if (predictor_summary(folder) or {}).get("kind") == "trained":
        return
    data = work / "calibration.txt"
    data.write_text(calibration_text(), encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "mlx_flash.predictors",
        "train",
        "--model",
        str(folder),
        "--data",
        str(data),
        "--tokens",
        str(tokens),
        "--keep-work",
        "--work",
        str(work / "calibration-inputs"),
        "--quiet",
    ]
    log(f"training predictors: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        raise BenchError(f"predictor training failed: {lines[-1] if lines else proc.returncode}")
    log(f"trained predictors in {time.perf_counter() - t0:.0f} s")


def svd_predictors(folder: Path, x_dir: Path, rank: int, recall: float, log) -> None:
    """Install in `folder` low-rank predictors made from each layer's selector (the up rows of a
    two-matrix FFN, the gate rows of a gated one) by its truncated SVD: z = B (A x) + b with
    A = V_r^T, B = U_r S_r, and b the selector's bias plus the least-squares constant of what
    the truncation drops (its mean over the calibration inputs). Each layer's threshold is the
    highest logit that keeps `recall` of the truly active neurons of the calibration inputs
    `x_dir/x_layer_NNN.npy` (each layer's FFN inputs on calibration text, as
    `python -m mlx_flash.predictors train ... --keep-work` leaves them in predictors.work).
    The trained predictors' format; no training, so what a predictor of that rank can reach on
    a model whose selector is low-rank (the synthetic models' is, by construction)."""
    import mlx.core as mx
    import numpy as np

    from mlx_flash import layout
    from mlx_flash.families import ACTIVATIONS, architecture_for
    from mlx_flash.model import read_config
    from mlx_flash.predictors.store import LayerPredictor, Storage, install_predictors
    from mlx_flash.reader import FlashReader

    m = layout.read_manifest(folder)
    storage = Storage.of(m)
    if ACTIVATIONS.get(m.activation) != "relu":
        raise BenchError("--svd-predictors needs a ReLU model (active = pre-activation > 0)")
    arch = architecture_for(read_config(folder))
    part = "gate" if "gate" in m.part_names else "up"
    dense = mx.load(str(folder / m.dense_file))
    rng = np.random.default_rng(0)
    layers, records = [], []
    with FlashReader(folder, m) as reader:
        for e in m.layers:
            W = reader.read_rows(e.layer, 0, e.num_neurons)[part]
            bname = (
                arch.source_name(e.layer, arch.family.biases["up_bias"])
                if "up_bias" in arch.family.biases
                else None
            )
            b = np.zeros(e.num_neurons, np.float32)
            for cand in [bname, bname.removeprefix("model.")] if bname else []:
                if cand in dense:
                    b = np.array(dense[cand].astype(mx.float32))
            x = np.load(x_dir / f"x_layer_{e.layer:03d}.npy").astype(np.float32)
            y = (x @ W.T + b) > 0
            k = min(rank + 16, min(W.shape))
            Q, _ = np.linalg.qr(W @ rng.standard_normal((W.shape[1], k), dtype=np.float32))
            for _ in range(2):  # power iterations
                Q, _ = np.linalg.qr(W @ (W.T @ Q))
            Ub, S, Vt = np.linalg.svd(Q.T @ W, full_matrices=False)
            r = min(rank, len(S))
            A, B = Vt[:r].astype(np.float32), ((Q @ Ub[:, :r]) * S[:r]).astype(np.float32)
            bias = b + x.mean(0) @ W.T - (x.mean(0) @ A.T) @ B.T
            p = storage.round_trip(LayerPredictor(A, B, bias.astype(np.float32), 0.0))  # as stored
            z = p.logits(x)
            pos = np.sort(z[y])
            t = float(pos[int((1 - recall) * len(pos))]) if len(pos) else float(np.finfo(np.float32).max)
            pred = z >= t
            p.threshold = t
            layers.append(p)
            records.append(
                {
                    "layer": e.layer,
                    "rank": r,
                    "threshold": t,
                    "recall": float((pred & y).sum() / max(1, y.sum())),
                    "ratio": float(pred.sum() / max(1, y.sum())),
                }
            )
            log(
                f"  svd predictor layer {e.layer}: rank {r}, predicted/active {records[-1]['ratio']:.2f} at recall {records[-1]['recall']:.3f}"
            )
    elems = sum(p.A.size + p.B.size + p.bias.size + 1 for p in layers)
    summary = {
        "file": layout.PREDICTORS_NAME,
        "rule": "relu",
        "kind": f"svd-{rank}",
        "recall_target": recall,
        "calibration": {"inputs": str(x_dir), "tokens": int(len(x))},
        "fraction_of_model": None,
        "layers": records,
    }
    install_predictors(
        folder,
        layers,
        {"rule": "relu", "kind": f"svd-{rank}", "elems": int(elems), "layers": records},
        summary,
    )


def linked_copy(src: Path, dst: Path) -> Path:
    """`dst`: the flash folder `src` with every weight file hard-linked (no second copy of the
    model) and its own manifest, without predictors (for other predictors than `src`'s)."""
    from mlx_flash import layout

    m = layout.read_manifest(src)
    if dst.exists():
        shutil.rmtree(dst)
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        elif rel.name not in (m.predictors_file, layout.MANIFEST_NAME):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dst / rel)
    m.predictors_file = None
    m.extra.pop("predictors", None)
    layout.write_manifest(dst, m)
    return dst


def predictor_summary(folder: Path) -> dict | None:
    from mlx_flash import layout

    m = layout.read_manifest(folder)
    p = m.extra.get("predictors") if m.predictors_file else None
    if not p:
        return None
    layers = p.get("layers", [])
    return {
        "kind": p.get("kind", "trained"),
        "fraction_of_model": p.get("fraction_of_model"),
        "recall_target": p.get("recall_target"),
        "ranks": [l.get("rank") for l in layers],
        "mean_ratio_predicted_to_active": sum(l.get("ratio", 0) for l in layers) / max(1, len(layers)),
        "mean_validation_recall": sum(l.get("recall", 0) for l in layers) / max(1, len(layers)),
    }


def prepare_folders(source: Path, work: Path, dtype: str, layouts: set[str], log) -> dict[str, Path]:
    """Flash folders of `source` for the layouts asked, converted once (reused while the source
    is unchanged); the dense file is shared between them by a hard link when identical."""
    from mlx_flash import layout
    from mlx_flash.convert import convert

    work.mkdir(parents=True, exist_ok=True)
    stamp = source_stamp(source)
    out = {}
    for kind in ("bundled", "unbundled", *sorted(k for k in layouts if k.startswith("bundled-q"))):
        if kind not in layouts:
            continue
        bits = int(kind.removeprefix("bundled-q")) if kind.startswith("bundled-q") else None
        folder = work / (kind if bits else f"{kind}-{dtype}")
        stamp_file = folder / "bench_source.json"
        if not (
            layout.is_flash_folder(folder)
            and stamp_file.is_file()
            and json.loads(stamp_file.read_text()) == stamp
        ):
            if kind == "unbundled" and "bundled" in out:  # from the bundled folder: no second dense file
                log(f"writing {folder} ({kind}, {dtype}) from {out['bundled']}")
                unbundle(out["bundled"], folder)
            elif bits:
                log(f"converting {source} -> {folder} ({bits}-bit bundles)")
                convert(
                    source,
                    folder,
                    dtype="float16",
                    quantize=bits,
                    group_size=QUANT_GROUP,
                    bundle=True,
                    overwrite=True,
                    progress=sys.stderr.isatty(),
                )
            else:
                log(f"converting {source} -> {folder} ({kind}, {dtype})")
                convert(
                    source,
                    folder,
                    dtype=dtype,
                    bundle=kind == "bundled",
                    overwrite=True,
                    progress=sys.stderr.isatty(),
                )
            stamp_file.write_text(json.dumps(stamp))
        out[kind] = folder
    if "bundled" in out and "unbundled" in out:
        share_dense(out["bundled"], out["unbundled"])
    share_all_predictors(out, log)
    return out


def share_all_predictors(folders: dict[str, Path], log) -> None:
    """Every folder gets the bundled (or first) folder's predictors: the neurons are the same."""
    src = folders.get("bundled") or next(iter(folders.values()), None)
    for f in folders.values():
        if f != src:
            share_predictors(src, f, log)


def unbundle(src: Path, dst: Path) -> None:
    """The unbundled flash folder (one tensor per FFN part, the paper's baseline layout) made from
    a bundled one: the same neurons and side files, the dense file hard-linked, not copied (a
    7B model's second conversion from its source would write 9 GB of dense weights again)."""
    import hashlib
    import tempfile
    from dataclasses import replace

    import numpy as np

    from mlx_flash import layout
    from mlx_flash.layout import DATA_ALIGNMENT, DTYPE_TO_ST, LayerEntry, Segment
    from mlx_flash.safetensors_file import PlannedTensor, SafetensorsWriter

    m = layout.read_manifest(src)
    if not m.bundled:
        raise BenchError(f"{src}: not a bundled flash folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        (tmp / layout.FFN_DIR).mkdir()
        esize, st_dtype = m.dtype_bytes, DTYPE_TO_ST[m.dtype]
        raw = np.dtype({"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}[m.dtype])
        cols = m.part_columns()
        entries = []
        for e in m.layers:
            seg = e.segments[0]
            with open(src / e.file, "rb") as f:
                f.seek(seg.data_offset)
                rows = np.frombuffer(f.read(e.num_neurons * seg.row_bytes), dtype=raw).reshape(
                    e.num_neurons, -1
                )
            planned = [
                PlannedTensor(
                    layout.part_tensor_name(e.layer, p.name),
                    st_dtype,
                    (e.num_neurons, p.elems),
                    align=DATA_ALIGNMENT,
                )
                for p in m.parts
            ]
            h = hashlib.new(layout.CHECKSUM)
            with SafetensorsWriter(tmp / e.file, planned) as w:
                for t, p in zip(planned, m.parts):
                    block = np.ascontiguousarray(rows[:, cols[p.name][0] : cols[p.name][1]])
                    w.write(t.name, block)
                    h.update(memoryview(block).cast("B"))
            segs = tuple(
                Segment(t.name, (p.name,), w.offsets[t.name], p.elems * esize)
                for t, p in zip(planned, m.parts)
            )
            entries.append(LayerEntry(e.layer, e.file, e.num_neurons, e.bundle_bytes, h.hexdigest(), segs))
            del rows
        for f in src.iterdir():
            if f.is_file() and f.name not in (layout.MANIFEST_NAME, m.predictors_file, "bench_source.json"):
                if f.name == m.dense_file:
                    os.link(f, tmp / f.name)
                else:
                    shutil.copy2(f, tmp / f.name)
        layout.write_manifest(
            tmp,
            replace(
                m,
                bundled=False,
                layers=entries,
                predictors_file=None,
                extra={k: v for k, v in m.extra.items() if k != "predictors"},
            ),
        )
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def share_dense(a: Path, b: Path) -> None:
    from mlx_flash import layout

    ma, mb = layout.read_manifest(a), layout.read_manifest(b)
    fa, fb = a / ma.dense_file, b / mb.dense_file
    if ma.dense_checksum and ma.dense_checksum == mb.dense_checksum and not os.path.samefile(fa, fb):
        tmp = fb.with_suffix(".link")
        os.link(fa, tmp)
        os.replace(tmp, fb)


def share_predictors(src: Path, dst: Path, log) -> None:
    """Give `dst` the predictors of `src` (trained once; the neurons are the same)."""
    from mlx_flash import layout

    ms, md = layout.read_manifest(src), layout.read_manifest(dst)
    if not ms.predictors_file:
        return
    if (
        md.predictors_file
        and (dst / md.predictors_file).is_file()
        and layout.file_digest(dst / md.predictors_file) == layout.file_digest(src / ms.predictors_file)
    ):
        return
    log(f"sharing the predictors of {src} with {dst}")
    shutil.copy2(src / ms.predictors_file, dst / ms.predictors_file)
    md.predictors_file = ms.predictors_file
    if "predictors" in ms.extra:
        md.extra["predictors"] = ms.extra["predictors"]
    layout.write_manifest(dst, md)


def model_files(folders: list[Path]) -> list[Path]:
    return [f for folder in folders for f in sorted(folder.rglob("*")) if f.is_file()]


def drop_page_cache(files: list[Path], system: bool) -> int:
    """Evict the files from the page cache (posix_fadvise DONTNEED; with `system`, also the
    kernel's whole page cache when root). Returns the bytes of them still cached (fincore)."""
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd) if os.access(f, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
    if system and os.geteuid() == 0:
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        except OSError:
            pass
    return cached_bytes(files)


def cached_bytes(files: list[Path]) -> int:
    """Bytes of `files` in the page cache (util-linux fincore), -1 when it cannot be told."""
    if not files or shutil.which("fincore") is None:
        return -1
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        return sum(int(x) for x in out.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        return -1


# -- one row ----------------------------------------------------------------------------------


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class NoReuse:
    """The model with every layer's neuron cache emptied before each decoded token: the token
    reads all of its selected neurons (the paper's "hybrid + predictor" row, before windowing)."""

    def __init__(self, model):
        self.model = model
        self.caches = [layer.mlp.cache for layer in model.layers]

    def __call__(self, inputs, *args, **kwargs):
        if inputs.shape[-1] == 1:
            for c in self.caches:
                c.clear()
        return self.model(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def cache_note(res: dict) -> str | None:
    """A flash row whose neuron cache is smaller than what one token selects reuses only what
    fits (each token caches part of its set and reads the rest for itself every time): say so,
    and what took the budget."""
    layers, cap = res.get("num_layers"), res.get("cache_capacity")
    selected = res.get("neurons_active_per_token")
    if res.get("mode") != "flash" or not layers or cap is None or not selected or cap * layers >= selected:
        return None
    return (
        f"the budget leaves {cap} cache rows a layer, fewer than the {selected / layers:.0f} a token "
        f"selects: the rest is read again every token (the KV cache for {res['context']} positions takes "
        f"{res['kv_bytes'] / 1e6:.1f} MB of the {res['budget_bytes'] / 1e6:.1f} MB); fewer "
        "--prompt-tokens/--max-tokens or a larger --memory-budget"
    )


def run_row(spec: Row, cfg: dict) -> dict:
    """Load and generate for one row in this process; returns its measurements."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.utils import load_tokenizer

    import mlx_flash
    from mlx_flash import layout

    prompt, cont = cfg["prompt"], cfg["continuation"][: cfg["tokens"][spec.name]]
    res: dict = {
        "name": spec.name,
        "what": spec.what,
        "mode": spec.mode,
        "layout": spec.layout,
        "window": spec.window,
    }
    _reset_peak_rss()
    t0 = time.perf_counter()
    if spec.mode == "dense":
        from mlx_flash.model import load_dense

        model = load_dense(cfg["source"])
        tokenizer = load_tokenizer(Path(cfg["source"]))
        rt = None
    else:
        folder = cfg["folders"][spec.layout]
        manifest = layout.read_manifest(folder)
        selection = None
        if spec.mode == "flash":
            selection = "predictor" if manifest.predictors_file else "exact"
        from mlx_flash.budget import BudgetError

        try:
            model, tokenizer = mlx_flash.load(
                folder,
                mode=spec.mode,
                memory_budget=cfg["budget"],
                window=max(1, spec.window),
                selection=selection,
                threads=cfg["threads"],
                context=len(prompt) + len(cont) + 1,
                lookahead=spec.lookahead,
            )
        except BudgetError as e:
            if selection != "exact":
                raise
            raise BenchError(
                f"{folder} has no predictors and the exact selector does not fit the budget ({e}); "
                "add --train-predictors 8192 (trains them on calibration text first) or run "
                f"python -m mlx_flash.predictors train --model {folder} --data TEXTFILE"
            ) from None
        rt = model.flash
        res.update(
            selection=rt.selection,
            budget_bytes=rt.plan.budget_bytes,
            plan_bytes=rt.plan.total_bytes,
            cache_capacity=rt.plan.cache_capacity,
            resident_neurons=rt.plan.resident_neurons,
            kv_bytes=rt.plan.kv_bytes,
            context=rt.plan.context,
            num_layers=manifest.num_layers,
            neurons_per_layer=manifest.layers[0].num_neurons,
            bundle_bytes=manifest.layers[0].bundle_bytes,
            flash_dtype=manifest.dtype,
            reader_direct=rt.reader.direct,
            reader_align=rt.reader.align,
            quant_bits=manifest.quantization.bits if manifest.quantization else None,
        )
    mx.eval(model.parameters())
    res["load_s"] = time.perf_counter() - t0
    res["load_peak_rss_bytes"] = _peak_rss()
    res["load_peak_memory_bytes"] = mx.get_peak_memory()
    runner = NoReuse(model) if spec.mode == "flash" and spec.window == 0 else model
    sampler = ForcedSampler(cont) if cfg["decode"] == "text" else None
    _reset_peak_rss()
    mx.reset_peak_memory()
    stamps, tokens = [], []
    gen = mlx_flash.stream_generate if rt is not None else mlx_lm.stream_generate
    t_start = time.perf_counter()
    kwargs = {"sampler": sampler} if sampler is not None else {}
    for r in gen(runner, tokenizer, mx.array(prompt), max_tokens=len(cont), **kwargs):
        stamps.append(time.perf_counter())
        tokens.append(int(r.token))
    res["peak_memory_bytes"] = mx.get_peak_memory()
    res["peak_rss_bytes"] = _peak_rss()
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    res["prompt_tokens"] = len(prompt)
    res["decode_tokens"] = len(tokens)
    res["first_token_s"] = stamps[0] - t_start if stamps else 0.0
    res["wall_ms_per_token"] = 1e3 * sum(intervals) / len(intervals) if intervals else 0.0
    res["tokens_match_text"] = cfg["decode"] != "text" or tokens == cont[: len(tokens)]
    if rt is not None:
        s = rt.stats()
        res.update(
            ms_per_token=s.ms_per_token,
            io_ms=s.io_ms,
            io_ms_by_layer=s.io_ms_by_layer,
            reader_busy_ms=s.reader_busy_ms,
            lookahead_recall=s.lookahead_recall,
            lookahead_wasted_bytes_per_token=s.lookahead_wasted_bytes_per_token,
            lookahead_wasted_fraction=s.lookahead_wasted_fraction,
            mem_ms=s.memory_ms,
            compute_ms=s.compute_ms,
            selection_ms=s.selection_ms,
            bytes_per_token=s.bytes_per_token,
            reads_per_token=s.reads_per_token,
            neurons_loaded_per_token=s.neurons_loaded_per_token,
            window_hit_rate=s.window_hit_rate,
            prefill_ms=s.prefill_ms,
            prefill_bytes=s.prefill_bytes,
            stats_decode_tokens=s.decode_tokens,
        )
        recs = [r for r in rt.records if not r.is_prefill]
        if recs:
            res["neurons_active_per_token"] = sum(r.neurons_active for r in recs) / len(recs)
            res["cache_used_per_token"] = sum(r.cache_used for r in recs) / len(recs)
        rt.close()
    else:
        res.update(
            ms_per_token=res["wall_ms_per_token"],
            io_ms=0.0,
            reader_busy_ms=0.0,
            mem_ms=0.0,
            selection_ms=0.0,
            compute_ms=res["wall_ms_per_token"],
            bytes_per_token=0.0,
            reads_per_token=0.0,
            prefill_ms=1e3 * res["first_token_s"],
        )
    ms = res["ms_per_token"] or float("nan")
    res["tokens_per_s"] = 1e3 / ms if ms else 0.0
    busy = res["reader_busy_ms"]  # the reader's own time: with reads overlapped, I/O wait is less
    res["flash_mbps"] = res["bytes_per_token"] / busy / 1e3 if busy > 0 else 0.0
    res["mem_share"] = res["mem_ms"] / ms if ms else 0.0
    return res


def run_row_isolated(spec, cfg: dict, work: Path, timeout: float | None, script: Path | None = None) -> dict:
    """run_row in a fresh Python process (its own peak memory, nothing left from other rows):
    `script --_row IN OUT` (default this file; bench_moe.py passes itself), `spec` a dataclass
    with a `name`."""
    cfg_path = work / f"row-{spec.name}.in.json"
    out_path = work / f"row-{spec.name}.out.json"
    cfg_path.write_text(json.dumps({"spec": asdict(spec), "cfg": cfg}))
    out_path.unlink(missing_ok=True)
    script = script or Path(__file__)
    cmd = [sys.executable, str(script.resolve()), "--_row", str(cfg_path), str(out_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": spec.name, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not out_path.is_file():
        lines = [l for l in (proc.stderr or "").strip().splitlines() if l.strip()]
        return {"name": spec.name, "error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(out_path.read_text())


def run_row_somewhere(
    spec, cfg: dict, work: Path, in_process: bool, timeout: float | None, run=None, script=None
):
    """A row's result: `run(spec, cfg)` (default run_row) in this process, an exception recorded
    as the row's error, or `run_row_isolated` in its own."""
    if not in_process:
        return run_row_isolated(spec, cfg, work, timeout, script)
    try:
        return (run or run_row)(spec, cfg)
    except Exception as e:  # recorded as the row's result, like an isolated row's failure
        return {"name": spec.name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _row_main(cfg_path: str, out_path: str, run=None, spec_type=None) -> int:
    """The `--_row` entry of a row's process: `run(spec_type(**spec), cfg)` (default this file's
    run_row and Row), its result written to `out_path`, an error one line on stderr."""
    d = json.loads(Path(cfg_path).read_text())
    try:
        res = (run or run_row)((spec_type or Row)(**d["spec"]), d["cfg"])
    except Exception as e:  # the parent records the error as the row's result
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    Path(out_path).write_text(json.dumps(res))
    return 0


# -- the whole benchmark ------------------------------------------------------------------------


def blas_in_use() -> str:
    """Which BLAS MLX got: OpenBLAS when preloaded, else MLX's own (reference, single-threaded)."""
    pre = os.environ.get("LD_PRELOAD", "")
    return (
        f"OpenBLAS (LD_PRELOAD={pre})"
        if "openblas" in pre.lower()
        else "MLX's bundled BLAS (no OpenBLAS preloaded)"
    )


def machine() -> dict:
    import mlx.core as mx
    import mlx_lm
    import numpy as np

    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemAvailable"):
                mem[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "numpy": np.__version__,
        "device": str(mx.default_device()),
        "blas": blas_in_use(),
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_bytes": mem.get("MemAvailable"),
        "load_avg_start": os.getloadavg(),
    }


def dense_fits(source: Path) -> tuple[bool, int, int]:
    """(fits, model bytes in float32, available bytes): the dense row needs the model in float32
    plus headroom in free memory."""
    from mlx_flash.convert import open_source

    src = open_source(source)
    nbytes = sum(info.numel for _, info in src.tensors.values()) * 4
    avail = machine()["mem_available_bytes"] or 0
    return nbytes * 1.15 + (1 << 30) < avail, nbytes, avail


def table_lines(head: str, rows: list[dict], cells: tuple) -> tuple[list[str], list[dict]]:
    """A markdown table's header lines with one line per failed row (its error after `cells`
    cells from the row: name, then what `cells` names), and the rows that did not fail."""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ok = []
    for r in rows:
        if "error" not in r:
            ok.append(r)
            continue
        first = [r["name"], *("—" if c is None else (r.get(c) or "—") for c in cells[1:])] if cells else []
        lines.append(
            "| "
            + " | ".join([*map(str, first), r["error"]])
            + " |"
            + " |" * (head.count("|") - len(first) - 2)
        )
    return lines, ok


def fmt_table(rows: list[dict], paper: bool = True) -> str:
    from mlx_flash.budget import fmt_bytes

    head = (
        "| row | selection | tokens | ms/token | I/O wait ms | reader busy ms | memory mgmt ms | compute ms "
        "| selection ms | MB read/token | reads/token | flash MB/s | look-ahead recall | wasted MB/token | peak memory (MLX) | peak RSS | tok/s | speed-up vs naive |"
    )
    lines, ok = table_lines(head, rows, ("name", None, None))
    for r in ok:
        sp = r.get("speedup_vs_naive")
        look = (
            f"{100 * r['lookahead_recall']:.1f}% | {r['lookahead_wasted_bytes_per_token'] / 1e6:.2f} "
            f"({100 * r['lookahead_wasted_fraction']:.0f}%)"
            if r.get("lookahead_recall") or r.get("lookahead_wasted_bytes_per_token")
            else "— | —"
        )
        sel = (
            "—"
            if r["mode"] in ("naive", "hybrid", "dense")
            else f"{r['selection']}, " + (f"window {r['window']}" if r["window"] else "no reuse")
        )
        lines.append(
            f"| {r['name']} | {sel} | {r['decode_tokens']} | {r['ms_per_token']:.1f} | {r['io_ms']:.1f} | "
            f"{r.get('reader_busy_ms', 0.0):.1f} | {r['mem_ms']:.1f} | "
            f"{r['compute_ms']:.1f} | {r['selection_ms']:.1f} | {r['bytes_per_token'] / 1e6:.2f} | {r['reads_per_token']:.0f} | "
            f"{r['flash_mbps']:.0f} | {look} | {fmt_bytes(r['peak_memory_bytes'])} | {fmt_bytes(r['peak_rss_bytes'])} | "
            f"{r['tokens_per_s']:.2f} | {f'{sp:.2f}x' if sp else '—'} |"
        )
    out = "\n".join(lines)
    if paper:
        p = PAPER
        out += (
            "\n\nPaper ("
            + p["model"]
            + "): I/O ms/token "
            + ", ".join(f"{k} {v}" for k, v in p["io_ms"].items())
            + "; GB/token "
            + ", ".join(f"{k} {v}" for k, v in p["gb_per_token"].items())
            + f"; end to end CPU {p['end_to_end_ms']['cpu']['naive']} -> {p['end_to_end_ms']['cpu']['bundling']} ms "
            f"({p['speedup']['cpu']}x), GPU {p['end_to_end_ms']['gpu']['naive']} -> {p['end_to_end_ms']['gpu']['bundling']} ms "
            f"({p['speedup']['gpu']}x); memory management ~{100 * p['memory_management_share']:.0f}% of a token."
        )
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    names = [r["name"] for r in ok]
    parts = [
        ("I/O", "io_ms", "#d62728"),
        ("memory mgmt", "mem_ms", "#ff7f0e"),
        ("selection", "selection_ms", "#9467bd"),
        ("compute", "compute_ms", "#1f77b4"),
    ]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(ok) + 1.8))
    left = [0.0] * len(ok)
    for label, key, color in parts:
        vals = [r[key] for r in ok]
        ax.barh(names, vals, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(ok):
        sp = r.get("speedup_vs_naive")
        ax.text(
            left[i],
            i,
            f"  {r['ms_per_token']:.0f} ms" + (f" ({sp:.1f}x)" if sp else ""),
            va="center",
            fontsize=8,
        )
    ax.invert_yaxis()
    ax.set_xlabel("ms per token")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(left or [1]) * 1.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_row"]:
        return _row_main(argv[1], argv[2])
    ap = argparse.ArgumentParser(
        prog="benchmarks/bench_flash.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", required=True, type=Path, help="model folder (Hugging Face / mlx-lm layout)")
    ap.add_argument(
        "--memory-budget",
        default="50%",
        help="memory for the flash rows: bytes, 6GB, or 50%% of the model in float32 (default 50%%)",
    )
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens of real text (default 128)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens to decode per row (default 256)")
    ap.add_argument(
        "--slow-tokens",
        type=int,
        default=None,
        help="tokens to decode in the naive and hybrid rows (default: --max-tokens)",
    )
    ap.add_argument("--out", required=True, type=Path, help="folder for bench_flash.json/.md/.png")
    ap.add_argument(
        "--work", type=Path, default=None, help="where the flash folders are converted (default OUT/flash)"
    )
    ap.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated rows to run (default: all: {','.join(ROWS)}, and the --quantize rows)",
    )
    ap.add_argument(
        "--quantize",
        default="",
        metavar="BITS",
        help="also run the full method on quantized bundles: 4, 8 or 4,8 (rows bundling-q4, bundling-q8)",
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="weights on flash (default float32)",
    )
    ap.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"window of the windowing and bundling rows (default {DEFAULT_WINDOW})",
    )
    ap.add_argument("--threads", type=int, default=None, help="flash reader threads (default: the reader's)")
    ap.add_argument(
        "--decode",
        choices=("text", "greedy"),
        default="text",
        help="text: decode the text's own continuation (teacher-forced, the default); greedy: the model's choice",
    )
    ap.add_argument(
        "--text",
        type=Path,
        default=None,
        help="UTF-8 text file for prompt and continuation (default: Python's docs)",
    )
    ap.add_argument(
        "--train-predictors",
        type=int,
        default=0,
        metavar="TOKENS",
        help="train the bundled folder's predictors on TOKENS tokens of calibration text first, when it has none",
    )
    ap.add_argument(
        "--svd-predictors",
        metavar="RANK[:XDIR]",
        default=None,
        help="add the row bundling-svd: the full method with rank-RANK SVD predictors of the selector "
        "(thresholds at the trained predictors' threshold recall, 96%%, on the calibration inputs "
        "XDIR/x_layer_NNN.npy; default XDIR: those "
        "--train-predictors kept), the untrained shortcut; the other rows keep the trained predictors",
    )
    ap.add_argument("--prepare-only", action="store_true", help="convert (and train predictors), then stop")
    ap.add_argument(
        "--drop-system-cache",
        action="store_true",
        help="also drop the kernel's whole page cache before each row (root)",
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run rows in this process (faster, for tests; peak memory is then shared)",
    )
    ap.add_argument("--row-timeout", type=float, default=None, help="seconds before a row is abandoned")
    ap.add_argument(
        "--label", default=None, help="a name for the model in the outputs (default: the folder's name)"
    )
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        args.quantize = tuple(int(b) for b in args.quantize.split(",") if b.strip())
    except ValueError:
        return fail(f"--quantize: bit widths 4 or 8, comma-separated, not {args.quantize!r}")
    if any(b not in (4, 8) for b in args.quantize):
        return fail(f"--quantize: bit widths 4 or 8, not {args.quantize}")
    rank, _, args.svd_xdir = (args.svd_predictors or "").partition(":")
    if args.svd_predictors and not (rank.isdigit() and int(rank) > 0):
        return fail(f"--svd-predictors: RANK[:XDIR] with a positive RANK, not {args.svd_predictors!r}")
    args.svd_rank = int(rank) if args.svd_predictors else None
    names = list(row_specs(args.window, args.quantize, args.svd_rank))
    rows = [r.strip() for r in (args.rows or ",".join(names)).split(",") if r.strip()]
    unknown = [r for r in rows if r not in names]
    if unknown:
        return fail(f"unknown row(s) {', '.join(unknown)} (choose from {', '.join(names)})")
    if not (args.model / "config.json").is_file():
        return fail(f"{args.model}: not a model folder (no config.json)")
    if args.prompt_tokens < 2 or args.max_tokens < 2:
        return fail("--prompt-tokens and --max-tokens must be at least 2")
    if args.window < 1:
        return fail("--window must be at least 1")
    try:
        return run(args, rows)
    except BenchError as e:
        return fail(str(e))


def run(args, rows: list[str]) -> int:
    from mlx_lm.utils import load_tokenizer

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or out / "flash"
    specs = row_specs(args.window, args.quantize, args.svd_rank)
    source = args.model.resolve()
    label = args.label or source.name
    mach = machine()
    layouts = {specs[r].layout for r in rows if specs[r].mode != "dense"} - {"bundled-svd"}
    if "bundling-svd" in rows:
        layouts.add("bundled")
    if args.train_predictors and any(specs[r].mode == "flash" for r in rows):
        layouts.add("bundled")
    folders = prepare_folders(source, work, args.dtype, layouts, log)
    if args.train_predictors and "bundled" in folders:
        train_predictors(folders["bundled"], work, args.train_predictors, log)
        share_all_predictors(folders, log)
    if "bundling-svd" in rows:  # the SVD shortcut's own row, beside the headline's predictors
        from mlx_flash.predictors.training import TrainOptions

        recall = TrainOptions().threshold_recall  # the trained predictors' threshold recall
        xdir = args.svd_xdir or str(work / "calibration-inputs")
        svd = work / f"{folders['bundled'].name}-svd{args.svd_rank}"
        have = predictor_summary(svd) if svd.is_dir() else None
        if not (
            have
            and have.get("kind") == f"svd-{args.svd_rank}"
            and have.get("recall_target") == recall
            and os.path.samefile(svd / "config.json", folders["bundled"] / "config.json")
        ):
            log(f"installing rank-{args.svd_rank} SVD predictors in {svd} (calibration inputs {xdir})")
            svd_predictors(linked_copy(folders["bundled"], svd), Path(xdir), args.svd_rank, recall, log)
        folders["bundled-svd"] = svd
    if args.prepare_only:
        log(f"flash folders ready: {', '.join(str(f) for f in folders.values())}")
        return 0
    tokenizer = load_tokenizer(source)
    text = args.text.read_text(encoding="utf-8") if args.text else default_text()
    prompt, cont = text_tokens(tokenizer, text, args.prompt_tokens, args.max_tokens)
    slow = args.slow_tokens or args.max_tokens
    tokens = {r: min(slow, args.max_tokens) if r in ("naive", "hybrid") else args.max_tokens for r in specs}
    # One budget in bytes for every row: a percentage is of the model in float32 (so a quantized
    # row runs in the same memory as the float rows, not in half of its own smaller size).
    from mlx_flash.budget import fmt_bytes, parse_budget

    budget = parse_budget(args.memory_budget, dense_fits(source)[1])
    cfg = {
        "source": str(source),
        "folders": {k: str(v) for k, v in folders.items()},
        "budget": budget,
        "threads": args.threads,
        "decode": args.decode,
        "prompt": prompt,
        "continuation": cont,
        "tokens": tokens,
    }
    files = model_files([source, *{f.resolve() for f in folders.values()}])
    results = []
    for name in rows:
        spec = specs[name]
        if spec.mode == "dense":
            fits, nbytes, avail = dense_fits(source)
            if not fits:
                results.append(
                    {
                        "name": name,
                        "what": spec.what,
                        "error": f"skipped: the model in float32 ({nbytes / 1e9:.1f} GB) does not fit in free memory ({avail / 1e9:.1f} GB)",
                    }
                )
                log(f"{name}: {results[-1]['error']}")
                continue
        still = drop_page_cache(files, args.drop_system_cache)
        log(
            f"{name}: {spec.what} ({tokens[name]} tokens; page cache of the model's files now {max(still, 0) / 1e6:.0f} MB) ..."
        )
        t0 = time.perf_counter()
        res = run_row_somewhere(spec, cfg, work, args.in_process, args.row_timeout)
        res.setdefault("what", spec.what)
        res["cached_bytes_at_start"] = still
        res["row_seconds"] = time.perf_counter() - t0
        results.append(res)
        if "error" in res:
            log(f"{name}: error: {res['error']}")
        else:
            log(
                f"{name}: {res['ms_per_token']:.1f} ms/token (I/O wait {res['io_ms']:.1f}, reader busy "
                f"{res['reader_busy_ms']:.1f}, memory {res['mem_ms']:.1f}, compute "
                f"{res['compute_ms']:.1f}, selection {res['selection_ms']:.1f}), {res['bytes_per_token'] / 1e6:.2f} MB/token, "
                f"peak {res['peak_memory_bytes'] / 1e6:.0f} MB; {res['row_seconds']:.0f} s"
            )
            note = cache_note(res)
            if note:
                res["note"] = note
                log(f"{name}: note: {note}")
    naive = next((r for r in results if r["name"] == "naive" and "error" not in r), None)
    for r in results:
        if naive and "error" not in r:
            r["speedup_vs_naive"] = naive["ms_per_token"] / r["ms_per_token"]
    mach["load_avg_end"] = os.getloadavg()
    command = (
        " ".join(["python", "benchmarks/bench_flash.py", *sys.argv[1:]])
        if Path(sys.argv[0]).name == "bench_flash.py"
        else None
    )
    result = {
        "command": command,
        "model": label,
        "source": str(source),
        "memory_budget": args.memory_budget,
        "budget_bytes": budget,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "tokens_per_row": {r: tokens[r] for r in rows},
        "decode": args.decode,
        "window": args.window,
        "dtype": args.dtype,
        "machine": mach,
        "predictors": predictor_summary(folders["bundled"]) if "bundled" in folders else None,
        "svd_predictors": predictor_summary(folders["bundled-svd"]) if "bundled-svd" in folders else None,
        "rows": results,
        "paper": PAPER,
    }
    (out / "bench_flash.json").write_text(json.dumps(result, indent=1))
    table = fmt_table(results)
    header = (
        f"{label}: budget {args.memory_budget} ({fmt_bytes(budget)}), prompt {args.prompt_tokens} tokens, {args.decode} decode, "
        f"{args.dtype} on flash; {mach['cpu']} x{mach['nproc']}, {mach['blas']}"
    )
    p = result["predictors"]
    if p:
        header += (
            f"; predictors: {p['kind']} (ranks {min(p['ranks'])}-{max(p['ranks'])}, "
            f"predicted/true {p['mean_ratio_predicted_to_active']:.2f} on held-out calibration tokens)"
        )
    p = result["svd_predictors"]
    if p:
        header += (
            f"; row bundling-svd: {p['kind']} predictors (predicted/true "
            f"{p['mean_ratio_predicted_to_active']:.2f} on the calibration inputs)"
        )
    (out / "bench_flash.md").write_text(f"{header}\n\n{table}\n")
    print(header)
    print(table)
    try:
        plot(results, out / "bench_flash.png", header)
    except ImportError:
        log("matplotlib is not installed (pip install matplotlib): no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
