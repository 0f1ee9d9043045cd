"""Trains a random qforge Qwen3 for one step on random packed micro-batches; prints the peak memory it took.

    python benchmarks/measure_train_memory.py '{"model": {...}, "tokens": 1024, ...}'

Run in a fresh process so the RSS high-water mark (VmHWM) is this training's own; the figure
printed is that mark minus the mark before the model is built (Python, torch and the imports).
"""
import dataclasses
import json
import sys

import torch

from qforge.engine.config import Qwen3Config
from qforge.engine.data import PackedBatch
from qforge.engine.model import Qwen3
from qforge.engine.train.config import OptimSettings
from qforge.engine.train.sft import train_step
from qforge.engine.train.metrics import peak_memory_bytes
from qforge.engine.train.optim import build_optimizer
from qforge.engine.train.parallel import Dist
from qforge.engine.vocab import VocabMap


def random_batch(tokens: int, sequences: int, vocab: int, generator) -> PackedBatch:
    length = tokens // sequences
    cu_seqlens = torch.arange(0, tokens + 1, length, dtype=torch.int32)
    position_ids = torch.arange(tokens) % length
    input_ids = torch.randint(0, vocab, (tokens,), generator=generator)
    labels = torch.roll(input_ids, -1)
    labels[cu_seqlens[1:].long() - 1] = -100
    return PackedBatch(input_ids, position_ids, cu_seqlens, length, labels, (labels != -100).float())


def main(spec: dict) -> None:
    generator = torch.Generator().manual_seed(0)
    micro_batches = [random_batch(spec["tokens"], spec["sequences"], spec["model"]["vocab_size"], generator)
                     for _ in range(spec["grad_accum"])]
    kept = spec.get("kept_vocab")
    vocab = VocabMap.from_ids(range(kept), spec["model"]["vocab_size"]) if kept else None
    if vocab is not None:  # labels outside the kept set are masked, as packing does
        micro_batches = [dataclasses.replace(mb, labels=torch.where(mb.labels >= kept, -100, mb.labels))
                         for mb in micro_batches]
    before = peak_memory_bytes()
    model = Qwen3(Qwen3Config(**spec["model"], torch_dtype="float32"))
    model.init_weights(seed=0)
    model.activation_checkpointing = spec.get("activation_checkpointing", False)
    model.train()
    optimizer = build_optimizer(model, OptimSettings(lr=1e-4))
    for param in model.parameters():  # AdamW's moments exist from the first step on: make them now
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    train_step(model, micro_batches, Dist(), vocab)  # the 2nd micro-batch runs with gradients held
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    print(json.dumps({"training_bytes": peak_memory_bytes() - before}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
