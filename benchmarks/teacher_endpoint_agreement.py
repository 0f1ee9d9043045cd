"""Off-policy teacher top-k through an endpoint vs the local teacher: agreement of ids and log-probs.

    python benchmarks/teacher_endpoint_agreement.py --teacher outputs/demo/final --rows 300

Scores the first `--rows` demo training rows twice: `teacher_top_k` on the loaded checkpoint (fp32, over its
kept vocabulary) and `EndpointTeacher` against the same checkpoint on qforge's server (loopback).
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qforge.engine import load_model
from qforge.engine.serve.chat import ChatModel
from qforge.engine.serve.client import ChatClient
from qforge.engine.data import ChatTemplate
from qforge.engine.serve.app import serve_model
from qforge.engine.train.distill import teacher_output_ids, teacher_top_k
from qforge.engine.train.teacher_endpoint import EndpointTeacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="outputs/demo/final")
    parser.add_argument("--data", default="recipes/data/vi_arith_train.jsonl")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()
    template = ChatTemplate.from_pretrained(args.teacher)
    rows = [json.loads(line)["messages"] for line in open(args.data, encoding="utf-8")][:args.rows]
    examples = template.encode_batch(rows, True)
    start = time.perf_counter()
    local = teacher_top_k(load_model(args.teacher, dtype=torch.float32), examples, args.top_k, 1024,
                          torch.device("cpu"), teacher_output_ids(args.teacher))
    local_s = time.perf_counter() - start
    chat_model = ChatModel.load(args.teacher)
    with serve_model(chat_model) as server, tempfile.TemporaryDirectory() as partial:
        start = time.perf_counter()
        scored = EndpointTeacher(ChatClient(server.url, chat_model.name, concurrency=4)).top_k(
            examples, args.top_k, template.tokenizer, Path(partial))
        endpoint_s = time.perf_counter() - start
    ids, local_ids = (np.concatenate([i for i, _ in r]) for r in (scored, local))
    logprobs, local_logprobs = (np.concatenate([v for _, v in r]) for r in (scored, local))
    print(f"{len(examples)} examples, {len(ids)} supervised positions x top-{args.top_k}: ids equal "
          f"{np.mean(ids == local_ids):.4%}, max |d logprob| {np.abs(logprobs - local_logprobs).max():.2e}; "
          f"local {local_s:.1f} s, endpoint {endpoint_s:.1f} s")


if __name__ == "__main__":
    main()
