"""GRPO rewards: `reward(completion, row) -> float` functions with registry names, weighted into one score.

Each registered reward is a verifier of recipes/verifiers (the interface synthesis and evaluation use) read as
its score in [0, 1], plus `format` (a think block that was opened is closed and a final answer is there). A
user's own reward is named `module:function` (same signature). The LLM judge needs an endpoint, so it is built
from one (`JudgeReward`) and scores a whole batch: the same client as the judge recipe (cached, retried,
bounded by its concurrency and timeout), the rating 1..10 mapped to [0, 1].

`RewardSet` scores a rollout batch with several rewards: [S, F] values, NaN where a reward raised (counted per
reward, logged, never fatal) or the judge gave no verdict after its re-asks; grpo_loss.combine_rewards
weights them (a completion no reward scored gets advantage 0). A judge endpoint that fails for good is not a
reward's error: it stops the step with an EndpointError (the run resumes from its last checkpoint).
"""
from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qforge.engine.serve.client import ChatClient, ChatReply
from qforge.engine.errors import ConfigError, EndpointError
from qforge.engine.thinking import THINK_CLOSE, THINK_OPEN, split_think
from qforge.recipes.sft_data.answers import final_answer_text
from qforge.recipes.sft_data.filters import Malformed
from qforge.recipes.sft_data.stages import Usage, ask_all, conversation
from qforge.recipes.evals.verdicts import parse_rating
from qforge.recipes.verifiers import get_verifier

log = logging.getLogger("qforge.rewards")
Reward = Callable[[str, dict], float]
JUDGE = "judge"


def verifier_reward(name: str) -> Reward:
    """The verifier's score (1 pass, 0 fail or no readable answer; code: the fraction of tests passed)."""
    verifier = get_verifier(name)

    def reward(completion: str, row: dict) -> float:
        return verifier(completion, row).score

    reward.__name__ = name
    return reward


def format_reward(completion: str, row: dict) -> float:
    """1 when a `<think>` the completion opened is closed and the answer after it has a final answer
    (\\boxed{}, "Answer:"/"Đáp án:"); else 0."""
    if THINK_OPEN in completion and THINK_CLOSE not in completion.split(THINK_OPEN)[-1]:
        return 0.0
    return float(final_answer_text(split_think(completion)[1]) is not None)


REWARDS: dict[str, Reward] = {**{name: verifier_reward(name) for name in
                                 ("choice", "numeric", "math", "constraints", "tool_call", "code")},
                              "format": format_reward}


def get_reward(name: str) -> Reward:
    """A registered reward, or a user's `module:function` (imported from the Python path)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"reward {name!r}: cannot import it ({error}); a user reward is module:function "
                              "with the module on the Python path") from None
        if not callable(function):
            raise ConfigError(f"reward {name!r} is not callable")
        return function
    close = difflib.get_close_matches(name, [*REWARDS, JUDGE], n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ConfigError(f"unknown reward {name!r}: {hint}available: {', '.join(sorted([*REWARDS, JUDGE]))} or "
                      "module:function")


def question_of(row: dict) -> str:
    """The prompt a judge sees: the row's `question`, else its last user message."""
    if "question" in row:
        return str(row["question"])
    users = [m["content"] for m in row.get("messages", []) if m.get("role") == "user"]
    if not users:
        raise ValueError(f"reward 'judge': the row has neither 'question' nor a user message (keys: {sorted(row)})")
    return users[-1]


