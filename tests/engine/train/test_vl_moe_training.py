"""Training a Qwen3-VL-MoE checkpoint's language model through the FFT trainer: full fine-tuning and LoRA on the
experts, exported as the source's qwen3_vl_moe checkpoint (vision bitwise, bf16 as stored, hub expert layout)."""
import json
import shutil

import pytest
import torch
from qwen3_fixtures import qwen3_tokenizer_dir, save_hf_qwen3_vl_moe
from safetensors import safe_open
from tiny_run import tiny_overrides, tiny_run_files  # noqa: F401 (fixture)
from transformers import Qwen3VLMoeForConditionalGeneration

from qforge.engine.config_io import load_config
from qforge.engine.train import FFTConfig, train


def _stored(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_exports_a_qwen3_vl_moe_checkpoint(tiny_run_files, method, tmp_path):
    """A bf16 VL-MoE trained with fp32 parameters: final/ is a qwen3_vl_moe checkpoint in bf16 with the vision tower
    bitwise and the language model moved; LoRA on q_proj and the experts: PEFT's adapter on transformers' VL-MoE
    gives the merged export's logits."""
    base = save_hf_qwen3_vl_moe(tmp_path / "base", seed=4, dtype=torch.bfloat16, transposed=True, vocab_size=151936)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer_dir() / name, base / name)
    extra = {"train.method": "lora", "train.lora.rank": 4,
             "train.lora.target_modules": "[q_proj,experts.gate_up_proj,experts.down_proj]"} if method == "lora" else {}
    config = load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path / "run", **{
        "model.config": "null", "model.tokenizer": "null", "model.path": str(base), "train.max_steps": 2,
        "optim.lr": 1e-2, **extra}))
    final = train(config).final_dir
    assert json.loads((final / "config.json").read_text())["model_type"] == "qwen3_vl_moe"
    before, after = _stored(base), _stored(final)
    assert {k: (t.shape, t.dtype) for k, t in after.items()} == {k: (t.shape, t.dtype) for k, t in before.items()}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("model.language_model.", "lm_head.")) for k in moved), sorted(moved)[:5]
    if method == "lora":
        assert moved == {k for k in before if k.endswith(("q_proj.weight", "experts.gate_up_proj",
                                                          "experts.down_proj"))}
        import peft

        original = Qwen3VLMoeForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(original, tmp_path / "run/final-adapter").eval()
        merged = Qwen3VLMoeForConditionalGeneration.from_pretrained(final, dtype=torch.float32).eval()
        ids = torch.randint(0, 151_000, (1, 16))
        with torch.no_grad():
            # the merged export is rounded to bf16; the adapter applies the update in fp32 on the bf16 base
            ours, theirs = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
        assert (ours - theirs).abs().max() <= 2e-2 * theirs.abs().max()
