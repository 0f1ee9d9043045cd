"""python -m qforge.engine.serve --model DIR [--port 8000] [--host 127.0.0.1] [--api-key KEY]"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import torch
import uvicorn

from qforge.engine.serve.chat import ChatModel
from qforge.engine.errors import QforgeError
from qforge.engine.preflight import preflight
from qforge.engine.serve.app import ServeSettings, bind, create_app, is_loopback, uvicorn_config
from qforge.engine.serve.scheduler import Scheduler
from qforge.engine.vocab import read_suppress_ids


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qforge.engine.serve",
                                     description="An OpenAI-compatible server for a qforge/HF Qwen3 checkpoint.")
    parser.add_argument("--model", required=True, help="checkpoint directory (HF format with tokenizer files)")
    parser.add_argument("--name", help="model id served at /v1/models (default: the directory name)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("QFORGE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $QFORGE_API_KEY, else no key)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch", type=int, default=16, help="sequences decoded together at most")
    parser.add_argument("--max-waiting", type=int, default=256, help="queued sequences before answering 503")
    parser.add_argument("--max-model-len", type=int, help="context length (default: max_position_embeddings)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="default max_tokens of a chat request")
    parser.add_argument("--suppress-ids", help="file of token ids never to generate, besides generation_config's")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 avoids "
                        "oversubscription on a busy CPU)")
    parser.add_argument("--backlog", type=int, default=2048, help="listen backlog (pending connections)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        preflight(torch.device(args.device), getattr(torch, args.dtype, torch.float32))
    except QforgeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    if not is_loopback(args.host):
        logging.getLogger("qforge.serve").warning(
            "binding %s exposes the model to the network%s", args.host,
            "" if args.api_key else " WITHOUT an API key (pass --api-key)")
    suppress = read_suppress_ids(args.suppress_ids) if args.suppress_ids else ()
    chat_model = ChatModel.load(args.model, dtype=args.dtype, device=args.device, suppress_ids=suppress,
                                **({"name": args.name} if args.name else {}))
    scheduler = Scheduler(chat_model, max_batch=args.max_batch, max_waiting=args.max_waiting)
    app = create_app(chat_model, scheduler, ServeSettings(
        name=chat_model.name, api_key=args.api_key, max_model_len=args.max_model_len,
        default_max_tokens=args.max_tokens))
    sock = bind(args.host, args.port, args.backlog)
    host, port = sock.getsockname()[:2]
    print(f"serving {chat_model.name!r} at http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    server = uvicorn.Server(uvicorn_config(app, args.backlog))
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.close()
        sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
