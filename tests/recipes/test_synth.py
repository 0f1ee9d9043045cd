"""recipes/synth.py end to end against the local server on 127.0.0.1 with a scripted model.

The scripted model is steered by markers in the task instructions, so every filter fires on a known row;
the tests check the kept rows, every drop reason per task, the report's arithmetic, and resume.
"""
import json
import shutil
import threading
from collections import Counter

import pytest
import yaml

from qforge.engine.data.formats import read_conversations
from scripted_server import ChatServer, RequestError, ScriptedBackend
from qforge.recipes.synth import main
from qwen3_fixtures import save_hf_qwen3, run_recipe_main

SYLLABUS = {"Tiểu học": {"Lớp 3": {"Toán": ["Phép cộng", "Phép nhân"], "Tiếng Việt": ["Kể chuyện"]}}}
TASKS = {"tasks": [
    {"name": "math", "instructions": "#math bài toán có đáp số", "count": 3, "subjects": ["Toán"],
     "answer_check": "numeric", "samples": 3, "keep": 1},
    {"name": "explain", "instructions": "#explain giải thích", "count": 2, "subjects": ["Tiếng Việt"]},
    {"name": "flaky", "instructions": "#flaky viết đoạn văn", "count": 1, "subjects": ["Tiếng Việt"]},
    {"name": "broken", "instructions": "#broken", "count": 2, "subjects": ["Tiếng Việt"]},
    {"name": "refused", "instructions": "#refused", "count": 1, "subjects": ["Tiếng Việt"]},
    {"name": "repeat", "instructions": "#repeat", "count": 1, "subjects": ["Tiếng Việt"], "samples": 3, "keep": 2},
]}
APPLES = "An có 3 quả táo, mẹ cho An thêm 4 quả táo nữa. Hỏi An có tất cả bao nhiêu quả táo?"
QUESTIONS = {  # (task marker, topic) -> question list reply
    ("#math", "Phép cộng"): [{"question": APPLES, "answer": "7"},
                             {"question": "How many apples does An have in total?", "answer": 7},
                             {"question": APPLES.replace("táo?", "táo vậy?"), "answer": "7 quả"}],
    ("#math", "Phép nhân"): [{"question": "Tính 12 × 3 bằng bao nhiêu? 这是", "answer": "36"},
                             {"question": "Mỗi hộp có 12 cái bút. Hỏi 3 hộp có bao nhiêu cái bút?", "answer": "36"}],
    ("#explain", "Kể chuyện"): [{"question": "Vì sao khi kể chuyện cần có mở đầu, diễn biến và kết thúc?"},
                               {"question": "Hãy giải thích thế nào là kể chuyện theo tranh."}],
    ("#flaky", "Kể chuyện"): [{"question": "Em hãy viết một đoạn văn ngắn kể về người bạn thân của em."}],
    ("#repeat", "Kể chuyện"): [{"question": "Kể tên ba nhân vật trong truyện Tấm Cám."}],
}
RESPONSES = {  # question -> replies in turn (samples of one question arrive in any order: same multiset)
    APPLES: ["An có 3 + 4 = 8 quả. Đáp án: 8", "Ta có 3 + 4 = 7. Đáp án: 7", "3 + 4 = 7 nên Đáp án: 7"],
    "Mỗi hộp có 12 cái bút. Hỏi 3 hộp có bao nhiêu cái bút?":
        ["Ba hộp có rất nhiều bút.", "Số bút là 12 × 3 = 36 cái. Đáp án: 36", "Đáp án: 36"],
    "Vì sao khi kể chuyện cần có mở đầu, diễn biến và kết thúc?":
        ["Vì câu chuyện có bố cục rõ ràng thì người nghe dễ theo dõi và hiểu được nội dung."],
    "Hãy giải thích thế nào là kể chuyện theo tranh.": ["Kể chuyện theo tranh là nhìn tranh rồi kể lại. " * 20],
    "Em hãy viết một đoạn văn ngắn kể về người bạn thân của em.":
        ["Bạn thân của em tên là Lan. Lan học rất giỏi và luôn giúp đỡ mọi người."],
    "Kể tên ba nhân vật trong truyện Tấm Cám.": ["Ba nhân vật là Tấm, Cám và bà dì ghẻ."],  # the same every time
}
REASONING = {  # a word of the response -> the reconstructed thinking
    "Đáp án: 7": "Okay, An has 3 apples and gets 4 more, so 3 + 4 = 7. The answer is 7.",
    "Đáp án: 36": "Okay, 12 pens per box, 3 boxes: 12 × 3 = 35. So 35 pens.",  # contradicts the answer
    "bố cục": "Được rồi, câu hỏi về bố cục của một câu chuyện, cần nêu lợi ích cho người nghe.",
    "Lan": "Okay, I need a short paragraph about a friend; 好的 let me write about Lan.",  # CJK in reasoning
    "Tấm": "Okay, the story of Tấm and Cám: the main characters are Tấm, Cám and the stepmother.",
}
RETRY_MARK = "Câu trả lời trước không dùng được"


