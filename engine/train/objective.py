"""The seam between the trainer and a training objective other than SFT cross-entropy (DPO, distillation).

`train(config, objective)` keeps everything that makes a run trustworthy — model build, FSDP2, optimizer and
schedule, data cursor, checkpoints and exact resume, non-finite guards, metrics, HF export — and asks the
objective only for what differs: how rows become training items, how items are packed into micro-batches,
what one optimizer step's loss is, and what evaluation reports.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Protocol


class Objective(Protocol):
    def load_data(self, config, template, dist_) -> tuple[list[list], list, dict]:
        """(one list of items per data.train file, held-out items, data fingerprint for resume); items have
        __len__ (tokens) and `labels` (for the kept-vocabulary checks)."""

    def pack(self, items, max_tokens: int, seed: int = 0, *, overlong: str = "truncate", loss_weighting: str = "token",
             vocab=None):
        """A sequence of micro-batches (each with .to(device), num_tokens, num_loss_tokens, cu_seqlens)."""

    def prepare(self, model, config, vocab, dist_, autocast) -> None:
        """Called once after the model is built (and sharded) with the *starting* weights, before resuming."""

    def train_step(self, model, micro_batches, dist_, vocab, autocast) -> tuple[float, float, dict]:
        """Forward/backward of this rank's micro-batches of one step: (loss sum, weight, metrics), where the
        logged loss is loss sum / weight, both already summed over ranks, and the accumulated gradient is
        that of the step's loss (FSDP averages gradients over ranks: scale each backward by the world size)."""

    def evaluate(self, model, batches, dist_, vocab, autocast) -> dict:
        """Held-out metrics, e.g. {"eval_loss": ...}; every rank runs equally many forwards."""

    # optional, for train.batch_size (items per step): filler(item, max_tokens) → a micro-batch made from `item`
    # that runs the same forwards and backward as a real one but adds nothing to the loss, gradient or metrics
    # (it evens out the ranks' micro-batch counts); an objective without it trains by token budget only


def bind_forward_method(model, name: str, fn) -> None:
    """Attaches `fn(model, ...)` as `model.<name>`; under FSDP2 it runs with the parameters gathered, as the
    model's `loss` does (an objective's forward must not touch sharded weights outside a forward method)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, name, types.MethodType(fn, model))
    register_fsdp_forward_method(model, name)


def weights_identity(model) -> dict:
    """What identifies a model's starting weights for an objective's on-disk cache, without hashing them: a
    checkpoint directory's file names, sizes and modification times, or a random init's config and seed.
    `model` is a checkpoint path or the run's ModelSettings."""
    path = model if isinstance(model, (str, Path)) else model.path
    if path is not None:
        files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".json"))
        return {"path": str(Path(path).resolve()),
                "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}  # JSON-stable
    return {"config": Path(model.config).read_text(), "init_seed": model.init_seed}
