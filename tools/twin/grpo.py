"""A GRPO step on the twin: the training half traced, the rollout's memory in closed form.

Traced (`run_twin` with objective "grpo"): `GRPO.train_step` itself on one rollout micro-batch per rank, G
completions of `completion_tokens` after a `prompt_tokens` prompt packed by the engine's `pack_completions`,
per-token log-probs through the fused head (`token_logps`), `grpo_loss` and the backward, with the frozen bf16
reference sharded and scoring the micro-batch when β > 0. The rollout is handed in through the objective's
checkpoint state (`GRPO.load_state_dict`: a step between two passes of one rollout batch, which does not
sample), so sampling is not traced.

Rollout memory (`rollout_memory`, a closed form, not traced): what `generate` holds at its last decoding step,
all G × grad_accum rows (`sample` decodes the step's micro-batches in one call) running to max_new_tokens
(the worst case) — the step's persistent state (sharded fp32 weights,
AdamW's moments, the reference's shards; gradients are freed by the last step's zero_grad), the weights it
decodes with (`gather_for_sampling`: every unit kept gathered in bf16; else one block at a time, gathered
again for every token), and the KV cache. `generate` sizes the cache once for prompt + max_new_tokens − 1 slots (the last token is
never cached; 4,607 slots for 512 + 4,096), so it never grows: `kv_cache_bytes` gives that.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from qforge.engine.data.packing import PackedBatch
from qforge.engine.train.grpo import GRPO, LOGPS, RolloutBatch, Rollouts
from qforge.engine.train.grpo_loss import LossSettings
from qforge.engine.train.logps import pack_completions

# The rollout's metric sums `GRPO._rollout_metrics` reads (rewards have no functions here).
_ROLLOUT_SUMS = ("completions", "groups", "zero_advantage_groups", "reward", "reward_sq", "length", "truncated",
                 "length_max")


def grpo_lengths(plan) -> list[int]:
    """The packed sequences of one rollout micro-batch: G × (prompt + completion)."""
    return [plan.prompt_tokens + plan.completion_tokens] * plan.group


def grpo_objective(plan, vocab_size: int) -> tuple[GRPO, list[PackedBatch]]:
    """A GRPO objective holding one rollout micro-batch per `grad_accum` (host tensors, as `_rollout` leaves
    them), set so that `train_step` trains on them without sampling."""
    rewards = SimpleNamespace(names=(), weights=torch.zeros(0))
    objective = GRPO(rewards, LossSettings(beta=plan.beta), num_generations=plan.group, num_iterations=2,
                     max_new_tokens=plan.completion_tokens)
    batches = []
    for b in range(plan.grad_accum):
        prompts = [[(b + i + t) % vocab_size for t in range(plan.prompt_tokens)] for i in range(plan.group)]
        completions = [[(7 * i + t) % vocab_size for t in range(plan.completion_tokens)] for i in range(plan.group)]
        packed, positions, sequence = pack_completions(prompts, completions)
        advantages = torch.linspace(-1.0, 1.0, plan.group)
        batches.append(RolloutBatch(packed, positions, sequence, advantages))
    sums = dict.fromkeys(_ROLLOUT_SUMS, 1.0)
    rollouts = Rollouts(batches, sums, seconds=1.0, tokens=plan.group * plan.completion_tokens)
    # pass 1 of num_iterations 2: the next step trains on these rollouts without sampling
    objective.load_state_dict({"pass": 1, "world": 1, "rollouts": rollouts}, world=1)
    return objective, [b.packed for b in batches]


def prepare_grpo(objective: GRPO, model, reference, tables: dict, frozen_builder):
    """What `GRPO.prepare` does, with the twin's models: the loss tables, the log-prob forward method on the
    policy and, β > 0, the frozen reference (`frozen_builder(model, method name, fn)`)."""
    from qforge.engine.model import bind_forward_method
    from qforge.engine.train.logps import token_logps

    objective.tables = tables
    bind_forward_method(model, LOGPS, token_logps)
    if reference is not None:
        objective.reference = frozen_builder(reference, LOGPS, token_logps)
    return objective.reference


def kv_cache_bytes(config, rows: int, prompt: int, completion: int, dtype_bytes: int) -> dict:
    """`KVCache`'s memory for `rows` left-padded prompts of `prompt` tokens decoding `completion` tokens each:
    `generate` reserves prompt + completion − 1 slots up front (`DecodeBatch.add`'s extra_slots)."""
    capacity = prompt + max(completion - 1, 0)
    per_slot = 2 * rows * config.num_key_value_heads * config.head_dim * dtype_bytes  # keys + values, one layer
    final = config.num_hidden_layers * per_slot * capacity
    return {"capacity": capacity, "final_bytes": final, "peak_bytes": final}


def rollout_memory(plan, config, result: dict) -> dict:
    """The rollout's peak per GPU (closed form, see the module docstring), from the traced step's persistent
    categories (`result`: run_twin's report) and the model's parameter counts."""
    categories = result["memory"]["tracker_categories_at_peak"]
    persistent = sum(categories.get(key, 0) for key in ("Sharded Param", "Parameter", "Buffer", "OptState",
                                                        "Optstate"))
    block, root = unit_parameters(config)
    if plan.gpus == 1:  # unsharded: decodes with the weights themselves, in their dtype (no autocast in `sample`)
        dtype_bytes, weights = (2 if plan.precision == "bf16" else 4), 0
    else:  # FSDP's bf16 gathers: every unit kept (gather_for_sampling), else the root, a block and the next one
        dtype_bytes = 4 if plan.precision == "fp32" else 2
        units = root + config.num_hidden_layers * block if plan.gather_for_sampling else root + 2 * block
        weights = units * dtype_bytes
    rows = plan.group * plan.grad_accum  # `GRPO.sample` decodes all the step's micro-batches in one call
    kv = kv_cache_bytes(config, rows, plan.prompt_tokens, plan.completion_tokens, dtype_bytes)
    # the prompts' forward (no grad): the MLP's three [rows·prompt, I] tensors, or the last position's logits
    width = config.num_experts_per_tok * config.moe_intermediate_size if config.num_experts else \
        config.intermediate_size
    prefill = 3 * rows * plan.prompt_tokens * width * dtype_bytes
    logits = rows * (plan.kept_vocab or config.vocab_size) * 4
    total = persistent + weights + kv["peak_bytes"] + max(prefill, logits) + result["memory"]["runtime_reserve_bytes"]
    return {"persistent_bytes": persistent, "sampling_weights_bytes": weights, "kv_cache": kv,
            "transient_bytes": max(prefill, logits), "peak_bytes": total,
            "gather_for_sampling": plan.gather_for_sampling,
            "note": "closed form (sampling is not traced): see tools/twin/grpo.py"}


def unit_parameters(config) -> tuple[int, int]:
    """Parameters of one decoder block (FSDP's unit) and of the root unit (embedding and head)."""
    h, q, kv = config.hidden_size, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim
    attention = h * (2 * q + 2 * kv) + 2 * config.head_dim + 2 * h  # projections, q/k norms, two RMSNorms
    if config.num_experts:
        mlp = config.num_experts * (3 * h * config.moe_intermediate_size + h)
    else:
        mlp = 3 * h * config.intermediate_size
    return attention + mlp, config.vocab_size * h * (1 if config.tie_word_embeddings else 2) + h
