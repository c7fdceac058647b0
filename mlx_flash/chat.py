"""python -m mlx_flash.chat: a chat prompt over a model whose FFN is read from flash.

Streams each answer as it is generated. Uses the model's chat template when it has one (the
conversation is kept in a KV prompt cache, so each turn only processes the new text), plain
text continuation otherwise (the bundled demo model). Commands: /stats (the last turn's flash
statistics), /reset (forget the conversation), /quit. A turn that would not fit the context
(--context) is refused with a note, and the conversation goes on.

Several processes (ranks started by mlx.launch or by hand, see README): rank 0 reads the
terminal and prints; each line it reads is sent to the other ranks, which answer in silence
(each computes its share of every FFN layer).
"""

from __future__ import annotations

import argparse
import sys

from .distributed import broadcast_text, is_primary, print_primary
from .errors import run_cli
from .generate import add_model_arguments, load_from_args

HELP = "commands: /stats  /reset  /quit"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_flash.chat", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    p.add_argument("--system", help="a system prompt (models with a chat template)")
    args = p.parse_args(argv)

    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    from .api import ContextLengthError, flash_stats, stream_generate

    model, tokenizer = load_from_args(args)
    say = print_primary  # under mlx.launch: rank 0 only
    sampler = make_sampler(args.temp)
    templated = getattr(tokenizer, "chat_template", None) is not None
    prompt_cache = make_prompt_cache(model)
    first_turn = True
    say(f"mlx_flash chat ({args.model or 'demo model'}, mode {args.mode}). {HELP}", flush=True)
    while True:
        query = broadcast_text(_read_line(">> ") if is_primary() else None)  # rank 0's line, on every rank
        if query is None:
            say()
            break
        command = query.strip()
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            prompt_cache, first_turn = make_prompt_cache(model), True
            say("(conversation cleared)")
            continue
        if command == "/stats":
            say(flash_stats(model).format())
            continue
        if command.startswith("/"):
            say(HELP)
            continue
        if not command:
            continue
        if templated:
            messages = [{"role": "user", "content": query}]
            if first_turn and args.system:
                messages.insert(0, {"role": "system", "content": args.system})
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            prompt = query if first_turn else "\n" + query
        try:
            for response in stream_generate(
                model,
                tokenizer,
                prompt,
                max_tokens=args.max_tokens,
                sampler=sampler,
                prompt_cache=prompt_cache,
            ):
                say(response.text, end="", flush=True)
        except ContextLengthError as e:  # checked before anything is generated: the conversation is as it was
            say(f"(the conversation is full: {e}. /reset starts a new one; --context sets a larger one)")
            continue
        first_turn = False
        say()
    model.flash.close()
    return 0


def _read_line(prompt: str) -> str | None:
    """A line from the terminal, None at its end."""
    try:
        return input(prompt)
    except EOFError:
        return None


def cli() -> None:
    """The `mlx-flash-chat` command: main() with errors as one line and an exit status."""
    sys.exit(run_cli(main, prog="mlx_flash.chat"))


if __name__ == "__main__":
    cli()
