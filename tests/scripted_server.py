"""A deterministic stand-in model for recipe tests: canned replies over real loopback HTTP.

`ChatServer(ScriptedBackend(reply), port=0)` serves `reply(request) -> str` as an OpenAI chat-completions
endpoint (request bodies validated by qforge's own protocol models, uvicorn underneath). A reply function
may raise `RequestError(message, status)` to answer with that HTTP error. `raw_server(replies)` is the
misbehaving kind: a loopback socket answering each connection with the next raw bytes, whatever they are.
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import Callable

import anyio
from fastapi import FastAPI, Request

from qforge.engine.thinking import split_think
from qforge.engine.serve.app import BackgroundServer, openai_error, parse, read_json
from qforge.engine.serve.protocol import APIError, ChatCompletionRequest, new_id, now, usage


class RequestError(APIError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(status, message)


@dataclass(frozen=True)
class ScriptedRequest:
    messages: list[dict]
    max_tokens: int | None
    temperature: float | None
    stop: tuple[str, ...]
    logit_bias: dict | None = None
    top_p: float = 1.0  # the sampling fields the request carried (evaluation tests check they arrive)
    top_k: int = 0
    seed: int | None = None


class ScriptedBackend:
    def __init__(self, reply: Callable[[ScriptedRequest], str], name: str = "scripted"):
        self.reply = reply
        self.name = name


def scripted_app(backend) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(APIError)
    async def _error(request, error):
        return openai_error(error)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse(ChatCompletionRequest, await read_json(request, 2 ** 24))
        if body.model not in (None, backend.name):
            raise APIError(404, f"model {body.model!r} is not served here; available: {backend.name!r}")
        scripted = ScriptedRequest([{"role": m.role, "content": m.text()} for m in body.messages], body.limit(),
                                   body.temperature, body.stop_strings(), body.logit_bias, body.top_p, body.top_k,
                                   body.seed)
        try:
            text = await anyio.to_thread.run_sync(backend.reply, scripted)
        except APIError:
            raise
        except Exception as error:
            raise APIError(500, f"{type(error).__name__}: {error}") from None
        cuts = [i for i in (text.find(s) for s in scripted.stop) if i >= 0]
        text = text[:min(cuts)] if cuts else text
        reasoning, content = split_think(text.strip())
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        words = sum(len(m["content"].split()) for m in scripted.messages)
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": backend.name,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage(words, len(text.split()))}

    return app


class ChatServer(BackgroundServer):
    def __init__(self, backend, host: str = "127.0.0.1", port: int = 0):
        super().__init__(scripted_app(backend), host, port)
        self.backend = backend



def raw_server(responses: list[bytes]) -> tuple[str, list[bytes]]:
    """A loopback socket server answering each connection with the next raw bytes (then closing it): the base
    URL and the list of the answers sent so far."""
    listener = socket.create_server(("127.0.0.1", 0))
    served = []

    def run():
        for raw in responses:
            connection, _ = listener.accept()
            connection.recv(65536)
            served.append(raw)
            connection.sendall(raw)
            connection.close()
        listener.close()

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1", served


def http_reply(body: bytes, status: str = "200 OK", content_type: str = "application/json",
               length: int | None = None) -> bytes:
    """A raw HTTP/1.1 response; `length` other than len(body) announces more than is sent (a body cut short)."""
    return (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status.encode(), content_type.encode(), len(body) if length is None else length, body))
