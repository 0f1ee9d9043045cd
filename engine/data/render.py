"""The Qwen3 chat template, written out in plain Python so that rendering is exact, fast and label-aware.

Semantics of the hybrid-thinking Qwen3 template (tokenizer_config.json `chat_template`), without tools:

- A leading system message becomes `<|im_start|>system\\n{content}<|im_end|>\\n`; later system messages and
  user messages render the same way with their own role.
- Tool results (role `tool`) render as one user turn per run of consecutive tool messages, each wrapped in
  `\\n<tool_response>\\n…\\n</tool_response>`.
- The "last query" is the last user message that is not a bare `<tool_response>…</tool_response>`.
- An assistant turn's reasoning is `reasoning_content` when that key is present and not None; otherwise, if
  the content contains `</think>`, the text between `<think>` and `</think>` is the reasoning and the content
  is what follows `</think>` (leading newlines removed).
- Assistant turns after the last query keep a `<think>\\n{reasoning}\\n</think>\\n\\n` block when they are the
  final message or have non-empty reasoning; the final one always gets the block, so an answer without
  reasoning carries the empty `<think>\\n\\n</think>\\n\\n`. Earlier assistant turns lose their reasoning.
- `add_generation_prompt` appends `<|im_start|>assistant\\n`, plus the empty think block when thinking is off.
  `enable_thinking` changes nothing else in the rendered text.

Besides the text, rendering records where each assistant turn's think block and answer are, so labels can be
assigned from character spans after tokenisation.
"""
from dataclasses import dataclass

from ..thinking import THINK_CLOSE, THINK_OPEN, message_think

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"


@dataclass(frozen=True)
class AssistantSpan:
    """Character offsets of one assistant turn: [start, think_end) is its think block (empty if none is
    rendered), [think_end, end) its answer through the closing `<|im_end|>`."""
    start: int
    think_end: int
    end: int


@dataclass(frozen=True)
class Rendered:
    text: str
    assistant_spans: tuple[AssistantSpan, ...]


def _is_tool_response(content: str) -> bool:
    return content.startswith("<tool_response>") and content.endswith("</tool_response>")


def last_query_index(messages: list[dict]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message["role"] == "user" and not _is_tool_response(message["content"]):
            return index
    return len(messages) - 1


def render_qwen3(messages: list[dict], enable_thinking: bool = True, add_generation_prompt: bool = False) -> Rendered:
    """Renders `messages` ({"role", "content", optional "reasoning_content"}) exactly as the Qwen3 template."""
    parts: list[str] = []
    length = 0
    spans = []

    def emit(text: str) -> int:
        nonlocal length
        parts.append(text)
        length += len(text)
        return length

    last_query = last_query_index(messages)
    last = len(messages) - 1
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if message.get("tool_calls"):
            raise ValueError(f"messages[{index}]: tool calls are not supported by qforge's Qwen3 renderer")
        if role == "user" or role == "system":
            emit(f"{IM_START}{role}\n{content}{IM_END}\n")
        elif role == "assistant":
            reasoning, content = message_think(message)
            start = emit(f"{IM_START}assistant\n")
            if index > last_query and (index == last or reasoning):
                think_end = emit(f"{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n")
                content = content.lstrip("\n")
            else:
                think_end = start
            emit(content)
            spans.append(AssistantSpan(start, think_end, emit(IM_END)))
            emit("\n")
        elif role == "tool":
            if index == 0 or messages[index - 1]["role"] != "tool":
                emit(f"{IM_START}user")
            emit(f"\n<tool_response>\n{content}\n</tool_response>")
            if index == last or messages[index + 1]["role"] != "tool":
                emit(f"{IM_END}\n")
        else:
            raise ValueError(f"messages[{index}].role: unknown role {role!r}")
    if add_generation_prompt:
        emit(f"{IM_START}assistant\n")
        if not enable_thinking:
            emit(EMPTY_THINK)
    return Rendered("".join(parts), tuple(spans))
