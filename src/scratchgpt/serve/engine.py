"""Continuous batching: one thread owns the model and advances every running sequence at once.

A request waits in a queue until one of `max_batch` slots is free. The slot is a
row of a ragged KVCache: the prompt is prefilled alone into that row
(`cache.rows(slot, slot + 1)`), which gives the first token, and from the next
step on the sequence decodes with the others. A decode step feeds the last token
of every running sequence as one [rows, 1] batch, each row at its own position,
so one forward pass advances them all. A sequence that finishes or is cancelled
leaves at once; the others are not recomputed.

Sampling is per sequence, through `generate`'s own `next_token` and the
sequence's own generator, so what a request produces does not depend on what
else runs beside it: greedy tokens are the tokens `generate` picks, and a
`seed` reproduces `generate(..., seed=seed)`.

The engine works from Python alone (`Engine.complete`, `Engine.stream`); the
HTTP layer (`api.py`) is a thin wrapper over `Engine.submit`.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import tiktoken
import torch

from ..generate import next_token
from ..kernels import decoder
from ..model import GPTModel, KVCache
from ..tokenizer import ENDOFTEXT, ENDOFTEXT_ID
from .metrics import Counter, Gauge, Histogram, Metric
from .text import Piece, TextStream

log = logging.getLogger("scratchgpt.serve")

MAX_LOGPROBS = 5  # alternatives per token, as OpenAI allows for completions
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class InvalidRequest(ValueError):
    """A bad value in a request; `param` names the parameter (None: the request as a whole)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is full: try again later."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated; names and meanings are OpenAI's.

    temperature 0 is greedy. `logprobs` (0..5, or None for none) asks for each
    token's log-probability plus that many alternatives; `prompt_logprobs` scores
    the prompt's tokens too. Generation stops at `<|endoftext|>`, at a `stop`
    string (not included in the text) or after `max_tokens` tokens.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise InvalidRequest("max_tokens", f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not 0 <= self.temperature < math.inf):
            raise InvalidRequest("temperature", f"temperature must be a number >= 0 (0 = greedy), "
                                                f"got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise InvalidRequest("top_k", f"top_k must be an integer >= 1 (or null: no limit), got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise InvalidRequest("top_p", f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise InvalidRequest("seed", f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest("stop", f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequest("logprobs", f"logprobs must be an integer in 0..{MAX_LOGPROBS} (or null: none), "
                                             f"got {self.logprobs!r}")


@dataclass
class TokenInfo:
    """One token of a completion (or of its prompt): its id, where its text starts in that text,
    and, when asked for, its log-probability and the most likely alternatives `[(id, logprob)]`."""

    id: int
    offset: int = 0
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Output:
    """What a sequence produced since its last Output.

    `text` is safe to show (whole characters, no stop string). The last Output of a
    sequence has its `finish_reason`: stop, length, cancelled or error (then `error`
    says what went wrong). `prompt` holds the scored prompt tokens, once, first,
    when `prompt_logprobs` was asked for.
    """

    request: "Request"
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt: list[TokenInfo] | None = None


@dataclass
class Completion:
    """A finished sequence, gathered by `Engine.complete`."""

    text: str
    token_ids: list[int]  # every token generated, an ending <|endoftext|> included
    tokens: list[TokenInfo]  # the tokens behind `text`
    finish_reason: str
    prompt: list[TokenInfo] | None = None


_request_ids = itertools.count()


class Request:
    """One sequence in the engine: its prompt and parameters, and what it has generated so far."""

    def __init__(self, engine: "Engine", prompt: list[int], params: SamplingParams,
                 on_output: Callable[[Output], None]):
        self.id = next(_request_ids)
        self.engine, self.prompt, self.params, self.on_output = engine, prompt, params, on_output
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.slot: int | None = None
        self.cancelled_at_step: int | None = None  # the engine's step count when cancel() was called
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.text: TextStream | None = None
        self.generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this sequence; its slot is free before the engine's next decode step."""
        self.engine.cancel(self)


class EngineMetrics:
    """What /metrics reports, updated by the engine as it works."""

    def __init__(self, engine: "Engine"):
        self.running = Gauge("scratchgpt_requests_running", "Sequences in a batch slot now.",
                             lambda: engine.num_running)
        self.waiting = Gauge("scratchgpt_requests_waiting", "Sequences waiting for a slot now.",
                             lambda: engine.num_waiting)
        self.prompt_tokens = Counter("scratchgpt_prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter("scratchgpt_generation_tokens_total", "Tokens generated.")
        self.finished = Counter("scratchgpt_requests_finished_total", "Sequences finished, by finish reason.",
                                "finish_reason", FINISH_REASONS)
        self.rejected = Counter("scratchgpt_requests_rejected_total", "Requests refused because the queue was full.")
        self.decode_steps = Counter("scratchgpt_decode_steps_total", "Batched decode steps run.")
        self.ttft = Histogram("scratchgpt_time_to_first_token_seconds", "From arrival to the first token.")
        self.tpot = Histogram("scratchgpt_time_per_output_token_seconds",
                              "Mean time between a sequence's tokens after the first.")
        self.latency = Histogram("scratchgpt_request_latency_seconds", "From arrival to finish.")
        self.cancel_delay = Histogram("scratchgpt_cancel_delay_steps",
                                      "Decode steps a cancelled sequence still took after its cancellation.",
                                      buckets=(0, 1, 2, 4, 8, 16))

    def all(self) -> list[Metric]:
        return [self.running, self.waiting, self.prompt_tokens, self.generation_tokens, self.finished,
                self.rejected, self.decode_steps, self.ttft, self.tpot, self.latency, self.cancel_delay]


class Engine:
    """Serves one model to many callers at once by continuous batching (see the module doc).

    `submit` queues sequences and returns at once; their Outputs arrive through
    the callback, called on the engine's thread (keep it quick). `close()` ends
    the thread, cancelling whatever still runs.
    """

    def __init__(self, model: GPTModel, tokenizer: tiktoken.Encoding, max_batch: int = 8,
                 max_queue: int = 64, eos_id: int = ENDOFTEXT_ID):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model, self.tokenizer, self.eos_id = model.eval(), tokenizer, eos_id
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context_length = model.cfg.context_length
        self.vocab_size = min(model.cfg.vocab_size, tokenizer.n_vocab)  # ids that both know
        self.device = model.tok_emb.weight.device
        self.cache = KVCache(model, max_batch, self.context_length)  # one row per slot
        self.decode_step = decoder(self.model)  # the model's decode steps, by the fastest path for it
        self.slots: list[Request | None] = [None] * max_batch
        self.steps = 0  # decode steps run
        self.metrics = EngineMetrics(self)
        self._waiting: deque[Request] = deque()
        self._cancelled: set[Request] = set()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="scratchgpt-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the callers' side

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def encode(self, text: str) -> list[int]:
        """A text prompt's token ids (`<|endoftext|>` is the special token)."""
        return self.tokenizer.encode(text, allowed_special={ENDOFTEXT})

    def check_prompt(self, prompt: Sequence[int], max_tokens: int) -> list[int]:
        """The prompt as a list of ids, checked against the vocabulary and the context.

        An empty prompt becomes `<|endoftext|>`: GPT-2 then writes as at the start of a document.
        """
        ids = list(prompt) or [self.eos_id]
        for token in ids:
            if not _is_int(token) or not 0 <= token < self.vocab_size:
                raise InvalidRequest("prompt", f"token id {token!r} is outside the vocabulary of "
                                               f"{self.vocab_size} tokens (0..{self.vocab_size - 1})")
        if len(ids) + max_tokens > self.context_length:
            raise InvalidRequest("max_tokens", f"the prompt's {len(ids)} tokens plus max_tokens {max_tokens} "
                                               f"exceed the model's context of {self.context_length} tokens")
        return ids

    def submit(self, prompt: str | Sequence[int], params: SamplingParams,
               on_output: Callable[[Output], None]) -> Request:
        """Queue one sequence; see `submit_many`."""
        return self.submit_many([(prompt, params, on_output)])[0]

    def submit_many(self, items: Iterable[tuple[str | Sequence[int], SamplingParams, Callable[[Output], None]]]
                    ) -> list[Request]:
        """Queue several sequences, all or none.

        Raises InvalidRequest for a bad prompt or one that cannot fit, QueueFull
        when they would overflow the waiting queue.
        """
        requests = []
        for prompt, params, on_output in items:
            ids = self.encode(prompt) if isinstance(prompt, str) else prompt
            requests.append(Request(self, self.check_prompt(ids, params.max_tokens), params, on_output))
        capacity = self.max_batch + self.max_queue
        if len(requests) > capacity:
            raise InvalidRequest(None, f"{len(requests)} sequences in one request exceed the server's "
                                       f"{self.max_batch} slots + {self.max_queue} queue places")
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            free = self.slots.count(None)
            if len(self._waiting) + len(requests) > self.max_queue + free:
                self.metrics.rejected.inc()
                raise QueueFull(f"the server is busy: {self.max_batch} sequences running and "
                                f"{len(self._waiting)} waiting (queue of {self.max_queue})")
            self._waiting.extend(requests)
            self._wake.notify()
        return requests

    def cancel(self, request: Request) -> None:
        """Stop `request` (waiting or running); a finished one is left alone."""
        with self._wake:
            if request.finished or request in self._cancelled:
                return
            request.cancelled_at_step = self.steps
            self._cancelled.add(request)
            self._wake.notify()

    def stream(self, prompt: str | Sequence[int], params: SamplingParams) -> Iterator[Output]:
        """Yield one sequence's Outputs as they come (blocking); stopping early cancels it."""
        outputs: queue.Queue[Output] = queue.Queue()
        request = self.submit(prompt, params, outputs.put)
        try:
            while True:
                output = outputs.get()
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            request.cancel()

    def complete(self, prompt: str | Sequence[int], params: SamplingParams) -> Completion:
        """Run one sequence to its end (blocking); raises RuntimeError if it failed."""
        text, tokens, prompt_tokens = [], [], None
        for output in self.stream(prompt, params):
            text.append(output.text)
            tokens += output.tokens
            prompt_tokens = output.prompt if output.prompt is not None else prompt_tokens
            if output.finish_reason == "error":
                raise RuntimeError(output.error)
        return Completion("".join(text), output.request.token_ids, tokens, output.finish_reason, prompt_tokens)

    def close(self) -> None:
        """Cancel everything and stop the engine's thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the engine's thread

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._wake:
                    while not (self._closed or self._waiting or self._cancelled or self.num_running):
                        self._wake.wait()
                    if self._closed:
                        break
                self._drop_cancelled()
                for request in self._admit():
                    self._prefill(request)
                self._drop_cancelled()
                if self.num_running:
                    self._decode()
            for request in [*self._waiting, *filter(None, self.slots)]:
                self._finish(request, "cancelled", Piece())

    def _admit(self) -> list[Request]:
        """Move waiting sequences into free slots, lowest slot first."""
        admitted = []
        with self._wake:
            for slot, occupant in enumerate(self.slots):
                if occupant is None and self._waiting:
                    request = self._waiting.popleft()
                    request.slot, self.slots[slot] = slot, request
                    admitted.append(request)
        return admitted

    def _drop_cancelled(self) -> None:
        with self._wake:
            cancelled, self._cancelled = self._cancelled, set()
            for request in cancelled:
                if request in self._waiting:
                    self._waiting.remove(request)
        for request in cancelled:
            if not request.finished:
                self.metrics.cancel_delay.observe(self.steps - request.cancelled_at_step)
                self._finish(request, "cancelled", Piece())

    def _prefill(self, request: Request) -> None:
        """Run the prompt alone into the request's row; sample its first token."""
        params = request.params
        request.text = TextStream(self.tokenizer, params.stop)
        request.generator = torch.Generator(device=self.device)
        if params.seed is not None:
            request.generator.manual_seed(params.seed)
        else:
            request.generator.seed()
        try:
            self.cache.set_length(request.slot, 0)
            ids = torch.tensor([request.prompt], device=self.device)
            logits = self.model(ids, cache=self.cache.rows(request.slot, request.slot + 1),
                                logits_from=0 if params.prompt_logprobs else -1)  # [1, T or 1, V]
            self.metrics.prompt_tokens.inc(len(request.prompt))
            if params.prompt_logprobs:
                self._emit(Output(request, prompt=self._score_prompt(request.prompt, logits[0], params.logprobs)))
            if params.max_tokens == 0:
                self._finish(request, "length", request.text.finish())
            else:
                self._sample(request, logits[:, -1, :])
        except Exception as exc:  # noqa: BLE001 - one bad sequence must not stop the others
            self._fail([request], exc)

    def _decode(self) -> None:
        """One forward pass over rows 0..hi-1 advances every running sequence by one token."""
        hi = max(slot for slot, r in enumerate(self.slots) if r is not None) + 1
        rows = self.slots[:hi]
        tokens = torch.tensor([[r.token_ids[-1] if r is not None else 0] for r in rows], device=self.device)
        try:
            logits = self.decode_step(tokens, self.cache.rows(0, hi))[:, -1, :]  # [hi, V]
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            self._fail([r for r in rows if r is not None], exc)
            return
        finally:
            for slot, r in enumerate(rows):
                if r is None:
                    self.cache.set_length(slot, 0)  # an empty row was fed a dummy token: forget it
        self.steps += 1
        self.metrics.decode_steps.inc()
        for slot, request in enumerate(rows):
            if request is not None:
                try:
                    self._sample(request, logits[slot:slot + 1])
                except Exception as exc:  # noqa: BLE001
                    self._fail([request], exc)

    def _sample(self, request: Request, logits: torch.Tensor) -> None:
        """Pick the next token from last-position logits [1, V] and pass on what it releases."""
        params = request.params
        token = int(next_token(logits, params.temperature, params.top_k, params.top_p, request.generator)[0, 0])
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.ttft.observe(now - request.arrived)
        request.token_ids.append(token)
        self.metrics.generation_tokens.inc()
        if token == self.eos_id:
            self._finish(request, "stop", request.text.finish())
            return
        info = TokenInfo(token)
        if params.logprobs is not None:
            info.logprob, info.top_logprobs = self._logprobs(logits[0].float().log_softmax(-1), token,
                                                             params.logprobs)
        piece = request.text.push(token, info)
        if not piece.stopped and len(request.token_ids) >= params.max_tokens:
            rest = request.text.finish()
            piece = Piece(piece.text + rest.text, piece.tokens + rest.tokens, rest.stopped)
            self._finish(request, "stop" if piece.stopped else "length", piece)
        elif piece.stopped:
            self._finish(request, "stop", piece)
        elif piece.text or piece.tokens:
            self._emit(self._output(request, piece))

    @staticmethod
    def _logprobs(logprobs: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        """The chosen token's log-probability and the k most likely tokens', from [V] log-probabilities."""
        top = torch.topk(logprobs, k) if k else None
        alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
        return float(logprobs[token]), alternatives

    def _score_prompt(self, prompt: list[int], logits: torch.Tensor, k: int | None) -> list[TokenInfo]:
        """The prompt's tokens with their offsets in its text and, from the second on, log-probabilities."""
        logprobs = logits.float().log_softmax(-1)  # [T, V]: row t predicts token t + 1
        text, infos, released = TextStream(self.tokenizer), [], []
        for t, token in enumerate(prompt):
            info = TokenInfo(token)
            if t > 0:
                info.logprob, info.top_logprobs = self._logprobs(logprobs[t - 1], token, k or 0)
            released += text.push(token, info).tokens
            infos.append(info)
        released += text.finish().tokens
        for start, info in released:
            info.offset = start
        return infos

    def _output(self, request: Request, piece: Piece, finish_reason: str | None = None,
                error: str | None = None) -> Output:
        tokens = []
        for start, info in piece.tokens:
            info.offset = start
            tokens.append(info)
        return Output(request, piece.text, tokens, finish_reason, error)

    def _finish(self, request: Request, reason: str, piece: Piece, error: str | None = None) -> None:
        with self._wake:  # submit_many counts the free slots
            if request.slot is not None and self.slots[request.slot] is request:
                self.slots[request.slot] = None
                self.cache.set_length(request.slot, 0)
            request.finish_reason = reason
        now = time.perf_counter()
        self.metrics.finished.inc(value=reason)
        self.metrics.latency.observe(now - request.arrived)
        if request.first_token_at is not None and len(request.token_ids) > 1:
            self.metrics.tpot.observe((now - request.first_token_at) / (len(request.token_ids) - 1))
        self._emit(self._output(request, piece, reason, error))

    def _fail(self, requests: list[Request], exc: Exception) -> None:
        log.error("generation failed for %d sequence(s): %s", len(requests), exc, exc_info=exc)
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        for request in requests:
            if not request.finished:
                self._finish(request, "error", Piece(), error=message)

    def _emit(self, output: Output) -> None:
        try:
            output.request.on_output(output)
        except Exception:  # noqa: BLE001 - a caller's broken callback must not stop the engine
            log.exception("output callback of request %d failed", output.request.id)
