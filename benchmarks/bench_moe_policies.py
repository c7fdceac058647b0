"""Expert-cache eviction policies side by side, on the routing of a real MoE model's own routers.

    python benchmarks/bench_moe_policies.py --model DIR [--tokens 512] [--sequences 4] [--out DIR]

Runs the mlx-lm model in DIR (whole, in memory: a 4-bit qwen3-30b-a3b preset needs about 17 GB;
run it under `flock /work/bench.lock`) over the held-out text of tools/make_synthetic_model.py
(every 7th topic of Python's documentation, `--sequences` of `--tokens` tokens), records every
MoE layer's top-k expert ids, and replays them through an expert pool of 25/40/50% of the
experts under each policy of `mlx_flash.expert_policies` (each sequence from an empty pool, the
first 32 tokens not counted). Prints a table of hit rates (mean over layers) and writes
OUT/bench_moe_policies.json. Nothing is read from flash: this measures what each policy would
hit, not time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import make_synthetic_model as msm  # noqa: E402

FRACTIONS = (0.25, 0.40, 0.50)


def router_trace(folder: Path, sequences: int, tokens: int) -> tuple[list[np.ndarray], int]:
    """Per MoE layer the top-k ids [sequences, tokens, k] mlx-lm's model routes the held-out text
    to (float32 activations), and the number of experts."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, config = load_model(folder)
    model.set_dtype(mx.float32)
    k, experts = config["num_experts_per_tok"], config["num_experts"]
    seen: list[np.ndarray] = []

    class Recorder:
        def __init__(self, moe):
            self.moe = moe

        def __call__(self, x):
            gates = self.moe.gate(x)
            seen.append(np.array(mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]))
            return self.moe(x)

    for layer in model.layers:
        if hasattr(layer.mlp, "switch_mlp"):
            layer.mlp = Recorder(layer.mlp)
    _, ev_text = msm.text_split()
    ids = msm.token_batches(folder, ev_text, sequences, tokens)
    for s in range(sequences):  # one sequence at a time: memory stays that of one
        mx.eval(model(mx.array(ids[s : s + 1])))
    layers = len(seen) // sequences
    return [np.concatenate(seen[i::layers]) for i in range(layers)], experts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="benchmarks/bench_moe_policies.py", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--model", type=Path, required=True, help="an mlx-lm MoE model folder (e.g. a tiny-moe preset)"
    )
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="folder for bench_moe_policies.json")
    args = ap.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"error: {args.model} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    from mlx_flash.expert_policies import POLICIES, simulate

    trace, experts = router_trace(args.model, args.sequences, args.tokens)
    rows = []
    for f in FRACTIONS:
        slots = round(f * experts)
        row = {"fraction": f, "slots": slots}
        for name in POLICIES:
            row[name] = float(np.mean([simulate(name, t, experts, slots) for t in trace]))
        rows.append(row)
    names = list(POLICIES)
    print(
        f"{args.model}: {len(trace)} MoE layers, {experts} experts, {args.sequences} x {args.tokens} tokens"
    )
    print("cached experts | " + " | ".join(f"{n:>7}" for n in names))
    for r in rows:
        print(
            f"{100 * r['fraction']:5.0f}% ({r['slots']:3d}) | "
            + " | ".join(f"{100 * r[n]:6.2f}%" for n in names)
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_moe_policies.json").write_text(
            json.dumps(
                {"model": str(args.model), "tokens": args.tokens, "sequences": args.sequences, "rows": rows},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
