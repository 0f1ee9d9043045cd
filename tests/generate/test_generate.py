"""KV-cache decoding against HF transformers (greedy parity) and against closed-form sampling facts."""
import pytest
import torch
from qwen3_fixtures import save_hf_qwen3

from qforge.engine import load_model
from qforge.engine.generate import generate, last_logits, next_token_logits, prefill, sample_next_token

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf_qwen3(tmp_path_factory.mktemp("generate") / "tiny", seed=3)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


PROMPTS = [[5, 17, 300], [11, 2, 9, 401, 77, 8, 123], [42], [7, 7, 7, 7, 7, 100, 200, 300, 400, 500, 1, 2]]


def hf_greedy(hf_model, prompt, new_tokens):
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_batch_of_ragged_prompts_equals_hf_greedy(model, hf_model):
    ours = generate(model, PROMPTS, max_new_tokens=12)
    assert ours == [hf_greedy(hf_model, p, 12) for p in PROMPTS]


def test_cached_logits_equal_full_forward_at_every_step(model):
    """Left padding and the cache must not change any logit: compare with an uncached forward per row."""
    new = generate(model, PROMPTS, max_new_tokens=4)
    full = [p + n for p, n in zip(PROMPTS, new)]
    with torch.no_grad():
        logits, cache, lengths = prefill(model, PROMPTS, extra_slots=4)
        steps = [logits]
        for step in range(3):
            token = torch.tensor([row[len(p) + step] for row, p in zip(full, PROMPTS)])
            steps.append(last_logits(model, token[:, None], (lengths + step)[:, None], cache))
        for row, sequence in enumerate(full):
            reference = model(torch.tensor([sequence]))[0]
            for step, logits in enumerate(steps):
                torch.testing.assert_close(logits[row], reference[len(PROMPTS[row]) - 1 + step],
                                           rtol=1e-5, atol=1e-5)


def test_next_token_logits_of_ragged_prompts(model):
    logits = next_token_logits(model, PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[row], model(torch.tensor([prompt]))[0, -1], rtol=1e-5, atol=1e-5)


def test_stop_id_ends_only_its_row_and_is_not_returned(model):
    free = generate(model, PROMPTS, max_new_tokens=8)
    stop = free[1][3]  # row 1 produces it at step 3 (and maybe elsewhere)
    stopped = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[stop])
    for row, tokens in zip(free, stopped):
        expected = row[:row.index(stop)] if stop in row else row
        assert tokens == expected
    assert len(stopped[1]) <= 3


def test_suppressed_ids_are_never_generated(model):
    free = generate(model, PROMPTS, max_new_tokens=6)
    banned = sorted({t for row in free for t in row})
    constrained = generate(model, PROMPTS, max_new_tokens=6, suppress_ids=banned)
    assert all(t not in banned for row in constrained for t in row)
    # the first token is exactly the best non-suppressed one
    logits = model(torch.tensor([PROMPTS[0]]))[0, -1]
    logits[banned] = float("-inf")
    assert constrained[0][0] == int(logits.argmax())
    with pytest.raises(ValueError, match="whole vocabulary"):
        generate(model, PROMPTS, max_new_tokens=1, suppress_ids=range(model.config.vocab_size))


def test_presence_penalty_forbids_repeats_when_large(model):
    repetitive = generate(model, [[7] * 5], max_new_tokens=30)[0]
    assert len(set(repetitive)) < len(repetitive)  # this tiny model loops without a penalty
    penalised = generate(model, [[7] * 5], max_new_tokens=30, presence_penalty=1e4)[0]
    assert len(set(penalised)) == len(penalised)
    # rows leaving the batch early must not disturb the others' penalties
    free = generate(model, PROMPTS, max_new_tokens=12, presence_penalty=1e4)
    stop = free[2][1]
    stopped = generate(model, PROMPTS, max_new_tokens=12, presence_penalty=1e4, stop_ids=[stop])
    assert stopped == [row[:row.index(stop)] if stop in row else row for row in free]


def test_sampling_is_reproducible_with_a_seed_and_degenerates_to_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=6)
    a = generate(model, PROMPTS, max_new_tokens=6, temperature=1.5, seed=123)
    b = generate(model, PROMPTS, max_new_tokens=6, temperature=1.5, seed=123)
    assert a == b and a != greedy
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=1.5, top_k=1, seed=1) == greedy
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=1.5, top_p=1e-6, seed=1) == greedy


def test_sampling_frequencies_match_the_filtered_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next_token(logits, 1.0, 1.0, 0, generator), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    top_k = torch.bincount(sample_next_token(logits, 1.0, 1.0, 2, generator), minlength=4) / 20000
    torch.testing.assert_close(top_k, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    # top_p=0.7: 0.5 alone is below 0.7, so 0.3 joins; 0.8 reached, the rest is cut
    top_p = torch.bincount(sample_next_token(logits, 1.0, 0.7, 0, generator), minlength=4) / 20000
    torch.testing.assert_close(top_p, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    hot = torch.bincount(sample_next_token(logits, 2.0, 1.0, 0, generator), minlength=4) / 20000
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(hot, expected / expected.sum(), atol=0.015, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "non-empty"),
    (dict(prompts=[[1], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[[1, 99999]]), "outside the vocabulary"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(stop_ids=[10**6]), "stop_ids"),
])
def test_bad_arguments_are_named(model, kwargs, message):
    arguments = dict(prompts=[[1, 2]], max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, arguments.pop("prompts"), **arguments)
