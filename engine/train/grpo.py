"""GRPO (Group Relative Policy Optimization) as a trainer objective (objective.py), on grpo_loss.py's losses.

Each optimizer step: the step's prompts (packed by G × (prompt + max_new_tokens) tokens, so a micro-batch's
sampled sequences fit data.max_tokens) → G completions each, sampled from the current weights with the engine's
batched KV-cache generation (over the kept vocabulary when vocab.restrict prunes it: the head computes only
those rows) → rewards (the callable the recipe passes: the engine knows no reward) → group advantages → the
clipped policy-gradient loss on per-token log-probs through the fused head (logps.py), with β·k3 KL to a frozen
copy of the starting weights when β > 0. Sampling is seeded by the micro-batches' places in the epoch's packing
and their prompts (the data cursor restores both), so a resumed run draws the same completions.

num_iterations > 1 (several optimisation passes per rollout batch, PPO-style): a step that generates also keeps
the sampling policy's log-probs ("old"); the next num_iterations − 1 steps train on the same rollouts (their own
micro-batches are not sampled) with r = exp(logp − old). The rollouts and the pass counter are the objective's
checkpoint state (`state_dict`), so a resume at any step continues exactly.

Overlong completions (DAPO, TRL): `mask_truncated_completions` trains on no token of a completion that hit
max_new_tokens without <|im_end|> (it still counts in its group's rewards); `soft_punish_cache` > 0 adds DAPO's
soft overlong punishment as one more reward (`soft_overlong_punishment`, weight `soft_punish_weight`).
With train.batch_size (prompts per step) a rank short of micro-batches gets a `filler`: one prompt with a
one-token completion, trained on with no supervised token, so every rank runs the same forwards.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..data.prompts import Prompt, PromptBatch, load_prompts
from ..errors import DataError
from ..generate import gathered, generate
from ..model import bind_forward_method
from .build import build_frozen, frozen_dtype
from .distill import pack_whole
from .grpo_loss import (LossSettings, StepTotals, combine_rewards, group_advantages, grpo_loss,
                        soft_overlong_punishment)
from .logps import pack_completions, token_logps
from .objective import Step
from .parallel import shard_model
from .sft import loss_tables

log = logging.getLogger("qforge.train.grpo")
LOGPS = "grpo_token_logps"  # the policy's (and reference's) forward method: per-token log-probs
OVERLONG = "soft_overlong_punishment"  # the reward column of soft_punish_cache (TRL's reward function's name)


@dataclass(frozen=True, eq=False)
class FillerBatch(PromptBatch):
    """A micro-batch that evens out the ranks' counts under train.batch_size: it runs the forwards and backward
    of a real one and adds nothing (see GRPO.filler)."""


@dataclass
class RolloutBatch:
    """One micro-batch of sampled completions with what the loss needs beside the policy's log-probs."""
    packed: object  # PackedBatch: prompt + completion sequences
    positions: torch.Tensor  # [N] the scored completion tokens' places in packed
    sequence: torch.Tensor  # [N] which completion each belongs to
    advantages: torch.Tensor  # [S]
    old: torch.Tensor | None = None  # [N] the sampling policy's log-probs (num_iterations > 1)
    filler: bool = False


@dataclass
class Rollouts:
    """A step's sampled completions, per micro-batch, and the rollout's metric sums over this rank."""
    batches: list[RolloutBatch]
    metrics: dict  # sums over this rank: see GRPO._rollout
    seconds: float
    tokens: int


