"""Shared fixtures for the vocabulary tests (tests/engine/test_vocab*.py): the real tokenizer's VocabMap and tiny Qwen3 models with its 151,936 rows.

(A module rather than a conftest.py: pytest loads every conftest.py under the same module name.)
"""
import re

import pytest
from qwen3_fixtures import save_hf_qwen3

from qforge.engine.vocab import CJK_RANGES, VocabMap

QWEN_ROWS = 151_936
TINY_REAL_VOCAB = dict(vocab_size=QWEN_ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
CJK_CHAR = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in CJK_RANGES) + "]")

NON_CJK_TEXTS = [
    "Xin chào! Tôi tên là Nguyễn Thị Hương, sống ở Hà Nội. Hôm nay trời đẹp, chúng ta đi dạo nhé?",
    "Phở bò tái chín, bánh mì ốp la, cà phê sữa đá — ĐƯỜNG PHỐ SÀI GÒN ỒN ÀO NHƯNG ẤM ÁP.",
    "Tiếng Việt dùng dấu tổ hợp: a\u0300 a\u0301 a\u0323 a\u0309 a\u0303 (NFD) và ầ ấ ậ ẩ ẫ (NFC).",
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; isn't it?\n\n  Indented\tTabs\r\n",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(φ^n)\n",
    "Let $f(x) = \\int_0^x e^{-t^2}\\,dt$. Then ∀ε>0 ∃δ: |x−y|<δ ⇒ |f(x)−f(y)|<ε, and ∑ 1/n² = π²/6 ≈ 1.6449.",
    "Здравствуйте, Γειά σου, مرحبا, שלום, नमस्ते, สวัสดี — emoji 😀🇻🇳👍🏽 and ❤️ too.",
]


@pytest.fixture(scope="session")
def vocab_map(qwen_tokenizer_dir) -> VocabMap:
    return VocabMap.from_tokenizer(qwen_tokenizer_dir, QWEN_ROWS)


@pytest.fixture(scope="session")
def tiny_real_vocab_model(tmp_path_factory):
    """An untied tiny HF Qwen3 with the real row count, saved in two shards."""
    return save_hf_qwen3(tmp_path_factory.mktemp("models") / "untied", seed=1, max_shard_size="8MB",
                         tie_word_embeddings=False, **TINY_REAL_VOCAB)
