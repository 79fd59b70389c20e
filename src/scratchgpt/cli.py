"""`scratchgpt <verb>`: parses arguments and calls the library; all logic lives in the modules.

Errors print as one line and exit with status 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .checkpoint import checkpoint_task, load_model_from_checkpoint, safe_load, shape_for_task
from .config import GPT2_SIZES, GPT_CONFIG_124M, gpt2_config
from .data import BUILTIN_CORPORA, is_token_file, load_corpus, open_token_file, prepare_token_file, split_tokens
from .devices import resolve_device, resolve_dtype
from .distributed import shutdown_distributed
from .evaluate import evaluate_perplexity
from .generate import generate_stream
from .gpt2.convert import FORMATS, convert, detect_format, load_model
from .gpt2.download import download_gpt2_files
from .gpt2.hf import load_hf_gpt2
from .gpt2.load import load_gpt2, tokenizer_for_folder
from .gpt2.peft import ADAPTER_FORMATS, convert_adapter
from .lora import (check_lora_hyperparameters, describe_lora, is_adapter, load_adapter, lora_settings,
                   replace_linear_with_lora)
from .kernels import QUANTIZATIONS, quantize_model
from .model import GPTModel, count_parameters, empty_model
from .tokenizer import ENDOFTEXT, ENDOFTEXT_ID, decode_stream, get_tokenizer, provision_vocab
from .tasks.classify import (ClassifyTask, calc_accuracy_loader, check_labels, classification_collate_fn,
                             classify_probabilities, load_classification_data, read_texts, replace_head,
                             set_trainable_layers)
from .tasks.instruct import PROMPT_STYLES, InstructTask, responses_path, stream_response, write_responses
from .tasks.records import ON_LONG
from .train import TrainConfig, Trainer, TrainResult


# --------------------------------------------------------------------------- model sources

def add_model_source_args(parser: argparse.ArgumentParser) -> None:
    """The ways a command can name a model: exactly one of them."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", metavar="PATH", help="a scratchgpt checkpoint (.pt/.pth)")
    group.add_argument("--preset", choices=list(GPT2_SIZES),
                       help="a randomly initialised model of a GPT-2 size (for smoke tests)")
    group.add_argument("--gpt2", metavar="SIZE_OR_FOLDER",
                       help=f"OpenAI's GPT-2: a size ({', '.join(GPT2_SIZES)}), downloaded into --models-dir "
                            "unless already there, or an OpenAI model folder")
    group.add_argument("--hf", metavar="FOLDER", help="a Hugging Face GPT-2 folder (config.json + model.safetensors)")
    parser.add_argument("--models-dir", default="gpt2",
                        help="where --gpt2 SIZE lives or is downloaded (default ./gpt2)")
    parser.add_argument("--base-url", default=None,
                        help="where to download GPT-2 from (default $SCRATCHGPT_GPT2_BASE_URL or OpenAI's bucket)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="number format of the weights (default fp32)")
    parser.add_argument("--lora", metavar="ADAPTER",
                        help="a LoRA adapter to apply on top of the model: an adapter file (adapter.pt or "
                             "best.pt of a `train --lora-rank` run) or a Hugging Face PEFT adapter folder")
    parser.add_argument("--quantize", choices=list(QUANTIZATIONS), default=None,
                        help="int8: every linear layer's weights as int8 with a scale per output channel, a "
                             "quarter of fp32's bytes and faster CPU decoding; activations keep --dtype")


def load_model_from_args(args: argparse.Namespace) -> tuple[GPTModel, object]:
    """The model the arguments name (with its LoRA adapter), on its device in eval mode, quantized if
    asked (a LoRA adapter stays float beside the int8 weights), and its tokenizer."""
    model, tokenizer = _load_float_model(args)
    if args.quantize:
        quantize_model(model, args.quantize)
    return model, tokenizer


def _load_float_model(args: argparse.Namespace) -> tuple[GPTModel, object]:
    device = resolve_device(args.device)
    if args.gpt2:
        model, tokenizer = load_gpt2(args.gpt2, models_dir=args.models_dir, device=device, base_url=args.base_url)
    elif args.checkpoint:
        model, tokenizer = load_model_from_checkpoint(args.checkpoint, device), get_tokenizer()
    elif args.hf:
        model, tokenizer = load_hf_gpt2(args.hf, device), tokenizer_for_folder(args.hf)
    else:
        torch.manual_seed(0)
        model, tokenizer = GPTModel(gpt2_config(args.preset)).to(device).eval(), get_tokenizer()
    if args.lora:  # on the fp32 weights, which its base's hash was made from
        shape_for_task(model, _task_of(args.lora))  # a classifier adapter's head replaces the base's
        load_adapter(args.lora, model)
    return model.to(resolve_dtype(args.dtype)), tokenizer


def _task_of(path: str | None) -> dict:
    """The `task` entry of a checkpoint or adapter file ({} for none, or a PEFT adapter folder)."""
    return checkpoint_task(path) if path and Path(path).is_file() else {}


def model_task(args: argparse.Namespace) -> dict:
    """What the model the arguments name was fine-tuned for: its LoRA adapter's task, else its
    checkpoint's ({} for a language model)."""
    return _task_of(args.lora) or _task_of(args.checkpoint)


# --------------------------------------------------------------------------- generate

def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model",
                       description="Continue a prompt, printing tokens as they are produced.")
    p.add_argument("prompt", nargs="?", help="the prompt (read from stdin when omitted)")
    add_model_source_args(p)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to add (default 50; for an instruction-tuned model: until end-of-text)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of mass p")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--eos", action="store_true", help="stop at <|endoftext|>")
    p.add_argument("--context-size", type=int, default=None,
                   help="tokens of context the model sees (default: its context length)")
    p.add_argument("--prompt-style", choices=[*PROMPT_STYLES, "none"], default=None,
                   help="wrap the prompt as an instruction in this template and print only the response, "
                        "up to end-of-text (default: the style an instruction-tuned checkpoint stores; "
                        "none: continue the text as it is)")
    p.add_argument("--input", default=None, help="the instruction's input (with a prompt style)")
    p.add_argument("--compile", action="store_true",
                   help="run the one-token decode steps as one compiled graph (torch.compile) where the "
                        "native CPU step does not take them (a GPU, a LoRA adapter, fp16): the same tokens, "
                        "faster per step after a compile of about a minute, so for long generations")
    p.set_defaults(func=cmd_generate)


