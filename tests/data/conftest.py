"""Data-pipeline fixtures: the real Qwen3 chat template, loaded once per session."""
import pytest

from qforge.engine.data import ChatTemplate


@pytest.fixture(scope="session")
def qwen_template(qwen_tokenizer_dir) -> ChatTemplate:
    return ChatTemplate.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_tokenizer(qwen_tokenizer_dir):
    """transformers' tokenizer for the same files: the independent oracle for rendering and token ids."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
