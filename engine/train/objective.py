"""What the trainer asks of an objective (SFT, DPO, distillation, …), and the few helpers objectives share.

`train(config, objective)` keeps everything that makes a run trustworthy — model build, FSDP2, optimizer and
schedule, data cursor, checkpoints and exact resume, non-finite guards, metrics, HF export — and asks the
objective only for what differs: which items a data row becomes, how items are packed into micro-batches,
what one optimizer step's loss is, and what evaluation reports. The loop never asks which objective it runs.

A micro-batch is whatever `pack` builds: the loader only counts, deals and checkpoints them. An objective that
*generates* its training sequences (on-policy distillation, GRPO) packs prompts (reserving their completion
budget) and samples inside `train_step`; it reports the sequences it trained on in `Step.trained`, so nothing
outside the objective rewrites the loader's micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence



@dataclass
class Step:
    """One optimizer step of an objective on this rank. The logged loss is loss_sum / weight (both summed over
    ranks); `metrics` are logged beside it; `trained` are the micro-batches the step ran forwards on (each with
    num_tokens, num_loss_tokens and cu_seqlens: the throughput and MFU figures count them) — the loader's own
    micro-batches, or the sequences the step generated from them."""
    loss_sum: float
    weight: float
    metrics: dict
    trained: Sequence


class Objective(Protocol):
    def check_inputs(self, config) -> None:
        """Checks the objective's own inputs (teacher, reference, stores) before output.dir is created, so a
        wrong path leaves nothing behind."""

    def trained_settings(self) -> dict:
        """{key: value} a resume must not change silently (a teacher, a reference); recorded in checkpoints."""

    def load_data(self, config, template, dist_) -> tuple[list[list], list, dict]:
        """(one list of items per data.train file, held-out items, data fingerprint for resume); items have
        __len__ (the tokens packing reserves) and `labels` (for the kept-vocabulary checks). Called on every
        rank; tokenised data goes through the data cache (rank 0 first)."""

    def pack(self, items, max_tokens: int, seed: int = 0, *, overlong: str = "truncate",
             loss_weighting: str = "token", vocab=None) -> Sequence:
        """The micro-batches of `items` (`data.packing.pack_items`: one seed, one packing), built on access."""

    def prepare(self, model, config, vocab, dist_, autocast) -> None:
        """Called once after the model is built (and sharded) with the *starting* weights, before resuming:
        load frozen models, compute cached references, bind the objective's forward methods
        (`bind_forward_method`)."""

    def train_step(self, model, micro_batches, dist_, vocab, autocast) -> Step:
        """Forward/backward of this rank's micro-batches of one step, with the gradient of the step's loss
        accumulated (FSDP averages gradients over ranks: scale each backward by the world size)."""

    def evaluate(self, model, batches, dist_, vocab, autocast) -> dict:
        """Held-out metrics, e.g. {"eval_loss": ...}; every rank runs equally many forwards."""

    # optional, for train.batch_size (items per step): filler(item, max_tokens) → a micro-batch made from `item`
    # that runs the same forwards and backward as a real one but adds nothing to the loss, gradient or metrics
    # (it evens out the ranks' micro-batch counts); an objective without it trains by token budget only

    # optional: state_dict() → this rank's state a resume needs beyond weights and data cursor (GRPO's rollouts
    # between passes), saved in every checkpoint; load_state_dict(state, world) restores it (same data only)


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
