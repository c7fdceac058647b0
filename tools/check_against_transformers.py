"""Check mlx_flash on Hugging Face transformers' own tiny MoE models against transformers and mlx-lm.

    pip install torch  # CPU is enough; only this script needs it
    python tools/check_against_transformers.py --work /tmp/check [--families qwen3_moe,mixtral]
        [--sizes tests|hub] [--budget 55%] [--quantize 4]

For each family: a random tiny model is made by transformers itself
(``AutoModelForCausalLM.from_config`` at the sizes of transformers' own model tests, or with a
large vocabulary as the hub's tiny-random checkpoints have, ``--sizes hub``) and saved with
``save_pretrained`` (per-expert tensors, as transformers writes them); converted with
``python -m mlx_flash.convert --model SRC --out DST``; loaded with
``mlx_flash.load(DST, memory_budget=BUDGET)``. Then:

- prompt logits against transformers' (float32): the largest |flash - transformers| over the
  largest |transformers| (the "relative error"; the check is <= 2e-3);
- greedy tokens against mlx-lm's dense model of the same source (``mlx_lm.load(SRC)``);
- experts read from flash while decoding (bytes read by decode passes);
- the memory plan within the budget.

With ``--quantize BITS``: the source is also quantized by ``mlx_lm.convert -q`` (``--q-bits``,
``--q-group-size``), converted and checked the same way, its tokens and logits against mlx-lm's
dense model of the quantized folder (the quantized model differs from transformers' float one
by its quantization, so that error is reported, not checked).

transformers 5 writes some settings under new names (``rope_parameters``, Qwen-MoE's
``num_local_experts``) that mlx-lm 0.32 does not read; the source's config.json gets the
names older transformers wrote as well (`legacy_config`), as the hub's checkpoints have them.
One line per family; exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

# The sizes transformers' own model tests use (tests/causal_lm_tester.py and the MoE testers).
TESTS = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=37,
    max_position_embeddings=512,
    hidden_act="silu",
    tie_word_embeddings=False,
)
HUB = dict(TESTS, vocab_size=32000, max_position_embeddings=4096)  # a tiny-random hub checkpoint
# hub: FFN widths mlx's quantization groups (32) divide, so that --quantize works on every family
HUB_WIDTHS = dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64)
_TOPK = dict(num_experts_per_tok=2)
# A first dense layer, then routed and shared experts (DeepSeek's and GLM's layout).
_ROUTED = dict(
    _TOPK,
    num_hidden_layers=3,
    n_routed_experts=8,
    n_shared_experts=1,
    moe_intermediate_size=16,
    first_k_dense_replace=1,
)
_DEEPSEEK = dict(
    _ROUTED,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    num_key_value_heads=4,
    n_group=2,
    topk_group=1,
)
FAMILIES = {
    "qwen3_moe": dict(_TOPK, num_experts=8, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True),
    "mixtral": dict(_TOPK, num_local_experts=8),
    "olmoe": dict(_TOPK, num_experts=8),
    "qwen2_moe": dict(_TOPK, num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=32),
    "deepseek_v3": dict(_DEEPSEEK),
    "phimoe": dict(_TOPK, num_local_experts=8, attention_bias=True, lm_head_bias=True),
    "granitemoe": dict(_TOPK, num_local_experts=8),
    "deepseek_v2": dict(
        _DEEPSEEK,
        topk_method="group_limited_greedy",
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=1.0,
            original_max_position_embeddings=512,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=0.0,
        ),
    ),
    "glm4_moe": dict(_ROUTED, head_dim=8, n_group=2, topk_group=1),
    "ernie4_5_moe": dict(_TOPK, moe_num_experts=8, moe_intermediate_size=16, moe_layer_start_index=0),
    "dots1": dict(
        _TOPK, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=0
    ),
}
PROMPT = "The quick brown fox jumps"
MAX_TOKENS = 12
TOLERANCE = 2e-3


def legacy_config(cfg: dict) -> dict:
    """config.json with the names older transformers wrote too (what mlx-lm 0.32 reads)."""
    out = dict(cfg)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", rope)
        out.setdefault("rope_scaling", None)
        if "partial_rotary_factor" in rope and out.get("partial_rotary_factor") is None:
            out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if out.get("model_type") in ("qwen3_moe", "qwen2_moe", "olmoe") and "num_experts" not in out:
        out["num_experts"] = out.get("num_local_experts")
    return out


def write_tokenizer_for(folder: Path, vocab_size: int) -> None:
    """A BPE tokenizer of at most `vocab_size` tokens trained on the tests' text."""
    from tiny_models import TOKENIZER_TEXT, write_tokenizer

    if vocab_size >= 300:
        write_tokenizer(folder, vocab_size)
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    special = ["<|endoftext|>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special[0], eos_token=special[0], unk_token=special[1]
    ).save_pretrained(str(folder))


