"""KV-cache decoding against HF transformers (greedy parity) and against closed-form sampling facts."""
import pytest
import torch
from qwen3_fixtures import save_hf_qwen3

from qforge.engine import load_model
from qforge.engine.generate import (DecodeBatch, SamplingParams, filter_logits, generate, last_logits,
                                    next_token_logits, prefill, sample_tokens)

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
        hidden, cache, lengths = prefill(model, PROMPTS, extra_slots=4)
        steps = [torch.nn.functional.linear(hidden[:, -1], model.output_weight)]
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


def draw(logits, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, n=20000, seed=0):
    """Frequencies of n draws from one row of logits with the given settings."""
    rows = logits.expand(n, -1)
    setting = lambda value, dtype: torch.full((n,), value, dtype=dtype)
    filtered = filter_logits(rows, setting(temperature, torch.float32), setting(top_p, torch.float32),
                             setting(top_k, torch.long), setting(min_p, torch.float32))
    generator = torch.Generator().manual_seed(seed)
    return torch.bincount(sample_tokens(filtered, [generator] * n), minlength=logits.shape[-1]) / n


def test_sampling_frequencies_match_the_filtered_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(draw(logits), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    torch.testing.assert_close(draw(logits, top_k=2), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    # top_p=0.7: 0.5 alone is below 0.7, so 0.3 joins; 0.8 reached, the rest is cut
    torch.testing.assert_close(draw(logits, top_p=0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    # min_p=0.25: tokens below 0.25 x 0.5 = 0.125 go (only 0.05)
    torch.testing.assert_close(draw(logits, min_p=0.25), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95,
                               atol=0.015, rtol=0)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(draw(logits, temperature=2.0), expected / expected.sum(), atol=0.015, rtol=0)


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


def test_rows_joining_and_leaving_between_steps_decode_as_if_alone(model, hf_model):
    """The scheduler's contract: a row's greedy tokens do not depend on when it joined or who else ran."""
    batch = DecodeBatch(model)
    greedy = SamplingParams()
    rows = {0: batch.add([PROMPTS[0]], [greedy])[0]}
    for step in range(10):
        if step == 2:  # a longer prompt joins mid-decode: the running row gets more left padding
            rows[3] = batch.add([PROMPTS[3]], [greedy])[0]
        if step == 4:
            rows.update(zip((1, 2), batch.add([PROMPTS[1], PROMPTS[2]], [greedy, greedy])))
        batch.sample()
        done = {r for r in batch.rows if len(r.output) >= 6}
        batch.advance(done)
    assert not batch.rows and batch.cache is None  # finished rows freed their slots
    for index, row in rows.items():
        assert row.output == hf_greedy(hf_model, PROMPTS[index], 6)


def test_a_seeded_row_samples_the_same_tokens_whatever_else_is_in_the_batch(model):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    alone = generate(model, [PROMPTS[1]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)[0]
    # offline, row i of a batch uses seed + i: the same row alone with that seed gives the same tokens
    assert generate(model, PROMPTS[:2], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=6)[1] == alone
    batch = DecodeBatch(model)
    batch.add([PROMPTS[0], PROMPTS[3]], [SamplingParams(temperature=1.3), SamplingParams(temperature=0.7, seed=1)])
    batch.sample()
    batch.advance()
    row = batch.add([PROMPTS[1]], [seeded])[0]
    while len(row.output) < 8:
        batch.sample()
        batch.advance()
    assert row.output == alone


def test_penalties_and_logit_bias_match_their_closed_forms(model):
    prompt = PROMPTS[1]
    logits = model(torch.tensor([prompt]))[0, -1]
    bias = SamplingParams(logit_bias=((5, 100.0),))
    batch = DecodeBatch(model)
    assert batch.add([prompt], [bias])[0] and batch.sample()[0].token == 5
    # two steps by hand: the penalties act on the second step's logits, given the first token
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3)
    batch = DecodeBatch(model)
    row = batch.add([prompt], [params])[0]
    first = batch.sample()[0].token
    penalised = logits.clone()  # nothing generated yet: only the repetition penalty, on the prompt tokens
    seen = sorted(set(prompt))
    penalised[seen] = torch.where(penalised[seen] > 0, penalised[seen] / 1.3, penalised[seen] * 1.3)
    assert first == int(penalised.argmax())
    batch.advance()
    expected = model(torch.tensor([prompt + [first]]))[0, -1].clone()
    seen = sorted(set(prompt + [first]))
    expected[first] -= 0.5 + 0.25
    expected[seen] = torch.where(expected[seen] > 0, expected[seen] / 1.3, expected[seen] * 1.3)
    assert batch.sample()[0].token == int(expected.argmax())
    assert row.output[0] == first


def test_first_token_under_repetition_penalty_is_the_penalised_argmax(model):
    prompt = [7] * 5
    logits = model(torch.tensor([prompt]))[0, -1].clone()
    logits[7] = logits[7] / 1e3 if logits[7] > 0 else logits[7] * 1e3
    out = generate(model, [prompt], max_new_tokens=1, repetition_penalty=1e3)[0]
    assert out == [int(logits.argmax())]


def test_logprobs_of_sampled_and_prompt_tokens_are_the_models_log_softmax(model):
    batch = DecodeBatch(model)
    row = batch.add([PROMPTS[3]], [SamplingParams(logprobs=3)], prompt_logprobs=2)[0]
    pick = batch.sample()[0]
    reference = model(torch.tensor([PROMPTS[3]]))[0].log_softmax(-1)
    assert pick.token == int(reference[-1].argmax())
    assert pick.logprob == pytest.approx(float(reference[-1].max()), abs=1e-5)
    assert [t for t, _ in pick.top] == reference[-1].topk(3).indices.tolist()
    assert row.prompt_logprobs[0] is None and len(row.prompt_logprobs) == len(PROMPTS[3])
    for position, entry in enumerate(row.prompt_logprobs[1:], start=1):
        assert entry.token == PROMPTS[3][position]
        assert entry.logprob == pytest.approx(float(reference[position - 1, entry.token]), abs=1e-5)
        assert [t for t, _ in entry.top] == reference[position - 1].topk(2).indices.tolist()


def test_sampling_over_output_ids_equals_suppressing_every_other_id(model):
    """A pruned model's rollouts: logits of the kept head rows only ([B, K]) give the same tokens, greedy and
    seeded, as the full head with every other id suppressed — and only kept ids."""
    kept = sorted({int(t) for p in PROMPTS for t in p} | set(range(0, 400, 7)))
    others = sorted(set(range(model.config.vocab_size)) - set(kept))
    for settings in ({"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.9, "seed": 11}):
        restricted = generate(model, PROMPTS, max_new_tokens=10, output_ids=kept, **settings)
        assert restricted == generate(model, PROMPTS, max_new_tokens=10, suppress_ids=others, **settings)
        assert {t for row in restricted for t in row} <= set(kept)
    with pytest.raises(ValueError, match="samples only"):
        generate(model, PROMPTS, max_new_tokens=2, output_ids=kept, presence_penalty=1.0)


def test_a_generation_allocates_its_cache_once(model, monkeypatch):
    """generate() knows how many tokens it will add: each layer's buffers are sized once for prompt + new tokens
    (no doubling), also after finished rows leave and the cache drops the slots no row uses."""
    from qforge.engine.generate import KVCache

    slots, attend = set(), KVCache.attend

    def recording(self, layer_idx, q, k, v):
        out = attend(self, layer_idx, q, k, v)
        slots.add(self.keys[layer_idx].shape[2])
        return out

    monkeypatch.setattr(KVCache, "attend", recording)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    out = generate(model, prompts, max_new_tokens=9, stop_ids=[4], temperature=1.0, seed=0)
    assert max(map(len, out)) >= 2
    assert slots and max(slots) <= max(map(len, prompts)) + 9 - 1
