"""One tiny chat checkpoint served on 127.0.0.1 per test module (real Qwen3 tokenizer, 512-token context)."""
import contextlib

import torch

from qwen3_fixtures import save_chat_checkpoint

from qforge.engine.serve.chat import ChatModel
from qforge.engine.serve.app import serve_model


@contextlib.contextmanager
def served_checkpoint(directory, seed: int = 5, **options):
    """(checkpoint dir, ChatModel, running server); `options` go to `serve_model`."""
    checkpoint = save_chat_checkpoint(directory / "tiny-chat", seed=seed)
    chat_model = ChatModel.load(checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread, no OpenMP oversubscription against the client threads
    try:
        with serve_model(chat_model, **options) as server:
            yield checkpoint, chat_model, server
    finally:
        torch.set_num_threads(threads)
