"""The OpenAI-compatible HTTP layer over an Engine: routes, keys, errors and streams; no generation logic.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health (503 until the model is loaded), POST /tokenize, POST /detokenize,
GET /metrics (Prometheus text) and the playground page at /. Every error is
OpenAI's `{"error": {"message", "type", "param", "code"}}`; a stream always
ends with `data: [DONE]`, after an `{"error": ...}` event if something failed.
A client that goes away, streaming or not, has its sequences cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .chat import TRANSCRIPT, ChatTemplate
from .engine import Engine, InvalidRequest, Output, QueueFull
from .metrics import render
from .protocol import Answer, Job, chat_prompt, chunk, error_body, parse_chat, parse_completion, response, usage_chunk

log = logging.getLogger("scratchgpt.serve")

MAX_BODY_BYTES = 4 * 2**20  # a full 1024-token prompt list is well under this


class ApiError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)


@dataclass
class ServeState:
    """What the app serves: set `engine` (and `template`) once the model is loaded."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    engine: Engine | None = None
    template: ChatTemplate = TRANSCRIPT
    created: int = field(default_factory=lambda: int(time.time()))


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class Run:
    """One HTTP request's sequences in the engine, and their Outputs as they arrive on the event loop."""

    def __init__(self, engine: Engine, job: Job):
        loop = asyncio.get_running_loop()
        self.job, self.outputs_queue = job, asyncio.Queue()

        def deliver(index: int) -> Callable[[Output], None]:
            return lambda output: loop.call_soon_threadsafe(self.outputs_queue.put_nowait, (index, output))

        self.requests = engine.submit_many([(prompt, params, deliver(i))
                                            for i, (prompt, params) in enumerate(job.sequences)])

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def outputs(self, http: Request) -> AsyncIterator[tuple[int, Output]]:
        """(sequence index, Output) until every sequence finished; a disconnect or an early exit cancels."""
        watcher = asyncio.create_task(self._cancel_on_disconnect(http))
        try:
            remaining = len(self.requests)
            while remaining:
                index, output = await self.outputs_queue.get()
                remaining -= output.finish_reason is not None
                yield index, output
        finally:
            watcher.cancel()
            self.cancel()  # no-op for finished sequences

    async def _cancel_on_disconnect(self, http: Request) -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        self.cancel()

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.job.prompts)


