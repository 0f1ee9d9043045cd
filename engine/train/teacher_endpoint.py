"""The off-policy teacher's top-k from an OpenAI-compatible endpoint (vLLM, qforge's own server) instead of a
local checkpoint: the same targets `teacher_top_k` computes, stored the same way.

Each SFT example goes once to the legacy `/v1/completions` API as its token ids with `echo`, `max_tokens=0`
and `logprobs=k`: the server scores the prompt it was given (teacher forcing on the data's own reply) and
`logprobs.top_logprobs[j]` is its distribution of token j given the tokens before it — the target of
supervised token j, exactly what the local path keeps. Tokens are named "token_id:N" when the request sets
vLLM's `return_tokens_as_token_ids` (qforge's server honours it too); decoded single-token text is mapped back
through the tokenizer only where no two ids share it (every partial UTF-8 byte decodes to U+FFFD).

Scored examples are saved in chunks under a `.partial` directory next to the final result, so an interrupted
run resumes where it stopped (the raw JSON replies, every prompt position's top-k as text, would be ~10× the
size of what is kept, so the client's response cache is not used).
"""
from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..serve.client import ChatClient, ChatClientError
from ..data.example import IGNORE_INDEX, Example
from ..errors import EndpointError
from ..files import atomic_write

TOKEN_ID_PREFIX = "token_id:"
CHUNK = 64  # examples per saved chunk (fixed: a resumed run must cut the data the same way)