def generation_task(args: argparse.Namespace) -> dict:
    """`model_task(args)` for a command that generates text: a classifier is refused."""
    task = model_task(args)
    if task.get("kind") == "classify":
        raise ValueError(f"{args.lora or args.checkpoint} is a classifier (labels: "
                         f"{', '.join(map(str, task['labels']))}); use `scratchgpt classify`")
    return task


def prompt_style_for(args: argparse.Namespace) -> str | None:
    """The prompt style to wrap what a person types in: --prompt-style, else the one an
    instruction-tuned checkpoint or adapter stores; None for plain continuation. A classifier
    is refused."""
    task = generation_task(args)
    style = args.prompt_style or task.get("prompt_style")
    return None if style == "none" else style


def cmd_generate(args: argparse.Namespace) -> None:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ValueError("empty prompt: give one as an argument or on stdin")
    style = prompt_style_for(args)
    if style is None and args.input is not None:
        raise ValueError("--input is the input of an instruction: it needs a prompt style (--prompt-style)")
    model, tokenizer = load_model_from_args(args)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    compile=args.compile)
    out = sys.stdout
    if style is not None:  # an instruction: its response only, up to end-of-text
        entry = {"instruction": prompt, "input": args.input or ""}
        pieces = stream_response(model, tokenizer, entry, style, args.max_new_tokens, **sampling)
    else:
        device = model.tok_emb.weight.device
        idx = torch.tensor([tokenizer.encode(prompt, allowed_special="all")], device=device)
        context_size = args.context_size or model.cfg.context_length
        out.write(prompt)
        tokens = generate_stream(model, idx, args.max_new_tokens or 50, context_size,
                                 eos_id=ENDOFTEXT_ID if args.eos else None, **sampling)
        pieces = decode_stream((int(token[0, 0]) for token in tokens), tokenizer)
    out.flush()
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")


# --------------------------------------------------------------------------- chat, classify

def add_chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to an instruction-tuned model in the terminal",
                       description="An interactive console: each line you type is wrapped in the model's prompt "
                                   "style (the one `train --task instruct` stored in its checkpoint, or "
                                   "--prompt-style) and answered, streaming, until end-of-text. Each message is "
                                   "answered on its own (the prompt styles are single-turn). Ctrl-D or /quit ends.")
    add_model_source_args(p)
    p.add_argument("--prompt-style", choices=list(PROMPT_STYLES), default=None,
                   help="the template (default: the checkpoint's; needed for a model not tuned here)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens per answer (default: until end-of-text or the context is full)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of mass p")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> None:
    style = prompt_style_for(args)
    if style is None:
        raise ValueError("this model stores no prompt style (it was not tuned with --task instruct); "
                         "pass --prompt-style to chat with it anyway")
    model, tokenizer = load_model_from_args(args)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(f"prompt style {style}; each message is answered on its own; Ctrl-D or /quit to leave", file=sys.stderr)
    while True:
        try:
            message = input("> ")
        except EOFError:
            break
        if message.strip() in ("/quit", "/exit"):
            break
        if not message.strip():
            continue
        for piece in stream_response(model, tokenizer, {"instruction": message}, style, args.max_new_tokens,
                                     **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def add_classify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="label texts with a classifier made by `train --task classify`",
                       description="Print the most likely label of each text and its probability (tab-separated; "
                                   "with several texts, the start of the text too). Texts come as arguments, "
                                   "from --file, or one per line on stdin.")
    p.add_argument("texts", nargs="*", help="the texts to classify")
    add_model_source_args(p)  # --checkpoint runs/x/best.pt (or model.pth), or a base with --lora adapter.pt
    p.add_argument("--file", help="texts from a file: one per line, or a column of a CSV, TSV or JSON (lines) file")
    p.add_argument("--text-column", default="text", help="the column of --file holding the text (default text)")
    p.add_argument("--label-column", default=None,
                   help="the column of --file holding the true labels: also print the accuracy")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    p.set_defaults(func=cmd_classify)


