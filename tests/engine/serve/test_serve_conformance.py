"""The request models against the OpenAI API's own rules, field by field, over raw HTTP and the `openai` SDK:
an explicit null means the default, types are strict, content is required where the API requires it, and no
bad input reaches the engine (a 400 naming the field, never a 500)."""
import http.client
import json

import openai
import pytest
from serve_fixtures import served_checkpoint

USER = [{"role": "user", "content": "Xin chào"}]
VOCAB = 151936  # the tiny checkpoint keeps Qwen3's vocabulary size


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_checkpoint(tmp_path_factory.mktemp("conformance"), max_batch=8) as value:
        yield value


@pytest.fixture(scope="module")
def port(served):
    return served[2].port


@pytest.fixture(scope="module")
def sdk(served):
    return openai.OpenAI(base_url=served[2].url, api_key="none", max_retries=0, timeout=60)


def post(port: int, path: str, body: dict) -> tuple[int, dict, str]:
    """(status, JSON body (an event stream: its text), content type) of one raw POST."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    kind = response.getheader("content-type")
    return response.status, json.loads(data) if kind == "application/json" else data.decode(), kind


def chat(port: int, **fields) -> tuple[int, dict, str]:
    return post(port, "/v1/chat/completions", {"messages": USER, "max_tokens": 3, **fields})


def assert_400(status: int, payload: dict, param: str) -> None:
    assert status == 400, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error
    assert error["message"].startswith(error["param"]) and "\n" not in error["message"]


def texts(payload: dict) -> list[str]:
    return [choice["message"]["content"] for choice in payload["choices"]]


# --- null means the default -------------------------------------------------------------------------------
CHAT_NULLABLE = ["n", "stream", "stream_options", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "logit_bias", "seed", "stop", "user", "logprobs", "top_logprobs",
                 "max_completion_tokens", "tools", "tool_choice", "response_format", "chat_template_kwargs",
                 "return_tokens_as_token_ids", "model"]


@pytest.mark.parametrize("field", CHAT_NULLABLE)
def test_an_explicit_null_is_the_default(port, field):
    status, plain, _ = chat(port, temperature=0)
    assert status == 200
    status, payload, kind = chat(port, temperature=0, **{field: None})
    assert status == 200 and kind == "application/json", payload  # stream: null is not a stream
    assert texts(payload) == texts(plain) and len(payload["choices"]) == 1  # n: null is one choice
    assert payload["usage"] == plain["usage"] and payload["choices"][0]["logprobs"] is None


def test_temperature_and_max_tokens_null_are_the_defaults(port):
    status, default, _ = chat(port, seed=7, max_tokens=None)
    assert status == 200 and default["usage"]["completion_tokens"] > 3  # not capped at 3: the server default
    status, unset, _ = post(port, "/v1/chat/completions", {"messages": USER, "seed": 7, "temperature": 1.0})
    status, null, _ = post(port, "/v1/chat/completions", {"messages": USER, "seed": 7, "temperature": None})
    assert texts(null) == texts(unset) == texts(default)


def test_completions_nulls_are_the_defaults(port):
    body = {"prompt": "Hà Nội", "max_tokens": 3, "temperature": 0}
    status, plain, _ = post(port, "/v1/completions", body)
    nulls = {name: None for name in ("n", "stream", "echo", "logprobs", "best_of", "suffix", "top_p", "seed",
                                     "stop", "logit_bias", "stream_options", "presence_penalty")}
    status, payload, _ = post(port, "/v1/completions", {**body, **nulls})
    assert status == 200 and [c["text"] for c in payload["choices"]] == [c["text"] for c in plain["choices"]]


def test_the_openai_sdk_sending_explicit_nulls_gets_the_defaults(served, sdk):
    name = served[1].name
    plain = sdk.chat.completions.create(model=name, messages=USER, max_tokens=3, temperature=0)
    nulls = sdk.chat.completions.create(model=name, messages=USER, max_tokens=3, temperature=0, n=None, stream=None,
                                        top_p=None, presence_penalty=None, frequency_penalty=None, seed=None,
                                        stop=None, logprobs=None, top_logprobs=None, logit_bias=None, user=None)
    assert [c.message.content for c in nulls.choices] == [c.message.content for c in plain.choices]
    text = sdk.completions.create(model=name, prompt="Hà Nội", max_tokens=3, temperature=0, n=None, echo=None,
                                  logprobs=None, best_of=None, stream=None)
    assert len(text.choices) == 1 and text.usage.completion_tokens == 3


# --- strict types -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("max_tokens", "10"), ("max_tokens", 10.0), ("max_tokens", True), ("max_completion_tokens", "5"),
    ("n", "2"), ("n", 2.0), ("stream", "true"), ("stream", 1), ("temperature", "0.5"), ("temperature", True),
    ("top_p", "1"), ("seed", "5"), ("seed", 5.5), ("logprobs", "true"), ("logprobs", 1), ("top_k", "3"),
    ("stop", [1]), ("stop", 5), ("user", 5), ("presence_penalty", False), ("top_logprobs", "2"),
    ("stream_options", {"include_usage": "yes"}), ("return_tokens_as_token_ids", 1),
])
def test_types_are_strict(port, field, value):
    status, payload, _ = chat(port, **{field: value})
    assert_400(status, payload, field)


def test_the_openai_sdk_gets_a_400_naming_the_field_for_a_string_number(served, sdk):
    with pytest.raises(openai.BadRequestError) as error:
        sdk.chat.completions.create(model=served[1].name, messages=USER, max_tokens="10")
    assert error.value.param == "max_tokens" and error.value.status_code == 400


# --- content required where the API requires it --------------------------------------------------------
@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": None}],
    [{"role": "user"}],
    [{"role": "system", "content": None}, *USER],
    [{"role": "developer"}, *USER],
    [*USER, {"role": "assistant", "content": None}, *USER],
    [*USER, {"role": "assistant", "content": "", "tool_calls": None}, {"role": "tool", "content": None}],
    [{"role": "user", "content": []}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
])
def test_content_is_required_where_the_api_requires_it(port, messages):
    status, payload, _ = chat(port, messages=messages)
    index = next(i for i, m in enumerate(messages) if not isinstance(m.get("content"), str))  # the bad one
    assert_400(status, payload, f"messages.{index}.content")


def test_an_assistant_tool_call_needs_no_content(port):
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "ok"}]
    status, plain, _ = chat(port, messages=messages, temperature=0)
    assert status == 200, plain
    nulls = {**call, "id": None, "function": {"name": "f", "arguments": None}}  # null id and arguments: defaults
    tools = [{"type": None, "function": {"name": "f", "description": None, "parameters": None}}]
    status, payload, _ = chat(port, messages=[messages[0], {**messages[1], "tool_calls": [nulls]}, messages[2]],
                              tools=tools, temperature=0)
    assert status == 200 and payload["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"], payload


def test_the_openai_sdk_gets_a_400_for_a_user_message_without_content(served, sdk):
    with pytest.raises(openai.BadRequestError) as error:
        sdk.chat.completions.create(model=served[1].name, messages=[{"role": "user", "content": None}])
    assert error.value.param == "messages.0.content"


# --- logit_bias (issue 29) ----------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [
    {"²": 1}, {"-1": 1}, {"1.5": 1}, {"1e3": 1}, {" 15": 1}, {"+15": 1}, {"": 1}, {"9" * 5000: 1},
    {str(VOCAB): 1}, {"10" + "0" * 10: 1}, {"15": 101}, {"15": -100.5}, {"15": "5"}, {"15": True}, {"15": None},
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_logit_bias_is_a_400_naming_the_field(port, path, bias):
    body = {"messages": USER} if "chat" in path else {"prompt": "Hà Nội"}
    status, payload, _ = post(port, path, {**body, "max_tokens": 1, "logit_bias": bias})
    assert_400(status, payload, "logit_bias")


def test_logit_bias_at_the_edges_is_applied(served, sdk):
    name = served[1].name
    last = sdk.completions.create(model=name, prompt="Hà Nội", max_tokens=2, temperature=0, logprobs=0,
                                  logit_bias={str(VOCAB - 1): 100}, extra_body={"return_tokens_as_token_ids": True})
    assert last.choices[0].logprobs.tokens == [f"token_id:{VOCAB - 1}"] * 2  # the last id of the vocabulary
    padded = sdk.completions.create(model=name, prompt="Hà Nội", max_tokens=2, temperature=0,
                                    logit_bias={"0015": 100})
    assert padded.choices[0].text == "00"  # "0015" is token 15, "0"


# --- nothing reaches the engine unchecked -----------------------------------------------------------------
WRONG = [None, "x", "", -1, 0, 2 ** 64, 10 ** 40, 1.5, -1e300, True, [], [None], {}, {"a": None}]
SAMPLING = ["model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "logit_bias", "seed", "stop", "n", "stream", "stream_options", "user",
            "return_tokens_as_token_ids"]
FIELDS = ([("/v1/chat/completions", name) for name in SAMPLING + [
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format",
    "chat_template_kwargs"]] + [("/v1/completions", name) for name in SAMPLING + [
        "prompt", "echo", "logprobs", "suffix", "best_of"]] + [("/tokenize", name) for name in [
            "prompt", "messages", "add_generation_prompt", "chat_template_kwargs", "tools"]])


@pytest.mark.parametrize("path, field", FIELDS)
def test_no_value_of_any_field_is_a_server_error(port, path, field):
    base = {"/v1/chat/completions": {"messages": USER, "max_tokens": 1}, "/tokenize": {"messages": USER},
            "/v1/completions": {"prompt": "Hà Nội", "max_tokens": 1}}[path]
    for value in WRONG:
        body = {**base, field: value}
        if field == "prompt" and path == "/tokenize":
            body.pop("messages")  # one of the two: a null prompt without messages names the messages missing
        status, payload, _ = post(port, path, body)
        assert status in ((200, 400, 404) if field == "model" else (200, 400)), (field, value, payload)
        if status != 200:
            allowed = {field, "messages"} if path == "/tokenize" else {field}
            assert (payload["error"]["param"] or "").split(".")[0] in allowed, (value, payload)


@pytest.mark.parametrize("key", ["role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"])
def test_no_value_of_any_message_field_is_a_server_error(port, key):
    for value in WRONG + [[{"function": {"name": "f", "arguments": "not json"}}], [{"type": "image_url"}]]:
        status, payload, _ = chat(port, messages=[{"role": "user", "content": "x", key: value}], max_tokens=1)
        assert status in (200, 400), (key, value, payload)
        if status != 200:
            assert payload["error"]["param"].startswith(f"messages.0.{key}"), (value, payload)
