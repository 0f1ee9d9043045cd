"""AdamW with the usual no-decay groups (moments in fp32, or in bf16 over fp32 weights), and the warmup + decay
learning-rate schedule."""
from __future__ import annotations

import math

import torch

from .config import OptimSettings

MOMENTS = ("exp_avg", "exp_avg_sq")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2 parameters, their gradients and states), else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class BF16StateAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) whose two moments are stored in bf16.

    As DeepSeek-V3 (arXiv:2412.19437, §3.3.3 "Low-Precision Optimizer States": BF16 moments, FP32 master weights
    and gradients, no observable degradation reported).

    Weights and gradients stay fp32; each step upcasts one parameter's moments, updates them and the weight
    in fp32, and stores the moments back rounded to nearest. Round-to-nearest rather than stochastic: the EMA
    shrinks a past rounding error by β each step instead of accumulating it, and a moment stalls only within
    0.39%/(1 − β) of its target (bf16's half-ulp; 8% for v at β2 = 0.95) — with β ≤ 0.99, which OptimSettings
    enforces, it still decays; rounding to nearest is also deterministic, so a resume is bitwise.
    One parameter at a time (a loop, not `_foreach_*` over the group): the fp32 temporaries are then 8 B × the
    largest parameter shard, whereas a foreach over all parameters would materialise every fp32 moment at once —
    the memory this optimizer exists to save.

    States are DTensors like their parameters (torch DCP saves and reshards them); the arithmetic runs on the
    local shards."""

    state_dtype = torch.bfloat16

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    for key in MOMENTS:
                        state[key] = torch.zeros_like(param, dtype=self.state_dtype,
                                                      memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                weight, grad = _local(param), _local(param.grad)
                exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                m = exp_avg.float().lerp_(grad, 1 - beta1)
                v = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg.copy_(m)      # round to nearest (even)
                exp_avg_sq.copy_(v)
                weight.mul_(1 - lr * group["weight_decay"])
                denom = v.sqrt_().div_(math.sqrt(1 - beta2 ** step)).add_(eps)
                weight.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every floating state to its parameter's dtype (fp32 here): the moments are
        set aside and put back in the state dtype, so a resume never holds fp32 copies of them."""
        saved = {pid: {key: state[key] for key in MOMENTS if key in state}
                 for pid, state in state_dict["state"].items()}
        stripped = {pid: {k: v for k, v in state.items() if k not in MOMENTS}
                    for pid, state in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": stripped})
        params = {pid: param for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
                  for pid, param in zip(saved_group["params"], group["params"])}
        for pid, moments in saved.items():
            for key, value in moments.items():
                self.state[params[pid]][key] = value.to(device=params[pid].device, dtype=self.state_dtype)


def build_optimizer(model: torch.nn.Module, settings: OptimSettings) -> torch.optim.Optimizer:
    """Norm weights and embeddings get no weight decay unless `decay_norms_and_embeddings` is set."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embed_tokens" in name
        (no_decay if exempt and not settings.decay_norms_and_embeddings else decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if settings.state_dtype == "bf16" and all(p.dtype == torch.float32 for p in decay + no_decay):
        return BF16StateAdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)
    # Moments in the parameter dtype (with train.precision: bf16 that is bf16 already, whatever state_dtype says).
    # The fused kernel makes one pass over each parameter (CPU and CUDA): measured 7x faster than foreach on
    # CPU for a 151,936 x 128 embedding (0.02 s vs 0.15 s a step), which dominates small models' steps.
    return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, fused=True)


def lr_factor(step: int, max_steps: int, settings: OptimSettings) -> float:
    """Multiplier of optim.lr at `step` (0-based): linear warmup, then cosine/linear decay to min_lr_ratio."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return 1.0
    span = max(1, max_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if settings.schedule == "cosine" else 1 - progress
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * shape


def build_scheduler(optimizer, max_steps: int, settings: OptimSettings) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, max_steps, settings))