def cmd_classify(args: argparse.Namespace) -> None:
    task = model_task(args)
    if task.get("kind") != "classify":
        raise ValueError(f"{args.lora or args.checkpoint or 'this model'} is not a classifier: make one with "
                         f"`scratchgpt train --task classify`")
    labels, truth = task["labels"], None
    if args.label_column and (args.texts or not args.file):
        raise ValueError("--label-column reads the true labels from --file, without texts as arguments")
    if args.label_column:
        records = load_classification_data(args.file, args.text_column, args.label_column)
        check_labels(records, labels)
        texts, truth = [r["text"] for r in records.items], [r["label"] for r in records.items]
    elif args.file:
        texts = [*args.texts, *read_texts(args.file, args.text_column)]
    else:
        texts = args.texts or [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise ValueError("no text to classify: give texts as arguments, --file, or lines on stdin")
    model, tokenizer = load_model_from_args(args)
    probabilities = classify_probabilities(texts, model, tokenizer, batch_size=args.batch_size)
    predicted = [labels[i] for i in probabilities.argmax(dim=-1).tolist()]
    for text, label, row in zip(texts, predicted, probabilities):
        preview = f"\t{' '.join(text.split())[:60]}" if len(texts) > 1 else ""
        print(f"{label}\t{float(row.max()):.4f}{preview}")
    if truth is not None:
        right = sum(p == t for p, t in zip(predicted, truth))
        print(f"accuracy {right / len(truth):.2%} ({right} of {len(truth)})")


# --------------------------------------------------------------------------- vocab

def add_vocab_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vocab", help="provision the GPT-2 vocabulary offline from PyPI",
                       description="Fetch gpt2.tiktoken from the openai-whisper source package on PyPI, "
                                   "verify its sha256 and store it where get_tokenizer() looks.")
    p.add_argument("--dest", default=None, help="folder to store it in (default ~/.cache/scratchgpt)")
    p.set_defaults(func=cmd_vocab)


def cmd_vocab(args: argparse.Namespace) -> None:
    print(provision_vocab(args.dest))


# --------------------------------------------------------------------------- train, prepare

def add_text_source_args(parser: argparse.ArgumentParser) -> None:
    """Where the text comes from: a built-in corpus, or files, folders and globs."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--corpus", choices=list(BUILTIN_CORPORA),
                       help="a corpus every Python ships (pydoc: the Python reference topics, ~465 KB)")
    group.add_argument("--data", nargs="+", metavar="PATH",
                       help="UTF-8 text files, folders or globs (documents joined by <|endoftext|>); "
                            "for train also one token file made by `scratchgpt prepare`")
    parser.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict",
                        help="undecodable bytes: stop with an error naming file and offset (default), "
                             "or replace them with U+FFFD and warn")


TRAIN_EXAMPLES = """examples:
  # a small GPT on the Python docs, about 3 minutes on a laptop CPU (what `make demo` runs)
  scratchgpt train --corpus pydoc --n-layers 4 --emb-dim 256 --n-heads 4 --context-length 128 \\
      --max-steps 150 --lr 1e-3 --warmup 20 --eval-every 25 --out-dir runs/demo
  # your own text (files, folders or globs); add --resume to continue after a stop
  scratchgpt train --data notes/ --n-layers 4 --emb-dim 256 --n-heads 4 --context-length 128 --out-dir runs/mine
  # fine-tune OpenAI's GPT-2 (124M) on 256-token windows
  scratchgpt train --data notes/ --init gpt2:124M --context-length 256 --lr 1e-4 --max-steps 500 --out-dir runs/ft
  # the same with LoRA (rank 8 on query and value): 0.3M trainable parameters, writes adapter.pt
  scratchgpt train --data notes/ --init gpt2:124M --lora-rank 8 --context-length 256 --lr 1e-3 --out-dir runs/lora
  # a corpus larger than memory, on 4 GPUs
  scratchgpt prepare --data corpus/ --out data/corpus.bin
  torchrun --nproc_per_node 4 -m scratchgpt.cli train --data data/corpus.bin --preset 124M --out-dir runs/big
