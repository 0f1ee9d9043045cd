"""Steps of packed micro-batches, with a cursor that makes resuming exact.

Every epoch re-packs the (mixture-sampled) examples with seed `seed + epoch`, so the order is reshuffled but
reproducible; the cursor (epoch, index of the next micro-batch) is all a checkpoint needs to continue at the
same micro-batch. A step takes `grad_accum × world` consecutive micro-batches; rank r gets every world-th one.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data import pack
from ..data.example import Example
from ..errors import ConfigError, DataError


def mixture_epoch(datasets: Sequence[Sequence[Example]], weights: Sequence[float] | None, seed: int) -> list[Example]:
    """One epoch of a mixture: dataset i contributes round(w_i × len_i) examples (sampled without replacement
    while w ≤ 1; whole copies plus a sample when w > 1)."""
    weights = weights or [1.0] * len(datasets)
    if not all(np.isfinite(w) and w >= 0 for w in weights):
        raise ConfigError(f"data.weights={list(weights)}: every weight must be a finite number ≥ 0")
    rng = np.random.default_rng(seed)
    epoch = []
    for examples, weight in zip(datasets, weights):
        count = int(round(weight * len(examples)))
        whole, rest = divmod(count, len(examples)) if len(examples) else (0, 0)
        picks = [np.arange(len(examples))] * whole + [rng.choice(len(examples), rest, replace=False)]
        epoch.extend(examples[i] for i in np.concatenate(picks))
    return epoch


class StepLoader:
    def __init__(self, datasets, weights, max_tokens: int, *, seed: int, grad_accum: int, rank: int = 0,
                 world: int = 1, overlong: str = "truncate"):
        self.datasets, self.weights = datasets, weights
        self.max_tokens, self.seed, self.overlong = max_tokens, seed, overlong
        self.grad_accum, self.rank, self.world = grad_accum, rank, world
        self.epoch, self.index = 0, 0
        self._batches, self._batches_epoch = None, None
        batches = self._epoch_batches()
        if not len(batches):
            raise DataError(self._why_empty(batches.report))
        if self.per_step > len(batches):
            raise DataError(f"one optimizer step needs {self.per_step} micro-batches (train.grad_accum × ranks) "
                            f"but an epoch packs into only {len(batches)} at data.max_tokens="
                            f"{max_tokens}; lower train.grad_accum or data.max_tokens")

    def _why_empty(self, report) -> str:
        """Why an epoch packs into no micro-batch at all: no examples, or every one cut or dropped by max_tokens."""
        lengths = [len(e) for examples in self.datasets for e in examples]
        if not lengths or not report.dropped:
            return ("data.train yields no example to train on (data.weights all 0, or no supervised token in any "
                    "row); check the data files and data.weights")
        longest = max(lengths)
        if self.overlong == "drop":
            why = f"longer than data.max_tokens={self.max_tokens} and data.overlong=drop removes them"
        else:
            why = (f"left without a supervised token: either the rows have none, or truncating to "
                   f"data.max_tokens={self.max_tokens} cut every answer off")
        return (f"all {report.dropped} training examples were dropped, {why} (longest example: {longest} tokens); "
                f"raise data.max_tokens to at least {longest}" + (" or set data.overlong=truncate"
                                                                   if self.overlong == "drop" else ""))

    @property
    def per_step(self) -> int:
        return self.grad_accum * self.world

    def _epoch_batches(self):
        if self._batches_epoch != self.epoch:
            examples = mixture_epoch(self.datasets, self.weights, self.seed + self.epoch)
            self._batches = pack(examples, self.max_tokens, seed=self.seed + self.epoch, overlong=self.overlong)
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

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
