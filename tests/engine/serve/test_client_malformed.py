"""ChatClient against a deliberately misbehaving loopback server: every 200 that is not a usable answer (not
JSON, cut short, an event stream, an error object, the wrong shape) is retried, then either succeeds or ends
in one ChatClientError line; no decoder exception escapes."""
import json
import warnings

import pytest
from scripted_server import ChatServer, ScriptedBackend, http_reply, raw_server

from qforge.engine.serve.client import ChatClient, ChatClientError

USER = [{"role": "user", "content": "q"}]
CHAT = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
GOOD = http_reply(CHAT.encode())
SSE = b'data: {"choices": [{"index": 0, "delta": {"content": "o"}}]}\n\ndata: {"choices": [{"ind'

MALFORMED = {  # name: (raw reply, what the one-line error says about it)
    "html as json": (http_reply(b"<html><body>502 Bad Gateway</body></html>"), "not JSON"),
    "html": (http_reply(b"<html>\n<body>oops</body>\n</html>", content_type="text/html"), "not JSON"),
    "empty": (http_reply(b""), "not JSON"),
    "cut short": (http_reply(CHAT[:40].encode(), length=len(CHAT)), "connection failed"),
    "cut json, honest length": (http_reply(CHAT[:40].encode()), "not JSON"),
    "partial sse": (http_reply(SSE, content_type="text/event-stream"), "event stream"),
    "partial sse as json": (http_reply(SSE), "not JSON"),
    "chunked sse cut": (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"%x\r\n%s" % (len(SSE) + 50, SSE), "connection failed"),
    "error in 200": (http_reply(b'{"error": {"message": "model overloaded", "type": "server_error"}}'),
                     "model overloaded"),
    "error string in 200": (http_reply(b'{"error": "upstream\\ntimeout"}'), "upstream timeout"),
    "json list": (http_reply(b"[1, 2]"), "not a JSON object"),
    "no choices": (http_reply(b'{"id": "x", "object": "chat.completion"}'), "no choices"),
    "empty choices": (http_reply(b'{"choices": []}'), "no choices"),
    "message a string": (http_reply(b'{"choices": [{"message": "ok"}]}'), "message is not an object"),
    "content a number": (http_reply(b'{"choices": [{"message": {"content": 5}}]}'), "content is not a string"),
    "usage a string": (http_reply(b'{"choices": [{"message": {"content": "ok"}}], "usage": "many"}'), "usage"),
    "usage counts as text": (http_reply(
        b'{"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": "3"}}'), "usage"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_reply_is_retried_then_succeeds(name):
    url, served = raw_server([MALFORMED[name][0], GOOD])
    client = ChatClient(url, "m", backoff=0.01, max_retries=2)
    reply = client.chat(USER)
    assert reply.content == "ok" and reply.finish_reason == "stop"
    assert len(served) == 2 and client.stats["retries"] == 1 and client.stats["requests"] == 1
    assert client.stats["prompt_tokens"] == 3


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_reply_every_time_is_one_line_error(name):
    raw, says = MALFORMED[name]
    url, served = raw_server([raw] * 3)
    client = ChatClient(url, "m", backoff=0.01, max_retries=2)
    with pytest.raises(ChatClientError) as error:
        client.chat(USER)
    message = str(error.value)
    assert "\n" not in message and says in message and "3 attempts" in message and url in message, message
    assert len(served) == 3 and client.stats["retries"] == 2 and client.stats["requests"] == 0
    assert error.value.__context__ is None  # no decoder or transport exception chained under it


def test_malformed_replies_in_a_batch_are_per_request_errors():
    url, _ = raw_server([http_reply(b"{not json")] * 2)
    client = ChatClient(url, "m", backoff=0.01, max_retries=0, concurrency=1)
    results = client.chat_many([USER, USER], errors="return", progress=False)
    assert all(isinstance(r, ChatClientError) and "not JSON" in str(r) for r in results)


def test_completions_are_checked_and_retried_the_same_way():
    text = json.dumps({"choices": [{"index": 0, "text": "Hà", "finish_reason": "length"}], "usage": {}}).encode()
    url, served = raw_server([http_reply(b'{"choices": [{"index": 0}]}'), http_reply(b'{"error": "busy"}'),
                              http_reply(text)])
    client = ChatClient(url, "m", backoff=0.01, max_retries=2)
    assert client.complete([1, 2], max_tokens=1)["choices"][0]["text"] == "Hà"
    assert client.stats["retries"] == 2


def test_a_model_list_that_is_not_json_is_a_client_error():
    url, _ = raw_server([http_reply(b"<html>"), http_reply(b'{"data": [{"id": "m"}]}')])
    assert ChatClient(url, "m", backoff=0.01, max_retries=1).models() == ["m"]
    url, _ = raw_server([http_reply(b"<html>")])
    with pytest.raises(ChatClientError, match="not JSON"):
        ChatClient(url, "m", max_retries=0).models()


def test_a_cached_reply_of_another_shape_is_fetched_again(tmp_path):
    with ChatServer(ScriptedBackend(lambda request: "fresh"), port=0) as server:
        client = ChatClient(server.url, "scripted", cache_dir=tmp_path)
        assert client.chat(USER).content == "fresh"
        [entry] = tmp_path.glob("*/*.json")
        record = json.loads(entry.read_text())
        entry.write_text(json.dumps({**record, "response": {"choices": "damaged"}}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = ChatClient(server.url, "scripted", cache_dir=tmp_path).chat(USER)
    assert again.content == "fresh" and not again.cached
    assert any("another shape" in str(w.message) for w in caught)


def test_a_non_retryable_status_is_not_retried_and_is_one_line():
    url, served = raw_server([http_reply(b'{"error": {"message": "bad\\nfield"}}', status="400 Bad Request"), GOOD])
    client = ChatClient(url, "m", backoff=0.01, max_retries=3)
    with pytest.raises(ChatClientError, match="HTTP 400") as error:
        client.chat(USER)
    assert error.value.status == 400 and "\n" not in str(error.value) and len(served) == 1
