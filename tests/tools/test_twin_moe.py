"""The twin on Qwen3-30B-A3B (qwen3_moe): the FSDP2 step over 8 fake ranks at the real layer shapes with fewer
layers, checked against transformers' parameter counts and closed forms for the experts' FLOPs and the
all-gather / reduce-scatter volume; and the activation-checkpointing finding it made (router stats)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from qforge.engine.config import Qwen3Config
from qforge.tools.twin.models import resolve_config
from qforge.tools.twin.run import TwinPlan, run_twin

REPO = Path(__file__).resolve().parents[2]
# Qwen3-30B-A3B's config.json (the hub's), the fields qforge reads
HUB_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                   num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                   num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, rope_theta=1000000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=40960,
                   torch_dtype="bfloat16")
TOKENS, GPUS = 4096, 8


def hf_counts(layers: int) -> tuple[int, int]:
    """(all parameters, the root unit's: embedding, head, final norm) of transformers' Qwen3MoeForCausalLM."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    fields = {k: v for k, v in HUB_30B_A3B.items() if k not in ("model_type", "torch_dtype", "rope_theta")}
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**fields, "num_hidden_layers": layers}))
    params = dict(model.named_parameters())
    root = sum(params[k].numel() for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"))
    return sum(p.numel() for p in params.values()), root


def test_built_in_30b_a3b_is_the_hub_config():
    assert resolve_config("qwen3-30b-a3b") == Qwen3Config.from_hf(HUB_30B_A3B)
    assert hf_counts(48)[0] == 30_532_122_624


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """The 30B-A3B step (16 experts' worth of rows per rank, 4k tokens, AC) with 2 and 4 of its 48 layers."""
    runs = {}
    for layers in (2, 4):
        path = tmp_path_factory.mktemp(f"moe{layers}") / "config.json"
        path.write_text(json.dumps(HUB_30B_A3B | {"num_hidden_layers": layers}))
        plan = TwinPlan(model=str(path), gpus=GPUS, tokens=TOKENS, seq_len=2048, activation_checkpointing=True)
        runs[layers] = plan, run_twin(plan)
    return runs


def test_moe_shards_are_transformers_parameter_counts(moe_runs):
    for layers, (plan, result) in moe_runs.items():
        categories = result["memory"]["tracker_categories_at_peak"]
        assert categories["Sharded Param"] == hf_counts(layers)[0] * 4 / GPUS  # fp32, 1/8 each (no padding)


def test_expert_flops_match_the_closed_form(moe_runs):
    """The grouped GEMMs (Triton launches, counted from their arguments): per layer, forward 6·M·H·I (gate/up
    2·M·2I·H, down 2·M·H·I, M = tokens × top-k), recomputed once by activation checkpointing, and a backward of
    twice the forward (input and weight gradients): 24·M·H·I."""
    config = Qwen3Config.from_hf(HUB_30B_A3B)
    M = TOKENS * config.num_experts_per_tok
    for layers, (_, result) in moe_runs.items():
        ops = result["roofline"]["by_op_class"]
        grouped = ops["triton:grouped_gemm_kernel"]["flops"] + ops["triton:grouped_weight_grad_kernel"]["flops"]
        assert grouped == 24 * M * config.hidden_size * config.moe_intermediate_size * layers


def test_fsdp_collective_volume_is_the_whole_model_per_pass(moe_runs):
    """No expert parallelism: every expert is all-gathered in bf16 for the forward and again for the backward
    (the root unit once, it stays gathered), and every gradient reduce-scattered in fp32."""
    for layers, (_, result) in moe_runs.items():
        total, root = hf_counts(layers)
        volume = result["collective_volume"]
        assert volume["all-gather"]["bytes"] == 2 * (root + 2 * (total - root))
        assert volume["reduce-scatter"]["bytes"] == 4 * total


def test_checkpointed_moe_layers_keep_only_their_inputs(moe_runs):
    """With activation checkpointing a layer more adds about its saved input ([T, H] bf16) to the backward's
    peak. Before engine/moe.py skipped router stats in a checkpoint's recompute, each recomputed block kept its
    recomputed stats, and through them the recomputed expert pre-activations ([T·k, 2I] bf16: 6× the input at
    these shapes) until the step ended: 100 GiB instead of 68.8 at 48 layers, 16k tokens."""
    config = Qwen3Config.from_hf(HUB_30B_A3B)
    activations = {layers: result["memory"]["tracker_categories_at_peak"]["Activation"]
                   for layers, (_, result) in moe_runs.items()}
    per_layer = (activations[4] - activations[2]) / 2
    saved_input = TOKENS * config.hidden_size * 2
    assert per_layer <= 2 * saved_input, (per_layer, saved_input)


def test_moe_model_flops_count_the_routed_experts(moe_runs):
    """The traced grouped GEMMs (without the recompute) equal the routed experts' matmuls the MFU's model FLOPs
    count (top-k × 3·H·moe_intermediate_size a token; for 30B-A3B that is also the dense formula over its
    intermediate_size, 6144 = 8 × 768)."""
    config = Qwen3Config.from_hf(HUB_30B_A3B)
    assert config.intermediate_size == config.num_experts_per_tok * config.moe_intermediate_size
    _, result = moe_runs[2]
    dense = dataclasses.replace(config, num_hidden_layers=2)
    mlp = 6 * 2 * 3 * dense.hidden_size * dense.intermediate_size * TOKENS
    ops = result["roofline"]["by_op_class"]
    grouped = ops["triton:grouped_gemm_kernel"]["flops"] + ops["triton:grouped_weight_grad_kernel"]["flops"]
    assert grouped * 18 / 24 == mlp  # forward + backward without the recompute


def test_shipped_30b_a3b_config_is_a_valid_training_config():
    """Its twin run (the peak its comment states) is test_twin.py's slow shipped-config test (it globs
    qwen3-*gpu.yaml)."""
    from qforge.engine.config_io import load_config
    from qforge.recipes.fft import FFTRecipeConfig
    from qforge.tools.twin.__main__ import plan_from_config

    path = REPO / "recipes/configs/qwen3-30b-a3b-8gpu.yaml"
    config = load_config(FFTRecipeConfig, path)
    assert config.optim.state_dtype == "bf16" and config.train.activation_checkpointing
    assert config.data.max_tokens == 16384
    assert plan_from_config(str(path), None, None) == {
        "model": "qwen3-30b-a3b", "gpus": 8, "tokens": 16384, "grad_accum": 2, "precision": "bf16-mixed",
        "activation_checkpointing": True, "optim_state_dtype": "bf16"}
