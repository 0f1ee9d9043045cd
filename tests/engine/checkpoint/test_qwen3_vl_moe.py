"""Qwen3-VL-MoE's language model trained as a text-only Qwen3-MoE, against transformers'
Qwen3VLMoeForConditionalGeneration: config, text logits, the export (vision bitwise, the experts written back in
the layout and dtype the source stored them in). Training runs: tests/engine/train/test_vl_moe_training.py."""
import json

import pytest
import torch
from qwen3_fixtures import qwen3_tokenizer_dir, save_hf_qwen3_vl_moe
from safetensors import safe_open
from transformers import Qwen3VLMoeForConditionalGeneration

from qforge.engine import load_model, save_model
from qforge.engine.checkpoint import read_source
from qforge.engine.config import ConfigError, Qwen3Config

def _stored(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _close(ours, theirs, tol=1e-5):
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= tol * scale, float((ours - theirs).abs().max() / scale)


@pytest.fixture(scope="module", params=[False, True], ids=["fused", "hub_transposed"])
def checkpoint(request, tmp_path_factory):
    return save_hf_qwen3_vl_moe(tmp_path_factory.mktemp("vlmoe") / "ckpt", seed=3, transposed=request.param)


def test_config_and_layout(checkpoint):
    config = Qwen3Config.from_json(checkpoint / "config.json")
    assert (config.num_experts, config.moe_intermediate_size, config.num_experts_per_tok) == (4, 12, 2)
    assert config.norm_topk_prob and config.router_aux_loss_coef == 0.01 and config.rope_scaling is None
    transposed = _stored(checkpoint)["model.language_model.layers.0.mlp.experts.down_proj"].shape == (4, 12, 32)
    assert read_source(checkpoint).experts == ("fused_transposed" if transposed else "fused")
    hf = json.loads((checkpoint / "config.json").read_text())
    with pytest.raises(ConfigError, match="describes a MoE language model but model_type is 'qwen3_vl'"):
        Qwen3Config.from_hf({**hf, "model_type": "qwen3_vl"}, "x/config.json")


def test_text_logits_match_transformers(checkpoint):
    ours = load_model(checkpoint, dtype=torch.float32)
    theirs = Qwen3VLMoeForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        _close(ours(ids), theirs(input_ids=ids).logits)
    experts = theirs.model.language_model.layers[1].mlp.experts
    assert torch.equal(ours.layers[1].mlp.experts.gate_up_proj, experts.gate_up_proj)


def test_export_rewrites_the_language_model_in_the_source_layout(checkpoint, tmp_path):
    model = load_model(checkpoint, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # stands in for training: every language tensor moves
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    source = read_source(checkpoint)
    out = save_model(model, tmp_path / "out", source=source)
    before, after = _stored(checkpoint), _stored(out)
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert after[key].shape == tensor.shape and after[key].dtype == tensor.dtype, key
        assert torch.equal(after[key], tensor) == (not key.startswith(("model.language_model.", "lm_head."))), key
    theirs = Qwen3VLMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        _close(model(ids), theirs(input_ids=ids).logits)
    original = Qwen3VLMoeForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    for name, param in original.model.visual.named_parameters():
        assert torch.equal(param, theirs.model.visual.get_parameter(name)), name


def test_cjk_prune_of_a_vl_moe_checkpoint_loads_in_transformers(tmp_path):
    """The vocabulary prune treats a qwen3_vl_moe checkpoint as a Qwen3-VL one: text_config.vocab_size, vision ids
    remapped, experts (hub layout) and vision copied; transformers' logits are the kept columns of the original's."""
    from qforge.engine.vocab import VocabMap
    from qforge.engine.vocab_prune import prune_checkpoint

    rows = 151_936
    source = save_hf_qwen3_vl_moe(tmp_path / "vl", seed=1, transposed=True, vocab_size=rows)
    vocab = VocabMap.from_tokenizer(qwen3_tokenizer_dir(), rows)
    pruned = prune_checkpoint(source, tmp_path / "pruned", vocab, qwen3_tokenizer_dir())
    config = json.loads((pruned / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == -(-vocab.new_size // 128) * 128
    assert config["image_token_id"] == vocab.old_to_new[151655]
    ids = torch.tensor([[151644, 872, 198, 9707, 1879, 151645]])
    with torch.no_grad():
        original = Qwen3VLMoeForConditionalGeneration.from_pretrained(source, dtype=torch.float32)(input_ids=ids)
        logits = Qwen3VLMoeForConditionalGeneration.from_pretrained(pruned, dtype=torch.float32)(
            input_ids=vocab.to_new(ids)).logits
        _close(load_model(pruned, dtype=torch.float32)(vocab.to_new(ids)), logits)
    assert torch.equal(logits[0, :, :vocab.new_size], original.logits[0][:, vocab.kept_ids])
    before, after = _stored(source), _stored(pruned)
    assert all(torch.equal(after[k], v) for k, v in before.items() if ".visual." in k or ".experts." in k)