class ScriptedWriter:
    """The scripted model behind every stage; counts the requests it answered."""

    def __init__(self):
        self.outage = False  # True: the explain question's responses fail with HTTP 503
        self.calls = Counter()
        self.turns = Counter()
        self.lock = threading.Lock()

    def __call__(self, request):
        messages = request.messages
        prompt = messages[-1]["content"]
        if RETRY_MARK in prompt:
            original = messages[-3]["content"]
            return self.reply("retry", "Vẫn chưa phải JSON." if "#broken" in original else self.questions(original))
        if prompt.startswith("Soạn"):
            if "#refused" in prompt:
                raise RequestError("refused by policy", 400)
            if "#broken" in prompt or "#flaky" in prompt:
                return self.reply("questions", "Đây là các câu hỏi: 1. ... 2. ...")  # not JSON
            return self.reply("questions", self.questions(prompt))
        if prompt.startswith("[Question]"):
            return self.reply("reasoning", next(v for k, v in REASONING.items() if k in prompt))
        if self.outage and prompt.startswith("Vì sao khi kể chuyện"):
            raise RequestError("temporarily overloaded", 503)
        with self.lock:
            turn = self.turns[prompt]
            self.turns[prompt] += 1
        return self.reply("responses", RESPONSES[prompt][turn % len(RESPONSES[prompt])])

    def questions(self, prompt):
        key = next(k for k in QUESTIONS if k[0] in prompt and f'"{k[1]}"' in prompt)
        return json.dumps(QUESTIONS[key], ensure_ascii=False)

    def reply(self, stage, text):
        with self.lock:
            self.calls[stage] += 1
        return text


@pytest.fixture
def scripted():
    writer = ScriptedWriter()
    with ChatServer(ScriptedBackend(writer, name="scripted-writer"), port=0) as server:
        yield writer, server.url


def run_synth(tmp_path, url, *overrides, extra_backends=""):
    syllabus, tasks = tmp_path / "syllabus.yaml", tmp_path / "tasks.yaml"
    syllabus.write_text(yaml.safe_dump(SYLLABUS, allow_unicode=True), encoding="utf-8")
    tasks.write_text(yaml.safe_dump(TASKS, allow_unicode=True), encoding="utf-8")
    backend = f"{{name: local, endpoint: {{base_url: '{url}', model: scripted-writer}}, cache_namespace: test, " \
              f"price_per_million: {{prompt: 1.0, completion: 2.0}}}}"
    run_recipe_main(main, ["--config", "recipes/configs/synth.yaml", f"syllabus={syllabus}", f"tasks={tasks}",
          f"output.dir={tmp_path / 'out'}", f"backends=[{backend}{extra_backends}]", "filters.response.max_chars=300",
          "client.max_retries=0", *overrides])
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows, json.loads((out / "report.json").read_text(encoding="utf-8")), out


EXPECTED = {
    "math": {"kept": 1, "dropped": 17, "reasons": {
        "question_not_vietnamese": 3, "question_near_duplicate": 3, "question_cjk": 3, "question_list_short": 3,
        "wrong_answer": 1, "no_final_answer": 1, "surplus_sample": 2, "reasoning_answer_mismatch": 1}},
    "explain": {"kept": 1, "dropped": 1, "reasons": {"response_too_long": 1}},
    "flaky": {"kept": 0, "dropped": 1, "reasons": {"reasoning_cjk": 1}},
    "broken": {"kept": 0, "dropped": 2, "reasons": {"question_list_malformed": 2}},
    "refused": {"kept": 0, "dropped": 1, "reasons": {"question_list_request_failed": 1}},
    "repeat": {"kept": 1, "dropped": 2, "reasons": {"response_exact_duplicate": 2}},  # keep 2 of 3: no second
}


