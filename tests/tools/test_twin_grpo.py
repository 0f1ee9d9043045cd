"""The twin's GRPO step at tiny shapes: `GRPO.train_step` itself on a packed rollout micro-batch (per-token
log-probs through the fused head, the frozen reference when β > 0), checked against an SFT step of the same
packed shape and closed forms; the rollout's closed-form KV cache against the engine's own `KVCache`."""
import json
import re
from pathlib import Path

import pytest
import torch

from qforge.engine.config import Qwen3Config
from qforge.tools.estimate import parameter_counts
from qforge.tools.twin.__main__ import grpo_fields, main
from qforge.tools.twin.grpo import kv_cache_bytes
from qforge.tools.twin.run import TwinPlan, labelled_tokens, run_twin, sequence_lengths

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6)
SHAPE = dict(gpus=2, group=4, prompt_tokens=16, completion_tokens=48)  # 4 sequences of 64 tokens, 192 scored


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("twin-grpo") / "config.json"
    path.write_text(json.dumps(TINY | {"model_type": "qwen3"}))
    return str(path)


@pytest.fixture(scope="module")
def runs(tiny_config):
    """GRPO with β 0 and 0.1, and SFT on the same packing (sequences of 64, the last 48 positions of each
    labelled: loss_fraction 49/64 labels positions 0..47 after the shift, as many as the completions score)."""
    out = {}
    for beta in (0.0, 0.1):
        plan = TwinPlan(model=tiny_config, objective="grpo", beta=beta, **SHAPE)
        out[beta] = plan, run_twin(plan)
    sft = TwinPlan(model=tiny_config, gpus=2, tokens=256, seq_len=64, loss_fraction=49 / 64)
    out["sft"] = sft, run_twin(sft)
    return out


def test_grpo_micro_batch_is_the_packed_group(runs):
    plan, _ = runs[0.0]
    sft, _ = runs["sft"]
    assert plan.tokens == 256 and sequence_lengths(plan) == [64] * 4 == sequence_lengths(sft)
    assert labelled_tokens(plan) == 4 * 48 == labelled_tokens(sft)


def test_grpo_training_half_costs_an_sft_step_of_its_shape_plus_one_head_matmul(runs):
    """Per-token log-probs through the fused head are the CE kernel with reduction none, whose backward
    recomputes the logits: SFT's attention and block FLOPs over the same packed tokens, and one more logits
    matmul (2·V·H) per scored token than SFT's loss (which takes its gradients in the forward); weights,
    gradients, AdamW are SFT's to the byte; no reference without β."""
    (plan, grpo), (_, sft) = runs[0.0], runs["sft"]
    config = Qwen3Config(**TINY)
    ops = {name: run["roofline"]["by_op_class"] for name, run in (("grpo", grpo), ("sft", sft))}
    assert ops["grpo"]["attention"]["flops"] == ops["sft"]["attention"]["flops"]
    assert ops["grpo"]["matmul"]["flops"] - ops["sft"]["matmul"]["flops"] == \
        2 * config.vocab_size * config.hidden_size * labelled_tokens(plan)
    for key in ("Sharded Param", "Sharded Grad", "OptState"):
        assert grpo["memory"]["tracker_categories_at_peak"][key] == sft["memory"]["tracker_categories_at_peak"][key]
    assert "reference_sharded_bytes" not in grpo["memory"]
    assert not [s for s in grpo["host_syncs"] if s["site"].startswith("engine/") and s["where"] != "between"]


def test_beta_adds_the_bf16_reference_and_its_forward(runs):
    """β > 0: the frozen reference (bf16 shards: 2 B × parameters / GPUs) scores the micro-batch once, a
    forward of 2 × block parameters per token plus its head over the scored tokens (2·V·H each)."""
    (plan, beta), (_, base) = runs[0.1], runs[0.0]
    config = Qwen3Config(**TINY)
    shards = parameter_counts(config)["total"] * 2 / plan.gpus
    assert beta["memory"]["reference_sharded_bytes"] == shards
    assert beta["memory"]["tracker_categories_at_peak"]["Sharded Param"] - \
        base["memory"]["tracker_categories_at_peak"]["Sharded Param"] == shards
    h = config.hidden_size
    per_layer = h * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim + \
        3 * h * config.intermediate_size
    extra = 2 * config.num_hidden_layers * per_layer * plan.tokens + 2 * config.vocab_size * h * labelled_tokens(plan)
    grown = beta["roofline"]["by_op_class"]["matmul"]["flops"] - base["roofline"]["by_op_class"]["matmul"]["flops"]
    assert grown == pytest.approx(extra, rel=1e-9)


