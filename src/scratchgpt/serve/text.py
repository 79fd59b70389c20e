"""From a sequence's new tokens to text that is safe to send: whole characters, no stop string.

GPT-2's byte-level BPE splits non-ASCII characters across tokens ("é" may be two
tokens of one byte each), so a token's bytes are decoded incrementally and a
character is released only once all its bytes have arrived. Text that could
still grow into a stop string is held back until it can't; a stop string
ends the text and is never part of it. Streaming and non-streaming answers
both come from here, so they are the same text.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, Sequence

import tiktoken


def token_bytes(tokenizer: tiktoken.Encoding, token_id: int) -> bytes:
    """The bytes one token stands for; a ValueError names an id the tokenizer does not know."""
    try:
        return tokenizer.decode_single_token_bytes(token_id)
    except KeyError:
        raise ValueError(f"the model produced token id {token_id}, which the tokenizer cannot decode "
                         f"(its vocabulary has {tokenizer.n_vocab} tokens)") from None


def token_text(tokenizer: tiktoken.Encoding, token_id: int) -> str:
    """One token as text for log-probability listings: its characters, or OpenAI's
    `bytes:\\xe2\\x80` form when it holds only part of a character."""
    data = token_bytes(tokenizer, token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


@dataclass
class Piece:
    """What one step releases: new text and the tokens now wholly accounted for.

    `tokens` pairs each released token's payload with the character offset where
    its text starts in the completion. `stopped` says a stop string ended the text.
    """

    text: str = ""
    tokens: list[tuple[int, Any]] = field(default_factory=list)
    stopped: bool = False


class TextStream:
    """Incremental detokenizer for one sequence, with stop strings held back."""

    def __init__(self, tokenizer: tiktoken.Encoding, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # every complete character decoded so far
        self.sent = 0  # characters of `text` released
        self._pending: list[tuple[int, int, Any]] = []  # (start, end, payload) of unreleased tokens

    def push(self, token_id: int, payload: Any = None) -> Piece:
        """Add one token (with an opaque payload returned when it is released)."""
        start = len(self.text)
        self.text += self._decoder.decode(token_bytes(self.tokenizer, token_id))
        self._pending.append((start, len(self.text), payload))
        return self._release()

    def finish(self) -> Piece:
        """The sequence ended (length or end-of-text): release everything left, a stop string excepted."""
        self.text += self._decoder.decode(b"", final=True)  # an unfinished character becomes U+FFFD
        return self._release(final=True)

    def _release(self, final: bool = False) -> Piece:
        # A stop string can only begin in text not yet sent: what was sent never held the start of one.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if found:
            cut = min(found)
            tokens = [(start, payload) for start, _, payload in self._pending if start < cut]
            piece = Piece(self.text[self.sent:cut], tokens, stopped=True)
            self.text, self.sent, self._pending = self.text[:cut], cut, []
            return piece
        upto = len(self.text) if final else len(self.text) - self._held_back()
        ready = [(start, payload) for start, end, payload in self._pending if end <= upto]
        self._pending = [p for p in self._pending if p[1] > upto]
        piece = Piece(self.text[self.sent:upto], ready)
        self.sent = upto
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that are the beginning of some stop string."""
        unsent = len(self.text) - self.sent
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, unsent), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
