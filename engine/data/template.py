"""`ChatTemplate`: a checkpoint's tokenizer plus its own chat template, rendering and tokenising conversations
with assistant-only labels. Uses `tokenizers` and `jinja2` only; transformers is never imported.

Any template is rendered from its Jinja text (`tokenizer_config.json` `chat_template` or `chat_template.jinja`) and
its assistant spans are derived from the rendered ChatML turns (`jinja_template.py`); an unknown template that does
not split into turns safely is an error at load. The hybrid-thinking Qwen3 template keeps a fast path
(`render.render_qwen3`, the same text and spans, tested against both transformers and the Jinja path) for
conversations without tools or multimodal content.

Label policy (see `encode`):
- Supervised: each trained assistant turn's answer and its closing `<|im_end|>`; with thinking on, also its
  `<think>…</think>` block unless `train_on_reasoning=False`. Everything else (system, user, tool, role
  headers, the `\\n` after `<|im_end|>`) is -100.
- Thinking off (`enable_thinking=False`): reasoning is removed from the conversation, so the final turn carries
  the empty think block, and that block is part of the prompt (at inference the generation prompt contains it).
- Thinking on, turn without reasoning: the template still renders `<think>\n\n</think>\n\n` before the final
  answer. `empty_think="train"` supervises that empty block (the model learns to skip thinking when thinking
  is on); `"mask"` leaves it out of the loss, so plain rows in a thinking mix teach only their answers.
- Per row: a `Conversation` (formats.py) carries its own tools and `enable_thinking`, which override the
  batch-wide argument.
- Tool calls are part of the assistant answer and supervised with it; tool results are prompt.
- Multi-turn: `supervise="all"` trains every assistant turn as rendered (the template drops the reasoning of
  turns before the last user query, so those turns train on their answers only); `supervise="last"` trains
  only the final assistant turn. `TokenizeSettings(multi_turn="split")` trains every turn with its own reasoning
  by making one example per assistant turn.
"""
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import ConfigError, DataError
from .example import Example, make_example
from ..thinking import message_think
from .formats import Conversation
from .jinja_template import JinjaTemplate, alias_reasoning
from .render import EMPTY_THINK, IM_END, IM_START, render_qwen3

log = logging.getLogger(__name__)

# sha256 of the hybrid-thinking Qwen3 chat template that `render_qwen3` reproduces.
QWEN3_TEMPLATE_SHA256 = {"87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5"}
SUPERVISE = ("all", "last")
EMPTY_THINK_POLICIES = ("train", "mask")


_PROBE_CONVERSATION = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                       {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                       {"role": "assistant", "content": "a2"}]
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _special_tokens(config: dict) -> tuple[tuple[str, str], ...]:
    """The special tokens transformers passes to every chat template as variables."""
    out = []
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out.append((key, value))
    return tuple(out)


def load_jinja_template(chat_template, special_tokens, source) -> JinjaTemplate:
    """The template, checked once on a probe conversation: one that cannot be split into spans fails here."""
    if not isinstance(chat_template, str):
        raise ConfigError(f"{source}: no usable chat_template (expected a Jinja string, got "
                          f"{type(chat_template).__name__}); add one or point model.tokenizer at a chat model")
    jinja = JinjaTemplate(chat_template, special_tokens)
    try:
        for thinking in (True, False):
            jinja.generation_prompt(thinking)
            if len(jinja.render(without_reasoning(_PROBE_CONVERSATION), thinking).assistant_spans) != 2:
                raise DataError("the probe conversation did not give two assistant spans")
    except (ConfigError, DataError) as err:
        raise ConfigError(f"{source}: unsupported chat template: {err}") from None
    return jinja