def test_pipeline_keeps_and_drops_every_row_for_its_reason(tmp_path, scripted):
    writer, url = scripted
    rows, report, out = run_synth(tmp_path, url)

    counts = report["counts"]
    assert {task: counts[task] for task in EXPECTED} == EXPECTED
    for task, requested in report["requested_samples"].items():  # the bookkeeping adds up
        assert counts[task]["kept"] + counts[task]["dropped"] == requested
    assert counts["ALL"]["kept"] == 3 and counts["ALL"]["dropped"] == 24

    by_task = {row["task"]: row for row in rows}
    math = by_task["math"]
    assert math["messages"][0] == {"role": "user", "content": APPLES}
    assert math["messages"][1]["content"].endswith("Đáp án: 7")
    assert math["messages"][1]["reasoning_content"] == REASONING["Đáp án: 7"]
    assert math["reference_answer"] == "7"
    assert math["topic"] == {"level": "Tiểu học", "grade": "Lớp 3", "subject": "Toán", "topic": "Phép cộng"}
    assert math["provenance"] == {
        stage: {"backend": "local", "model": "scripted-writer", "prompt_version": version}
        for stage, version in (("questions", "q-v1"), ("responses", "r-v1"), ("reasoning", "t-v1"))}
    assert by_task["explain"]["messages"][0]["content"].startswith("Vì sao")
    # the output is training data as the FFT recipe reads it
    parsed = list(read_conversations(out / "data.jsonl"))
    assert len(parsed) == 3 and all(isinstance(messages, list) for _, messages in parsed)

    # the malformed flaky list was re-asked once with the error, the broken one retries+1 times in all
    assert writer.calls["retry"] == 1 + 2
    drops = [json.loads(line) for line in (out / "drops.jsonl").read_text(encoding="utf-8").splitlines()]
    broken = next(d for d in drops if d["task"] == "broken")
    assert broken["reason"] == "question_list_malformed" and "not JSON" in broken["detail"]
    near = next(d for d in drops if d["reason"] == "question_near_duplicate")
    assert near["detail"].startswith("of math-") and near["id"].endswith("-q2")
    repeats = [d for d in drops if d["task"] == "repeat"]
    assert [(d["id"][-3:], d["detail"][-3:]) for d in repeats] == [("-s1", "-s0"), ("-s2", "-s0")]

    usage = report["usage"]
    assert usage["responses"]["replies"] == 3 + 3 + 2 + 1 + 3  # math: 2 questions × 3 samples; repeat: 3 samples
    assert usage["reasoning"]["replies"] == 5
    tokens = sum(u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0 for u in usage.values())
    assert report["total_cost"] == pytest.approx(tokens / 1e6) and tokens > 0
    assert "| math | 1 | 17 |" in (out / "report.md").read_text(encoding="utf-8")


def test_rerun_resumes_from_stage_files_and_the_reply_cache(tmp_path, scripted):
    writer, url = scripted
    first, _, out = run_synth(tmp_path, url)
    sent = sum(writer.calls.values())

    again, report, _ = run_synth(tmp_path, url)  # finished stages are reused: nothing is sent
    assert again == first and sum(writer.calls.values()) == sent
    assert all(u["reused_stored_output"] for u in report["usage"].values())

    (out / "stages" / "reasoning.meta.json").unlink()  # as if the run died before saving the stage
    again, report, _ = run_synth(tmp_path, url)
    assert again == first and sum(writer.calls.values()) == sent  # every reply came from the cache
    assert report["usage"]["reasoning"]["cache_hits"] == 5 and report["usage"]["reasoning"]["requests_sent"] == 0

    changed, report, _ = run_synth(tmp_path, url, "stages.reasoning.prompt_version=t-v2",
                                   "stages.reasoning.user='[Question]\n{question}\n\n[Answer]\n{response}'")
    assert sum(writer.calls.values()) == sent + 5 and writer.calls["reasoning"] == 10  # only reasoning reran
    assert report["usage"]["questions"]["reused_stored_output"] and report["usage"]["responses"]["reused_stored_output"]
    assert {row["provenance"]["reasoning"]["prompt_version"] for row in changed} == {"t-v2"}
    assert [row["messages"][0] for row in changed] == [row["messages"][0] for row in first]


