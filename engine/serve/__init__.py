"""qforge's OpenAI-compatible server: `protocol` (wire format), `scheduler` (step-level batching), `app` (HTTP).

    python -m qforge.engine.serve --model DIR [--port 8000] [--host 127.0.0.1] [--api-key KEY]
"""
from .app import BackgroundServer, ServeSettings, create_app, serve_model
from .scheduler import QueueFull, Scheduler

__all__ = ["BackgroundServer", "QueueFull", "Scheduler", "ServeSettings", "create_app", "serve_model"]
