"""Off the training path: chat-level generation (`chat`), the OpenAI-compatible client (`client`) and qforge's own
server: `protocol` (wire format), `scheduler` (step-level batching), `app` (HTTP). Nothing is imported here, so the
client loads without the server's dependencies.

    python -m qforge.engine.serve --model DIR [--port 8000] [--host 127.0.0.1] [--api-key KEY]
"""
