"""Text-level generation: a checkpoint plus its chat template, prompts or conversations in, text out.

`generate` works on token ids; this layer owns tokenisation, the chat template (thinking on/off, tools), the
end-of-turn stop ids, incremental detokenisation with stop strings that end decoding (`TextStream`), the
reasoning/answer split of streamed output (`ReasoningStream`) and `<tool_call>` parsing. The server's
scheduler and the offline `ChatModel.complete` share these, so served and offline text are the same.
"""
from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import torch
from tqdm.auto import tqdm

from qforge.engine.checkpoint import load_model, read_source
from qforge.engine.data import ChatTemplate
from qforge.engine.generate import DecodeBatch, SamplingParams
from qforge.engine.thinking import THINK_CLOSE, THINK_OPEN

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")
TOOL_CALL_PATTERN = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Completion:
    text: str  # the new text, cut before the first stop string
    finish_reason: str  # "stop" (end of turn or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class ReasoningStream:
    """Splits Qwen3 output into reasoning (inside `<think>…</think>`) and answer as text arrives.

    Output that starts with `<think>` is reasoning until `</think>` (all of it if the block never closes,
    e.g. cut by max_tokens, as vLLM streams it); anything else is answer. Both parts are stripped of
    surrounding whitespace, so the concatenated deltas of a streamed reply equal the whole reply's split.
    """

    def __init__(self):
        self.text = ""
        self.sent = ["", ""]  # reasoning, answer

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """(reasoning delta, answer delta) after `delta`; `final` releases held-back text."""
        self.text += delta
        parts = self._parts(final)
        if parts is None:
            return "", ""
        out = tuple(part[len(sent):] for part, sent in zip(parts, self.sent))
        self.sent = list(parts)
        return out

    def _parts(self, final: bool) -> tuple[str, str] | None:
        head = self.text.lstrip()
        if not final and THINK_OPEN.startswith(head):
            return None  # could still become <think>
        if not head.startswith(THINK_OPEN):
            return "", _hold(head, final)
        reasoning, closed, answer = head[len(THINK_OPEN):].partition(THINK_CLOSE)
        if not closed:
            return _hold(reasoning.strip() if final else _without_partial(reasoning.lstrip(), THINK_CLOSE), final), ""
        return reasoning.strip(), _hold(answer.lstrip(), final)


