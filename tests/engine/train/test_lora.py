"""LoRA through the FFT trainer, against PEFT (the adapter) and transformers (the merged export)."""
import json

import pytest
import torch
from qwen3_fixtures import save_hf_qwen3, save_hf_qwen3_vl
from tiny_run import TINY_MODEL, tiny_overrides, tiny_run_files  # noqa: F401 (fixture)
from transformers import Qwen3ForCausalLM

from qforge.engine import load_model, save_model
from qforge.engine.config_io import ConfigKeyError, load_config
from qforge.engine.lora import LoRALinear, LoRASettings, apply_lora, export_lora, lora_modules
from qforge.engine.train import FFTConfig, train

peft = pytest.importorskip("peft")


def _close(ours, theirs):
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_adapters_start_at_the_base_model_and_only_they_train(tmp_path):
    model = load_model(save_hf_qwen3(tmp_path / "base"), dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, LoRASettings(rank=4, alpha=8, target_modules=["q_proj", "down_proj"]), seed=0)
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    config = model.config
    per_layer = 4 * (config.hidden_size + config.num_attention_heads * config.head_dim) + 4 * (
        config.intermediate_size + config.hidden_size)
    assert all(".lora_" in n for n in trainable) and sum(trainable.values()) == per_layer * config.num_hidden_layers
    assert len(lora_modules(model)) == 2 * config.num_hidden_layers
    with pytest.raises(ValueError, match="not block linears"):
        LoRASettings(target_modules=["lm_head"])


