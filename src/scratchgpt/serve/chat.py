"""Chat messages -> one prompt, for models that only continue text.

The default template is a plain transcript, one line per message, ending where
the assistant speaks next:

    System: You answer in one sentence.
    User: What does the with statement do?
    Assistant:

The model continues after the last `Assistant:` and stops where it would start
another turn (a new line beginning `User:`, `System:` or `Assistant:`) or at
`<|endoftext|>`. A checkpoint fine-tuned on instructions records its prompt
style (`task = {"kind": "instruct", "prompt_style": "alpaca"}`, see
tasks/instruct.py); then the conversation's one user message is the instruction,
wrapped in that style, and the model stops at `<|endoftext|>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..tasks.instruct import PROMPT_STYLES, format_prompt
from .engine import InvalidRequest

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class ChatTemplate:
    """Turns (role, text) pairs into a prompt, and says where the answer ends."""

    name: str
    render: Callable[[list[tuple[str, str]]], str]
    stop: tuple[str, ...] = ()


def _transcript(messages: list[tuple[str, str]]) -> str:
    return "".join(f"{ROLES[role]}: {text}\n" for role, text in messages) + "Assistant:"


TRANSCRIPT = ChatTemplate("transcript", _transcript, stop=("\nUser:", "\nSystem:", "\nAssistant:"))


def instruction_template(style: str) -> ChatTemplate:
    """The template of a checkpoint tuned on instructions with prompt style `style`
    (see tasks/instruct.py): one user message is the instruction."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown instruction prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")

    def render(messages: list[tuple[str, str]]) -> str:
        roles = [role for role, _ in messages]
        if roles != ["user"]:
            raise InvalidRequest("messages", f"this model was tuned on the {style!r} instruction prompt: send one "
                                             f"user message (the instruction), not the roles {roles}")
        return format_prompt({"instruction": messages[0][1], "input": ""}, style)

    return ChatTemplate(style, render)


def template_for_task(task: dict[str, Any]) -> ChatTemplate:
    """The chat template for a checkpoint's `task` entry: its instruction prompt style, else the transcript."""
    if task.get("kind") == "instruct":
        return instruction_template(task.get("prompt_style", "alpaca"))
    return TRANSCRIPT


def message_texts(messages: Any) -> list[tuple[str, str]]:
    """Check OpenAI's `messages` and return (role, text) pairs; text parts of a content list are joined."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "messages must be a non-empty list of {role, content} objects")
    pairs = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest("messages", f"{where} must be an object with role and content")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise InvalidRequest("messages", f"{where} has unsupported fields: {', '.join(unknown)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidRequest("messages", f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise InvalidRequest("messages", f"{where}.content[{j}] must be a text part "
                                                     f"({{\"type\": \"text\", \"text\": ...}}), got {kind!r}")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidRequest("messages", f"{where}.content must be a string or a list of text parts")
        pairs.append((role, content))
    return pairs