@dataclass
class JudgeReward:
    """An LLM judge's 1..10 rating of the answer (after any think block) as (rating − 1) / 9. The prompts are
    the judge recipe's `single_*` templates ({question}, {answer}, {reference}: the row's `answer`)."""

    client: ChatClient
    system: str
    user: str
    user_reference: str = ""  # used when the row has an `answer` and this is set
    retry: str = ""  # sent after a reply without a verdict
    retries: int = 2
    params: dict = field(default_factory=lambda: {"max_tokens": 1024, "temperature": 0.0})
    usage: Usage = field(default_factory=Usage)

    def score(self, completions: Sequence[str], rows: Sequence[dict]) -> list[float | None]:
        conversations = []
        for completion, row in zip(completions, rows):
            with_reference = bool(self.user_reference) and row.get("answer") is not None
            fields = dict(question=question_of(row), answer=split_think(completion)[1],
                          reference=row.get("answer", ""))
            conversations.append(conversation(self.system, self.user_reference if with_reference else self.user,
                                              fields))

        def verdict(index: int, reply: ChatReply) -> float:
            rating = parse_rating(reply.content)
            if rating is None:
                raise Malformed("no [[N]] rating from 1 to 10 in the reply")
            return (rating - 1.0) / 9.0

        answers = ask_all(self.client, conversations, None, verdict, retries=self.retries, retry_prompt=self.retry,
                          usage=self.usage, params=self.params, desc="judge reward")
        failed = [a for a in answers if a.reason == "request_failed"]
        if failed:
            raise EndpointError(f"reward judge: {len(failed)} of {len(answers)} requests to {self.client.base_url} "
                                f"failed after {self.client.max_retries} retries ({failed[0].detail[:200]}); "
                                "the step stops here: bring the endpoint back and resume the run")
        return [a.value for a in answers]


@dataclass
class RewardScores:
    values: torch.Tensor  # [S, F] float32, NaN where not scored
    errors: dict[str, int]  # reward name → completions it raised on (judge: gave no verdict for)

    def stats(self, names: Sequence[str]) -> dict[str, float]:
        """Mean/std of each reward over the completions it scored, and its error count: the metrics' rows."""
        out = {}
        for i, name in enumerate(names):
            scored = self.values[:, i][~torch.isnan(self.values[:, i])]
            out[f"rewards/{name}/mean"] = float(scored.mean()) if len(scored) else float("nan")
            out[f"rewards/{name}/std"] = float(scored.std()) if len(scored) > 1 else 0.0
            out[f"rewards/{name}/errors"] = float(self.errors[name])
        return out


class RewardSet:
    """The rewards of a run and their weights; `judge` is required when "judge" is among the names."""

    def __init__(self, names: Sequence[str], weights: Sequence[float] | None = None,
                 judge: JudgeReward | None = None):
        if not names:
            raise ConfigError("grpo.rewards is empty: name at least one reward (e.g. numeric)")
        if weights is not None and len(weights) != len(names):
            raise ConfigError(f"grpo.reward_weights has {len(weights)} values for {len(names)} rewards")
        if JUDGE in names and judge is None:
            raise ConfigError("reward 'judge' needs a judge endpoint (grpo.judge.endpoint)")
        self.names = list(names)
        self.weights = torch.tensor([1.0] * len(names) if weights is None else list(weights), dtype=torch.float32)
        self.functions = [None if name == JUDGE else get_reward(name) for name in names]
        self.judge = judge

    def __call__(self, completions: Sequence[str], rows: Sequence[dict]) -> RewardScores:
        if len(completions) != len(rows):
            raise ValueError(f"rewards: {len(completions)} completions but {len(rows)} rows")
        values = torch.full((len(completions), len(self.names)), float("nan"))
        errors = dict.fromkeys(self.names, 0)
        for j, (name, function) in enumerate(zip(self.names, self.functions)):
            if function is None:
                scores = self.judge.score(completions, rows)
                errors[name] = sum(score is None for score in scores)
            else:
                scores = [self._safe(name, function, c, r, errors) for c, r in zip(completions, rows)]
            for i, score in enumerate(scores):
                if score is not None:
                    values[i, j] = float(score)
        for name, count in errors.items():
            if count:
                log.warning("reward %s: no score for %d of %d completions (left out of their group's statistics)",
                            name, count, len(completions))
        return RewardScores(values, errors)

    @staticmethod
    def _safe(name, function, completion, row, errors) -> float | None:
        try:
            score = function(completion, row)
            return None if score is None else float(score)  # None: the reward does not apply to this row
        except Exception as error:  # a reward's bug or a malformed row costs that score, not the run
            if not errors[name]:
                log.warning("reward %s raised %s: %s", name, type(error).__name__, error)
            errors[name] += 1
            return None
