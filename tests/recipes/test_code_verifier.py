"""The code verifier on APPS-style problems written for these tests (tests/recipes/data/apps_style.json): each
solution's expected verdict is known (correct, wrong answer, too slow, crashing, not compiling, no code), and
the verifier must give every one of them; the throughput on the machine's cores is printed."""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qforge.recipes.verifiers import Verdict, get_verifier
from qforge.recipes.verifiers.code import (Limits, CaseVerdict, call_matches, extract_code, problem_verdict,
                                           run_tests, stdout_matches)

FIXTURES = json.loads((Path(__file__).parent / "data/apps_style.json").read_text(encoding="utf-8"))


def completion(code: str | None) -> str:
    if code is None:
        return "<think>I would loop over the input.</think>\nJust sum the numbers."
    return f"<think>Plan: read, compute, print.</think>\nHere is a draft:\n```python\nprint(0)\n```\n" \
           f"and the final program:\n```python\n{code}\n```\n"


def test_every_fixture_verdict_is_right_and_throughput_is_reported():
    jobs = [(p, s) for p in FIXTURES for s in p["solutions"]]
    verifier = get_verifier("code")
    workers = min(2, os.cpu_count() or 1)

    def one(job):
        problem, solution = job
        reference = {"tests": problem["tests"], **({"limits": problem["limits"]} if "limits" in problem else {})}
        return verifier(completion(solution["code"]), reference)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        verdicts = list(pool.map(one, jobs))
    seconds = time.perf_counter() - start
    wrong = [(p["problem"], s["status"], v.status, v.detail) for (p, s), v in zip(jobs, verdicts)
             if v.status != s["status"]]
    assert wrong == []
    assert all(v.passed == (v.status == "pass") for v in verdicts)
    assert {s["status"] for _, s in jobs} == {"pass", "fail", "timeout", "crash", "parse_error", "unparseable"}
    tests = sum(len(p["tests"]["inputs"]) for p, s in jobs if s["code"])
    print(f"\n{len(jobs)} programs ({tests} test runs) verified in {seconds:.1f} s on {workers} workers: "
          f"{len(jobs) / seconds:.2f} programs/s, {tests / seconds:.2f} test runs/s (timeouts included)")
    quick = [job for job in jobs if job[1]["status"] != "timeout"]
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, quick))
    seconds = time.perf_counter() - start
    print(f"without the {len(jobs) - len(quick)} timing-out programs: {len(quick) / seconds:.2f} programs/s")


def test_per_test_verdicts_and_the_problem_verdict():
    tests = {"inputs": ["1\n", "2\n", "3\n"], "outputs": ["1\n", "4\n", "9\n"]}
    code = "n = int(input())\nif n == 3:\n    raise SystemExit(3)\nprint(n * n if n < 2 else n + n)"
    results = run_tests(code, tests, Limits(timeout_s=3))
    assert [r.status for r in results] == ["pass", "pass", "crash"]  # 2 + 2 = 4 passes by accident
    verdict = problem_verdict(results)
    assert (verdict.passed, verdict.status, verdict.score) == (False, "crash", pytest.approx(2 / 3))
    assert verdict.detail.startswith("2/3 tests passed; test 2: crash")
    bad = run_tests("print(", tests)
    assert [r.status for r in bad] == ["parse_error"] * 3 and bad[0].seconds == 0.0  # never started
    assert problem_verdict([CaseVerdict("pass", 0.1)]) == Verdict(True, 1.0, "pass", "1/1 tests passed")


def test_output_comparison_follows_apps():
    assert stdout_matches("3 \n4\n\n", "3\n4")
    assert stdout_matches("0.333333333", "0.3333333")
    assert not stdout_matches("0.33", "0.3333333")
    assert not stdout_matches("3 4 5", "3 4")
    assert stdout_matches("a\nb", ["a", "b"])  # APPS lists of lines
    assert call_matches([0, 1], [[0, 1]]) and call_matches(True, True) and not call_matches([1, 0], [[0, 1]])


def test_the_last_fenced_block_after_the_think_block_is_the_program():
    text = "<think>```python\nprint('thinking')\n```</think>A\n```py\nprint(1)\n```\nB\n```python\nprint(2)\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("<think>```python\nprint(1)\n```</think>no code here") is None


def test_malformed_tests_are_a_clear_error():
    with pytest.raises(ValueError, match="inputs.*outputs"):
        get_verifier("code")("```python\nprint(1)\n```", {"tests": {"inputs": ["1"], "outputs": []}})
    with pytest.raises(ValueError, match=r"limits \['timeout'\] must be among"):
        get_verifier("code")("```python\nprint(1)\n```", {"tests": {"inputs": ["1"], "outputs": ["1"]},
                                                         "limits": {"timeout": 1}})
    with pytest.raises(ValueError, match="no 'tests'"):
        get_verifier("code")("```python\nprint(1)\n```", {"answer": "1"})
