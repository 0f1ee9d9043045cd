"""Exact and near-duplicate removal: normalised-text hashes, and MinHash signatures with LSH banding.

MinHash (Broder 1997) estimates the Jaccard similarity of two shingle sets by how many of `num_perm`
random hash minima agree. LSH splits a signature into bands; two texts become candidates when one whole
band agrees, and a candidate is a duplicate when its estimated similarity reaches the threshold. Shingles
are word n-grams of the normalised text (or its characters when it is shorter than n words).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)


def normalise(text: str) -> str:
    """Case, Unicode form, punctuation and whitespace differences do not make a text new."""
    text = unicodedata.normalize("NFC", text).lower()
    return " ".join(re.findall(r"\w+", text))


def exact_key(text: str) -> str:
    return hashlib.sha1(normalise(text).encode("utf-8")).hexdigest()


def shingles(text: str, n: int = 3) -> set[str]:
    words = normalise(text).split()
    if len(words) >= n:
        return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}
    joined = " ".join(words)
    return {joined[i:i + 4] for i in range(max(1, len(joined) - 3))}


def _hash32(items: set[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=4).digest(), "little")
                     for s in items], dtype=np.uint64)


class MinHasher:
    """`num_perm` multiply-shift hash functions h(x) = ((a*x + b) mod 2^64) >> 32 with odd a."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2 ** 63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2 ** 63, size=num_perm, dtype=np.uint64)

    def signature(self, shingle_set: set[str]) -> np.ndarray:
        values = _hash32(shingle_set or {""})
        with np.errstate(over="ignore"):  # wrap-around is the mod 2^64 of the hash family
            hashed = (values[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)
        return (hashed & _MASK32).min(axis=0)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicateIndex:
    """Streaming near-duplicate detection: `add(key, text)` returns the key of an earlier kept text it
    near-duplicates (estimated Jaccard >= threshold), or None and then remembers this one."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, bands: int = 32, shingle_words: int = 3,
                 seed: int = 0):
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.rows = num_perm // bands
        self.bands = bands
        self.shingle_words = shingle_words
        self.hasher = MinHasher(num_perm, seed)
        self.buckets: list[dict[bytes, list[str]]] = [{} for _ in range(bands)]
        self.signatures: dict[str, np.ndarray] = {}

    def add(self, key: str, text: str) -> str | None:
        signature = self.hasher.signature(shingles(text, self.shingle_words))
        bands = [signature[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen = set()
        for bucket, band in zip(self.buckets, bands):
            for other in bucket.get(band, ()):
                if other not in seen:
                    seen.add(other)
                    if np.mean(self.signatures[other] == signature) >= self.threshold:
                        return other
        for bucket, band in zip(self.buckets, bands):
            bucket.setdefault(band, []).append(key)
        self.signatures[key] = signature
        return None


class Deduplicator:
    """Exact duplicates (same normalised text), then near duplicates; the first occurrence is kept."""

    def __init__(self, near_threshold: float | None = 0.7, **minhash):
        self.exact: dict[str, str] = {}
        self.near = NearDuplicateIndex(near_threshold, **minhash) if near_threshold else None

    def check(self, key: str, text: str) -> tuple[str, str] | None:
        """None for a new text (now remembered), else ("exact_duplicate" | "near_duplicate", key of the original)."""
        digest = exact_key(text)
        if digest in self.exact:
            return "exact_duplicate", self.exact[digest]
        if self.near is not None:
            original = self.near.add(key, text)
            if original is not None:
                return "near_duplicate", original
        self.exact[digest] = key
        return None
