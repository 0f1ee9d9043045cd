"""Steps of packed micro-batches, with a cursor that makes resuming exact.

Two ways to size a step, both packing by tokens (`data.max_tokens` per micro-batch, no padding):
- `StepLoader` (token budget): every epoch re-packs the (mixture-sampled) examples with seed `seed + epoch`; a step
  takes `grad_accum × world` consecutive micro-batches and rank r gets every world-th one.
- `SequenceStepLoader` (`train.batch_size` items per step: SFT sequences, e.g. Sky-T1's 96, or DPO pairs): every
  epoch shuffles the items with seed `seed + epoch`; a step takes the next `batch_size` of them, packs them into
  micro-batches (the objective's packer: both sides of a pair in one micro-batch) and deals those to the ranks (a
  rank short of micro-batches gets a filler that adds nothing, so every rank runs the same number of forwards
  and the update is unchanged).
The cursor (epoch, index) is all a checkpoint needs to continue at the same step.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..data import pack
from ..data.example import Example, zero_weight
from ..data.packing import PackedBatch
from ..vocab import VocabMap
from .config import DataSettings
from ..errors import ConfigError, DataError


def mixture_epoch(datasets: Sequence[Sequence[Example]], weights: Sequence[float] | None, seed: int) -> list[Example]:
    """One epoch of a mixture: dataset i contributes round(w_i × len_i) examples (sampled without replacement
    while w ≤ 1; whole copies plus a sample when w > 1)."""
    weights = weights or [1.0] * len(datasets)
    rng = np.random.default_rng(seed)
    epoch = []
    for examples, weight in zip(datasets, weights):
        count = int(round(weight * len(examples)))
        whole, rest = divmod(count, len(examples)) if len(examples) else (0, 0)
        picks = [np.arange(len(examples))] * whole + [rng.choice(len(examples), rest, replace=False)]
        epoch.extend(examples[i] for i in np.concatenate(picks))
    return epoch


class Cursor:
    """What both loaders share: the data, the rank, and the (epoch, index) position a resume restores."""

    def __init__(self, datasets, data: DataSettings, vocab: VocabMap | None, seed: int, rank: int, world: int):
        self.datasets, self.data, self.vocab = datasets, data, vocab
        self.max_tokens, self.seed = data.max_tokens, seed
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class StepLoader(Cursor):
    """`data` is the run's data settings (weights, max_tokens, overlong, loss_weighting); `vocab` the kept
    vocabulary (labels outside it are masked when packing)."""

    def __init__(self, datasets, data: DataSettings, vocab: VocabMap | None = None, *, seed: int, grad_accum: int,
                 rank: int = 0, world: int = 1, pack_fn=pack):
        super().__init__(datasets, data, vocab, seed, rank, world)
        self.grad_accum = grad_accum
        self.pack_fn = pack_fn  # `pack`, or an objective's packer (preference pairs, distillation targets)
        self._batches, self._batches_epoch = None, None
        batches = self._epoch_batches()
        self._epoch0_batches = len(batches)  # (the cursor is at epoch 0 here: a new loader, before any resume)
        if not len(batches):
            raise DataError(self._why_empty(batches.report))
        if self.per_step > len(batches):
            raise DataError(f"one optimizer step needs {self.per_step} micro-batches (train.grad_accum × ranks) "
                            f"but an epoch packs into only {len(batches)} at data.max_tokens="
                            f"{self.max_tokens}; lower train.grad_accum or data.max_tokens")

    def _why_empty(self, report) -> str:
        """Why an epoch packs into no micro-batch at all: no examples, or every one cut or dropped by max_tokens."""
        lengths = [len(e) for examples in self.datasets for e in examples]
        if not lengths or not report.dropped:
            return ("data.train yields no example to train on (data.weights all 0, or no supervised token in any "
                    "row); check the data files and data.weights")
        longest = max(lengths)
        if self.data.overlong == "drop":
            why = f"longer than data.max_tokens={self.max_tokens} and data.overlong=drop removes them"
        else:
            why = (f"left without a supervised token: either the rows have none, or truncating to "
                   f"data.max_tokens={self.max_tokens} cut every answer off")
        return (f"all {report.dropped} training examples were dropped, {why} (longest example: {longest} tokens); "
                f"raise data.max_tokens to at least {longest}" + (" or set data.overlong=truncate"
                                                                   if self.data.overlong == "drop" else ""))

    @property
    def per_step(self) -> int:
        return self.grad_accum * self.world

    def _epoch_batches(self):
        if self._batches_epoch != self.epoch:
            examples = mixture_epoch(self.datasets, self.data.weights, self.seed + self.epoch)
            self._batches = self.pack_fn(examples, self.max_tokens, seed=self.seed + self.epoch,
                                         overlong=self.data.overlong, loss_weighting=self.data.loss_weighting,
                                         vocab=self.vocab)
            self._batches_epoch = self.epoch
        return self._batches

    def next_step(self) -> list:
        """This rank's micro-batches of the next optimizer step (an epoch's tail rolls into the next epoch)."""
        taken = []
        while len(taken) < self.per_step:
            batches = self._epoch_batches()
            if self.index >= len(batches):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            taken.append(batches[self.index])
            self.index += 1
        return taken[self.rank::self.world]

    @property
    def steps_per_epoch(self) -> float:
        """Optimizer steps one epoch makes (the first epoch's packing; later ones differ by a batch at most)."""
        return self._epoch0_batches / self.per_step

    @property
    def epoch_progress(self) -> float:
        """Epochs done so far, fractional (what the metrics log as `epoch`)."""
        return self.epoch + self.index / max(1, len(self._epoch_batches()))


class SequenceStepLoader(Cursor):
    """`pack_fn`: `pack` or an objective's packer; `filler(item, max_tokens)`: a micro-batch made from `item` that
    runs a forward and backward but adds nothing to the loss or gradient."""

    def __init__(self, datasets, data: DataSettings, vocab: VocabMap | None = None, *, seed: int, batch_size: int,
                 rank: int = 0, world: int = 1, pack_fn=pack, filler=None):
        super().__init__(datasets, data, vocab, seed, rank, world)
        self.batch_size, self.pack_fn, self.filler = batch_size, pack_fn, filler or sequence_filler
        self._examples, self._examples_epoch = None, None
        size = len(self._epoch_examples())
        if batch_size > size:
            raise ConfigError(f"train.batch_size={batch_size} is more than one epoch holds ({size} sequences, or "
                              f"pairs for DPO); lower train.batch_size")

    def _epoch_examples(self) -> list:
        if self._examples_epoch != self.epoch:
            examples = mixture_epoch(self.datasets, self.data.weights, self.seed + self.epoch)
            order = np.random.default_rng(self.seed + self.epoch).permutation(len(examples))
            self._examples, self._examples_epoch = [examples[i] for i in order], self.epoch
        return self._examples

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self._epoch_examples()) / self.batch_size)  # the last step of an epoch may be short

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.index / self.steps_per_epoch

    def next_step(self) -> list:
        """This rank's micro-batches of the next step: the next `batch_size` items, packed by tokens."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        group = self._epoch_examples()[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        batches = list(self.pack_fn(group, self.max_tokens, seed=self.seed + self.epoch, overlong=self.data.overlong,
                                    loss_weighting=self.data.loss_weighting, vocab=self.vocab))
        if len(batches) % self.world:
            batches += [self.filler(min(group, key=len), self.max_tokens)] * (-len(batches) % self.world)
        return batches[self.rank::self.world]


def sequence_filler(example: Example, max_tokens: int) -> PackedBatch:
    """A filler micro-batch of one SFT example (see `zero_weight`)."""
    return PackedBatch.from_examples([zero_weight(example, max_tokens)])


def build_loader(datasets, data: DataSettings, train_settings, vocab: VocabMap | None = None, rank: int = 0,
                 world: int = 1, *, objective):
    """The loader `train.batch_size` (items per step) or `train.grad_accum` (token-budget steps) asks for, with
    the objective's packer (see objective.py), and for `train.batch_size` its `filler`."""
    if train_settings.batch_size is None:
        return StepLoader(datasets, data, vocab, seed=train_settings.seed, grad_accum=train_settings.grad_accum,
                          rank=rank, world=world, pack_fn=objective.pack)
    filler = getattr(objective, "filler", None)
    if filler is None:
        raise ConfigError(f"train.batch_size does not apply to {type(objective).__name__}: a step of N items is dealt "
                          f"to the ranks with filler micro-batches, which this objective does not define; unset "
                          f"train.batch_size and use train.grad_accum with data.max_tokens")
    return SequenceStepLoader(datasets, data, vocab, seed=train_settings.seed, batch_size=train_settings.batch_size,
                              rank=rank, world=world, pack_fn=objective.pack, filler=filler)


def planned_steps(train_settings, loader) -> int:
    """`train.max_steps` when set, else `train.epochs` (default 1) × the loader's steps per epoch, rounded up."""
    if train_settings.max_steps is not None:
        return train_settings.max_steps
    return max(1, math.ceil((train_settings.epochs or 1.0) * loader.steps_per_epoch - 1e-9))
