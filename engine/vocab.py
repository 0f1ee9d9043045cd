"""Which tokens of a byte-level BPE vocabulary can produce CJK text, and the map to the kept vocabulary.

Qwen3's tokenizer stores each token as bytes spelled with GPT-2's byte-to-unicode alphabet. A token is
classified by the UTF-8 structure of those bytes, not by whether it decodes cleanly: a token may start
with the tail of a character and end with the head of another, and such fragments are shared between
scripts (a lone continuation byte ends Vietnamese letters as often as Han ones). A fragment counts as
CJK only when *every* valid character it can be part of is CJK; a kept fragment that *can* start a CJK
character is listed for suppression at generation time instead.
"""
from __future__ import annotations

import bisect
import itertools
import json
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import torch

from .errors import ConfigError
from .files import write_json

CLASSES = ("cjk", "cjk_bytes", "special", "other")

# Inclusive code point ranges treated as CJK (sorted, disjoint). Gaps inside a run of CJK blocks are
# folded in so that a fragment reaching only CJK blocks and unassigned code points is still CJK.
CJK_RANGES = (
    (0x1100, 0x11FF),    # Hangul Jamo
    (0x2E80, 0x2FFF),    # CJK Radicals Supplement, Kangxi Radicals, Ideographic Description Characters
    (0x3000, 0x9FFF),    # CJK Symbols and Punctuation, Hiragana, Katakana, Bopomofo, Hangul Compatibility
                         # Jamo, Kanbun, CJK Strokes, Enclosed CJK, CJK Compatibility, Extension A,
                         # Yijing Hexagram Symbols (I Ching signs between two Han blocks), Unified Ideographs
    (0xA960, 0xA97F),    # Hangul Jamo Extended-A
    (0xAC00, 0xD7FF),    # Hangul Syllables, Hangul Jamo Extended-B
    (0xF900, 0xFAFF),    # CJK Compatibility Ideographs
    (0xFE10, 0xFE1F),    # Vertical Forms
    (0xFE30, 0xFE6F),    # CJK Compatibility Forms, Small Form Variants
    (0xFF00, 0xFFEF),    # Halfwidth and Fullwidth Forms
    (0x16FE0, 0x16FFF),  # Ideographic Symbols and Punctuation
    (0x1AFF0, 0x1B16F),  # Kana Extended-B, Kana Supplement, Kana Extended-A, Small Kana Extension
    (0x1F200, 0x1F2FF),  # Enclosed Ideographic Supplement
    (0x20000, 0x3FFFF),  # Planes 2 and 3: CJK Extensions B-J, Compatibility Ideographs Supplement
)
_RANGE_STARTS = [lo for lo, _ in CJK_RANGES]
_CJK_PATTERN = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in CJK_RANGES) + "]")

_LEADS_BY_LENGTH = {2: range(0xC2, 0xE0), 3: range(0xE0, 0xF0), 4: range(0xF0, 0xF5)}
_CONTINUATION = range(0x80, 0xC0)


def is_cjk(code_point: int) -> bool:
    i = bisect.bisect_right(_RANGE_STARTS, code_point) - 1
    return i >= 0 and code_point <= CJK_RANGES[i][1]


def gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to 256+n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


_UNICODE_TO_BYTE = gpt2_unicode_to_byte()


def token_bytes(token: str) -> bytes:
    return bytes(_UNICODE_TO_BYTE[ch] for ch in token)


def _span_scripts(lo: int, hi: int) -> tuple[bool, bool]:
    """(reaches a CJK code point, reaches a non-CJK one) for the scalar values in [lo, hi]."""
    size = max(0, hi - lo + 1) - max(0, min(hi, 0xDFFF) - max(lo, 0xD800) + 1)  # surrogates are not text
    covered = sum(max(0, min(hi, end) - max(lo, start) + 1) for start, end in CJK_RANGES)
    return covered > 0, covered < size


def _code_point_bits(encoded: bytes) -> int:
    length = _utf8_length(encoded[0])
    value = encoded[0] & (0x7F >> length)
    for byte in encoded[1:]:
        value = value << 6 | byte & 0x3F
    return value


@lru_cache(maxsize=None)
def _fragment_scripts(known: bytes, position: str) -> tuple[bool, bool]:
    """(reaches a CJK code point, reaches a non-CJK one) for a partial UTF-8 character.

    `position` says where `known` sits in the character's encoding: "head" (starts it, does not finish
    it), "tail" (finishes it, does not start it) or "inside" (continuation bytes somewhere after the
    lead). Overlong forms and surrogates are not valid completions.
    """
    if position == "head":  # the completions form one contiguous range of code points
        length = _utf8_length(known[0])
        if len(known) >= length or any(b not in _CONTINUATION for b in known[1:]):
            return False, False
        pad = length - len(known)
        lo = _code_point_bits(known + b"\x80" * pad)
        hi = _code_point_bits(known + b"\xbf" * pad)
        shortest = {2: 0x80, 3: 0x800, 4: 0x10000}[length]
        return _span_scripts(max(lo, shortest), min(hi, 0x10FFFF))
    cjk = other = False
    for length, leads in _LEADS_BY_LENGTH.items():
        if position == "tail":
            offsets = [length - len(known)] if len(known) < length else []
        else:
            offsets = range(1, length - len(known) + 1)
        for offset in offsets:
            slots = [leads] + [_CONTINUATION] * (length - 1)
            if any(b not in slots[offset + i] for i, b in enumerate(known)):
                continue
            free = slots[:offset] + slots[offset + len(known):]
            for fill in itertools.product(*free):
                encoded = bytes(fill[:offset]) + known + bytes(fill[offset:])
                try:
                    code_point = ord(encoded.decode("utf-8"))
                except UnicodeDecodeError:
                    continue
                cjk, other = cjk or is_cjk(code_point), other or not is_cjk(code_point)
                if cjk and other:
                    return True, True
    return cjk, other


