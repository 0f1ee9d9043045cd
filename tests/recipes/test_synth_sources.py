"""recipes/synth.py from what teams already have: an existing question set (the known answer is the rejection
check), an LLM-written syllabus, verifiable-constraint tasks, and the LLM quality filter; all resumable."""
import json
import threading
from collections import Counter

import yaml

from qforge.engine.data.formats import read_conversations
from qforge.engine.data.render import tools_system_prompt
from scripted_server import ChatServer, ScriptedBackend
from qforge.recipes.synth import main

SEEDS = [  # crawled multiple-choice questions with known answers (VMLU format)
    {"id": "01-0001", "question": "Thủ đô của Việt Nam là thành phố nào?",
     "choices": ["A. Huế", "B. Hà Nội", "C. Đà Nẵng", "D. Cần Thơ"], "answer": "B"},
    {"id": "01-0002", "question": "Số nào là số nguyên tố?", "choices": ["A. 4", "B. 9", "C. 7", "D. 15"],
     "answer": "C"},
]
TASKS = {"tasks": [
    {"name": "multiple_choice", "instructions": "Câu hỏi trắc nghiệm", "samples": 3, "keep": 1},
    {"name": "follow", "instructions": "#follow yêu cầu có ràng buộc kiểm chứng được", "count": 1,
     "answer_check": "constraints", "samples": 2, "keep": 1},
]}
OUTLINE = {"Tiểu học": {"Lớp 4": ["Khoa học"]}}
CONVERT = {"type": "function", "function": {"name": "doi_don_vi", "description": "Đổi đơn vị", "parameters": {
    "type": "object", "properties": {"gia_tri": {"type": "number"}, "tu": {"type": "string"}, "sang": {"type": "string"}},
    "required": ["gia_tri", "tu", "sang"]}}}
CALL_TASK = {"tasks": [{"name": "calls", "instructions": "#calls", "count": 1, "answer_check": "tool_call",
                        "samples": 2, "keep": 1}]}


class Writer:
    def __init__(self):
        self.calls, self.lock = Counter(), threading.Lock()
        self.turns = Counter()

    def __call__(self, request):
        prompt = request.messages[-1]["content"]
        stage = ("syllabus" if prompt.startswith("Liệt kê") else "questions" if prompt.startswith("Soạn") else
                 "reasoning" if prompt.startswith("[Question]") else "quality" if prompt.startswith("[Câu hỏi]") else
                 "responses")
        with self.lock:
            self.calls[stage] += 1
            turn = self.turns[prompt]
            self.turns[prompt] += 1
        if stage == "syllabus":
            return json.dumps(["Nước", "Không khí", "Âm thanh"], ensure_ascii=False)
        if stage == "questions" and "#calls" in prompt:
            return json.dumps([{"question": "Đổi giúp em 2,5 km sang mét.", "tools": [CONVERT], "reference_calls": [
                {"name": "doi_don_vi", "arguments": {"gia_tri": 2.5, "tu": "km", "sang": "m"}}]}], ensure_ascii=False)
        if stage == "questions":
            topic = prompt.split('chủ đề "')[1].split('"')[0]
            return json.dumps([{"question": f"Viết đúng hai câu về chủ đề {topic}, không dùng dấu phẩy.",
                                "constraints": [{"type": "sentence_count", "min": 2, "max": 2},
                                                {"type": "no_commas"}]}], ensure_ascii=False)
        if stage == "reasoning":
            return "Được rồi, mình xét từng lựa chọn rồi chọn phương án đúng."
        if stage == "quality":
            return "Tốt. [[8]]" if "Hà Nội" in prompt else "Kém. [[3]]"
        if "2,5 km" in prompt:  # the tools reach the model in Qwen3's own system-prompt form
            assert request.messages[0]["content"].endswith(tools_system_prompt([CONVERT], None).split("# Tools")[1])
            return ['<tool_call>\n{"name": "doi_don_vi", "arguments": {"gia_tri": 25, "tu": "km", "sang": "m"}}\n'
                    '</tool_call>', 'Em đợi chút nhé.\n<tool_call>\n{"name": "doi_don_vi", "arguments": '
                    '{"gia_tri": 2.5, "tu": "km", "sang": "m"}}\n</tool_call>'][turn % 2]
        if "Thủ đô" in prompt:  # wrong, then right, then right again (surplus)
            return ["Đáp án: A", "Thủ đô là Hà Nội. Đáp án: B", "Đáp án: B"][turn % 3]
        if "nguyên tố" in prompt:
            return ["Không chắc lắm.", "7 chỉ chia hết cho 1 và 7. Đáp án: C", "Đáp án: C"][turn % 3]
        if "Viết đúng hai câu" in prompt:  # one sample breaks a constraint (a comma), the other meets both
            topic = prompt.split("chủ đề ")[1].split(",")[0]
            return [f"{topic} rất quan trọng, ai cũng cần. Hãy học thật kỹ.",
                    f"{topic} rất quan trọng với học sinh. Chúng em cần học thật kỹ."][turn % 2]
        raise AssertionError(prompt)


