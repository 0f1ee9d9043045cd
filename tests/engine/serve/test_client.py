"""ChatClient over real loopback HTTP against scripted servers (no model needed) and broken raw-socket ones."""
import json
import threading
import time

import pytest
from scripted_server import ChatServer, RequestError, ScriptedBackend, raw_server

from qforge.engine.serve.client import ChatClient, ChatClientError


def echo(request):
    return f"<think>about {request.messages[-1]['content']}</think>\n\nanswer to {request.messages[-1]['content']}"


@pytest.fixture
def echo_server():
    with ChatServer(ScriptedBackend(echo, name="echo"), port=0) as server:
        yield server


def user(text):
    return [{"role": "user", "content": text}]


def test_round_trip_splits_reasoning_and_reports_usage(echo_server):
    client = ChatClient(echo_server.url, "echo")
    reply = client.chat(user("xin chào"), temperature=0)
    assert reply.content == "answer to xin chào"
    assert reply.reasoning_content == "about xin chào"
    assert reply.finish_reason == "stop" and reply.model == "echo"
    assert reply.usage["total_tokens"] == reply.usage["prompt_tokens"] + reply.usage["completion_tokens"] > 0
    assert client.models() == ["echo"]


def test_stop_strings_cut_the_reply(echo_server):
    reply = ChatClient(echo_server.url, "echo").chat(user("abc"), stop=["to"])
    assert reply.content == "answer"


@pytest.mark.parametrize("body_fix, field", [
    ({"temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"n": 0}, "n"),
    ({"model": "gpt-9"}, "gpt-9"),
])
def test_bad_requests_fail_fast_with_the_field_named(echo_server, body_fix, field):
    client = ChatClient(echo_server.url, "echo", backoff=0.01)
    messages = body_fix.pop("messages", user("x"))
    if "model" in body_fix:
        client.model = body_fix.pop("model")
    with pytest.raises(ChatClientError, match=field) as error:
        client.chat(messages, **body_fix)
    assert error.value.status in (400, 404)
    assert client.stats["retries"] == 0


class Flaky(ScriptedBackend):
    """Fails the first `failures` calls with a server error, then echoes."""

    def __init__(self, failures):
        super().__init__(self.answer, "flaky")
        self.failures = failures
        self.calls = 0

    def answer(self, request):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("temporarily overloaded")
        return echo(request)


def test_server_errors_are_retried_with_backoff_then_succeed():
    backend = Flaky(failures=2)
    with ChatServer(backend, port=0) as server:
        client = ChatClient(server.url, "flaky", backoff=0.01, max_retries=3)
        assert client.chat(user("q")).content == "answer to q"
    assert backend.calls == 3 and client.stats["retries"] == 2


def test_retries_exhausted_raise_with_the_status():
    with ChatServer(Flaky(failures=10), port=0) as server:
        client = ChatClient(server.url, "flaky", backoff=0.01, max_retries=1)
        with pytest.raises(ChatClientError, match="temporarily overloaded") as error:
            client.chat(user("q"))
    assert error.value.status == 500 and client.stats["retries"] == 1


def test_timeout_is_an_error_not_a_hang():
    def slow(request):
        time.sleep(1.0)
        return "late"

    with ChatServer(ScriptedBackend(slow, name="slow"), port=0) as server:
        client = ChatClient(server.url, "slow", timeout=0.2, max_retries=0)
        started = time.monotonic()
        with pytest.raises(ChatClientError, match="timed out"):
            client.chat(user("q"))
        assert time.monotonic() - started < 0.9


def test_concurrency_is_bounded_and_order_kept():
    in_flight, peak, lock = [0], [0], threading.Lock()

    def tracked(request):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return request.messages[-1]["content"].upper()

    with ChatServer(ScriptedBackend(tracked, name="t"), port=0) as server:
        client = ChatClient(server.url, "t", concurrency=3)
        replies = client.chat_many([user(f"q{i}") for i in range(12)], progress=False)
    assert [r.content for r in replies] == [f"Q{i}" for i in range(12)]
    assert 1 < peak[0] <= 3


def test_cache_makes_an_interrupted_run_resume(tmp_path):
    calls, broken = [], [True]

    def picky(request):
        text = request.messages[-1]["content"]
        calls.append(text)
        if text == "q2" and broken[0]:  # the first pass "crashes" on q2
            raise RuntimeError("interrupted")
        return text + "!"

    conversations = [user(f"q{i}") for i in range(4)]
    with ChatServer(ScriptedBackend(picky, name="p"), port=0) as server:
        client = ChatClient(server.url, "p", cache_dir=tmp_path / "cache", max_retries=0, concurrency=1)
        first = client.chat_many(conversations, errors="return", progress=False)
        assert isinstance(first[2], ChatClientError) and first[3].content == "q3!"
        calls.clear()
        broken[0] = False
        resumed = ChatClient(server.url, "p", cache_dir=tmp_path / "cache", concurrency=1)
        second = resumed.chat_many(conversations, progress=False)
    assert calls == ["q2"]  # only the failed request went to the server again
    assert [r.content for r in second] == ["q0!", "q1!", "q2!", "q3!"]
    assert [r.cached for r in second] == [True, True, False, True]
    assert resumed.stats["cache_hits"] == 3 and resumed.stats["requests"] == 1
    # a different parameter or tag is a different request
    with ChatServer(ScriptedBackend(picky, name="p"), port=0) as server:
        other = ChatClient(server.url, "p", cache_dir=tmp_path / "cache")
        assert not other.chat(user("q0"), cache_tag="sample-2").cached


GOOD = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {}}).encode()