def without_reasoning(messages: list[dict]) -> list[dict]:
    """The conversation with every assistant turn's reasoning (field or inline <think>) removed."""
    out = []
    for message in messages:
        if message["role"] == "assistant":
            _, content = message_think(message)
            message = {**message, "content": content, "reasoning_content": ""}
        out.append(message)
    return out


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer, eos_token: str = IM_END, fingerprint: str | None = None,
                 jinja: JinjaTemplate | None = None):
        """`jinja` None means the hybrid Qwen3 template (rendered by the fast path only)."""
        self.tokenizer = tokenizer
        self.jinja = jinja
        self.fast = jinja is None or hashlib.sha256(jinja.source.encode()).hexdigest() in QWEN3_TEMPLATE_SHA256
        self.im_start_id = self._token_id(IM_START)
        self.im_end_id = self._token_id(IM_END)
        self.eos_id = self._token_id(eos_token)
        # Identifies tokenizer + template for the tokenise-once cache.
        self.fingerprint = fingerprint or hashlib.sha256(f"{tokenizer.to_str()}\0{eos_token}".encode()).hexdigest()

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token!r} token; is this a Qwen3 tokenizer?")
        return token_id

    @classmethod
    def from_pretrained(cls, model_dir) -> "ChatTemplate":
        """Reads `tokenizer.json` and `tokenizer_config.json` (chat template, eos token) from a model directory."""
        model_dir = Path(model_dir)
        tokenizer_file, config_file = model_dir / "tokenizer.json", model_dir / "tokenizer_config.json"
        for path in (tokenizer_file, config_file):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found; a Qwen3 model directory needs tokenizer.json and "
                                        f"tokenizer_config.json")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        chat_template = config.get("chat_template")
        if chat_template is None and (model_dir / "chat_template.jinja").is_file():
            chat_template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        jinja = load_jinja_template(chat_template, _special_tokens(config), config_file)
        eos = config.get("eos_token") or IM_END
        eos = eos["content"] if isinstance(eos, dict) else eos
        digest = hashlib.sha256(tokenizer_file.read_bytes())
        digest.update(f"\0{chat_template}\0{eos}".encode())
        return cls(Tokenizer.from_file(str(tokenizer_file)), eos, digest.hexdigest(), jinja)

    def _use_fast_path(self, messages: list[dict], tools) -> bool:
        fast = self.fast and all(isinstance(m.get("content"), str) for m in messages)  # render.py has tools too
        if not fast and self.jinja is None:
            raise ConfigError("this ChatTemplate has no template text (content lists need one); build it with "
                              "ChatTemplate.from_pretrained")
        return fast

    def render_spans(self, messages: list[dict], enable_thinking: bool = True, tools: list[dict] | None = None):
        """Training text and assistant spans (`render.Rendered`) of one conversation, by the fast path when
        the template is the hybrid Qwen3 one and the conversation has no tools."""
        messages = alias_reasoning(messages)
        if self._use_fast_path(messages, tools):
            return render_qwen3(messages, enable_thinking, tools=tools)
        return self.jinja.render(messages, enable_thinking, tools)

    def render(self, messages: list[dict], enable_thinking: bool = True, add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> str:
        """The exact text transformers' `apply_chat_template(..., tokenize=False)` produces."""
        messages = alias_reasoning(messages)
        if self._use_fast_path(messages, tools):
            return render_qwen3(messages, enable_thinking, add_generation_prompt, tools).text
        return self.jinja.render_text(messages, enable_thinking, add_generation_prompt, tools)

    def encode(self, messages: "list[dict] | Conversation", enable_thinking: bool = True, **options) -> Example:
        """One conversation → Example with assistant-only labels; options as in `encode_batch`."""
        return self.encode_batch([messages], enable_thinking, **options)[0]

    def encode_batch(self, conversations: "list[list[dict] | Conversation]", enable_thinking: bool = True, *,
                     supervise: str = "all", train_on_reasoning: bool = True, empty_think: str = "train",
                     tools: list[list[dict] | None] | None = None) -> list[Example]:
        """Renders and tokenises many conversations at once (the tokenizer batches in Rust).

        A `Conversation` brings its own tools and, when set, its own `enable_thinking`. supervise: "all"
        assistant turns or only the "last"; train_on_reasoning: also supervise the think blocks (thinking on
        only); empty_think: "train" | "mask" an empty think block (see the module docstring); tools: each plain
        conversation's tool schemas (rendered by the template's tools section).
        """
        if supervise not in SUPERVISE:
            raise ValueError(f"unknown supervise {supervise!r}; expected one of {', '.join(SUPERVISE)}")
        if empty_think not in EMPTY_THINK_POLICIES:
            raise ValueError(f"unknown empty_think {empty_think!r}; expected one of {', '.join(EMPTY_THINK_POLICIES)}")
        tools = tools or [None] * len(conversations)
        rows = [c if isinstance(c, Conversation) else Conversation(c, t) for c, t in zip(conversations, tools)]
        thinking = [enable_thinking if row.enable_thinking is None else row.enable_thinking for row in rows]
        rendered = []
        for i, (row, on) in enumerate(zip(rows, thinking)):
            try:
                rendered.append(self.render_spans(row.messages if on else without_reasoning(row.messages), on,
                                                  row.tools))
            except DataError as err:
                raise DataError(f"conversation {i}: {err}") from None
        encodings = self.tokenizer.encode_batch([r.text for r in rendered], add_special_tokens=False)
        examples = []
        for r, encoding, on in zip(rendered, encodings, thinking):
            ids = np.array(encoding.ids, dtype=np.int32)
            supervised = np.zeros(len(ids), dtype=bool)
            for span in r.assistant_spans if supervise == "all" else r.assistant_spans[-1:]:
                train_think = on and train_on_reasoning and not (
                    empty_think == "mask" and r.text[span.start:span.think_end] == EMPTY_THINK)
                first, stop = _token_range(encoding, span.start if train_think else span.think_end, span.end)
                supervised[first:stop] = True
            examples.append(make_example(ids, supervised))
        return examples


def _token_range(encoding, begin: int, end: int) -> tuple[int, int]:
    """Tokens whose first character lies in text[begin:end]. A token straddling `begin` (a newline run that
    starts in the role header) stays in the prompt. Looks up two boundaries instead of every token's offsets."""
    first = encoding.char_to_token(begin)
    if encoding.token_to_chars(first)[0] < begin:
        first += 1
    return first, encoding.char_to_token(end - 1) + 1
