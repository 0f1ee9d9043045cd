"""qforge's Qwen3-MoE against transformers' Qwen3MoeForCausalLM (the oracle) on the same tiny random weights:
logits, loss with the load-balancing term and every gradient, greedy decoding, export back to HF's layout."""
import json

import pytest
import torch
from qwen3_fixtures import TINY_QWEN3
from qwen3_fixtures import save_hf_qwen3_moe as save_moe
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from qforge.engine import load_model
from qforge.engine.checkpoint import save_model
from qforge.engine.config import ConfigError, Qwen3Config
from qforge.engine.data.packing import PackedBatch
from qforge.engine.generate import generate
from qforge.engine.moe import SparseMoeBlock

TINY_MOE = dict(TINY_QWEN3, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                mlp_only_layers=[0], router_aux_loss_coef=0.02)


def save_hf_qwen3_moe(path, seed=0, **overrides):
    return save_moe(path, {**TINY_MOE, **overrides}, seed)


@pytest.fixture(scope="module", params=[False, True], ids=["topk_raw", "norm_topk_prob"])
def pair(request, tmp_path_factory):
    path = save_hf_qwen3_moe(tmp_path_factory.mktemp("moe") / "tiny", seed=1, norm_topk_prob=request.param)
    theirs = Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return path, load_model(path, dtype=torch.float32), theirs


def test_config_and_layer_choice_follow_hf(tmp_path):
    overrides = dict(num_hidden_layers=5, decoder_sparse_step=2, mlp_only_layers=[3])
    path = save_hf_qwen3_moe(tmp_path / "ckpt", **overrides)
    written = json.loads((path / "config.json").read_text())
    ours = load_model(path, dtype=torch.float32)
    theirs = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY_MOE, **overrides}))
    assert ours.config.num_experts == 8 == written.get("num_experts", written.get("num_local_experts"))
    sparse = [isinstance(block.mlp, SparseMoeBlock) for block in ours.layers]
    assert sparse == [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in theirs.model.layers]
    assert sparse == [False, True, False, False, False]  # layer 3 is sparse by the step but listed mlp-only


def test_fp32_logits_match_hf(pair):
    _, ours, theirs = pair
    ids = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_loss_with_aux_term_and_every_gradient_match_hf(pair):
    _, ours, theirs = pair
    ours.zero_grad()
    theirs.zero_grad()
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(2))
    out = theirs(ids, labels=ids, output_router_logits=True)
    out.loss.backward()

    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1).reshape(-1)
    batch = PackedBatch(input_ids=ids.reshape(-1), position_ids=torch.arange(13).repeat(2),
                        cu_seqlens=torch.tensor([0, 13, 26], dtype=torch.int32), max_seqlen=13, labels=labels,
                        loss_weight=(labels != -100).float())
    ce = ours.loss(batch) / batch.loss_weight.sum()
    aux = ours.router_aux_loss()
    loss = ce + ours.config.router_aux_loss_coef * aux
    loss.backward()
    assert ours.config.router_aux_loss_coef == 0.02
    torch.testing.assert_close(aux, out.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)
    hf_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        key = name if name.startswith("lm_head") else f"model.{name}"
        torch.testing.assert_close(param.grad, hf_grads[key].grad, atol=1e-5, rtol=0, msg=name)
    router_grad = ours.layers[1].mlp.gate.weight.grad
    assert router_grad.abs().max() > 1e-4  # the router learns (through the weights and the aux term)


def test_expert_load_metrics_count_hf_router_choices(pair):
    _, ours, theirs = pair
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours(ids)
        logits = theirs(ids, output_router_logits=True).router_logits[0]  # the one sparse layer (layer 1)
    counts = torch.bincount(torch.topk(logits.softmax(-1), 2, dim=-1).indices.reshape(-1), minlength=8).double()
    load = ours.expert_load()
    assert list(load) == [1]
    assert load[1]["tokens_min"] == counts.min() and load[1]["tokens_max"] == counts.max()
    assert abs(load[1]["tokens_cv"].item() - (counts.std(unbiased=False) / counts.mean()).item()) < 1e-6


def test_greedy_generation_matches_hf(pair):
    _, ours, theirs = pair
    prompts = [[5, 17, 300], [11, 2, 9, 401, 77, 8, 123], [42]]
    got = generate(ours, prompts, max_new_tokens=10)
    for prompt, tokens in zip(prompts, got):
        out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist()


def test_export_reloads_in_transformers_with_hf_layout(pair, tmp_path):
    path, ours, theirs = pair
    out = save_model(ours, tmp_path / "export")
    from safetensors import safe_open

    def keys(directory):
        with safe_open(str(directory / "model.safetensors"), framework="pt") as tensors:
            return set(tensors.keys())

    assert keys(out) == keys(path)  # per-expert tensors, as save_pretrained wrote them
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in keys(out)
    reloaded = Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = theirs.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert Qwen3Config.from_json(out / "config.json") == ours.config


def test_bad_moe_config_is_named():
    hf = dict(TINY_MOE, model_type="qwen3_moe", num_experts_per_tok=9)
    with pytest.raises(ConfigError, match="num_experts_per_tok .9. exceeds num_experts .8."):
        Qwen3Config.from_hf(hf, source="ckpt/config.json")
    with pytest.raises(ConfigError, match="ckpt/config.json: mlp_only_layers"):
        Qwen3Config.from_hf(dict(TINY_MOE, model_type="qwen3_moe", mlp_only_layers=[2]), source="ckpt/config.json")


def test_activation_checkpointing_keeps_loss_aux_and_gradients(pair):
    """The aux loss is built from statistics the blocks keep; recomputing the blocks in the backward must not
    change it or its gradient."""
    _, ours, _ = pair
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(5))
    results = []
    for checkpointing in (False, True):
        ours.zero_grad()
        ours.train()
        ours.activation_checkpointing = checkpointing
        loss = ours(ids).logsumexp(-1).mean() + ours.router_aux_loss()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}))
    ours.activation_checkpointing = False
    ours.eval()
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_sharded_checkpoint_with_experts_split_across_files(tmp_path):
    """One layer's experts spread over several shard files load into the fused weights, and a sharded export
    reloads in transformers."""
    torch.manual_seed(0)
    theirs = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY_MOE)).eval()
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    expert_files = {file for key, file in index.items() if ".mlp.experts." in key}
    assert len(expert_files) > 1
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)
    save_model(ours, tmp_path / "export", max_shard_size="40KB")
    assert (tmp_path / "export" / "model.safetensors.index.json").is_file()
    reloaded = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    expected = theirs.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in reloaded.state_dict().items())


def test_omitted_moe_fields_take_transformers_defaults():
    """A qwen3_moe config.json may leave fields out: both readers must build the same model from it."""
    hf = {k: v for k, v in TINY_MOE.items() if k not in ("num_experts", "num_experts_per_tok", "mlp_only_layers")}
    ours = Qwen3Config.from_hf(dict(hf, model_type="qwen3_moe"))
    theirs = Qwen3MoeConfig(**hf)
    for name in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                 "mlp_only_layers", "router_aux_loss_coef"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.num_experts == theirs.num_experts == 128
