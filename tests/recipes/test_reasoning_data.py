"""The shipped reasoning-data example end to end on CPU: existing traces (recipes/data/reasoning_traces.jsonl,
math + code with unit tests) → reformat by a scripted model over real loopback HTTP → verify (math-verify,
code run in the sandbox) → SFT file + pairs file → one DPO step of recipes/dpo.py reads the pairs."""
import json
import re
import threading
from collections import Counter

import pytest

from qforge.engine.data import ChatTemplate
from qforge.engine.data.formats import read_conversations
from qforge.engine.data.preference import load_pairs
from qforge.recipes.dpo import main as dpo_main
from qforge.recipes.synth import main
from qwen3_fixtures import run_recipe_main, save_chat_checkpoint
from scripted_server import ChatServer, ScriptedBackend

CONFIG = "recipes/configs/reasoning-data.yaml"
FILLER = re.compile(r"\b(Hmm|Wait|Okay)[,.]?\s*")


class ScriptedRewriter:
    """Rewrites a trace as a small model following the reformat prompt would: filler words out, the answer
    in the verifier's form (\\boxed{} for math, a ```python block for code). Its first reply about the
    recursive Fibonacci is malformed (no think block), so the stage's retry is exercised."""

    def __init__(self):
        self.calls = Counter()
        self.lock = threading.Lock()

    def __call__(self, request):
        prompt = request.messages[-1]["content"]
        with self.lock:
            self.calls["retry" if "could not be used" in prompt else "rewrite"] += 1
        if "could not be used" in prompt:
            prompt = request.messages[-3]["content"]
        elif "def fib(n:" in prompt:
            return "Sure, here is a cleaner version of the solution."
        reasoning = prompt.split("[Raw reasoning]\n", 1)[1].split("\n\n[Raw answer]", 1)[0]
        answer = prompt.split("[Raw answer]\n", 1)[1].split("\n[End]", 1)[0]
        if "Code:\n" in answer:
            final = f"Here is the program.\n```python\n{answer.split('Code:', 1)[1].strip()}\n```"
        else:
            value = re.search(r"answer is (.+?)\.?$", answer).group(1)
            final = f"The answer is \\boxed{{{value}}}."
        return f"<think>\n{FILLER.sub('', reasoning).strip()}\n</think>\n\n{final}"


@pytest.fixture
def rewriter():
    model = ScriptedRewriter()
    with ChatServer(ScriptedBackend(model, name="scripted-rewriter"), port=0) as server:
        yield model, server.url