class GRPO:
    """`rewards(completions: list[str], rows: list[dict])` returns scores with `.values` ([S, F] float, NaN where a
    reward gave none) and `.errors` ({name: count}); it has `.names` and `.weights` (recipes/rewards.RewardSet)."""

    def __init__(self, rewards: Callable, settings: LossSettings = LossSettings(), num_generations: int = 8,
                 num_iterations: int = 1, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 scale_rewards: str = "group", reward_aggregation: str = "sum_then_normalize",
                 enable_thinking: bool | str | None = None, gather_for_sampling: bool = False,
                 mask_truncated_completions: bool = False, soft_punish_cache: int = 0,
                 soft_punish_weight: float = 1.0):
        if num_generations < 2:
            raise ValueError(f"grpo.num_generations={num_generations}: a group needs ≥ 2 completions per prompt "
                             "(its advantages are relative to the group)")
        if num_iterations < 1 or max_new_tokens < 1 or temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError("grpo: num_iterations ≥ 1, max_new_tokens ≥ 1, temperature > 0, 0 < top_p ≤ 1")
        if not 0 <= soft_punish_cache <= max_new_tokens:
            raise ValueError(f"grpo.soft_punish_cache={soft_punish_cache}: expected 0 (off) up to "
                             f"grpo.max_new_tokens={max_new_tokens}")
        self.rewards, self.settings, self.group = rewards, settings, num_generations
        self.num_iterations, self.max_new_tokens = num_iterations, max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.scale_rewards, self.aggregation = scale_rewards, reward_aggregation
        self.enable_thinking, self.gather_for_sampling = enable_thinking, gather_for_sampling
        self.template, self.reference, self.tables, self.output_ids = None, None, {}, None
        self.mask_truncated, self.soft_punish_cache = mask_truncated_completions, soft_punish_cache
        self.names = list(rewards.names) + ([OVERLONG] if soft_punish_cache else [])  # the reward columns
        self.weights = torch.cat([rewards.weights.float(), torch.tensor([soft_punish_weight] if soft_punish_cache
                                                                        else [], dtype=torch.float32)])
        self._rollouts, self._pass, self._world = None, 0, 1

    # --- data ---------------------------------------------------------------------------------------------------
    def check_inputs(self, config):
        pass  # prompts and rewards are checked when read (load_data) and built (the recipe)

    def trained_settings(self) -> dict:
        return {"grpo.rewards": list(self.rewards.names), "grpo.beta": self.settings.beta}

    def filler(self, item: Prompt, max_tokens: int) -> FillerBatch:
        """train.batch_size's filler (objective.py): `item` with a one-token completion, no token scored."""
        return FillerBatch([item], 0)

    # --- checkpoint state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's rollouts and pass counter: a resume between the passes of one rollout batch
        (num_iterations > 1) trains on the same samples and old log-probs."""
        return {"pass": self._pass, "world": self._world,
                "rollouts": self._rollouts if self._pass % self.num_iterations else None}

    def load_state_dict(self, state: dict, world: int) -> None:
        """Restores `state_dict`; rollouts saved by another number of ranks cannot be dealt again: the resumed
        step samples anew (logged)."""
        if state.get("rollouts") is not None and state.get("world") != world:
            log.warning("grpo: the checkpoint was written by %s ranks, this run has %d: its rollout batch (pass %d "
                        "of %d) is sampled anew", state.get("world"), world, state["pass"] % self.num_iterations,
                        self.num_iterations)
            return
        self._pass, self._rollouts = int(state["pass"]), state.get("rollouts")

    def load_data(self, config, template, dist_):
        self.template = template
        datasets = [self._prompts(path, config, template) for path in config.data.train]
        if not any(datasets):
            raise DataError(f"{', '.join(config.data.train)}: no prompts (GRPO rows have `messages` ending in a user "
                            "turn, or in an assistant turn taken as the reference answer)")
        fingerprint = {"prompts": hashlib.sha256(b"".join(p.prompt_ids.tobytes() + b"\0" for d in datasets
                                                          for p in d)).hexdigest()[:32],
                       "weights": config.data.weights, "max_tokens": config.data.max_tokens,
                       "max_new_tokens": self.max_new_tokens, "num_generations": self.group,
                       "seed": config.train.seed}
        return datasets, [p for path in config.data.eval for p in self._prompts(path, config, template)], fingerprint

    def _prompts(self, path, config, template) -> list[Prompt]:
        """A Prompt per row (`load_prompts`): messages ending in a user turn, or in the reference assistant answer;
        the row stays with it for the rewards. A row's own `enable_thinking` decides its rendering; rows without
        one take this objective's `enable_thinking`, by default data.enable_thinking."""
        thinking = config.data.enable_thinking if self.enable_thinking is None else self.enable_thinking
        return load_prompts(path, template, self.max_new_tokens, fmt=config.data.format,
                            max_row_bytes=config.data.max_row_bytes, enable_thinking=thinking,
                            copies=self.group, require_reference=False)

    def pack(self, items, max_tokens: int, seed: int = 0, *, overlong: str = "truncate", loss_weighting: str = "token",
             vocab=None):
        """Prompts packed by G × (prompt + max_new_tokens); each micro-batch seeded by its place in the packing
        and by its prompts (under train.batch_size every step of an epoch packs with the same seed: places alone
        would replay the same random streams step after step)."""
        return pack_whole(items, max_tokens, seed, lambda group, position: PromptBatch(group, _batch_seed(
            seed, position, group)))

    # --- models ---------------------------------------------------------------------------------------------------
    def prepare(self, model, config, vocab, dist_, autocast):
        """The kept-vocabulary tables (loss and sampling), the log-prob forward method, and the frozen reference
        (the starting weights, in the compute dtype, sharded like the policy) when β > 0."""
        self.tables = loss_tables(vocab, dist_.device)
        if vocab is not None:  # the policy samples only what its output head is trained on
            self.output_ids = vocab.kept_ids[~torch.isin(vocab.kept_ids, vocab.suppress_ids)].tolist()
        bind_forward_method(model, LOGPS, token_logps)
        if self.settings.beta > 0:
            shard = (lambda m: shard_model(m, None, dist_.device)) if dist_.enabled else None
            self.reference = build_frozen(config.model, frozen_dtype(config.train.precision), dist_.device, shard)
            bind_forward_method(self.reference, LOGPS, token_logps)

    @torch.no_grad()
    def sample(self, model, batches: Sequence[PromptBatch], copies: int, greedy: bool) -> list[list[list[int]]]:
        """`copies` completions of every prompt of `batches` (token ids, through <|im_end|> when it was produced),
        in one generation call; row j of micro-batch b samples from seed `b.seed · 2¹⁶ + j` (consecutive
        micro-batch seeds would otherwise share all but one row's random stream), so a micro-batch draws the same
        completions whichever rank samples it, with whichever others."""
        was_training = model.training
        model.eval()
        prompts = [p.prompt_ids.tolist() for b in batches for p in b.prompts for _ in range(copies)]
        with gathered(model) if self.gather_for_sampling else contextlib.nullcontext():
            completions = generate(model, prompts, max_new_tokens=self.max_new_tokens,
                                   temperature=0.0 if greedy else self.temperature, top_p=self.top_p,
                                   stop_ids=[self.template.eos_id], output_ids=self.output_ids,
                                   seed=[(b.seed << 16) + j for b in batches
                                         for j in range(copies * len(b.prompts))])
        model.train(was_training)
        completions = [c + [self.template.eos_id] if len(c) < self.max_new_tokens else c for c in completions]
        out, start = [], 0
        for b in batches:
            out.append(completions[start:start + copies * len(b.prompts)])
            start += copies * len(b.prompts)
        return out

    def score(self, batches: Sequence[PromptBatch], completions, copies: int):
        """(rewards [S, F], errors) of the completions, each with its prompt's row."""
        texts = [self.template.tokenizer.decode([t for t in c if t != self.template.eos_id])
                 for per_batch in completions for c in per_batch]
        rows = [p.row for b in batches for p in b.prompts for _ in range(copies)]
        scores = self.rewards(texts, rows)
        return scores.values.float(), scores.errors

    # --- training -------------------------------------------------------------------------------------------------
    def train_step(self, model, micro_batches, dist_, vocab, autocast) -> Step:
        self._world = dist_.world
        if self._rollouts is None or self._pass % self.num_iterations == 0:
            self._rollouts = self._rollout(model, micro_batches, dist_, autocast)
        self._pass += 1
        rollouts = self._rollouts
        started = time.perf_counter()
        real = [b for b in rollouts.batches if not b.filler]
        counts = torch.tensor([sum(len(b.advantages) for b in real), sum(len(b.positions) for b in real), len(real)],
                              dtype=torch.float64, device=dist_.device)
        sequences, tokens, batches = dist_.all_reduce_sum(counts).tolist()
        totals = StepTotals(int(sequences), int(tokens), int(batches))
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist_.device)
        sums = {}  # token-weighted sums of grpo_loss's metrics
        for batch in rollouts.batches:
            loss, metrics = self._loss(model, batch, totals, dist_, autocast)
            (loss * dist_.world).backward()  # FSDP averages gradients over ranks
            loss_sum += loss.detach().double()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value.double() * len(batch.positions)
        names = sorted(sums)
        reduced = dist_.all_reduce_sum(torch.stack([loss_sum] + [sums[n] for n in names]).to(dist_.device)).tolist()
        train_s = time.perf_counter() - started
        metrics = {**{n: v / max(tokens, 1) for n, v in zip(names, reduced[1:])}, **self._rollout_metrics(
            rollouts, dist_), "train_s": train_s}
        return Step(reduced[0], 1.0, metrics, [b.packed for b in rollouts.batches])

    def _loss(self, model, batch: RolloutBatch, totals: StepTotals, dist_, autocast):
        """(the micro-batch's share of the step loss, its metrics) with the policy's log-probs (and the
        reference's when β > 0)."""
        packed = batch.packed.to(dist_.device)
        positions, sequence = batch.positions.to(dist_.device), batch.sequence.to(dist_.device)
        reference = None
        if self.reference is not None:
            with torch.no_grad():
                reference = self._logps(self.reference, packed, positions, autocast).float()
        logps = self._logps(model, packed, positions, autocast)
        old = None if batch.old is None else batch.old.to(dist_.device)
        return grpo_loss(logps, batch.advantages.to(dist_.device), sequence, totals, self.settings, old_logps=old,
                         ref_logps=reference)

    def _logps(self, model, packed, positions: torch.Tensor, autocast) -> torch.Tensor:
        """`model`'s per-token log-probs of the scored completion tokens (at the sampling temperature, over the
        kept vocabulary)."""
        with autocast():
            return model.grpo_token_logps(packed, temperature=self.temperature, **self.tables)[positions]

    def _rollout(self, model, micro_batches, dist_, autocast) -> Rollouts:
        """Samples the step's completions, scores them, and turns them into packed micro-batches with their
        advantages (and the sampling policy's log-probs when they are trained on more than once). Filler
        micro-batches are not sampled (unless a rank has nothing else: generation runs on every rank)."""
        started = time.perf_counter()
        real = [b for b in micro_batches if not isinstance(b, FillerBatch)]
        sampled = self.sample(model, real or micro_batches[:1], self.group if real else 1, greedy=False)
        completions = sampled if real else []
        seconds = time.perf_counter() - started
        flat = [c for per_batch in completions for c in per_batch]
        truncated = [len(c) == self.max_new_tokens and c[-1] != self.template.eos_id for c in flat]
        values, errors = self.score(real, completions, self.group) if real else (
            torch.zeros(0, len(self.rewards.names)), {})
        if self.soft_punish_cache:
            lengths = torch.tensor([len(c) for c in flat], dtype=torch.float64)
            values = torch.cat([values, soft_overlong_punishment(lengths, self.max_new_tokens,
                                                                 self.soft_punish_cache).float()[:, None]], 1)
        rewards = combine_rewards(values, self.weights, self.group, self.aggregation)
        reduce = lambda t: dist_.all_reduce_sum(t.to(dist_.device)).cpu()  # noqa: E731
        advantages, zero_std = group_advantages(rewards, self.group, self.scale_rewards, self.aggregation, reduce)
        batches, per_batch = [], iter(completions)
        for batch in micro_batches:
            filler = isinstance(batch, FillerBatch)
            prompts = [p.prompt_ids.tolist() for p in batch.prompts for _ in range(1 if filler else self.group)]
            taken = [[self.template.eos_id]] * len(prompts) if filler else next(per_batch)
            start = sum(len(b.advantages) for b in batches)
            scored = [not filler and not (self.mask_truncated and truncated[start + i]) for i in range(len(taken))]
            packed, positions, sequence = pack_completions(prompts, taken, scored)
            old = None
            if self.num_iterations > 1:
                with torch.no_grad():
                    old = self._logps(model, packed.to(dist_.device), positions.to(dist_.device),
                                      autocast).float().cpu()
            batches.append(RolloutBatch(packed, positions, sequence, advantages[start:start + len(taken)]
                                        if not filler else advantages[:0], old, filler))
        return Rollouts(batches, self._rollout_sums(flat, truncated, values, errors, rewards, zero_std), seconds,
                        sum(len(c) for c in flat))

    def _rollout_sums(self, completions, truncated, values, errors, rewards, zero_std) -> dict:
        """This rank's sums of the rollout metrics (see _rollout_metrics)."""
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
        scored = ~torch.isnan(values)
        clean = torch.nan_to_num(values.double())
        sums = {"completions": float(len(lengths)), "groups": float(len(lengths) // self.group),
                "zero_advantage_groups": float(zero_std.view(-1, self.group).all(dim=1).sum()),
                "reward": float(torch.nan_to_num(rewards.double()).sum()), "reward_sq": float(
                    torch.nan_to_num(rewards.double()).pow(2).sum()), "length": float(lengths.sum()),
                "truncated": float(sum(truncated))}
        for j, name in enumerate(self.names):
            sums[f"{name}/n"] = float(scored[:, j].sum())
            sums[f"{name}/sum"] = float(clean[:, j].sum())
            sums[f"{name}/sq"] = float(clean[:, j].pow(2).sum())
            sums[f"{name}/errors"] = float(errors.get(name, 0))
        sums["length_max"] = float(lengths.max()) if len(lengths) else 0.0
        return sums

    def _rollout_metrics(self, rollouts: Rollouts, dist_) -> dict:
        """Reward mean/std per function and combined, errors, zero-advantage fraction, completion lengths,
        rollout time and tokens/s, over all ranks (`completion_length/max`: this rank's)."""
        keys = sorted(k for k in rollouts.metrics if k != "length_max")
        values = dist_.all_reduce_sum(torch.tensor([rollouts.metrics[k] for k in keys] + [rollouts.seconds],
                                                   dtype=torch.float64, device=dist_.device)).tolist()
        s = dict(zip(keys, values))
        seconds = values[-1] / dist_.world  # ranks sample at once: the mean rank's time
        n = max(s["completions"], 1.0)
        std = lambda total, sq, count: math.sqrt(max(sq / count - (total / count) ** 2, 0.0) * count / max(count - 1, 1))
        out = {"reward": s["reward"] / n, "reward_std": std(s["reward"], s["reward_sq"], n),
               "zero_advantage_fraction": s["zero_advantage_groups"] / max(s["groups"], 1.0),
               "completion_length/mean": s["length"] / n, "completion_length/max": rollouts.metrics["length_max"],
               "completion_truncated": s["truncated"] / n, "rollout_s": seconds,
               "rollout_tokens_per_s": s["length"] / max(seconds, 1e-9)}
        for name in self.names:
            count = s[f"{name}/n"]
            out[f"rewards/{name}/mean"] = s[f"{name}/sum"] / count if count else float("nan")
            out[f"rewards/{name}/std"] = std(s[f"{name}/sum"], s[f"{name}/sq"], count) if count else 0.0
            out[f"rewards/{name}/errors"] = s[f"{name}/errors"]
        return out

    @torch.no_grad()
    def evaluate(self, model, batches, dist_, vocab, autocast) -> dict:
        """Mean reward of one greedy completion per held-out prompt (per function and combined); ranks take turns
        and run equally many generations."""
        names = list(self.rewards.names)
        sums = torch.zeros(2 * len(names) + 2, dtype=torch.float64)
        for r in range(math.ceil(len(batches) / dist_.world)):
            index = r * dist_.world + dist_.rank
            batch = batches[min(index, len(batches) - 1)]
            completions = self.sample(model, [batch], 1, greedy=True)
            if index >= len(batches):
                continue
            values, _ = self.score([batch], completions, 1)
            rewards = combine_rewards(values, self.rewards.weights)
            scored = ~torch.isnan(values)
            sums += torch.tensor([*torch.nan_to_num(values.double()).sum(0).tolist(), *scored.sum(0).tolist(),
                                  float(torch.nan_to_num(rewards.double()).sum()), float(len(rewards))],
                                 dtype=torch.float64)
        sums = dist_.all_reduce_sum(sums.to(dist_.device)).tolist()
        out = {"eval_reward": sums[-2] / max(sums[-1], 1.0)}
        for j, name in enumerate(names):
            out[f"eval_rewards/{name}"] = sums[j] / sums[len(names) + j] if sums[len(names) + j] else float("nan")
        return out


def _batch_seed(seed: int, position: int, prompts: Sequence[Prompt]) -> int:
    digest = hashlib.blake2b(b"".join(p.prompt_ids.tobytes() + b"\0" for p in prompts), digest_size=4).digest()
    return (seed * 1_000_003 + position + int.from_bytes(digest, "little")) % 2**31