class EndpointTeacher:
    """Scores SFT examples through `client`; `suppress_ids` are ids the teacher never produces (its pruned
    vocabulary), dropped from the top-k as the local path drops them from the teacher's softmax."""

    def __init__(self, client: ChatClient, suppress_ids: Sequence[int] = (), token_ids: bool = True,
                 chunk: int = CHUNK):
        self.client, self.token_ids, self.chunk = client, token_ids, chunk
        self.suppress_ids = np.array(sorted(set(int(i) for i in suppress_ids)), dtype=np.int64)

    @property
    def identity(self) -> dict:
        """What the stored top-k depend on: the served model and the ids dropped from it."""
        suppressed = hashlib.sha256(self.suppress_ids.tobytes()).hexdigest()[:16]
        return {"endpoint": self.client.base_url, "model": self.client.model, "suppress": suppressed}

    def top_k(self, examples: list[Example], k: int, tokenizer, partial: Path,
              progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids int32 [targets, k], log-probs float32 [targets, k]) per example, −1 where an id was dropped;
        chunks already saved under `partial` are read, not requested again."""
        self.score_chunks(examples, k, tokenizer, partial, progress)
        return self.read_chunks(examples, partial)

    def score_chunks(self, examples: list[Example], k: int, tokenizer, partial: Path, progress: bool = True,
                     rank: int = 0, world: int = 1) -> None:
        """Requests and saves under `partial` the chunks not saved yet: under torchrun each rank takes every
        world-th chunk (its share of the requests), so no rank waits on the others' scoring alone."""
        names = None if self.token_ids else TokenNames(tokenizer)
        partial.mkdir(parents=True, exist_ok=True)
        starts = list(range(0, len(examples), self.chunk))[rank::world]
        total = sum(len(examples[start:start + self.chunk]) for start in starts)
        with tqdm(total=total, desc="teacher top-k", unit="example", disable=not progress) as bar:
            for start in starts:
                group = examples[start:start + self.chunk]
                path = _chunk_path(partial, start, len(group))
                if not path.is_file():
                    _save_chunk(path, self._score(group, start, k, names), k)
                bar.update(len(group))

    def read_chunks(self, examples: list[Example], partial: Path) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every example's top-k from the saved chunks (all of which must be there)."""
        results = []
        for start in range(0, len(examples), self.chunk):
            with np.load(_chunk_path(partial, start, len(examples[start:start + self.chunk]))) as saved:
                ids, logprobs, offsets = saved["ids"], saved["logprobs"], saved["offsets"]
            results += [(ids[a:b], logprobs[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
        return results

    def _score(self, examples: list[Example], start: int, k: int, names) -> list[tuple[np.ndarray, np.ndarray]]:
        extra = {"return_tokens_as_token_ids": True} if self.token_ids else {}
        replies = self.client.complete_many([e.input_ids.tolist() for e in examples], errors="return",
                                            progress=False, echo=True, max_tokens=0, logprobs=k, **extra)
        for offset, reply in enumerate(replies):
            if isinstance(reply, ChatClientError):
                hint = (f"; distill.top_k={k} may exceed the server's cap on logprobs (vLLM: --max-logprobs, "
                        f"default 20; qforge's server: 20)") if reply.status == 400 and k > 20 else ""
                raise EndpointError(f"distill.teacher_endpoint: example {start + offset}: {reply}{hint}") from None
        return [self._parse(reply, example, start + i, k, names) for i, (reply, example)
                in enumerate(zip(replies, examples))]

    def _parse(self, reply: dict, example: Example, index: int, k: int, names) -> tuple[np.ndarray, np.ndarray]:
        where = f"distill.teacher_endpoint: example {index}"
        logprobs = reply["choices"][0].get("logprobs") or {}
        tokens, tops = logprobs.get("tokens"), logprobs.get("top_logprobs")
        sent = example.input_ids.tolist()
        if not isinstance(tokens, list) or not isinstance(tops, list):
            raise EndpointError(f"{where}: the reply has no logprobs.tokens / top_logprobs; the endpoint must score "
                                f"prompts on /v1/completions with echo=true and logprobs (vLLM and qforge's server do)")
        echoed = [self._token_id(t, names, where) if self.token_ids else t for t in tokens[:len(sent)]]
        expected = sent if self.token_ids else [names.text[t] for t in sent]
        if len(tokens) < len(sent) or len(tops) < len(sent) or echoed != expected:
            at = next((i for i, (a, b) in enumerate(zip(echoed, expected)) if a != b), min(len(echoed), len(tops)))
            got = tokens[at] if at < len(tokens) else "nothing"
            raise EndpointError(f"{where}: the endpoint re-tokenised the prompt (position {at}: sent token id "
                                f"{sent[at] if at < len(sent) else '-'}, echoed {got!r}); it must score the token ids "
                                f"as sent (vLLM and qforge's server do){'' if self.token_ids else _ASK_FOR_IDS}")
        positions = np.flatnonzero(example.labels[1:] != IGNORE_INDEX) + 1
        ids = np.full((len(positions), k), -1, dtype=np.int32)
        values = np.zeros((len(positions), k), dtype=np.float32)
        for row, position in enumerate(positions.tolist()):
            top = tops[position]
            if not isinstance(top, dict) or len(top) < k:
                raise EndpointError(f"{where}: {len(top or ())} top log-probs at position {position} for "
                                    f"distill.top_k={k}; the server caps them (vLLM: --max-logprobs, default 20): "
                                    f"lower distill.top_k or raise the server's cap")
            pairs = [(self._token_id(t, names, where), float(v)) for t, v in top.items()]
            pairs.sort(key=lambda pair: -pair[1])  # the prompt's own token rides along when outside the top-k
            for column, (token, value) in enumerate(pairs[:k]):
                if math.isfinite(value):
                    ids[row, column], values[row, column] = token, value
        if len(self.suppress_ids):
            values[np.isin(ids, self.suppress_ids)] = 0.0
            ids[np.isin(ids, self.suppress_ids)] = -1
        return ids, values

    def _token_id(self, name, names, where: str) -> int:
        if self.token_ids:
            if isinstance(name, str) and name.startswith(TOKEN_ID_PREFIX) and name[len(TOKEN_ID_PREFIX):].isdigit():
                return int(name[len(TOKEN_ID_PREFIX):])
            raise EndpointError(f"{where}: token {name!r} is not named \"token_id:N\"; the server ignores "
                                f"return_tokens_as_token_ids: set distill.teacher_token_ids=false to map text tokens")
        return names.id(name, where)


_ASK_FOR_IDS = ("; or the server names tokens differently from the tokenizer's decoded text: use "
                "distill.teacher_token_ids=true (vLLM's return_tokens_as_token_ids)")


class TokenNames:
    """Decoded single-token text ↔ id for servers that name tokens by text: a text shared by several ids
    cannot be mapped back (and a dict of top log-probs keyed by it lost all but one of them)."""

    def __init__(self, tokenizer):
        size = tokenizer.get_vocab_size()
        self.text = tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
        self.ids: dict[str, int] = {}
        self.ambiguous: set[str] = set()
        for token, text in enumerate(self.text):
            if text in self.ids:
                self.ambiguous.add(text)
            self.ids[text] = token

    def id(self, text, where: str) -> int:
        if text in self.ambiguous:
            raise EndpointError(f"{where}: the token text {text!r} names several token ids; set "
                                f"distill.teacher_token_ids=true (vLLM: return_tokens_as_token_ids)")
        if text not in self.ids:
            raise EndpointError(f"{where}: the token text {text!r} is no single token of the student's tokenizer; "
                                f"the teacher must share it (or set distill.teacher_token_ids=true)")
        return self.ids[text]


def _chunk_path(partial: Path, start: int, size: int) -> Path:
    return partial / f"{start:010d}-{size}.npz"


def _save_chunk(path: Path, scored, k: int) -> None:
    """One chunk's top-k, written atomically (a crash leaves no half chunk)."""
    empty = np.zeros((0, k))

    def write(temp: Path):
        with open(temp, "wb") as handle:  # a handle: np.savez would append ".npz" to a path
            np.savez(handle, ids=np.concatenate([i for i, _ in scored] or [empty]).astype(np.int32),
                     logprobs=np.concatenate([v for _, v in scored] or [empty]).astype(np.float32),
                     offsets=np.cumsum([0] + [len(i) for i, _ in scored]))

    atomic_write(path, write)


def discard(partial: Path) -> None:
    """Removes the saved chunks once the whole result is stored."""
    shutil.rmtree(partial, ignore_errors=True)


__all__ = ["EndpointTeacher", "TokenNames", "discard"]