def create_app(state: ServeState) -> FastAPI:
    """The FastAPI app serving `state` (the engine may be attached later: 503 until then)."""
    app = FastAPI(title="scratchgpt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    page = (resources.files("scratchgpt.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(InvalidRequest)
    async def invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        return JSONResponse(error_body(str(exc), param=exc.param), status_code=400)

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "rate_limit_error", code="queue_full"), status_code=429)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"unknown route: {request.method} {request.url.path}", "unknown_url"
        else:
            message, code = f"{request.method} {request.url.path}: {exc.detail}", None
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def ready() -> Engine:
        if state.engine is None:
            raise ApiError(503, "the model is still loading; GET /health says 200 once it is ready",
                           "server_error", code="model_loading")
        return state.engine

    async def read_json(request: Request) -> dict[str, Any]:
        limit = state.max_body_bytes
        length = request.headers.get("content-length", "")
        too_large = ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
        return data

    def check_model(body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {model!r}", param="model")
        if model is not None and model != state.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {state.model_name!r}",
                           param="model", code="model_not_found")

    async def answer(http: Request, engine: Engine, job: Job) -> Response:
        run = Run(engine, job)  # InvalidRequest -> 400, QueueFull -> 429, before any byte is sent
        if job.stream:
            return StreamingResponse(stream(http, engine, run), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer_of = Answer(job, engine)
        async for index, output in run.outputs(http):
            if output.finish_reason == "error":
                raise ApiError(500, f"generation failed: {output.error}", "server_error")
            if output.finish_reason == "cancelled":
                return Response(status_code=499)  # the client has gone: nobody reads this
            answer_of.add(index, output)
        return JSONResponse(response(job, answer_of.choices(), run.prompt_tokens, run.completion_tokens))

    async def stream(http: Request, engine: Engine, run: Run) -> AsyncIterator[str]:
        job, answer_of = run.job, Answer(run.job, engine)
        try:
            async for index, output in run.outputs(http):
                if output.finish_reason == "error":
                    yield _sse(error_body(f"generation failed: {output.error}", "server_error"))
                    break
                if output.finish_reason == "cancelled":
                    break
                piece = answer_of.chunk(index, output)
                if piece is not None:
                    yield _sse(chunk(job, [piece]))
            else:
                if job.include_usage:
                    yield _sse(usage_chunk(job, run.prompt_tokens, run.completion_tokens))
        except Exception as exc:  # noqa: BLE001 - the stream must still end properly
            log.exception("stream failed")
            yield _sse(error_body(f"internal error: {exc}", "server_error"))
        yield _sse("[DONE]")

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "scratchgpt",
                "max_model_len": ready().context_length}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> JSONResponse:
        authorize(request)
        check_model({"model": model})
        return JSONResponse(model_card())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        engine = ready()
        body = await read_json(request)
        check_model(body)
        return await answer(request, engine, parse_completion(body, engine, state.model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        engine = ready()
        body = await read_json(request)
        check_model(body)
        return await answer(request, engine, parse_chat(body, engine, state.model_name, state.template))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        """{"prompt": text} or {"messages": [...]} (through the chat template) -> token ids."""
        authorize(request)
        engine = ready()
        body = await read_json(request)
        check_model(body)
        unknown = sorted(set(body) - {"model", "prompt", "messages"})
        if unknown or ("prompt" in body) == ("messages" in body):
            raise ApiError(400, "tokenize takes a prompt (a string) or messages (a chat), and nothing else",
                           param=unknown[0] if unknown else "prompt")
        if "messages" in body:
            tokens = chat_prompt(body["messages"], engine, state.template)
        elif isinstance(body["prompt"], str):
            tokens = engine.encode(body["prompt"])
        else:
            raise ApiError(400, f"prompt must be a string, got {body['prompt']!r}"[:300], param="prompt")
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_length})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        """{"tokens": [ids]} -> {"prompt": text}."""
        authorize(request)
        engine = ready()
        body = await read_json(request)
        check_model(body)
        unknown = sorted(set(body) - {"model", "tokens"})
        if unknown:
            raise ApiError(400, f"unsupported parameters: {', '.join(unknown)}", param=unknown[0])
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise ApiError(400, "tokens must be a list of token ids", param="tokens")
        try:
            engine.check_prompt(tokens, 0)
        except InvalidRequest as exc:
            raise ApiError(400, str(exc), param="tokens") from None
        return JSONResponse({"prompt": engine.tokenizer.decode(tokens)})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render(ready().metrics.all()), media_type="text/plain; version=0.0.4")

    return app


def run_server(state: ServeState, host: str, port: int, load: Callable[[], tuple[Engine, ChatTemplate]],
               announce: Callable[[str], None] = print) -> None:
    """Serve on host:port at once (503 while loading), load the model in a thread, and block until
    stopped (Ctrl-C). A failed load stops the server and is raised here."""
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=3))
    failure: list[BaseException] = []

    def load_then_announce() -> None:
        try:
            state.engine, state.template = load()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(exc)
            server.should_exit = True
            return
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()
            url = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"
            announce(f"scratchgpt serve: {state.model_name} ready at {url} (playground {url}/, "
                     f"OpenAI API {url}/v1{', key required' if state.api_key else ''})")

    threading.Thread(target=load_then_announce, name="scratchgpt-load", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then passed Ctrl-C on: a normal stop
        announce("scratchgpt serve: stopped")
    finally:
        if state.engine is not None:
            state.engine.close()
    if failure:
        raise failure[0]
