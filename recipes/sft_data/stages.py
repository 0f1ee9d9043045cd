"""Asking a model for many well-formed replies, and stage outputs that make a pipeline resumable.

A stage's output is three files under `stages/`: kept rows, drop records, and a meta file written last
holding the stage's fingerprint (its settings and inputs). A stage whose meta matches is skipped; a stage
that was interrupted, whose settings changed, or that lost requests to transient failures (timeouts, 5xx,
429 after the client's retries) runs again, and the client's response cache answers every request it
already sent.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from qforge.engine.serve.client import RETRYABLE_STATUS, ChatClient, ChatClientError, ChatReply
from qforge.recipes.common.files import read_jsonl, write_json, write_jsonl
from qforge.recipes.sft_data.filters import Malformed

PLACEHOLDER = re.compile(r"\{(\w+)\}")


def fill(template: str, fields: dict) -> str:
    """Substitutes {name} placeholders in one pass (braces inside substituted text are left alone)."""
    return PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)


def conversation(system: str, user: str, fields: dict) -> list[dict]:
    """The system (if any) and user messages of one request, from templates."""
    return ([{"role": "system", "content": fill(system, fields)}] if system else []) + [
        {"role": "user", "content": fill(user, fields)}]


def check_placeholders(template: str, allowed: set[str], key: str) -> None:
    unknown = set(PLACEHOLDER.findall(template)) - allowed
    if unknown:
        raise ValueError(f"{key} uses unknown placeholders {sorted(unknown)}; available: {sorted(allowed)}")


@dataclass
class Usage:
    """Tokens behind the replies a stage used (cached replies included) and what this run sent."""

    replies: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests_sent: int = 0
    cache_hits: int = 0
    failed_requests: int = 0  # attempts that failed for good (after the client's own retries)
    transient_failures: int = 0  # rows lost to timeouts/5xx/429: the stage is not marked finished

    def add_reply(self, reply: ChatReply) -> None:
        self.replies += 1
        self.prompt_tokens += int(reply.usage.get("prompt_tokens", 0))
        self.completion_tokens += int(reply.usage.get("completion_tokens", 0))
        self.requests_sent += not reply.cached
        self.cache_hits += reply.cached

    def cost(self, price_per_million: dict) -> float:
        return (self.prompt_tokens * price_per_million.get("prompt", 0.0)
                + self.completion_tokens * price_per_million.get("completion", 0.0)) / 1e6


@dataclass
class Answer:
    value: object = None  # the parsed reply, or None when every attempt failed
    reason: str | None = None  # malformed | request_failed, when value is None
    detail: str = ""
    attempts: int = 0
    model: str = ""
    transient: bool = False  # the last failure may succeed later (no HTTP status, or a retryable one)


def ask_all(client: ChatClient, conversations: Sequence[list[dict]], tags: Sequence[str] | None,
            parse: Callable[[int, ChatReply], object], *, retries: int, retry_prompt: str, usage: Usage,
            params: dict, desc: str) -> list[Answer]:
    """Asks every conversation and parses each reply; a malformed reply is re-asked up to `retries` times
    (with `retry_prompt`, where {error} says what was wrong, after the bad reply; or, without a retry
    prompt, as a fresh sample). `parse(index, reply)` raises Malformed for a bad reply; `tags` are stable
    per-conversation cache tags (None: the conversation itself is the key)."""
    answers = [Answer() for _ in conversations]
    last: list[tuple[str, str] | None] = [None] * len(conversations)  # (bad reply, error) for the re-ask
    pending = list(range(len(conversations)))
    for attempt in range(retries + 1):
        asked = []
        for i in pending:
            conversation = list(conversations[i])
            if last[i] is not None and retry_prompt:
                conversation += [{"role": "assistant", "content": last[i][0]},
                                 {"role": "user", "content": fill(retry_prompt, {"error": last[i][1]})}]
            asked.append(conversation)
        tries = [f"{tags[i] if tags else ''}#try{attempt}" if attempt else tags[i] if tags else None for i in pending]
        results = client.chat_many(asked, cache_tags=tries, errors="return", desc=f"{desc} (try {attempt + 1})",
                                   **params)
        for i, result in zip(pending, results):
            answer = answers[i]
            answer.attempts += 1
            if isinstance(result, ChatClientError):
                usage.failed_requests += 1
                answer.reason, answer.detail, last[i] = "request_failed", str(result)[:300], None
                answer.transient = result.status is None or result.status in RETRYABLE_STATUS
                continue
            usage.add_reply(result)
            answer.model = result.model or client.model
            try:
                answer.value, answer.reason, answer.detail = parse(i, result), None, ""
            except Malformed as error:
                answer.reason, answer.detail, last[i] = "malformed", str(error), (result.content, str(error))
        pending = [i for i in pending if answers[i].reason is not None]
        if not pending:
            break
    usage.transient_failures = sum(a.reason == "request_failed" and a.transient for a in answers)
    return answers


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


@dataclass
class StageResult:
    rows: list[dict]
    drops: list[dict]
    usage: dict = field(default_factory=dict)
    skipped: bool = False  # True when the stored output was reused


class StageStore:
    """stages/<name>.jsonl (kept rows), <name>.drops.jsonl and <name>.meta.json (written last)."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / "stages"

    def load(self, name: str, key: str) -> StageResult | None:
        meta_path = self.root / f"{name}.meta.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("fingerprint") != key:
            return None
        rows = [row for _, row in read_jsonl(self.root / f"{name}.jsonl")]
        drops = [row for _, row in read_jsonl(self.root / f"{name}.drops.jsonl")]
        if len(rows) != meta["rows"] or len(drops) != meta["drops"]:
            return None  # files from another run next to this meta: redo the stage
        return StageResult(rows, drops, meta.get("usage", {}), skipped=True)

    def save(self, name: str, key: str, result: StageResult) -> None:
        """Rows and drops, then the meta that marks the stage finished, unless requests were lost to
        transient failures: then the next run asks them again (the files stay for inspection)."""
        meta = self.root / f"{name}.meta.json"
        meta.unlink(missing_ok=True)
        write_jsonl(self.root / f"{name}.jsonl", result.rows)
        write_jsonl(self.root / f"{name}.drops.jsonl", result.drops)
        if not result.usage.get("transient_failures"):
            write_json(meta, {"fingerprint": key, "rows": len(result.rows), "drops": len(result.drops),
                              "usage": result.usage})

    def run(self, name: str, key: str, compute: Callable[[], StageResult]) -> StageResult:
        stored = self.load(name, key)
        if stored is not None:
            return stored
        result = compute()
        self.save(name, key, result)
        return result
