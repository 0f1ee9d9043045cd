"""Supervised fine-tuning, the trainer's default objective: Σ w·CE / Σ w over packed conversations.

The loss of an optimizer step is normalised by the weight sum of the *whole* step (every micro-batch on every
rank), so the update does not depend on how the step is split into micro-batches or ranks. `train_step` and
`evaluate_loss` take the name of the model's loss forward method, so objectives whose loss is also a
token-weighted sum (off- and on-policy distillation) reuse them with their own forward method.

A Qwen3-MoE model adds its router's load-balancing loss, `coef · aux`, to the step's loss (`RouterAuxStep`; the
choices are in docs/moe.md "Training").
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch

from ..data import ChatTemplate, pack
from ..data.cache import load_examples, row_kinds
from ..data.formats import RowError, read_conversations
from ..errors import DataError
from ..moe import expert_load_summary, load_balancing_loss, routing_counts
from ..vocab import VocabMap
from .config import FFTConfig, cache_dir_of
from .loader import sequence_filler
from .objective import Step
from .parallel import Dist

log = logging.getLogger("qforge.train")


def loss_tables(vocab: VocabMap | None, device) -> dict:
    """The kept-vocabulary keyword arguments of the fused losses (both None: the whole vocabulary)."""
    vocab_index, target_index = vocab.loss_tables(device) if vocab is not None else (None, None)
    return {"vocab_index": vocab_index, "target_index": target_index}


def step_weight(micro_batches) -> float:
    """Σ w of the supervised positions of this rank's micro-batches."""
    return float(sum(mb.loss_weight[mb.labels != -100].double().sum() for mb in micro_batches))


def train_step(model, micro_batches, dist_: Dist, vocab: VocabMap | None = None, autocast=contextlib.nullcontext,
               loss: str = "loss", metrics: dict | None = None):
    """Forward/backward over this rank's micro-batches; returns (Σ w·loss, Σ w) of the whole global step.
    `loss` names the model's forward method giving a micro-batch's Σ w·loss (`Qwen3.loss`: cross-entropy).

    Each micro-batch's gradient is scaled by world / global Σ w: FSDP averages gradients over ranks, so the
    accumulated result is exactly ∇(Σ w·loss / Σ w) of the global step. A MoE model's backward adds the router's
    load-balancing term (`RouterAuxStep`); `metrics`, when given, receives its step metrics."""
    global_weight = float(dist_.all_reduce_sum(step_weight(micro_batches)))
    scale = dist_.world / max(global_weight, 1e-12)
    tables = loss_tables(vocab, dist_.device)
    aux = RouterAuxStep(model, micro_batches, dist_, autocast, tables) \
        if getattr(model, "router_balance", None) is not None else None
    forward = getattr(model, loss)
    loss_sum = None  # stays on the device: a float() per micro-batch would stall the GPU between them
    for i, batch in enumerate(micro_batches):
        with autocast():
            value = forward(batch.to(dist_.device, non_blocking=True), **tables)
        total = value * scale
        if aux is not None:
            total = total + aux.term(i)
        total.backward()
        loss_sum = value.detach() if loss_sum is None else loss_sum + value.detach()
    if aux is not None and metrics is not None:
        metrics.update(aux.metrics())
    return float(dist_.all_reduce_sum(loss_sum)), global_weight


class RouterAuxStep:
    """The load-balancing term of one step of a MoE model: the step's loss is Σ w·CE / Σ w + coef · aux, where aux
    is HF's `load_balancing_loss_func` either per micro-batch, averaged over every micro-batch of the step on every
    rank ("micro_batch"; one micro-batch: exactly HF's loss on that batch), or over the whole step at once
    ("global_batch": expert counts and router probabilities pooled over all micro-batches and ranks, as if the
    step were one batch). The pooled counts must be known before the first backward, so "global_batch" first runs
    a no-grad forward of every micro-batch (one extra forward per step) and sums their counts over ranks.

    Micro-batches with no supervised token (train.batch_size's fillers) add nothing to the term or the metrics.
    The tokens per expert of each layer are summed on the device and reduced over ranks once per step."""

    def __init__(self, model, micro_batches, dist_: Dist, autocast, tables: dict):
        self.model, self.dist_ = model, dist_
        self.coef, self.scope = model.router_balance.coef, model.router_balance.scope
        self.counted = [step_weight([batch]) > 0 for batch in micro_batches]
        self.forwards = float(dist_.all_reduce_sum(float(sum(self.counted))))
        self.pooled = None
        if self.scope == "global_batch" and self.coef:
            with torch.no_grad():
                for batch, counted in zip(micro_batches, self.counted):
                    if counted:
                        with autocast():
                            model.loss(batch.to(dist_.device, non_blocking=True), **tables)
                        counts = routing_counts(model.router_stats())
                        self.pooled = counts if self.pooled is None else self.pooled + counts
            if self.pooled is None:  # no supervised micro-batch on this rank: it still joins the sum
                self.pooled = torch.zeros(model.config.num_experts + 1, device=dist_.device)
            self.pooled = dist_.all_reduce_sum(self.pooled).float()
        self.load = torch.zeros(len(model.sparse_blocks()), model.config.num_experts, device=dist_.device)
        self.aux_sum = torch.zeros((), device=dist_.device)

    def term(self, index: int) -> torch.Tensor | float:
        """What micro-batch `index`'s backward adds after its forward: coef · (its share of aux), times the world
        size (FSDP averages gradients over ranks)."""
        if not self.counted[index]:
            return 0.0
        stats = self.model.router_stats()
        self.load += torch.stack([s.tokens_per_expert for s in stats])
        if self.pooled is not None:
            share = load_balancing_loss(stats, self.pooled)
        else:
            share = load_balancing_loss(stats) / max(self.forwards, 1.0)
        self.aux_sum += share.detach()
        return share * (self.coef * self.dist_.world) if self.coef else 0.0

    def metrics(self) -> dict:
        """router_aux_loss (the step's aux, before the coefficient) and the expert load of the step (every
        micro-batch, every rank; `expert_load_summary`): one reduction, one host sync."""
        total = self.dist_.all_reduce_sum(torch.cat([self.load.flatten(), self.aux_sum.view(1)])).cpu()
        return {"router_aux_loss": float(total[-1]),
                **expert_load_summary(total[:-1].view(-1, self.model.config.num_experts))}