def _utf8_length(lead: int) -> int:
    for length, leads in _LEADS_BY_LENGTH.items():
        if lead in leads:
            return length
    return 1 if lead < 0x80 else 0  # 0: a byte that never starts a character


def analyse_bytes(data: bytes) -> tuple[bool, bool, bool]:
    """(contains a complete CJK character, has a fragment that is CJK-only, can start a CJK character).

    Bytes that can never occur in valid UTF-8 text are treated as harmless: the model emitting them
    yields replacement characters, not CJK.
    """
    try:
        return bool(_CJK_PATTERN.search(data.decode("utf-8"))), False, False
    except UnicodeDecodeError:
        pass
    n_tail = next((i for i, b in enumerate(data) if b not in _CONTINUATION), len(data))
    if n_tail == len(data):
        cjk, other = _fragment_scripts(data, "inside") if n_tail <= 3 else (False, True)
        return False, cjk and not other, False
    fragments = [_fragment_scripts(data[:n_tail], "tail")] if n_tail else []
    complete_cjk = starts_cjk = False
    i = n_tail
    while i < len(data):
        length = _utf8_length(data[i])
        char = data[i:i + length]
        if length == 0 or any(b not in _CONTINUATION for b in char[1:]):
            return False, False, False
        if len(char) < length:
            fragments.append(_fragment_scripts(char, "head"))
            starts_cjk = fragments[-1][0]
        else:
            try:
                complete_cjk = complete_cjk or is_cjk(ord(char.decode("utf-8")))
            except UnicodeDecodeError:
                return False, False, False
        i += length
    cjk_only = any(cjk and not other for cjk, other in fragments)
    return complete_cjk, cjk_only, starts_cjk


