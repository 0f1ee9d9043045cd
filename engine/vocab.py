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
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError
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


KEPT_IDS_FILE = "kept_ids.json"  # written next to the exported weights of a run with a restricted vocabulary


def read_id_file(path: str | Path) -> dict:
    """A token-id file: a JSON object with "kept_ids" (ids to keep; optional "suppress_ids" and "original_size")
    or "suppress_ids" alone (ids never to generate). Each list holds non-negative integers."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such token-id file")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ConfigError(f"{path}: invalid JSON ({error})") from None
    if isinstance(payload, list):
        raise ConfigError(f'{path}: a bare JSON list does not say what it holds; write {{"kept_ids": [...]}} for '
                          f'the ids to keep (vocab.restrict) or {{"suppress_ids": [...]}} for ids never to generate')
    if not isinstance(payload, dict) or not ({"kept_ids", "suppress_ids"} & payload.keys()):
        raise ConfigError(f'{path}: expected a JSON object with "kept_ids" or "suppress_ids", '
                          f"got {str(payload)[:80]}")
    for key in ("kept_ids", "suppress_ids"):
        ids = payload.get(key, [])
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in ids):
            raise ConfigError(f'{path}: "{key}" must be a list of non-negative integer token ids')
    return payload


@dataclass(frozen=True)
class VocabMap:
    """The kept vocabulary: original token ids ↔ kept ids. Kept id i is original id `kept_ids[i]` (dense, order
    preserved). Built once per run (`from_restrict`); the single owner of which tokens training scores.

    Training masks labels outside the kept set when packing (`mask_labels`), and the fused loss gets the
    precomputed `vocab_index` / `target_index` tables; the set is saved with the exported model (`save_with_model`),
    where generation, serving and the pruning recipe read it. `suppress_ids` are kept tokens that could still
    start a CJK character byte by byte (suppressed when sampling).
    """

    kept_ids: torch.Tensor      # [K] int64, sorted original ids
    suppress_ids: torch.Tensor  # [S] int64, original ids, a subset of kept_ids
    original_size: int          # rows of the original output head (Qwen pads 151,669 tokens to 151,936)
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # device → loss tables

    def __post_init__(self):
        ids = self.kept_ids
        if not ids.numel():
            raise ConfigError("the kept vocabulary is empty")
        if not bool((ids[1:] > ids[:-1]).all() and ids[0] >= 0):
            raise ConfigError("kept_ids must be non-negative and strictly increasing (new ids keep the original order)")
        if int(self.kept_ids[-1]) >= self.original_size:
            raise ConfigError(f"kept id {int(self.kept_ids[-1])} does not fit a vocabulary of "
                              f"{self.original_size} rows: the tokenizer and model do not match")
        if not bool(torch.isin(self.suppress_ids, self.kept_ids).all()):
            raise ConfigError("suppress_ids must be a subset of kept_ids")

    @classmethod
    def from_ids(cls, kept, original_size: int, suppress=()) -> "VocabMap":
        return cls(torch.tensor(sorted(set(kept)), dtype=torch.long), torch.tensor(sorted(set(suppress)),
                   dtype=torch.long), original_size)

    @classmethod
    def from_tokenizer(cls, tokenizer_dir: str | Path, original_size: int | None = None) -> "VocabMap":
        """The CJK-free set of a byte-level BPE tokenizer (see `scan_tokenizer`)."""
        scan = scan_tokenizer(tokenizer_dir)
        return cls.from_ids(scan.classes["special"] + scan.classes["other"], original_size or scan.size,
                            scan.suppress)

    @classmethod
    def from_restrict(cls, restrict: str, original_size: int, label_arrays=(), special_ids=()) -> "VocabMap | None":
        """`vocab.restrict`: None for "all"; for "data", the label tokens of `label_arrays` plus `special_ids`
        (chat markers, eos, think tags); otherwise a kept-id file."""
        if restrict == "all":
            return None
        if restrict == "data":
            ids = set(special_ids)
            for labels in label_arrays:
                ids.update(np.unique(labels).tolist())
            ids.discard(-100)
            bad = sorted(i for i in ids if not 0 <= i < original_size)
            if bad:
                raise DataError(f"label ids {bad[:10]} are outside the model's vocabulary [0, {original_size})")
            return cls.from_ids(ids, original_size)
        try:
            return cls.load(restrict, original_size)
        except ConfigError as error:
            raise ConfigError(f"vocab.restrict={restrict!r} is neither 'all', 'data' nor a usable kept-id file: "
                              f"{error}") from None

    @property
    def new_size(self) -> int:
        return self.kept_ids.numel()

    @cached_property
    def old_to_new(self) -> torch.Tensor:
        """[original_size] int64: the kept id of each original id, -1 where the token was removed (the loss's
        `target_index`)."""
        table = torch.full((self.original_size,), -1, dtype=torch.long)
        table[self.kept_ids] = torch.arange(self.new_size)
        return table

    @cached_property
    def _kept_mask(self) -> np.ndarray:
        return (self.old_to_new >= 0).numpy()

    def loss_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(vocab_index, target_index) for the fused loss, on `device`: the sorted kept ids and the full-vocabulary
        table original id → kept position (-1 for unkept). Moved to a device once."""
        key = str(device)
        if key not in self._tables:
            self._tables[key] = (self.kept_ids.to(device), self.old_to_new.to(device))
        return self._tables[key]

    def to_new(self, ids: torch.Tensor) -> torch.Tensor:
        new = self.old_to_new[ids]
        if bool((new < 0).any()):
            raise ValueError(f"token ids {ids[new < 0].unique()[:10].tolist()} were removed from the vocabulary")
        return new

    def unkept(self, labels: np.ndarray) -> np.ndarray:
        """True where a label (original id, -100 = none) is a token outside the kept set."""
        active = labels >= 0
        outside = active & (labels >= self.original_size)
        outside[active & ~outside] = ~self._kept_mask[labels[active & ~outside]]
        return outside

    def mask_labels(self, labels: np.ndarray) -> np.ndarray:
        """`labels` with every unkept target set to -100, so it takes no part in the loss nor in the step's Σw
        (the same array when there is none)."""
        unkept = self.unkept(labels)
        return np.where(unkept, -100, labels).astype(labels.dtype) if unkept.any() else labels

    def check_labels(self, label_arrays, drop: bool) -> int:
        """Counts label tokens outside the kept set before training starts: a DataError naming how many and which
        ids (e.g. CJK tokens left in the data) unless `drop` (vocab.drop_unkept_labels); returns the count."""
        outside = [labels[self.unkept(labels)] for labels in label_arrays]
        outside = np.concatenate(outside) if outside else np.zeros(0, dtype=np.int64)
        if outside.size and not drop:
            ids = np.unique(outside)
            raise DataError(f"{outside.size} label tokens ({ids.size} distinct ids, e.g. {ids[:10].tolist()}) are "
                            f"outside the kept vocabulary (vocab.restrict); remove those rows from the data or set "
                            f"vocab.drop_unkept_labels=true to leave them out of the loss")
        return int(outside.size)

    @property
    def suppress_tokens(self) -> list[int]:
        """Original ids never to generate with a head trained on this set: every unkept id and `suppress_ids`."""
        return sorted({*(self.old_to_new < 0).nonzero().flatten().tolist(), *self.suppress_ids.tolist()})

    def save(self, path: str | Path, **extra) -> None:
        write_json(path, {**extra, "original_size": self.original_size, "kept_ids": self.kept_ids.tolist(),
                          "suppress_ids": self.suppress_ids.tolist()}, indent=None)

    def save_with_model(self, model_dir: str | Path) -> None:
        """Writes `kept_ids.json` into an exported model directory (the export also lists the unkept ids as
        generation_config.json `suppress_tokens`, see `checkpoint.layout.with_suppressed`)."""
        self.save(Path(model_dir) / KEPT_IDS_FILE)

    @classmethod
    def load(cls, path: str | Path, original_size: int | None = None) -> "VocabMap":
        """A kept-id file (`read_id_file`); `original_size` (the model's rows) must match the file's when both
        are known."""
        payload = read_id_file(path)
        if "kept_ids" not in payload:
            raise ConfigError(f'{path}: holds "suppress_ids" only; a kept vocabulary needs "kept_ids"')
        size = payload.get("original_size", original_size)
        if size is None:
            raise ConfigError(f'{path}: no "original_size"; say how many rows the model\'s output head has')
        if original_size is not None and size != original_size:
            raise ConfigError(f"{path}: written for a vocabulary of {size} rows but the model has {original_size}")
        return cls.from_ids(payload["kept_ids"], size, payload.get("suppress_ids", []))

    @classmethod
    def of_model(cls, model_dir: str | Path) -> "VocabMap | None":
        """The kept set saved with an exported model, or None when it was trained on the full vocabulary."""
        path = Path(model_dir) / KEPT_IDS_FILE
        return cls.load(path) if path.is_file() else None


def read_suppress_ids(path: str | Path) -> list[int]:
    """Token ids never to generate, from a {"suppress_ids": [...]} file or a kept-id file (its unkept ids plus its
    suppress_ids)."""
    payload = read_id_file(path)
    if "kept_ids" in payload:
        return VocabMap.load(path).suppress_tokens
    return sorted(set(payload["suppress_ids"]))