"""


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a GPT on your text (or fine-tune GPT-2)",
                       description="Pre-train a GPT from scratch or fine-tune GPT-2 on text. Writes last.pt,\n"
                                   "best.pt, model.pth (+ model.json), metrics.jsonl and loss.png to --out-dir.\nRuns "
                                   "unchanged under `torchrun --nproc_per_node N` (DistributedDataParallel).",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EXAMPLES)
    add_text_source_args(p)
    p.add_argument("--val-fraction", type=float, default=0.1, help="last part of the tokens kept for validation")
    model = p.add_argument_group("model (from scratch: a preset or JSON config, changed by the flags below)")
    model.add_argument("--preset", choices=list(GPT2_SIZES), default=None,
                       help="a GPT-2 shape (default: the seed's GPT_CONFIG_124M)")
    model.add_argument("--config", metavar="JSON", help="a seed-style config dict in a JSON file")
    model.add_argument("--n-layers", type=int, help="transformer blocks")
    model.add_argument("--emb-dim", type=int, help="embedding width")
    model.add_argument("--n-heads", type=int, help="attention heads (must divide --emb-dim)")
    model.add_argument("--context-length", type=int,
                       help="tokens per training window (and the model's context length from scratch)")
    model.add_argument("--drop-rate", type=float, help="dropout probability")
    model.add_argument("--init", metavar="gpt2:SIZE|PATH",
                       help="fine-tune these weights: OpenAI's GPT-2 (a size such as gpt2:124M, or its folder), "
                            "a Hugging Face GPT-2 folder or a scratchgpt checkpoint (runs/base/best.pt)")
    model.add_argument("--models-dir", help="where GPT-2 downloads are kept (for --init gpt2:SIZE)")
    lora = p.add_argument_group("LoRA (train small adapters on the frozen --init model; the run writes adapter.pt)")
    lora.add_argument("--lora-rank", type=int, help="rank of the adapters, e.g. 8: turns LoRA on")
    lora.add_argument("--lora-alpha", type=float,
                      help="the adapters add (alpha / rank) x A B to a layer's output (default 2 x rank)")
    lora.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0)")
    lora.add_argument("--lora-targets", nargs="+", metavar="LAYER",
                      help="layers to adapt: query key value out_proj ff_in ff_out out_head, all, or module "
                           "names such as trf_blocks.11.att.W_query (default: query value)")
    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default="runs/train", help="folder for checkpoints, metrics and plot")
    run.add_argument("--resume", action="store_true", help="continue exactly from --out-dir/last.pt")
    run.add_argument("--max-steps", type=int, default=1000, help="optimizer steps (the schedule spans them)")
    run.add_argument("--max-minutes", type=float, help="stop earlier, with a checkpoint, after this long")
    run.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro-step")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    run.add_argument("--lr", type=float, default=4e-4, help="peak learning rate")
    run.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr times this")
    run.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    run.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of 2-D weights")
    run.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    run.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="mixed precision (auto: bf16 or fp16 on CUDA, fp32 elsewhere)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--eval-every", type=int, default=100, help="evaluate, sample and checkpoint every N steps")
    run.add_argument("--eval-iters", type=int, default=10, help="batches per split per evaluation")
    run.add_argument("--sample-prompt", default="Every effort moves you", help="prompt of the samples")
    run.add_argument("--sample-tokens", type=int, default=40, help="tokens per sample")
    run.add_argument("--seed", type=int, default=123, help="seeds the weights, the data order and dropout")
    run.add_argument("--deterministic", action="store_true", help="bitwise reproducible (slower on GPU)")
    run.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    add_task_args(p)
    p.set_defaults(func=cmd_train)


def _init_source(init: str) -> str:
    """How a run names the weights it started from: gpt2:SIZE, or the absolute path of a folder or file."""
    size = init.removeprefix("gpt2:")
    return f"gpt2:{size}" if size in GPT2_SIZES else str(Path(init).resolve())


def _load_init(source: str, args: argparse.Namespace, overrides: dict) -> tuple[GPTModel, object | None]:
    """The model `--init` names (gpt2:SIZE, an OpenAI or HF GPT-2 folder, a checkpoint), with
    --drop-rate applied; and the folder's tokenizer when it has one."""
    shape = sorted(key for key in overrides if key != "drop_rate")
    if shape:
        raise ValueError(f"--init {source} fixes the model's shape; drop the flags that change it: {shape}")
    path = Path(source)
    if path.is_file() or (path / "config.json").is_file():  # a scratchgpt checkpoint or an HF folder
        model, tokenizer = load_model(detect_format(path), path), tokenizer_for_folder(path) if path.is_dir() else None
    else:  # a GPT-2 size or an OpenAI folder (load_gpt2 names what it is not)
        kwargs = {"models_dir": args.models_dir} if args.models_dir else {}
        model, tokenizer = load_gpt2(source.removeprefix("gpt2:"), device="cpu", **kwargs)
    if "drop_rate" in overrides:  # GPT-2 loads with dropout off; fine-tuning may want it back
        tuned = empty_model({**model.cfg.to_dict(), "drop_rate": overrides["drop_rate"]})
        tuned.load_state_dict(model.state_dict())  # every weight: no random initialisation needed
        model = tuned
    return model, tokenizer