def load_vocab(tokenizer_dir: str | Path) -> tuple[dict[int, bytes], dict[int, str]]:
    """(regular token id → bytes, added token id → content) from a byte-level BPE `tokenizer.json`."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face fast tokenizer directory is needed")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise ValueError(f"{path}: model.type={model.get('type')!r}, decoder={spec.get('decoder')!r}; "
                         "only byte-level BPE tokenizers (GPT-2 / Qwen style) can be classified by bytes")
    try:
        regular = {i: token_bytes(token) for token, i in model["vocab"].items()}
    except KeyError as error:
        raise ValueError(f"{path}: model.vocab holds a token with character {error} outside the "
                         "byte-level alphabet") from None
    added = {entry["id"]: entry["content"] for entry in spec.get("added_tokens", [])}
    return regular, added


@dataclass(frozen=True)
class VocabScan:
    """Per-class token ids (a partition of the tokenizer) and the kept ids to suppress when sampling."""

    classes: dict[str, list[int]]
    suppress: list[int]
    single_byte_cjk: list[int]  # kept single-byte tokens that can only start a CJK character
    size: int                   # number of token ids in the tokenizer (regular + added)


def scan_tokenizer(tokenizer_dir: str | Path) -> VocabScan:
    """Classifies every token of the byte-level BPE tokenizer in `tokenizer_dir` (see `analyse_bytes`)."""
    regular, added = load_vocab(tokenizer_dir)
    classes = {name: [] for name in CLASSES}
    suppress, single_byte_cjk = [], []
    for i, data in sorted(regular.items()):
        if i in added:
            continue
        complete_cjk, cjk_only_fragment, starts_cjk = analyse_bytes(data)
        if len(data) > 1 and (complete_cjk or cjk_only_fragment):
            classes["cjk" if complete_cjk else "cjk_bytes"].append(i)
            continue
        classes["other"].append(i)  # every single byte stays so that any input remains encodable
        if starts_cjk:
            suppress.append(i)
        if len(data) == 1 and cjk_only_fragment:
            single_byte_cjk.append(i)
    classes["special"] = sorted(added)
    return VocabScan(classes, suppress, single_byte_cjk, len(regular.keys() | added.keys()))


def classify_tokens(tokenizer_dir: str | Path) -> dict[str, list[int]]:
    """Class name → sorted token ids: `cjk` (decodes to a CJK character), `cjk_bytes` (a partial UTF-8
    fragment that can only belong to CJK characters), `special` (added tokens, always kept), `other`."""
    return scan_tokenizer(tokenizer_dir).classes


def read_kept_ids(path: str | Path, key: str = "vocab.restrict") -> list[int]:
    """The token ids of a kept-id file (`{"kept_ids": [...]}`, or a bare list); a ConfigError naming the file
    and `key` when it is not one."""
    path = Path(path)
    fix = f"write it with `python -m qforge.tools.vocab_report TOKENIZER_DIR --out FILE` or fix {key}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{key}={str(path)!r}: cannot read the kept-id file ({error.strerror}); {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: {key} file is not valid JSON ({error}); {fix}") from None
    ids = data.get("kept_ids") if isinstance(data, dict) else data
    if not isinstance(ids, list):
        found = f"keys {sorted(data)[:5]}" if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path}: {key} file needs a list under \"kept_ids\" (found {found}); {fix}")
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise ConfigError(f"{path}: kept_ids must be integer token ids, found {bad[:3]!r}; {fix}")
    return ids


@dataclass(frozen=True)
class VocabMap:
    """Original token ids ↔ kept ids. Kept id i is original id `kept_ids[i]` (dense, order preserved).

    The fused loss takes `kept_ids` as its `vocab_index`, so training scores only the kept rows of the
    output head; `suppress_ids` are kept tokens that could still start a CJK character byte by byte.
    """

    kept_ids: torch.Tensor      # [K] int64, sorted original ids
    suppress_ids: torch.Tensor  # [S] int64, original ids, a subset of kept_ids
    original_size: int          # rows of the original output head (Qwen pads 151,669 tokens to 151,936)

    def __post_init__(self):
        ids = self.kept_ids
        if ids.numel() and not bool((ids[1:] > ids[:-1]).all() and ids[0] >= 0):
            raise ValueError("kept_ids must be non-negative and strictly increasing (new ids keep the original order)")
        if self.kept_ids.numel() and int(self.kept_ids[-1]) >= self.original_size:
            raise ValueError(f"kept id {int(self.kept_ids[-1])} does not fit a vocabulary of "
                             f"{self.original_size} rows: the tokenizer and model do not match")
        if not bool(torch.isin(self.suppress_ids, self.kept_ids).all()):
            raise ValueError("suppress_ids must be a subset of kept_ids")

    @classmethod
    def from_tokenizer(cls, tokenizer_dir: str | Path, original_size: int | None = None) -> "VocabMap":
        scan = scan_tokenizer(tokenizer_dir)
        kept = sorted(scan.classes["special"] + scan.classes["other"])
        return cls(torch.tensor(kept, dtype=torch.long), torch.tensor(scan.suppress, dtype=torch.long),
                   original_size or scan.size)

    @property
    def new_size(self) -> int:
        return self.kept_ids.numel()

    @property
    def new_to_old(self) -> torch.Tensor:
        return self.kept_ids

    @cached_property
    def old_to_new(self) -> torch.Tensor:
        """[original_size] int64: the kept id of each original id, -1 where the token was removed."""
        table = torch.full((self.original_size,), -1, dtype=torch.long)
        table[self.kept_ids] = torch.arange(self.new_size)
        return table

    def to_new(self, ids: torch.Tensor) -> torch.Tensor:
        new = self.old_to_new[ids]
        if bool((new < 0).any()):
            raise ValueError(f"token ids {ids[new < 0].unique()[:10].tolist()} were removed from the vocabulary")
        return new

    def removed_mask(self, ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """True where `ids` (original ids; `ignore_index` entries are never removed) is not kept."""
        valid = ids != ignore_index
        if bool(((ids < 0) & valid).any() or (ids >= self.original_size).any()):
            raise ValueError(f"label ids outside [0, {self.original_size}) other than {ignore_index}")
        return valid & (self.old_to_new[ids.clamp(min=0)] < 0)

    def check_labels(self, labels: torch.Tensor, *, drop: bool = False,
                     ignore_index: int = -100) -> tuple[torch.Tensor, int]:
        """Labels (original ids) with removed-token targets either rejected or set to `ignore_index`.

        Returns (labels, number of removed-token targets). With `drop=False` any such target raises,
        because the restricted loss cannot score a token it has no output row for.
        """
        removed = self.removed_mask(labels, ignore_index)
        count = int(removed.sum())
        if count and not drop:
            examples = labels[removed].unique()[:10].tolist()
            raise ValueError(f"{count} of {int((labels != ignore_index).sum())} label tokens are removed "
                             f"(CJK) tokens, e.g. ids {examples}; clean the data or enable dropping them")
        return labels.masked_fill(removed, ignore_index), count

    def save(self, path: str | Path, **extra) -> None:
        payload = {**extra, "original_size": self.original_size, "kept_ids": self.kept_ids.tolist(),
                   "suppress_ids": self.suppress_ids.tolist()}
        write_json(path, payload, indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "VocabMap":
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        missing = {"original_size", "kept_ids", "suppress_ids"} - payload.keys()
        if missing:
            raise ValueError(f"{path}: missing fields {sorted(missing)}; write it with "
                             "`python -m qforge.tools.vocab_report TOKENIZER_DIR --out FILE`")
        return cls(torch.tensor(payload["kept_ids"], dtype=torch.long),
                   torch.tensor(payload["suppress_ids"], dtype=torch.long), payload["original_size"])

