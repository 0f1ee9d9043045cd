"""Packing tokenised examples into padding-free varlen micro-batches of at most `max_tokens` tokens."""
import logging
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..model import positions_from_cu_seqlens
from ..vocab import VocabMap

from .example import IGNORE_INDEX, Example, loss_weights

log = logging.getLogger(__name__)
OVERLONG = ("truncate", "drop")


@dataclass(frozen=True, eq=False)  # tensors do not compare to one bool
class PackedBatch:
    """Sequences laid end to end. `labels[t]` is the target of position t (token t+1 of the same sequence), -100
    where unsupervised and at every sequence's last position; `loss_weight[t]` is that target's weight."""
    input_ids: torch.Tensor  # int64 [T]
    position_ids: torch.Tensor  # int64 [T], restarting at 0 per sequence
    cu_seqlens: torch.Tensor  # int32 [n + 1]
    max_seqlen: int
    labels: torch.Tensor  # int64 [T], already shifted
    loss_weight: torch.Tensor  # float32 [T]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.position_ids), move(self.cu_seqlens), self.max_seqlen,
                           move(self.labels), move(self.loss_weight))

    @classmethod
    def from_examples(cls, examples: list[Example], loss_weighting: str = "token") -> "PackedBatch":
        """Lays `examples` end to end; each example's supervised tokens get their `loss_weights`."""
        lengths = np.array([len(e) for e in examples], dtype=np.int64)
        cu_seqlens = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu_seqlens[1:])
        last = cu_seqlens[1:] - 1
        labels = np.concatenate([e.labels for e in examples]).astype(np.int64)
        labels[:-1] = labels[1:]  # shift: position t predicts token t+1 ...
        labels[last] = IGNORE_INDEX  # ... never across a sequence boundary
        weights = np.concatenate([loss_weights(e.labels != IGNORE_INDEX, loss_weighting) for e in examples])
        weights[:-1] = weights[1:]
        weights[last] = 0.0
        return cls(
            input_ids=torch.from_numpy(np.concatenate([e.input_ids for e in examples]).astype(np.int64)),
            position_ids=positions_from_cu_seqlens(torch.from_numpy(cu_seqlens)),
            cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
            max_seqlen=int(lengths.max()),
            labels=torch.from_numpy(labels),
            loss_weight=torch.from_numpy(weights),
        )


@dataclass(frozen=True)
class PackReport:
    num_examples: int  # examples packed
    num_batches: int
    num_tokens: int
    max_tokens: int
    truncated: int  # longer than max_tokens, cut to max_tokens
    dropped: int  # longer than max_tokens and dropped, or left with no supervised token by truncation

    @property
    def efficiency(self) -> float:
        """Real tokens / token budget of all batches."""
        return self.num_tokens / max(1, self.num_batches * self.max_tokens)

    def __str__(self):
        return (f"packed {self.num_examples} examples ({self.num_tokens} tokens) into {self.num_batches} batches of "
                f"≤{self.max_tokens} tokens, efficiency {self.efficiency:.1%}; {self.truncated} truncated, "
                f"{self.dropped} dropped")


class Batches(Sequence):
    """Micro-batches built on access from bins of items (so packing a large dataset does not copy it into tensors
    up front): batch i is `make_batch([items of bin i], i)`. `report` describes the packing."""

    def __init__(self, items: Sequence, bins: list[list[int]], make_batch, report: "PackReport | None" = None):
        self._items, self._bins, self._make_batch, self.report = items, bins, make_batch, report

    def __len__(self) -> int:
        return len(self._bins)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self._bins))[index]  # negative indices; IndexError past the end
        return self._make_batch([self._items[i] for i in self._bins[index]], index)


def _truncated(example: Example, max_tokens: int) -> Example:
    return Example(example.input_ids[:max_tokens], example.labels[:max_tokens])


def best_fit_decreasing(lengths: np.ndarray, capacity: int, tie_break: np.ndarray) -> list[list[int]]:
    """Bins of item indices, each summing to ≤ capacity: items longest first, each into the fullest bin it fits.

    Bins are bucketed by free space, so a placement costs a bisect over at most `capacity` distinct values
    however many bins there are."""
    order = np.lexsort((tie_break, -lengths))
    bins: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free sizes that some bin has
    bins_by_free: dict[int, list[int]] = {}
    for item in order.tolist():
        length = int(lengths[item])
        slot = bisect_left(free_sizes, length)
        if slot < len(free_sizes):
            free = free_sizes[slot]
            bin_index = bins_by_free[free].pop()
            if not bins_by_free[free]:
                del bins_by_free[free], free_sizes[slot]
        else:
            free, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(item)
        free -= length
        if free not in bins_by_free:
            bins_by_free[free] = []
            insort(free_sizes, free)
        bins_by_free[free].append(bin_index)
    return bins


def pack(examples: Sequence[Example], max_tokens: int, seed: int = 0, *, overlong: str = "truncate",
         loss_weighting: str = "token", vocab: VocabMap | None = None) -> Batches:
    """Packs examples into batches of ≤ max_tokens tokens (best-fit decreasing, which never does worse than
    first-fit decreasing). The seed breaks ties between equal lengths and shuffles the batch order, so calling
    this once per epoch with a new seed reshuffles; the same seed gives the same batches.

    overlong: "truncate" cuts examples longer than max_tokens, "drop" drops them. Then labels outside `vocab`
    (the kept vocabulary) are masked, and loss weights (`loss_weighting`) are computed from what is left, so a
    step's Σw counts exactly the tokens the loss scores. Examples left without any supervised token are dropped.
    Truncated and dropped examples are counted in `.report`."""
    if overlong not in OVERLONG:
        raise ValueError(f"unknown overlong policy {overlong!r}; expected one of {', '.join(OVERLONG)}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    kept, truncated, dropped = [], 0, 0
    for example in examples:
        if len(example) > max_tokens:
            if overlong == "drop":
                dropped += 1
                continue
            example, truncated = _truncated(example, max_tokens), truncated + 1
        if vocab is not None:
            example = Example(example.input_ids, vocab.mask_labels(example.labels))
        if example.num_loss_tokens == 0 or len(example) < 2:
            dropped += 1
            continue
        kept.append(example)
    batches = pack_items(kept, max_tokens, seed, lambda group, _: PackedBatch.from_examples(group, loss_weighting))
    batches.report = PackReport(len(kept), len(batches), sum(len(e) for e in kept), max_tokens, truncated, dropped)
    log.info("%s", batches.report)
    return batches


def pack_items(items: Sequence, max_tokens: int, seed: int, make_batch) -> Batches:
    """Bins of `items` (each with __len__ ≤ max_tokens: callers filter or cut first) packed best-fit decreasing,
    in an order shuffled by `seed`, as lazily built micro-batches `make_batch(items of a bin, its position)`.
    The seed first breaks ties between equal lengths, then shuffles the bins: every objective's packing draws
    the same random numbers, so one seed gives one packing whatever the item type."""
    rng = np.random.default_rng(seed)
    lengths = np.array([len(item) for item in items], dtype=np.int64)
    bins = best_fit_decreasing(lengths, max_tokens, rng.permutation(len(items)))
    return Batches(items, [bins[i] for i in rng.permutation(len(bins))], make_batch)
