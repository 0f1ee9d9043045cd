"""LLM-as-judge on scripted candidates and scripted judges served by the local server over loopback."""
import json
import threading

import numpy as np
import pytest

from qwen3_fixtures import run_recipe_main
from scripted_server import ChatServer, ScriptedBackend

from qforge.recipes.judge import main
from qforge.recipes.sft_data.stages import fill
from qforge.recipes.evals.verdicts import bootstrap_interval, pair_outcome, parse_pairwise, parse_rating

RETRY = "Reply again with only the verdict."
ITEMS = [  # markers in the prompts steer the scripted judge
    {"id": "m1", "task": "math", "prompt": "1+1?", "reference": "2"},
    {"id": "m2", "task": "math", "prompt": "2+2?"},
    {"id": "m3", "task": "math", "prompt": "#tie 3+3?"},
    {"id": "m4", "task": "math", "prompt": "#flaky 4+4?"},
    {"id": "w1", "task": "writing", "prompt": "Viết một câu."},
    {"id": "w2", "task": "writing", "prompt": "#broken Viết hai câu."},
    {"id": "w3", "task": "writing", "prompt": "Viết ba câu."},
]


class ScriptedJudge:
    """Prefers the answer containing GOOD (pairwise) or rates GOOD 8 (9 with a reference) and BAD 3."""

    def __init__(self, position_biased=False):
        self.position_biased = position_biased
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, request):
        with self.lock:
            self.calls += 1
        prompt = request.messages[-1]["content"]
        if prompt == RETRY:
            prompt = request.messages[-3]["content"]
        elif "#flaky" in prompt:
            return "Assistant A seems better overall, 8 out of 10."  # no marker: must be re-asked
        if "#broken" in prompt:
            return "[[A]] ... on second thought [[B]] and [[12]] [[2]]"  # contradictory: invalid
        if "[Answer of assistant A]" in prompt:
            if self.position_biased:
                return "The first one. [[A]]"
            if "#tie" in prompt:
                return "Equally good. [[C]]"
            first_is_good = prompt.find("GOOD") < prompt.find("BAD")
            return f"Reasoning... Verdict: [[{'A' if first_is_good else 'B'}]]"
        if "GOOD" in prompt:
            return "Rating: [[9]]" if "[Reference answer" in prompt else "Rating: [[8]]"
        return "Rating: [[3]]"


@pytest.fixture
def servers():
    started = []

    def start(backend):
        server = ChatServer(backend, port=0).start()
        started.append(server)
        return server.url

    yield start
    for server in started:
        server.stop()


def start(servers, judge):
    """Candidate servers (one good, one bad) and the judge's server: their URLs."""
    return {"good": servers(ScriptedBackend(lambda r: f"GOOD answer to {r.messages[-1]['content']}", name="good")),
            "bad": servers(ScriptedBackend(lambda r: "BAD answer {question}", name="bad")),  # braces stay literal
            "judge": servers(ScriptedBackend(judge, name="judge"))}


def run_judge(tmp_path, urls, mode, extra=()):
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS), encoding="utf-8")
    good, bad, judge_url = urls["good"], urls["bad"], urls["judge"]
    out = tmp_path / f"out-{mode}"
    run_recipe_main(main, ["--config", "recipes/configs/judge.yaml", f"data.path={data}", f"output.dir={out}",
          f"judge.mode={mode}", "judge.baseline=bad", f"judge.prompts.retry={RETRY}",
          f"judge.endpoint={{base_url: '{judge_url}', model: judge}}", f"client.cache_dir={tmp_path / 'cache'}",
          f"candidates=[{{name: bad, endpoint: {{base_url: '{bad}', model: bad}}}}, "
          f"{{name: good, endpoint: {{base_url: '{good}', model: good}}}}]", "client.max_retries=0", *extra])
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").exists() and (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    answers = [json.loads(line) for line in (out / "answers" / "bad.jsonl").read_text().splitlines()]
    assert answers[0]["answer"] == "BAD answer {question}"
    return report["results"], out


