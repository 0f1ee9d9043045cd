"""The shipped demo dataset: every answer recomputed from the numbers in the text, no train/eval overlap, the
format the demo trainer relies on, and the exact-match checker."""
import json
import operator
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from qforge.recipes import make_demo_data as demo
from qforge.recipes.make_demo_data import extract_answer

DATA = Path(demo.__file__).parent / "data"
FILES = {"train": DATA / "vi_arith_train.jsonl", "eval": DATA / "vi_arith_eval.jsonl", "rl": DATA / "vi_arith_rl.jsonl"}
ARITHMETIC = {"+": operator.add, "-": operator.sub, "×": operator.mul, ":": operator.floordiv}
EQUATION = re.compile(r"(\d+) ([-+×:]) (\d+) = (\d+)")
VIETNAMESE_LETTERS = set("ăâđêôơưàáảãạằắẳẵặầấẩẫậèéẻẽẹềếểễệìíỉĩịòóỏõọồốổỗộờớởỡợùúủũụừứửữựỳýỷỹỵ")


def load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def question(row: dict) -> str:
    return row["messages"][-2]["content"]


@pytest.fixture(scope="module")
def splits():
    return {name: load(path) for name, path in FILES.items()}


def test_shipped_files_are_exactly_the_generator_output(tmp_path):
    demo.main(["--out", str(tmp_path)])
    for path in FILES.values():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"{path} is stale: rerun the generator"


@pytest.mark.parametrize("split", ["train", "eval", "rl"])
def test_every_answer_recomputes_from_the_numbers_in_the_text(splits, split):
    for line, row in enumerate(splits[split], start=1):
        where = f"{FILES[split].name}:{line}"
        *prompt, reply = row["messages"]
        assert [m["role"] for m in prompt] in (["user"], ["system", "user"]), where
        assert reply["role"] == "assistant", where
        meta = row["meta"]
        # The question states exactly the two operands, and the reasoning combines them in the stated order.
        assert sorted(int(x) for x in re.findall(r"\d+", question(row))) == sorted([meta["a"], meta["b"]]), where
        (a, op, b, result), = EQUATION.findall(reply["reasoning_content"])
        a, b, result = int(a), int(b), int(result)
        assert (a, op, b) == (meta["a"], meta["op"], meta["b"]), where
        if op == ":":
            assert a % b == 0, f"{where}: inexact division"
        assert ARITHMETIC[op](a, b) == result == int(row["answer"]) >= 0, where
        assert 1 <= a <= 50 and 1 <= b <= 50, f"{where}: operands beyond the small-number range"
        assert row["answer"] == str(result), where
        assert re.fullmatch(rf"Vậy [^\n]+\. Đáp án: {result}", reply["content"]), where
        assert extract_answer(reply["content"]) == row["answer"], where
        assert len(reply["reasoning_content"].split()) <= 40, where


def test_sizes_uniqueness_and_no_overlap_between_splits(splits):
    questions = {name: [question(r) for r in rows] for name, rows in splits.items()}
    sizes = {"train": demo.TRAIN_ROWS, "eval": demo.EVAL_ROWS, "rl": demo.RL_ROWS}
    for name, listed in questions.items():
        assert len(listed) == sizes[name] and len(set(listed)) == len(listed), name
    assert not set(questions["train"]) & set(questions["eval"])
    assert not set(questions["rl"]) & (set(questions["train"]) | set(questions["eval"]))


def test_variety_ops_templates_and_system_prompts(splits):
    for name, rows in splits.items():
        templates = Counter(r["meta"]["template"] for r in rows)
        assert len(templates) >= 15 and set(templates) == {t.name for t in demo.TEMPLATES}, name
        assert {r["meta"]["op"] for r in rows} == set(ARITHMETIC), name
        systems = [r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "system"]
        assert set(systems) == {demo.SYSTEM_PROMPT}, name
    share = sum(r["messages"][0]["role"] == "system" for r in splits["train"]) / len(splits["train"])
    assert 0.07 < share < 0.13


def test_text_is_nfc_vietnamese_with_diacritics(splits):
    for rows in splits.values():
        for row in rows:
            for message in row["messages"]:
                for text in (message["content"], message.get("reasoning_content", "")):
                    assert unicodedata.is_normalized("NFC", text), text
            assert VIETNAMESE_LETTERS & set(question(row).lower()), question(row)
    text = "".join(question(r) for r in splits["train"]).lower()
    assert len(VIETNAMESE_LETTERS & set(text)) >= 20


def test_generator_reports_a_template_that_runs_out_of_distinct_questions():
    fixed = demo.Template("fixed", "+", "{a} + {b}?", "{a} + {b} = {n}.", "Vậy là {n}.", lambda rng: (1, 1))
    with pytest.raises(RuntimeError, match="'fixed' ran out of distinct questions"):
        demo.generate_rows(2, random.Random(0), set(), templates=(fixed,))


@pytest.mark.parametrize("text, expected", [
    ("Vậy Lan có tất cả 19 quả táo. Đáp án: 19", "19"),
    ("Đáp án:19.", "19"),
    ("đáp án : 007 quả", "7"),
    ("Đáp án là 42!", "42"),
    ("**Đáp án:** 12", "12"),
    ("Đáp án: 5. Sửa lại. Đáp án: 6", "6"),
    ("<think>Đáp án: 3</think>\n\nVậy ... Đáp án: 4", "4"),
    (unicodedata.normalize("NFD", "Đáp án: 8"), "8"),
    ("Đáp án: 1.000 đồng", "1000"),
    ("Đáp án: −3", "-3"),
    ("Đáp án: 2,5", None),
    ("Đáp án: 12. Đáp án: không biết", None),
    ("Vậy Lan có 19 quả táo.", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected
