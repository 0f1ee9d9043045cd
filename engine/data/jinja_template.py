"""Any checkpoint's own chat template: rendered with transformers' Jinja semantics, split into assistant spans.

Rendering follows `apply_chat_template` (sandboxed Jinja with trim_blocks/lstrip_blocks, loop controls, a
non-escaping `tojson`, `raise_exception`, `strftime_now`, the tokenizer's special tokens as variables, and the
reasoning-field aliases `reasoning`/`thinking` → `reasoning_content`), so the text, and thus the token ids, are the
ones transformers produces (tests/engine/data/test_chat_templates.py checks them token for token).

Labels come from the rendered text, not from assumptions about the template. The text must be a sequence of
ChatML blocks `<|im_start|>{role}\\n…<|im_end|>` separated by single newlines, with exactly one `assistant` block per
assistant message, in order, each containing that message's answer text. A supervised span is an assistant block
minus what the template's own generation prompt already puts there (the role header, plus e.g. `<think>\\n` for
Qwen3-2507 Thinking or the empty think block when thinking is off): exactly what the model produces at inference.
A template or conversation that does not fit is an error naming what did not match — never a guessed mask.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime

from ..errors import ConfigError, DataError
from ..thinking import THINK_CLOSE, THINK_OPEN, message_think
from .render import IM_END, IM_START, AssistantSpan, Rendered

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_BLOCK = re.compile(re.escape(IM_START) + r"([^\n]*)\n(.*?)" + re.escape(IM_END), re.DOTALL)
_PROBE = [{"role": "user", "content": "qforge probe question"}]


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The template compiled in a sandbox, with the helpers transformers' chat templates rely on."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"chat template line {err.lineno}: invalid Jinja ({err.message})") from None


def alias_reasoning(messages: list[dict]) -> list[dict]:
    """`reasoning` / `thinking` fill `reasoning_content` (and `thinking`), as transformers does before rendering."""
    out = []
    for message in messages:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        out.append({"thinking": reasoning, **message, "reasoning_content": reasoning} if reasoning is not None
                   else message)
    return out


def message_text(message: dict) -> str:
    """A message's content as text (the text parts of a multimodal content list)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


@functools.lru_cache(maxsize=64)
def _generation_prompt(template: "JinjaTemplate", enable_thinking: bool) -> str:
    with_prompt = template.render_text(_PROBE, enable_thinking, add_generation_prompt=True)
    without = template.render_text(_PROBE, enable_thinking, add_generation_prompt=False)
    prompt = with_prompt[len(without):]
    if not with_prompt.startswith(without) or not prompt.startswith(f"{IM_START}assistant\n"):
        raise ConfigError(f"its generation prompt {prompt!r} does not open a ChatML assistant turn "
                          f"('<|im_start|>assistant\\n'), so assistant spans cannot be derived")
    return prompt


@dataclass(frozen=True)
class JinjaTemplate:
    source: str
    special_tokens: tuple[tuple[str, str], ...] = ()

    @property
    def knows_reasoning(self) -> bool:
        """Whether the template renders think blocks at all (Qwen3-VL Instruct / Instruct-2507 do not)."""
        return THINK_OPEN in self.source

    def render_text(self, messages: list[dict], enable_thinking: bool = True, add_generation_prompt: bool = False,
                    tools: list[dict] | None = None) -> str:
        import jinja2
        try:
            return compile_template(self.source).render(
                **dict(self.special_tokens), messages=alias_reasoning(messages), tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        except jinja2.TemplateError as err:
            raise DataError(f"the chat template refused the conversation: {err}") from None

    def generation_prompt(self, enable_thinking: bool) -> str:
        """What `add_generation_prompt` appends: the part of an assistant turn the model is given, not trained on."""
        return _generation_prompt(self, enable_thinking)

    def render(self, messages: list[dict], enable_thinking: bool = True,
               tools: list[dict] | None = None) -> Rendered:
        """The training text of a conversation and each assistant turn's spans (see the module docstring)."""
        text = self.render_text(messages, enable_thinking, add_generation_prompt=False, tools=tools)
        header = f"{IM_START}assistant\n"
        prompt = self.generation_prompt(enable_thinking)
        blocks, position = [], 0
        for match in _BLOCK.finditer(text):
            gap = text[position:match.start()]
            if gap not in ("", "\n") or (gap == "" and blocks):
                raise DataError(f"the chat template put {gap!r} between ChatML turns at character {position}; "
                                f"assistant spans cannot be derived safely from this template")
            blocks.append(match)
            position = match.end()
        if text[position:] not in ("", "\n") or not blocks:
            raise DataError(f"the chat template's output does not end with a ChatML turn (trailing "
                            f"{text[position:][:40]!r}); assistant spans cannot be derived safely")
        assistant_blocks = [b for b in blocks if b.group(1) == "assistant"]
        assistant_messages = [(i, m) for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if len(assistant_blocks) != len(assistant_messages):
            raise DataError(f"the chat template rendered {len(assistant_blocks)} assistant turns for "
                            f"{len(assistant_messages)} assistant messages; labels cannot be assigned safely")
        spans = []
        for block, (index, message) in zip(assistant_blocks, assistant_messages):
            body = block.group(2)
            reasoning, answer = message_think({**message, "content": message_text(message),
                                                 "reasoning_content": alias_reasoning([message])[0].get(
                                                     "reasoning_content")})
            if answer.strip() and answer.strip() not in body:
                raise DataError(f"messages[{index}]: the chat template did not render this assistant answer "
                                f"verbatim; its labels cannot be located safely")
            if reasoning.strip() and enable_thinking and not self.knows_reasoning:
                raise DataError(f"messages[{index}]: has reasoning but this chat template renders no think blocks "
                                f"(it would be dropped silently); set data.enable_thinking=false to train on the "
                                f"answers only")
            start = block.start() + (len(prompt) if text.startswith(prompt, block.start()) else len(header))
            think_end = start
            body_start = block.start() + len(header)
            literal = answer.lstrip("\n") and body.startswith(answer.lstrip("\n"))  # tags inside the answer itself
            if self.knows_reasoning and not literal and body.startswith(THINK_OPEN) and THINK_CLOSE in body:
                think_end = body_start + body.index(THINK_CLOSE) + len(THINK_CLOSE)
                while text[think_end] == "\n":
                    think_end += 1
                think_end = max(think_end, start)
            spans.append(AssistantSpan(start, think_end, block.end()))
        return Rendered(text, tuple(spans))
