"""The Qwen3-MoE sparse block: a softmax top-k router over `num_experts` SwiGLU experts.

Parameters carry HF's in-memory names and layouts (`gate.weight` [E, H], `experts.gate_up_proj` [E, 2I, H] with
the gate rows first, `experts.down_proj` [E, H, I]), so the fused expert weights feed the grouped GEMMs as they
are. On disk the hub (and `save_pretrained`) keeps one tensor per expert and projection; engine/checkpoint/moe.py
converts between the two.

The experts run as permute → grouped expert MLP → weighted un-permute (kernels/moe_*.py). Each block keeps the
statistics of its last forward (`router_stats`) for the load-balancing loss, which HF computes over all layers
at once (`Qwen3.router_aux_loss`), and for the per-layer expert load metrics (`expert_load`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from qforge.kernels import moe_expert_mlp, moe_permute, moe_routing, moe_unpermute

from .config import Qwen3Config
from .precision import autocast_weight

@dataclass
class RouterStats:
    """One sparse layer's routing in its last forward."""
    tokens_per_expert: torch.Tensor  # [E] int64 assignments counted by the router's own (fp32) top-k
    aux_counts: torch.Tensor         # [E] fp32 assignments as HF's loss counts them (top-k of probs in logits' dtype)
    prob_sum: torch.Tensor           # [E] fp32 Σ over tokens of softmax(logits), differentiable
    rows: int                        # tokens routed


@dataclass
class RouterBalance:
    """How training adds the load-balancing loss (docs/moe.md "Training"): `coef` times the loss (0: off), taken
    per micro-batch and averaged over the step's micro-batches ("micro_batch", HF's loss of each forward), or with
    the expert counts pooled over the whole step, every micro-batch on every rank ("global_batch")."""
    coef: float
    scope: Literal["micro_batch", "global_batch"] = "micro_batch"


class Router(nn.Module):
    """HF's Qwen3MoeTopKRouter: weights softmax(x Wᵀ) in fp32, top-k, optionally renormalised to sum to 1."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor):
        """(logits [T, E] in x's dtype, routing weights [T, k] in that dtype, expert ids [T, k])."""
        logits = F.linear(x, self.weight.to(x.dtype))
        top, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), ids


class Experts(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the experts run in: autocast's when it is on, else the weights'."""
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.gate_up_proj.dtype

    def forward(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (`offsets`: each expert's end) → each expert's SwiGLU MLP, as one grouped op."""
        gate_up, down = (autocast_weight(w, rows) for w in (self.gate_up_proj, self.down_proj))
        return moe_expert_mlp(rows, offsets, gate_up, down)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate = Router(config)
        self.experts = Experts(config)
        self.router_stats: RouterStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, H = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, H)
        flat = flat.to(self.experts.compute_dtype(flat))
        logits, weights, ids = self.gate(flat)
        routing = moe_routing(ids, self.num_experts)
        rows = self.experts(moe_permute(flat, routing), routing.offsets)
        stats = _router_stats(logits, ids, routing.counts)
        if torch._C._current_graph_task_id() == -1:  # not a checkpoint's recompute: its stats would keep its graph
            self.router_stats = stats
        return moe_unpermute(rows, weights, routing).view(*lead, H)


def _router_stats(logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> RouterStats:
    """HF's load_balancing_loss_func takes softmax in the logits' dtype and re-ranks it: in fp32 that is the
    router's own top-k; in bf16 rounding can break ties differently, so the loss's counts are taken again."""
    probs = torch.softmax(logits, dim=-1)
    if logits.dtype == torch.float32:
        aux_counts = counts.float()
    else:
        aux_ids = torch.topk(probs, ids.shape[1], dim=-1).indices.reshape(-1)
        aux_counts = torch.zeros(counts.numel(), device=ids.device).index_add_(
            0, aux_ids, torch.ones(aux_ids.numel(), device=ids.device))
    return RouterStats(counts, aux_counts, probs.float().sum(0), logits.shape[0])


def routing_counts(stats: list[RouterStats]) -> torch.Tensor:
    """[E + 1] fp32: the loss's assignment counts per expert pooled over the layers, then the rows routed."""
    rows = torch.tensor([float(sum(s.rows for s in stats))], device=stats[0].aux_counts.device)
    return torch.cat([sum(s.aux_counts for s in stats), rows])


def load_balancing_loss(stats: list[RouterStats], pooled: torch.Tensor | None = None) -> torch.Tensor:
    """HF's `load_balancing_loss_func` (no attention mask: packed batches have no padding): E · Σ_e f_e · P_e with
    f_e the share of top-k assignments and P_e the mean router probability of expert e, both pooled over every
    layer's rows (not a per-layer mean).

    `pooled` (`routing_counts` summed over a whole step) replaces this forward's counts and row total: the result
    is then this forward's share of the step's loss E · Σ_e f_e · P_e (f_e and P_e over the step), so the shares
    of the step's forwards add up to it, and so do their gradients (f_e carries none)."""
    counts = routing_counts(stats) if pooled is None else pooled
    rows = counts[-1]
    tokens_per_expert = counts[:-1] / rows
    router_prob = sum(s.prob_sum for s in stats) / rows
    return (tokens_per_expert * router_prob).sum() * tokens_per_expert.numel()


def expert_load(stats: RouterStats) -> dict[str, torch.Tensor]:
    """Tokens per expert in one layer: min, max and coefficient of variation (std / mean), 0-dim tensors."""
    counts = stats.tokens_per_expert.float()
    return {"tokens_min": counts.min(), "tokens_max": counts.max(), "tokens_cv": _cv(counts)}


def _cv(counts: torch.Tensor) -> torch.Tensor:
    return counts.std(dim=-1, unbiased=False) / counts.mean(dim=-1)


def expert_load_summary(counts: torch.Tensor) -> dict[str, float]:
    """Step metrics from tokens per expert [sparse layers, E]: the fewest and most tokens any expert got in any
    layer, and the coefficient of variation (std / mean over experts) of the most unbalanced layer and the mean
    over layers (0: perfectly balanced; √(E/k − 1) when every token goes to the same k experts)."""
    counts = counts.double()
    cv = _cv(counts)
    return {"expert_tokens_min": float(counts.min()), "expert_tokens_max": float(counts.max()),
            "expert_load_cv_max": float(cv.max()), "expert_load_cv_mean": float(cv.mean())}
