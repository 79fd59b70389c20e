"""Instruction fine-tuning (the walkthrough's chapter 7): prompt styles.

A record is `{"instruction": ..., "input": ... (optional), "output": ...}`. A prompt
style turns a record into the text before the response; the model learns to
continue it with the output and one <|endoftext|>. The style a model was tuned
with is stored in its checkpoints (the `task` entry), so that `generate`, `chat`
and `serve` wrap what a person types in the same way.
"""

from __future__ import annotations

from typing import Callable, Mapping

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
