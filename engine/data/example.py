"""A tokenised training example, and the per-token loss weights packing gives its supervised tokens."""
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
LOSS_WEIGHTINGS = ("token", "sample", "sqrt")


@dataclass(frozen=True, eq=False)  # arrays do not compare to one bool
class Example:
    """One sequence. `labels` follow the HF convention: unshifted, `labels[i] = input_ids[i]` when token i is
    supervised, else -100. Weights are not stored: packing computes them from the labels it trains on (after
    truncation and vocabulary masking), so changing `data.loss_weighting` never re-tokenises."""
    input_ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))


def loss_weights(supervised: np.ndarray, weighting: str = "token") -> np.ndarray:
    """Per-token weights for a boolean supervision mask.

    "token": every supervised token weighs 1 (a step's loss is the mean over its tokens; long answers count more).
    "sample": 1/n per sample, so each sample's tokens sum to 1 (mean of per-sample means).
    "sqrt": 1/sqrt(n) per sample, Qwen3-VL's compromise between the two.
    """
    count = int(np.count_nonzero(supervised))
    if weighting == "token" or count == 0:
        scale = 1.0
    elif weighting == "sample":
        scale = 1.0 / count
    elif weighting == "sqrt":
        scale = 1.0 / np.sqrt(count)
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(LOSS_WEIGHTINGS)}")
    return np.where(supervised, np.float32(scale), np.float32(0)).astype(np.float32)


def make_example(input_ids, supervised: np.ndarray) -> Example:
    input_ids = np.asarray(input_ids, dtype=np.int32)
    return Example(input_ids, np.where(supervised, input_ids, IGNORE_INDEX).astype(np.int32))


def zero_weight(example: Example, max_tokens: int) -> Example:
    """A copy of `example` (cut to max_tokens) without supervised tokens: a filler micro-batch made of it runs a
    real forward and backward but adds nothing to the loss or gradient."""
    ids = example.input_ids[:max_tokens]
    return Example(ids, np.full(len(ids), IGNORE_INDEX, dtype=example.labels.dtype))
