"""Assistant-only labels and loss weights on hand-checked conversations."""
import random
import re

import numpy as np
import pytest

from data_fixtures import hf_tokenizer, qwen_template  # noqa: F401 (pytest fixtures)
from qforge.engine.data import IGNORE_INDEX, loss_weights
from test_template_parity import conversation

SINGLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4", "reasoning_content": "add"}]
MULTI = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r1</think>b"},
         {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\nd"}]


def supervised_runs(template, example) -> list[str]:
    """The decoded text of each contiguous run of supervised tokens."""
    mask = example.labels != IGNORE_INDEX
    assert np.array_equal(example.labels[mask], example.input_ids[mask])
    runs, start = [], None
    for i, on in enumerate([*mask, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append(template.tokenizer.decode(example.input_ids[start:i].tolist(), skip_special_tokens=False))
            start = None
    return runs


def hf_prompt_ids(hf_tokenizer, messages, enable_thinking):
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           enable_thinking=enable_thinking)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_single_turn_trains_reasoning_answer_and_im_end(qwen_template, hf_tokenizer):
    example = qwen_template.encode(SINGLE)
    assert supervised_runs(qwen_template, example) == ["<think>\nadd\n</think>\n\n4<|im_end|>"]
    # Everything before the first supervised token is exactly the inference prompt (thinking on).
    first = int(np.argmax(example.labels != IGNORE_INDEX))
    assert example.input_ids[:first].tolist() == hf_prompt_ids(hf_tokenizer, SINGLE[:-1], True)


def test_reasoning_can_be_excluded_from_the_loss(qwen_template):
    example = qwen_template.encode(SINGLE, train_on_reasoning=False)
    assert supervised_runs(qwen_template, example) == ["4<|im_end|>"]
    assert "add" in qwen_template.tokenizer.decode(example.input_ids.tolist(), skip_special_tokens=False)


def test_thinking_off_drops_reasoning_and_prompts_with_the_empty_think_block(qwen_template, hf_tokenizer):
    example = qwen_template.encode(SINGLE, enable_thinking=False)
    text = qwen_template.tokenizer.decode(example.input_ids.tolist(), skip_special_tokens=False)
    assert "add" not in text and text.endswith("<think>\n\n</think>\n\n4<|im_end|>\n")
    assert supervised_runs(qwen_template, example) == ["4<|im_end|>"]
    first = int(np.argmax(example.labels != IGNORE_INDEX))
    assert example.input_ids[:first].tolist() == hf_prompt_ids(hf_tokenizer, SINGLE[:-1], False)


def test_multi_turn_all_and_last(qwen_template):
    all_turns = qwen_template.encode(MULTI)
    assert supervised_runs(qwen_template, all_turns) == ["b<|im_end|>", "<think>\nr2\n</think>\n\nd<|im_end|>"]
    last = qwen_template.encode(MULTI, supervise="last")
    assert supervised_runs(qwen_template, last) == ["<think>\nr2\n</think>\n\nd<|im_end|>"]
    assert np.array_equal(all_turns.input_ids, last.input_ids)


def test_a_token_straddling_the_role_header_stays_in_the_prompt(qwen_template):
    # "assistant\n" + "\n\nb" tokenises as "assistant", "\n\n\n", "b": the newline run starts in the header.
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\n\nb"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert supervised_runs(qwen_template, qwen_template.encode(messages))[0] == "b<|im_end|>"


@pytest.mark.parametrize("seed", range(2))
def test_token_ids_match_transformers_and_labels_are_assistant_only(qwen_template, hf_tokenizer, seed):
    rng = random.Random(100 + seed)
    conversations = [conversation(rng) for _ in range(50)]
    for messages, example in zip(conversations, qwen_template.encode_batch(conversations)):
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
        assert example.input_ids.tolist() == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        # Oracle for the label rule: a token is supervised iff its first character lies inside an assistant
        # body (after "<|im_start|>assistant\n", through "<|im_end|>"), using transformers' own offsets.
        assistant_body = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)
        bodies = [(m.start(1), m.end(1)) for m in assistant_body.finditer(text)]
        offsets = hf_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        expected = [any(a <= start < b for a, b in bodies) for start, _ in offsets]
        assert (example.labels != IGNORE_INDEX).tolist() == expected
        assert len(bodies) == sum(m["role"] == "assistant" for m in messages)


def test_loss_weightings(qwen_template):
    example = qwen_template.encode(SINGLE)
    supervised = example.labels != IGNORE_INDEX
    n = int(supervised.sum())
    for weighting in ("token", "sample", "sqrt"):
        weights = loss_weights(supervised, weighting)
        expected = {"token": 1.0, "sample": 1.0 / n, "sqrt": n ** -0.5}[weighting]
        np.testing.assert_allclose(weights[supervised], expected, rtol=1e-6)
        assert not weights[~supervised].any()
    assert loss_weights(np.array([True, True, False, True]), "sample").sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown loss weighting 'mean'"):
        loss_weights(np.array([True]), "mean")
