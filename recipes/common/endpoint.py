"""Where a recipe's model lives: `EndpointSettings`/`ClientSettings` (config sections) and `open_endpoint`.

A local checkpoint is served on 127.0.0.1 for the duration of the run (qforge's server); an existing
endpoint (vLLM, a hosted OpenAI-compatible API) is used as it is. Either way the recipe gets a `ChatClient`.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qforge.engine.serve.chat import ChatModel
from qforge.engine.serve.client import ChatClient
from qforge.engine.config_io import settings
from qforge.engine.serve.app import serve_model
from qforge.engine.vocab import read_suppress_ids


@settings
class EndpointSettings:
    """A checkpoint served on loopback for the run (`path`), or an existing endpoint (`base_url` + `model`)."""

    path: str | None = None  # local checkpoint directory
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1, a vLLM server or a hosted API
    model: str | None = None  # the model id at base_url
    api_key_env: str | None = None  # name of the environment variable holding the API key
    dtype: str = "float32"
    device: str = "cpu"
    # Token ids never generated: an ids file, or a checkpoint directory whose generation_config.json lists
    # `suppress_tokens`. With base_url they are sent as logit_bias -100 (vLLM ignores suppress_tokens).
    suppress_ids: str | None = None

    def check(self, key: str = "endpoint") -> None:
        """Raises a ValueError naming `key` (the settings' place in the recipe config) if incomplete."""
        if (self.path is None) == (self.base_url is None):
            raise ValueError(f"set exactly one of {key}.path (a checkpoint) or {key}.base_url (an endpoint)")
        if self.base_url and not self.model:
            raise ValueError(f"{key}.model (the model id served at {self.base_url}) is required with {key}.base_url")


@settings
class ClientSettings:
    """The `client:` section of recipe configs: keyword arguments of `ChatClient`."""

    timeout: float = 120.0
    max_retries: int = 4
    concurrency: int = 4
    cache_dir: str | None = None  # replies cached here make an interrupted run resume
    requests_per_minute: float | None = None  # spaces requests out to stay under an API's rate limit


def response_cache_dir(client: ClientSettings, output_dir: str | Path) -> str:
    """Where a recipe's replies are cached: `client.cache_dir`, else `output.dir/cache` (a rerun resumes)."""
    return client.cache_dir or str(Path(output_dir) / "cache")


def suppressed_ids(source: str | Path) -> list[int]:
    """Ids from a checkpoint directory (generation_config.json `suppress_tokens`) or an ids file."""
    source = Path(source)
    if source.is_dir():
        config = source / "generation_config.json"
        if not config.is_file():
            raise ValueError(f"{source}: no generation_config.json with suppress_tokens in this checkpoint")
        ids = json.loads(config.read_text(encoding="utf-8")).get("suppress_tokens")
        if not isinstance(ids, list):
            raise ValueError(f"{config}: 'suppress_tokens' must be a list of token ids")
        return ids
    return read_suppress_ids(source)


@contextmanager
def open_endpoint(settings: EndpointSettings, **client_options) -> Iterator[ChatClient]:
    """A `ChatClient` for the settings; a local checkpoint is served on 127.0.0.1 until the block ends."""
    settings.check()
    suppress = suppressed_ids(settings.suppress_ids) if settings.suppress_ids else ()
    if settings.base_url:
        yield ChatClient(settings.base_url, settings.model, api_key_env=settings.api_key_env,
                         suppress_ids=suppress, **client_options)
        return
    chat_model = ChatModel.load(settings.path, dtype=settings.dtype, device=settings.device, suppress_ids=suppress)
    # The port changes every run, so cached replies are keyed by the checkpoint (and its weights' age) unless
    # the caller names a namespace.
    weights = sorted(Path(settings.path).glob("*.safetensors"))
    namespace = f"checkpoint:{Path(settings.path).resolve()}:{max(w.stat().st_mtime_ns for w in weights)}"
    client_options.setdefault("cache_namespace", namespace)
    with serve_model(chat_model) as server:
        yield ChatClient(server.url, chat_model.name, **client_options)
