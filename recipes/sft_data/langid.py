"""A light Vietnamese language detector: Vietnamese syllable structure plus Vietnamese diacritics.

Vietnamese is written in single syllables: an onset from a closed set (b, ch, gh, ngh, qu, tr, ...), one to
three vowels, and at most one coda from {c, ch, m, n, ng, nh, p, t}, with at most one tone mark, and marks
only on vowels. Most English, French, Indonesian, Spanish or German words break that shape (final s/r/l/k,
consonant clusters, f/j/w/z, ç/ñ/ü), and unaccented Vietnamese, which SFT data should not teach, lacks the
marks. A text is Vietnamese when most of its words (code spans aside) are possible syllables and enough
carry a mark. Limits: all-capital text and one-word replies without a mark ("Ok") do not count as
Vietnamese; a Vietnamese text with many English terms can fall below the syllable share.

Accuracy on the hand-labelled set tests/synth/data/langid_labelled.jsonl (48 Vietnamese texts incl. math,
code-mixed and short ones; 69 others: English, French, Spanish, Portuguese, Indonesian, German, Italian,
Tagalog, Chinese, Japanese, Korean, code, unaccented Vietnamese), measured with
`python -m qforge.recipes.sft_data.langid FILE`: 100% (tests assert >= 97%), which says more about how
the set was written than about the web. All 9,299 texts of recipes/data/vi_arith_train.jsonl (questions,
answers, reasoning, system prompts) are recognised as Vietnamese; about 75 µs per text.
"""
from __future__ import annotations

import json
import re
import sys
import unicodedata
from dataclasses import dataclass

TONE_MARKS = {"\u0300", "\u0301", "\u0303", "\u0309", "\u0323"}  # huyền, sắc, ngã, hỏi, nặng
VOWEL_MARKS = {"\u0302", "\u0306", "\u031b"}  # circumflex (â ê ô), breve (ă), horn (ơ ư)
VOWELS = set("aeiouy")
WORD = re.compile(r"[^\W\d_]+")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)  # code blocks and inline code are not prose
SYLLABLE = re.compile(r"(ngh|ng|nh|ch|gh|gi|kh|ph|qu|th|tr|[bcdghklmnpqrstvx])?[aeiouy]{1,3}(ch|ng|nh|[cmnpt])?")


@dataclass(frozen=True)
class LanguageScore:
    words: int  # words that count (see counts_as_word)
    syllable_fraction: float  # words that are possible Vietnamese syllables
    marked_fraction: float  # words carrying a Vietnamese diacritic (tone mark, â ê ô ă ơ ư, đ)


def analyse_word(word: str) -> tuple[bool, bool]:
    """(is a possible Vietnamese syllable, carries a Vietnamese mark) for one lower-case word."""
    base, tones, marked = [], 0, False
    for char in unicodedata.normalize("NFD", word):
        if char == "đ":
            base.append("d")
            marked = True
        elif char in TONE_MARKS or char in VOWEL_MARKS:
            if not base or base[-1] not in VOWELS:
                return False, marked  # a mark on a consonant: ñ, or a stray combining mark
            tones += char in TONE_MARKS
            marked = True
        elif unicodedata.combining(char):
            return False, marked  # ç, ü, ë, ...: marks Vietnamese never uses
        else:
            base.append(char)
    return tones <= 1 and SYLLABLE.fullmatch("".join(base)) is not None, marked


def counts_as_word(word: str) -> bool:
    """Single letters (variables), capitals (point names ABC, acronyms) and vowel-less tokens (cm, kg) are
    language-neutral, so they are not counted."""
    return len(word) > 1 and not word.isupper() and any(c in VOWELS for c in unicodedata.normalize("NFD", word.lower()))


def score(text: str) -> LanguageScore:
    words = [w.lower() for w in WORD.findall(unicodedata.normalize("NFC", text)) if counts_as_word(w)]
    if not words:
        return LanguageScore(0, 0.0, 0.0)
    flags = [analyse_word(w) for w in words]
    return LanguageScore(len(words), sum(s for s, _ in flags) / len(words), sum(m for _, m in flags) / len(words))


def is_vietnamese(text: str, min_syllables: float = 0.65, min_marked: float = 0.3) -> bool:
    """True for Vietnamese text (code, numbers and some foreign terms allowed); False for other languages,
    unaccented Vietnamese, and text without words. On the labelled set Vietnamese scores >= 0.72 syllables
    and >= 0.58 marked, every other language <= 0.55 syllables: the defaults sit in those gaps."""
    result = score(CODE.sub(" ", text))
    return result.words > 0 and result.syllable_fraction >= min_syllables and result.marked_fraction >= min_marked


def accuracy(path: str) -> tuple[float, list[dict]]:
    """Accuracy of `is_vietnamese` on a JSONL of {"lang", "text"} rows ("vi" is the positive label), and the
    rows it gets wrong."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    wrong = [row for row in rows if is_vietnamese(row["text"]) != (row["lang"] == "vi")]
    return 1 - len(wrong) / len(rows), wrong


if __name__ == "__main__":
    value, mistakes = accuracy(sys.argv[1])
    print(f"accuracy {100 * value:.1f}% ({len(mistakes)} wrong)")
    for row in mistakes:
        print(f"  [{row['lang']}] {row['text'][:100]} -> {score(row['text'])}")
