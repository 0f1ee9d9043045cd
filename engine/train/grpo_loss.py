"""GRPO's losses as pure tensor functions: rewards → group advantages → clipped policy-gradient loss (+ k3 KL).

The formulas are TRL's GRPOTrainer's (the version installed as the test oracle, tests/engine/train/
test_grpo_loss.py checks loss and every gradient against it), laid out the qforge way: no padding. A micro-batch's
completion tokens are one flat vector [N] (only the tokens that take part in the loss), `sequence[N]` says which
completion each belongs to, per-completion values (advantages) are [S]. Nothing here knows the trainer: the
objective passes the step's totals (`StepTotals`) that the normalisations divide by.

Loss types (TRL's `loss_type`): the per-token term is
- grpo, bnpo, dr_grpo, dapo, luspo: −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), r = exp(logp − old_logp)
  (r capped at `delta` first when set: two-sided clipping);
- cispo: −sg(min(r, ε_high))·A·logp;   sapo: −σ(τ(r−1))·4/τ·A, τ by the sign of A;
- vespo: −sg(φ(w))·A·logp, φ a gamma weight of the sequence ratio w;
plus β·k3 with k3 = exp(ref − logp) − (ref − logp) − 1 (times r when `use_bias_correction_kl`). Normalisation:
grpo/sapo mean per completion then over completions; bnpo mean over the micro-batch's tokens; dr_grpo divides by
completions × max_completion_length; dapo/cispo/vespo by the step's tokens; luspo sums per completion and
averages over completions. TRL divides per micro-batch and by the accumulation steps; with the step's totals
that is the same number whenever micro-batches hold equal numbers of completions (TRL's only layout), and the
honest one when they do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
IMPORTANCE_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # TRL's: an all-equal group gets advantage 0 / (0 + eps) = 0, never NaN


@dataclass(frozen=True)
class LossSettings:
    """The GRPO options people compare; defaults are TRL's GRPOConfig's."""

    loss_type: str = "dapo"
    beta: float = 0.0  # KL weight; 0 needs no reference
    epsilon: float = 0.2  # ε_low
    epsilon_high: float | None = None  # ε_high (DAPO: 0.28); None: ε_low
    delta: float | None = None  # cap on r before the min (two-sided clipping)
    importance_sampling_level: str = "token"  # "sequence": GSPO's per-completion geometric-mean ratio
    use_bias_correction_kl: bool = True  # k3 weighted by r (unbiased off-policy)
    max_completion_length: int | None = None  # dr_grpo's constant
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type={self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
        if self.importance_sampling_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"grpo.importance_sampling_level={self.importance_sampling_level!r}: expected one of "
                             f"{', '.join(IMPORTANCE_LEVELS)}")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError("grpo.beta, grpo.epsilon and grpo.epsilon_high must be ≥ 0")
        if self.loss_type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("grpo.loss_type='dr_grpo' divides by grpo.max_completion_length: set it (> 0)")

    @property
    def clip_high(self) -> float:
        """ε_high as used: ε_low unless set."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass(frozen=True)
class StepTotals:
    """What the loss of one micro-batch is normalised by: counts over the whole optimizer step (every micro-batch
    and rank), so that summing the micro-batches' gradients gives the step's gradient."""

    sequences: int  # completions in the step
    tokens: int  # their loss tokens
    micro_batches: int = 1  # bnpo's divisor (it averages per micro-batch)


