"""The non-SFT objectives on a Qwen3-MoE policy, against transformers' Qwen3MoeForCausalLM in fp64.

The rule (docs/moe.md "Training"): objectives whose loss is a token-weighted sum on sequences (SFT, off- and
on-policy distillation) add coef · aux and log the expert load; DPO and GRPO, whose losses are relative to a
reference or a group, add none (the router still trains through their loss)."""
import contextlib
import json

import pytest
import torch
from qwen3_fixtures import save_chat_checkpoint, save_hf_qwen3_moe
from test_grpo import dapo_loss_by_hand, grpo_step, length_reward
from tiny_run import few_rows, tiny_overrides, tiny_run_files  # noqa: F401 (fixtures)
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from qforge.engine import load_model
from qforge.engine.config_io import load_config
from qforge.engine.data import ChatTemplate
from qforge.engine.train.build import build_vocab
from qforge.engine.train.distill import OffPolicyDistill, OnPolicyDistill
from qforge.engine.train.parallel import Dist
from qforge.recipes.distill import DistillConfig
from qforge.recipes.grpo import main as grpo_main

COEF = 0.05
TINY_MOE = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rope_theta=10000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, router_aux_loss_coef=COEF)
LOAD_KEYS = {"router_aux_loss", "expert_tokens_min", "expert_tokens_max", "expert_load_cv_max", "expert_load_cv_mean"}


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A random HF Qwen3-MoE with the real tokenizer; router weights scaled to std ~1 (top-k far from ties)."""
    return save_hf_qwen3_moe(tmp_path_factory.mktemp("moe") / "ckpt", TINY_MOE, seed=3, tokenizer=True)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_chat_checkpoint(tmp_path_factory.mktemp("teacher") / "dense", seed=5)


def _hf(checkpoint):
    return Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float64, attn_implementation="eager",
                                               experts_implementation="eager").train()


def _hf_forward(model, packed):
    """HF's fp64 log-probs at every packed position (each sequence a padded row of one batch) and its aux loss
    over the batch's real tokens (`output_router_logits`)."""
    bounds = packed.cu_seqlens.tolist()
    width = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    ids = torch.zeros(len(bounds) - 1, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids[row, :b - a], mask[row, :b - a] = packed.input_ids[a:b], 1
    out = model(ids, attention_mask=mask, output_router_logits=True)
    logits = torch.cat([out.logits[row, :b - a] for row, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
    return logits, out.aux_loss


def _assert_grads(ours, theirs, rel=2e-5):
    hf = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        expected = hf[name if name.startswith("lm_head") else f"model.{name}"].grad
        torch.testing.assert_close(param.grad.double(), expected, atol=rel * expected.abs().max().item() + 1e-9,
                                   rtol=0, msg=name)


def _distill_config(files, out, student, teacher, **extra):
    settings = {"model.config": "null", "model.tokenizer": "null", "model.path": str(student),
                "distill.teacher": str(teacher), "distill.top_k": 8, "data.max_tokens": 768, **extra}
    return load_config(DistillConfig, None, tiny_overrides(files, out, **settings))


def test_off_policy_distillation_step_is_kl_plus_coef_aux_of_transformers(few_rows, moe_checkpoint, teacher,
                                                                         tmp_path):
    """One micro-batch of two sequences: the logged loss is the forward-KL/CE mix over the kept vocabulary by hand
    from HF's fp64 log-probs, the gradient that of it + coef · HF's aux, and the step logs the expert load."""
    config = _distill_config(few_rows, tmp_path / "out", moe_checkpoint, teacher, **{"distill.ce_weight": 0.25})
    template = ChatTemplate.from_pretrained(teacher)
    objective = OffPolicyDistill(str(teacher), top_k=8, ce_weight=0.25)
    datasets, _, _ = objective.load_data(config, template, Dist())
    student = load_model(moe_checkpoint, dtype=torch.float32)
    vocab = build_vocab(config.vocab, datasets, template, student.config.vocab_size)
    objective.prepare(student, config, vocab, Dist(), contextlib.nullcontext)
    batch = objective.pack(datasets[0][:2], 768, seed=0)[0]
    assert len(batch.cu_seqlens) == 3
    step = objective.train_step(student, [batch], Dist(), vocab, contextlib.nullcontext)

    hf = _hf(moe_checkpoint)
    logits, aux = _hf_forward(hf, batch.packed)
    vocab_index = vocab.loss_tables(torch.device("cpu"))[0]
    rows = (batch.labels != -100).nonzero().squeeze(1)
    logp = logits[rows][:, vocab_index].log_softmax(-1)
    position = {int(v): i for i, v in enumerate(vocab_index)}
    total = 0.0
    for r, t in enumerate(rows.tolist()):
        kept = [(position[int(i)], float(lp)) for i, lp in zip(batch.target_ids[t], batch.target_logprobs[t])
                if int(i) in position]
        logq = torch.tensor([lp for _, lp in kept], dtype=torch.float64)
        logq = logq - logq.logsumexp(0)
        kl = (logq.exp() * (logq - logp[r, [j for j, _ in kept]])).sum()
        total = total + 0.75 * kl - 0.25 * logp[r, position[int(batch.labels[t])]]
    expected = total / len(rows)
    (expected + COEF * aux).backward()
    assert step.weight == len(rows)
    assert step.loss_sum / step.weight == pytest.approx(expected.item(), abs=1e-5)
    assert step.metrics["router_aux_loss"] == pytest.approx(float(aux), abs=1e-6)
    assert LOAD_KEYS <= set(step.metrics) and step.metrics["expert_tokens_max"] > 0
    _assert_grads(student, hf)


def test_on_policy_distillation_step_is_reverse_kl_plus_coef_aux_of_transformers(few_rows, moe_checkpoint, teacher,
                                                                                tmp_path):
    """The student samples (inside the step); the loss is Σ p_s (log p_s − log p_t) over the kept vocabulary on
    its completion tokens, by hand from HF's fp64 log-probs of student and teacher; gradient with coef · aux."""
    config = _distill_config(few_rows, tmp_path / "out", moe_checkpoint, teacher, **{"distill.mode": "on_policy"})
    template = ChatTemplate.from_pretrained(teacher)
    objective = OnPolicyDistill(str(teacher), max_new_tokens=8, temperature=1.0)
    datasets, _, _ = objective.load_data(config, template, Dist())
    student = load_model(moe_checkpoint, dtype=torch.float32)
    vocab = build_vocab(config.vocab, datasets, template, student.config.vocab_size)
    objective.prepare(student, config, vocab, Dist(), contextlib.nullcontext)
    prompts = objective.pack(datasets[0][:2], 4096, seed=0)[0]
    sampled = []
    sample = objective.sample
    objective.sample = lambda *a, **k: sampled.append(sample(*a, **k)) or sampled[-1]
    step = objective.train_step(student, [prompts], Dist(), vocab, contextlib.nullcontext)
    (packed,) = sampled
    assert step.trained == [packed]

    hf = _hf(moe_checkpoint)
    logits, aux = _hf_forward(hf, packed)
    vocab_index = vocab.loss_tables(torch.device("cpu"))[0]
    rows = (packed.labels != -100).nonzero().squeeze(1)
    assert torch.isin(packed.labels[rows], vocab_index).all()  # sampled over the kept vocabulary
    log_ps = logits[rows][:, vocab_index].log_softmax(-1)
    with torch.no_grad():
        teacher_model = load_model(teacher, dtype=torch.float64)
        log_pt = torch.cat([teacher_model(packed.input_ids[a:b])[:, vocab_index].log_softmax(-1) for a, b in zip(
            packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist())])[rows]
    expected = (log_ps.exp() * (log_ps - log_pt)).sum() / len(rows)
    (expected + COEF * aux).backward()
    assert step.loss_sum / step.weight == pytest.approx(expected.item(), abs=1e-5)
    assert step.metrics["router_aux_loss"] == pytest.approx(float(aux), abs=1e-6)
    assert LOAD_KEYS <= set(step.metrics)
    _assert_grads(student, hf)


def test_grpo_step_is_the_dapo_loss_of_transformers_logprobs_and_adds_no_aux(few_rows, moe_checkpoint, tmp_path):
    """test_grpo.py's oracle on a MoE policy: the step's loss and every gradient (the router's included) equal
    the DAPO loss by hand over HF's fp64 log-probs of the step's own samples, without any aux term."""
    objective, model, _, vocab, step, prompts, completions = grpo_step(few_rows, tmp_path, length_reward,
                                                                       checkpoint=moe_checkpoint)
    hf = _hf(moe_checkpoint)
    loss, value, _ = dapo_loss_by_hand(hf, objective, vocab, prompts, completions)
    loss.backward()
    assert step.loss_sum / step.weight == pytest.approx(value, abs=1e-6)
    _assert_grads(model, hf)
    assert hf.model.layers[0].mlp.gate.weight.grad.abs().max() > 0  # the router trains through the loss
    assert not LOAD_KEYS & set(step.metrics)


def test_grpo_recipe_on_moe_exports_a_checkpoint_transformers_reloads(few_rows, moe_checkpoint, tmp_path):
    (tmp_path / "empty.yaml").write_text("{}")
    out = tmp_path / "out"
    settings = {"model.config": "null", "model.tokenizer": "null", "model.path": str(moe_checkpoint),
                "grpo.rewards": "[test_grpo:length_reward]", "grpo.num_generations": 2, "grpo.max_new_tokens": 6,
                "data.max_tokens": 400, "train.max_steps": 2}
    assert grpo_main(["--config", str(tmp_path / "empty.yaml")] + tiny_overrides(few_rows, out, **settings)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(records) == 2 and not LOAD_KEYS & set(records[0])  # GRPO: no aux, no load (module docstring)
    ours = load_model(out / "final", dtype=torch.float32)
    theirs = Qwen3MoeForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    start = load_model(moe_checkpoint, dtype=torch.float32)
    assert not torch.equal(ours.layers[0].mlp.experts.down_proj, start.layers[0].mlp.experts.down_proj)
    ids = torch.randint(0, 151_000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_mfu_flops_count_the_routed_experts_and_no_frozen_weight_gradient(tmp_path):
    """torch's FlopCounterMode counts the weight matmuls of a real fp64 step (the grouped GEMMs run as per-expert mm in
    fp64); each difference between two set-ups isolates one term of `training_flops` and equals its closed form:
    top_k 4 vs 2 adds 6·2·3·H·I per token and sparse layer (routed experts, not all E); a frozen router saves its
    weight gradient 2·H·E; frozen experts save theirs 2·k·3·H·I (the kernels skip it); LoRA on the experts adds
    6·(k/E)·(expert adapter params) per token."""
    import sys
    from pathlib import Path

    from torch.utils.flop_counter import FlopCounterMode

    from qforge.engine.data import pack
    from qforge.engine.lora import LoRASettings, apply_lora
    from qforge.engine.train.build import LoRAWeights
    from qforge.engine.train.metrics import training_flops
    sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
    from test_packed_loss import random_examples

    shape = dict(TINY_MOE, vocab_size=512, moe_intermediate_size=24)
    for k in (2, 4):
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**shape, "num_experts_per_tok": k})).save_pretrained(tmp_path / f"k{k}")
    batch = pack(random_examples(6, seed=2), max_tokens=400, seed=0)[0]
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    H, E, I, tokens, sparse = 32, 8, 24, batch.num_tokens, 2

    def step(k=2, frozen=(), lora=None):
        """(counted FLOPs of one forward + backward, training_flops' figure) of the model set up so."""
        model = load_model(tmp_path / f"k{k}", dtype=torch.float64)
        options = {"train_router": "gate" not in frozen}
        for block in model.sparse_blocks().values():
            block.gate.weight.requires_grad_("gate" not in frozen)
            for weight in (block.experts.gate_up_proj, block.experts.down_proj):
                weight.requires_grad_("experts" not in frozen)
        if lora is not None:
            settings = LoRASettings(rank=4, target_modules=lora)
            apply_lora(model, settings, seed=0)
            options = LoRAWeights(settings, None).flops_options(model)
        with FlopCounterMode(display=False) as counter:
            model.loss(batch).backward()
        matmuls = counter.get_flop_counts()["Global"][torch.ops.aten.mm]  # (bmm: the un-permute's weighted sum)
        return matmuls, training_flops(model.config, lengths, batch.num_loss_tokens, 512, **options)

    full, top4 = step(), step(k=4)
    assert top4[0] - full[0] == top4[1] - full[1] == 6 * 2 * 3 * H * I * tokens * sparse
    router = step(frozen=("gate",))
    assert full[0] - router[0] == full[1] - router[1] == 2 * H * E * tokens * sparse
    assert full[0] - step(frozen=("experts",))[0] == 2 * 2 * 3 * H * I * tokens * sparse
    attention, experts = step(lora=["q_proj"]), step(lora=["q_proj", "experts.gate_up_proj", "experts.down_proj"])
    adapters = sparse * E * 4 * (H + 2 * I + I + H)  # lora_A [E, r, in] + lora_B [E, out, r] of both projections
    assert experts[0] - attention[0] == experts[1] - attention[1] == 6 * adapters * 2 // E * tokens


def test_distill_recipe_on_moe_logs_the_router_metrics_with_global_batch_scope(few_rows, moe_checkpoint, teacher,
                                                                              tmp_path):
    """metrics.jsonl of an off-policy run on a MoE student carries the aux and the expert load every step; the
    `global_batch` pre-pass routes the distillation batches with the CE forward (two micro-batches a step)."""
    from qforge.recipes.distill import main as distill_main

    (tmp_path / "empty.yaml").write_text("{}")
    out = tmp_path / "out"
    settings = {"model.config": "null", "model.tokenizer": "null", "model.path": str(moe_checkpoint),
                "distill.teacher": str(teacher), "distill.top_k": 8, "data.max_tokens": 160, "train.grad_accum": 2,
                "model.router_aux_loss_scope": "global_batch", "train.max_steps": 2}
    assert distill_main(["--config", str(tmp_path / "empty.yaml")] + tiny_overrides(few_rows, out, **settings)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(records) == 2 and all(LOAD_KEYS <= set(r) and r["router_aux_loss"] > 0 for r in records)
    # aux = E·Σ f_e·P_e: k = 2 when balanced, at most E·k
    assert all(1 < r["router_aux_loss"] < 16 and r["expert_tokens_max"] >= r["expert_tokens_min"] for r in records)
