"""OpenAI-compatible chat-completions client: the one protocol every recipe speaks.

The same client talks to qforge's local server, a vLLM server or a hosted OpenAI-compatible API. The
transport and timeouts are the `openai` SDK's; the retries are qforge's, since a flaky endpoint also answers
200 with a body that is not JSON, is cut short, is an event stream, carries `{"error": ...}` or has the wrong
shape: those are retried like a 5xx (exponential backoff, `Retry-After` honoured but capped by `max_backoff`).
qforge also bounds the requests in flight, spaces sends for a rate limit, keeps an on-disk cache of replies
keyed by the request (an interrupted run resumes where it stopped), and turns every failure into a one-line
`ChatClientError` for that request only. With `suppress_ids` every request
carries `logit_bias` -100 for those ids: a pruned (CJK-free) model stays CJK-free on servers such as vLLM
that ignore generation_config.json's `suppress_tokens`. `complete` speaks the legacy text-completions API
the same way (a prompt of token ids scored with echo + logprobs: an endpoint teacher for distillation).
"""
from __future__ import annotations

import email.utils
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

from ..errors import EndpointError
from ..files import write_json

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
    def from_response(cls, response: Any, cached: bool = False) -> "ChatReply":
        """The first choice of a chat-completions body; a ValueError for any other shape."""
        choice = _choices(response, "chat-completions")[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise ValueError(f"not a chat-completions response (choices[0].message is not an object): "
                             f"{_snippet(response)}")
        for name in ("content", "reasoning_content"):
            if not isinstance(message.get(name), (str, type(None))):
                raise ValueError(f"choices[0].message.{name} is not a string: {_snippet(response)}")
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ValueError(f"choices[0].message.tool_calls is not a list: {_snippet(response)}")
        return cls(content=message.get("content") or "", reasoning_content=message.get("reasoning_content"),
                   finish_reason=choice.get("finish_reason"), usage=_usage(response),
                   model=str(response.get("model") or ""), cached=cached, tool_calls=tuple(calls))


def _completion_response(response: Any, cached: bool = False) -> dict:
    """A text-completions body as it came (every choice carries a `text`); a ValueError for any other shape."""
    if not all(isinstance(choice.get("text"), str) for choice in _choices(response, "completions")):
        raise ValueError(f"not a completions response (a choice without text): {_snippet(response)}")
    _usage(response)
    return response


def _choices(response: Any, kind: str) -> list[dict]:
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices or not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ValueError(f"not a {kind} response (no choices): {_snippet(response)}")
    return choices


def _usage(response: dict) -> dict:
    """The token counts of a reply ({} when it has none); counts that are not integers are a wrong shape."""
    usage = response.get("usage") or {}
    if not isinstance(usage, dict) or not all(isinstance(usage.get(name, 0), int) and usage.get(name, 0) >= 0
                                              for name in ("prompt_tokens", "completion_tokens")):
        raise ValueError(f"usage is not a set of token counts: {_snippet(usage)}")
    return usage


def _snippet(value: Any, limit: int = 200) -> str:
    """A reply on one line, cut at `limit` characters (messages stay one line whatever the server sent)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


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


class _Transient(Exception):
    """One failed attempt worth repeating (a retryable status, the transport, a malformed 2xx reply)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


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
        self.backoff, self.max_backoff = backoff, max_backoff
        # The SDK's own HTTP client class (its transport defaults), with a hook that spaces every send; the
        # retries are qforge's (`_send`): the SDK's cannot retry a 200 whose body is unusable.
        http = openai.DefaultHttpxClient(event_hooks={"request": [lambda request: self._wait_for_rate_limit()]})
        self._openai = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout,
                                     max_retries=0, http_client=http)

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
        """`parse(response, cached)` of the cached or posted reply (a cached entry it refuses is fetched again)."""
        key = None
        if self.cache is not None:
            identity = {"namespace": self.cache_namespace, "body": body, "tag": cache_tag}
            key = hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
            hit = self.cache.get(key)
            if hit is not None:
                try:
                    result = parse(hit, cached=True)
                except ValueError as error:
                    warnings.warn(f"ignoring a cached reply of another shape ({error}); the request is sent again")
                else:
                    self._count(cache_hits=1)
                    return result
        response, result = self._send("POST", path, body, parse)
        usage = _usage(response)
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
        return self._send("GET", "/models", None, _model_ids)[1]

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

    def _send(self, method: str, path: str, body: dict | None, parse) -> tuple[dict, Any]:
        """(reply, `parse(reply, cached=False)`) after up to `max_retries` retries of what is transient: a
        retryable status, a timeout or a broken connection, and a 2xx reply that is not a usable answer (not
        JSON, cut short, an event stream, `{"error": ...}` (gateways under load), a shape `parse` refuses). Waits
        double from `backoff` up to `max_backoff` (`Retry-After` honoured up to `max_backoff`). Whatever still
        fails is one ChatClientError line; no decoder or transport exception escapes."""
        where = f"{method} {self.base_url}{path}"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
                wait = failure.retry_after if failure.retry_after is not None and failure.retry_after > 0 else \
                    self.backoff * 2 ** min(attempt - 1, 30) * random.uniform(0.5, 1.0)
                time.sleep(min(wait, self.max_backoff))
            try:
                response = self._attempt(method, path, body)
                return response, parse(response, cached=False)
            except _Transient as error:
                failure = error
            except ValueError as error:  # parse refused the shape
                failure = _Transient(f"HTTP 200 of the wrong shape: {error}")
        attempts = f"{self.max_retries + 1} attempt{'s' * bool(self.max_retries)}"
        raise ChatClientError(f"{where} failed ({attempts}); the last: {failure}", failure.status,
                              failure.retry_after)

    def _attempt(self, method: str, path: str, body: dict | None) -> dict:
        """One request through the SDK: the reply as a JSON object, a _Transient, or a ChatClientError (a status
        that retrying cannot change)."""
        try:
            with self._slots:
                if method == "GET":
                    response = self._openai.get(path, cast_to=object)
                else:
                    response = self._openai.post(path, body=body, cast_to=object)
        except openai.APIStatusError as error:
            retry_after = _retry_after(error.response.headers)
            message = f"HTTP {error.status_code}: {_snippet(error.response.text, 500)}"
            if error.status_code in RETRYABLE_STATUS:
                raise _Transient(message, error.status_code, retry_after) from None
            raise ChatClientError(f"{method} {self.base_url}{path} -> {message}", error.status_code,
                                  retry_after) from None
        except openai.APITimeoutError:
            raise _Transient(f"timed out after {self.timeout} s") from None
        except openai.APIConnectionError as error:
            cause = error.__cause__ or error
            raise _Transient(f"connection failed: {type(cause).__name__}: {_snippet(str(cause))}") from None
        except openai.OpenAIError as error:
            raise ChatClientError(f"{method} {self.base_url}{path}: {type(error).__name__}: "
                                  f"{_snippet(str(error))}") from None
        except ValueError as error:  # a JSON content type over a body that is not JSON (or is cut short)
            raise _Transient(f"HTTP 200 whose body is not JSON ({_snippet(str(error))})") from None
        if isinstance(response, str):  # a server that does not say application/json
            try:
                response = json.loads(response)
            except ValueError:
                kind = "an event stream" if response.lstrip().startswith(("data:", "event:")) else "not JSON"
                raise _Transient(f"HTTP 200 whose body is {kind}: {_snippet(response)}") from None
        if not isinstance(response, dict):
            raise _Transient(f"HTTP 200 whose body is not a JSON object: {_snippet(response)}")
        if "error" in response:
            error = response["error"]
            text = error.get("message", error) if isinstance(error, dict) else error
            raise _Transient(f"HTTP 200 carrying an error: {_snippet(text)}")
        return response


def _model_ids(response: dict, cached: bool = False) -> list[str]:
    data = response.get("data")
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise ValueError(f"not a model list: {_snippet(response)}")
    return [m["id"] for m in data]


def _retry_after(headers) -> float | None:
    """Seconds a server asks to wait (`Retry-After` in seconds or as an HTTP date), if it says."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
