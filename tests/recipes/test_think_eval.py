"""Thinking-mode evaluation done right: sampled with Qwen3's settings (or the configured ones) on the local
engine and on an endpoint, k samples → mean accuracy with an interval, unfinished / unparseable counts, the
budget up to the context, and VMLU's `id,answer` submission CSV."""
import csv
import json
import re
import threading

import pytest
from qwen3_fixtures import save_chat_checkpoint

from qforge.engine.config_io import load_config
from scripted_server import ChatServer, ScriptedBackend
from qforge.recipes.eval import EvalConfig, run
from qforge.recipes.evals.mcq import read_questions, read_subjects

DATA = "recipes/data/mcq_demo.jsonl"
LIMIT = 6


@pytest.fixture(scope="module")
def questions():
    return read_questions(DATA, read_subjects())[:LIMIT]


def endpoint_run(url, tmp_path, *overrides):
    base = [f"model.base_url={url}", "model.model=scripted", f"data.path={DATA}", f"data.limit={LIMIT}",
            f"output.dir={tmp_path}", "client.cache_dir=null"]
    return run(load_config(EvalConfig, "recipes/configs/eval_endpoint.yaml", base + list(overrides)))


def test_endpoint_think_mode_sends_qwen_sampling_and_scores_k_samples(tmp_path, questions):
    """Sample s answers right iff (question index + s) is even; question 0 never closes its reasoning and
    question 1 closes it without a letter, so their counts are known."""
    by_text = {q.question: i for i, q in enumerate(questions)}
    seen, lock = [], threading.Lock()

    def reply(request):
        with lock:
            seen.append((request.temperature, request.top_p, request.top_k, request.seed, request.max_tokens))
        index = by_text[re.search(r"Câu hỏi: (.*)\n", request.messages[-1]["content"]).group(1)]
        question, sample = questions[index], request.seed
        if index == 0:
            return "<think>còn đang nghĩ"
        if index == 1:
            return "<think>xong</think>\n\nKhông biết."
        wrong = next(letter for letter in question.letters if letter != question.answer)
        return f"<think>…</think>\n\nĐáp án đúng là: {question.answer if (index + sample) % 2 == 0 else wrong}"

    with ChatServer(ScriptedBackend(reply), port=0) as server:
        report = endpoint_run(server.url, tmp_path, "eval.samples=4", "eval.seed=10")
    assert {s[:3] for s in seen} == {(0.6, 0.95, 20)}  # Qwen3's thinking settings by default
    assert sorted({s[3] for s in seen}) == [10, 11, 12, 13] and len(seen) == 4 * LIMIT
    assert {s[4] for s in seen} == {None}  # no max_tokens sent: the server's own limit
    # Questions 2..5 are right in exactly 2 of 4 samples; 0 and 1 never.
    assert report["sampled"]["mean_accuracy"] == pytest.approx((4 * 0.5) / LIMIT)
    assert report["sampled"]["per_sample_accuracy"] == [pytest.approx(2 / LIMIT)] * 4
    low, high = report["sampled"]["ci"]
    assert low <= report["sampled"]["mean_accuracy"] <= high and high - low > 0
    # ScriptedBackend reports finish_reason "stop": question 0's reply has no </think> → unparseable too.
    assert report["unparseable"] == 8 and report["unfinished"] == 0 and report["answers"] == 4 * LIMIT
    assert report["sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "presence_penalty": 0.0}
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [len(p["samples"]) for p in predictions] == [4] * LIMIT
    assert "Mean accuracy over 4 samples" in (tmp_path / "report.md").read_text()

    # Configured settings reach the endpoint unchanged; top_k 0 is not sent (APIs that reject it).
    seen.clear()
    with ChatServer(ScriptedBackend(reply), port=0) as server:
        endpoint_run(server.url, tmp_path / "custom", "eval.temperature=1.0", "eval.top_k=0", "eval.max_new_tokens=300")
    assert {s[:3] for s in seen} == {(1.0, 0.95, 0)} and {s[4] for s in seen} == {300}


@pytest.mark.slow
def test_local_think_mode_counts_unfinished_and_budgets_to_the_context(tmp_path, questions):
    from qforge.engine.data import ChatTemplate
    from qforge.recipes.evals.mcq import official_prompt

    template = ChatTemplate.from_pretrained(save_chat_checkpoint(tmp_path / "probe"))
    longest = max(len(template.tokenizer.encode(template.render(
        [{"role": "user", "content": official_prompt(q).rstrip()}], add_generation_prompt=True)).ids)
        for q in questions[:3])
    budget = 5  # the context leaves 5 new tokens after the longest prompt
    checkpoint = save_chat_checkpoint(tmp_path / "tiny", seed=3, max_position_embeddings=longest + budget)
    overrides = [f"model.path={checkpoint}", f"data.path={DATA}", "data.limit=3", "eval.mode=think",
                 "eval.samples=2", "eval.batch_size=6"]

    def evaluate(name):
        report = run(load_config(EvalConfig, "recipes/configs/eval.yaml", overrides + [f"output.dir={tmp_path / name}"]))
        return report, [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]

    report, predictions = evaluate("first")
    # A random model rambles: the budget cuts every reply, which counts as unfinished (and wrong).
    assert report["unfinished"] == 2 * 3 and report["sampled"]["mean_accuracy"] == 0
    assert {len(template.tokenizer.encode(o, add_special_tokens=False).ids) >= budget - 1
            for p in predictions for o in p["outputs"]} == {True}
    # The two samples differ (sampled with seeds 0 and 1), and the same seeds reproduce them.
    assert any(p["outputs"][0] != p["outputs"][1] for p in predictions)
    _, repeated = evaluate("again")
    assert [p["outputs"] for p in repeated] == [p["outputs"] for p in predictions]
    with pytest.raises(ValueError, match="loglik is deterministic"):
        load_config(EvalConfig, "recipes/configs/eval.yaml", overrides + ["eval.mode=loglik", "output.dir=x"])


def test_test_split_writes_the_submission_csv(tmp_path, questions):
    rows = [json.loads(line) for line in open(DATA, encoding="utf-8")][:LIMIT]
    test_split = tmp_path / "test.jsonl"
    test_split.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}, ensure_ascii=False)
                                  + "\n" for r in rows), encoding="utf-8")

    def reply(request):
        return "<think>…</think>\n\nĐáp án đúng là: C" if "Câu hỏi" in request.messages[-1]["content"] else ""

    with ChatServer(ScriptedBackend(reply), port=0) as server:
        report = endpoint_run(server.url, tmp_path / "out", f"data.path={test_split}")
    assert "overall" not in report and report["unparseable"] == 0
    with open(tmp_path / "out" / "submission.csv", newline="", encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == [{"id": r["id"], "answer": "C"} for r in rows]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n" + test_split.read_text().splitlines()[1] + "\n")
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: 'answer' is missing here but not on the first row"):
        read_questions(mixed, read_subjects())