def _train_model(args: argparse.Namespace, vocab_size: int) -> tuple[GPTModel, object | None, str | None]:
    """The model `train` starts from, GPT-2's tokenizer when --init loads one, and where it came from."""
    overrides = {key: value for key, value in (
        ("n_layers", args.n_layers), ("emb_dim", args.emb_dim), ("n_heads", args.n_heads),
        ("drop_rate", args.drop_rate)) if value is not None}
    last = Path(args.out_dir) / "last.pt"
    lora = args.lora_rank is not None
    if args.resume and last.is_file():
        state = safe_load(last)
        if is_adapter(state):  # a LoRA run: the base comes from where it came from, the adapter from last.pt
            if not lora:
                raise ValueError(f"{last} is a LoRA run ({describe_lora(state['layers'])}): resume it with the "
                                 f"same --lora-* flags")
            source = _init_source(args.init) if args.init else state["base"]["source"]
            if source is None:
                raise ValueError(f"{last} does not name its base: give it with --init")
            return (*_load_init(source, args, overrides), source)
        if lora:
            raise ValueError(f"{last} is not a LoRA run: resume it without the --lora-* flags")
        cfg = {**state["config"], **overrides}  # the checkpoint's shape; its weights are loaded by the Trainer
        return GPTModel(cfg), None, state.get("train_config", {}).get("init")
    if args.init:
        source = _init_source(args.init)
        return (*_load_init(source, args, overrides), source)
    if lora:
        raise ValueError("--lora-rank adapts a trained model: name it with --init "
                         "(gpt2:SIZE, a GPT-2 folder or a scratchgpt checkpoint)")
    if args.config:
        cfg = json.loads(Path(args.config).read_text())
        if not isinstance(cfg, dict):
            raise ValueError(f"{args.config}: a config must be a JSON object of seed-style keys")
    elif args.preset:
        cfg = gpt2_config(args.preset)
    else:
        cfg = dict(GPT_CONFIG_124M)
    cfg.update(overrides, vocab_size=vocab_size)
    if args.context_length:
        cfg["context_length"] = args.context_length
    torch.manual_seed(args.seed)
    return GPTModel(cfg), None, None


def _check_lora_flags(args: argparse.Namespace) -> None:
    """LoRA flags make sense together and with --lora-rank; checked before any model loads."""
    if args.lora_rank is None:
        given = [flag for flag, value in (("--lora-alpha", args.lora_alpha), ("--lora-dropout", args.lora_dropout),
                                          ("--lora-targets", args.lora_targets)) if value is not None]
        if given:
            raise ValueError(f"{given[0]} needs --lora-rank")
        return
    check_lora_hyperparameters(args.lora_rank, _lora_alpha(args), args.lora_dropout or 0.0)


def _lora_alpha(args: argparse.Namespace) -> float:
    return args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank


def _add_lora(model: GPTModel, args: argparse.Namespace, keep_training: list[str]) -> None:
    """Wrap the --lora-targets layers and freeze the rest, except `keep_training` (what a task added)."""
    torch.manual_seed(args.seed)  # the adapters' random A: the same in every run of the same command
    replace_linear_with_lora(model, args.lora_rank, _lora_alpha(args), targets=args.lora_targets or ("query", "value"),
                             dropout=args.lora_dropout or 0.0, modules_to_save=keep_training)


def _train_config(args: argparse.Namespace, init_source: str | None) -> TrainConfig:
    return TrainConfig(
        out_dir=args.out_dir, batch_size=args.batch_size, grad_accum=args.grad_accum,
        context_length=args.context_length, max_steps=args.max_steps, max_minutes=args.max_minutes,
        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, dtype=args.dtype, compile=args.compile, eval_every=args.eval_every,
        eval_iters=args.eval_iters, sample_prompt=args.sample_prompt, sample_tokens=args.sample_tokens,
        seed=args.seed, deterministic=args.deterministic, device=args.device, resume=args.resume, init=init_source)


def _check_vocab(model: GPTModel, tokenizer) -> None:
    if model.cfg.vocab_size < tokenizer.n_vocab:
        raise ValueError(f"the model's vocab_size {model.cfg.vocab_size} is smaller than the GPT-2 tokenizer's "
                         f"{tokenizer.n_vocab}: its token ids would not fit")


def _prepare_model(model: GPTModel, args: argparse.Namespace, task: object | None = None) -> None:
    """A task's changes to the model (a classifier's new head and what trains), then LoRA over
    them: what the task added keeps training in full."""
    loaded = {id(p) for p in model.parameters()}
    if isinstance(task, ClassifyTask):
        torch.manual_seed(args.seed)  # the new head's initial weights
        replace_head(model, len(task.meta["labels"]))
        if args.lora_rank is None:
            set_trainable_layers(model, args.train_layers or "last-1")
        elif args.train_layers is not None:
            raise ValueError("--train-layers chooses what trains without LoRA; with --lora-rank the adapters "
                             "and the new head train (--lora-targets chooses the layers)")
    if args.lora_rank is not None:
        _add_lora(model, args, [name for name, p in model.named_parameters() if id(p) not in loaded])


