"""Multiple-choice questions in VMLU's JSONL format: reading, prompts, answer extraction, scoring.

VMLU rows: `{"id": "04-0012", "question": "...", "choices": ["A. ...", "B. ...", ...], "answer": "B"}`; the
subject is the id prefix (looked up in a subject table, `data/vmlu_subjects.csv`). MMLU-style variants are
accepted too: choices without letter prefixes, `answer` as a 0-based index, and explicit `subject` /
`category` fields.
"""
from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from qforge.engine.thinking import split_think
from qforge.recipes.common.files import read_jsonl, unique_id, write_text
from qforge.recipes.evals.verdicts import bootstrap_interval

LETTERS = "ABCDE"
DEFAULT_SUBJECTS = Path(__file__).resolve().parent.parent / "data" / "vmlu_subjects.csv"
UNKNOWN_CATEGORY = "Unknown"


@dataclass(frozen=True)
class Question:
    id: str
    subject: str
    category: str
    question: str
    choices: tuple[str, ...]  # as shown to the model: "A. …"
    answer: str | None  # gold letter; None for a test split without answers (VMLU's test.jsonl)

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.choices)]


def read_subjects(path: str | Path = DEFAULT_SUBJECTS) -> dict[str, tuple[str, str]]:
    """id prefix → (subject, category) from a CSV with columns id, subject, category."""
    with open(path, encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or not {"id", "subject", "category"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a CSV header with columns id, subject, category")
        return {row["id"].strip(): (row["subject"].strip(), row["category"].strip()) for row in reader}


def _choices(raw, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS) or not all(isinstance(c, str) for c in raw):
        raise ValueError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} strings")
    prefixed = [re.match(rf"\s*{letter}\s*[.)]", choice) is not None for letter, choice in zip(LETTERS, raw)]
    if all(prefixed):
        return tuple(c.strip() for c in raw)
    if any(prefixed):
        raise ValueError(f"{where}: 'choices' mixes lettered ('A. …') and plain options")
    return tuple(f"{letter}. {choice.strip()}" for letter, choice in zip(LETTERS, raw))


def _answer(raw, n_choices: int, where: str) -> str:
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < n_choices:
        return LETTERS[raw]
    if isinstance(raw, str) and raw.strip().upper() in LETTERS[:n_choices]:
        return raw.strip().upper()
    raise ValueError(f"{where}: 'answer' must be one of {list(LETTERS[:n_choices])} (or a 0-based index), "
                     f"got {raw!r}")


def read_questions(path: str | Path, subjects: dict[str, tuple[str, str]]) -> list[Question]:
    """Parses a JSONL file; any bad row is an error naming file, line and field. A file may leave out every
    `answer` (a test split, scored by the leaderboard from `write_submission`), but not only some."""
    questions, seen = [], set()
    category_of_subject = dict(subjects.values())
    for where, row in read_jsonl(path):
        qid, text = unique_id(row, seen, where), row.get("question")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        choices = _choices(row.get("choices"), where)
        if "subject" in row:  # MMLU style: the subject is named, its category looked up by name
            subject = str(row["subject"])
            category = row.get("category") or category_of_subject.get(subject, UNKNOWN_CATEGORY)
        else:  # VMLU style: the id prefix is the subject
            prefix = qid.split("-")[0]
            subject, category = subjects.get(prefix, (prefix, UNKNOWN_CATEGORY))
        answer = None if row.get("answer") is None else _answer(row["answer"], len(choices), where)
        if questions and (answer is None) != (questions[0].answer is None):
            raise ValueError(f"{where}: 'answer' is {'missing' if answer is None else 'present'} here but not on "
                             f"the first row; a file has answers on every row or on none (a test split)")
        questions.append(Question(qid, str(subject), str(category), text.strip(), choices, answer))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def official_prompt(question: Question) -> str:
    """VMLU's zero-shot prompt (its code_benchmark/test_prompt.py), with absent options left out rather than
    printed as "None"."""
    options = "\n ".join(question.choices)
    return (f"Trả lời câu hỏi trắc nghiệm.\nCâu hỏi: {question.question}\n\n Các lựa chọn:\n{options}\n"
            f"Đáp án đúng là: ")


_MARKED = re.compile(r"đáp án(?:\s+đúng)?(?:\s+là)?\s*[:：]?\s*[*(\[]*\s*([A-E])\b", re.IGNORECASE)
_LEADING = re.compile(r"^[\s*(\[]*([A-E])(?:[.):\]*]|\s*$)")


def extract_letter(text: str, letters: str) -> str | None:
    """The answer letter in a free-form reply, or None if it cannot be told without guessing.

    Tried in order: the last "Đáp án (đúng) (là): X"; a reply that starts with the letter marked as
    an option ("B.", "(B)", "**B**") or is just the letter; a single distinct standalone letter among the valid ones.
    """
    marked = [m.group(1).upper() for m in _MARKED.finditer(text) if m.group(1).upper() in letters]
    if marked:
        return marked[-1]
    leading = _LEADING.match(text)
    if leading and leading.group(1) in letters:
        return leading.group(1)
    standalone = set(re.findall(rf"(?<![\w/])([{letters}])(?![\w/])", text))
    return standalone.pop() if len(standalone) == 1 else None


def answer_after_thinking(text: str, letters: str) -> str | None:
    """The letter after `</think>`; None when the reasoning never closed (e.g. cut by max tokens)."""
    reasoning, answer = split_think(text)
    return None if reasoning is None else extract_letter(answer, letters)


def majority(letters: Sequence[str | None]) -> str | None:
    """The most frequent extracted letter over a question's samples (ties: the earliest); None if none."""
    valid = [letter for letter in letters if letter is not None]
    return max(valid, key=lambda letter: (valid.count(letter), -valid.index(letter))) if valid else None


def write_submission(path: str | Path, questions: Sequence[Question], predictions: dict[str, str | None]) -> Path:
    """The `id,answer` CSV VMLU's leaderboard takes for its test split (an empty answer where none was
    extracted, which the leaderboard scores as wrong)."""
    rows = [f"{q.id},{predictions[q.id] or ''}" for q in questions]
    return write_text(path, "id,answer\n" + "\n".join(rows) + "\n")


def score_samples(questions: Sequence[Question], samples: Sequence[dict[str, str | None]],
                  **bootstrap) -> dict:
    """k sampled predictions per question → the mean accuracy over all k × n answers, its 95% interval (a
    bootstrap over questions of their mean correctness, so the k samples of a question stay together), and
    each sample's own accuracy."""
    per_question = [sum(sample[q.id] == q.answer for sample in samples) / len(samples) for q in questions]
    per_sample = [sum(sample[q.id] == q.answer for q in questions) / len(questions) for sample in samples]
    return {"samples": len(samples), "mean_accuracy": sum(per_question) / len(per_question),
            "ci": list(bootstrap_interval(per_question, **bootstrap)), "per_sample_accuracy": per_sample}


def _accuracy(correct: int, total: int) -> dict:
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


def score(questions: Iterable[Question], predictions: dict[str, str | None]) -> dict:
    """Accuracy overall (over questions), per category and per subject, plus the mean of the categories."""
    by_subject, by_category = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    subject_category, correct, total, invalid = {}, 0, 0, 0
    for question in questions:
        hit = int(predictions[question.id] == question.answer)
        invalid += predictions[question.id] is None
        for table, key in ((by_subject, question.subject), (by_category, question.category)):
            table[key][0] += hit
            table[key][1] += 1
        subject_category[question.subject] = question.category
        correct, total = correct + hit, total + 1
    categories = {name: _accuracy(*by_category[name]) for name in sorted(by_category)}
    return {
        "overall": {**_accuracy(correct, total), "no_answer": invalid},
        "category_average": sum(c["accuracy"] for c in categories.values()) / len(categories),
        "categories": categories,
        "subjects": {name: {"category": subject_category[name], **_accuracy(*by_subject[name])}
                     for name in sorted(by_subject)},
    }
