"""Qwen3-VL-MoE's language model trained as a text-only Qwen3-MoE, against transformers'
Qwen3VLMoeForConditionalGeneration: config, text logits, the export (vision bitwise, the experts written back in
the layout and dtype the source stored them in). Training runs: tests/engine/train/test_vl_moe_training.py."""
import json

import pytest
import torch
from qwen3_fixtures import save_hf_qwen3_vl_moe
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