def _without_partial(text: str, marker: str) -> str:
    """`text` minus a trailing prefix of `marker` (it may be the start of the marker)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return text[:-size]
    return text


def _hold(text: str, final: bool) -> str:
    """Trailing whitespace is sent only once more text follows it (so the result is stripped)."""
    return text.strip() if final else text.rstrip()


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(text outside the `<tool_call>` blocks, [{"name", "arguments" (a JSON string)}]); a block that is
    not JSON with a `name` stays in the text."""
    calls, kept, position = [], [], 0
    for match in TOOL_CALL_PATTERN.finditer(text):
        try:
            call = json.loads(match.group(1))
            name, arguments = call["name"], call.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(name, str):
            continue
        kept.append(text[position:match.start()])
        position = match.end()
        calls.append({"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)})
    kept.append(text[position:])
    return "".join(kept).strip(), calls


class TextStream:
    """Token ids in, text out: incremental detokenisation, end-of-turn ids and stop strings that stop.

    Text is released only when it cannot still turn into a stop string or an incomplete UTF-8 character,
    so a streamed reply equals the whole one. `finish_reason` is set once the sequence must end.
    """

    def __init__(self, tokenizer, stop_ids: Collection[int], stop: Sequence[str], max_tokens: int):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.stop = tuple(s for s in stop if s)
        self.max_tokens = max_tokens
        self.ids: list[int] = []
        self.count = 0  # tokens generated, including an end-of-turn id
        self.text = ""
        self.released = 0
        self.finish_reason: str | None = None
        self._prefix = self._read = 0

    def push(self, token: int) -> str:
        """Adds one generated token; returns the newly released text."""
        self.count += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
            before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
            after = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
                self.text += after[len(before):]
                self._prefix, self._read = self._read, len(self.ids)
                cuts = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
                if cuts:
                    self.text, self.finish_reason = self.text[:min(cuts)], "stop"
            if self.finish_reason is None and self.count >= self.max_tokens:
                self.finish_reason = "length"
        end = len(self.text)
        if self.finish_reason is None and self.stop:
            end = min(len(_without_partial(self.text, s)) for s in self.stop)
        released, self.released = self.text[self.released:end], max(self.released, end)
        return released


class ChatModel:
    """A loaded checkpoint with its tokenizer and chat template."""

    def __init__(self, model: torch.nn.Module, template, *, name: str = "qforge", suppress_ids: Sequence[int] = (),
                 batch_size: int = 16):
        self.model = model
        self.template = template
        self.tokenizer = template.tokenizer
        self.name = name
        self.suppress_ids = tuple(suppress_ids)
        self.batch_size = batch_size
        self.stop_ids = tuple(i for i in map(self.tokenizer.token_to_id, END_OF_TURN_TOKENS) if i is not None)

    @classmethod
    def load(cls, path: str | Path, *, dtype: str = "float32", device: str = "cpu", suppress_ids: Sequence[int] = (),
             **kwargs) -> "ChatModel":
        """Loads a checkpoint directory; its generation_config.json `suppress_tokens` (written by the export of a
        restricted vocabulary and by the pruning recipe) are always suppressed, in addition to `suppress_ids`."""
        kwargs.setdefault("name", Path(path).name)
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        source = read_source(path)
        suppress_ids = sorted({*suppress_ids, *(source.generation_config.get("suppress_tokens") or [])})
        model = load_model(source, dtype=getattr(torch, dtype), device=device)
        return cls(model, ChatTemplate.from_pretrained(path), suppress_ids=suppress_ids, **kwargs)

    def render(self, messages: Sequence[dict], enable_thinking: bool = True, tools: Sequence[dict] = ()) -> str:
        return self.template.render(list(messages), enable_thinking=enable_thinking, add_generation_prompt=True,
                                    tools=list(tools) or None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def text_stream(self, stop: Sequence[str], max_tokens: int) -> TextStream:
        return TextStream(self.tokenizer, self.stop_ids, stop, max_tokens)

    def complete(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 progress: bool = False, **sampling) -> list[Completion]:
        """Continues raw text prompts, `batch_size` at a time: a finished row's place is taken by the next
        prompt at once (shortest prompts first, to keep left padding small)."""
        token_lists = [self.encode(p) for p in prompts]
        params = SamplingParams(**sampling)
        params.check(self.model.config.vocab_size)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        pending = deque(sorted(range(len(prompts)), key=lambda i: len(token_lists[i])))
        batch = DecodeBatch(self.model, self.suppress_ids)
        streams: dict = {}
        results: list[Completion | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
        while pending or batch:
            joining = [pending.popleft() for _ in range(min(len(pending), self.batch_size - len(batch)))]
            if joining:
                rows = batch.add([token_lists[i] for i in joining], [params] * len(joining))
                streams.update((row, (i, self.text_stream(stop, max_new_tokens))) for row, i in zip(rows, joining))
            finished = set()
            for row, pick in zip(batch.rows, batch.sample()):
                index, stream = streams[row]
                stream.push(pick.token)
                if stream.finish_reason:
                    finished.add(row)
                    results[index] = Completion(stream.text, stream.finish_reason, len(token_lists[index]),
                                                stream.count)
            batch.advance(finished)
            bar.update(len(finished))
        bar.close()
        return results

    def chat(self, conversations: Sequence[Sequence[dict]], *, enable_thinking: bool = True,
             **kwargs) -> list[Completion]:
        return self.complete([self.render(c, enable_thinking) for c in conversations], **kwargs)