def combine_rewards(per_function: torch.Tensor, weights: torch.Tensor | None = None,
                    group_size: int | None = None, aggregation: str = "sum_then_normalize") -> torch.Tensor:
    """[S, F] rewards (NaN: that function did not score that completion) → [S] rewards. A completion no function
    scored is NaN (its advantage becomes 0). "normalize_then_sum" standardises each function within its group
    first (needs group_size)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo.reward_aggregation={aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
    weights = torch.ones(per_function.shape[1]) if weights is None else weights
    weights = weights.to(per_function)
    unscorable = torch.isnan(per_function).all(dim=1)
    if aggregation == "normalize_then_sum":
        grouped = per_function.view(-1, group_size, per_function.shape[1])
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        std = _nanstd(grouped, dim=1, keepdim=True)
        per_function = ((grouped - mean) / (std + STD_EPS)).view(per_function.shape)
    rewards = (per_function * weights).nansum(dim=1)
    return rewards.masked_fill(unscorable, float("nan"))


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     aggregation: str = "sum_then_normalize", reduce: Callable | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """[S] rewards, consecutive groups of `group_size` completions of one prompt → (advantages [S], zero_std [S]:
    the completion's group (the batch for "batch" scaling) has all-equal rewards, so no gradient). Advantage =
    reward − group mean, divided by the std (+1e-4) unless scale_rewards="none"; NaN rewards are left out of the
    statistics and get advantage 0. After "normalize_then_sum" the rewards are standardised over the batch.
    `reduce` sums a tensor over the ranks (Dist.all_reduce_sum): the batch statistics are the whole step's, as
    TRL's over its gathered rewards (groups never span ranks)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"grpo.scale_rewards={scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"grpo: {rewards.numel()} rewards do not form groups of num_generations={group_size} "
                         "(≥ 2 completions per prompt)")
    if aggregation == "normalize_then_sum":
        mean, std = _batch_stats(rewards, reduce)
        std = std.expand_as(rewards)
        advantages = (rewards - mean) / (std + STD_EPS)
    else:
        grouped = rewards.view(-1, group_size)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
        if scale_rewards == "batch":
            std = _batch_stats(rewards, reduce)[1]
        else:
            std = _nanstd(grouped, dim=1).repeat_interleave(group_size)
        std = std.expand_as(rewards)
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + STD_EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), zero_std


def _batch_stats(x: torch.Tensor, reduce: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased std) of the non-NaN values of `x` over every rank (`reduce`: a sum over ranks), in fp64
    (two passes: the mean first, then the squared deviations from it), returned in x's dtype."""
    reduce = reduce or (lambda t: t)
    values = x.double()
    valid = ~torch.isnan(values)
    count, total = reduce(torch.stack([valid.sum().double(), values.nansum()])).tolist()
    mean = total / count if count else float("nan")
    squares = float(reduce(((values - mean) ** 2).nansum()))
    std = math.sqrt(squares / (count - 1)) if count > 1 else float("nan")
    return x.new_tensor(mean), x.new_tensor(std)


