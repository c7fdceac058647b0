"""Train (or evaluate) the small, really sparse demo model bundled in ``mlx_flash/demo_model``.

The demo model is a Llama-architecture causal LM whose FFN is ReLU-gated,
``down(relu(gate(x)) * up(x))``, trained on the text of the standard library's
``pydoc_data.topics`` so that nothing has to be downloaded.  A fixed subset of the topics
(about 10% of the text) is held out and never trained on; held-out perplexity and FFN
activation sparsity are measured on it.

Plain ReLU training leaves only 62-77% of the FFN neurons inactive per token; to reach the
90%+ that "LLM in a flash" relies on, training adds an activation-sparsity penalty in the
spirit of ProSparse: an L1 penalty on ``relu(gate(x))`` (divided by the RMS of ``gate(x)``,
so that the model cannot dodge it by shrinking the gate weights), whose per-layer
coefficient starts after a warm-up and is then raised or lowered each step by a simple
multiplicative controller until every layer is at the target sparsity.  The architecture
stays the standard one (no biases, no shifted activation).

Usage:
    python tools/train_demo_model.py --out mlx_flash/demo_model            # train and save
    python tools/train_demo_model.py --evaluate mlx_flash/demo_model       # measure a folder

The default run (2,000 steps of 16 x 128 tokens, seed 0) is deterministic on one machine and
took about 51 minutes on 2 busy CPU cores (about 0.7 s a step when the cores are free); its
measurements are in ``demo_model_card.json``.

On Linux, preload OpenBLAS for a much faster CPU matmul (see DESIGN.md):
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python tools/train_demo_model.py --out mlx_flash/demo_model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

EOT = "<|endoftext|>"
SPLIT_SEED = 20240101  # fixed: the held-out topics never depend on --seed
HELD_OUT_FRACTION = 0.10
MAX_HELD_OUT_TOPIC_FRACTION = 0.03  # keep the few huge topics in training


# ----------------------------------------------------------------------------- data


def load_topics(files: list[str] | None = None) -> dict[str, str]:
    """The documents to train on, by name: the topics of ``pydoc_data.topics``, or with
    ``files`` one document per file (named by its path, UTF-8)."""
    if files:
        return {str(f): Path(f).read_text(encoding="utf-8") for f in sorted(files)}
    import pydoc_data.topics

    return dict(sorted(pydoc_data.topics.topics.items()))


def split_topics(topics: dict[str, str]) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of the topic names (held out: about 10% of the
    characters, chosen from a fixed shuffle among topics that are not huge)."""
    names = sorted(topics)
    total = sum(len(topics[n]) for n in names)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
    held, held_chars = [], 0
    for i in order:
        name = names[i]
        if len(topics[name]) > MAX_HELD_OUT_TOPIC_FRACTION * total:
            continue
        if held_chars >= HELD_OUT_FRACTION * total:
            break
        held.append(name)
        held_chars += len(topics[name])
    held = sorted(held)
    train = [n for n in names if n not in set(held)]
    return train, held


def encode_stream(tokenizer, texts: list[str], eot_id: int) -> np.ndarray:
    """One token stream: each document is preceded by the end-of-text token."""
    ids: list[int] = []
    for text in texts:
        ids.append(eot_id)
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    return np.asarray(ids, dtype=np.int32)


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out: Path, max_len: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))


def load_tokenizer(folder: Path):
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # whole documents are longer than the model's context

    return mlx_lm_load_tokenizer(Path(folder))


# ---------------------------------------------------------------------------- model


class ActivationTap:
    """Collects each FFN's gate pre-activations during one forward pass, when enabled.

    A plain object (not an array, list or dict attribute of a module) so that it never
    becomes part of the model's parameter tree."""

    def __init__(self) -> None:
        self.gates: list[mx.array] | None = None

    def start(self) -> None:
        self.gates = []

    def stop(self) -> list[mx.array]:
        gates, self.gates = self.gates or [], None
        return gates


TAP = ActivationTap()


