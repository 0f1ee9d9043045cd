"""Per-token log-probabilities of packed completions through the fused head: never a [T, V] logits tensor.

`token_logps` is the fused cross-entropy's `reduction="none"` (its backward recomputes the chunks), negated,
with the sampling temperature folded into the hidden states (logits / τ = (hidden / τ) @ Wᵀ) and the kept
vocabulary of a pruned model as the softmax's support. `pack_completions` lays prompt + completion pairs end to
end (varlen, no padding) with only the completion supervised, and says which completion each scored token is.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qforge.kernels import fused_linear_cross_entropy

from ..data.example import IGNORE_INDEX, Example
from ..data.packing import PackedBatch
from ..model import Qwen3
from ..precision import autocast_weight


def token_logps(model, packed: PackedBatch, vocab_index: torch.Tensor | None = None,
                target_index: torch.Tensor | None = None, temperature: float = 1.0,
                backend: str = "auto") -> torch.Tensor:
    """log p(label_t) for every position of `packed` (fp32 [T], 0 where unlabelled), with gradient. Bound to
    the model as a forward method under FSDP, so it calls the class's `hidden`, like DPO's sequence log-probs."""
    if temperature <= 0:
        raise ValueError(f"token_logps: temperature must be > 0, got {temperature}")
    hidden = Qwen3.hidden(model, packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    weight = autocast_weight(model.output_weight, hidden)
    hidden = hidden.to(weight.dtype)
    if temperature != 1.0:
        hidden = hidden / temperature
    return -fused_linear_cross_entropy(hidden, weight, packed.labels, reduction="none", vocab_index=vocab_index,
                                       target_index=target_index, backend=backend)


def pack_completions(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     scored: Sequence[bool] | None = None) -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
    """(packed batch, positions [N] of the completion tokens' log-probs in it, sequence [N]: which completion).
    Completion i's tokens are scored in order, so `token_logps(...)[positions]` lines up with `completions[i]`.
    `scored[i]` False: completion i is packed (its forward runs) but none of its tokens is supervised (GRPO's
    mask_truncated_completions, filler micro-batches)."""
    if len(prompts) != len(completions):
        raise ValueError(f"pack_completions: {len(prompts)} prompts but {len(completions)} completions")
    scored = [True] * len(completions) if scored is None else list(scored)
    examples = []
    for prompt, completion, supervised in zip(prompts, completions, scored, strict=True):
        if not len(prompt):
            raise ValueError("pack_completions: an empty prompt (a completion needs a token to follow)")
        ids = np.asarray(list(prompt) + list(completion), dtype=np.int32)
        labels = ids.copy()
        labels[:len(prompt) if supervised else len(ids)] = IGNORE_INDEX
        examples.append(Example(ids, labels))
    packed = PackedBatch.from_examples(examples)
    positions = (packed.labels != IGNORE_INDEX).nonzero().squeeze(1)
    lengths = torch.tensor([len(c) if supervised else 0 for c, supervised in zip(completions, scored)])
    sequence = torch.repeat_interleave(torch.arange(len(completions)), lengths)
    return packed, positions, sequence
