"""python -m mlx_flash.predictors train|eval: train a flash folder's activation predictors on
calibration text, or measure them on held-out text.

  python -m mlx_flash.predictors train --model FLASHDIR --data calibration.txt [--tokens N]
                                       [--rank R | --recall 0.95] [--sparsity 0.5]
  python -m mlx_flash.predictors eval --model FLASHDIR --data heldout.txt [--decode-tokens N] [--json OUT]

train runs the model over the text (its FFN streamed from flash, so a model larger than
memory works), records each layer's FFN input and truly active neurons, and trains per layer a
low-rank predictor whose rank and threshold are chosen to reach the recall target. It saves
predictors.safetensors into the folder and records it in flash_manifest.json; an interrupted
run resumes at the layer it was on. ReLU models learn the neurons that fire (activation > 0);
other activations (SwiGLU, GELU) learn the neurons whose |activation| exceeds a per-layer
threshold that leaves --sparsity of them out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MlxFlashError, run_cli

PROG = "python -m mlx_flash.predictors"


def _parser() -> argparse.ArgumentParser:
    from .training import TrainOptions

    d = TrainOptions()
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    sub = p.add_subparsers(dest="command", metavar="{train,eval}")
    t = sub.add_parser(
        "train", help="train and save the predictors", description="Train a flash folder's predictors."
    )
    t.add_argument(
        "--model",
        required=True,
        type=Path,
        metavar="FLASHDIR",
        help="a flash folder (from mlx_flash.convert)",
    )
    t.add_argument("--data", required=True, type=Path, metavar="TEXTFILE", help="calibration text (UTF-8)")
    t.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="calibration tokens to use; their FFN inputs are streamed to disk (default: 8192 for a "
        "model of 5.3 GB or more, up to 65536 for a smaller one, about the same forward work)",
    )
    t.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per forward window (default: min(256, the model's context))",
    )
    g = t.add_mutually_exclusive_group()
    g.add_argument(
        "--recall",
        type=float,
        default=d.recall,
        help="recall of truly active neurons each layer must reach on new text (default: %(default)s)",
    )
    g.add_argument(
        "--rank",
        type=int,
        default=None,
        help="one fixed rank for every layer (its threshold still reaches --recall 0.95)",
    )
    t.add_argument(
        "--recall-margin",
        type=float,
        default=d.recall_margin,
        help="thresholds reach --recall plus this on the held-out calibration tokens, so that other "
        "text still reaches --recall (default: %(default)s)",
    )
    t.add_argument(
        "--max-size",
        type=float,
        default=d.max_size,
        help="all predictors at most this fraction of the model's bytes; ranks are chosen within it (default: %(default)s)",
    )
    t.add_argument(
        "--max-rank",
        type=int,
        default=d.max_rank,
        help="the largest rank any layer gets (default: %(default)s)",
    )
    t.add_argument(
        "--min-gain",
        type=float,
        default=d.min_gain,
        help="a layer gets more rank only while it cuts its predicted/true ratio by this much (default: %(default)s)",
    )
    t.add_argument(
        "--spend-budget",
        action="store_true",
        help="ranks from --max-size and --min-gain alone: the fewest neurons predicted that the budget buys, "
        "also where a larger predictor costs a token more compute than the neurons it stops predicting "
        "(by default ranks stop there)",
    )
    t.add_argument(
        "--sparsity",
        type=float,
        default=d.sparsity,
        help="non-ReLU models: fraction of activations counted as inactive (default: %(default)s)",
    )
    t.add_argument(
        "--epochs",
        type=int,
        default=d.epochs,
        help="balanced-loss epochs from the SVD initialisation (0: the SVD alone) (default: %(default)s)",
    )
    t.add_argument(
        "--train-tokens",
        type=int,
        default=d.train_tokens,
        help="at most this many calibration tokens feed the training steps (default: %(default)s)",
    )
    t.add_argument("--batch", type=int, default=d.batch, help="tokens per Adam step (default: %(default)s)")
    t.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument(
        "--work", type=Path, default=None, help="work folder for resuming (default: FLASHDIR/predictors.work)"
    )
    t.add_argument("--fresh", action="store_true", help="ignore the work of an interrupted run")
    t.add_argument("--keep-work", action="store_true", help="keep the work folder when done")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser(
        "eval",
        help="measure the predictors on held-out text",
        description="Measure a flash folder's predictors.",
    )
    e.add_argument(
        "--model", required=True, type=Path, metavar="FLASHDIR", help="a flash folder with predictors"
    )
    e.add_argument("--data", required=True, type=Path, metavar="TEXTFILE", help="held-out text (UTF-8)")
    e.add_argument(
        "--tokens", type=int, default=16384, help="tokens of the text to use (default: %(default)s; 0: all)"
    )
    e.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per window, each starting with an empty KV cache (default: as trained)",
    )
    e.add_argument(
        "--window", type=int, default=None, help="the flash model's neuron window in tokens (default: 5)"
    )
    e.add_argument(
        "--decode-tokens",
        type=int,
        default=256,
        help="also run the flash decode path token by token on the first N tokens, a check of the "
        "teacher-forced flash perplexity (default: %(default)s; 0: skip)",
    )
    e.add_argument(
        "--no-sweep", action="store_true", help="non-ReLU models: skip the perplexity-against-sparsity sweep"
    )
    e.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT"
    )
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    if args.command == "train":
        from .training import TrainOptions, train

        opts = TrainOptions(
            recall=args.recall,
            recall_margin=args.recall_margin,
            rank=args.rank,
            max_size=args.max_size,
            max_rank=args.max_rank,
            min_gain=args.min_gain,
            spend_budget=args.spend_budget,
            train_tokens=args.train_tokens,
            sparsity=args.sparsity,
            epochs=args.epochs,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
        )
        info = train(
            args.model,
            args.data,
            tokens=args.tokens,
            seq_len=args.seq_len,
            opts=opts,
            work=args.work,
            fresh=args.fresh,
            keep_work=args.keep_work,
            progress=not args.quiet,
        )
        print(
            f"wrote {args.model / 'predictors.safetensors'}: {len(info['layers'])} layers, ranks "
            f"{[r['rank'] for r in info['layers']]}, {info['elems']} weights "
            f"({100 * info['fraction_of_model']:.2f}% of the model's {info['model_bytes']} bytes)"
        )
        for r in info["layers"]:
            v = r["validation"]
            print(
                f"  layer {r['layer']}: rank {r['rank']}, threshold p >= {r['threshold_probability']:.4f}, "
                f"validation recall {100 * v['recall']:.2f}%, predicted {100 * v['predicted_fraction']:.2f}% vs "
                f"active {100 * v['active_fraction']:.2f}% ({v['ratio']:.2f}x)"
            )
        return 0
    from .evaluation import evaluate, format_result

    if args.tokens < 0 or args.decode_tokens < 0:
        raise MlxFlashError("--tokens and --decode-tokens must be >= 0")
    result = evaluate(
        args.model,
        args.data,
        tokens=args.tokens or None,
        seq_len=args.seq_len,
        window=args.window,
        decode_tokens=args.decode_tokens,
        sweep=not args.no_sweep,
        progress=not args.quiet,
    )
    print(format_result(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