def test_rollout_memory_adds_the_kv_cache_to_the_persistent_state(runs):
    plan, result = runs[0.1]
    rollout = result["rollout"]
    categories = result["memory"]["tracker_categories_at_peak"]
    assert rollout["persistent_bytes"] == categories["Sharded Param"] + categories["Buffer"] + categories["OptState"]
    assert rollout["kv_cache"]["capacity"] == 16 + 48 - 1  # sized once; the last token is never cached
    assert rollout["peak_bytes"] > rollout["persistent_bytes"] + rollout["kv_cache"]["final_bytes"]
    assert rollout["fits"]


@pytest.mark.parametrize("prompt, completion", [(5, 11), (8, 8), (3, 30)])
def test_kv_cache_closed_form_is_what_generate_allocates(prompt, completion, monkeypatch):
    """The engine's `generate` on a real tiny model (fp32, unsharded): the KV buffers it holds at the end of
    decoding, every row running to max_new_tokens, are `kv_cache_bytes`' final bytes (prompt + max_new_tokens − 1 slots, allocated
    once)."""
    import importlib

    from qforge.engine.model import Qwen3

    generate_module = importlib.import_module("qforge.engine.generate")  # the package re-exports `generate`

    torch.manual_seed(0)
    config = Qwen3Config(**TINY)
    model = Qwen3(config).eval()
    held = []
    attend = generate_module.KVCache.attend

    def recording(cache, layer_idx, q, k, v):
        out = attend(cache, layer_idx, q, k, v)
        held.append(sum(t.nbytes for store in (cache.keys, cache.values) for t in store.values()))
        return out

    monkeypatch.setattr(generate_module.KVCache, "attend", recording)
    rows = 3
    outputs = generate_module.generate(model, [[1 + i] * prompt for i in range(rows)], max_new_tokens=completion,
                                       temperature=1.0, seed=0)
    assert [len(o) for o in outputs] == [completion] * rows
    assert max(held) == kv_cache_bytes(config, rows, prompt, completion, 4)["final_bytes"]


def test_cli_reads_a_grpo_config(tiny_config, tmp_path, capsys):
    config = tmp_path / "grpo.yaml"
    config.write_text("model: {path: /models/x}\ndata: {max_tokens: 256}\n"
                      "grpo: {num_generations: 4, max_new_tokens: 48, beta: 0.1}\n")
    assert grpo_fields(str(config)) == {"objective": "grpo", "group": 4, "completion_tokens": 48, "prompt_tokens": 16,
                                        "beta": 0.1, "gather_for_sampling": False}
    out = tmp_path / "twin.json"
    assert main(["--config", str(config), "--model", tiny_config, "--gpus", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GRPO: 4 completions of 48 tokens" in printed and "rollout (closed form" in printed
    assert json.loads(out.read_text())["rollout"]["fits"] is True


SHIPPED = Path(__file__).resolve().parents[2] / "recipes/configs/grpo-qwen3-8b-8gpu.yaml"


def test_shipped_grpo_config_is_a_valid_grpo_config():
    from qforge.engine.config_io import load_config
    from qforge.recipes.grpo import GRPOConfig

    config = load_config(GRPOConfig, SHIPPED)
    assert config.grpo.num_generations * (512 + config.grpo.max_new_tokens) == config.data.max_tokens
    assert grpo_fields(str(SHIPPED))["prompt_tokens"] == 512


@pytest.mark.slow
def test_shipped_grpo_config_fits_as_its_memory_comment_says():
    """The twin's training peak and closed-form rollout peak of grpo-qwen3-8b-8gpu.yaml (Qwen3-8B at real
    shapes, ~1.5 min) are the figures its header comment states, both inside the 10% headroom."""
    from qforge.tools.twin.__main__ import plan_from_config

    text = SHIPPED.read_text()
    stated = {name: float(re.search(rf"{name} peak ([\d.]+) GiB", text).group(1)) for name in ("training", "rollout")}
    result = run_twin(TwinPlan(**plan_from_config(str(SHIPPED), None, None), **grpo_fields(str(SHIPPED))))
    assert result["memory"]["fits"] and result["rollout"]["fits"]
    assert result["memory"]["peak_bytes"] / 2**30 == pytest.approx(stated["training"], abs=0.051)
    assert result["rollout"]["peak_bytes"] / 2**30 == pytest.approx(stated["rollout"], abs=0.051)
