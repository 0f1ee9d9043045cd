"""Every synthesis/curation filter on hand-written cases."""
from pathlib import Path

import numpy as np
import pytest

from qforge.recipes.synth import Filters
from qforge.recipes.sft_data.answers import (answer_matches, final_number, numbers_in, reasoning_consistent,
                                              rejection_sample)
from qforge.recipes.sft_data.dedup import Deduplicator, MinHasher, NearDuplicateIndex, jaccard, shingles
from qforge.recipes.sft_data.filters import (Malformed, TextRules, has_cjk, parse_question_list,
                                              parse_text_reply)
from qforge.recipes.sft_data.langid import accuracy, analyse_word, is_vietnamese

LABELLED = Path(__file__).parent / "data" / "langid_labelled.jsonl"


def test_language_detector_accuracy_on_the_labelled_set():
    value, wrong = accuracy(LABELLED)
    assert value >= 0.97, wrong


@pytest.mark.parametrize("text", [
    "Tính chu vi hình vuông có cạnh 5 cm.",
    "Hàm len() trả về độ dài của danh sách trong Python.",
    "Cho tam giác ABC vuông tại A. Tính BC.",
    "Đáp án: 42",
])
def test_vietnamese_is_recognised(text):
    assert is_vietnamese(text)


@pytest.mark.parametrize("text", [
    "Compute the perimeter of a square with side 5 cm.",  # English
    "Calculez le périmètre d'un carré de côté 5 cm.",  # French: é is also a Vietnamese letter
    "Hitung keliling persegi dengan sisi 5 cm.",  # Indonesian: no diacritics, Latin script
    "Calcula el perímetro de un cuadrado de lado 5 cm, señor.",  # Spanish
    "Tinh chu vi hinh vuong co canh 5 cm.",  # Vietnamese without its diacritics
    "计算边长为5厘米的正方形的周长。",  # Chinese
    "x = 3 + 4 = 7",  # no words at all
    "",
])
def test_other_languages_are_rejected(text):
    assert not is_vietnamese(text)


def test_word_shapes():
    assert analyse_word("nghiêng") == (True, True)
    assert analyse_word("quốc") == (True, True)
    assert analyse_word("đi") == (True, True)
    assert analyse_word("the") == (True, False)  # a possible syllable, but unmarked
    assert analyse_word("script")[0] is False  # consonant cluster and final t after r
    assert analyse_word("ça")[0] is False and analyse_word("über")[0] is False and analyse_word("niño")[0] is False
    assert analyse_word("ấá")[0] is False  # two tone marks in one syllable


def test_cjk_detection():
    assert has_cjk("Xin chào 你好") and has_cjk("カタカナ") and has_cjk("한국어") and has_cjk("全角，")
    assert not has_cjk("Tiếng Việt có dấu: ắ ặ ẫ ữ ự ỹ đ — “quotes” … ½ × ÷ → ∑")


def test_text_rules_report_the_first_failing_rule():
    rules = TextRules(min_chars=10, max_chars=60)
    assert rules.check("Hãy tính tổng của 15 và 27.", "question") is None
    assert rules.check("Tính.", "question") == "question_too_short"
    assert rules.check("Hãy tính tổng " * 10, "question") == "question_too_long"
    assert rules.check("Hãy tính tổng của 15 và 27 你好", "answer") == "answer_cjk"
    assert rules.check("Please add 15 and 27 together.", "answer") == "answer_not_vietnamese"
    assert TextRules(language="any").check("Please add 15 and 27.", "x") is None
    assert TextRules(language="any", allow_cjk=True).check("你好", "x") is None
    with pytest.raises(ValueError, match="language must be"):
        TextRules(language="fr")


def test_question_lists_and_text_replies_must_be_well_formed():
    fenced = '```json\n[{"question": " Tính 2 + 3. ", "answer": 5}, {"question": "Tính 4 + 4.", "answer": "8"}]\n```'
    assert parse_question_list(fenced, needs_answer=True) == [{"question": "Tính 2 + 3.", "answer": "5"},
                                                             {"question": "Tính 4 + 4.", "answer": "8"}]
    assert parse_question_list('[{"question": "Vì sao?"}]', needs_answer=False) == [{"question": "Vì sao?",
                                                                                     "answer": None}]
    for bad, message in [("Câu 1: ...", "not JSON"), ("[]", "non-empty JSON list"), ('{"question": "a"}', "list"),
                         ('[{"q": "a"}]', "item 0 needs"), ('[{"question": "a"}]', "item 0 needs an 'answer'"),
                         ('[{"question": "a", "answer": true}]', "answer")]:
        with pytest.raises(Malformed, match=message):
            parse_question_list(bad, needs_answer=True)
    assert parse_text_reply("<think>\n</think>\n\nXin chào", "stop") == "Xin chào"
    with pytest.raises(Malformed, match="truncated"):
        parse_text_reply("Một câu trả lời bị cắt", "length")
    with pytest.raises(Malformed, match="empty"):
        parse_text_reply("<think></think>  ", "stop")


APPLES = "An có 3 quả táo, mẹ cho An thêm 4 quả táo nữa. Hỏi An có tất cả bao nhiêu quả táo?"