def soft_overlong_punishment(lengths: torch.Tensor, max_completion_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (its Eq. 13, TRL's `get_soft_overlong_punishment`) of completions of
    `lengths` tokens: 0 up to max − cache, then falling linearly to −1 at max, −1 beyond."""
    if not 0 < cache <= max_completion_length:
        raise ValueError(f"grpo.soft_punish_cache={cache}: expected 0 < cache ≤ grpo.max_new_tokens="
                         f"{max_completion_length} (0: off)")
    lengths = lengths.double()
    penalty = ((max_completion_length - cache) - lengths) / cache
    penalty = torch.where(lengths <= max_completion_length - cache, torch.zeros_like(lengths), penalty)
    return torch.where(lengths > max_completion_length, torch.full_like(lengths, -1.0), penalty)


def _nanstd(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std ignoring NaNs (NaN for fewer than 2 values), as TRL's `nanstd`."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    return std if keepdim else (std.squeeze(dim) if dim is not None else std.reshape(()))


def _per_sequence(x: torch.Tensor, sequence: torch.Tensor, count: int) -> torch.Tensor:
    return x.new_zeros(count).index_add(0, sequence, x)


@torch.no_grad()
def _gamma_weights(log_ratio, advantages_tok, sequence, num_sequences, settings: LossSettings):
    """VESPO's φ(w) = e^λ·w^k·e^{−λw} of the sequence ratio w = exp Σ log r, per token of the sequence (TRL's
    `get_gamma_weights`, in log space, no gradient)."""
    lower = math.log(1e-8)
    seq_log_ratio = _per_sequence(log_ratio.clamp(-20.0, 20.0), sequence, num_sequences)[sequence]
    log_w = seq_log_ratio.clamp(lower, 20.0)
    positive = advantages_tok >= 0
    k = torch.where(positive, settings.vespo_k_pos, settings.vespo_k_neg)
    lam = torch.where(positive, settings.vespo_lambda_pos, settings.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, sequence: torch.Tensor, totals: StepTotals,
              settings: LossSettings, old_logps: torch.Tensor | None = None,
              ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's share of the step loss, and its metrics (detached 0-dim tensors, token means).

    logps [N]: the policy's log-probs of the completion tokens (with gradient); advantages [S]; sequence [N]:
    index into advantages; old_logps [N]: the sampling policy's (None: on-policy, r = 1 with gradient);
    ref_logps [N]: the reference's, needed when settings.beta > 0."""
    if settings.beta != 0.0 and ref_logps is None:
        raise ValueError("grpo: beta > 0 needs the reference's log-probs (ref_logps)")
    num_sequences = advantages.numel()
    adv = advantages.to(logps.dtype)[sequence]
    old_logps = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old_logps
    if settings.importance_sampling_level == "sequence":
        count = _per_sequence(torch.ones_like(logps), sequence, num_sequences).clamp(min=1.0)
        log_iw = (_per_sequence(log_ratio, sequence, num_sequences) / count)[sequence]
    else:
        log_iw = log_ratio
    ratio = torch.exp(log_iw)

    kind = settings.loss_type
    if kind == "cispo":
        per_token = -torch.clamp(ratio, max=settings.clip_high).detach() * adv * logps
    elif kind in CLIPPED:
        clipped = torch.clamp(ratio, 1 - settings.epsilon, 1 + settings.clip_high)
        capped = ratio if settings.delta is None else torch.clamp(ratio, max=settings.delta)
        per_token = -torch.min(capped * adv, clipped * adv)
    elif kind == "sapo":
        temperature = torch.where(adv > 0, settings.sapo_temperature_pos, settings.sapo_temperature_neg)
        per_token = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * adv
    else:  # vespo
        per_token = -_gamma_weights(log_ratio, adv, sequence, num_sequences, settings) * adv * logps

    metrics = {}
    if settings.beta != 0.0:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        if settings.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + settings.beta * kl
        metrics["kl"] = kl.detach().mean() if kl.numel() else kl.new_zeros(())

    total = per_token.sum()
    if kind in ("grpo", "sapo"):
        count = _per_sequence(torch.ones_like(per_token), sequence, num_sequences).clamp(min=1.0)
        loss = (_per_sequence(per_token, sequence, num_sequences) / count).sum() / max(totals.sequences, 1)
    elif kind == "bnpo":
        loss = total / max(per_token.numel(), 1) / totals.micro_batches
    elif kind == "dr_grpo":
        loss = total / (max(totals.sequences, 1) * settings.max_completion_length)
    elif kind == "luspo":
        loss = total / max(totals.sequences, 1)
    else:  # dapo, cispo, vespo
        loss = total / max(totals.tokens, 1)

    with torch.no_grad():
        mean = (lambda x: x.float().mean()) if per_token.numel() else (lambda x: per_token.new_zeros(()))
        if kind in CLIPPED:
            low = (ratio < 1 - settings.epsilon) & (adv < 0)
            high = (ratio > 1 + settings.clip_high) & (adv > 0)
            metrics.update({"clip_ratio/low": mean(low), "clip_ratio/high": mean(high),
                            "clip_ratio/region": mean(low | high)})
        elif kind == "cispo":
            metrics["clip_ratio/cispo"] = mean((ratio > settings.clip_high) & (adv > 0))
    return loss, metrics


def zero_advantage_fraction(zero_std: torch.Tensor, group_size: int) -> torch.Tensor:
    """Fraction of groups whose rewards were all equal (they contribute no policy gradient)."""
    return zero_std.view(-1, group_size).all(dim=1).float().mean()
