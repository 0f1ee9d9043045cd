"""Token classification on the real Qwen3 tokenizer against a brute-force oracle over every code point."""
import json
import unicodedata

import pytest

from qforge.engine.vocab import CLASSES, analyse_bytes, classify_tokens, is_cjk, scan_tokenizer, token_bytes
from qforge.tools.vocab_report import main as vocab_report_main

CJK_SAMPLES = "中文漢字〇、。「」ぁあアンㄅㄱ㈠㌀㐀䷀鿿ꥠ가힣豈︐︰﹐，Ａｱﾟ￥𖿠𛀀🈀𠀀𪜀𰀀ᄀ⺀⼀⿰"
NON_CJK_SAMPLES = "aZ0~ ÀàẠạẾếỹƯưĐđ\u0300\u0301\u0323\u0309ΩЖאعक€∑∫√→—“”…😀🇻🇳\u200d\ufe0f\ufffd𝔸ꀀ"


def oracle_fragment_flags() -> dict:
    """(fragment bytes, where) → bit 1 if a non-CJK, bit 2 if a CJK code point's encoding has it there.

    `where`: "head" = a proper prefix, "tail" = a proper suffix, "inside" = any window after the lead.
    """
    flags = {}
    for cp in range(0x80, 0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        encoded, flag = chr(cp).encode(), 2 if is_cjk(cp) else 1
        for k in range(1, len(encoded)):
            for key in ((encoded[:k], "head"), (encoded[k:], "tail")):
                flags[key] = flags.get(key, 0) | flag
            for end in range(k + 1, len(encoded) + 1):
                key = (encoded[k:end], "inside")
                flags[key] = flags.get(key, 0) | flag
    return flags


def oracle_analysis(data: bytes, flags: dict) -> tuple[bool, bool, bool]:
    """(complete CJK character, CJK-only fragment, can start a CJK character) by splitting at lead bytes."""
    if all(0x80 <= b < 0xC0 for b in data):
        return False, flags.get((data, "inside"), 0) == 2, False
    first_lead = next(i for i, b in enumerate(data) if not 0x80 <= b < 0xC0)
    text = data[first_lead:].decode("utf-8", errors="ignore")
    head = data[first_lead + len(text.encode()):]
    fragment_flags = [flags.get((data[:first_lead], "tail"), 0)] if first_lead else []
    fragment_flags += [flags.get((head, "head"), 0)] if head else []
    starts_cjk = bool(head) and bool(flags.get((head, "head"), 0) & 2)
    return any(is_cjk(ord(c)) for c in text), 2 in fragment_flags, starts_cjk


@pytest.fixture(scope="module")
def scan(qwen_tokenizer_dir):
    return scan_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def vocab(qwen_tokenizer_dir):
    spec = json.loads((qwen_tokenizer_dir / "tokenizer.json").read_text())
    return {i: token_bytes(t) for t, i in spec["model"]["vocab"].items()}, {t["id"] for t in spec["added_tokens"]}


def test_cjk_code_points():
    assert all(is_cjk(ord(c)) for c in CJK_SAMPLES), [c for c in CJK_SAMPLES if not is_cjk(ord(c))]
    assert not any(is_cjk(ord(c)) for c in NON_CJK_SAMPLES), [c for c in NON_CJK_SAMPLES if is_cjk(ord(c))]


def test_vietnamese_letters_and_combining_marks_are_never_cjk():
    vietnamese = [*range(0x00C0, 0x01B1), *range(0x1EA0, 0x1EFA), *range(0x0300, 0x0370)]
    assert not any(is_cjk(cp) for cp in vietnamese)
    for cp in vietnamese:  # and no fragment of them is CJK-only
        encoded = chr(cp).encode()
        for k in range(1, len(encoded)):
            assert not analyse_bytes(encoded[:k])[1] and not analyse_bytes(b"a" + encoded[:k])[1]
            assert not analyse_bytes(encoded[k:])[1] and not analyse_bytes(encoded[k:] + b"a")[1]


def test_byte_structure_examples():
    han = "中".encode()  # E4 B8 AD
    assert analyse_bytes(han) == (True, False, False)
    assert analyse_bytes(han[:1]) == (False, True, True)     # E4 only starts Han (U+4000-4FFF)
    assert analyse_bytes(b" " + han[:2]) == (False, True, True)
    assert analyse_bytes(han[1:]) == (False, False, False)   # B8 AD also ends e.g. U+0E2D, U+1E2D
    assert analyse_bytes(b"\xe1") == (False, False, True)    # Vietnamese U+1EA0.. and Hangul Jamo U+1100..
    assert analyse_bytes(b"\xe1\xba") == (False, False, False)
    assert analyse_bytes(b"\xe1\x84") == (False, True, True)  # Hangul Jamo only
    assert analyse_bytes(b"\xed") == (False, True, True)     # U+D000-D7FF Hangul; ED A0.. are surrogates
    assert analyse_bytes(b"\xea") == (False, False, True)    # Yi and Latin Extended-D besides Hangul
    assert analyse_bytes(b"\xf0\xa0") == (False, True, True)  # plane 2
    assert analyse_bytes(b"\xf0\x9f\x98") == (False, False, False)  # emoji
    assert analyse_bytes(b"\xc3") == (False, False, False)


def test_classes_partition_the_tokenizer(scan, vocab):
    regular, added = vocab
    ids = [i for name in CLASSES for i in scan.classes[name]]
    assert sorted(ids) == sorted(regular.keys() | added) and len(ids) == scan.size == 151_669
    assert scan.classes["special"] == sorted(added)
    assert all(scan.classes[name] == sorted(scan.classes[name]) for name in CLASSES)
    single_bytes = {i for i, data in regular.items() if len(data) == 1}
    assert len(single_bytes) == 256 and single_bytes <= set(scan.classes["other"])
    removed = len(scan.classes["cjk"]) + len(scan.classes["cjk_bytes"])
    assert 0.18 < removed / scan.size < 0.25  # "roughly a fifth"


def test_classification_matches_brute_force_over_all_code_points(scan, vocab):
    regular, added = vocab
    flags = oracle_fragment_flags()
    expected = {name: [] for name in CLASSES}
    expected_suppress, expected_single = [], []
    for i, data in sorted(regular.items()):
        complete, fragment_only, starts = oracle_analysis(data, flags)
        if len(data) > 1 and (complete or fragment_only):
            expected["cjk" if complete else "cjk_bytes"].append(i)
            continue
        expected["other"].append(i)
        expected_suppress += [i] if starts else []
        expected_single += [i] if len(data) == 1 and fragment_only else []
    expected["special"] = sorted(added)
    assert scan.classes == expected
    assert scan.suppress == expected_suppress
    assert sorted(regular[i][0] for i in expected_single) == [*range(0xE3, 0xEA), *range(0xEB, 0xEE)]


def test_kept_tokens_decode_to_text_without_cjk_and_removed_ones_carry_it(scan, vocab):
    regular, _ = vocab
    for i in scan.classes["other"]:
        assert not any(is_cjk(ord(c)) for c in regular[i].decode("utf-8", errors="ignore"))
    names = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO", "IDEOGRAPH", "FULLWIDTH", "HALFWIDTH")
    # independent of CJK_RANGES: Unicode's character names
    named = sum(any(any(n in unicodedata.name(c, "") for n in names) for c in regular[i].decode("utf-8", "ignore"))
                for i in scan.classes["cjk"])
    assert named / len(scan.classes["cjk"]) > 0.99


def test_classify_tokens_api(qwen_tokenizer_dir, scan):
    assert classify_tokens(qwen_tokenizer_dir) == scan.classes


def test_report_prints_counts_and_writes_kept_ids(qwen_tokenizer_dir, scan, tmp_path, capsys):
    out = tmp_path / "kept_ids.json"
    assert vocab_report_main([str(qwen_tokenizer_dir), "--out", str(out), "--vocab-size", "151936"]) == 0
    printed = capsys.readouterr().out
    for name in CLASSES:
        assert f"{name:<10} {len(scan.classes[name]):>7}" in printed
    payload = json.loads(out.read_text())
    assert payload["kept_ids"] == sorted(scan.classes["special"] + scan.classes["other"])
    assert payload["suppress_ids"] == scan.suppress and payload["original_size"] == 151936
    assert payload["counts"] == {name: len(scan.classes[name]) for name in CLASSES}


def test_report_names_a_missing_tokenizer(tmp_path, capsys):
    assert vocab_report_main([str(tmp_path)]) == 2
    assert "tokenizer.json not found" in capsys.readouterr().err