def _print_lora(trainer: Trainer, args: argparse.Namespace) -> None:
    if args.lora_rank is not None:
        total = count_parameters(trainer.raw_model)["untied"]
        trainable = sum(p.numel() for p in trainer.raw_model.parameters() if p.requires_grad)
        print(f"LoRA: {describe_lora(lora_settings(trainer.raw_model))} | {trainable:,} trainable parameters "
              f"({trainable / total:.2%}); the base is frozen")


def _run(trainer: Trainer, args: argparse.Namespace) -> TrainResult:
    """Train, always leaving the process group; an interrupted run (saved) exits as interrupted;
    the main process says what the run wrote."""
    try:
        result = trainer.train()
    finally:
        shutdown_distributed()
    if result.interrupted:
        raise KeyboardInterrupt
    if trainer.dist.is_main:
        best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.3f}"
        final = "adapter.pt" if args.lora_rank is not None else "model.pth + model.json"
        print(f"done: step {result.step}, {result.tokens_seen:,} tokens; best val loss "
              f"{best}; wrote {args.out_dir}/ (last.pt, best.pt, {final}, loss.png)")
    return result


def cmd_train(args: argparse.Namespace) -> None:
    _check_lora_flags(args)
    if args.task != "lm":
        cmd_train_task(args)
        return
    tokenizer = get_tokenizer()
    token_files = [path for path in args.data or () if is_token_file(path)]
    if token_files and len(args.data) > 1:
        raise ValueError("--data takes either one token file (from `scratchgpt prepare`) or text files")
    if token_files:
        tokens = open_token_file(token_files[0])
    else:
        text = load_corpus(args.data or (), args.corpus, args.encoding_errors)
        tokens = np.asarray(tokenizer.encode(text, allowed_special={ENDOFTEXT}), dtype=np.uint16)
    train_tokens, val_tokens = split_tokens(tokens, args.val_fraction)
    model, gpt2_tokenizer, init_source = _train_model(args, tokenizer.n_vocab)
    _check_vocab(model, tokenizer)
    _prepare_model(model, args)
    trainer = Trainer(model, (train_tokens, val_tokens), _train_config(args, init_source),
                      tokenizer=gpt2_tokenizer or tokenizer)
    if trainer.dist.is_main:
        counts = count_parameters(trainer.raw_model)
        print(f"{counts['untied']:,} parameters | {len(train_tokens):,} train and {len(val_tokens):,} val tokens"
              f" | {trainer.global_batch} x {trainer.task.window} tokens per step | device {trainer.device}")
        _print_lora(trainer, args)
    _run(trainer, args)


# --------------------------------------------------------------------------- train --task instruct|classify

def add_task_args(parser: argparse.ArgumentParser) -> None:
    """Options of the fine-tuning tasks (`--task instruct|classify --data FILE`)."""
    task = parser.add_argument_group(
        "fine-tuning tasks (--task instruct|classify --data FILE: a JSON list, JSON lines, CSV or TSV)")
    task.add_argument("--task", choices=["lm", "instruct", "classify"], default="lm",
                      help="lm: next-token prediction on text (default); instruct: follow instructions "
                           "(records with instruction, optional input, output); classify: label texts")
    task.add_argument("--val-data", metavar="FILE",
                      help="validation records (default: a seeded --val-fraction of --data)")
    task.add_argument("--on-long", choices=list(ON_LONG), default="truncate",
                      help="records longer than the context: truncate them (default; reported) or refuse to start")
    task.add_argument("--prompt-style", choices=list(PROMPT_STYLES), default="alpaca",
                      help="instruct: the prompt template (default alpaca, the walkthrough's); a record's own "
                           "prompt_style field wins")
    task.add_argument("--mask-prompt", action="store_true",
                      help="instruct: learn only the responses (the prompt tokens are not scored)")
    task.add_argument("--responses", metavar="FILE|none",
                      help="instruct: where to write the model's responses to the validation records after "
                           "training (default: beside --data, NAME-with-response.json; none: skip)")
    task.add_argument("--text-column", default="text", help="classify: the column holding the text (default text;"
                      " a number for a file without a header row)")
    task.add_argument("--label-column", default="label", help="classify: the column holding the label (default label)")
    task.add_argument("--train-layers", default=None, metavar="all|last-N",
                      help="classify: what trains besides the new head: the last N blocks and the final norm "
                           "(default last-1, the walkthrough's), or all (with LoRA: the adapters)")
    task.add_argument("--balance", action="store_true",
                      help="classify: undersample every class to the size of the smallest, as the walkthrough does")