def test_pairwise_both_orders_ties_retries_and_invalid(tmp_path, servers):
    judge = ScriptedJudge()
    urls = start(servers, judge)
    results, out = run_judge(tmp_path, urls, "pairwise")
    result = results["good vs bad"]
    math, writing = result["tasks"]["math"], result["tasks"]["writing"]
    assert (math["win"], math["tie"], math["loss"], math["invalid"]) == (3, 1, 0, 0)
    assert math["win_rate"] == pytest.approx(3.5 / 4)
    assert (writing["win"], writing["invalid"], writing["win_rate"]) == (2, 1, 1.0)
    assert writing["ci"] == [1.0, 1.0]
    overall = result["overall"]
    assert (overall["win"], overall["tie"], overall["invalid"]) == (5, 1, 1)
    assert overall["win_rate"] == pytest.approx(5.5 / 6)
    assert overall["ci"][0] <= overall["win_rate"] <= overall["ci"][1] <= 1.0
    # 14 first asks; #flaky re-asked in both orders; #broken re-asked twice in both orders
    assert judge.calls == 14 + 2 + 4
    records = {r["id"]: r for r in map(json.loads, (out / "judgments.jsonl").read_text().splitlines())}
    assert records["m4"]["outcome"] == "win" and len(records["m4"]["judge_replies"][0]) == 2
    assert records["w2"]["outcome"] == "invalid" and len(records["w2"]["judge_replies"][1]) == 3

    calls = judge.calls  # an identical rerun is served from the cache: nothing reaches the judge
    again, _ = run_judge(tmp_path, urls, "pairwise")
    assert judge.calls == calls and again == results


def test_position_bias_cancels_out_into_ties(tmp_path, servers):
    results, _ = run_judge(tmp_path, start(servers, ScriptedJudge(position_biased=True)), "pairwise")
    overall = results["good vs bad"]["overall"]
    assert (overall["win"], overall["loss"], overall["tie"], overall["invalid"]) == (0, 0, 6, 1)
    assert overall["win_rate"] == 0.5 and overall["ci"] == [0.5, 0.5]


def test_single_ratings_with_reference_and_invalid(tmp_path, servers):
    urls = start(servers, ScriptedJudge())
    results, _ = run_judge(tmp_path, urls, "single")
    good, bad = results["good"], results["bad"]
    assert good["tasks"]["math"]["mean"] == pytest.approx((9 + 8 + 8 + 8) / 4)  # m1 has a reference
    assert (good["tasks"]["writing"]["mean"], good["tasks"]["writing"]["invalid"]) == (8.0, 1)
    assert (bad["overall"]["mean"], bad["overall"]["rated"], bad["overall"]["invalid"]) == (3.0, 6, 1)
    without, _ = run_judge(tmp_path, urls, "single", ["judge.use_reference=false"])
    assert without["good"]["tasks"]["math"]["mean"] == 8.0


@pytest.mark.parametrize("text, expected", [
    ("Verdict: [[A]]", "A"), ("[[ B ]]", "B"), ("[[C]]", "tie"), ("[[A]] ... [[A]]", "A"),
    ("[[A]] or [[B]]", None), ("A is better", None), ("[A]", None), ("[[D]]", None),
])
def test_pairwise_parsing_is_strict(text, expected):
    assert parse_pairwise(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Rating: [[7]]", 7.0), ("[[10]]", 10.0), ("[[7.5]]", 7.5), ("[[0]]", None), ("[[11]]", None),
    ("[[7]] [[8]]", None), ("7/10", None),
])
def test_rating_parsing_is_strict(text, expected):
    assert parse_rating(text) == expected


def test_order_combination():
    assert pair_outcome("A", "B") == "win" and pair_outcome("B", "A") == "loss"
    assert pair_outcome("A", "A") == "tie" and pair_outcome("tie", "tie") == "tie" and pair_outcome("tie", "B") == "tie"
    assert pair_outcome(None, "B") == "invalid"


def test_bootstrap_interval_matches_the_normal_approximation():
    values = np.random.default_rng(1).random(400) < 0.3
    low, high = bootstrap_interval(values.astype(float), samples=4000, seed=0)
    mean, half = values.mean(), 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / values.size)
    assert low == pytest.approx(mean - half, abs=0.01) and high == pytest.approx(mean + half, abs=0.01)
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)


def test_fill_substitutes_once():
    text = fill("Q: {question} A: {answer}", {"question": "{answer}", "answer": "x"})
    assert text == "Q: {answer} A: x"


def test_shipped_benchmark_sample_has_twelve_tasks():
    from qforge.recipes.evals.verdicts import read_items

    items = read_items("recipes/data/judge_demo.jsonl")
    assert len({item.task for item in items}) == 12 and len(items) == 24
    assert sum(item.reference is not None for item in items) >= 12
