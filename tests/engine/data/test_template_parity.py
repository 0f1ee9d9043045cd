"""`ChatTemplate.render` equals transformers' `apply_chat_template` with the real Qwen3 template."""
import random

import pytest

from data_fixtures import hf_tokenizer, qwen_template  # noqa: F401 (pytest fixtures)

WORDS = ["hello", "world", "Qwen", "数学", "ünïcode", "  spaced  ", "\n", "\n\n", "x = 1;", "<b>", "😀", "end."]


def text(rng: random.Random, empty_ok: bool = True) -> str:
    pieces = [rng.choice(WORDS) for _ in range(rng.randint(0 if empty_ok else 1, 6))]
    return "".join(rng.choice(["", " ", "\n"]) + p for p in pieces)


def assistant_message(rng: random.Random) -> dict:
    content, reasoning = text(rng), text(rng)
    style = rng.choice(["plain", "field", "field-empty", "field-none", "inline", "inline-no-open", "inline-twice"])
    if style == "field":
        return {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if style == "field-empty":  # an empty reasoning field wins over inline tags, which stay in the content
        return {"role": "assistant", "content": f"<think>{reasoning}</think>{content}", "reasoning_content": ""}
    if style == "field-none":
        return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{content}",
                "reasoning_content": None}
    if style == "inline":
        return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{content}"}
    if style == "inline-no-open":
        return {"role": "assistant", "content": f"{reasoning}</think>{content}"}
    if style == "inline-twice":
        return {"role": "assistant", "content": f"<think>{reasoning}</think>{content}</think>{text(rng)}"}
    return {"role": "assistant", "content": content}


def conversation(rng: random.Random) -> list[dict]:
    messages = [{"role": "system", "content": text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.1:
            messages.append({"role": "system", "content": text(rng)})
        elif kind < 0.2:
            messages.append({"role": "user", "content": f"<tool_response>{text(rng)}</tool_response>"})
        else:
            messages.append({"role": "user", "content": text(rng)})
        messages.append(assistant_message(rng))
        for _ in range(rng.choice([0, 0, 0, 1, 2])):  # tool results, then the assistant continues
            messages.append({"role": "tool", "content": text(rng)})
            if rng.random() < 0.5:
                messages.append(assistant_message(rng))
    if rng.random() < 0.2:
        messages.append({"role": "user", "content": text(rng)})
    return messages


@pytest.mark.parametrize("seed", range(4))
def test_render_matches_transformers_on_random_conversations(qwen_template, hf_tokenizer, seed):
    rng = random.Random(seed)
    for _ in range(150):
        messages = conversation(rng)
        enable_thinking, add_generation_prompt = rng.random() < 0.5, rng.random() < 0.5
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=enable_thinking,
                                                    add_generation_prompt=add_generation_prompt)
        assert qwen_template.render(messages, enable_thinking, add_generation_prompt) == expected, messages


def test_render_covers_the_documented_cases(qwen_template, hf_tokenizer):
    """Hand-picked cases: single/multi-turn, with/without system and reasoning, thinking on/off."""
    system = [{"role": "system", "content": "Be brief."}]
    single = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"}]
    multi = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r1</think>b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\nd"}]
    for messages in (single, system + single, multi, system + multi, multi[:3]):
        for enable_thinking in (True, False):
            for add_generation_prompt in (True, False):
                expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=enable_thinking,
                                                            add_generation_prompt=add_generation_prompt)
                assert qwen_template.render(messages, enable_thinking, add_generation_prompt) == expected
    # The template drops the reasoning of the earlier turn and keeps the last one's.
    rendered = qwen_template.render(multi)
    assert "r1" not in rendered and "<think>\nr2\n</think>\n\nd<|im_end|>" in rendered


def test_generation_prompt_tokens_match_transformers(qwen_template, hf_tokenizer):
    messages = [{"role": "user", "content": "Write a haiku about 数学 😀"}]
    for enable_thinking in (True, False):
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                    enable_thinking=enable_thinking)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert qwen_template.tokenizer.encode(qwen_template.render(messages, enable_thinking, add_generation_prompt=True), add_special_tokens=False).ids == list(expected)