def _build_task(args: argparse.Namespace, tokenizer, max_length: int) -> InstructTask | ClassifyTask:
    if args.corpus or len(args.data) != 1:
        raise ValueError(f"--task {args.task} reads its records from one file: --data FILE")
    common = dict(val_fraction=args.val_fraction, seed=args.seed, on_long=args.on_long)
    if args.task == "instruct":
        return InstructTask.from_files(args.data[0], args.val_data, tokenizer, max_length, **common,
                                       prompt_style=args.prompt_style, mask_prompt=args.mask_prompt)
    return ClassifyTask.from_files(args.data[0], args.val_data, tokenizer, max_length, **common,
                                   text_column=args.text_column, label_column=args.label_column,
                                   balance_classes=args.balance)


def cmd_train_task(args: argparse.Namespace) -> None:
    """Fine-tune for instructions or classification: the same Trainer, with the task's data and loss."""
    tokenizer = get_tokenizer()
    model, gpt2_tokenizer, init_source = _train_model(args, tokenizer.n_vocab)
    tokenizer = gpt2_tokenizer or tokenizer
    _check_vocab(model, tokenizer)
    max_length = min(args.context_length or model.cfg.context_length, model.cfg.context_length)
    task = _build_task(args, tokenizer, max_length)
    _prepare_model(model, args, task)
    trainer = Trainer(model, task, _train_config(args, init_source), tokenizer=tokenizer)
    if trainer.dist.is_main:
        for note in task.notes:
            print(note)
        trained = sum(p.numel() for p in trainer.raw_model.parameters() if p.requires_grad)
        labels = f" | labels {', '.join(map(str, task.meta['labels']))}" if isinstance(task, ClassifyTask) else ""
        print(f"{count_parameters(trainer.raw_model)['untied']:,} parameters ({trained:,} trained) | "
              f"{task.eval_size('train'):,} train and {task.eval_size('val'):,} val records{labels} | "
              f"{trainer.global_batch} records per step | device {trainer.device}")
        _print_lora(trainer, args)
    _run(trainer, args)
    if not trainer.dist.is_main:
        return
    if isinstance(task, ClassifyTask):  # the walkthrough's closing numbers, over every record
        for split in ("train", "val"):
            loader = DataLoader(task.datasets[split], batch_size=args.batch_size,
                                collate_fn=partial(classification_collate_fn, allowed_max_length=max_length))
            print(f"{split} accuracy {calc_accuracy_loader(loader, trainer.raw_model, trainer.device):.2%} "
                  f"({task.eval_size(split):,} records)")
    elif args.responses != "none":
        path = args.responses or responses_path(args.data[0])
        write_responses(path, trainer.raw_model, tokenizer, task.records["val"], args.prompt_style)
        print(f"wrote the responses to the {task.eval_size('val'):,} validation records to {path}")


def add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a large corpus into a token file for train",
                       description="Tokenize text with GPT-2's BPE in parallel into a memory-mapped uint16 "
                                   "token file (plus FILE.json metadata) that `train --data FILE` streams "
                                   "from disk.")
    add_text_source_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="the token file to write (e.g. data/tokens.bin)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per core)")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> None:
    meta = prepare_token_file(args.out, args.data or (), args.corpus, args.encoding_errors, args.workers)
    print(f"wrote {meta['tokens']:,} tokens to {args.out} (metadata in {args.out}.json)")


# --------------------------------------------------------------------------- main

# --------------------------------------------------------------------------- download / convert

def add_download_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch OpenAI's GPT-2 weights (resumable, verified sizes)",
                       description="Fetch OpenAI's seven GPT-2 files into MODELS_DIR/SIZE. Interrupted downloads "
                                   "resume; files already complete are not fetched again.")
    p.add_argument("size", choices=list(GPT2_SIZES), help="which GPT-2")
    p.add_argument("--models-dir", default="gpt2", help="parent folder of the model folder (default ./gpt2)")
    p.add_argument("--base-url", default=None,
                   help="server holding <base>/<size>/<file> (default $SCRATCHGPT_GPT2_BASE_URL or OpenAI's bucket)")
    p.add_argument("--retries", type=int, default=5, help="retries per file on connection errors and 5xx")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> None:
    print(download_gpt2_files(args.size, args.models_dir, base_url=args.base_url, retries=args.retries))


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a model between OpenAI, Hugging Face and checkpoint formats",
                       description="Convert a GPT-2 between an OpenAI folder (TensorFlow checkpoint, no TensorFlow "
                                   "needed), a Hugging Face folder (safetensors) and a scratchgpt checkpoint file; "
                                   "merge a LoRA adapter into its base (--merge-lora); convert a LoRA adapter "
                                   "between a scratchgpt adapter file and a Hugging Face PEFT folder.")
    p.add_argument("src", help="the model to convert (folder or checkpoint file)")
    p.add_argument("dst", help="where to write the converted model")
    p.add_argument("--from", dest="src_format", choices=FORMATS, default=None,
                   help="format of SRC (default: detected from its files)")
    p.add_argument("--to", dest="dst_format", choices=FORMATS + ADAPTER_FORMATS, required=True,
                   help="format to write; for LoRA adapters: peft (a Hugging Face PEFT adapter folder) or "
                        "lora (a scratchgpt adapter file)")
    p.add_argument("--merge-lora", metavar="ADAPTER",
                   help="fold this LoRA adapter (file or PEFT folder) into SRC, its base, and write a plain model")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> None:
    if args.dst_format in ADAPTER_FORMATS:
        if args.merge_lora:
            raise ValueError(f"--merge-lora writes a model: choose --to {' or '.join(FORMATS)}")
        print(convert_adapter(args.src, args.dst, args.dst_format))
        return
    print(convert(args.src, args.dst, args.dst_format, args.src_format, lora=args.merge_lora))


