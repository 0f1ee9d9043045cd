"""A model pushed towards CJK before pruning cannot emit a CJK character afterwards (HF and qforge sampling).

The boosted model scores every removed token highest and next the byte tokens that build three- and
four-byte characters (continuation bytes, leads E1-F0), so after pruning it samples a soup of raw bytes:
without suppression that soup assembles CJK characters byte by byte (shown, so the check can fail); with
the exported `suppress_tokens` it never does, while other three-byte characters still form.
"""
from pathlib import Path

import pytest
import torch
from qwen3_fixtures import save_hf_qwen3
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from vocab_fixtures import CJK_CHAR, TINY_REAL_VOCAB, vocab_map  # noqa: F401  (fixture)

from qforge.engine import generate, load_model
from qforge.engine.checkpoint import read_source
from qforge.engine.vocab import load_vocab
from qforge.engine.vocab_prune import prune_checkpoint

PROMPT = "Xin chào, hôm nay bạn thế nào?"
HF_SAMPLING = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)


def boost(model_dir: Path, removed: torch.Tensor, byte_ids: list[int]) -> None:
    """A constant input feature (dimension 0) that the output rows of the boosted tokens read."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.embed_tokens.weight"][:, 0] = 20.0
    head = tensors["lm_head.weight"]
    head[:, 0] = 0.0
    head[removed, 0] = 6.0
    head[byte_ids, 0] = 5.0
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding steps here are many small ops: one thread avoids sync overhead (3x faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def boosted(tmp_path_factory, vocab_map, qwen_tokenizer_dir):
    """(boosted original checkpoint, its pruned export)."""
    root = tmp_path_factory.mktemp("boosted")
    source = save_hf_qwen3(root / "source", seed=3, tie_word_embeddings=False, **TINY_REAL_VOCAB)
    regular, _ = load_vocab(qwen_tokenizer_dir)
    byte_ids = [i for i, data in regular.items()
                if len(data) == 1 and (0x80 <= data[0] < 0xC0 or 0xE1 <= data[0] <= 0xF0)]
    boost(source, (vocab_map.old_to_new == -1).nonzero().squeeze(1), byte_ids)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((qwen_tokenizer_dir / name).read_bytes())
    return source, prune_checkpoint(source, root / "pruned", vocab_map)


def hf_sample(model_dir: Path, tokens: int, rows: int, **options) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = torch.tensor([tokenizer(PROMPT)["input_ids"]] * rows)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                             min_new_tokens=tokens, **HF_SAMPLING, **options)
    return [tokenizer.decode(row[prompt.shape[1]:]) for row in out]


def test_boosted_model_prefers_cjk_before_pruning(boosted):
    texts = hf_sample(boosted[0], 16, rows=4)
    assert sum(len(CJK_CHAR.findall(text)) for text in texts) >= 64  # CJK tokens hold one or more characters


def test_hf_generate_with_exported_suppress_tokens_never_emits_cjk(boosted):
    pruned = boosted[1]
    without = hf_sample(pruned, 16, rows=8, suppress_tokens=None)
    assert CJK_CHAR.search("".join(without))  # byte soup does assemble CJK characters
    text = "".join(hf_sample(pruned, 128, rows=16))  # 2048 tokens; suppress_tokens from generation_config.json
    assert CJK_CHAR.findall(text) == []
    assert sum(ord(c) > 0x7FF and c != "\ufffd" for c in text) > 10  # other 3-byte characters still form


def test_qforge_generate_with_exported_suppress_ids_never_emits_cjk(boosted):
    pruned = boosted[1]
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    model = load_model(pruned, dtype=torch.float32)
    prompts = [tokenizer(PROMPT)["input_ids"]] * 16
    suppress = read_source(pruned).generation_config["suppress_tokens"]
    without = generate(model, prompts[:8], max_new_tokens=16, temperature=1.0, seed=0)
    assert CJK_CHAR.search("".join(tokenizer.decode(row) for row in without))
    rows = generate(model, prompts, max_new_tokens=128, temperature=1.0, seed=1, suppress_ids=suppress)
    assert sum(map(len, rows)) == 2048
    text = "".join(tokenizer.decode(row) for row in rows)
    assert CJK_CHAR.findall(text) == [] and sum(ord(c) > 0x7FF and c != "\ufffd" for c in text) > 10
