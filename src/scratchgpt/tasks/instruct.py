"""Instruction fine-tuning (the walkthrough's chapter 7): prompt styles, data, collate, task, responses.

A record is `{"instruction": ..., "input": ... (optional), "output": ...}`, optionally with its
own `prompt_style`. A prompt style turns a record into the text before the response; the
model learns to continue it with the output and one <|endoftext|> (`custom_collate_fn`), so
that it stops. The style a model was tuned with is stored in its checkpoints (the `task`
entry), so that `generate`, `chat` and `serve` wrap what a person types in the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import tiktoken
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..checkpoint import unwrap_model
from ..fileio import atomic_write
from ..generate import generate_stream
from ..losses import chunked_head_cross_entropy, logits_cross_entropy, vocab_head
from ..tokenizer import ENDOFTEXT_ID, decode_stream
from .base import Batch, ExampleTask
from .records import Records, long_records, read_records, train_val_records

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


def format_input(entry: Mapping[str, str]) -> str:
    """The walkthrough's Alpaca prompt without its response header: preamble, instruction,
    and the input only when it is non-empty."""
    instruction_text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def _alpaca(entry: Mapping[str, str]) -> str:
    return format_input(entry) + "\n\n### Response:\n"


def _phi3(entry: Mapping[str, str]) -> str:
    """The walkthrough's exercise 7.1 style: shorter, so more of the context is left for the answer."""
    text = entry["instruction"] + (f"\n{entry['input']}" if entry.get("input") else "")
    return f"<|user|>\n{text}\n<|assistant|>\n"


#: style name -> record -> the prompt text up to where the response starts
PROMPT_STYLES: dict[str, Callable[[Mapping[str, str]], str]] = {"alpaca": _alpaca, "phi3": _phi3}