def test_peft_loads_the_adapter_and_the_merged_export_is_a_plain_qwen3(tmp_path):
    base = save_hf_qwen3(tmp_path / "base", seed=2)
    model = load_model(base, dtype=torch.float32)
    apply_lora(model, LoRASettings(rank=4, alpha=16, dropout=0.1), seed=0)
    for module in lora_modules(model).values():  # stands in for training: B is no longer zero
        torch.nn.init.normal_(module.lora_B.weight, std=0.05)
    model.eval()
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        ours = model(ids)
    merged = export_lora(model, tmp_path, str(base))
    exported = save_model(model, tmp_path / "final", state_dict=merged)
    config = json.loads((tmp_path / "final-adapter/adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and len(config["target_modules"]) == 7
    hf = Qwen3ForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "final-adapter").eval()(ids).logits
        _close(ours, theirs)
        _close(ours, Qwen3ForCausalLM.from_pretrained(exported, dtype=torch.float32)(ids).logits)
    assert not any("lora" in k for k in json.loads((exported / "config.json").read_text()))


def test_lora_training_resumes_exactly_and_exports(tiny_run_files, tmp_path):
    base = save_hf_qwen3(tmp_path / "base", seed=4, **{k: v for k, v in TINY_MODEL.items()
                                                        if k not in ("architectures", "model_type", "torch_dtype")})
    lora = {"model.config": "null", "model.path": str(base), "train.method": "lora", "train.lora.rank": 4,
            "train.lora.dropout": 0.1, "optim.lr": 1e-2}
    settings = lambda out, **extra: load_config(FFTConfig, None, tiny_overrides(tiny_run_files, out, **{  # noqa: E731
        **lora, **extra}))
    full = train(settings(tmp_path / "full", **{"train.max_steps": 4, "train.save_every": 2, "train.keep_last": 5}))
    resumed = train(settings(tmp_path / "resumed", **{"train.max_steps": 4,
                                                     "train.resume": str(tmp_path / "full/checkpoints/step-2")}))
    assert resumed.losses == full.losses[2:] and full.losses[-1] < full.losses[0]
    merged = Qwen3ForCausalLM.from_pretrained(full.final_dir, dtype=torch.float32).eval()
    original = Qwen3ForCausalLM.from_pretrained(base, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(original, tmp_path / "full/final-adapter").eval()
    ids = torch.randint(0, 151_000, (1, 20))
    with torch.no_grad():
        _close(merged(ids).logits, adapted(ids).logits)
        embed = original.get_input_embeddings().weight  # only block linears moved
        assert torch.equal(merged.get_input_embeddings().weight, embed)
        assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                               original.model.layers[0].self_attn.q_proj.weight)
    assert isinstance(load_model(full.final_dir).layers[0].self_attn.q_proj, torch.nn.Linear)
    with pytest.raises(ConfigKeyError, match="'train.lora.rank' must be int ≥ 1, got 0"):
        settings(tmp_path / "bad", **{"train.lora.rank": 0, "train.max_steps": 1})
    assert not isinstance(load_model(full.final_dir).layers[0].self_attn.q_proj, LoRALinear)


def test_trainer_exports_in_the_format_and_dtype_of_its_source(tiny_run_files, tmp_path):
    """A bf16 Qwen3-VL checkpoint trained with fp32 parameters: final/ is a Qwen3-VL checkpoint stored in bf16 again
    (vision tower untouched) and the adapter's keys are the VL checkpoint's (`model.language_model.…`), which is
    what the run's weights policy learned from the source when it was read."""
    import safetensors
    from transformers import Qwen3VLForConditionalGeneration

    text = {k: v for k, v in TINY_MODEL.items() if k not in ("architectures", "model_type", "torch_dtype",
                                                              "tie_word_embeddings", "max_position_embeddings")}
    base = save_hf_qwen3_vl(tmp_path / "base", seed=3, dtype=torch.bfloat16, **text)
    config = load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path / "run", **{
        "model.config": "null", "model.path": str(base), "train.method": "lora", "train.lora.rank": 4,
        "train.max_steps": 2}))
    final = train(config).final_dir
    assert json.loads((final / "config.json").read_text())["model_type"] == "qwen3_vl"
    vl = Qwen3VLForConditionalGeneration.from_pretrained(final)
    assert vl.dtype == torch.bfloat16
    original = Qwen3VLForConditionalGeneration.from_pretrained(base)
    for name, param in original.model.visual.named_parameters():
        assert torch.equal(param, vl.model.visual.get_parameter(name)), name
    with safetensors.safe_open(tmp_path / "run/final-adapter/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".language_model." in key for key in keys), keys[:3]


@pytest.mark.slow
def test_two_rank_fsdp2_lora_with_sequence_steps_matches_single_process(tiny_run_files, tmp_path):
    """LoRA under FSDP2 (frozen and trainable parameters in one unit) with `train.batch_size` steps dealt to two
    ranks trains like one process (gloo, 2 CPU processes)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from tiny_run import REPO

    common = {"train.max_steps": 3, "data.max_tokens": 160, "train.batch_size": 8, "train.method": "lora",
              "train.lora.rank": 4, "optim.lr": 1e-2, "evaluate.data": "null", "data.eval": "[]"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("single", [sys.executable]),
                           ("fsdp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node=2"])):
        proc = subprocess.run([*launcher, str(REPO / "recipes/fft.py"), "--config",
                               str(REPO / "recipes/configs/demo.yaml"),
                               *tiny_overrides(tiny_run_files, tmp_path / name, **common)],
                              capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in line]
    # Error analysis. The two runs do the same arithmetic in another order: one process sums 8 sequences'
    # gradients in turn, two ranks sum 4 each and gloo adds the halves (and the batch shapes, hence the matmul
    # blockings, differ). A reordered fp32 sum of n terms differs by ≈ u·sqrt(n)·|terms| (u = 2^-24, rounding
    # errors of random sign); n ≈ 800 tokens a step gives 1.7e-6 relative.
    # - Loss: step 1 starts from the same weights, so only that rounding separates them (5e-8 relative
    #   measured); later steps add the weights' differences below. 1e-5 ≈ 6·u·sqrt(n).
    # - Weights: AdamW's update m̂/(√v̂ + ε) is scale-free, so a well-conditioned element carries its gradient's
    #   relative rounding (~u·sqrt(n)) into its update. But at g ≈ 0 the update's slope is 1/ε: an element whose
    #   gradient cancels to ≈ ε turns the rounding of its sum, u·sqrt(n)·G (G: the size of the summed terms), into
    #   an update error lr·u·sqrt(n)·G/ε. This is what failed atol=1e-6 under transformers 5.25 / torch 2.13: one
    #   element of layer 0's up_proj lora_A had g ≈ 1e-8 at step 2 (B was still one ±lr step from zero) with terms
    #   G ≈ 5e-5 (from the optimizer state), bound 1e-2·5.96e-8·28·5e-5/1e-8 ≈ 8e-5, 9.0e-6 measured, i.e.
    #   1.8e-6 on the merged weight (× s·|B| = 8 × 0.025). Which elements cancel depends on the data, not on the
    #   library, so no elementwise atol is safe for every version; not a real difference (2.5e-4 relative on one
    #   of 128 elements, losses equal).
    # - So each module's trained delta s·B·A is compared norm-wise: relative Frobenius error ≤ 1e-4, which is
    #   ≈ 50× the well-conditioned rounding (2e-6) and 13× the ε-regime case measured (7.4e-6), while a step that
    #   lost a rank's gradient or used other sequences changes every element's update by O(lr): O(1e-1) relative.
    assert len(runs["fsdp"]) == 3
    for a, b in zip(runs["fsdp"], runs["single"]):
        assert abs(a - b) <= 1e-5 * abs(b), runs
    single, sharded = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("single", "fsdp"))
    adapter_dir = tmp_path / "single" / "final-adapter"
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = peft_config["lora_alpha"] / peft_config["r"]
    assert single.keys() == sharded.keys()
    adapted = set()
    for name, lora_a in adapter.items():
        if ".lora_A." not in name:
            continue
        key = "model." + name.split("base_model.model.model.", 1)[1].replace(".lora_A.weight", ".weight")
        delta = scale * adapter[name.replace(".lora_A.", ".lora_B.")].double() @ lora_a.double()
        error = (sharded[key].double() - single[key].double()).norm() / delta.norm()
        assert error <= 1e-4, (key, float(error))
        adapted.add(key)
    assert len(adapted) == 14  # q, k, v, o, gate, up, down in 2 layers
    for key in single.keys() - adapted:
        assert torch.equal(sharded[key], single[key]), key  # frozen tensors: bitwise