def test_rows_lost_to_an_outage_are_asked_again_on_the_next_run(tmp_path, scripted):
    writer, url = scripted
    writer.outage = True
    rows, report, out = run_synth(tmp_path, url)
    assert report["counts"]["explain"]["reasons"] == {"response_request_failed": 1, "response_too_long": 1}
    assert report["usage"]["responses"]["transient_failures"] == 1
    assert "run the same command again" in (out / "report.md").read_text(encoding="utf-8")
    assert not (out / "stages" / "responses.meta.json").exists() and len(rows) == 2
    sent = Counter(writer.calls)

    writer.outage = False
    rows, report, _ = run_synth(tmp_path, url)
    assert {task: report["counts"][task] for task in EXPECTED} == EXPECTED
    assert writer.calls - sent == Counter({"responses": 1, "reasoning": 1})  # only what the outage lost
    assert sorted(row["task"] for row in rows) == ["explain", "math", "repeat"]


def test_config_errors_name_the_key(tmp_path, scripted):
    _, url = scripted
    with pytest.raises(SystemExit, match="stages.responses.user uses unknown placeholders"):
        run_synth(tmp_path, url, "stages.responses.user='{question} {answer}'")
    with pytest.raises(SystemExit, match="stages.reasoning.backend 'api' is not one of backends"):
        run_synth(tmp_path, url, "stages.reasoning.backend=api")
    with pytest.raises(SystemExit, match="price_per_million: unknown keys \\['output'\\]"):
        run_synth(tmp_path, url, extra_backends=", {name: b, endpoint: {base_url: x, model: m}, "
                                                 "price_per_million: {output: 1}}")


def test_reasoning_stage_on_a_local_checkpoint_served_on_loopback(tmp_path, scripted, qwen_tokenizer_dir):
    """Backends per stage: scripted questions and responses, reasoning from a tiny random Qwen3 checkpoint
    that the recipe serves on 127.0.0.1 itself (the offline default). Its text is noise, cut at the stop
    string "e" so that it ends; the bookkeeping is what is checked."""
    writer, url = scripted
    checkpoint = save_hf_qwen3(tmp_path / "tiny-thinker", seed=3, vocab_size=151936, hidden_size=32,
                               intermediate_size=64, head_dim=16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_tokenizer_dir / name, checkpoint / name)
    local = f", {{name: tiny, endpoint: {{path: '{checkpoint}'}}, params: {{temperature: 1.0, seed: 0, stop: [e]}}}}"
    overrides = ["stages.reasoning.backend=tiny", "stages.reasoning.max_tokens=32", "stages.reasoning.retries=0",
                 "filters.reasoning={min_chars: 1, language: any, allow_cjk: true}",
                 "filters.check_reasoning_answer=false"]
    rows, report, out = run_synth(tmp_path, url, *overrides, extra_backends=local)
    usage = report["usage"]["reasoning"]
    assert usage["backend"] == "tiny" and usage["model"] == "tiny-thinker" and usage["replies"] == 5
    assert usage["requests_sent"] == 5 and usage["completion_tokens"] > 0 and writer.calls["reasoning"] == 0
    reasoning_drops = report["counts"]["ALL"]["reasons"].get("reasoning_malformed", 0)
    assert len(rows) + reasoning_drops == 5 and rows  # every row kept or dropped as malformed (truncated)
    for row in rows:
        assert row["provenance"]["reasoning"] == {"backend": "tiny", "model": "tiny-thinker", "prompt_version": "t-v1"}
        assert row["messages"][1]["reasoning_content"] and "e" not in row["messages"][1]["reasoning_content"]
    again, report, _ = run_synth(tmp_path, url, *overrides, extra_backends=local)
    assert again == rows and report["usage"]["reasoning"]["reused_stored_output"]