def test_truncated_bodies_and_garbage_status_lines_are_retried_not_raised():
    responses = [b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"choices\"",  # IncompleteRead
                 b"NOT HTTP AT ALL\r\n\r\n",  # BadStatusLine
                 b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(GOOD), GOOD)]
    url, served = raw_server(responses)
    client = ChatClient(url, "m", backoff=0.01, max_retries=2)
    assert client.chat(user("q")).content == "ok"
    assert len(served) == 3 and client.stats["retries"] == 2


def test_transport_errors_are_returned_per_request_and_never_end_the_run():
    url, _ = raw_server([b"garbage\r\n\r\n"] * 4)
    client = ChatClient(url, "m", backoff=0.01, max_retries=1, concurrency=1)
    results = client.chat_many([user("a"), user("b")], errors="return", progress=False)
    assert all(isinstance(r, ChatClientError) for r in results)


def test_retry_after_is_honoured_but_capped_by_max_backoff():
    busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3600\r\nContent-Length: 2\r\n\r\n{}"
    url, served = raw_server([busy, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(GOOD), GOOD)])
    client = ChatClient(url, "m", max_backoff=0.3, max_retries=1)
    started = time.monotonic()
    assert client.chat(user("q")).content == "ok"
    assert 0.25 <= time.monotonic() - started < 5 and client.stats["retries"] == 1


def test_suppressed_ids_travel_as_logit_bias():
    seen = []

    def record(request):
        seen.append(request)
        return "ok"

    with ChatServer(ScriptedBackend(record, name="s"), port=0) as server:
        client = ChatClient(server.url, "s", suppress_ids=[9, 3, 9], params={"logit_bias": {"5": 2.0}})
        client.chat(user("q"))
    assert seen[0].logit_bias == {"3": -100.0, "9": -100.0, "5": 2.0}


def test_a_scripted_request_error_keeps_its_status():
    def refuse(request):
        raise RequestError("refused by policy", 422)

    with ChatServer(ScriptedBackend(refuse, name="r"), port=0) as server:
        with pytest.raises(ChatClientError, match="refused by policy") as error:
            ChatClient(server.url, "r", max_retries=0).chat(user("q"))
    assert error.value.status == 422
