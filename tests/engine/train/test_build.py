"""Model building for a run: parameter dtype vs the fp32 RoPE buffer (issue #12 finding 9)."""
import json

import torch

from qforge.engine.train.build import build_model, meta_model
from qforge.engine.config import Qwen3Config
from qforge.engine.train.config import ModelSettings

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)


def test_random_init_in_bf16_keeps_inv_freq_fp32(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY | {"model_type": "qwen3"}))
    model = build_model(ModelSettings(config=str(tmp_path / "config.json"), tokenizer="qwen3"), torch.bfloat16,
                        torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    exact = 1.0 / 1e6 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.inv_freq, exact.float(), rtol=0, atol=0)


def test_meta_model_allocates_nothing():
    model = meta_model(Qwen3Config(**TINY), torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