def format_prompt(entry: Mapping[str, str], style: str = "alpaca") -> str:
    """The text a model tuned with `style` sees before its response to `entry`."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[style](entry)


# --------------------------------------------------------------------------- data

def check_instruction_records(records: Records) -> None:
    """Raise naming the file and line of the first record that is not a usable instruction:
    `instruction` and `output` non-empty strings, `input` (optional) a string, `prompt_style`
    (optional) a known style."""
    for i, entry in enumerate(records.items):
        for name in ("instruction", "output"):
            if name not in entry:
                raise records.error(i, f"missing field {name!r} (fields: {', '.join(entry) or 'none'})")
            if not isinstance(entry[name], str):
                raise records.error(i, f"field {name!r} must be a string, got {type(entry[name]).__name__}")
            if not entry[name].strip():
                raise records.error(i, f"empty {name!r}")
        if entry.get("input") is not None and not isinstance(entry["input"], str):
            raise records.error(i, f"field 'input' must be a string, got {type(entry['input']).__name__}")
        style = entry.get("prompt_style")
        if style is not None and style not in PROMPT_STYLES:
            raise records.error(i, f"unknown prompt_style {style!r}; known: {', '.join(PROMPT_STYLES)}")


def load_instruction_data(path: str | os.PathLike) -> Records:
    """The instruction records of a JSON list, JSON lines, CSV or TSV file, checked."""
    records = read_records(path)
    check_instruction_records(records)
    return records


class InstructionDataset(Dataset):
    """The walkthrough's InstructionDataset: each record as the token ids of its prompt
    (in the record's own `prompt_style`, else `prompt_style`) followed by its output.

    Prompt and output are encoded apart, so the prompt's tokens are exactly those that
    generation later sees; `prompt_lengths` says where each output starts (for masking).
    Text is encoded as text: a literal "<|endoftext|>" in a record is not the end-of-text token.
    """

    def __init__(self, data: Sequence[Mapping[str, str]], tokenizer: tiktoken.Encoding,
                 prompt_style: str = "alpaca"):
        self.data = data
        self.encoded_texts: list[list[int]] = []
        self.prompt_lengths: list[int] = []
        for entry in data:
            prompt = tokenizer.encode_ordinary(format_prompt(entry, entry.get("prompt_style") or prompt_style))
            self.encoded_texts.append(prompt + tokenizer.encode_ordinary(entry["output"]))
            self.prompt_lengths.append(len(prompt))

    def __getitem__(self, index: int) -> list[int]:
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.data)


def custom_collate_fn(batch: Sequence[Sequence[int]], pad_token_id: int = ENDOFTEXT_ID, ignore_index: int = -100,
                      allowed_max_length: int | None = None, device: str | torch.device = "cpu",
                      prompt_lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The walkthrough's collate: (inputs, targets) [B, T] from examples of token ids.

    Each example gets one end-of-text token (`pad_token_id`, 50256) and is padded with it to
    the longest; targets are the inputs shifted by one, `ignore_index` (-100) at the padding
    but not at the first end-of-text, so the model learns to stop. With `prompt_lengths`
    (mask-prompt), the targets inside each prompt are ignored too: only the response is
    learned. `allowed_max_length` truncates (an example cut there has no end-of-text left).
    """
    length = max(len(item) for item in batch)  # each example + its end-of-text, less the shift by one
    inputs = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    targets = torch.full((len(batch), length), ignore_index, dtype=torch.long)
    for row, item in enumerate(batch):
        tokens = torch.tensor([*item, pad_token_id], dtype=torch.long)
        inputs[row, :len(item)] = tokens[:-1]
        targets[row, :len(item)] = tokens[1:]  # ends with the one end-of-text that is learned
        if prompt_lengths is not None:
            targets[row, :prompt_lengths[row] - 1] = ignore_index  # predictions of the prompt's own tokens
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs.to(device), targets.to(device)


def instruction_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     device: torch.device | str) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the targets that are not -100, how many there are).

    The value of `calc_loss_batch`, but the output head runs only at the scored positions
    (padding and masked prompts cost no vocabulary-sized logits), in chunks where
    `losses.vocab_head` allows. A batch with nothing to score gives a zero loss.
    """
    inputs, targets = inputs.to(device), targets.to(device)
    scored = targets != -100
    hidden = model(inputs, return_hidden=True)[scored]  # [N, E], final-normed
    count = int(scored.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0  # still a graph, as every process under DDP needs one
    plain = unwrap_model(model)
    head = vocab_head(plain)
    if head is None:  # a LoRA-wrapped head, say
        return logits_cross_entropy(plain.out_head(hidden), targets[scored]), count
    return chunked_head_cross_entropy(hidden, head.weight, targets[scored]), count


# --------------------------------------------------------------------------- the task

class InstructTask(ExampleTask):
    """Instruction fine-tuning: next-token loss on prompt + output + end-of-text, padded per batch.

    `max_length` is the longest example (tokens) a batch may hold, the model's context at most;
    longer ones are truncated or, with on_long="refuse", an error (`notes` reports them).
    """

    def __init__(self, train: Records, val: Records, tokenizer: tiktoken.Encoding, max_length: int,
                 prompt_style: str = "alpaca", mask_prompt: bool = False, seed: int = 123,
                 on_long: str = "truncate"):
        format_prompt({"instruction": ""}, prompt_style)  # an unknown style fails here, before any work
        self.meta = {"kind": "instruct", "prompt_style": prompt_style}
        self.records = {"train": train, "val": val}
        self.datasets = {split: InstructionDataset(recs.items, tokenizer, prompt_style)
                         for split, recs in self.records.items()}
        self.max_length, self.mask_prompt, self.seed = max_length, mask_prompt, seed
        self.notes = [note for split, recs in self.records.items()
                      for note in long_records(recs, [len(t) for t in self.datasets[split].encoded_texts],
                                               max_length, on_long)]

    @classmethod
    def from_files(cls, data: str | os.PathLike, val_data: str | os.PathLike | None, tokenizer: tiktoken.Encoding,
                   max_length: int, val_fraction: float = 0.1, seed: int = 123, **options: Any) -> "InstructTask":
        """The task on a file's records: `val_data`'s for validation, else a seeded `val_fraction` of them.
        `options`: prompt_style, mask_prompt, on_long."""
        train, val = train_val_records(load_instruction_data, data, val_data, val_fraction, seed)
        return cls(train, val, tokenizer, max_length, seed=seed, **options)

    def _batch(self, split: str, indices: Sequence[int]) -> Batch:
        dataset = self.datasets[split]
        prompts = [dataset.prompt_lengths[i] for i in indices] if self.mask_prompt else None
        return custom_collate_fn([dataset[i] for i in indices], allowed_max_length=self.max_length,
                                 prompt_lengths=prompts)


    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
        inputs, targets = batch
        return instruction_loss(model, inputs, targets, device)

    def sample(self, model: nn.Module, tokenizer: tiktoken.Encoding | None, prompt: str,
               max_new_tokens: int, seed: int) -> str | None:
        """The greedy response to the first validation record (the walkthrough's sample)."""
        if tokenizer is None:
            return None
        entry = self.records["val"].items[0]
        return generate_response(model, tokenizer, entry, entry.get("prompt_style") or self.meta["prompt_style"],
                                 max_new_tokens)


# --------------------------------------------------------------------------- responses

def stream_response(model: nn.Module, tokenizer: tiktoken.Encoding, entry: Mapping[str, str],
                    prompt_style: str = "alpaca", max_new_tokens: int | None = None, **sampling: Any
                    ) -> Iterator[str]:
    """The model's response to `entry` as text pieces, as they are generated, until end-of-text
    or `max_new_tokens` (default: as many as the context has room for after the prompt).
    `sampling`: generate's temperature, top_k, top_p, seed (default greedy)."""
    device = model.tok_emb.weight.device
    prompt = tokenizer.encode_ordinary(format_prompt(entry, prompt_style))
    context = model.cfg.context_length
    if max_new_tokens is None:
        max_new_tokens = max(1, context - len(prompt))
    idx = torch.tensor([prompt[-context:]], device=device)
    tokens = (int(t) for t in generate_stream(model, idx, max_new_tokens, context, eos_id=ENDOFTEXT_ID,
                                              **sampling))
    return decode_stream(tokens, tokenizer)


def generate_response(model: nn.Module, tokenizer: tiktoken.Encoding, entry: Mapping[str, str],
                      prompt_style: str = "alpaca", max_new_tokens: int | None = None, **sampling: Any) -> str:
    """The whole response to `entry`, stripped of surrounding whitespace (as the walkthrough does)."""
    return "".join(stream_response(model, tokenizer, entry, prompt_style, max_new_tokens, **sampling)).strip()


def responses_path(data_path: str | os.PathLike) -> Path:
    """Where the validation responses go: beside the data, as the walkthrough's
    instruction-data.json -> instruction-data-with-response.json."""
    path = Path(data_path)
    return path.with_name(f"{path.stem}-with-response.json")


def write_responses(path: str | os.PathLike, model: nn.Module, tokenizer: tiktoken.Encoding,
                    records: Records, prompt_style: str = "alpaca", progress: bool = True) -> Path:
    """Generate a greedy response to every record and write the records, each with its
    `model_response`, as one JSON list (the walkthrough's file for judging the model)."""
    was_training = model.training
    model.eval()
    out = []
    for entry in tqdm(records.items, desc="responses", disable=not progress, leave=False):
        response = generate_response(model, tokenizer, entry, entry.get("prompt_style") or prompt_style)
        out.append({**entry, "model_response": response})
    model.train(was_training)
    with atomic_write(path) as f:
        f.write(json.dumps(out, indent=4, ensure_ascii=False).encode() + b"\n")
    return Path(path)
