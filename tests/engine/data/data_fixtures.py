"""Data-pipeline fixtures, imported by the test modules that use them.

Not a conftest.py: a second module named `conftest` would shadow tests/conftest.py for every
`from conftest import ...` collected after it. The loaders are cached so each file is read once per session.
"""
import functools

import pytest

from qforge.engine.data import ChatTemplate


@functools.cache
def _template(directory) -> ChatTemplate:
    return ChatTemplate.from_pretrained(directory)


@functools.cache
def _hf_tokenizer(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture
def qwen_template(qwen_tokenizer_dir) -> ChatTemplate:
    """The real Qwen3 tokenizer and chat template."""
    return _template(qwen_tokenizer_dir)


@pytest.fixture
def hf_tokenizer(qwen_tokenizer_dir):
    """transformers' tokenizer for the same files: the independent oracle for rendering and token ids."""
    return _hf_tokenizer(qwen_tokenizer_dir)