def build(family: str, out: Path, sizes: dict):
    """transformers' model of `family` at `sizes`, saved to `out`; returns the torch model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    widths = HUB_WIDTHS if sizes is HUB else {}
    cfg = AutoConfig.for_model(family, **{**sizes, **FAMILIES[family], **widths})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager")
    with torch.no_grad():  # routers and norms start near constant: spread them so experts differ
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "bias" in name):
                p.add_(torch.randn_like(p) * 0.1)
            elif p.ndim == 2 and p.shape[0] <= 64 and ("gate" in name or "router" in name):
                p.normal_(0, 0.5)
    model.eval()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    path = out / "config.json"
    path.write_text(json.dumps(legacy_config(json.loads(path.read_text())), indent=1))
    write_tokenizer_for(out, cfg.vocab_size)
    return model


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def check_folder(src: Path, flash: Path, budget: str, ref_logits: np.ndarray | None, hf_logits) -> dict:
    """Load the flash folder at `budget`; its logits and greedy tokens against mlx-lm's dense
    model of `src` (and transformers' logits `hf_logits` when given)."""
    import mlx.core as mx
    import mlx_lm

    import mlx_flash

    dense, tok = mlx_lm.load(str(src))
    ids = tok.encode(PROMPT)
    x = mx.array(ids)[None]
    want_tokens = [r.token for r in mlx_lm.stream_generate(dense, tok, PROMPT, max_tokens=MAX_TOKENS)]
    dense_logits = np.array(dense(x).astype(mx.float32))
    del dense
    model, tok = mlx_flash.load(str(flash), memory_budget=budget)
    rt = model.flash
    try:
        got_tokens = [r.token for r in mlx_flash.stream_generate(model, tok, PROMPT, max_tokens=MAX_TOKENS)]
        decode_bytes = sum(r.bytes_read for r in rt.records if not r.is_prefill)
        expert_misses = sum(r.neurons_loaded for r in rt.records if not r.is_prefill)  # experts read
        logits = np.array(model(x).astype(mx.float32))
        plan = rt.plan
        return dict(
            tokens_equal=got_tokens == want_tokens,
            err_mlx_lm=relative_error(logits, dense_logits),
            err_transformers=None if hf_logits is None else relative_error(logits, hf_logits),
            decode_bytes=decode_bytes,
            expert_misses=expert_misses,
            within_budget=plan.total_bytes <= plan.budget_bytes,
            plan=plan,
            prompt_tokens=len(ids),
        )
    finally:
        rt.close()


def convert(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    r = subprocess.run(
        [sys.executable, "-m", "mlx_flash.convert", "--model", str(src), "--out", str(dst), "--quiet"],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")


def check_family(family: str, work: Path, args) -> list[str]:
    import torch

    sizes = HUB if args.sizes == "hub" else TESTS
    src, flash = work / f"{family}-src", work / f"{family}-flash"
    model = build(family, src, sizes)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(src)(PROMPT)["input_ids"]
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits.float().numpy()
    convert(src, flash)
    lines = [_line(family, "float32", check_folder(src, flash, args.budget, None, hf_logits), True)]
    if args.quantize:
        q, qflash = work / f"{family}-q{args.quantize}", work / f"{family}-q{args.quantize}-flash"
        shutil.rmtree(q, ignore_errors=True)
        import mlx_lm
        from mlx_lm import convert as mlx_convert

        what = f"{args.quantize}-bit g{args.q_group_size}"
        try:
            mlx_convert(str(src), str(q), quantize=True, q_bits=args.quantize, q_group_size=args.q_group_size)
            mlx_lm.load(str(q))
        except ValueError as e:  # mlx-lm's own limit (a dimension the group size does not divide)
            return lines + [f"skip {family:<15s} {what:<12s} mlx-lm's -q folder: {str(e).splitlines()[0]}"]
        convert(q, qflash)
        r = check_folder(q, qflash, args.budget, None, hf_logits)
        lines.append(_line(family, what, r, False))
    return lines


def _line(family: str, what: str, r: dict, float_model: bool) -> str:
    ok = r["tokens_equal"] and r["decode_bytes"] > 0 and r["within_budget"]
    if float_model:
        ok = ok and r["err_transformers"] <= TOLERANCE
    plan = r["plan"]
    flags = [f for f, on in (("embed", plan.embed_on_flash), ("head", plan.head_on_flash)) if on]
    r["ok"] = ok
    return (
        f"{'ok  ' if ok else 'FAIL'} {family:<15s} {what:<12s} tokens equal mlx-lm: {r['tokens_equal']}; "
        f"logits rel. err vs transformers {r['err_transformers']:.2e}, vs mlx-lm {r['err_mlx_lm']:.2e}; "
        f"decode read {r['decode_bytes']} B ({r['expert_misses']} experts); plan "
        f"{plan.total_bytes}/{plan.budget_bytes} B, {plan.cache_capacity} slots, context {plan.context}, "
        f"on flash: {'+'.join(flags) or 'experts only'}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for the sources and flash folders")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--sizes", choices=("tests", "hub"), default="tests")
    p.add_argument("--budget", default="55%")
    p.add_argument("--quantize", type=int, default=0, help="also check an mlx_lm.convert -q folder of BITS")
    p.add_argument("--q-group-size", type=int, default=32)
    p.add_argument("-v", "--verbose", action="store_true", help="a traceback for each failure")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    failed = 0
    for family in args.families.split(","):
        try:
            lines = check_family(family, work, args)
        except Exception as e:  # one line per family, whatever went wrong
            if args.verbose:
                traceback.print_exc()
            lines = [f"FAIL {family:<15s} {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
        for line in lines:
            print(line, flush=True)
            failed += line.startswith("FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
