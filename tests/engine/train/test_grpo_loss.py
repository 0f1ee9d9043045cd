"""GRPO's loss against TRL's GRPOTrainer (the installed trl is the oracle), and the tensor functions' edge cases.

TRL is driven through its own pipeline on fixed data: a `rollout_func` hands it the prompts' and completions' token
ids, a reward function hands it the rewards, `_generate_and_score_completions` computes the advantages, the old
log-probs (num_iterations > 1) and the reference's (β > 0) with its HF model, and `_compute_loss` the loss, whose
gradient we take. qforge computes the same from the same checkpoint: its own model, fused per-token log-probs over
packed sequences, `group_advantages`, `grpo_loss`. The policy is moved off the reference before sampling and again
between scoring and the loss (an optimizer step of a multi-pass rollout), so KL, ratios and clipping all act.
"""
import threading
from pathlib import Path

import pytest
import torch

from qforge.engine.checkpoint import load_model
from qforge.engine.model import hf_key
from qforge.engine.train.grpo_loss import (LOSS_TYPES, LossSettings, StepTotals, combine_rewards, group_advantages,
                                           grpo_loss, soft_overlong_punishment, zero_advantage_fraction)
from qforge.engine.train.logps import pack_completions, token_logps
from qwen3_fixtures import qwen3_tokenizer_dir, save_hf_qwen3

G = 4
PROMPTS = {"p0": [5, 6, 7], "p1": [8, 9, 10, 11, 12], "p2": [13, 14]}
MAX_COMPLETION = 8
# group 0 mixed, group 1 all equal (no gradient, no NaN), group 2 mixed with a completion no reward scored
REWARDS = [1.0, 0.0, 0.5, 1.0, 0.3, 0.3, 0.3, 0.3, 0.0, 1.0, None, 0.0]


def _completions():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, MAX_COMPLETION + 1, (len(REWARDS),), generator=g)
    return [torch.randint(20, 500, (int(n),), generator=g).tolist() for n in lengths]