def test_exact_and_near_duplicates():
    dedup = Deduplicator(near_threshold=0.7)
    assert dedup.check("a", APPLES) is None
    assert dedup.check("b", "  an CÓ 3 quả táo; mẹ cho An thêm 4 quả táo nữa... Hỏi An có tất cả bao nhiêu quả táo") \
        == ("exact_duplicate", "a")  # case, spacing and punctuation do not make a text new
    assert dedup.check("c", APPLES.replace("táo?", "táo vậy?")) == ("near_duplicate", "a")
    other_entities = "Bình có 5 cái kẹo, chị cho Bình thêm 2 cái kẹo nữa. Hỏi Bình có tất cả bao nhiêu cái kẹo?"
    assert dedup.check("d", other_entities) is None  # same template, other entities: kept
    assert dedup.check("e", "Trái Đất quay quanh Mặt Trời mất khoảng 365 ngày.") is None
    exact_only = Deduplicator(near_threshold=None)
    assert exact_only.check("a", APPLES) is None and exact_only.check("c", APPLES.replace("táo?", "táo vậy?")) is None


def test_minhash_estimates_jaccard():
    hasher = MinHasher(num_perm=512, seed=1)
    words = [f"w{i}" for i in range(200)]
    for overlap in (0.2, 0.5, 0.8):
        a = set(words[:100])
        b = set(words[int(100 * (1 - overlap)):int(100 * (1 - overlap)) + 100])
        estimate = np.mean(hasher.signature(a) == hasher.signature(b))
        assert abs(estimate - jaccard(a, b)) < 0.08, (overlap, estimate, jaccard(a, b))
    assert shingles("một hai") == {"một ", "ột h", "t ha", " hai"}  # shorter than 3 words: characters


def test_near_duplicate_index_settings_are_checked():
    with pytest.raises(ValueError, match="multiple of bands"):
        NearDuplicateIndex(num_perm=100, bands=32)
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateIndex(threshold=1.5)


@pytest.mark.parametrize("text, expected", [
    ("Vậy An có 7 quả. Đáp án: 7 quả táo", {7.0}),
    ("Đáp số: x = -4", {-4.0}),
    ("The final answer is \\boxed{\\frac{3}{4}}", {0.75}),
    ("Kết quả là 3,5 kg", {3.5}),
    ("Đáp án: 1.500.000 đồng", {1500000.0}),
    ("Đáp án: 1.000", {1000.0, 1.0}),  # a thousand (Vietnamese) or one (English)
    ("Answer: 2/3", {2 / 3}),
    ("Ta tính được 12 quả nhưng không ghi đáp án", None),
])
def test_final_numbers(text, expected):
    assert final_number(text) == expected


def test_answer_matching_and_rejection_sampling():
    assert answer_matches("Đáp án: 0,75", "3/4") and answer_matches("Đáp số: 1.500.000 đồng", "1500000")
    assert answer_matches("Đáp án: 8", "7") is False and answer_matches("Tám quả", "7") is None
    with pytest.raises(ValueError, match="no number"):
        answer_matches("Đáp án: 8", "tám")
    verdicts = rejection_sample(["Đáp án: 5", "Đáp án: 6", "năm", "Đáp án: 5,0", "\\boxed{5}"], "5", keep=2)
    assert [(v.keep, v.reason) for v in verdicts] == [(True, None), (False, "wrong_answer"), (False, "no_final_answer"),
                                                     (True, None), (False, "surplus_sample")]
    assert numbers_in("−3 và 2,5") == [{-3.0}, {2.5}]
    # a refused candidate (say, a duplicate of a kept response) makes room for the next good one
    verdicts = rejection_sample(["Đáp án: 5", "Vậy Đáp án: 5", "Đáp án: 5.", "Đáp án: 5"], "5", keep=2,
                                refuse=lambda i: "near_duplicate" if i == 1 else None)
    assert [(v.keep, v.reason) for v in verdicts] == [(True, None), (False, "near_duplicate"), (True, None),
                                                     (False, "surplus_sample")]
    without_reference = rejection_sample(["một", "hai", "ba"], None, keep=1)
    assert [(v.keep, v.reason) for v in without_reference] == [(True, None)] + [(False, "surplus_sample")] * 2


def test_reasoning_must_conclude_with_the_answer_when_checkable():
    assert reasoning_consistent("Okay, 3 + 4 = 7. So 7 apples.", "Đáp án: 7")
    assert not reasoning_consistent("Okay, 3 + 4 = 8. So 8 apples.", "Đáp án: 7")
    assert reasoning_consistent("Let me think about the plot of the story.", "Đáp án: 7")  # no numbers: unchecked
    assert reasoning_consistent("Okay, 3 + 4 = 8?", "Câu chuyện có ba phần.")  # no final answer: unchecked
    early = "The answer is 7. " + "Now let me double-check everything carefully. " * 20 + "Done, 8 in the end."
    assert not reasoning_consistent(early, "Đáp án: 7")  # only the conclusion counts


def test_reconstructed_reasoning_checks():
    filters = Filters()
    answer = "Vậy An có 7 quả táo. Đáp án: 7"
    assert filters.reasoning_problem("Okay, An has 3 apples and gets 4 more: 3 + 4 = 7. So 7.", answer) is None
    assert filters.reasoning_problem("Okay, 3 + 4 = 7, which matches the Given Answer of 7.", answer) \
        == "reasoning_leaks_answer"
    leaked = "Được rồi, theo đáp án đã cho là 7 nên 3 + 4 = 7."
    assert filters.reasoning_problem(leaked, answer) == "reasoning_leaks_answer"
    assert filters.reasoning_problem("Okay, 3 + 4 = 8. So there are 8 apples.", answer) == "reasoning_answer_mismatch"
    assert filters.reasoning_problem("Okay, 好的, 3 + 4 = 7.", answer) == "reasoning_cjk"
    assert filters.reasoning_problem("7.", answer) == "reasoning_too_short"
