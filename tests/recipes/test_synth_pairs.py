"""recipes/synth.py's own rejection sampling → DPO pairs (pairs.enabled), against the scripted loopback server.

Per question the scripted model answers its k samples in a fixed order (client.concurrency=1), some right and
some wrong; the test checks each pair with the numeric verifier itself (chosen passes, rejected fails), that
only the rejected samples a pair uses are sent to the reasoning stage, that recipes/dpo.py's loader reads the
file, and that a rerun asks the model nothing.
"""
import json
import re
import threading
from collections import Counter

import pytest
import yaml

from qforge.engine.data import ChatTemplate
from qforge.engine.data.preference import load_pairs
from qforge.engine.thinking import join_think
from qforge.recipes.synth import main
from qforge.recipes.verifiers import get_verifier
from qwen3_fixtures import run_recipe_main, save_chat_checkpoint
from scripted_server import ChatServer, ScriptedBackend

SYLLABUS = {"Tiểu học": {"Lớp 2": {"Toán": ["Phép cộng"], "Tiếng Việt": ["Kể chuyện"]}}}
TASKS = {"tasks": [
    {"name": "math", "instructions": "#math bài toán có đáp số", "count": 4, "subjects": ["Toán"],
     "answer_check": "numeric", "samples": 4, "keep": 1},
    {"name": "explain", "instructions": "#explain giải thích", "count": 1, "subjects": ["Tiếng Việt"]},
]}
CANDY = "Lan có 5 cái kẹo, mẹ cho Lan thêm 3 cái kẹo nữa. Hỏi Lan có tất cả bao nhiêu cái kẹo?"
CLASS = "Một lớp học có 20 bạn nam và 15 bạn nữ. Hỏi lớp học đó có tất cả bao nhiêu bạn?"
BOOKS = "Bình có 10 quyển vở, Bình cho em gái 4 quyển vở. Hỏi Bình còn lại mấy quyển vở?"
FLOWERS = "Hoa hái được 7 bông hoa cúc và 6 bông hoa hồng. Hỏi Hoa hái được bao nhiêu bông hoa?"
STORY = "Vì sao khi kể chuyện cần có mở đầu, diễn biến và kết thúc?"
ANSWERS = {CANDY: "8", CLASS: "35", BOOKS: "6", FLOWERS: "13"}
RESPONSES = {  # question -> its samples s0, s1, ... in order
    CANDY: ["Lan có 5 + 3 = 9 cái kẹo. Đáp án: 9", "Ta có 5 + 3 = 8. Đáp án: 8",
            "Lan có tất cả 5 + 3 = 8 cái kẹo. Đáp án: 8", "Lan có rất nhiều kẹo."],  # s3: no final answer
    CLASS: ["Lớp có 20 + 15 = 35 bạn. Đáp án: 35"] * 4,  # no failing sample
    BOOKS: ["Bình còn 10 - 4 = 5 quyển. Đáp án: 5", "Bình còn 10 - 4 = 7 quyển. Đáp án: 7"] * 2,  # none passing
    FLOWERS: ["Hoa hái được 7 + 6 = 13 bông. Đáp án: 13", "Hoa hái được 7 + 6 = 12 bông. Đáp án: 12",
              "Hoa hái được 7 + 6 = 14 bông. Đáp án: 14", "Đáp án: 13"],
    STORY: ["Vì câu chuyện có bố cục rõ ràng thì người nghe dễ theo dõi và hiểu được nội dung."],
}


class ScriptedModel:
    """Questions, responses in turn, and a reasoning that reaches the response's number (for the math answer
    without a number, a reasoning with Chinese characters in it, which the reasoning filter refuses)."""

    def __init__(self):
        self.calls = Counter()
        self.turns = Counter()
        self.reasoned = []
        self.lock = threading.Lock()

    def __call__(self, request):
        prompt = request.messages[-1]["content"]
        with self.lock:
            if prompt.startswith("Soạn"):
                self.calls["questions"] += 1
                if "#math" in prompt:
                    return json.dumps([{"question": q, "answer": a} for q, a in ANSWERS.items()], ensure_ascii=False)
                return json.dumps([{"question": STORY, "answer": ""}], ensure_ascii=False)
            if prompt.startswith("[Question]"):
                self.calls["reasoning"] += 1
                response = prompt.split("[Final answer the thinking must lead to]\n", 1)[1]
                self.reasoned.append(response)
                number = re.search(r"Đáp án: (\d+)", response)
                if response == RESPONSES[CANDY][3]:
                    return "Được rồi, 好的, câu này mình chỉ trả lời chung chung thôi."
                if number is None:
                    return "Được rồi, câu hỏi về bố cục của một câu chuyện, cần nêu lợi ích cho người nghe."
                return f"Được rồi, mình tính từng bước cho bài này, kết quả cuối cùng là {number.group(1)}."
            self.calls["responses"] += 1
            turn, self.turns[prompt] = self.turns[prompt], self.turns[prompt] + 1
            return RESPONSES[prompt][turn % len(RESPONSES[prompt])]


@pytest.fixture
def scripted():
    model = ScriptedModel()
    with ChatServer(ScriptedBackend(model, name="scripted"), port=0) as server:
        yield model, server.url