COMPLETIONS = _completions()
# every other completion ends in the pad id (which TRL counts as a stop like EOS): the rest are truncated
STOPPED = [c[:-1] + [0] if i % 2 else c for i, c in enumerate(COMPLETIONS)]
PROMPT_IDS = [ids for ids in PROMPTS.values() for _ in range(G)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_hf_qwen3(tmp_path_factory.mktemp("grpo") / "ckpt", seed=0)


def _perturb(named_params, seed: int, key=lambda name: name):
    """Moves every parameter by the same seeded noise on both sides (names in qforge's spelling)."""
    params = dict(named_params)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(params, key=key):
            params[name].add_(0.05 * torch.randn(params[name].shape, generator=g))


def _trl(checkpoint, tmp, settings: LossSettings, iterations: int, temperature: float, scale_rewards: str,
         mask_truncated: bool = False):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)  # an id inside the tiny vocabulary

    def rollout(prompts, trainer):
        return {"prompt_ids": [PROMPTS[p] for p in prompts], "logprobs": None,
                "completion_ids": STOPPED if mask_truncated else COMPLETIONS}

    def reward(prompts, completions, **kwargs):
        return REWARDS

    args = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=len(REWARDS), num_generations=G,
                      max_completion_length=MAX_COMPLETION, loss_type=settings.loss_type, beta=settings.beta,
                      epsilon=settings.epsilon, epsilon_high=settings.epsilon_high, delta=settings.delta,
                      importance_sampling_level=settings.importance_sampling_level, num_iterations=iterations,
                      temperature=temperature, scale_rewards=scale_rewards, report_to="none", use_cpu=True,
                      bf16=False, mask_truncated_completions=mask_truncated)
    trainer = GRPOTrainer(model=str(checkpoint), reward_funcs=reward, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": list(PROMPTS)}), rollout_func=rollout)
    model = trainer.model.train()
    named = {name.removeprefix("model."): p for name, p in model.named_parameters()}
    _perturb(named.items(), seed=10)
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    if iterations > 1:
        _perturb(named.items(), seed=11)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, batch["advantages"]


def _ours(checkpoint, settings: LossSettings, iterations: int, temperature: float, scale_rewards: str,
          mask_truncated: bool = False):
    policy = load_model(checkpoint, dtype=torch.float32)
    _perturb(policy.named_parameters(), seed=10)
    completions = STOPPED if mask_truncated else COMPLETIONS
    scored = [not mask_truncated or c[-1] == 0 for c in completions]
    packed, positions, sequence = pack_completions(PROMPT_IDS, completions, scored)
    rewards = torch.tensor([float("nan") if r is None else r for r in REWARDS])[:, None]
    advantages, _ = group_advantages(combine_rewards(rewards), G, scale_rewards)
    old = ref = None
    if iterations > 1:
        with torch.no_grad():
            old = token_logps(policy, packed, temperature=temperature)[positions]
        _perturb(policy.named_parameters(), seed=11)
    if settings.beta:
        reference = load_model(checkpoint, dtype=torch.float32)
        with torch.no_grad():
            ref = token_logps(reference, packed, temperature=temperature)[positions]
    logps = token_logps(policy, packed, temperature=temperature)[positions]
    totals = StepTotals(sequences=len(completions), tokens=len(sequence))
    loss, metrics = grpo_loss(logps, advantages, sequence, totals, settings, old_logps=old, ref_logps=ref)
    loss.backward()
    return loss.detach(), {hf_key(name): p.grad for name, p in policy.named_parameters()}, advantages, metrics


def parity(checkpoint, tmp, settings: LossSettings, iterations: int = 1, temperature: float = 1.0,
           scale_rewards: str = "group", mask_truncated: bool = False) -> tuple[float, float, float]:
    """(|Δ loss|, max |Δ grad| over every parameter, max |Δ advantage|) between TRL and qforge."""
    trl_loss, trl_grads, trl_adv = _trl(checkpoint, tmp, settings, iterations, temperature, scale_rewards,
                                        mask_truncated)
    loss, grads, adv, _ = _ours(checkpoint, settings, iterations, temperature, scale_rewards, mask_truncated)
    assert set(grads) == set(trl_grads)
    assert all(g is not None and bool(g.abs().sum() > 0) for g in trl_grads.values())
    grad_diff = max(float((grads[n] - trl_grads[n]).abs().max()) for n in grads)
    return float((loss - trl_loss).abs()), grad_diff, float((adv - trl_adv).abs().max())


def _settings(loss_type: str, beta: float, **extra) -> LossSettings:
    return LossSettings(loss_type=loss_type, beta=beta, max_completion_length=MAX_COMPLETION, **extra)


@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_every_gradient_match_trl(checkpoint, tmp_path, loss_type, beta, iterations):
    loss_diff, grad_diff, adv_diff = parity(checkpoint, tmp_path, _settings(loss_type, beta), iterations)
    assert adv_diff < 1e-6
    assert loss_diff < 1e-5 and grad_diff < 1e-5, (loss_diff, grad_diff)


@pytest.mark.parametrize("options, temperature, scale_rewards", [
    (dict(epsilon=0.1, epsilon_high=0.28, delta=1.05), 0.7, "none"),
    (dict(importance_sampling_level="sequence"), 1.0, "batch"),
])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_variants_match_trl(checkpoint, tmp_path, loss_type, options, temperature, scale_rewards):
    """DAPO's asymmetric clip with a two-sided cap, sampling temperature, unscaled and batch-scaled advantages,
    GSPO's sequence-level ratio: still TRL's numbers."""
    loss_diff, grad_diff, adv_diff = parity(checkpoint, tmp_path, _settings(loss_type, 0.04, **options), 2,
                                            temperature, scale_rewards)
    assert adv_diff < 1e-6
    assert loss_diff < 1e-5 and grad_diff < 1e-5, (loss_diff, grad_diff)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_mask_truncated_completions_matches_trl(checkpoint, tmp_path, loss_type):
    """TRL's mask_truncated_completions: a completion that ends in no stop id trains on none of its tokens, yet
    counts in its group's advantages and in the per-completion normalisers (grpo, dr_grpo, luspo)."""
    loss_diff, grad_diff, adv_diff = parity(checkpoint, tmp_path, _settings(loss_type, 0.04), 2,
                                            mask_truncated=True)
    assert adv_diff < 1e-6
    assert loss_diff < 1e-5 and grad_diff < 1e-5, (loss_diff, grad_diff)


def test_soft_overlong_punishment_is_trls_reward():
    from trl.rewards import get_soft_overlong_punishment

    for max_length, cache in [(16, 4), (16, 16), (100, 20), (7, 1)]:
        lengths = list(range(1, max_length + 3))
        expected = get_soft_overlong_punishment(max_length, cache)([[1] * n for n in lengths])
        ours = soft_overlong_punishment(torch.tensor(lengths), max_length, cache)
        torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert soft_overlong_punishment(torch.tensor([80, 90, 100]), 100, 20).tolist() == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="soft_punish_cache=0"):
        soft_overlong_punishment(torch.tensor([1]), 16, 0)