def run(tmp_path, url, *overrides, tasks_list=TASKS):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump(tasks_list, allow_unicode=True), encoding="utf-8")
    backend = f"{{name: local, endpoint: {{base_url: '{url}', model: writer}}, cache_namespace: sources}}"
    main(["--config", "recipes/configs/synth.yaml", f"tasks={tasks}", f"output.dir={tmp_path / 'out'}",
          f"backends=[{backend}]", "client.max_retries=0", "filters.near_duplicate_threshold=null",
          "filters.reasoning.min_chars=5", *overrides])
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows, json.loads((out / "report.json").read_text(encoding="utf-8")), out


def test_seed_questions_are_answered_with_the_known_letter_as_the_check_and_quality_filtered(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SEEDS), encoding="utf-8")
    writer = Writer()
    with ChatServer(ScriptedBackend(writer, name="writer"), port=0) as server:
        args = [f"seeds.path={seeds}", "filters.min_quality=6"]
        rows, report, out = run(tmp_path, server.url, *args)
        assert writer.calls["questions"] == 0  # no question writing
        counts = report["counts"]["multiple_choice"]
        # Thủ đô: A wrong, B kept, B surplus; nguyên tố: no letter, C kept (but rated 3 → dropped), C surplus.
        assert counts["reasons"] == {"wrong_answer": 1, "surplus_sample": 2, "no_final_answer": 1, "low_quality": 1}
        assert counts["kept"] == 1 and counts["kept"] + counts["dropped"] == report["requested_samples"]["multiple_choice"]
        [row] = rows
        assert row["reference_answer"] == "B" and row["quality"] == 8
        assert row["messages"][0]["content"].startswith("Thủ đô của Việt Nam là thành phố nào?\nA. Huế\nB. Hà Nội")
        assert row["provenance"]["questions"] == {"seed": str(seeds), "id": "01-0001"}
        # Rerun: every stage is reused, nothing is asked again.
        before = sum(writer.calls.values())
        again, report2, _ = run(tmp_path, server.url, *args)
        assert again == rows and sum(writer.calls.values()) == before
        assert report2["usage"]["quality"]["reused_stored_output"]


def test_llm_syllabus_and_constraint_tasks(tmp_path):
    outline = tmp_path / "outline.yaml"
    outline.write_text(yaml.safe_dump(OUTLINE, allow_unicode=True), encoding="utf-8")
    writer = Writer()
    with ChatServer(ScriptedBackend(writer, name="writer"), port=0) as server:
        rows, report, out = run(tmp_path, server.url, f"syllabus_outline={outline}", "topics_per_subject=2",
                                tasks_list={"tasks": TASKS["tasks"][1:]})
    assert yaml.safe_load((out / "syllabus.yaml").read_text(encoding="utf-8")) == {
        "Tiểu học": {"Lớp 4": {"Khoa học": ["Nước", "Không khí"]}}}
    follow = [r for r in rows if r["task"] == "follow"]
    assert len(follow) == 2  # one per topic; the reply with a comma was rejected by the code check
    assert all("," not in r["messages"][1]["content"] for r in follow)
    assert follow[0]["constraints"] == [{"type": "sentence_count", "min": 2, "max": 2}, {"type": "no_commas"}]
    assert report["counts"]["follow"]["reasons"] == {"wrong_answer": 2}
    assert writer.calls["syllabus"] == 1 and writer.calls["quality"] == 0


def test_function_calling_task_keeps_the_reference_call_as_structured_tool_calls(tmp_path, qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    from qforge.engine.data import ChatTemplate

    writer = Writer()
    with ChatServer(ScriptedBackend(writer, name="writer"), port=0) as server:
        rows, report, out = run(tmp_path, server.url, "topics_per_task=1", "filters.check_reasoning_answer=false",
                                tasks_list=CALL_TASK)
    assert report["counts"]["calls"]["reasons"] == {"wrong_answer": 1}  # 25 instead of 2.5
    [row] = rows
    assert row["tools"] == [CONVERT]
    assistant = row["messages"][1]
    assert assistant["content"] == "Em đợi chút nhé." and assistant["tool_calls"] == [{"type": "function", "function": {
        "name": "doi_don_vi", "arguments": {"gia_tri": 2.5, "tu": "km", "sang": "m"}}}]
    # The row trains as Qwen3's template renders it with tools (transformers as the oracle).
    [(_, conversation)] = list(read_conversations(out / "data.jsonl"))
    expected = AutoTokenizer.from_pretrained(qwen_tokenizer_dir).apply_chat_template(
        row["messages"], tools=row["tools"], tokenize=False)
    assert ChatTemplate.from_pretrained(qwen_tokenizer_dir).render(conversation, tools=conversation.tools) == expected
