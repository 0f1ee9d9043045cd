"""ChatClient.requests_per_minute: sends are spaced out, cache hits are not."""
import time

from qforge.engine.serve.client import ChatClient
from scripted_server import ChatServer, ScriptedBackend


def test_requests_are_spaced_and_cache_hits_are_free(tmp_path):
    with ChatServer(ScriptedBackend(lambda r: "ok"), port=0) as server:
        client = ChatClient(server.url, "scripted", concurrency=4, requests_per_minute=600, cache_dir=tmp_path)
        conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
        start = time.monotonic()
        client.chat_many(conversations, progress=False)
        elapsed = time.monotonic() - start
        assert elapsed >= 0.5  # 6 sends at 0.1 s spacing: the last starts >= 0.5 s after the first
        client.chat_many(conversations, progress=False)  # all cached: nothing sent, nothing to space out
        assert client.stats["cache_hits"] == 6 and client.stats["requests"] == 6
