"""Text-level generation and the local server over a tiny checkpoint that uses the real Qwen3 tokenizer."""
import shutil

import pytest
import torch
from qwen3_fixtures import save_chat_checkpoint

from qforge.engine import load_model
from qforge.engine.serve.chat import ChatModel
from qforge.engine.serve.client import ChatClient
from qforge.engine.data import ChatTemplate
from qforge.engine.generate import generate
from qforge.engine.serve.app import serve_model

QUESTIONS = ["Xin chào!", "Một cộng một bằng mấy?", "Hãy kể một câu chuyện ngắn về Hà Nội vào mùa thu.", "2+2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_chat_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-chat", seed=5)


@pytest.fixture(scope="module")
def chat_model(checkpoint):
    return ChatModel.load(checkpoint, batch_size=3)


def conversation(text):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_equals_generate_on_the_template_tokens(checkpoint, chat_model, thinking):
    template = ChatTemplate.from_pretrained(checkpoint)
    model = load_model(checkpoint, dtype=torch.float32)
    prompts = [template.tokenizer.encode(template.render(conversation(q), thinking, add_generation_prompt=True), add_special_tokens=False).ids for q in QUESTIONS]
    expected = generate(model, prompts, max_new_tokens=6, stop_ids=[template.im_end_id])
    completions = chat_model.chat([conversation(q) for q in QUESTIONS], enable_thinking=thinking, max_new_tokens=6)
    for completion, prompt, ids in zip(completions, prompts, expected):
        assert completion.prompt_tokens == len(prompt)
        assert completion.text == template.tokenizer.decode(ids, skip_special_tokens=True)
        assert completion.finish_reason == ("length" if len(ids) == 6 else "stop")


def test_suppressed_ids_and_stop_strings(chat_model):
    free = chat_model.complete(["Hà Nội"], max_new_tokens=5)[0]
    first = chat_model.encode(free.text)[0]
    suppressed = ChatModel(chat_model.model, chat_model.template, suppress_ids=[first])
    assert chat_model.encode(suppressed.complete(["Hà Nội"], max_new_tokens=5)[0].text)[:1] != [first]
    cut = chat_model.complete(["Hà Nội"], max_new_tokens=5, stop=[free.text[2:4]])[0]
    assert cut.text == free.text[:free.text.index(free.text[2:4])] and cut.finish_reason == "stop"


def test_server_batches_concurrent_requests_without_changing_greedy_output(chat_model):
    direct = chat_model.chat([conversation(q) for q in QUESTIONS], enable_thinking=False, max_new_tokens=8)
    with serve_model(chat_model, max_batch=4) as server:
        client = ChatClient(server.url, chat_model.name, concurrency=4, max_retries=0)
        replies = client.chat_many([conversation(q) for q in QUESTIONS], progress=False, temperature=0,
                                   max_tokens=8, chat_template_kwargs={"enable_thinking": False})
    for reply, completion in zip(replies, direct):
        assert reply.content == completion.text.strip()
        assert reply.usage["prompt_tokens"] == completion.prompt_tokens
        assert reply.finish_reason == completion.finish_reason


def test_open_endpoint_serves_a_checkpoint_and_caches_across_runs(checkpoint, chat_model, tmp_path):
    from qforge.recipes.common.endpoint import EndpointSettings, open_endpoint

    direct = chat_model.chat([conversation(QUESTIONS[1])], enable_thinking=False, max_new_tokens=5)[0]
    urls = []
    for run in range(2):  # a new port each run; the cache still recognises the checkpoint
        with open_endpoint(EndpointSettings(path=str(checkpoint)), cache_dir=tmp_path / "cache") as client:
            urls.append(client.base_url)
            reply = client.chat(conversation(QUESTIONS[1]), temperature=0, max_tokens=5,
                                chat_template_kwargs={"enable_thinking": False})
        assert reply.cached == (run == 1) and reply.content == direct.text.strip()
    assert urls[0] != urls[1] and urls[0].startswith("http://127.0.0.1:")
    options = dict(cache_dir=tmp_path / "cache", cache_namespace="another run")  # a caller's own namespace wins
    with open_endpoint(EndpointSettings(path=str(checkpoint)), **options) as client:
        assert not client.chat(conversation(QUESTIONS[1]), temperature=0, max_tokens=5,
                               chat_template_kwargs={"enable_thinking": False}).cached
    with pytest.raises(ValueError, match=r"exactly one of judge.endpoint.path .* or judge.endpoint.base_url"):
        EndpointSettings(path=str(checkpoint), base_url="http://127.0.0.1:1/v1", model="x").check("judge.endpoint")
    with pytest.raises(ValueError, match=r"candidate.model \(the model id"):
        EndpointSettings(base_url="http://127.0.0.1:1/v1").check("candidate")


def test_checkpoint_suppress_tokens_are_honoured(checkpoint, chat_model, tmp_path):
    import json

    first = chat_model.encode(chat_model.complete(["Hà Nội"], max_new_tokens=3)[0].text)[0]
    pruned = tmp_path / "pruned"
    shutil.copytree(checkpoint, pruned)
    (pruned / "generation_config.json").write_text(json.dumps({"suppress_tokens": [first]}))
    reloaded = ChatModel.load(pruned, suppress_ids=[7])
    assert set(reloaded.suppress_ids) == {first, 7}
    assert chat_model.encode(reloaded.complete(["Hà Nội"], max_new_tokens=3)[0].text)[:1] != [first]



def test_an_endpoint_that_ignores_suppress_tokens_gets_them_as_logit_bias(checkpoint, chat_model, tmp_path):
    """A pruned checkpoint served elsewhere (vLLM ignores generation_config's suppress_tokens): the client
    reads them from the checkpoint and sends logit_bias -100, which any OpenAI-compatible server applies."""
    import json

    from qforge.engine.serve.app import serve_model
    from qforge.recipes.common.endpoint import EndpointSettings, open_endpoint

    request = dict(temperature=0, max_tokens=4, chat_template_kwargs={"enable_thinking": False})
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    offline = chat_model.chat([conversation(QUESTIONS[0])], enable_thinking=False, max_new_tokens=4)[0]
    assert offline.text.strip() == ""  # this tiny model's greedy reply: blank lines; ban every blank token
    banned = sorted(i for token, i in chat_model.tokenizer.get_vocab().items() if set(token) <= set("ĊĠĉč"))
    (pruned / "generation_config.json").write_text(json.dumps({"suppress_tokens": banned}))
    with serve_model(chat_model) as server:  # a server that knows nothing of the suppressed ids
        with open_endpoint(EndpointSettings(base_url=server.url, model=chat_model.name)) as client:
            free = client.chat(conversation(QUESTIONS[0]), **request).content
        settings = EndpointSettings(base_url=server.url, model=chat_model.name, suppress_ids=str(pruned))
        with open_endpoint(settings) as client:
            constrained = client.chat(conversation(QUESTIONS[0]), **request).content
    assert free == offline.text.strip()
    assert constrained and not set(chat_model.encode(constrained)) & set(banned)
