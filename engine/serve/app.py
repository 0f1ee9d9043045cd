"""The HTTP side: an ASGI app (FastAPI) over the scheduler, and a helper that serves it on a thread.

Endpoints (OpenAI-compatible, as vLLM serves them): `POST /v1/chat/completions`, `POST /v1/completions`,
`GET /v1/models`, `GET /v1/models/{id}`, `POST /tokenize`, `POST /detokenize`, `GET /health`. Bodies are
read with a size limit and parsed here (bad JSON, NaN, lone surrogates, absurd nesting → 400); every error
is an OpenAI-shaped JSON body. Tokenising and rendering run on worker threads, decoding on the scheduler's.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

import anyio
import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from qforge.engine.serve.chat import ChatModel, ReasoningStream, parse_tool_calls
from qforge.engine.generate import Pick, SamplingParams
from qforge.engine.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                          SamplingFields, TokenizeRequest, new_id, now, usage, validation_error)
from qforge.engine.serve.scheduler import Event, Job, QueueFull, Scheduler


@dataclass
class ServeSettings:
    name: str
    api_key: str | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    default_max_tokens: int = 1024  # chat requests without max_tokens (capped by what the context leaves)
    max_body_bytes: int = 32 * 2 ** 20
    disconnect_poll: float = 0.25  # seconds between disconnect checks of a non-streaming request


def openai_error(error: APIError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing what json.loads would turn into a server error later."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(413 if declared.isdigit() else 400, f"request body larger than {limit} bytes"
                       if declared.isdigit() else f"bad Content-Length {declared!r}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
        body = json.loads(text, parse_constant=_no_constant)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates from \ud800 escapes
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except UnicodeError as error:
        raise APIError(400, f"the request body is not valid UTF-8 text (lone surrogate?): {error.reason}") from None
    except ValueError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse(model: type, body: dict, context: dict | None = None):
    """The body as `model` (`context` gives checks that need the model, e.g. {"vocab_size": V}), or a 400."""
    try:
        return model.model_validate(body, context=context)
    except ValidationError as error:
        raise validation_error(error) from None
    except (ValueError, RecursionError) as error:
        raise APIError(400, str(error)) from None


class Server:
    """Turns validated requests into scheduler jobs and scheduler events into OpenAI responses."""

    def __init__(self, chat_model: ChatModel, scheduler: Scheduler, settings: ServeSettings):
        self.chat_model = chat_model
        self.scheduler = scheduler
        self.settings = settings
        self.tokenizer = chat_model.tokenizer
        self.vocab_size = chat_model.model.config.vocab_size
        self.max_model_len = settings.max_model_len or chat_model.model.config.max_position_embeddings
        # A prompt longer than this many bytes cannot fit the context whatever its tokens: refused untokenised.
        self.max_prompt_bytes = self.max_model_len * max(len(t) for t in self.tokenizer.get_vocab())

    # --- requests -> jobs -------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model not in (None, self.settings.name):
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.settings.name!r}",
                           "model")

    def encode(self, text: str) -> list[int]:
        if len(text.encode("utf-8", "surrogatepass")) > self.max_prompt_bytes:
            raise APIError(400, f"the prompt is longer than this model's maximum context length "
                                f"({self.max_model_len} tokens)", "messages")
        return self.chat_model.encode(text)

    def budget(self, prompt_tokens: int, requested: int | None, default: int, param: str) -> int:
        room = self.max_model_len - prompt_tokens
        if requested is None:
            requested = min(default, room)
        if room <= 0 or requested > room:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; the request "
                                f"has {prompt_tokens} prompt tokens and asks for {requested} completion tokens "
                                f"({prompt_tokens + requested} in total); shorten the prompt or lower {param}",
                           param)
        return requested

    def sampling(self, request: SamplingFields, logprobs: int | None, choice: int) -> SamplingParams:
        seed = None if request.seed is None else (request.seed + choice) % 2 ** 64
        bias = tuple((int(k), v) for k, v in (request.logit_bias or {}).items())
        temperature = 1.0 if request.temperature is None else request.temperature
        params = SamplingParams(temperature=temperature, top_p=request.top_p, top_k=max(request.top_k, 0),
                                min_p=request.min_p, presence_penalty=request.presence_penalty,
                                frequency_penalty=request.frequency_penalty,
                                repetition_penalty=request.repetition_penalty, logit_bias=bias, seed=seed,
                                logprobs=logprobs)
        try:
            params.check(self.vocab_size)
        except ValueError as error:
            raise APIError(400, str(error)) from None
        return params

    def run(self, request: Request, jobs_spec: list[tuple[list[int], SamplingParams, int, tuple, int | None]]
            ) -> AsyncIterator[tuple[int, Event]]:
        """Submits one job per (prompt, params, max_tokens, stop, prompt_logprobs) now (a full queue is a 503
        before any response starts) and returns the (index, event) stream; a client that goes away cancels."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = []
        for index, (prompt, params, max_tokens, stop, prompt_logprobs) in enumerate(jobs_spec):
            emit = (lambda i: lambda event: loop.call_soon_threadsafe(queue.put_nowait, (i, event)))(index)
            jobs.append(Job(prompt, params, self.chat_model.text_stream(stop, max_tokens), emit, prompt_logprobs))
        try:
            self.scheduler.submit(jobs)
        except QueueFull as error:
            raise APIError(503, f"server busy: {error}; retry later", retry_after=1) from None
        return self._events(request, jobs, queue)

    async def _events(self, request: Request, jobs: list[Job], queue: asyncio.Queue):
        loop = asyncio.get_running_loop()
        poll = self.settings.disconnect_poll
        next_check = loop.time() + poll
        open_jobs = len(jobs)
        try:
            while open_jobs:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, next_check - loop.time()))
                except asyncio.TimeoutError:
                    item = None
                if loop.time() >= next_check:  # checked on a clock: events may arrive faster than the poll
                    if await request.is_disconnected():
                        return
                    next_check = loop.time() + poll
                if item is None:
                    continue
                index, event = item
                if event.error is not None:
                    raise APIError(500, f"generation failed: {event.error}")
                if event.finish_reason is not None:
                    open_jobs -= 1
                yield index, event
        finally:
            self.scheduler.cancel(jobs)  # no-op for finished jobs; frees the slots of abandoned ones

    # --- logprobs ---------------------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def token_name(self, token: int, as_id: bool) -> str:
        """A token as logprobs name it: its text, or "token_id:N" with `return_tokens_as_token_ids` (vLLM's
        format; single-token texts are not unique, e.g. every partial UTF-8 byte decodes to U+FFFD)."""
        return f"token_id:{token}" if as_id else self.token_text(token)

    def chat_logprob(self, pick: Pick, as_ids: bool = False) -> dict:
        text = self.token_text(pick.token)
        return {"token": self.token_name(pick.token, as_ids), "logprob": _finite(pick.logprob),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": self.token_name(i, as_ids), "logprob": _finite(v),
                                  "bytes": list(self.token_text(i).encode())} for i, v in pick.top]}

    def completion_logprobs(self, picks: list[Pick | None], tokens: list[int], offset: int,
                            as_ids: bool = False) -> dict:
        texts = [self.token_text(t) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        tops = []
        for pick in picks:
            if pick is None:
                tops.append(None)
                continue
            top = {self.token_name(i, as_ids): _finite(v) for i, v in pick.top}
            top.setdefault(self.token_name(pick.token, as_ids), _finite(pick.logprob))
            tops.append(top)
        names = [self.token_name(t, True) for t in tokens] if as_ids else texts
        return {"tokens": names, "token_logprobs": [_finite(p.logprob) if p else None for p in picks],
                "top_logprobs": tops, "text_offset": offsets}


def _finite(logprob: float | None) -> float | None:
    """A suppressed token's −inf log-prob (e.g. a scored prompt token outside a pruned head) as vLLM sends it:
    −9999.0, since JSON has no infinities."""
    return None if logprob is None else max(logprob, -9999.0)


class RequireAPIKey:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from handlers):
    every path but /health needs `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)")
                await openai_error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _messages(request: ChatCompletionRequest | TokenizeRequest) -> list[dict]:
    out = []
    for message in request.messages:
        entry = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
        if message.reasoning_content is not None:
            entry["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        out.append(entry)
    return out


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def create_app(chat_model: ChatModel, scheduler: Scheduler, settings: ServeSettings) -> FastAPI:
    server = Server(chat_model, scheduler, settings)
    app = FastAPI(title="qforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return openai_error(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        hint = "; see /v1/models, /v1/chat/completions, /v1/completions" if error.status_code == 404 else ""
        return openai_error(APIError(error.status_code, f"{error.detail}: {request.method} {request.url.path}{hint}"))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, error: Exception):
        return openai_error(APIError(500, f"{type(error).__name__}: {error}"))

    if settings.api_key:
        app.add_middleware(RequireAPIKey, key=settings.api_key)

    def model_card() -> dict:
        return {"id": settings.name, "object": "model", "created": 0, "owned_by": "qforge",
                "max_model_len": server.max_model_len}

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = parse(TokenizeRequest, await read_json(request, settings.max_body_bytes))
        server.check_model(body.model)
        if body.prompt is not None:
            tokens = await anyio.to_thread.run_sync(server.encode, body.prompt)
        else:
            tokens = await anyio.to_thread.run_sync(lambda: server.encode(_render(server, body)))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = parse(DetokenizeRequest, await read_json(request, settings.max_body_bytes))
        server.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < server.vocab_size]
        if bad:
            raise APIError(400, f"tokens outside the vocabulary [0, {server.vocab_size}): {bad[:5]}", "tokens")
        return {"prompt": chat_model.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat_completion(server, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(server, request)

    return app


def _render(server, body) -> str:
    messages = _messages(body)
    thinking = (body.chat_template_kwargs or {}).get("enable_thinking", True)
    try:
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
        return server.chat_model.render(messages, thinking, tools)
    except (ValueError, KeyError) as error:
        raise APIError(400, f"messages: {error}", "messages") from None


async def chat_completion(server: Server, request: Request):
    """POST /v1/chat/completions: the whole reply, or an event stream (`_chat_stream`)."""
    body = parse(ChatCompletionRequest, await read_json(request, server.settings.max_body_bytes),
                 {"vocab_size": server.vocab_size})
    server.check_model(body.model)
    thinking = body.enable_thinking()
    tools = [t.model_dump(exclude_none=True) for t in body.tools or ()] if body.tool_choice != "none" else []
    messages = _messages(body)

    def prepare() -> list[int]:
        try:
            text = server.chat_model.render(messages, thinking, tools)
        except (ValueError, KeyError) as error:
            raise APIError(400, f"messages: {error}", "messages") from None
        return server.encode(text)

    prompt = await anyio.to_thread.run_sync(prepare)
    limit_field = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = server.budget(len(prompt), body.limit(), server.settings.default_max_tokens, limit_field)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    spec = [(prompt, server.sampling(body, logprobs, i), max_tokens, body.stop_strings(), None)
            for i in range(body.n)]
    request_id, created = new_id("chatcmpl"), now()
    events = server.run(request, spec)
    if body.stream:
        return StreamingResponse(_chat_stream(server, body, request_id, created, len(prompt), events, tools),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts, picks, reasons, counts = [""] * body.n, [[] for _ in range(body.n)], [None] * body.n, [0] * body.n
    async for index, event in events:
        texts[index] += event.text
        picks[index] += event.picks
        reasons[index] = event.finish_reason or reasons[index]
        counts[index] = event.completion_tokens
    if await request.is_disconnected():
        return None
    choices = []
    for index in range(body.n):
        stream = ReasoningStream()
        reasoning, content = stream.feed(texts[index], final=True)
        message = {"role": "assistant", "content": content}
        if stream.text.lstrip().startswith("<think>"):
            message["reasoning_content"] = reasoning
        reason = reasons[index]
        if tools:
            content, calls = parse_tool_calls(content)
            if calls:
                message["content"] = content or None
                message["tool_calls"] = [{"id": new_id("call"), "type": "function", "function": call}
                                         for call in calls]
                reason = "tool_calls" if reason == "stop" else reason
        choice = {"index": index, "message": message, "finish_reason": reason, "logprobs": None}
        if body.logprobs:
            choice["logprobs"] = {"content": [server.chat_logprob(p, body.return_tokens_as_token_ids)
                                               for p in picks[index]]}
        choices.append(choice)
    return {"id": request_id, "object": "chat.completion", "created": created, "model": server.settings.name,
            "choices": choices, "usage": usage(len(prompt), sum(counts))}


async def completion(server: Server, request: Request):
    """POST /v1/completions (legacy text completions, `echo` and prompt logprobs included)."""
    body = parse(CompletionRequest, await read_json(request, server.settings.max_body_bytes),
                 {"vocab_size": server.vocab_size})
    server.check_model(body.model)
    prompts = []
    for entry in body.prompts():
        if isinstance(entry, str):
            prompts.append((entry, await anyio.to_thread.run_sync(server.encode, entry)))
        else:
            bad = [t for t in entry if not 0 <= t < server.vocab_size]
            if bad:
                raise APIError(400, f"prompt has token ids outside the vocabulary [0, {server.vocab_size}): "
                                    f"{bad[:5]}", "prompt")
            prompts.append((None, list(entry)))
    spec = []
    for text, ids in prompts:
        max_tokens = server.budget(len(ids), body.max_tokens, 16, "max_tokens")
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 returns nothing unless echo=true", "max_tokens")
        scoring = body.logprobs if body.echo and body.logprobs is not None else None
        spec += [(ids, server.sampling(body, body.logprobs, i), max_tokens, body.stop_strings(), scoring)
                 for i in range(body.n)]
    if body.stream and body.echo:
        raise APIError(400, "echo with stream=true is not supported; send stream=false", "echo")
    request_id, created = new_id("cmpl"), now()
    events = server.run(request, spec)
    if body.stream:
        return StreamingResponse(_completion_stream(server, body, request_id, created, spec, events),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    count = len(spec)
    texts, picks, reasons = [""] * count, [[] for _ in range(count)], [None] * count
    tokens, scored = [0] * count, [None] * count
    async for index, event in events:
        texts[index] += event.text
        picks[index] += event.picks
        reasons[index] = event.finish_reason or reasons[index]
        tokens[index] = event.completion_tokens
        scored[index] = event.prompt_logprobs if event.prompt_logprobs is not None else scored[index]
    if await request.is_disconnected():
        return None
    choices = []
    for index in range(count):
        text, ids = prompts[index // body.n]
        prompt_text = text if text is not None else server.chat_model.tokenizer.decode(ids, skip_special_tokens=False)
        choice = {"index": index, "text": (prompt_text if body.echo else "") + texts[index],
                  "finish_reason": reasons[index], "logprobs": None}
        if body.logprobs is not None:
            generated = [p.token for p in picks[index]]
            all_picks = (scored[index] or [None] * len(ids)) + picks[index] if body.echo else picks[index]
            all_tokens = ids + generated if body.echo else generated
            choice["logprobs"] = server.completion_logprobs(all_picks, all_tokens, 0,
                                                            body.return_tokens_as_token_ids)
        choices.append(choice)
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    return {"id": request_id, "object": "text_completion", "created": created, "model": server.settings.name,
            "choices": choices, "usage": usage(prompt_tokens, sum(tokens))}


async def _chat_stream(server: Server, body: ChatCompletionRequest, request_id: str, created: int,
                       prompt_tokens: int, events, tools: list) -> AsyncIterator[str]:
    def chunk(choices: list, **extra) -> str:
        return _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                     "model": server.settings.name, "choices": choices, **extra})

    splitters = [ReasoningStream() for _ in range(body.n)]
    held = [""] * body.n  # with tools, the answer is sent once complete (tool calls are parsed from it)
    counts = [0] * body.n
    for index in range(body.n):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    try:
        async for index, event in events:
            counts[index] = event.completion_tokens
            reasoning, content = splitters[index].feed(event.text, final=event.finish_reason is not None)
            delta = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            reason = event.finish_reason
            if tools:
                held[index] += content
                if reason is not None:
                    text, calls = parse_tool_calls(held[index])
                    if text:
                        delta["content"] = text
                    if calls:
                        delta["tool_calls"] = [{"index": i, "id": new_id("call"), "type": "function",
                                                "function": call} for i, call in enumerate(calls)]
                        reason = "tool_calls" if reason == "stop" else reason
            elif content:
                delta["content"] = content
            as_ids = body.return_tokens_as_token_ids
            logprobs = {"content": [server.chat_logprob(p, as_ids) for p in event.picks]} if body.logprobs else None
            if delta or reason or logprobs:
                yield chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}])
    except APIError as error:
        yield _sse(error.body())
        return
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=usage(prompt_tokens, sum(counts)))
    yield _sse("[DONE]")


async def _completion_stream(server: Server, body: CompletionRequest, request_id: str, created: int, spec: list,
                             events) -> AsyncIterator[str]:
    counts = [0] * len(spec)
    try:
        async for index, event in events:
            counts[index] = event.completion_tokens
            logprobs = None
            if body.logprobs is not None:
                logprobs = server.completion_logprobs(event.picks, [p.token for p in event.picks], 0,
                                                       body.return_tokens_as_token_ids)
            yield _sse({"id": request_id, "object": "text_completion", "created": created,
                        "model": server.settings.name, "choices": [{"index": index, "text": event.text,
                        "logprobs": logprobs, "finish_reason": event.finish_reason}]})
    except APIError as error:
        yield _sse(error.body())
        return
    if body.stream_options and body.stream_options.include_usage:
        prompt_tokens = sum(len(s[0]) for s in spec[::body.n])
        yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": server.settings.name,
                    "choices": [], "usage": usage(prompt_tokens, sum(counts))})
    yield _sse("[DONE]")


class OpenAIErrorH11(H11Protocol):
    """uvicorn's h11 protocol, answering malformed HTTP (bad Content-Length, garbage request lines) with an
    OpenAI-shaped JSON 400 instead of plain text; the connection is closed as before."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(APIError(400, f"malformed HTTP request: {msg}").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def uvicorn_config(app, backlog: int) -> uvicorn.Config:
    return uvicorn.Config(app, http=OpenAIErrorH11, log_level="warning", backlog=backlog, timeout_keep_alive=30,
                          timeout_graceful_shutdown=5, lifespan="off")


def is_loopback(host: str) -> bool:
    try:
        return all(info[4][0].startswith("127.") or info[4][0] == "::1"
                   for info in socket.getaddrinfo(host, None))
    except OSError:
        return False


class BackgroundServer:
    """Serves an ASGI app with uvicorn on a thread: `with BackgroundServer(app) as s: s.url` (port 0: any)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, backlog: int = 2048, on_stop=None):
        self.socket = bind(host, port, backlog)
        self.host, self.port = self.socket.getsockname()[:2]
        self.on_stop = on_stop
        self.server = uvicorn.Server(uvicorn_config(app, backlog))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="qforge-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "BackgroundServer":
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()
        if self.on_stop is not None:
            self.on_stop()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket with a deep backlog (Python's default of 5 resets bursts of connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def serve_model(chat_model: ChatModel, *, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16,
                max_waiting: int = 256, **settings) -> BackgroundServer:
    """A checkpoint served on a thread (not started): what recipes use for a local model."""
    scheduler = Scheduler(chat_model, max_batch=max_batch, max_waiting=max_waiting)
    settings.setdefault("name", chat_model.name)
    app = create_app(chat_model, scheduler, ServeSettings(**settings))
    return BackgroundServer(app, host, port, on_stop=scheduler.close)


__all__ = ["BackgroundServer", "ServeSettings", "create_app", "is_loopback", "serve_model"]
