"""`scratchgpt <verb>`: parses arguments and calls the library; all logic lives in the modules.

Errors print as one line and exit with status 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from typing import Callable, Sequence

import torch

from .checkpoint import load_model_from_checkpoint
from .config import GPT2_SIZES, gpt2_config
from .devices import resolve_device, resolve_dtype
from .generate import generate_stream
from .model import GPTModel
from .tokenizer import ENDOFTEXT_ID, get_tokenizer, provision_vocab


# --------------------------------------------------------------------------- model sources

def add_model_source_args(parser: argparse.ArgumentParser) -> None:
    """The ways a command can name a model: exactly one of them."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", metavar="PATH", help="a scratchgpt checkpoint (.pt/.pth)")
    group.add_argument("--preset", choices=list(GPT2_SIZES),
                       help="a randomly initialised model of a GPT-2 size (for smoke tests)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="number format of the weights (default fp32)")


def load_model_from_args(args: argparse.Namespace) -> tuple[GPTModel, object]:
    """The model the arguments name, on its device in eval mode, and its tokenizer."""
    device = resolve_device(args.device)
    if args.checkpoint:
        model = load_model_from_checkpoint(args.checkpoint, device)
    else:
        torch.manual_seed(0)
        model = GPTModel(gpt2_config(args.preset)).to(device).eval()
    return model.to(resolve_dtype(args.dtype)), get_tokenizer()


# --------------------------------------------------------------------------- generate

def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model",
                       description="Continue a prompt, printing tokens as they are produced.")
    p.add_argument("prompt", nargs="?", help="the prompt (read from stdin when omitted)")
    add_model_source_args(p)
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of mass p")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--eos", action="store_true", help="stop at <|endoftext|>")
    p.add_argument("--context-size", type=int, default=None,
                   help="tokens of context the model sees (default: its context length)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> None:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ValueError("empty prompt: give one as an argument or on stdin")
    model, tokenizer = load_model_from_args(args)
    device = model.tok_emb.weight.device
    idx = torch.tensor([tokenizer.encode(prompt, allowed_special="all")], device=device)
    context_size = args.context_size or model.cfg.context_length
    out = sys.stdout
    out.write(prompt)
    out.flush()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may end mid-character
    for token in generate_stream(model, idx, args.max_new_tokens, context_size,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 eos_id=ENDOFTEXT_ID if args.eos else None, seed=args.seed):
        out.write(decoder.decode(tokenizer.decode_single_token_bytes(int(token[0, 0]))))
        out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")


# --------------------------------------------------------------------------- vocab

def add_vocab_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vocab", help="provision the GPT-2 vocabulary offline from PyPI",
                       description="Fetch gpt2.tiktoken from the openai-whisper source package on PyPI, "
                                   "verify its sha256 and store it where get_tokenizer() looks.")
    p.add_argument("--dest", default=None, help="folder to store it in (default ~/.cache/scratchgpt)")
    p.set_defaults(func=cmd_vocab)


def cmd_vocab(args: argparse.Namespace) -> None:
    print(provision_vocab(args.dest))


# --------------------------------------------------------------------------- main

PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_generate_parser,
    add_vocab_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchgpt", description="GPT-2 from scratch: train, generate, evaluate, load OpenAI's weights.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("scratchgpt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"scratchgpt {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
