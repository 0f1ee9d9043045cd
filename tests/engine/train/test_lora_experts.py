"""LoRA on Qwen3-MoE experts against PEFT's `target_parameters` LoRA (ParamWrapper) on transformers'
Qwen3MoeForCausalLM: the update of every expert, the loss (CE + router aux) and every adapter gradient, the saved
adapter loading in PEFT, and the merged export reloading in transformers."""
import json

import pytest
import torch
import torch.nn.functional as F
from qwen3_fixtures import save_hf_qwen3_moe
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from qforge.engine import load_model, save_model
from qforge.engine.lora import (EXPERT_TARGETS, LoRAExperts, LoRASettings, apply_lora, export_lora, lora_experts,
                                lora_modules)
from qforge.engine.model import hf_key

peft = pytest.importorskip("peft")

# H, 2I and r·E all differ, so a transposed or mis-strided adapter cannot pass by shape alone. H and I keep rows
# 16-byte aligned (torch._grouped_mm, the kernel's PyTorch path, refuses other strides); the odd rank 3 exercises
# the adapters' zero padding to 4.
TINY_MOE = dict(vocab_size=96, hidden_size=28, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=12,
                router_aux_loss_coef=0.5)
TARGETS = ["q_proj", *EXPERT_TARGETS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random HF Qwen3-MoE with router weights scaled to std ~1 (top-k does not hinge on rounding noise)."""
    return save_hf_qwen3_moe(tmp_path_factory.mktemp("moe_lora") / "base", TINY_MOE, seed=5)


def _adapted(checkpoint, targets=TARGETS, rank=3, alpha=6.0):
    """Our model with adapters whose B is no longer zero (stands in for training)."""
    model = load_model(checkpoint, dtype=torch.float32)
    apply_lora(model, LoRASettings(rank=rank, alpha=alpha, target_modules=targets), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.normal_(std=0.1)
    return model


def _close(ours, theirs, tol=1e-5):
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= tol * scale, float((ours - theirs).abs().max() / scale)


def _peft_wrappers(peft_model):
    """layer index → {parameter name: PEFT ParamWrapper}, walking PEFT's nested wrappers."""
    out = {}
    for i, layer in enumerate(peft_model.base_model.model.model.layers):
        wrapper, found = layer.mlp.experts, {}
        while hasattr(wrapper, "parameter_name"):
            found[wrapper.parameter_name] = wrapper
            wrapper = wrapper.base_layer
        out[i] = found
    return out


def test_settings_name_the_expert_weights():
    settings = LoRASettings(target_modules=["q_proj", "experts.down_proj"])
    assert settings.linear_targets == ["q_proj"] and settings.expert_targets == ("experts.down_proj",)
    with pytest.raises(ValueError, match=r"\['experts'\] are not block linears or expert weights"):
        LoRASettings(target_modules=["experts"])
    with pytest.raises(ValueError, match="set train.lora.dropout: 0"):
        LoRASettings(target_modules=["experts.gate_up_proj"], dropout=0.1)


def test_default_targets_leave_experts_alone_and_expert_adapters_start_at_the_base(checkpoint):
    model = load_model(checkpoint, dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, LoRASettings(rank=4), seed=0)
    assert not lora_experts(model)
    model = load_model(checkpoint, dtype=torch.float32)
    apply_lora(model, LoRASettings(rank=4, alpha=4, target_modules=["experts.gate_up_proj"]), seed=0)
    experts = lora_experts(model)
    assert len(experts) == 2 and not lora_modules(model)
    with torch.no_grad():
        _close(model(ids), base, 1e-6)  # B = 0: the grouped-GEMM path alone, equal to the fused expert MLP
    E, r, H, I = 5, 4, 28, 12
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.mlp.experts.{part}.gate_up_proj": shape for i in range(2)
                         for part, shape in (("lora_A", (E, r, H)), ("lora_B", (E, 2 * I, r)))}
    a = experts["layers.0.mlp.experts"].lora_A["gate_up_proj"]
    bound = 1 / H ** 0.5  # PEFT's Kaiming-uniform bound on its [E·r, H] lora_A (fan-in H, not r·H)
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound


