"""A local OpenAI-compatible chat server over qforge generation (or over scripted replies for tests).

    python -m qforge.engine.serve --model DIR [--port 8000] [--host 127.0.0.1]
    python -m qforge.engine.serve --scripted RULES.json     # canned replies, e.g. a scripted judge

Endpoints: `POST /v1/chat/completions` (non-streaming, n=1) and `GET /v1/models`. Requests that arrive
together are decoded as one batch when they share sampling settings. Qwen3 reasoning is returned in
`reasoning_content`, the answer in `content` (as vLLM's qwen3 reasoning parser does).
"""
from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from qforge.engine.chat import ChatModel, Completion, read_token_ids
from qforge.engine.thinking import split_think
from qforge.engine.client import ChatClient

ROLES = ("system", "user", "assistant", "tool")


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple = ()
    enable_thinking: bool = True
    model: str | None = None

    def batch_key(self) -> tuple:
        """Requests with equal keys can be decoded in one `generate` call."""
        return (self.max_tokens, self.temperature, self.top_p, self.top_k, self.presence_penalty, self.seed,
                self.stop, self.enable_thinking)


def _number(body: dict, name: str, default, kind, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"'{name}' must be in [{low}, {high}], got {value!r}")
    return kind(value)


def _message(index: int, message) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"messages[{index}] needs a 'role' in {ROLES}")
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: only text is supported
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise RequestError(f"messages[{index}].content: only text parts are supported")
        content = "".join(p.get("text", "") for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{index}].content must be a string")
    out = {"role": message["role"], "content": content}
    if isinstance(message.get("reasoning_content"), str):
        out["reasoning_content"] = message["reasoning_content"]
    return out


def parse_chat_request(body, default_max_tokens: int) -> ChatRequest:
    """Validates an OpenAI chat-completions body; errors name the offending field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("stream"):
        raise RequestError("streaming is not supported by this server; send stream=false")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings")
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise RequestError("'chat_template_kwargs' must be an object")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        messages=tuple(_message(i, m) for i, m in enumerate(messages)),
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, int, 1),
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 1e-9, 1.0),
        top_k=max(0, _number(body, "top_k", 0, int, -1)),  # vLLM uses -1 for "off"
        presence_penalty=_number(body, "presence_penalty", 0.0, float, -2.0, 2.0),
        seed=_number(body, "seed", None, int),
        stop=tuple(stop),
        enable_thinking=bool(template_kwargs.get("enable_thinking", True)),
        model=body.get("model"),
    )


class Backend(Protocol):
    name: str

    def complete(self, request: ChatRequest) -> Completion: ...


class ScriptedBackend:
    """Canned replies chosen by a function of the request: a deterministic stand-in model for tests."""

    def __init__(self, reply: Callable[[ChatRequest], str], name: str = "scripted"):
        self.reply = reply
        self.name = name

    @classmethod
    def from_rules(cls, path: str | Path, name: str = "scripted") -> "ScriptedBackend":
        """Rules file: a JSON list of {"contains": str, "replies": [str, ...]}.

        The first rule whose `contains` occurs in the last message answers; its replies are used in turn
        and the last one repeats. A request that matches no rule is an error (HTTP 400).
        """
        rules = json.loads(Path(path).read_text(encoding="utf-8"))
        for i, rule in enumerate(rules):
            if not isinstance(rule.get("contains"), str) or not rule.get("replies"):
                raise ValueError(f"{path}: rule {i} needs 'contains' (string) and a non-empty 'replies' list")
        turns = [0] * len(rules)
        lock = threading.Lock()

        def reply(request: ChatRequest) -> str:
            last = request.messages[-1]["content"]
            for i, rule in enumerate(rules):
                if rule["contains"] in last:
                    with lock:
                        turn, turns[i] = turns[i], turns[i] + 1
                    return rule["replies"][min(turn, len(rule["replies"]) - 1)]
            raise RequestError(f"no scripted rule matches the last message: {last[:120]!r}")

        return cls(reply, name)

    def complete(self, request: ChatRequest) -> Completion:
        text = self.reply(request)
        cuts = [i for i in (text.find(s) for s in request.stop if s) if i >= 0]
        return Completion(text=text[:min(cuts)] if cuts else text, finish_reason="stop",
                          prompt_tokens=sum(len(m["content"].split()) for m in request.messages),
                          completion_tokens=len(text.split()))


@dataclass
class _Pending:
    request: ChatRequest
    future: Future = field(default_factory=Future)


class ModelBackend:
    """Serves a `ChatModel`; a worker thread gathers concurrent requests into batches."""

    def __init__(self, chat_model: ChatModel, max_batch: int = 16, batch_wait: float = 0.01):
        self.chat_model = chat_model
        self.name = chat_model.name
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="qforge-generate", daemon=True)
        self._worker.start()

    def complete(self, request: ChatRequest) -> Completion:
        pending = _Pending(request)
        self._queue.put(pending)
        return pending.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join()

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            groups: dict[tuple, list[_Pending]] = {}
            for pending in batch:
                groups.setdefault(pending.request.batch_key(), []).append(pending)
            for group in groups.values():
                self._decode(group)

    def _decode(self, group: list[_Pending]) -> None:
        first = group[0].request
        try:
            completions = self.chat_model.chat(
                [p.request.messages for p in group], enable_thinking=first.enable_thinking,
                max_new_tokens=first.max_tokens, stop=first.stop, temperature=first.temperature,
                top_p=first.top_p, top_k=first.top_k, presence_penalty=first.presence_penalty, seed=first.seed)
        except Exception as error:  # reported to every waiting request as a server error
            for pending in group:
                pending.future.set_exception(error)
            return
        for pending, completion in zip(group, completions):
            pending.future.set_result(completion)


def completion_response(backend_name: str, completion: Completion) -> dict:
    reasoning, content = split_think(completion.text.strip())
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": backend_name,
        "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason}],
        "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                  "total_tokens": completion.prompt_tokens + completion.completion_tokens},
    }


class _Handler(BaseHTTPRequestHandler):
    server: "ChatServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet by default; the server is used inside tests and recipes
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": self.server.backend.name, "object": "model", "created": 0, "owned_by": "qforge"}]})
        elif self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._error(404, f"unknown path {self.path}; try /v1/models or /v1/chat/completions")

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"unknown path {self.path}; POST /v1/chat/completions")
            return
        backend = self.server.backend
        try:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length).decode("utf-8"))
            except ValueError as error:
                raise RequestError(f"the request body is not valid JSON: {error}") from None
            request = parse_chat_request(body, self.server.default_max_tokens)
            if request.model not in (None, backend.name):
                raise RequestError(f"model {request.model!r} is not served here; available: {backend.name!r}", 404)
            completion = backend.complete(request)
        except RequestError as error:
            self._error(error.status, str(error))
            return
        except Exception as error:
            self._error(500, f"{type(error).__name__}: {error}")
            return
        self._send(200, completion_response(backend.name, completion))


class ChatServer(ThreadingHTTPServer):
    """`ChatServer(backend, port=0).start()` serves on a background thread; `.url` is the API base."""

    daemon_threads = True

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 8000,
                 default_max_tokens: int = 1024, verbose: bool = False):
        super().__init__((host, port), _Handler)
        self.backend = backend
        self.default_max_tokens = default_max_tokens
        self.verbose = verbose
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "ChatServer":
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="qforge-serve", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()
        if hasattr(self.backend, "close"):
            self.backend.close()

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class EndpointSettings:
    """Where a recipe's model lives: a checkpoint served on loopback for the run, or an existing endpoint."""

    path: str | None = None  # local checkpoint directory
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1, a vLLM server or a hosted API
    model: str | None = None  # the model id at base_url
    api_key_env: str | None = None  # name of the environment variable holding the API key
    dtype: str = "float32"
    device: str = "cpu"
    suppress_ids: str | None = None  # local checkpoint: file of token ids never generated

    def check(self, key: str = "endpoint") -> None:
        """Raises a ValueError naming `key` (the settings' place in the recipe config) if incomplete."""
        if (self.path is None) == (self.base_url is None):
            raise ValueError(f"set exactly one of {key}.path (a checkpoint) or {key}.base_url (an endpoint)")
        if self.base_url and not self.model:
            raise ValueError(f"{key}.model (the model id served at {self.base_url}) is required with {key}.base_url")


