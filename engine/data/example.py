"""A tokenised training example and its per-token loss weights."""
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
LOSS_WEIGHTINGS = ("token", "sample", "sqrt")


@dataclass(frozen=True, eq=False)  # arrays do not compare to one bool
class Example:
    """One sequence. `labels` follow the HF convention: unshifted, `labels[i] = input_ids[i]` when token i is
    supervised, else -100. `loss_weight[i]` is the weight of predicting token i (0 where unsupervised).
    Packing shifts both so that position t carries the target t+1."""
    input_ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L]
    loss_weight: np.ndarray  # float32 [L]

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
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(LOSS_WEIGHTINGS)}")
    count = int(np.count_nonzero(supervised))
    if weighting == "token" or count == 0:
        scale = 1.0
    elif weighting == "sample":
        scale = 1.0 / count
    else:
        scale = 1.0 / np.sqrt(count)
    return np.where(supervised, np.float32(scale), np.float32(0)).astype(np.float32)


def make_example(input_ids, supervised: np.ndarray, weighting: str = "token") -> Example:
    input_ids = np.asarray(input_ids, dtype=np.int32)
    labels = np.where(supervised, input_ids, IGNORE_INDEX).astype(np.int32)
    return Example(input_ids, labels, loss_weights(supervised, weighting))
