"""Pruned tokenizer and checkpoint, checked with transformers as the oracle."""
import json

import pytest
import torch
from qwen3_fixtures import save_hf_qwen3
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from vocab_fixtures import (NON_CJK_TEXTS, TINY_REAL_VOCAB, tiny_real_vocab_model,  # noqa: F401
                            vocab_map)

from qforge.engine.vocab import VocabMap
from qforge.engine.vocab_prune import prune_checkpoint, prune_tokenizer
from qforge.recipes.prune import main as prune_main

CJK_TEXT = "中文，日本語ですか？한국어 ＡＢＣ 𠀀"


@pytest.fixture(scope="module")
def tokenizers(qwen_tokenizer_dir, vocab_map, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned-tokenizer")
    prune_tokenizer(qwen_tokenizer_dir, out, vocab_map)
    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir), AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def pruned_untied(tiny_real_vocab_model, vocab_map, qwen_tokenizer_dir, tmp_path_factory):
    return prune_checkpoint(tiny_real_vocab_model, tmp_path_factory.mktemp("out") / "pruned", vocab_map,
                            qwen_tokenizer_dir)


def test_pruned_tokenizer_gives_the_same_token_strings_on_non_cjk_text(tokenizers, vocab_map):
    original, pruned = tokenizers
    assert len(pruned) == vocab_map.new_size
    for text in NON_CJK_TEXTS:
        assert pruned.tokenize(text) == original.tokenize(text), text
        ids = original(text)["input_ids"]
        assert pruned(text)["input_ids"] == vocab_map.to_new(torch.tensor(ids)).tolist()
        assert pruned.decode(pruned(text)["input_ids"]) == original.decode(ids)  # NFC-normalised text


def test_chat_template_and_special_tokens_survive(tokenizers, vocab_map):
    original, pruned = tokenizers
    for token, old_id in original.get_added_vocab().items():
        assert pruned.convert_tokens_to_ids(token) == vocab_map.old_to_new[old_id]
    assert pruned.eos_token == original.eos_token == "<|im_end|>" and pruned.pad_token == original.pad_token
    messages = [{"role": "system", "content": "Trả lời bằng tiếng Việt."},
                {"role": "user", "content": NON_CJK_TEXTS[0]},
                {"role": "assistant", "content": NON_CJK_TEXTS[5]}]
    text = original.apply_chat_template(messages, tokenize=False)
    assert pruned.apply_chat_template(messages, tokenize=False) == text
    assert pruned(text)["input_ids"] == vocab_map.to_new(torch.tensor(original(text)["input_ids"])).tolist()


def test_cjk_input_stays_encodable_through_kept_bytes(tokenizers, vocab_map):
    original, pruned = tokenizers
    ids = pruned(CJK_TEXT)["input_ids"]
    assert pruned.decode(ids) == CJK_TEXT and max(ids) < vocab_map.new_size
    assert len(ids) > len(original(CJK_TEXT)["input_ids"])  # the CJK words and characters are gone


def test_pruned_checkpoint_loads_in_transformers_with_equal_kept_logits(tiny_real_vocab_model, pruned_untied,
                                                                         tokenizers, vocab_map):
    original_tokenizer, _ = tokenizers
    index = json.loads((pruned_untied / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    original = AutoModelForCausalLM.from_pretrained(tiny_real_vocab_model)
    pruned = AutoModelForCausalLM.from_pretrained(pruned_untied)
    rows = -(-vocab_map.new_size // 128) * 128
    assert pruned.config.vocab_size == rows == pruned.lm_head.weight.shape[0] == 119_168
    ids = torch.tensor([original_tokenizer(NON_CJK_TEXTS[0] + NON_CJK_TEXTS[4])["input_ids"]])
    with torch.no_grad():
        expected = original(ids).logits[0][:, vocab_map.kept_ids]
        logits = pruned(vocab_map.to_new(ids)).logits[0]
    assert torch.equal(logits[:, :vocab_map.new_size], expected)
    assert (logits[:, vocab_map.new_size:] == 0).all()


def test_generation_config_remaps_special_ids_and_lists_suppressed_tokens(tiny_real_vocab_model, pruned_untied,
                                                                          vocab_map):
    before = json.loads((tiny_real_vocab_model / "generation_config.json").read_text())
    after = json.loads((pruned_untied / "generation_config.json").read_text())
    config = json.loads((pruned_untied / "config.json").read_text())
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert after[field] == config[field] == int(vocab_map.old_to_new[before[field]])
    padding = list(range(vocab_map.new_size, config["vocab_size"]))
    assert after["suppress_tokens"] == sorted(vocab_map.to_new(vocab_map.suppress_ids).tolist() + padding)


def test_recipe_prunes_a_tied_checkpoint_that_stays_tied(tmp_path, qwen_tokenizer_dir, vocab_map, capsys):
    source = save_hf_qwen3(tmp_path / "tied", seed=2, tie_word_embeddings=True, **TINY_REAL_VOCAB)
    out = tmp_path / "pruned"
    config = tmp_path / "prune.yaml"
    config.write_text(f"model:\n  path: {source}\ntokenizer:\n  path: {qwen_tokenizer_dir}\n")
    assert prune_main(["--config", str(config), f"output.dir={out}", "vocab.pad_to_multiple=null"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_after"] == vocab_map.new_size
    assert summary["weight_bytes_after"] < summary["weight_bytes_before"]
    with safe_open(out / "model.safetensors", framework="pt") as tensors:
        assert "lm_head.weight" not in tensors.keys()
    original = AutoModelForCausalLM.from_pretrained(source)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[0, 1000, 151644, 5000, 20, 151645]])
    with torch.no_grad():  # a matmul over fewer rows may block differently: rounding-level differences only
        torch.testing.assert_close(pruned(vocab_map.to_new(ids)).logits[0],
                                   original(ids).logits[0][:, vocab_map.kept_ids], rtol=0, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>") == vocab_map.to_new(ids)[0, -1]


def test_bad_output_or_mismatched_vocabulary_is_refused_without_leftovers(tiny_real_vocab_model, qwen_tokenizer_dir,
                                                                          pruned_untied, vocab_map, tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        prune_checkpoint(tiny_real_vocab_model, pruned_untied, vocab_map, qwen_tokenizer_dir)
    tokenizer_rows = VocabMap.from_tokenizer(qwen_tokenizer_dir)  # 151,669 rows: not this model's 151,936
    with pytest.raises(ValueError, match="config.json: vocab_size=151936"):
        prune_checkpoint(tiny_real_vocab_model, tmp_path / "pruned", tokenizer_rows, qwen_tokenizer_dir)
    assert list(tmp_path.iterdir()) == []


def test_vietnamese_letters_are_written_without_suppressed_tokens(tokenizers, vocab_map):
    """So suppression at sampling time never takes a Vietnamese letter away from the model."""
    _, pruned = tokenizers
    suppressed = set(vocab_map.to_new(vocab_map.suppress_ids).tolist())
    letters = [chr(cp) for cp in [*range(0xC0, 0x1B1), *range(0x1EA0, 0x1EFA)] if chr(cp).isalpha()]
    for letter in letters:
        for text in (letter, " " + letter, letter.lower() + "n"):
            assert not suppressed & set(pruned(text)["input_ids"]), text
