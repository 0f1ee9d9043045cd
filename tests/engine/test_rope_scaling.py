"""YaRN long-context RoPE (Qwen3's documented `rope_scaling`), against transformers' Qwen3ForCausalLM.

The tiny model's original window is 64 positions so positions 64..255 (beyond it) are cheap to check."""
import pytest
import torch
from qwen3_fixtures import save_hf_qwen3
from transformers import Qwen3ForCausalLM

from qforge.engine import generate, load_model, save_model
from qforge.engine.config import ConfigError, Qwen3Config
from qforge.engine.rope_scaling import rope_frequencies

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def yarn_checkpoint(tmp_path_factory):
    return save_hf_qwen3(tmp_path_factory.mktemp("yarn") / "ckpt", seed=5, rope_scaling=dict(YARN),
                         max_position_embeddings=256)


def _close(ours, theirs):
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_frequencies_match_transformers_yarn_init():
    from transformers import Qwen3Config as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling in (YARN, {**YARN, "factor": 8.0, "beta_fast": 16, "beta_slow": 2},
                    {**YARN, "original_max_position_embeddings": 32768, "truncate": False}):
        hf = HFConfig(hidden_size=64, num_attention_heads=4, head_dim=32, rope_theta=1e6, rope_scaling=dict(scaling))
        expected, attention = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
        inv_freq, ours = rope_frequencies(32, 1e6, scaling)
        torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
        assert ours == pytest.approx(attention, rel=1e-12)


def test_logits_beyond_the_original_window_match_transformers(yarn_checkpoint, tmp_path):
    config = Qwen3Config.from_json(yarn_checkpoint / "config.json")
    assert config.rope_scaling["rope_type"] == "yarn" and config.rope_scaling["factor"] == 4.0
    hf = Qwen3ForCausalLM.from_pretrained(yarn_checkpoint, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (1, 240))
    with torch.no_grad():
        expected = hf(ids).logits[0]
        model = load_model(yarn_checkpoint, dtype=torch.float32)
        _close(model(ids)[0], expected)
        # the packed training form: two sequences, the second one past the original window on its own
        packed = torch.cat([ids[0, :100], ids[0]])
        logits = model(packed, cu_seqlens=torch.tensor([0, 100, 340], dtype=torch.int32))
        _close(logits[100:], expected)
        plain = Qwen3ForCausalLM.from_pretrained(yarn_checkpoint, dtype=torch.float32,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        assert (plain(ids).logits[0, 64:] - expected[64:]).abs().max() > 1e-3  # the scaling is really in play
        saved = save_model(model, tmp_path / "out")
        _close(Qwen3ForCausalLM.from_pretrained(saved, dtype=torch.float32)(ids).logits[0], expected)
    prompt = ids[0, :70].tolist()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert generate(model, [prompt], max_new_tokens=8) == [theirs[0, 70:].tolist()]


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0}])
def test_unsupported_or_incomplete_rope_scaling_is_a_config_error(rope):
    hf = dict(model_type="qwen3", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
              num_attention_heads=1, head_dim=8, rope_scaling=rope)
    with pytest.raises(ConfigError, match=r"m/config.json: field 'rope_scaling'"):
        Qwen3Config.from_hf(hf, "m/config.json")
