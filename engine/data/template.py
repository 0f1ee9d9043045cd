"""`ChatTemplate`: a Qwen3 checkpoint's tokenizer plus its chat template, rendering and tokenising conversations
with assistant-only labels. Uses `tokenizers` only; transformers is never imported.

Label policy (see `encode`):
- Supervised: each trained assistant turn's answer and its closing `<|im_end|>`; with thinking on, also its
  `<think>…</think>` block unless `train_on_reasoning=False`. Everything else (system, user, tool, role
  headers, the `\\n` after `<|im_end|>`) is -100.
- Thinking off (`enable_thinking=False`): reasoning is removed from the conversation, so the final turn carries
  the empty think block, and that block is part of the prompt (at inference the generation prompt contains it).
- Multi-turn: `supervise="all"` trains every assistant turn as rendered (the template drops the reasoning of
  turns before the last user query, so those turns train on their answers only); `supervise="last"` trains
  only the final assistant turn. `load_examples(multi_turn="split")` trains every turn with its own reasoning
  by making one example per assistant turn.
"""
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .example import Example, make_example
from ..thinking import message_think
from .render import IM_END, IM_START, render_qwen3

log = logging.getLogger(__name__)

# sha256 of the hybrid-thinking Qwen3 chat template that `render_qwen3` reproduces.
QWEN3_TEMPLATE_SHA256 = {"87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5"}
SUPERVISE = ("all", "last")


def _check_template(chat_template: str | None, source) -> None:
    if chat_template is None:
        raise ValueError(f"{source}: tokenizer_config.json has no chat_template")
    if hashlib.sha256(chat_template.encode()).hexdigest() in QWEN3_TEMPLATE_SHA256:
        return
    if IM_START in chat_template and "<think>" in chat_template:
        log.warning("%s: the chat template differs from the Qwen3 template qforge implements; conversations are "
                    "rendered with Qwen3 semantics (see qforge.engine.data.render)", source)
        return
    raise ValueError(f"{source}: unsupported chat template (qforge renders the Qwen3 ChatML template with "
                     f"<think> blocks only)")


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
    def __init__(self, tokenizer: Tokenizer, eos_token: str = IM_END, fingerprint: str | None = None):
        self.tokenizer = tokenizer
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
        _check_template(chat_template, config_file)
        eos = config.get("eos_token") or IM_END
        eos = eos["content"] if isinstance(eos, dict) else eos
        digest = hashlib.sha256(tokenizer_file.read_bytes())
        digest.update(f"\0{chat_template}\0{eos}".encode())
        return cls(Tokenizer.from_file(str(tokenizer_file)), eos, digest.hexdigest())

    def render(self, messages: list[dict], enable_thinking: bool = True, add_generation_prompt: bool = False) -> str:
        """The exact text transformers' `apply_chat_template(..., tokenize=False)` produces."""
        return render_qwen3(messages, enable_thinking, add_generation_prompt).text

    def encode_prompt(self, messages: list[dict], enable_thinking: bool = True) -> list[int]:
        """Token ids of a conversation followed by the assistant generation prompt, for generation."""
        text = self.render(messages, enable_thinking, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, messages: list[dict], enable_thinking: bool = True, **options) -> Example:
        """One conversation → Example with assistant-only labels; options as in `encode_batch`."""
        return self.encode_batch([messages], enable_thinking, **options)[0]

    def encode_batch(self, conversations: list[list[dict]], enable_thinking: bool = True, *, supervise: str = "all",
                     train_on_reasoning: bool = True, loss_weighting: str = "token") -> list[Example]:
        """Renders and tokenises many conversations at once (the tokenizer batches in Rust).

        supervise: "all" assistant turns or only the "last"; train_on_reasoning: also supervise the think blocks
        (thinking on only); loss_weighting: "token" | "sample" | "sqrt" (see `loss_weights`).
        """
        if supervise not in SUPERVISE:
            raise ValueError(f"unknown supervise {supervise!r}; expected one of {', '.join(SUPERVISE)}")
        train_think = enable_thinking and train_on_reasoning
        rendered = [render_qwen3(m if enable_thinking else without_reasoning(m)) for m in conversations]
        encodings = self.tokenizer.encode_batch([r.text for r in rendered], add_special_tokens=False)
        examples = []
        for r, encoding in zip(rendered, encodings):
            ids = np.array(encoding.ids, dtype=np.int32)
            supervised = np.zeros(len(ids), dtype=bool)
            for span in r.assistant_spans if supervise == "all" else r.assistant_spans[-1:]:
                first, stop = _token_range(encoding, span.start if train_think else span.think_end, span.end)
                supervised[first:stop] = True
            examples.append(make_example(ids, supervised, loss_weighting))
        return examples


def _token_range(encoding, begin: int, end: int) -> tuple[int, int]:
    """Tokens whose first character lies in text[begin:end]. A token straddling `begin` (a newline run that
    starts in the role header) stays in the prompt. Looks up two boundaries instead of every token's offsets."""
    first = encoding.char_to_token(begin)
    if encoding.token_to_chars(first)[0] < begin:
        first += 1
    return first, encoding.char_to_token(end - 1) + 1