@contextmanager
def open_endpoint(settings: EndpointSettings, **client_options) -> Iterator[ChatClient]:
    """A `ChatClient` for the settings; a local checkpoint is served on 127.0.0.1 until the block ends."""
    settings.check()
    if settings.base_url:
        yield ChatClient(settings.base_url, settings.model, api_key_env=settings.api_key_env, **client_options)
        return
    suppress = read_token_ids(settings.suppress_ids) if settings.suppress_ids else ()
    chat_model = ChatModel.load(settings.path, dtype=settings.dtype, device=settings.device, suppress_ids=suppress)
    # The port changes every run, so cached replies are keyed by the checkpoint (and its weights' age) unless
    # the caller names a namespace.
    weights = sorted(Path(settings.path).glob("*.safetensors"))
    namespace = f"checkpoint:{Path(settings.path).resolve()}:{max(w.stat().st_mtime_ns for w in weights)}"
    client_options.setdefault("cache_namespace", namespace)
    with ChatServer(ModelBackend(chat_model), port=0) as server:
        yield ChatClient(server.url, chat_model.name, **client_options)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qforge.engine.serve", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory (HF format with tokenizer files)")
    source.add_argument("--scripted", help="JSON rules file of canned replies (see ScriptedBackend.from_rules)")
    parser.add_argument("--name", help="model id served at /v1/models (default: the directory name)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    parser.add_argument("--max-tokens", type=int, default=1024, help="default max_tokens of a request")
    parser.add_argument("--suppress-ids", help="file of token ids never to generate (JSON list or one per line)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)

    if args.scripted:
        backend = ScriptedBackend.from_rules(args.scripted, name=args.name or "scripted")
    else:
        suppress = read_token_ids(args.suppress_ids) if args.suppress_ids else ()
        chat_model = ChatModel.load(args.model, dtype=args.dtype, device=args.device, suppress_ids=suppress,
                                    batch_size=args.max_batch, **({"name": args.name} if args.name else {}))
        backend = ModelBackend(chat_model, max_batch=args.max_batch)
    server = ChatServer(backend, args.host, args.port, default_max_tokens=args.max_tokens, verbose=args.verbose)
    print(f"serving {backend.name!r} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
