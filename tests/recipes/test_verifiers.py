"""The verifier registry: Verdict's contract, unknown names, math through math-verify (and where it replaces
the hand-written number readings), and the adapters giving the same answers as the checks they wrap."""
import json

import pytest

from qforge.engine.errors import ConfigError
from qforge.recipes.evals import function_calling, instruction_following
from qforge.recipes.sft_data.answers import answer_matches, choice_matches
from qforge.recipes.sft_data.traces import make_pairs, reference_of, repetition_ratio
from qforge.recipes.synth import matcher
from qforge.recipes.verifiers import STATUSES, VERIFIERS, Verdict, get_verifier


def test_verdict_keeps_its_contract():
    assert Verdict.of(True) == Verdict(True, 1.0, "pass", "")
    assert Verdict.of(False).status == "fail" and Verdict.of(None).status == "unparseable"
    for bad in (dict(passed=True, score=1.0, status="fail"), dict(passed=False, score=1.5, status="fail"),
                dict(passed=False, score=0.0, status="wrong")):
        with pytest.raises(ValueError):
            Verdict(**bad)
    with pytest.raises(AttributeError):
        Verdict.of(True).passed = False  # frozen
    assert set(VERIFIERS) == {"math", "numeric", "choice", "constraints", "tool_call", "code"}
    assert STATUSES == ("pass", "fail", "timeout", "crash", "parse_error", "unparseable")


def test_an_unknown_verifier_is_a_one_line_error_naming_close_matches():
    with pytest.raises(ConfigError) as error:
        get_verifier("maths")
    message = str(error.value)
    assert "'maths'" in message and "did you mean 'math'" in message and "\n" not in message
    with pytest.raises(ConfigError, match="available: choice, code, constraints"):
        get_verifier("xyz")


@pytest.mark.parametrize("completion,answer,status", [
    ("<think>1/2 = 0.5</think>So \\boxed{0.5}.", "\\frac{1}{2}", "pass"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", "pass"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", "pass"),
    ("\\boxed{(1, 2]}", "(1,2]", "pass"),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", "pass"),
    ("\\boxed{2\\sqrt{3}}", "2", "fail"),
    ("\\boxed{5/6}", "\\frac{5}{6}", "pass"),
    ("\\boxed{2/5}", "\\frac{5}{6}", "fail"),
    ("<think>\\boxed{7}</think>The answer is 7.", "7", "unparseable"),  # a box inside the thinking is no answer
    ("The answer is 7.", "7", "unparseable"),
])
def test_math_verifier(completion, answer, status):
    verdict = get_verifier("math")(completion, {"answer": answer})
    assert verdict.status == status and verdict.passed == (status == "pass")


def test_numeric_matching_uses_math_verify_where_number_readings_are_weaker():
    # the readings compare the first number only: 2√3 "equalled" 2; math-verify tells them apart
    assert answer_matches("so \\boxed{2\\sqrt{3}}", "2") is False
    assert answer_matches("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}") is True
    assert answer_matches("\\boxed{\\pi/2}", "\\frac{\\pi}{2}") is True
    # plain numbers keep their Vietnamese/English readings (math-verify reads 1.000 as one)
    assert answer_matches("\\boxed{1.000}", "1000") is True
    assert answer_matches("Đáp án: 3,5 kg", "3.5") is True
    assert answer_matches("Đáp án: 7 (3 + 4)", "7") is True  # an answer line is prose: its first number


def test_adapters_agree_with_the_checks_they_wrap():
    cases = [("numeric", "Ta có 3 + 4 = 7. Đáp án: 7", "7", answer_matches),
             ("numeric", "Đáp án: 8", "7", answer_matches),
             ("numeric", "không biết", "7", answer_matches),
             ("choice", "Đáp án đúng là: B", "B", choice_matches),
             ("choice", "Đáp án: C", "B", choice_matches)]
    for name, response, reference, check in cases:
        verdict = get_verifier(name)(response, reference_of(name, reference))
        expected = check(response, reference)
        assert verdict.passed == bool(expected) and (verdict.status == "unparseable") == (expected is None)
        assert matcher(name)(response, reference) == expected  # what rejection sampling sees
    constraints = [{"type": "word_count", "max": 5}, {"type": "keywords", "include": ["Hà Nội"]}]
    for reply in ("Thủ đô là Hà Nội.", "Thủ đô của Việt Nam là thành phố Hà Nội."):
        verdict = get_verifier("constraints")(reply, {"constraints": constraints})
        assert verdict.passed == all(instruction_following.check_reply(reply, constraints))
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    reference = {"tools": tools, "reference_calls": [{"name": "weather", "arguments": {"city": "Huế"}}]}
    for city in ("Huế", "Hà Nội"):
        reply = f'<tool_call>\n{{"name": "weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'
        verdict = get_verifier("tool_call")(reply, reference_of("tool_call", json.dumps(reference)))
        assert verdict.passed == function_calling.check_reply(reply, **reference)["correct"] == (city == "Huế")


def test_repetition_ratio_finds_loops():
    assert repetition_ratio("a b c d e f g h", 2) == 0.0
    assert repetition_ratio("wait let me check " * 20, 4) > 0.9
    assert repetition_ratio("short", 8) == 0.0


def _row(qid, rid, passed):
    return {"id": rid, "question_id": qid, "prompt": [{"role": "user", "content": qid}], "verifier": "math",
            "reasoning": f"r-{rid}", "answer": f"a-{rid}", "verdict": {"passed": passed, "status":
                                                                       "pass" if passed else "fail"}}


def test_pairs_per_question_policy_and_questions_without_a_side():
    rows = [_row("q1", "p1", True), _row("q1", "p2", True), _row("q1", "f1", False), _row("q1", "f2", False),
            _row("q2", "p3", True), _row("q3", "f3", False)]
    pairs, summary = make_pairs(rows, per_question=3)
    q1 = [(p["chosen_id"], p["rejected_id"]) for p in pairs if p["question_id"] == "q1"]
    assert q1 == [("p1", "f1"), ("p2", "f2"), ("p1", "f2")]  # distinct, each sample used before any reuse
    assert summary["questions_without_passing_sample"] == ["q3"]
    assert summary["questions_without_failing_sample"] == ["q2"]
    pair = pairs[0]
    assert pair["messages"] == [{"role": "user", "content": "q1"}]
    assert pair["chosen"] == {"role": "assistant", "content": "a-p1", "reasoning_content": "r-p1"}
    assert make_pairs(rows, per_question=1)[1]["pairs"] == 1


def test_verify_rows_keeps_math_on_the_calling_thread_and_spreads_code(monkeypatch):
    """math-verify's timeout is a signal, which only works on the main thread; code runs in the pool."""
    import threading

    from qforge.recipes import verifiers
    from qforge.recipes.sft_data.traces import verify_rows

    seen = []

    def recorder(status):
        def verify(completion, reference):
            seen.append((status, threading.current_thread() is threading.main_thread()))
            return Verdict.of(status == "pass")
        return verify

    monkeypatch.setitem(verifiers.VERIFIERS, "math", recorder("pass"))
    monkeypatch.setitem(verifiers.VERIFIERS, "code", recorder("fail"))
    rows = [{"verifier": name, "reference": {}, "reasoning": "", "answer": "x"}
            for name in ("code", "math", "code", "math")]
    verdicts = verify_rows(rows, workers=2)
    assert [v.passed for v in verdicts] == [False, True, False, True]  # in row order
    assert sorted(seen) == [("fail", False), ("fail", False), ("pass", True), ("pass", True)]