def run(tmp_path, url, name, *overrides):
    backend = f"{{name: local, endpoint: {{base_url: '{url}', model: scripted-rewriter}}, cache_namespace: test}}"
    out = tmp_path / name
    run_recipe_main(main, ["--config", CONFIG, f"output.dir={out}", f"backends=[{backend}]", "client.max_retries=0",
                           *overrides])
    read = lambda f: [json.loads(line) for line in (out / f).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    return out, read("data.jsonl"), read("drops.jsonl"), json.loads((out / "report.json").read_text())


def test_traces_reformat_verify_pairs_and_a_dpo_step(tmp_path, rewriter):
    model, url = rewriter
    out, rows, drops, report = run(tmp_path, url, "out")
    print("\n" + (out / "report.md").read_text(encoding="utf-8"))

    # reformat: every trace rewritten once (+1 retry); a rewrite that fails its verifier leaves the original
    assert model.calls == {"rewrite": 12, "retry": 1}
    reformat = report["reformat"]
    states = (reformat["rewritten"], reformat["kept_original"], reformat["no_rewrite"], reformat["dropped"])
    assert states == (7, 5, 0, 0)
    assert reformat["mean_trace_length_after"] < reformat["mean_trace_length_before"]
    assert reformat["rewrite_statuses"] == {"pass": 7, "fail": 3, "timeout": 1, "parse_error": 1}
    assert report["verification"]["programs"] == 12 + 5  # the rewrites, then the kept originals
    assert [(s["stage"], s["rows_in"], s["rows_out"]) for s in report["stages"]] == [
        ("reformat", 12, 12), ("filters", 12, 11), ("verify", 11, 6)]

    # the SFT file: passing rows only, reformatted into a think block + the verifier's form, readable by FFT
    assert sorted(r["id"] for r in rows) == ["c1-s0", "c2-s0", "m1-s0", "m2-s0", "m3-s0", "m3-s1"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["m1-s0"]["messages"][-1]["content"] == "The answer is \\boxed{5/6}."
    assert "Hmm" not in by_id["m1-s0"]["messages"][-1]["reasoning_content"]
    assert by_id["c1-s0"]["messages"][-1]["content"].startswith("Here is the program.\n```python\nimport sys")
    assert by_id["c2-s0"]["verdict"] == {"passed": True, "score": 1.0, "status": "pass",
                                         "detail": "3/3 tests passed"}
    assert all(r["reformat"] == "rewritten" for r in rows)
    assert len(list(read_conversations(out / "data.jsonl"))) == 6

    # drops: the looping trace by the filter; originals whose rewrite failed are unparseable as they were
    reasons = {d["id"]: d["reason"] for d in drops}
    assert reasons == {"m2-s1": "trace_repetitive", "m1-s1": "verify_unparseable", "c1-s1": "verify_unparseable",
                       "c2-s1": "verify_unparseable", "c3-s0": "verify_unparseable", "c3-s1": "verify_unparseable"}
    rates = report["pass_rates"]
    assert rates["teacher-qwq"]["code"]["samples"] == 4 and rates["teacher-qwq"]["code"]["pass_rate"] == 0.5
    assert rates["public-math"]["math"] == {"samples": 2, "passed": 2, "pass_rate": 1.0, "statuses": {"pass": 2}}
    assert rates["public-code"]["code"]["pass_rate"] == 0.0

    # pairs: chosen passes, rejected fails, both with their reasoning; questions without a side are reported
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted((p["chosen_id"], p["rejected_id"]) for p in pairs) == [
        ("c1-s0", "c1-s1"), ("c2-s0", "c2-s1"), ("m1-s0", "m1-s1")]
    assert all(p["chosen"]["reasoning_content"] and p["rejected"]["reasoning_content"] for p in pairs)
    # the rejected side is the failed rewrite (same format as the chosen side), with what execution found
    rejected = {p["rejected_id"]: (p["rejected"]["content"], p["rejected_status"]) for p in pairs}
    assert rejected["m1-s1"] == ("The answer is \\boxed{2/5}.", "fail")
    assert rejected["c1-s1"][0].startswith("Here is the program.\n```python") and rejected["c1-s1"][1] == "fail"
    assert rejected["c2-s1"][1] == "timeout"  # is_palindrome("abba") never returns
    assert report["pairs"]["questions_without_passing_sample"] == ["c3"]
    assert report["pairs"]["questions_without_failing_sample"] == ["m2", "m3"]

    # recipes/dpo.py reads the pairs as they are and takes a step on them
    checkpoint = save_chat_checkpoint(tmp_path / "model", seed=1)
    loaded, summary = load_pairs([out / "pairs.jsonl"], ChatTemplate.from_pretrained(checkpoint))
    assert summary.num_rows == 3 and all(p.chosen.num_loss_tokens and p.rejected.num_loss_tokens for p in loaded)
    dpo_out = tmp_path / "dpo"
    assert dpo_main(["--config", "recipes/configs/dpo.yaml", f"model.path={checkpoint}",
                     f"data.train=[{out / 'pairs.jsonl'}]", "data.max_tokens=4096", "train.max_steps=1",
                     "train.precision=fp32", "train.save_every=0", "optim.warmup_steps=0", f"output.dir={dpo_out}",
                     "output.progress=false", "output.tensorboard=false"]) == 0
    records = [json.loads(line) for line in (dpo_out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 1 and steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference

    # a rerun resumes: the stored stages are reused and nothing is asked again
    _, again, _, report_again = run(tmp_path, url, "out")
    assert model.calls == {"rewrite": 12, "retry": 1} and again == rows
    assert report_again["usage"]["reformat"]["reused_stored_output"]


def test_on_fail_drop_drops_rows_whose_rewrite_fails(tmp_path, rewriter):
    _, rows, drops, report = run(tmp_path, rewriter[1], "drop", "reformat.on_fail=drop", "pairs.per_question=1")
    assert report["reformat"]["dropped"] == 5 and report["reformat"]["rewritten"] == 7
    assert {d["id"]: d["reason"] for d in drops if d["stage"] == "reformat"} == {
        "m1-s1": "reformat_fail", "c1-s1": "reformat_fail", "c2-s1": "reformat_timeout", "c3-s0": "reformat_fail",
        "c3-s1": "reformat_parse_error"}
    assert len(rows) == 6 and report["pairs"]["pairs"] == 0  # every failing sample was dropped
    assert report["reformat"]["rewrite_statuses"] == {"pass": 7, "fail": 3, "timeout": 1, "parse_error": 1}
    assert report["reformat"]["mean_trace_length_after"] < report["reformat"]["mean_trace_length_before"]


def test_any_sft_file_alone_without_a_model(tmp_path):
    """No reformat (no backend started): an SFT file with references is verified and paired as it is."""
    path = tmp_path / "sft.jsonl"
    question = [{"role": "user", "content": "An có 3 quả táo, mẹ cho thêm 4 quả. An có mấy quả?"}]
    rows = [{"messages": question + [{"role": "assistant", "content": f"<think>3 + 4 = {n}</think>Đáp án: {n}"}],
             "reference_answer": "7"} for n in (7, 8, 7)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    run_recipe_main(main, ["--config", CONFIG, f"traces.path={path}", "traces.verifier=numeric",
                           "reformat.enabled=false", f"output.dir={out}", "backends=[]"])
    data = [json.loads(line) for line in (out / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [d["messages"][-1] for d in data] == [{"role": "assistant", "content": "Đáp án: 7",
                                                 "reasoning_content": "3 + 4 = 7"}] * 2
    assert len(pairs) == 2 and {p["rejected"]["content"] for p in pairs} == {"Đáp án: 8"}


def test_an_unknown_verifier_on_a_row_names_the_row(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                "verifier": "maths", "reference": {"answer": "1"}}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"sft.jsonl:1: unknown verifier 'maths': did you mean 'math'"):
        run_recipe_main(main, ["--config", CONFIG, f"traces.path={path}", "reformat.enabled=false",
                               f"output.dir={tmp_path / 'out'}", "backends=[]"])


def test_rows_without_a_trace_are_not_sent_to_the_rewriter(tmp_path, rewriter):
    model, url = rewriter
    traces = [json.loads(line) for line in open("recipes/data/reasoning_traces.jsonl", encoding="utf-8")][:1]
    bare = {**traces[0], "id": "m1-bare", "messages": traces[0]["messages"][:1] + [
        {"role": "assistant", "content": "The answer is \\boxed{\\frac{5}{6}}."}]}
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in traces + [bare]), encoding="utf-8")
    _, rows, _, report = run(tmp_path, url, "bare", f"traces.path={path}")
    assert model.calls == {"rewrite": 1}
    assert report["reformat"]["no_trace"] == 1 and report["reformat"]["rewritten"] == 1
    assert {r["id"]: r["reformat"] for r in rows} == {"m1-s0": "rewritten", "m1-bare": "no_trace"}
