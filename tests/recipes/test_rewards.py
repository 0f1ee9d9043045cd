"""GRPO rewards: the verifiers' scores, format, user rewards, weighting, errors, and the LLM judge over HTTP."""
import json
import logging
import threading

import pytest
import torch

from qforge.engine.serve.client import ChatClient
from qforge.engine.errors import ConfigError, EndpointError
from qforge.engine.train.grpo_loss import combine_rewards, group_advantages
from qforge.recipes.evals import function_calling, instruction_following
from qforge.recipes.rewards import REWARDS, JudgeReward, RewardSet, format_reward, get_reward
from scripted_server import ChatServer, ScriptedBackend

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_verifier_rewards_score_answers():
    cases = [  # (reward, completion, row, expected)
        ("numeric", "<think>16 + 14 = 30</think>\n\nVậy lớp có 30 học sinh. Đáp án: 30", {"answer": "30"}, 1.0),
        ("numeric", "Đáp án: 31", {"answer": "30"}, 0.0),
        ("numeric", "ba mươi", {"answer": "30"}, 0.0),  # no final answer to read
        ("math", "so \\boxed{\\frac{1}{2}}", {"answer": "0.5"}, 1.0),
        ("math", "so \\boxed{\\frac{1}{3}}", {"answer": "0.5"}, 0.0),
        ("choice", "Đáp án: B", {"answer": "B"}, 1.0),
        ("choice", "Đáp án: C", {"answer": "B"}, 0.0),
    ]
    for name, completion, row, expected in cases:
        assert get_reward(name)(completion, row) == expected, (name, completion)
    constraints = [{"type": "word_count", "max": 5}, {"type": "keywords", "include": ["Hà Nội"]}]
    for reply in ("Thủ đô là Hà Nội.", "Thủ đô của Việt Nam là thành phố Hà Nội."):
        expected = float(all(instruction_following.check_reply(reply, constraints)))
        assert REWARDS["constraints"](reply, {"constraints": constraints}) == expected
    assert {REWARDS["constraints"](r, {"constraints": constraints})
            for r in ("Thủ đô là Hà Nội.", "Thủ đô của Việt Nam là thành phố Hà Nội.")} == {0.0, 1.0}
    reference = {"tools": TOOLS, "reference_calls": [{"name": "weather", "arguments": {"city": "Huế"}}]}
    for city in ("Huế", "Hà Nội"):
        reply = f'<tool_call>\n{json.dumps({"name": "weather", "arguments": {"city": city}})}\n</tool_call>'
        assert REWARDS["tool_call"](reply, reference) == float(
            function_calling.check_reply(reply, **reference)["correct"]) == float(city == "Huế")


@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think>\n\nĐáp án: 3", 1.0),
    ("Answer: 3", 1.0),  # no think block (thinking off) is fine
    ("<think>a b c d", 0.0),  # never closed (cut by max tokens)
    ("<think>a</think>\n\nba", 0.0),  # no final answer
    ("<think>a</think>x<think>b", 0.0),  # the last block is open
])
def test_format_reward(completion, expected):
    assert format_reward(completion, {}) == expected


def test_user_reward_weights_and_errors(tmp_path, monkeypatch, caplog):
    (tmp_path / "my_rewards.py").write_text(
        "def length(completion, row):\n"
        "    if row.get('broken'):\n"
        "        raise KeyError('no such field')\n"
        "    return len(completion) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = RewardSet(["numeric", "my_rewards:length"], weights=[1.0, 0.5])
    rows = [{"answer": "3"}, {"answer": "3"}, {"answer": "3", "broken": True}, {"answer": "4", "broken": True}]
    completions = ["Đáp án: 3", "Đáp án: 4", "Đáp án: 3", "Đáp án: 3"]
    with caplog.at_level(logging.WARNING, logger="qforge.rewards"):
        scores = rewards(completions, rows)
    assert scores.errors == {"numeric": 0, "my_rewards:length": 2}
    assert "KeyError" in caplog.text and "2 of 4" in caplog.text
    values = scores.values
    assert values[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert values[:2, 1].tolist() == pytest.approx([0.9, 0.9]) and torch.isnan(values[2:, 1]).all()
    combined = combine_rewards(values, rewards.weights)
    assert combined.tolist() == pytest.approx([1.45, 0.45, 1.0, 0.0])
    advantages, _ = group_advantages(combined, 2)
    assert torch.isfinite(advantages).all()
    assert scores.stats(rewards.names)["rewards/my_rewards:length/errors"] == 2.0


def test_bad_reward_names_are_one_line_errors():
    with pytest.raises(ConfigError, match="did you mean 'numeric'"):
        get_reward("numerc")
    with pytest.raises(ConfigError, match="cannot import"):
        get_reward("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="judge endpoint"):
        RewardSet(["judge"])
    with pytest.raises(ConfigError, match="empty"):
        RewardSet([])


class _Judge:
    """Rates answers containing GOOD 9 and others 2; the first request for a MALFORMED answer gets no verdict."""

    def __init__(self):
        self.requests = []
        self.lock = threading.Lock()

    def __call__(self, request):
        text = " ".join(m["content"] for m in request.messages)
        with self.lock:
            self.requests.append(request.messages)
            first = sum("MALFORMED" in " ".join(m["content"] for m in r) for r in self.requests) == 1
        if "MALFORMED" in text and first:
            return "I think it is fine."
        return "Good. [[9]]" if "GOOD" in text or "MALFORMED" in text else "Poor. [[2]]"


def test_judge_reward_over_http(tmp_path):
    judge = _Judge()
    server = ChatServer(ScriptedBackend(judge, name="judge"), port=0).start()
    try:
        client = ChatClient(server.url, "judge", cache_dir=tmp_path / "cache", max_retries=1, backoff=0.01)
        reward = JudgeReward(client, system="Rate it.", user="Q: {question}\nA: {answer}",
                             user_reference="Q: {question}\nRef: {reference}\nA: {answer}", retry="Give [[N]].")
        rows = [{"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}, {"question": "Capital?"},
                {"question": "Hi"}]
        completions = ["<think>hidden</think>\n\nGOOD 4", "bad", "MALFORMED"]
        rewards = RewardSet(["judge", "format"], judge=reward)
        scores = rewards(completions, rows)
        assert scores.values[:, 0].tolist() == pytest.approx([8 / 9, 1 / 9, 8 / 9])  # ratings 9, 2, 9
        [first] = [m[-1]["content"] for m in judge.requests if "2+2?" in m[-1]["content"]]
        assert "Ref: 4" in first and "hidden" not in first and "Q: 2+2?" in first  # the answer, not the think
        assert any(m[-1]["content"] == "Give [[N]]." for m in judge.requests)  # the malformed one was re-asked
        sent = len(judge.requests)
        rewards(completions, rows)
        assert len(judge.requests) == sent and client.stats["cache_hits"] >= 3  # cached
    finally:
        server.stop()
    down = ChatClient(server.url, "judge", max_retries=1, backoff=0.01, timeout=2)
    with pytest.raises(EndpointError, match="resume"):
        JudgeReward(down, system="", user="{question} {answer}").score(["x"], [{"question": "q"}])
