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


@pytest.mark.slow
def test_two_rank_fsdp2_lora_on_experts_of_a_hub_layout_vl_moe_matches_single_process(tiny_run_files, tmp_path):
    """LoRA on q_proj and the experts of a Qwen3-VL-MoE stored in the hub's transposed expert layout, 1 process × 4
    micro-batches vs 2 gloo ranks × 2: each rank reads its experts' rows of the transposed tensors (load_sharded),
    the adapters shard on the expert dim. Same losses; frozen tensors bitwise; each trained tensor's update
    (merged − base) equal norm-wise (the ε-regime of Adam makes elementwise bounds unsafe, see test_lora.py)."""
    import os
    import subprocess
    import sys

    from tiny_run import REPO

    base = save_hf_qwen3_vl_moe(tmp_path / "base", seed=5, transposed=True, vocab_size=151936)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen3_tokenizer_dir() / name, base / name)
    common = {"model.config": "null", "model.tokenizer": "null", "model.path": str(base), "train.max_steps": 2,
              "train.method": "lora", "train.lora.rank": 4, "optim.lr": 1e-2,
              "train.lora.target_modules": "[q_proj,experts.gate_up_proj,experts.down_proj]",
              "evaluate.data": "null", "data.eval": "[]", "data.max_tokens": 160}
    config = ["--config", str(REPO / "recipes/configs/demo.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher, accum in (("single", [sys.executable], 4),
                                  ("fsdp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc_per_node=2"], 2)):
        done = subprocess.run([*launcher, str(REPO / "recipes/fft.py"), *config, *tiny_overrides(
            tiny_run_files, tmp_path / name, **common, **{"train.grad_accum": accum})],
            capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in line]
    assert len(runs["fsdp"]) == 2
    for a, b in zip(runs["fsdp"], runs["single"]):
        assert abs(a - b) <= 1e-5 * abs(b), runs
    source, single, sharded = (_stored(path) for path in (base, tmp_path / "single/final", tmp_path / "fsdp/final"))
    assert single.keys() == sharded.keys() == source.keys()
    for key, tensor in source.items():
        if torch.equal(single[key], tensor):
            assert torch.equal(sharded[key], tensor), key
        else:
            error = (sharded[key] - single[key]).double().norm() / (single[key] - tensor).double().norm()
            assert error <= 1e-4, (key, float(error))
    assert sum(not torch.equal(single[k], t) for k, t in source.items()) == 6  # q_proj, gate_up, down in 2 layers
