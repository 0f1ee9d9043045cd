"""The items and micro-batches of distillation: SFT examples with a teacher's stored top-k (off-policy), and
prompts the student samples from inside the training step (on-policy)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .example import Example
from .packing import PackedBatch


@dataclass(frozen=True, eq=False)
class TeacherTargets:
    """An SFT example with the teacher's top-k (original token ids, log-probs) at each supervised target, in
    the order of the packed batch's supervised positions."""
    example: Example
    ids: np.ndarray  # int32 [targets, K]
    logprobs: np.ndarray  # float32 [targets, K]

    def __len__(self) -> int:
        return len(self.example)

    @property
    def labels(self) -> np.ndarray:
        return self.example.labels

    @property
    def num_loss_tokens(self) -> int:
        return self.example.num_loss_tokens


@dataclass(frozen=True, eq=False)
class DistillBatch:
    """A PackedBatch plus the teacher's top-k at every position ([T, K], −1 where unsupervised)."""
    packed: PackedBatch
    target_ids: torch.Tensor
    target_logprobs: torch.Tensor

    def __getattr__(self, name):  # input_ids, labels, loss_weight, cu_seqlens, num_tokens, ... of the packed batch
        if name == "packed":
            raise AttributeError(name)
        return getattr(self.packed, name)

    def to(self, device, non_blocking: bool = False) -> "DistillBatch":
        return DistillBatch(self.packed.to(device, non_blocking=non_blocking),
                            self.target_ids.to(device, non_blocking=non_blocking),
                            self.target_logprobs.to(device, non_blocking=non_blocking))

    @classmethod
    def from_items(cls, items: list[TeacherTargets], loss_weighting: str = "token") -> "DistillBatch":
        packed = PackedBatch.from_examples([item.example for item in items], loss_weighting)
        k = items[0].ids.shape[1]
        ids = torch.full((packed.num_tokens, k), -1, dtype=torch.long)
        logprobs = torch.zeros(packed.num_tokens, k, dtype=torch.float32)
        rows = (packed.labels != -100).nonzero().squeeze(1)
        ids[rows] = torch.from_numpy(np.concatenate([item.ids for item in items])).long()
        logprobs[rows] = torch.from_numpy(np.concatenate([item.logprobs for item in items]))
        return cls(packed, ids, logprobs)


@dataclass(eq=False)
class Prompt:
    """A prompt to sample from; `labels` are its SFT example's (for vocab.restrict=data and label checks)."""
    prompt_ids: np.ndarray
    labels: np.ndarray
    budget: int  # prompt + max_new_tokens: what packing reserves (GRPO: times its completions per prompt)
    row: dict | None = None  # the data row (GRPO's rewards read it, e.g. its `answer`)

    def __len__(self) -> int:
        return self.budget

    @property
    def num_loss_tokens(self) -> int:
        return 1


@dataclass(frozen=True, eq=False)
class PromptBatch:
    """Prompts of one micro-batch and the seed their completions are sampled with (from the micro-batch's place
    in the epoch's packing, which the data cursor restores); `OnPolicyDistill.sample` turns it into the packed
    prompt + completion sequences the step trains on."""
    prompts: list[Prompt]
    seed: int