class ReluGatedMLP(nn.Module):
    """``down(relu(gate(x)) * up(x))`` with the attribute names of mlx-lm's llama MLP."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        g = self.gate_proj(x)
        if TAP.gates is not None:
            TAP.gates.append(g)
        return self.down_proj(nn.relu(g) * self.up_proj(x))


@dataclass
class Shape:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 1024
    vocab_size: int = 2048
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5


def build_model(shape: Shape):
    from mlx_lm.models.llama import Model, ModelArgs

    args = ModelArgs(
        model_type="llama",
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        rms_norm_eps=shape.rms_norm_eps,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=False,
    )
    model = Model(args)
    for layer in model.layers:
        layer.mlp = ReluGatedMLP(shape.hidden_size, shape.intermediate_size)
    return model


def hf_config(shape: Shape, eot_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "relu",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.hidden_size // shape.num_attention_heads,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": shape.rms_norm_eps,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def shape_from_config(config: dict) -> Shape:
    return Shape(**{k: config[k] for k in asdict(Shape()) if k in config})


def num_params(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def save_weights(model, path: Path) -> None:
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    tensors = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    save_file(dict(sorted(tensors.items())), str(path), metadata={"format": "pt"})


def load_folder(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    if config.get("hidden_act") != "relu":
        raise SystemExit(
            f"error: {folder}/config.json has hidden_act={config.get('hidden_act')!r}; "
            "this tool only evaluates ReLU-gated demo models"
        )
    model = build_model(shape_from_config(config))
    model.load_weights(str(folder / "model.safetensors"), strict=True)
    mx.eval(model.parameters())
    return model, config


# ----------------------------------------------------------------------- evaluation


def evaluate(model, stream: np.ndarray, seq_len: int, batch: int = 16) -> dict:
    """Dense, teacher-forced perplexity over ``stream`` in consecutive windows of ``seq_len``
    inputs (every token but the first is predicted once), and the per-layer fraction of
    FFN neurons with ``relu(gate(x)) == 0`` per token, over the same windows."""
    n = len(stream) - 1
    starts = list(range(0, n, seq_len))
    nll_sum, n_pred = 0.0, 0
    zeros = None
    n_tok = 0
    for b in range(0, len(starts), batch):
        # windows of one length batch together; the final short window goes alone
        group = [s for s in starts[b : b + batch]]
        full = [s for s in group if s + seq_len <= n]
        short = [s for s in group if s + seq_len > n]
        for chunk in ([full] if full else []) + [[s] for s in short]:
            length = min(seq_len, n - chunk[0])
            x = mx.array(np.stack([stream[s : s + length] for s in chunk]))
            y = mx.array(np.stack([stream[s + 1 : s + length + 1] for s in chunk]))
            TAP.start()
            logits = model(x)
            gates = TAP.stop()
            nll = nn.losses.cross_entropy(logits, y, reduction="sum")
            z = mx.stack([(g <= 0).astype(mx.float32).mean(axis=-1).sum() for g in gates])
            mx.eval(nll, z)
            nll_sum += nll.item()
            n_pred += y.size
            zeros = z if zeros is None else zeros + z
            n_tok += y.size
    per_layer = (zeros / n_tok).tolist()
    return {
        "tokens": int(len(stream)),
        "predicted_tokens": int(n_pred),
        "loss": nll_sum / n_pred,
        "perplexity": math.exp(nll_sum / n_pred),
        "inactive_fraction_per_layer": [round(v, 6) for v in per_layer],
        "inactive_fraction_mean": round(float(np.mean(per_layer)), 6),
    }


def held_out_stream(tokenizer, held: list[str], files: list[str] | None = None) -> np.ndarray:
    topics = load_topics(files)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    return encode_stream(tokenizer, [topics[n] for n in held], eot_id)


def cmd_evaluate(folder: Path) -> None:
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise SystemExit(
            f"error: {folder} has no config.json/model.safetensors; "
            "pass a folder written by this tool (e.g. mlx_flash/demo_model)"
        )
    model, _config = load_folder(folder)
    tokenizer = load_tokenizer(folder)
    card_path = folder / "demo_model_card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    files = card.get("data", {}).get("text_files")
    held = card.get("held_out_topics") or split_topics(load_topics(files))[1]
    seq_len = card.get("training", {}).get("seq_len", 128)
    result = evaluate(model, held_out_stream(tokenizer, held, files), seq_len)
    print(f"held-out tokens: {result['tokens']} ({len(held)} topics), windows of {seq_len}")
    print(f"held-out perplexity (dense, teacher-forced): {result['perplexity']:.4f}")
    for i, v in enumerate(result["inactive_fraction_per_layer"]):
        print(f"layer {i}: {100 * v:.2f}% of FFN neurons inactive per token")
    print(f"mean: {100 * result['inactive_fraction_mean']:.2f}%")
    if card.get("held_out"):
        print(
            f"(card says: perplexity {card['held_out']['perplexity']:.4f}, "
            f"mean inactive {100 * card['held_out']['inactive_fraction_mean']:.2f}%)"
        )


# ------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    steps: int = 2000
    seed: int = 0
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # sparsity penalty: a per-layer coefficient, off for the first `penalty_start` fraction
    # of training, then steered each step towards `target_sparsity` (train batches)
    target_sparsity: float = 0.95
    penalty_start: float = 0.1
    penalty_ramp: float = 0.4  # fraction of training over which the target rises to its value
    lambda_init: float = 0.02
    lambda_gain: float = 0.4  # d log(lambda) per step per unit of sparsity error
    lambda_min: float = 3e-3
    lambda_max: float = 20.0
    eval_every: int = 200  # held-out perplexity in the log, for information only


def sparsity_penalty(g: mx.array) -> mx.array:
    """Mean over tokens of mean(relu(g)) / rms(g): L1 on the activations, scale-free."""
    l1 = nn.relu(g).mean(axis=-1)
    rms = mx.sqrt(mx.mean(g * g, axis=-1) + 1e-6)
    return (l1 / rms).mean()


def cmd_train(
    out: Path, cfg: TrainConfig, shape: Shape, command: str, files: list[str] | None = None
) -> None:
    t_start = time.time()
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    topics = load_topics(files)
    train_names, held_names = split_topics(topics)
    train_texts = [topics[n] for n in train_names]
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(train_texts, shape.vocab_size)
    if tok.get_vocab_size() != shape.vocab_size:
        shape.vocab_size = tok.get_vocab_size()
    save_tokenizer(tok, out, shape.max_position_embeddings)
    tokenizer = load_tokenizer(out)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    train_stream = encode_stream(tokenizer, train_texts, eot_id)
    held_stream = held_out_stream(tokenizer, held_names, files)
    train_chars = sum(map(len, train_texts))
    held_chars = sum(len(topics[n]) for n in held_names)
    print(
        f"topics: {len(train_names)} train ({train_chars} chars, {len(train_stream)} tokens), "
        f"{len(held_names)} held out ({held_chars} chars, {len(held_stream)} tokens)",
        flush=True,
    )

    model = build_model(shape)
    mx.eval(model.parameters())
    n_params = num_params(model)
    print(f"model: {n_params} parameters, shape {asdict(shape)}", flush=True)

    schedule = optim.join_schedules(
        [
            optim.linear_schedule(cfg.lr / cfg.warmup_steps, cfg.lr, cfg.warmup_steps),
            optim.cosine_decay(cfg.lr, cfg.steps - cfg.warmup_steps, cfg.lr * cfg.min_lr_ratio),
        ],
        [cfg.warmup_steps],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    n_layers = shape.num_hidden_layers

    def loss_fn(model, x, y, lam):
        TAP.start()
        logits = model(x)
        gates = TAP.stop()
        ce = nn.losses.cross_entropy(logits, y, reduction="mean")
        pens = mx.stack([sparsity_penalty(g) for g in gates])
        sparsity = mx.stack([(g <= 0).astype(mx.float32).mean() for g in gates])
        return ce + (lam * pens).sum(), ce, sparsity

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(x, y, lam):
        (loss, ce, sparsity), grads = loss_and_grad(model, x, y, lam)
        grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        return loss, ce, sparsity

    lam = np.zeros(n_layers, dtype=np.float64)
    base = np.zeros(n_layers, dtype=np.float64)
    penalty_on = False
    start_step = int(cfg.penalty_start * cfg.steps)
    ramp_steps = max(1, int(cfg.penalty_ramp * cfg.steps))
    high = len(train_stream) - cfg.seq_len - 1
    t_train = time.time()
    log_every = 50
    ce_acc, n_acc = 0.0, 0
    sparsity_ema = None
    history = []
    for step in range(1, cfg.steps + 1):
        starts = rng.integers(0, high, size=cfg.batch_size)
        window = np.stack([train_stream[s : s + cfg.seq_len + 1] for s in starts])
        x, y = mx.array(window[:, :-1]), mx.array(window[:, 1:])
        loss, ce, sparsity = train_step(x, y, mx.array(lam.astype(np.float32)))
        mx.eval(loss, ce, sparsity, state)
        sp = np.array(sparsity, dtype=np.float64)
        sparsity_ema = sp if sparsity_ema is None else 0.9 * sparsity_ema + 0.1 * sp
        ce_acc += ce.item()
        n_acc += 1
        if step >= start_step:
            if not penalty_on:
                penalty_on = True
                lam[:] = cfg.lambda_init
                base = sparsity_ema.copy()
            # the target rises linearly from the layer's sparsity when the penalty starts
            frac = min(1.0, (step - start_step) / ramp_steps)
            target = base + frac * (cfg.target_sparsity - base)
            lam *= np.exp(cfg.lambda_gain * (target - sp))
            lam = np.clip(lam, cfg.lambda_min, cfg.lambda_max)
        if step % log_every == 0 or step == cfg.steps:
            elapsed = time.time() - t_train
            row = {
                "step": step,
                "ce": round(ce_acc / n_acc, 4),
                "sparsity": [round(float(v), 4) for v in sparsity_ema],
                "lambda": [round(float(v), 5) for v in lam],
                "lr": float(optimizer.learning_rate.item()),
                "s_per_step": round(elapsed / step, 3),
            }
            history.append(row)
            print(
                f"step {step:5d}/{cfg.steps} ce {row['ce']:.4f} "
                f"sparsity {' '.join(f'{v:.3f}' for v in sparsity_ema)} "
                f"lambda {' '.join(f'{v:.4f}' for v in lam)} lr {row['lr']:.2e} "
                f"{row['s_per_step']:.2f} s/step",
                flush=True,
            )
            ce_acc, n_acc = 0.0, 0
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            r = evaluate(model, held_stream, cfg.seq_len)
            history[-1]["held_out_perplexity"] = round(r["perplexity"], 3)
            history[-1]["held_out_inactive"] = r["inactive_fraction_per_layer"]
            print(
                f"  held-out perplexity {r['perplexity']:.3f} inactive "
                f"{' '.join(f'{v:.3f}' for v in r['inactive_fraction_per_layer'])}",
                flush=True,
            )
    train_seconds = time.time() - t_train

    config = hf_config(shape, eot_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_weights(model, out / "model.safetensors")
    # measure what was saved, exactly as --evaluate does
    saved, _ = load_folder(out)
    result = evaluate(saved, held_out_stream(load_tokenizer(out), held_names, files), cfg.seq_len)
    print(
        f"held-out perplexity {result['perplexity']:.3f}, inactive per layer "
        f"{result['inactive_fraction_per_layer']} (mean {result['inactive_fraction_mean']:.4f})",
        flush=True,
    )

    import mlx_lm
    import tokenizers

    card = {
        "description": "Demo Llama-architecture causal LM with a ReLU-gated FFN "
        "(down(relu(gate x) * up x)), trained with an activation-sparsity penalty "
        "on the text of Python's pydoc_data.topics; see tools/train_demo_model.py.",
        "command": command,
        "evaluate_command": f"python tools/train_demo_model.py --evaluate {out}",
        "seed": cfg.seed,
        "steps": cfg.steps,
        "training": asdict(cfg),
        "shape": asdict(shape),
        "parameters": n_params,
        "data": {
            "source": f"{len(files)} text files"
            if files
            else "pydoc_data.topics.topics (Python standard library)",
            "text_files": sorted(files) if files else None,
            "python_version": platform.python_version(),
            "train_topics": len(train_names),
            "train_chars": train_chars,
            "train_tokens": int(len(train_stream)),
            "held_out_chars": held_chars,
            "held_out_tokens": int(len(held_stream)),
            "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        },
        "held_out_topics": held_names,
        "held_out": {
            "perplexity": round(result["perplexity"], 4),
            "loss": round(result["loss"], 6),
            "predicted_tokens": result["predicted_tokens"],
            "window": cfg.seq_len,
            "inactive_fraction_per_layer": result["inactive_fraction_per_layer"],
            "inactive_fraction_mean": result["inactive_fraction_mean"],
            "definition": "per token and layer, the fraction of FFN neurons with "
            "relu(gate_proj(x)) == 0 exactly; averaged over held-out tokens",
        },
        "train_log": history,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "environment": {
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
            "tokenizers": tokenizers.__version__,
            "platform": platform.platform(),
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
        },
    }
    (out / "demo_model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB) in {time.time() - t_start:.0f} s", flush=True)
    low = [i for i, v in enumerate(result["inactive_fraction_per_layer"]) if v < 0.90]
    if low:
        print(
            f"warning: layers {low} are less than 90% inactive on the held-out text; "
            "train for more steps (the default gets every layer above 94%)",
            flush=True,
        )


# ------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("mlx_flash/demo_model"),
        help="folder to write the model to (default: mlx_flash/demo_model)",
    )
    p.add_argument(
        "--evaluate",
        type=Path,
        metavar="DIR",
        help="do not train: measure held-out perplexity and sparsity of DIR",
    )
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument(
        "--target-sparsity",
        type=float,
        default=d.target_sparsity,
        help=f"fraction of inactive FFN neurons to steer to (default {d.target_sparsity})",
    )
    shape = Shape()
    for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=getattr(shape, name),
            help=f"model shape (default {getattr(shape, name)})",
        )
    p.add_argument(
        "--text",
        nargs="+",
        metavar="FILE",
        help="train on these UTF-8 files, one document each, instead of pydoc_data.topics "
        "(about 10%% of the characters, whole files, held out)",
    )
    args = p.parse_args(argv)

    if args.evaluate is not None:
        cmd_evaluate(args.evaluate)
        return
    if args.steps < 10:
        p.error("--steps must be at least 10")
    if not 0.0 < args.target_sparsity < 1.0:
        p.error("--target-sparsity must be between 0 and 1")
    cfg = TrainConfig(steps=args.steps, seed=args.seed, target_sparsity=args.target_sparsity)
    cfg.warmup_steps = min(cfg.warmup_steps, max(1, cfg.steps // 10))
    shape = Shape(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=max(1, min(shape.num_key_value_heads, args.num_attention_heads)),
    )
    if (
        min(args.hidden_size, args.num_hidden_layers, args.intermediate_size, args.num_attention_heads) < 1
        or shape.hidden_size % shape.num_attention_heads
    ):
        p.error("the shape's sizes must be positive and --hidden-size a multiple of --num-attention-heads")
    if shape.num_attention_heads % shape.num_key_value_heads:
        shape.num_key_value_heads = 1
    command = shlex.join(["python", "tools/train_demo_model.py"] + list(argv))
    missing = [f for f in args.text or [] if not Path(f).is_file()]
    if missing:
        p.error(f"--text: no such file: {missing[0]}")
    cmd_train(args.out, cfg, shape, command, [str(f) for f in args.text] if args.text else None)


if __name__ == "__main__":
    main()
