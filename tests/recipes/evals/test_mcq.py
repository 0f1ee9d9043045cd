"""VMLU-format reading, the official prompt, answer-letter extraction and scoring (no model needed)."""
import json
from string import Template

import pytest

from qforge.recipes.evals.mcq import (answer_after_thinking, extract_letter, official_prompt, read_questions,
                                read_subjects, score)

SUBJECTS = {"04": ("elementary_mathematics", "STEM"), "22": ("elementary_history", "Humanities")}


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_vmlu_and_mmlu_style_rows(tmp_path):
    path = write_rows(tmp_path / "q.jsonl", [
        {"id": "04-0001", "question": "1 + 1 = ?", "choices": ["A. 1", "B. 2", "C. 3"], "answer": "B"},
        {"id": "x7", "question": "Thủ đô?", "choices": ["Huế", "Hà Nội", "Vinh", "Hội An", "Sa Pa"], "answer": 1,
         "subject": "elementary_history"},
        {"id": "99-0001", "question": "?", "choices": ["A) có", "B) không"], "answer": " a "},
    ])
    first, second, third = read_questions(path, SUBJECTS)
    assert (first.subject, first.category, first.letters, first.answer) == ("elementary_mathematics", "STEM", "ABC", "B")
    assert second.choices[1] == "B. Hà Nội" and second.answer == "B" and second.category == "Humanities"
    assert (third.subject, third.category, third.answer) == ("99", "Unknown", "A")


@pytest.mark.parametrize("row, message", [
    ("{not json", r"q.jsonl:2: invalid JSON"),
    ({"id": "04-1", "question": "?", "choices": ["A. x", "B. y"], "answer": "C"}, r"q.jsonl:2: 'answer'"),
    ({"id": "04-1", "question": "", "choices": ["A. x", "B. y"], "answer": "A"}, r"q.jsonl:2: 'question'"),
    ({"id": "04-1", "question": "?", "choices": ["A. x", "y"], "answer": "A"}, "mixes lettered"),
    ({"id": "04-1", "question": "?", "choices": ["A. x"], "answer": "A"}, "2 to 5 strings"),
    ({"id": "04-0", "question": "?", "choices": ["A. x", "B. y"], "answer": "A"}, "unique"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    good = {"id": "04-0", "question": "?", "choices": ["A. x", "B. y"], "answer": "A"}
    with pytest.raises(ValueError, match=message):
        read_questions(write_rows(tmp_path / "q.jsonl", [good, row]), SUBJECTS)


def test_official_prompt_is_vmlu_template_for_five_options(tmp_path):
    """VMLU's own template (code_benchmark/test_prompt.py), filled as its script does."""
    vmlu = Template('$preamble\nCâu hỏi: $prompt\n\n Các lựa chọn:\n$a\n $b\n $c\n $d\n $e\nĐáp án đúng là: ')
    choices = ["A. một", "B. hai", "C. ba", "D. bốn", "E. năm"]
    path = write_rows(tmp_path / "q.jsonl", [{"id": "04-1", "question": "Số nào?", "choices": choices, "answer": "C"}])
    question = read_questions(path, SUBJECTS)[0]
    expected = vmlu.substitute(preamble="Trả lời câu hỏi trắc nghiệm.", prompt="Số nào?", a=choices[0], b=choices[1],
                               c=choices[2], d=choices[3], e=choices[4])
    assert official_prompt(question) == expected


@pytest.mark.parametrize("text, expected", [
    ("Đáp án đúng là: B", "B"),
    ("đáp án: **c**", "C"),
    ("Vì 2 + 2 = 4 nên đáp án là (D).", "D"),
    ("**A**. Hà Nội là thủ đô", "A"),
    ("(B) vì lý do trên", "B"),
    ("Tôi chọn C, vì C hợp lý nhất.", "C"),
    ("A hoặc B đều có thể", None),
    ("Không biết", None),
    ("Đáp án: E", None),  # E is not an option of this question
    ("", None),
])
def test_letter_extraction_never_guesses(text, expected):
    assert extract_letter(text, "ABCD") == expected


def test_answer_after_thinking_requires_closed_reasoning():
    assert answer_after_thinking("<think>có lẽ là A</think>\n\nĐáp án: C", "ABCD") == "C"
    assert answer_after_thinking("<think>có lẽ là A nhưng chưa xong", "ABCD") is None


def test_score_per_subject_category_and_overall(tmp_path):
    rows = [{"id": f"04-{i}", "question": "?", "choices": ["A. x", "B. y"], "answer": "A"} for i in range(3)]
    rows += [{"id": f"22-{i}", "question": "?", "choices": ["A. x", "B. y"], "answer": "B"} for i in range(2)]
    questions = read_questions(write_rows(tmp_path / "q.jsonl", rows), SUBJECTS)
    report = score(questions, {"04-0": "A", "04-1": "A", "04-2": None, "22-0": "A", "22-1": "B"})
    assert report["overall"] == {"accuracy": 3 / 5, "correct": 3, "total": 5, "no_answer": 1}
    assert report["subjects"]["elementary_mathematics"] == {"category": "STEM", "accuracy": 2 / 3, "correct": 2,
                                                            "total": 3}
    assert report["categories"]["Humanities"]["accuracy"] == 0.5
    assert report["category_average"] == pytest.approx((2 / 3 + 0.5) / 2)


def test_shipped_data_is_valid_vmlu_with_known_subjects():
    questions = read_questions("recipes/data/mcq_demo.jsonl", read_subjects())
    assert 40 <= len(questions) <= 60
    assert all(q.category != "Unknown" for q in questions)
    assert {len(q.choices) for q in questions} >= {3, 4, 5}
    assert len({q.category for q in questions}) == 4