def run_synth(tmp_path, url, name, *overrides):
    syllabus, tasks = tmp_path / "syllabus.yaml", tmp_path / "tasks.yaml"
    syllabus.write_text(yaml.safe_dump(SYLLABUS, allow_unicode=True), encoding="utf-8")
    tasks.write_text(yaml.safe_dump(TASKS, allow_unicode=True), encoding="utf-8")
    out = tmp_path / name
    backend = f"{{name: local, endpoint: {{base_url: '{url}', model: scripted}}, cache_namespace: test}}"
    run_recipe_main(main, ["--config", "recipes/configs/synth.yaml", f"syllabus={syllabus}", f"tasks={tasks}",
                           f"output.dir={out}", f"backends=[{backend}]", "filters.response.max_chars=300",
                           "client.max_retries=0", "client.concurrency=1", "pairs.enabled=true", *overrides])
    read = lambda f: [json.loads(line) for line in (out / f).read_text(encoding="utf-8").splitlines()] \
        if (out / f).exists() else None  # noqa: E731
    return out, read("data.jsonl"), read("pairs.jsonl"), json.loads((out / "report.json").read_text())


def test_rejection_sampling_writes_verified_pairs_with_reasoning_on_both_sides(tmp_path, scripted):
    model, url = scripted
    out, rows, pairs, report = run_synth(tmp_path, url, "out", "pairs.per_question=2")
    print("\n" + (out / "report.md").read_text(encoding="utf-8"))

    # chosen = a kept row, rejected = a sample that failed, each checked by the verifier itself
    verifier = get_verifier("numeric")
    for pair in pairs:
        reference = {"answer": ANSWERS[pair["messages"][-1]["content"]]}
        chosen, rejected = pair["chosen"], pair["rejected"]
        assert chosen["reasoning_content"] and rejected["reasoning_content"]
        assert verifier(join_think(chosen["reasoning_content"], chosen["content"]), reference).passed
        assert not verifier(join_think(rejected["reasoning_content"], rejected["content"]), reference).passed
        assert pair["task"] == "math" and pair["verifier"] == "numeric" and pair["rejected_status"] == "fail"
    assert {(p["chosen_id"][-5:], p["rejected_id"][-5:]) for p in pairs} == {
        ("q0-s1", "q0-s0"), ("q3-s0", "q3-s1"), ("q3-s0", "q3-s2")}
    by_rejected = {p["rejected"]["content"]: p for p in pairs}
    assert set(by_rejected) == {RESPONSES[CANDY][0], RESPONSES[FLOWERS][1], RESPONSES[FLOWERS][2]}
    assert by_rejected[RESPONSES[FLOWERS][1]]["rejected"]["reasoning_content"].endswith("là 12.")
    assert {p["chosen"]["content"] for p in pairs} == {RESPONSES[CANDY][1], RESPONSES[FLOWERS][0]}
    kept = {row["messages"][-1]["content"]: row["messages"][-1] for row in rows}
    assert all(kept[p["chosen"]["content"]] == p["chosen"] for p in pairs)  # the SFT row itself

    # the rejected samples in pairs, and only they, went through the reasoning stage; the one whose
    # reasoning the filter refuses costs its pair
    summary = report["pairs"]
    assert summary["rejected_reasoning"] == {"asked": 4, "usable": 3, "unusable": {"reasoning_cjk": 1}}
    assert summary["pairs"] == 3 and summary["pairs_lost"] == 1 and summary["per_task"] == {"math": {"numeric": 3}}
    assert summary["questions"] == 4 and len(summary["questions_without_passing_sample"]) == 1
    assert len(summary["questions_without_failing_sample"]) == 1
    assert report["usage"]["rejected_reasoning"]["replies"] == 4 and model.calls["reasoning"] == 4 + 4
    assert RESPONSES[BOOKS][0] not in model.reasoned  # a question without a passing sample costs nothing
    # the SFT bookkeeping is untouched: every requested sample is kept or dropped once
    for task, requested in report["requested_samples"].items():
        assert report["counts"][task]["kept"] + report["counts"][task]["dropped"] == requested
    assert len(rows) == 4 and "## Preference pairs" in (out / "report.md").read_text(encoding="utf-8")

    # recipes/dpo.py's loader reads the file as it is: both sides supervised
    checkpoint = save_chat_checkpoint(tmp_path / "model", seed=1)
    loaded, loaded_summary = load_pairs([out / "pairs.jsonl"], ChatTemplate.from_pretrained(checkpoint))
    assert loaded_summary.num_rows == 3 and all(p.chosen.num_loss_tokens and p.rejected.num_loss_tokens
                                                for p in loaded)

    # a rerun reuses every stored stage: nothing is asked again
    sent = Counter(model.calls)
    _, again_rows, again, report = run_synth(tmp_path, url, "out", "pairs.per_question=2")
    assert model.calls == sent and again == pairs and again_rows == rows
    assert all(u["reused_stored_output"] for u in report["usage"].values())


def test_one_pair_per_question_reasons_only_the_rejected_samples_it_uses(tmp_path, scripted):
    model, url = scripted
    _, _, pairs, report = run_synth(tmp_path, url, "one", "pairs.per_question=1")
    assert sorted(p["rejected"]["content"] for p in pairs) == sorted([RESPONSES[CANDY][0], RESPONSES[FLOWERS][1]])
    assert report["pairs"]["rejected_reasoning"] == {"asked": 2, "usable": 2, "unusable": {}}
    assert model.calls["reasoning"] == 4 + 2


def test_pairs_off_writes_no_pairs_and_asks_no_more_reasoning(tmp_path, scripted):
    model, url = scripted
    _, rows, pairs, report = run_synth(tmp_path, url, "off", "pairs.enabled=false")
    assert pairs is None and len(rows) == 4 and model.calls["reasoning"] == 4
    assert "pairs" not in report and "rejected_reasoning" not in report["usage"]
