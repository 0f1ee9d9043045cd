"""OpenAI-compatible chat-completions client: the one protocol every recipe speaks.

The same client talks to qforge's local server, a vLLM server or a hosted OpenAI-compatible API. It
retries transient failures with exponential backoff, bounds the number of requests in flight, and keeps
an on-disk cache of replies keyed by the request, so a run that is interrupted resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from .files import write_json

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ChatClientError(RuntimeError):
    """A request that failed for good: a non-retryable status, or retries exhausted."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class ChatReply:
    content: str
    reasoning_content: str | None
    finish_reason: str | None
    usage: dict = field(default_factory=dict)
    model: str = ""
    cached: bool = False

    @classmethod
    def from_response(cls, response: dict, cached: bool = False) -> "ChatReply":
        try:
            choice = response["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(f"not a chat-completions response (missing {error}): {str(response)[:200]}")
        return cls(content=message.get("content") or "", reasoning_content=message.get("reasoning_content"),
                   finish_reason=choice.get("finish_reason"), usage=response.get("usage") or {},
                   model=response.get("model", ""), cached=cached)


class ResponseCache:
    """One JSON file per request under `root/<2 hex>/<sha256>.json`, written atomically."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["response"]
        except (OSError, ValueError, KeyError) as error:
            warnings.warn(f"ignoring unreadable cache entry {path} ({error}); the request is sent again")
            return None

    def put(self, key: str, request: dict, response: dict) -> None:
        path = self._path(key)
        write_json(path, {"request": request, "response": response}, indent=None)


@dataclass
class ClientSettings:
    """The `client:` section of recipe configs: keyword arguments of `ChatClient`."""

    timeout: float = 120.0
    max_retries: int = 4
    concurrency: int = 4
    cache_dir: str | None = None  # replies cached here make an interrupted run resume
    requests_per_minute: float | None = None  # spaces requests out to stay under an API's rate limit


class ChatClient:
    """Chat completions against `base_url` (e.g. `http://127.0.0.1:8000/v1`).

    `params` are default body fields (temperature, max_tokens, seed, ...) that each call may override.
    The API key comes from `api_key` or the environment variable named by `api_key_env`. Cached replies
    are keyed by `cache_namespace` (default: the base URL) and the request body.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 timeout: float = 120.0, max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0,
                 concurrency: int = 4, cache_dir: str | os.PathLike | None = None, params: dict | None = None,
                 cache_namespace: str | None = None, requests_per_minute: float | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"environment variable {api_key_env} (api_key_env) is not set")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self.params = dict(params or {})
        self.cache = ResponseCache(cache_dir) if cache_dir else None
        self.cache_namespace = cache_namespace or self.base_url
        self._api_key = api_key
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_send = 0.0
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def chat(self, messages: Sequence[dict], *, cache_tag: str | None = None, **params: Any) -> ChatReply:
        """One completion. `cache_tag` distinguishes otherwise identical requests (e.g. sample #3 of 8)."""
        body = {"model": self.model, "messages": list(messages), **self.params, **params}
        key = None
        if self.cache is not None:
            identity = {"namespace": self.cache_namespace, "body": body, "tag": cache_tag}
            key = hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
            hit = self.cache.get(key)
            if hit is not None:
                self._count(cache_hits=1)
                return ChatReply.from_response(hit, cached=True)
        response = self._post_with_retries("/chat/completions", body)
        reply = ChatReply.from_response(response)
        self._count(requests=1, prompt_tokens=reply.usage.get("prompt_tokens", 0),
                    completion_tokens=reply.usage.get("completion_tokens", 0))
        if key is not None:
            self.cache.put(key, body, response)
        return reply

    def chat_many(self, conversations: Sequence[Sequence[dict]], *, cache_tags: Sequence[str | None] | None = None,
                  errors: str = "raise", progress: bool = True, desc: str = "chat", **params: Any) -> list:
        """Completions for many conversations, `concurrency` at a time, in input order.

        With `errors="return"` a request that fails for good yields its `ChatClientError` in place of a
        reply (the others still complete); with `errors="raise"` the first failure is raised at the end.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        tags = list(cache_tags) if cache_tags is not None else [None] * len(conversations)
        if len(tags) != len(conversations):
            raise ValueError(f"{len(tags)} cache_tags for {len(conversations)} conversations")

        def one(index: int):
            try:
                return self.chat(conversations[index], cache_tag=tags[index], **params)
            except ChatClientError as error:
                return error

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(tqdm(pool.map(one, range(len(conversations))), total=len(conversations),
                                desc=desc, disable=not progress))
        failures = [r for r in results if isinstance(r, ChatClientError)]
        if failures and errors == "raise":
            raise ChatClientError(f"{len(failures)} of {len(results)} requests failed; first: {failures[0]}",
                                  failures[0].status)
        return results

    def models(self) -> list[str]:
        response = self._request("GET", "/models", None)
        return [entry["id"] for entry in response.get("data", [])]

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self.stats[name] += amount

    def _wait_for_rate_limit(self) -> None:
        """Sends (retries included) start at least 60/requests_per_minute seconds apart; cache hits are free."""
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + self._interval
        time.sleep(start - now)

    def _post_with_retries(self, path: str, body: dict) -> dict:
        for attempt in range(self.max_retries + 1):
            try:
                with self._slots:
                    self._wait_for_rate_limit()
                    response = self._request("POST", path, body)
                ChatReply.from_response(response)  # a malformed 200 is retried like a transient failure
                return response
            except ChatClientError as error:
                if error.status not in RETRYABLE_STATUS or attempt == self.max_retries:
                    raise
                delay = error.retry_after
            except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as error:
                if attempt == self.max_retries:
                    raise ChatClientError(f"{self.base_url}{path} failed after {attempt + 1} attempts: {error}")
                delay = None
            self._count(retries=1)
            if delay is None:
                delay = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body, ensure_ascii=False).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")[:500]
            retry_after = error.headers.get("Retry-After") if error.headers else None
            raise ChatClientError(f"{method} {self.base_url}{path} -> HTTP {error.code}: {detail}", error.code,
                                  float(retry_after) if retry_after and retry_after.isdigit() else None) from None