@torch.no_grad()
def evaluate_loss(model, batches, dist_: Dist, vocab: VocabMap | None = None, autocast=contextlib.nullcontext,
                  loss: str = "loss") -> float:
    """Σ w·loss / Σ w over held-out batches; ranks take turns and run equally many forwards (FSDP needs that)."""
    model.eval()
    rounds = math.ceil(len(batches) / dist_.world)
    tables = loss_tables(vocab, dist_.device)
    forward = getattr(model, loss)
    loss_sum, weight_sum = 0.0, 0.0
    for r in range(rounds):
        index = r * dist_.world + dist_.rank
        batch = batches[min(index, len(batches) - 1)].to(dist_.device)
        with autocast():
            value = float(forward(batch, **tables))
        if index < len(batches):
            loss_sum += value
            weight_sum += step_weight([batch])
    model.train()
    return float(dist_.all_reduce_sum(loss_sum) / dist_.all_reduce_sum(weight_sum).clamp_min(1e-12))


def load_once(dist_: Dist, load):
    """`load(progress)` on rank 0 first (a first run tokenises and fills the cache) while the others wait, then on
    the others (they read rank 0's cache); rank 0 keeps its own result instead of reading it back."""
    if dist_.is_main:
        result = load(True)
    dist_.barrier()
    return result if dist_.is_main else load(False)


def load_sft_data(config: FFTConfig, template: ChatTemplate, dist_: Dist):
    """(examples per data.train file, held-out examples, data fingerprint): tokenised once, skipped rows and
    silent-row warnings reported. The fingerprint (cache keys and packing settings) identifies the data stream a
    checkpoint's data cursor refers to."""
    data, cache_dir, keys = config.data, cache_dir_of(config), []

    def load(paths):
        loaded = []
        for path in paths:
            examples, summary = load_once(dist_, lambda progress: load_examples(
                [path], template, data, cache_dir=cache_dir, progress=progress and config.output.progress))
            if dist_.is_main:
                log.info("%s: %s", path, summary)
            if summary.skipped and not summary.num_rows:
                raise DataError(f"{path}: all {len(summary.skipped)} rows were skipped (data.on_error=skip), first: "
                                f"{summary.skipped[0]}; fix the rows or the data.format")
            check_row_warnings(path, summary, data, dist_.is_main)
            loaded.append(examples)
            keys.append(Path(summary.cache_path).name)
        return loaded

    train = load(data.train)
    fingerprint = {"train": keys[:], "weights": data.weights, "max_tokens": data.max_tokens,
                   "overlong": data.overlong, "seed": config.train.seed}
    return train, [e for examples in load(data.eval) for e in examples], fingerprint


ROW_WARNING_TEXT = {
    "undeclared-tool-call": "call a tool their `tools` do not declare (the model learns to call a function it was "
                            "never shown); declare it in the row's tools",
    "reasoning-dropped": "carry reasoning but are rendered with thinking off, so the reasoning is left out of the "
                         "loss; set data.enable_thinking=auto (or true), or remove the reasoning",
}


def check_row_warnings(path, summary, data, warn: bool):
    """Rows that train something other than they seem to (cache.ROW_WARNINGS): a warning with their count, or
    under data.strict a DataError naming the first one (found by reading the file again: the error path only)."""
    for kind, advice in ROW_WARNING_TEXT.items():
        count = summary.kinds.get(kind, 0)
        if not count:
            continue
        if not data.strict:
            if warn:
                log.warning("%s: %d rows %s (data.strict=true makes this an error)", path, count, advice)
            continue
        rows = read_conversations(path, data.format, data.max_row_bytes, data.enable_thinking)
        line = next((line for line, row in rows if not isinstance(row, RowError) and kind in row_kinds(row)), "?")
        raise DataError(f"{path}:{line}: {count} rows (this one first) {advice}, or unset data.strict")


class SFT:
    """Cross-entropy on the assistant tokens of chat data (see objective.py for the protocol)."""

    def check_inputs(self, config) -> None:
        """Nothing beyond the data files the trainer checks itself."""

    def trained_settings(self) -> dict:
        return {}

    def load_data(self, config, template, dist_):
        return load_sft_data(config, template, dist_)

    def pack(self, items, max_tokens: int, seed: int = 0, *, overlong: str = "truncate",
             loss_weighting: str = "token", vocab=None):
        return pack(items, max_tokens, seed, overlong=overlong, loss_weighting=loss_weighting, vocab=vocab)

    filler = staticmethod(sequence_filler)

    def prepare(self, model, config, vocab, dist_, autocast) -> None:
        """The model's own `loss` is the objective's: nothing to bind."""

    def train_step(self, model, micro_batches, dist_, vocab, autocast) -> Step:
        metrics = {}
        loss_sum, weight = train_step(model, micro_batches, dist_, vocab, autocast, metrics=metrics)
        return Step(loss_sum, weight, metrics, micro_batches)

    def evaluate(self, model, batches, dist_, vocab, autocast) -> dict:
        return {"eval_loss": evaluate_loss(model, batches, dist_, vocab, autocast)}