# --------------------------------------------------------------------------- eval

def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and bits per byte of a model on a text",
                       description="Score every token of a text after the first, exactly once, with a sliding "
                                   "window: windows of --context-size tokens start --stride tokens apart and each "
                                   "token is scored in the first window that gives it the most left context. "
                                   "Prints the mean loss (nats/token), perplexity, bits per byte, perplexity per "
                                   "word (the GPT-2 paper's unit) and the number of tokens scored.")
    add_model_source_args(p)
    add_text_source_args(p)
    p.add_argument("--context-size", type=int, default=None,
                   help="tokens per window (default: the model's context length)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts, 1..context size (default: half the context size); "
                        "smaller is slower and gives each token more context")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--autocast", choices=["bf16", "fp16"], default=None,
                   help="run the model under autocast in this format (the weights keep --dtype)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    text = load_corpus(args.data or (), args.corpus, args.encoding_errors)
    model, tokenizer = load_model_from_args(args)
    token_ids = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    # <|endoftext|> joins documents as one special token: it is not text, so it counts as no bytes or words.
    num_bytes = len(text.encode("utf-8")) - text.count(ENDOFTEXT) * len(ENDOFTEXT.encode("utf-8"))
    num_words = len(text.replace(ENDOFTEXT, " ").split())
    result = evaluate_perplexity(model, token_ids, args.context_size, args.stride, args.batch_size,
                                 num_bytes=max(num_bytes, 1), num_words=max(num_words, 1), dtype=args.autocast)
    if args.json:
        print(json.dumps(result))
        return
    windows = f"{result['windows']:,} window" + ("s" if result["windows"] > 1 else "")
    print(f"tokens scored        {result['tokens']:,} (context {result['context_size']}, stride {result['stride']}: "
          f"{windows})")
    print(f"loss                 {result['loss']:.4f} nats/token")
    print(f"perplexity           {result['perplexity']:.2f}")
    print(f"bits per byte        {result['bits_per_byte']:.4f} ({result['bytes']:,} bytes)")
    print(f"perplexity per word  {result['word_perplexity']:.2f} ({result['words']:,} whitespace-separated words)")


# --------------------------------------------------------------------------- serve

def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a web playground",
                       description="Serve a model to many clients at once (continuous batching) over OpenAI's "
                                   "/v1/completions and /v1/chat/completions, with a playground page at /. "
                                   "Needs the serve extra: pip install 'scratchgpt[serve]'.")
    add_model_source_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences generated together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait for a free slot; past that, 429 (default 64)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API (default: no key)")
    p.set_defaults(func=cmd_serve)


def served_model_name(args: argparse.Namespace) -> str:
    """The model id clients send: what the command line named."""
    if args.gpt2:
        return f"gpt2-{args.gpt2}" if args.gpt2 in GPT2_SIZES else args.gpt2
    return args.checkpoint or args.hf or f"preset-{args.preset}"


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from .serve.api import ServeState, run_server
    except ImportError as exc:
        raise RuntimeError(f"serve needs FastAPI and uvicorn ({exc}): pip install 'scratchgpt[serve]'") from None
    from .serve.chat import template_for_task
    from .serve.engine import Engine

    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {args.max_batch} and {args.max_queue}")

    def load():
        template = template_for_task(generation_task(args))
        model, tokenizer = load_model_from_args(args)
        return Engine(model, tokenizer, args.max_batch, args.max_queue), template

    run_server(ServeState(served_model_name(args), api_key=args.api_key), args.host, args.port, load,
               announce=lambda line: print(line, flush=True))


PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_generate_parser,
    add_vocab_parser,
    add_train_parser,
    add_prepare_parser,
    add_download_parser,
    add_convert_parser,
    add_eval_parser,
    add_serve_parser,
    add_chat_parser,
    add_classify_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchgpt", description="GPT-2 from scratch: train, generate, evaluate, load OpenAI's weights.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    for verb in sub.choices.values():  # `scratchgpt VERB --debug` works as well as `scratchgpt --debug VERB`
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show full tracebacks on errors")
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
