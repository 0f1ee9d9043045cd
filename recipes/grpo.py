"""Online RL after SFT: GRPO with verifiable (and LLM-judge) rewards, on the same trainer as recipes/fft.py.

    qforge grpo --config grpo                                             # CPU demo: after `make demo`
    python recipes/grpo.py --config recipes/configs/grpo.yaml model.path=outputs/sft/final data.train=[prompts.jsonl]
    torchrun --nproc_per_node=8 recipes/grpo.py --config ... grpo.gather_for_sampling=true

Rows: `messages` ending in a user turn (or in an assistant turn, taken as the reference answer), plus whatever
the rewards read (e.g. `answer` for numeric/math/choice). Each step samples grpo.num_generations completions per
prompt from the current weights, scores them with grpo.rewards (names of recipes/rewards.py's REWARDS, `judge`,
or your own `module:function`; weighted by grpo.reward_weights), and takes a clipped policy-gradient step on
the group-relative advantages (grpo.loss_type, epsilon/epsilon_high, beta > 0 adds KL to the starting weights).
With `evaluate.data`, greedy exact match before and after (as the fft recipe). A judge endpoint that stays down
stops the run (exit 6) after its retries; `train.resume=auto` continues from the last checkpoint.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from qforge.engine.config_io import read_yaml, settings
from qforge.engine.errors import ConfigError
from qforge.engine.serve.client import ChatClient
from qforge.engine.train.grpo import GRPO
from qforge.engine.train.grpo_loss import AGGREGATIONS, LOSS_TYPES, SCALE_REWARDS, LossSettings
from qforge.recipes.common.cli import run_recipe
from qforge.recipes.common.endpoint import ClientSettings, EndpointSettings
from qforge.recipes.fft import FFTRecipeConfig
from qforge.recipes.fft import run as run_stages
from qforge.recipes.judge import JudgePrompts
from qforge.recipes.main import CONFIGS
from qforge.recipes.rewards import JUDGE, JudgeReward, RewardSet


@settings
class GRPOJudgeSettings:
    """The `judge` reward's endpoint (an OpenAI-compatible server: base_url + model) and its 1..10 rating prompts
    (default: recipes/configs/judge.yaml's single_* prompts)."""
    endpoint: EndpointSettings | None = None
    prompts: JudgePrompts | None = None
    retries: Annotated[int, Field(ge=0)] = 2  # re-asks after a reply without a verdict
    max_tokens: Annotated[int, Field(ge=1)] = 1024


@settings
class GRPOSettings:
    num_generations: Annotated[int, Field(ge=2)] = 8  # completions per prompt (one group)
    rewards: list[str] = field(default_factory=lambda: ["numeric"])  # registry names, "judge", or module:function
    reward_weights: list[float] | None = None  # one per reward (default 1 each)
    reward_aggregation: Literal[AGGREGATIONS] = "sum_then_normalize"
    loss_type: Literal[LOSS_TYPES] = "dapo"
    beta: Annotated[float, Field(ge=0)] = 0.0  # KL (k3) weight to the starting weights; 0: no reference model
    epsilon: Annotated[float, Field(ge=0)] = 0.2  # clip ε low
    epsilon_high: Annotated[float, Field(ge=0)] | None = None  # clip ε high (DAPO: 0.28); default ε low
    scale_rewards: Literal[SCALE_REWARDS] = "group"  # divide advantages by the group's std, the batch's, or not
    num_iterations: Annotated[int, Field(ge=1)] = 1  # optimisation passes per rollout batch
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_new_tokens: Annotated[int, Field(ge=1)] = 128
    mask_truncated_completions: bool = False  # no loss on a completion cut at max_new_tokens (TRL's option)
    soft_punish_cache: Annotated[int, Field(ge=0)] = 0  # DAPO's soft overlong punishment over the last N tokens
    soft_punish_weight: float = 1.0  # its weight among the rewards
    gather_for_sampling: bool = False  # FSDP: sample with the policy gathered (see engine/generate.gathered)
    judge: GRPOJudgeSettings = field(default_factory=GRPOJudgeSettings)


@settings
class GRPOConfig(FFTRecipeConfig):
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    client: ClientSettings = field(default_factory=ClientSettings)  # the judge reward's requests


def judge_reward(config: GRPOConfig) -> JudgeReward:
    """The judge reward's client (cached in output.dir/judge-cache unless client.cache_dir: a resumed run does
    not pay twice) and prompts."""
    judge = config.grpo.judge
    if judge.endpoint is None or judge.endpoint.base_url is None:
        raise ConfigError("reward 'judge' needs grpo.judge.endpoint.base_url and .model (an OpenAI-compatible "
                          "server, e.g. `qforge serve --model DIR` or vLLM)")
    prompts = judge.prompts or JudgePrompts(**read_yaml(CONFIGS / "judge.yaml")["judge"]["prompts"])
    options = {**asdict(config.client), "cache_dir": config.client.cache_dir or str(Path(config.output.dir) /
                                                                                      "judge-cache")}
    try:
        client = ChatClient(judge.endpoint.base_url, judge.endpoint.model, api_key_env=judge.endpoint.api_key_env,
                            **options)
    except ValueError as error:
        raise ConfigError(f"grpo.judge.endpoint: {error}") from None
    return JudgeReward(client, prompts.single_system, prompts.single_user, prompts.single_user_reference,
                       prompts.retry, judge.retries, {"max_tokens": judge.max_tokens, "temperature": 0.0})


def objective_for(config: GRPOConfig) -> GRPO:
    s = config.grpo
    rewards = RewardSet(s.rewards, s.reward_weights, judge_reward(config) if JUDGE in s.rewards else None)
    try:
        loss = LossSettings(loss_type=s.loss_type, beta=s.beta, epsilon=s.epsilon, epsilon_high=s.epsilon_high,
                            max_completion_length=s.max_new_tokens)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if s.soft_punish_cache > s.max_new_tokens:
        raise ConfigError(f"grpo.soft_punish_cache={s.soft_punish_cache} is more than grpo.max_new_tokens="
                          f"{s.max_new_tokens}: the punishment starts max_new_tokens − soft_punish_cache tokens in")
    return GRPO(rewards, loss, s.num_generations, s.num_iterations, s.max_new_tokens, s.temperature, s.top_p,
                s.scale_rewards, s.reward_aggregation, config.data.enable_thinking, s.gather_for_sampling,
                s.mask_truncated_completions, s.soft_punish_cache, s.soft_punish_weight)


def run(config: GRPOConfig) -> int:
    objective = objective_for(config)  # a wrong reward name or judge fails before any data is read
    return run_stages([config], lambda _: objective)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(GRPOConfig, run, argv, __doc__, "grpo.num_generations=8 train.max_steps=50",
                      report=lambda _, code: code)


if __name__ == "__main__":
    sys.exit(main())
