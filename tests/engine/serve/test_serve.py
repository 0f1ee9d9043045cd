"""The server against the `openai` SDK (sync and async) and HF transformers as the numerical oracle."""
import asyncio

import openai
import pytest
import torch
from serve_fixtures import served_checkpoint

from qforge.engine.serve.chat import parse_tool_calls

USER = [{"role": "user", "content": "Một cộng một bằng mấy?"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_checkpoint(tmp_path_factory.mktemp("serve"), max_batch=8) as value:
        yield value


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[2].url, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf_model(served):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(served[0], dtype=torch.float32).eval()


def test_greedy_chat_equals_offline_generation(served, client):
    _, chat_model, _ = served
    offline = chat_model.chat([USER], enable_thinking=False, max_new_tokens=8)[0]
    reply = client.chat.completions.create(model=chat_model.name, messages=USER, max_tokens=8, temperature=0,
                                           extra_body=NO_THINK)
    assert reply.choices[0].message.content == offline.text.strip()
    assert reply.choices[0].finish_reason == offline.finish_reason
    assert reply.usage.prompt_tokens == offline.prompt_tokens
    assert reply.usage.completion_tokens == offline.completion_tokens


def test_streaming_chunks_add_up_to_the_whole_reply(served, client):
    name = served[1].name
    whole = client.chat.completions.create(model=name, messages=USER, max_tokens=12, temperature=0.8, seed=3)
    chunks = list(client.chat.completions.create(model=name, messages=USER, max_tokens=12, temperature=0.8, seed=3,
                                                 stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    message = whole.choices[0].message
    assert content == message.content
    assert reasoning == (getattr(message, "reasoning_content", None) or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12


def test_n_choices_differ_and_a_seed_reproduces_them(served, client):
    kwargs = dict(model=served[1].name, messages=USER, max_tokens=10, temperature=1.0, n=3, seed=11)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1
    assert first.usage.completion_tokens == 30


def test_seeded_requests_are_reproducible_under_concurrent_load(served):
    url, name = served[2].url, served[1].name

    async def run():
        async_client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)

        async def one(seed):
            reply = await async_client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": f"Kể chuyện số {seed % 3}"}], max_tokens=8,
                temperature=1.0, top_p=0.95, seed=seed)
            return reply.choices[0].message.content

        crowd = await asyncio.gather(*(one(seed) for seed in range(12)))  # joining and leaving one batch
        alone = [await one(seed) for seed in (0, 5, 11)]
        await async_client.close()
        return crowd, alone

    crowd, alone = asyncio.run(run())
    assert [crowd[0], crowd[5], crowd[11]] == alone
    assert len(set(crowd)) > 3


def test_logprobs_are_the_models_log_softmax(served, client, hf_model):
    _, chat_model, _ = served
    reply = client.chat.completions.create(model=chat_model.name, messages=USER, max_tokens=3, temperature=0,
                                           logprobs=True, top_logprobs=4, extra_body=NO_THINK)
    prompt = chat_model.encode(chat_model.render(USER, enable_thinking=False))
    content = reply.choices[0].logprobs.content
    assert len(content) == 3
    ids = prompt[:]
    for entry in content:
        reference = hf_model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        best = reference.topk(4)
        assert entry.logprob == pytest.approx(float(best.values[0]), abs=1e-4)  # greedy: the top token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [chat_model.tokenizer.decode([i]) for i in best.indices]
        ids.append(int(best.indices[0]))


def test_completions_echo_logprobs_score_the_prompt(served, client, hf_model):
    """What lm-evaluation-harness' log-likelihood requests need: prompt token log-probs with echo."""
    _, chat_model, _ = served
    text = "Thủ đô của Việt Nam là Hà Nội"
    ids = chat_model.encode(text)
    reply = client.completions.create(model=chat_model.name, prompt=ids, max_tokens=1, temperature=0, echo=True,
                                      logprobs=1)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    reference = hf_model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert logprobs.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
    assert reply.choices[0].text.startswith(chat_model.tokenizer.decode(ids))
    scored = client.completions.create(model=chat_model.name, prompt=text, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert scored.usage.completion_tokens == 0


def test_batched_text_prompts_and_stop_strings_that_stop(served, client):
    name = served[1].name
    free = client.completions.create(model=name, prompt=["Hà Nội", "Sài Gòn"], max_tokens=20, temperature=0)
    assert [c.index for c in free.choices] == [0, 1] and free.usage.completion_tokens == 40
    first = free.choices[0].text
    stop = first[3:6]
    cut = client.completions.create(model=name, prompt="Hà Nội", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == first[:first.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 20  # decoding stopped at the stop string, not at max_tokens
    streamed = client.completions.create(model=name, prompt="Hà Nội", max_tokens=20, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_sampling_settings_reach_the_sampler(served, client):
    name = served[1].name
    greedy = client.completions.create(model=name, prompt="Hà Nội", max_tokens=6, temperature=0)
    assert client.completions.create(model=name, prompt="Hà Nội", max_tokens=6, temperature=1.5, seed=4,
                                     extra_body={"top_k": 1}).choices[0].text == greedy.choices[0].text
    assert client.completions.create(model=name, prompt="Hà Nội", max_tokens=6, temperature=1.5, seed=4,
                                     extra_body={"min_p": 1.0}).choices[0].text == greedy.choices[0].text
    forced = client.completions.create(model=name, prompt="Hà Nội", max_tokens=3, temperature=0,
                                       logit_bias={"15": 100})
    assert forced.choices[0].text == "000"  # token 15 is "0"
    repeated = client.completions.create(model=name, prompt="Hà Nội", max_tokens=30, temperature=0,
                                         frequency_penalty=2.0, presence_penalty=2.0, logprobs=0)
    tokens = repeated.choices[0].logprobs.tokens
    plain = client.completions.create(model=name, prompt="Hà Nội", max_tokens=30, temperature=0, logprobs=0)
    assert len(set(tokens)) >= len(set(plain.choices[0].logprobs.tokens))


def test_tools_are_rendered_like_the_hf_template_and_tool_calls_parsed(served):
    from transformers import AutoTokenizer

    checkpoint, chat_model, _ = served
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Thời tiết",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "system", "content": "Bạn là trợ lý."}, {"role": "user", "content": "Hà Nội?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Hà Nội"}}}]},
                {"role": "tool", "content": "25°C"}]
    hf = AutoTokenizer.from_pretrained(checkpoint)
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert chat_model.render(messages, tools=tools) == expected
    text = 'Để xem.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Huế"}}\n</tool_call>'
    assert parse_tool_calls(text) == ("Để xem.", [{"name": "get_weather", "arguments": '{"city": "Huế"}'}])
    assert parse_tool_calls("<tool_call>not json</tool_call>")[1] == []


def test_tool_requests_are_served(served, client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    reply = client.chat.completions.create(model=served[1].name, messages=USER, tools=tools, max_tokens=4,
                                           temperature=0, extra_body=NO_THINK)
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")
    tokens = client.post("/../tokenize", body={"messages": USER, "tools": tools}, cast_to=object)
    assert tokens["count"] > client.post("/../tokenize", body={"messages": USER}, cast_to=object)["count"]


def test_models_and_tokenize(served, client):
    _, chat_model, _ = served
    assert [m.id for m in client.models.list()] == [chat_model.name]
    assert client.models.retrieve(chat_model.name).id == chat_model.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    result = client.post("/../tokenize", body={"prompt": "Xin chào"}, cast_to=object)
    assert result["tokens"] == chat_model.encode("Xin chào") and result["max_model_len"] == 512
    rendered = client.post("/../tokenize", body={"messages": USER}, cast_to=object)
    assert rendered["tokens"] == chat_model.encode(chat_model.render(USER))
    assert client.post("/../detokenize", body={"tokens": result["tokens"]}, cast_to=object)["prompt"] == "Xin chào"


def test_context_length_is_checked(served, client):
    name = served[1].name
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.chat.completions.create(model=name, messages=USER, max_tokens=10 ** 9)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=name, prompt="xin chào " * 400, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=name, prompt="x" * 10_000_000, max_tokens=1)  # refused untokenised
    ok = client.chat.completions.create(model=name, messages=USER, max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2
