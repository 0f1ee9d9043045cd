"""The served CLI under abuse: a bad-input battery, request smuggling, 32 clients x 5 requests, disconnects,
a full queue and the API key. One `python -m qforge.engine.serve` process per module, on 127.0.0.1."""
import concurrent.futures
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
from qwen3_fixtures import save_chat_checkpoint

from qforge.engine.serve.app import is_loopback

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Xin chào"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = save_chat_checkpoint(tmp_path_factory.mktemp("robust") / "tiny-chat", seed=5)
    process = subprocess.Popen(
        [sys.executable, "-m", "qforge.engine.serve", "--model", str(checkpoint), "--port", "0", "--api-key", KEY,
         "--max-batch", "8", "--max-waiting", "40", "--threads", "1"], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "127.0.0.1" in line, line
        url = line.split(" at ")[1].split()[0]
        yield process, url, int(url.split(":")[2].split("/")[0])
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def raw(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict | None, bytes]:
    """Sends raw bytes on a fresh connection: (status, JSON body or None, the whole answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    return int(head.split()[1]), payload, answer


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def post(port: int, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {KEY}", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data)


def chat_body(**fields) -> bytes:
    return json.dumps({"messages": MESSAGES, "max_tokens": 2, **fields}).encode()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)


def still_serving(url: str) -> None:
    reply = client(url).chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens == 2


BAD_CHAT = [
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}',
    b'{"messages": [{"role": "user", "content": "x"}], "seed": NaN}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}',
    b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": -Infinity}',
    chat_body(seed=2 ** 70),
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"{not json",
    b"\xff\xfe{}",
    b"[]",
    b'"just a string"',
    chat_body(messages=[]),
    chat_body(messages=[{"role": "wizard", "content": "x"}]),
    chat_body(messages=[{"role": "user", "content": 5}]),
    chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    chat_body(messages="hello"),
    chat_body(temperature=-1),
    chat_body(temperature="hot"),
    chat_body(temperature=3),
    chat_body(top_p=0),
    chat_body(top_k=-5),
    chat_body(min_p=2),
    chat_body(repetition_penalty=0),
    chat_body(frequency_penalty=5),
    chat_body(n=0),
    chat_body(n=1000),
    chat_body(max_tokens=-1),
    chat_body(max_tokens=0),
    chat_body(max_tokens=10 ** 9),
    chat_body(max_tokens=1.5),
    chat_body(logprobs=True, top_logprobs=50),
    chat_body(top_logprobs=2),
    chat_body(logit_bias={"abc": 1}),
    chat_body(logit_bias={"999999999": 1}),
    chat_body(logit_bias={"5": 1000}),
    chat_body(stop=5),
    chat_body(stop=["x"] * 100),
    chat_body(response_format={"type": "json_schema", "json_schema": {}}),
    chat_body(tool_choice="required", tools=[{"type": "function", "function": {"name": "f"}}]),
    chat_body(tools=[{"type": "function"}]),
    chat_body(chat_template_kwargs={"enable_thinking": "no"}),
    chat_body(messages=[{"role": "user", "content": "x" * 10_000_000}]),
]


def test_bad_chat_inputs_get_a_4xx_openai_error_and_the_server_keeps_serving(server):
    process, url, port = server
    for body in BAD_CHAT:
        status, payload = post(port, "/v1/chat/completions", body)
        assert 400 <= status < 500, (body[:80], status, payload)
        assert set(payload["error"]) >= {"message", "type", "param", "code"} and payload["error"]["message"]
    status, payload = post(port, "/v1/chat/completions", chat_body(model="gpt-9"))
    assert status == 404 and "gpt-9" in payload["error"]["message"]
    still_serving(url)


@pytest.mark.parametrize("body", [
    {"prompt": []}, {"prompt": [[-1, 5]]}, {"prompt": [10 ** 7]}, {"prompt": "x", "suffix": "y"},
    {"prompt": "x", "best_of": 3}, {"prompt": "x", "logprobs": 21}, {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "echo": True, "stream": True, "logprobs": 1}, {"prompt": None}, {"prompt": [[]]},
])
def test_bad_completion_inputs(server, body):
    status, payload = post(server[2], "/v1/completions", json.dumps(body).encode())
    assert status == 400 and payload["error"]["message"], payload


@pytest.mark.parametrize("head", [b"Content-Length: abc", b"Content-Length: 1e12", b"Content-Length: -5",
                                  b"Content-Length: 1000000000000", b"Transfer-Encoding: bogus"])
def test_bad_framing_is_a_json_400(server, head):
    status, payload, _ = raw(server[2], b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                        b"Authorization: Bearer " + KEY.encode() + b"\r\n" + head + b"\r\n\r\n{}")
    assert status in (400, 413, 501) and payload["error"]["message"], payload
    still_serving(server[1])


def test_a_request_hidden_in_a_404_body_never_runs(server):
    """The body of an unknown path is consumed, not parsed as the next request on the connection."""
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
    valid = chat_body(temperature=0)
    data = (b"POST /v1/nowhere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
            % (KEY.encode(), len(hidden), hidden) +
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(valid), valid))
    with socket.create_connection(("127.0.0.1", server[2]), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while answer.count(b"HTTP/1.1 ") < 2 or not answer.rstrip().endswith(b"}"):
            answer += sock.recv(65536)
    responses = answer.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"404", b"200"]
    assert b"chat.completion" in responses[1] and b'"object":"list"' not in answer


def test_openai_sdk_404_then_valid_request_on_the_same_client(server):
    sdk = client(server[1])
    with pytest.raises(openai.NotFoundError):
        sdk.post("/nowhere", body={"prompt": "x"}, cast_to=object)
    assert sdk.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=1).choices


def test_api_key_is_required(server):
    status, payload = post(server[2], "/v1/chat/completions", chat_body(), {"Authorization": "Bearer wrong"})
    assert status == 401 and payload["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[1], api_key="wrong", max_retries=0).models.list()
    assert json.loads(urlopen_health(server[2]))["status"] == "ok"  # health needs no key


def urlopen_health(port: int) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/health")
    return connection.getresponse().read()


def running(port: int) -> int:
    """Sequences admitted or waiting."""
    load = json.loads(urlopen_health(port))
    return load["running"] + load["waiting"]


NO_EOS = {"151643": -100, "151645": -100}  # the sequence cannot end by itself


def wait_idle(port: int, seconds: float) -> float:
    started = time.monotonic()
    while running(port) and time.monotonic() - started < seconds:
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_client_that_goes_away_frees_its_slot(server):
    _, url, port = server
    stream = client(url).chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=480,
                                                 temperature=1.0, stream=True, logit_bias=NO_EOS)
    next(iter(stream))
    assert running(port) == 1
    stream.close()  # disconnect mid-stream
    assert wait_idle(port, 5) < 5
    body = chat_body(max_tokens=480, temperature=1.0, logit_bias=NO_EOS)
    with socket.create_connection(("127.0.0.1", port)) as sock:  # non-streaming, then hang up
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (KEY.encode(), len(body), body))
        time.sleep(0.5)
        assert running(port) == 1
    assert wait_idle(port, 5) < 5


def test_a_full_queue_answers_503_with_retry_after(server):
    _, url, port = server
    sdk = client(url)
    streams = [sdk.completions.create(model="tiny-chat", prompt="Hà Nội", max_tokens=400, n=16, temperature=1.0,
                                      stream=True, logit_bias=NO_EOS)
               for _ in range(3)]  # 48 sequences: 8 running + 40 waiting
    try:
        status, payload = post(port, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 1}).encode())
        assert status == 503 and "busy" in payload["error"]["message"]
    finally:
        for stream in streams:
            stream.close()
    assert wait_idle(port, 10) < 10
    still_serving(url)


@pytest.mark.slow
def test_32_clients_x_5_requests_without_resets_and_flat_memory(server):
    process, url, port = server

    def round_of_load(requests_per_client):
        barrier = threading.Barrier(32)

        def worker(index):
            sdk = client(url)  # its own connection pool, max_retries=0: a reset would raise
            barrier.wait()
            replies = [sdk.chat.completions.create(model="tiny-chat", max_tokens=2, temperature=0.7, seed=index,
                                                   messages=[{"role": "user", "content": f"{index} {i}"}])
                       for i in range(requests_per_client)]
            sdk.close()
            return replies

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            return [reply for replies in pool.map(worker, range(32)) for reply in replies]

    round_of_load(1)  # warm-up: allocator pools and caches reach their working size
    before = rss_mib(process.pid)
    replies = round_of_load(5)
    after = rss_mib(process.pid)
    assert len(replies) == 160 and all(r.usage.completion_tokens == 2 for r in replies)  # no resets, no errors
    assert after - before < 40, (before, after)
    assert running(port) == 0


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("8.8.8.8")
