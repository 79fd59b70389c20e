"""OpenAI's JSON layouts for completions and chat completions, in the engine's terms.

`parse_completion` and `parse_chat` turn a request body into a `Job`: token-id
prompts with one SamplingParams per sequence. Anything that cannot be honoured
is refused with an InvalidRequest naming the parameter and what it may be;
nothing is silently ignored. `Answer` turns the engine's Outputs for one request
into OpenAI choices (echo, offsets, logprobs), which `chunk`, `usage_chunk` and
`response` wrap as stream chunks or a whole response.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import tiktoken

from .chat import ChatTemplate, message_texts
from .engine import MAX_LOGPROBS, Engine, InvalidRequest, Output, SamplingParams, TokenInfo
from .text import token_bytes, token_text

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_N = 128  # choices per prompt, as OpenAI allows

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
          "stream_options", "user"}
COMPLETION_PARAMS = COMMON | {"prompt", "logprobs", "echo"}
CHAT_PARAMS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
# Accepted only at the value that changes nothing (clients such as LangChain send them unasked).
NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "suffix": ("",)}


@dataclass
class Job:
    """One HTTP request in the engine's terms: its sequences and how to answer."""

    kind: str  # "completion" or "chat"
    model: str
    prompts: list[list[int]]  # one per prompt; each has n sequences
    params: list[SamplingParams]  # one per sequence, prompt-major: sequence i belongs to prompts[i // n]
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def sequences(self) -> list[tuple[list[int], SamplingParams]]:
        return [(self.prompts[i // self.n], params) for i, params in enumerate(self.params)]


# --------------------------------------------------------------------------- parsing

def _check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = [key for key in body if key not in allowed and key not in NEUTRAL]
    if unknown:
        raise InvalidRequest(unknown[0], f"unsupported parameter{'s' if len(unknown) > 1 else ''}: "
                                         f"{', '.join(unknown)}")
    for key, neutral in NEUTRAL.items():
        if body.get(key) is not None and body[key] not in neutral:
            raise InvalidRequest(key, f"{key} is not supported; only {neutral[0]!r} (no effect) is accepted, "
                                      f"got {body[key]!r}")


def _get(body: dict[str, Any], key: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    """body[key] if present and not null, checked to be one of `kinds` (bools are not numbers)."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InvalidRequest(key, f"{key} must be {what}, got {value!r}")
    return value


def _integer(body: dict[str, Any], key: str, low: int, high: int | None, default: int | None) -> int | None:
    value = _get(body, key, (int,), "an integer", default)
    if value is not None and (value < low or (high is not None and value > high)):
        bounds = f"in {low}..{high}" if high is not None else f">= {low}"
        raise InvalidRequest(key, f"{key} must be an integer {bounds}, got {value}")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stops)):
        raise InvalidRequest("stop", f"stop must be a non-empty string or a list of up to {MAX_STOP} of them, "
                                     f"got {stop!r}")
    return tuple(stops)


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    """Whether stream_options asks for a usage chunk."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise InvalidRequest("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise InvalidRequest("stream_options", f"stream_options takes only include_usage (a boolean), got {options!r}")
    return _get(options, "include_usage", (bool,), "a boolean", False)


def _prompts(prompt: Any, engine: Engine) -> list[list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of ids, or a list of id lists."""
    shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        return [engine.encode(prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest("prompt", f"prompt must be {shapes}, got {prompt!r}"[:300])
    if all(isinstance(p, str) for p in prompt):
        return [engine.encode(p) for p in prompt]
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        return prompt
    raise InvalidRequest("prompt", f"prompt must be {shapes}")


def _sampling(body: dict[str, Any], engine: Engine, prompts: list[list[int]], n: int, default_max: int | None,
              stop: tuple[str, ...], logprobs: int | None, prompt_logprobs: bool,
              max_key: str = "max_tokens") -> tuple[list[list[int]], list[SamplingParams]]:
    """Checked prompts and one SamplingParams per sequence (n per prompt).

    An omitted max_tokens is `default_max` (None: all the context leaves) clamped to what fits.
    """
    given = _integer(body, max_key, 0, None, None)
    seed = _get(body, "seed", (int,), "an integer")
    checked, params = [], []
    for prompt in prompts:
        ids = engine.check_prompt(prompt, given or 0)
        room = engine.context_length - len(ids)
        max_tokens = given if given is not None else min(room, default_max or room)
        if max_tokens == 0 and given is None:
            raise InvalidRequest("prompt", f"the prompt's {len(ids)} tokens fill the model's context of "
                                           f"{engine.context_length} tokens: no room for a completion")
        checked.append(ids)
        for i in range(n):
            params.append(SamplingParams(
                max_tokens=max_tokens, temperature=body["temperature"] if body.get("temperature") is not None else 1.0,
                top_k=body.get("top_k"), top_p=body.get("top_p"), seed=None if seed is None else seed + i,
                stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs))
    return checked, params


def _common(body: dict[str, Any]) -> tuple[int, bool, bool]:
    n = _integer(body, "n", 1, MAX_N, 1)
    stream = _get(body, "stream", (bool,), "a boolean", False)
    _get(body, "user", (str,), "a string")
    return n, stream, _stream_options(body, stream)


def parse_completion(body: dict[str, Any], engine: Engine, model: str) -> Job:
    """A /v1/completions body as a Job (see the module doc)."""
    _check_keys(body, COMPLETION_PARAMS)
    if "prompt" not in body:
        raise InvalidRequest("prompt", "prompt is required")
    n, stream, include_usage = _common(body)
    echo = _get(body, "echo", (bool,), "a boolean", False)
    logprobs = _integer(body, "logprobs", 0, MAX_LOGPROBS, None)
    prompts = _prompts(body["prompt"], engine)
    prompts, params = _sampling(body, engine, prompts, n, 16, _stop(body), logprobs,
                                prompt_logprobs=echo and logprobs is not None)
    return Job("completion", model, prompts, params, n, stream, include_usage, echo)


def parse_chat(body: dict[str, Any], engine: Engine, model: str, template: ChatTemplate) -> Job:
    """A /v1/chat/completions body as a Job: the messages become one prompt through `template`."""
    _check_keys(body, CHAT_PARAMS)
    n, stream, include_usage = _common(body)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise InvalidRequest("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    want_logprobs = _get(body, "logprobs", (bool,), "a boolean", False)
    top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS, None)
    if top is not None and not want_logprobs:
        raise InvalidRequest("top_logprobs", "top_logprobs needs logprobs: true")
    prompt = chat_prompt(body.get("messages"), engine, template)
    user_stop = _stop(body)
    prompts, params = _sampling(body, engine, [prompt], n, None, user_stop + template.stop,
                                (top or 0) if want_logprobs else None, False, max_key)
    return Job("chat", model, prompts, params, n, stream, include_usage)


def chat_prompt(messages: Any, engine: Engine, template: ChatTemplate) -> list[int]:
    """The token ids of `messages` rendered by `template` (special tokens in messages are plain text)."""
    text = template.render(message_texts(messages))
    return engine.tokenizer.encode(text, disallowed_special=())


# --------------------------------------------------------------------------- responses

def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def completion_logprobs(tokenizer: tiktoken.Encoding, tokens: list[TokenInfo]) -> dict[str, Any]:
    """OpenAI's completions layout: parallel lists; offsets count characters of the choice's text."""
    top = []
    for t in tokens:
        if t.top_logprobs is None:
            top.append(None)
            continue
        best = dict(t.top_logprobs)
        best.setdefault(t.id, t.logprob)  # the chosen token is always listed, so up to k + 1 entries
        top.append({token_text(tokenizer, i): lp for i, lp in sorted(best.items(), key=lambda x: -x[1])})
    return {"tokens": [token_text(tokenizer, t.id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": top,
            "text_offset": [t.offset for t in tokens]}


def _chat_token(tokenizer: tiktoken.Encoding, token: int, logprob: float) -> dict[str, Any]:
    return {"token": token_text(tokenizer, token), "logprob": logprob,
            "bytes": list(token_bytes(tokenizer, token))}


def chat_logprobs(tokenizer: tiktoken.Encoding, tokens: list[TokenInfo]) -> dict[str, Any]:
    """OpenAI's chat layout: one entry per token with its bytes and top alternatives."""
    return {"content": [{**_chat_token(tokenizer, t.id, t.logprob),
                         "top_logprobs": [_chat_token(tokenizer, i, lp) for i, lp in t.top_logprobs or []]}
                        for t in tokens],
            "refusal": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(job: Job, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
    if job.kind == "completion":
        return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created,
                "model": job.model, "choices": choices}
    kind = "chat.completion.chunk" if chunk else "chat.completion"
    return {"id": f"chatcmpl-{job.id}", "object": kind, "created": job.created, "model": job.model,
            "choices": choices}


def choice(job: Job, index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None,
           chunk: bool, first: bool = False) -> dict[str, Any]:
    """One entry of `choices`: a whole answer, or a stream chunk's piece of one."""
    if job.kind == "completion":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if not chunk:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk(job: Job, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream chunk; with include_usage every chunk carries `usage: null` but the usage chunk."""
    body = _envelope(job, choices, chunk=True)
    if job.include_usage:
        body["usage"] = None
    return body


def usage_chunk(job: Job, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {**_envelope(job, [], chunk=True), "usage": usage(prompt_tokens, completion_tokens)}


def response(job: Job, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {**_envelope(job, choices, chunk=False), "usage": usage(prompt_tokens, completion_tokens)}


class Answer:
    """Turns one request's Outputs into OpenAI choices: echo, offsets and logprobs included."""

    def __init__(self, job: Job, engine: Engine):
        self.job, self.tokenizer = job, engine.tokenizer
        self.echo = [engine.tokenizer.decode(p) if job.echo else "" for p in job.prompts]
        self.started: set[int] = set()
        self.texts: dict[int, list[str]] = {}
        self.tokens: dict[int, list[TokenInfo]] = {}
        self.finish: dict[int, str | None] = {}

    def _parts(self, index: int, output: Output) -> tuple[bool, str, list[TokenInfo]]:
        """Whether this is the sequence's first Output, and its text and tokens (offsets in the choice's text)."""
        first = index not in self.started
        self.started.add(index)
        echo = self.echo[index // self.job.n]
        tokens = [replace(t, offset=t.offset + len(echo)) for t in output.tokens]
        if first and self.job.echo:
            return first, echo + output.text, (output.prompt or []) + tokens
        return first, output.text, tokens

    def _logprobs(self, tokens: list[TokenInfo]) -> dict[str, Any] | None:
        if self.job.params[0].logprobs is None:
            return None
        if self.job.kind == "chat":
            return chat_logprobs(self.tokenizer, tokens)
        return completion_logprobs(self.tokenizer, tokens)

    def chunk(self, index: int, output: Output) -> dict[str, Any] | None:
        """A stream chunk's choice for this Output (None: nothing to send yet)."""
        first, text, tokens = self._parts(index, output)
        if not (first or text or tokens or output.finish_reason):
            return None
        return choice(self.job, index, text, self._logprobs(tokens), output.finish_reason, True, first)

    def add(self, index: int, output: Output) -> None:
        """Gather an Output for the whole answer."""
        _, text, tokens = self._parts(index, output)
        self.texts.setdefault(index, []).append(text)
        self.tokens.setdefault(index, []).extend(tokens)
        self.finish[index] = output.finish_reason

    def choices(self) -> list[dict[str, Any]]:
        return [choice(self.job, i, "".join(self.texts[i]), self._logprobs(self.tokens[i]), self.finish[i], False)
                for i in range(len(self.job.params))]
