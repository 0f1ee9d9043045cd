"""Qwen3-VL's language model trained as a text-only Qwen3, against transformers' Qwen3VLForConditionalGeneration.

The oracle for logits, generation, export and the vocabulary prune is transformers itself; the vision tower must
come out of every export bitwise equal to what went in.
"""
import json

import pytest
import torch
from qwen3_fixtures import qwen3_tokenizer_dir, save_hf_qwen3_vl
from safetensors import safe_open
from transformers import Qwen3VLForConditionalGeneration

from qforge.engine import generate, load_model, save_model
from qforge.engine.checkpoint import read_source
from qforge.engine.config import ConfigError, Qwen3Config

PROCESSOR_FILES = {"preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessorFast",
                                                "patch_size": 16, "merge_size": 2},
                   "video_preprocessor_config.json": {"patch_size": 16},
                   "chat_template.json": {"chat_template": "{{ messages }}"}}


def _tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _hf_logits(path, ids):
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits, model


def _close(ours, theirs):
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-5 * scale, float((ours - theirs).abs().max() / scale)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def vl_checkpoint(request, tmp_path_factory):
    path = save_hf_qwen3_vl(tmp_path_factory.mktemp("vl") / "ckpt", seed=3, tie_word_embeddings=request.param,
                            max_shard_size="100KB")
    for name, data in PROCESSOR_FILES.items():
        (path / name).write_text(json.dumps(data))
    return path


def test_config_reads_the_nested_text_config(vl_checkpoint):
    hf = json.loads((vl_checkpoint / "config.json").read_text())
    config = Qwen3Config.from_json(vl_checkpoint / "config.json")
    assert config.hidden_size == hf["text_config"]["hidden_size"] and config.rope_scaling is None
    assert config.tie_word_embeddings == hf["tie_word_embeddings"]
    with pytest.raises(ConfigError, match="text_config"):
        Qwen3Config.from_hf({"model_type": "qwen3_vl"}, "x/config.json")


def test_text_only_logits_and_greedy_generation_match_transformers(vl_checkpoint):
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 40))
    expected, hf = _hf_logits(vl_checkpoint, ids)
    model = load_model(vl_checkpoint, dtype=torch.float32)
    assert len(list(model.parameters())) == len([k for k in _tensors(vl_checkpoint) if "language_model" in k]) + (
        0 if model.config.tie_word_embeddings else 1)
    with torch.no_grad():
        _close(model(ids), expected)
        packed = model(ids.flatten(), cu_seqlens=torch.tensor([0, 40, 80], dtype=torch.int32))  # training's form
    _close(packed.view(2, 40, -1), expected)
    prompt = ids[0, :12]
    ours = generate(model, [prompt.tolist()], max_new_tokens=10)[0]
    with torch.no_grad():
        theirs = hf.generate(prompt[None], max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, 12:].tolist()
    assert ours == theirs


def test_export_rewrites_language_weights_and_copies_the_rest_bitwise(vl_checkpoint, tmp_path):
    source = read_source(vl_checkpoint)
    model = load_model(source, dtype=torch.float32)
    with torch.no_grad():  # stands in for training: every language tensor changes
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    out = save_model(model, tmp_path / "final", source, tokenizer_dir=qwen3_tokenizer_dir())
    source, exported = _tensors(vl_checkpoint), _tensors(out)
    assert source.keys() == exported.keys()
    state = dict(model.named_parameters())
    for key, tensor in exported.items():
        if key.startswith("model.visual."):
            assert torch.equal(tensor, source[key]) and tensor.dtype == source[key].dtype, key
        elif key == "lm_head.weight":
            assert torch.equal(tensor, model.output_weight)
        else:
            assert torch.equal(tensor, state[key.removeprefix("model.language_model.")]), key
    for name in [*PROCESSOR_FILES, "config.json", "generation_config.json"]:
        assert (out / name).read_bytes() == (vl_checkpoint / name).read_bytes(), name
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors.index.json").is_file()

    ids = torch.randint(0, 512, (1, 33))
    expected, _ = _hf_logits(out, ids)  # transformers loads the export as Qwen3VLForConditionalGeneration
    with torch.no_grad():
        _close(model(ids), expected)
        _close(load_model(out, dtype=torch.float32)(ids), expected)  # save/load round trip


def test_cjk_prune_of_a_vl_checkpoint_loads_in_transformers(tmp_path):
    QWEN_ROWS = 151_936

    from qforge.engine.vocab import VocabMap
    from qforge.engine.vocab_prune import prune_checkpoint

    tokenizer = qwen3_tokenizer_dir()
    source = save_hf_qwen3_vl(tmp_path / "vl", seed=1, vocab_size=QWEN_ROWS, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    (source / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_FILES["preprocessor_config.json"]))
    vocab = VocabMap.from_tokenizer(tokenizer, QWEN_ROWS)
    pruned = prune_checkpoint(source, tmp_path / "pruned", vocab, tokenizer)
    config = json.loads((pruned / "config.json").read_text())
    rows = config["text_config"]["vocab_size"]
    assert rows == -(-vocab.new_size // 128) * 128
    assert config["image_token_id"] == vocab.old_to_new[151655]
    assert (pruned / "preprocessor_config.json").is_file()
    ids = torch.tensor([[151644, 872, 198, 9707, 1879, 151645]])
    original, _ = _hf_logits(source, ids)
    logits, _ = _hf_logits(pruned, vocab.to_new(ids))
    assert torch.equal(logits[0, :, :vocab.new_size], original[0][:, vocab.kept_ids])
    before, after = _tensors(source), _tensors(pruned)
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("model.visual."))
    with torch.no_grad():
        ours = load_model(pruned, dtype=torch.float32)(vocab.to_new(ids))
    _close(ours, logits)