def _two_ranks(halves, scale, aggregation):
    """group_advantages on two threads standing for two ranks, `reduce` an all-reduce sum between them."""
    barrier, posted, out = threading.Barrier(2), [None, None], [None, None]

    def rank(r):
        def reduce(tensor):
            posted[r] = tensor.clone()
            barrier.wait()
            total = posted[0] + posted[1]
            barrier.wait()  # both have read before either posts its next value
            return total
        out[r] = group_advantages(halves[r], G, scale, aggregation, reduce=reduce)[0]

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return torch.cat(out)


@pytest.mark.parametrize("scale, aggregation", [("batch", "sum_then_normalize"), ("group", "normalize_then_sum")])
def test_batch_statistics_are_over_every_rank(scale, aggregation):
    """scale_rewards="batch" (and normalize_then_sum) divide by the std of the whole step's rewards, as TRL over
    its gathered rewards: two ranks' halves, reduced over both, give the single process's advantages."""
    rewards = torch.tensor([float("nan") if r is None else r for r in REWARDS])
    halves = [rewards[:4], rewards[4:]]  # rank 0: one group, rank 1: two (one with an unscored completion)
    whole, _ = group_advantages(rewards, G, scale, aggregation)
    torch.testing.assert_close(_two_ranks(halves, scale, aggregation), whole, rtol=0, atol=1e-6)
    local = torch.cat([group_advantages(h, G, scale, aggregation)[0] for h in halves])
    assert (local - whole).abs().max() > 1e-2  # each rank's own statistics are another number


def test_all_equal_group_gives_zero_advantage_and_no_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, float("nan"), 1.0])
    for scale in ("group", "none"):
        advantages, zero_std = group_advantages(rewards, 4, scale)
        assert torch.isfinite(advantages).all()
        assert advantages[:4].eq(0).all() and advantages[6] == 0
        assert float(zero_advantage_fraction(zero_std, 4)) == 0.5
    logps = torch.randn(8, requires_grad=True)
    loss, _ = grpo_loss(logps, torch.zeros(2), torch.tensor([0] * 4 + [1] * 4), StepTotals(2, 8),
                        LossSettings(loss_type="grpo"))
    loss.backward()
    assert float(loss) == 0.0 and logps.grad.eq(0).all()


def test_clip_metrics_count_clipped_tokens():
    """r = e^{±0.5} is outside [0.8, 1.2]: the low clip counts tokens with A < 0 and r < 0.8, the high clip
    tokens with A > 0 and r > 1.2."""
    logps = torch.tensor([0.5, -0.5, 0.5, -0.5]) - 1.0
    old = torch.full((4,), -1.0)
    _, metrics = grpo_loss(logps, torch.tensor([1.0, -1.0]), torch.tensor([0, 0, 1, 1]), StepTotals(2, 4),
                           LossSettings(), old_logps=old)
    assert float(metrics["clip_ratio/high"]) == 0.25 and float(metrics["clip_ratio/low"]) == 0.25


@pytest.mark.parametrize("bad, message", [
    (dict(loss_type="ppo"), "loss_type"), (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(importance_sampling_level="group"), "importance_sampling_level"), (dict(beta=-1.0), "beta")])
def test_bad_settings_name_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        LossSettings(**bad)


def test_group_size_and_missing_reference_are_errors():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(6), 1)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(torch.zeros(2), torch.zeros(1), torch.zeros(2, dtype=torch.long), StepTotals(1, 2),
                  LossSettings(beta=0.1))