@pytest.mark.parametrize("targets", [TARGETS, ["experts.down_proj"]], ids=["attn+experts", "down_only"])
def test_loss_and_adapter_gradients_match_peft(checkpoint, tmp_path, targets):
    """Our adapter saved in PEFT's format and loaded by PEFT: PEFT's per-expert update equals s·B_e A_e from
    ours (PEFT's own get_delta_weight, so the layout is checked independently), and CE + coef·aux and every
    adapter gradient agree within 1e-5 (fp32)."""
    ours = _adapted(checkpoint, targets)
    export_lora(ours, tmp_path, str(checkpoint))
    config = json.loads((tmp_path / "final-adapter/adapter_config.json").read_text())
    assert config["target_parameters"] == [t for t in EXPERT_TARGETS if t in targets]
    assert config["target_modules"] == [t for t in targets if "." not in t]
    hf = Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "final-adapter", is_trainable=True)
    scaling = 2.0
    for i, wrappers in _peft_wrappers(theirs).items():
        module = ours.layers[i].mlp.experts
        assert sorted(wrappers) == sorted(module.lora_A)
        for projection, wrapper in wrappers.items():
            expected = scaling * torch.bmm(module.lora_B[projection], module.lora_A[projection])
            _close(wrapper.get_delta_weight("default"), expected.detach(), 1e-6)

    ids = torch.randint(0, 96, (3, 16))
    logits = ours(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + 0.5 * ours.router_aux_loss()
    loss.backward()
    out = theirs(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert abs(loss.item() - out.loss.item()) <= 1e-5 * abs(out.loss.item())
    _close(logits.detach(), out.logits.detach())

    peft_params = dict(theirs.named_parameters())
    checked = 0
    for i, wrappers in _peft_wrappers(theirs).items():
        module = ours.layers[i].mlp.experts
        for projection, wrapper in wrappers.items():
            a_grad = wrapper.lora_A["default"].weight.grad  # [E·r, in]
            b_grad = wrapper.lora_B["default"].weight.grad  # [out, r·E], column k·E + e
            E = module.lora_A[projection].shape[0]
            _close(module.lora_A[projection].grad, a_grad.reshape(E, -1, a_grad.shape[-1]))
            _close(module.lora_B[projection].grad, b_grad.reshape(b_grad.shape[0], -1, E).permute(2, 0, 1))
            checked += 2
    for name, module in lora_modules(ours).items():
        for part in ("lora_A", "lora_B"):
            key = f"base_model.model.{hf_key(name)}.{part}.default.weight"
            _close(getattr(module, part).weight.grad, peft_params[key].grad)
            checked += 1
    assert checked == sum(p.requires_grad for p in ours.parameters()) > 0


def test_peft_adapter_and_merged_export_give_our_logits(checkpoint, tmp_path):
    ours = _adapted(checkpoint).eval()
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        logits = ours(ids)
    merged = export_lora(ours, tmp_path, str(checkpoint))
    assert not any("lora" in name for name in merged)
    exported = save_model(ours, tmp_path / "final", state_dict=merged)
    hf = Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        _close(logits, peft.PeftModel.from_pretrained(hf, tmp_path / "final-adapter").eval()(ids).logits)
        reloaded = Qwen3MoeForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        _close(logits, reloaded(ids).logits)
    original = Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for name, param in original.named_parameters():
        changed = not torch.equal(param, reloaded.get_parameter(name))
        assert changed == any(t.split(".")[-1] in name for t in TARGETS), name
    # our own loader reads the export back into fused experts with the update folded in
    again = load_model(exported, dtype=torch.float32)
    assert not isinstance(again.layers[0].mlp.experts, LoRAExperts)
    with torch.no_grad():
        _close(again(ids), logits)


def test_expert_adapters_run_under_bf16_autocast(tmp_path):
    """fp32 parameters, bf16 autocast (train.precision=bf16): the grouped GEMMs run in bf16 and the adapters get
    gradients; the logits stay within bf16 rounding of the fp32 ones. (H and I multiples of 8: 16-byte bf16 rows.)"""
    torch.manual_seed(6)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY_MOE, "hidden_size": 32, "moe_intermediate_size": 16})).save_pretrained(
        tmp_path / "base")
    model = _adapted(tmp_path / "base", rank=4)  # 8-byte bf16 rows: padded to 8
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        reference = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    _close(logits.float(), reference, 5e-2)
    logits.float().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".experts.lora_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
