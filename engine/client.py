"""OpenAI-compatible chat-completions client: the one protocol every recipe speaks.

The same client talks to qforge's local server, a vLLM server or a hosted OpenAI-compatible API. The
transport, timeouts and retries are the `openai` SDK's (exponential backoff, `Retry-After` honoured but
capped by `max_backoff`); on top of it qforge bounds the requests in flight, spaces sends for a rate limit,
keeps an on-disk cache of replies keyed by the request (an interrupted run resumes where it stopped), and
turns every failure into a `ChatClientError` for that request only. With `suppress_ids` every request
carries `logit_bias` -100 for those ids: a pruned (CJK-free) model stays CJK-free on servers such as vLLM
that ignore generation_config.json's `suppress_tokens`. `complete` speaks the legacy text-completions API
the same way (a prompt of token ids scored with echo + logprobs: an endpoint teacher for distillation).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import openai
from tqdm.auto import tqdm

from .errors import EndpointError
from .files import write_json

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ChatClientError(EndpointError):
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
    tool_calls: tuple = ()  # OpenAI `tool_calls` of the message (servers that parse <tool_call> blocks)

    @classmethod
    def from_response(cls, response: dict, cached: bool = False) -> "ChatReply":
        try:
            choice = response["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(f"not a chat-completions response (missing {error}): {str(response)[:200]}")
        return cls(content=message.get("content") or "", reasoning_content=message.get("reasoning_content"),
                   finish_reason=choice.get("finish_reason"), usage=response.get("usage") or {},
                   model=response.get("model", ""), cached=cached, tool_calls=tuple(message.get("tool_calls") or ()))


def _completion_response(response: dict, cached: bool = False) -> dict:
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise ValueError(f"not a completions response (no choices): {str(response)[:200]}")
    return response


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


class _OpenAI(openai.OpenAI):
    """The SDK client with qforge's backoff: every retryable status is retried (even with a long
    Retry-After), waits are capped by `max_backoff`, retries are counted and sends rate-limited."""

    def __init__(self, *, backoff: float, max_backoff: float, on_retry, **kwargs):
        super().__init__(**kwargs)
        self._backoff, self._max_backoff, self._on_retry = backoff, max_backoff, on_retry

    def _should_retry(self, response) -> bool:
        if response.status_code in RETRYABLE_STATUS:
            return True
        return super()._should_retry(response)

    def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None) -> float:
        self._on_retry()
        retry_after = self._parse_retry_after_header(response_headers)
        if retry_after is not None and retry_after > 0:
            return min(retry_after, self._max_backoff)
        attempt = options.get_max_retries(self.max_retries) - remaining_retries
        return min(self._max_backoff, self._backoff * 2 ** min(attempt, 30)) * random.uniform(0.5, 1.0)


class ChatClient:
    """Chat completions against `base_url` (e.g. `http://127.0.0.1:8000/v1`).

    `params` are default body fields (temperature, max_tokens, seed, ...) that each call may override.
    The API key comes from `api_key` or the environment variable named by `api_key_env`. Cached replies
    are keyed by `cache_namespace` (default: the base URL) and the request body.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 timeout: float = 120.0, max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0,
                 concurrency: int = 4, cache_dir: str | os.PathLike | None = None, params: dict | None = None,
                 cache_namespace: str | None = None, requests_per_minute: float | None = None,
                 suppress_ids: Sequence[int] = ()):
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
        self.concurrency = concurrency
        self.params = dict(params or {})
        if suppress_ids:
            bias = {str(int(i)): -100 for i in sorted(set(suppress_ids))}
            self.params["logit_bias"] = {**bias, **self.params.get("logit_bias", {})}
        self.cache = ResponseCache(cache_dir) if cache_dir else None
        self.cache_namespace = cache_namespace or self.base_url
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_send = 0.0
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
        # The SDK's own HTTP client class (its transport defaults), with a hook that spaces every send.
        http = openai.DefaultHttpxClient(event_hooks={"request": [lambda request: self._wait_for_rate_limit()]})
        self._openai = _OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout,
                               max_retries=max_retries, http_client=http, backoff=backoff, max_backoff=max_backoff,
                               on_retry=lambda: self._count(retries=1))

    def chat(self, messages: Sequence[dict], *, cache_tag: str | None = None, **params: Any) -> ChatReply:
        """One completion. `cache_tag` distinguishes otherwise identical requests (e.g. sample #3 of 8)."""
        body = {"model": self.model, "messages": list(messages), **self.params, **params}
        return self._request("/chat/completions", body, cache_tag, ChatReply.from_response)

    def complete(self, prompt: str | Sequence[int], *, cache_tag: str | None = None, **params: Any) -> dict:
        """One legacy text completion (`/completions`; a prompt of token ids is scored as given, e.g. with
        echo + logprobs): the response body, after the same cache, retries and accounting as `chat`."""
        body = {"model": self.model, "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
                **self.params, **params}
        return self._request("/completions", body, cache_tag, _completion_response)

    def _request(self, path: str, body: dict, cache_tag: str | None, parse):
        """`parse(response, cached)` of the cached or posted reply; a reply it refuses is a ChatClientError."""
        key = None
        if self.cache is not None:
            identity = {"namespace": self.cache_namespace, "body": body, "tag": cache_tag}
            key = hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
            hit = self.cache.get(key)
            if hit is not None:
                self._count(cache_hits=1)
                return parse(hit, cached=True)
        response = self._post(path, body)
        try:
            result = parse(response, cached=False)
        except ValueError as error:
            raise ChatClientError(f"{self.base_url}{path}: {error}") from None
        usage = response.get("usage") or {}
        self._count(requests=1, prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0))
        if key is not None:
            self.cache.put(key, body, response)
        return result

    def chat_many(self, conversations: Sequence[Sequence[dict]], *, cache_tags: Sequence[str | None] | None = None,
                  errors: str = "raise", progress: bool = True, desc: str = "chat", **params: Any) -> list:
        """Completions for many conversations, `concurrency` at a time, in input order.

        With `errors="return"` a request that fails for good yields its `ChatClientError` in place of a
        reply (the others still complete); with `errors="raise"` the first failure is raised at the end.
        """
        return self._many(lambda item, tag: self.chat(item, cache_tag=tag, **params), conversations, cache_tags,
                          errors, progress, desc)

    def complete_many(self, prompts: Sequence, *, cache_tags: Sequence[str | None] | None = None,
                      errors: str = "raise", progress: bool = True, desc: str = "complete", **params: Any) -> list:
        """`complete` for many prompts, `concurrency` at a time, in input order; `errors` as in `chat_many`."""
        return self._many(lambda item, tag: self.complete(item, cache_tag=tag, **params), prompts, cache_tags,
                          errors, progress, desc)

    def _many(self, call, items: Sequence, cache_tags, errors: str, progress: bool, desc: str) -> list:
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        tags = list(cache_tags) if cache_tags is not None else [None] * len(items)
        if len(tags) != len(items):
            raise ValueError(f"{len(tags)} cache_tags for {len(items)} requests")

        def one(index: int):
            try:
                return call(items[index], tags[index])
            except ChatClientError as error:
                return error
            except Exception as error:  # anything else the transport raises ends this request, not the run
                return ChatClientError(f"{type(error).__name__}: {error}")

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(tqdm(pool.map(one, range(len(items))), total=len(items), desc=desc,
                                disable=not progress))
        failures = [r for r in results if isinstance(r, ChatClientError)]
        if failures and errors == "raise":
            raise ChatClientError(f"{len(failures)} of {len(results)} requests failed; first: {failures[0]}",
                                  failures[0].status)
        return results

    def models(self) -> list[str]:
        return [entry.id for entry in self._openai.models.list()]

    def close(self) -> None:
        self._openai.close()

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

    def _post(self, path: str, body: dict) -> dict:
        """The SDK's POST (its retries and timeouts); every failure becomes a ChatClientError."""
        try:
            with self._slots:
                response = self._openai.post(path, body=body, cast_to=object)
        except openai.APIStatusError as error:
            retry_after = error.response.headers.get("retry-after")
            raise ChatClientError(f"POST {self.base_url}{path} -> HTTP {error.status_code}: "
                                  f"{error.response.text[:500]}", error.status_code,
                                  float(retry_after) if retry_after and retry_after.isdigit() else None) from None
        except openai.APITimeoutError:
            raise ChatClientError(f"POST {self.base_url}{path} timed out after {self.timeout} s "
                                  f"({self.max_retries + 1} attempts)") from None
        except openai.APIError as error:
            raise ChatClientError(f"POST {self.base_url}{path} failed after {self.max_retries + 1} attempts: "
                                  f"{type(error).__name__}: {error}") from None
        if isinstance(response, str):  # a server that does not say application/json
            try:
                response = json.loads(response)
            except ValueError:
                pass
        if not isinstance(response, dict):
            raise ChatClientError(f"POST {self.base_url}{path}: the reply is not a JSON object: {str(response)[:200]}")
        return response
