"""Training Qwen3-MoE: the step's loss CE + coef · aux and every gradient against transformers'
Qwen3MoeForCausalLM (output_router_logits=True), the aux over several micro-batches (averaged, or pooled over
the step), router freezing, exact resume, expert-load metrics and the export reloading in transformers."""
import json

import pytest
import torch
from qwen3_fixtures import save_hf_qwen3_moe
from tiny_run import tiny_overrides, tiny_run_files  # noqa: F401 (fixture)
from transformers import Qwen3MoeForCausalLM

from qforge.engine import load_model
from qforge.engine.config_io import load_config
from qforge.engine.errors import CheckpointError
from qforge.engine.data import ChatTemplate, pack
from qforge.engine.data.cache import load_examples
from qforge.engine.train import FFTConfig, train, train_step
from qforge.engine.train.build import resolve_tokenizer_dir, training_weights
from qforge.engine.train.parallel import Dist

TINY_MOE = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rope_theta=10000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, router_aux_loss_coef=0.02)
LOAD_KEYS = {"router_aux_loss", "expert_tokens_min", "expert_tokens_max", "expert_load_cv_max", "expert_load_cv_mean"}


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A random HF Qwen3-MoE (both layers sparse) with the real tokenizer; router weights scaled to std ~1 so
    top-k does not hinge on rounding noise (HF's 0.02 init makes every token's probabilities nearly tie)."""
    return save_hf_qwen3_moe(tmp_path_factory.mktemp("moe") / "ckpt", TINY_MOE, seed=3, tokenizer=True)


def _config(files, checkpoint, out, **extra) -> FFTConfig:
    settings = {"model.config": "null", "model.tokenizer": "null", "model.path": str(checkpoint), **extra}
    return load_config(FFTConfig, None, tiny_overrides(files, out, **settings))


@pytest.fixture(scope="module")
def examples(tiny_run_files, moe_checkpoint):
    config = _config(tiny_run_files, moe_checkpoint, "unused")
    template = ChatTemplate.from_pretrained(resolve_tokenizer_dir(config.model))
    loaded, _ = load_examples([tiny_run_files["train"]], template, cache_dir=tiny_run_files["cache"], progress=False)
    return loaded[:3]


def _ours(files, checkpoint, **extra):
    config = _config(files, checkpoint, "unused", **extra)
    return training_weights(config).build(config.model, 0, torch.float32, torch.device("cpu"))


def _hf(checkpoint, coef=None):
    model = Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    if coef is not None:
        model.router_aux_loss_coef = coef
    return model.train()


def _hf_batch(batches):
    """The micro-batches' sequences as one right-padded HF batch (ids, attention mask, unshifted labels)."""
    seqs = [(b.input_ids[s:e], b.labels[s:e]) for b in batches
            for s, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist())]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for row, (seq, shifted) in enumerate(seqs):
        assert shifted[-1] == -100  # nothing to predict after a sequence's last token
        ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
        labels[row, 1:len(seq)] = shifted[:-1]  # HF shifts its labels itself
    return ids, mask, labels


def _assert_grads_equal(ours, theirs, atol=1e-5):
    hf_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        key = name if name.startswith("lm_head") else f"model.{name}"
        expected = hf_grads[key].grad
        if not param.requires_grad:
            assert param.grad is None, name
            continue
        torch.testing.assert_close(param.grad, expected, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("coef", [None, 0.5, 0.0], ids=["checkpoint_coef", "override", "off"])
def test_first_step_loss_and_gradients_match_hf(tiny_run_files, moe_checkpoint, examples, coef):
    """One micro-batch of one sequence: Σ w·CE / Σ w + coef · aux is HF's loss with output_router_logits=True,
    coef from the checkpoint (0.02) or model.router_aux_loss_coef."""
    extra = {} if coef is None else {"model.router_aux_loss_coef": coef}
    ours = _ours(tiny_run_files, moe_checkpoint, **extra)
    batches = list(pack(examples[:1], 4096, seed=0))
    metrics = {}
    loss_sum, weight = train_step(ours, batches, Dist(), metrics=metrics)
    theirs = _hf(moe_checkpoint, coef)
    ids, mask, labels = _hf_batch(batches)
    out = theirs(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    out.loss.backward()
    used = 0.02 if coef is None else coef
    assert ours.router_balance.coef == used
    assert abs(metrics["router_aux_loss"] - out.aux_loss.item()) < 1e-6
    assert abs(loss_sum / weight + used * metrics["router_aux_loss"] - out.loss.item()) < 1e-5
    _assert_grads_equal(ours, theirs)
    # the expert load: HF's own top-k choices per layer, counted
    counts = torch.stack([torch.bincount(torch.topk(logits.softmax(-1), 2).indices.flatten(), minlength=8)
                          for logits in out.router_logits]).double()
    cv = counts.std(dim=1, unbiased=False) / counts.mean(dim=1)
    assert (metrics["expert_tokens_min"], metrics["expert_tokens_max"]) == (counts.min(), counts.max())
    assert abs(metrics["expert_load_cv_max"] - cv.max().item()) < 1e-9
    assert abs(metrics["expert_load_cv_mean"] - cv.mean().item()) < 1e-9


def test_micro_batch_scope_averages_hf_aux_over_micro_batches(tiny_run_files, moe_checkpoint, examples):
    """Three micro-batches: ∇(Σ w·CE / Σ w + coef · mean_i aux_i), with each aux_i HF's on micro-batch i."""
    ours = _ours(tiny_run_files, moe_checkpoint)
    batches = list(pack(examples, max(len(e) for e in examples), seed=0))
    assert len(batches) == 3
    metrics = {}
    train_step(ours, batches, Dist(), metrics=metrics)
    theirs = _hf(moe_checkpoint)
    total_weight = sum(float((b.labels != -100).sum()) for b in batches)
    aux_values = []
    for batch in batches:
        ids, mask, labels = _hf_batch([batch])
        out = theirs(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        ce = out.loss - 0.02 * out.aux_loss  # HF's mean CE over this micro-batch's labels
        weight = float((labels != -100).sum())
        (ce * weight / total_weight + 0.02 * out.aux_loss / len(batches)).backward()
        aux_values.append(out.aux_loss.item())
    assert abs(metrics["router_aux_loss"] - sum(aux_values) / 3) < 1e-6
    _assert_grads_equal(ours, theirs)


def test_global_batch_scope_equals_hf_on_the_whole_step(tiny_run_files, moe_checkpoint, examples):
    """Three micro-batches with model.router_aux_loss_scope=global_batch: HF's loss on one batch holding all
    three sequences (its aux pools the expert counts of every real token); one micro-batch: HF's on it."""
    ours = _ours(tiny_run_files, moe_checkpoint, **{"model.router_aux_loss_scope": "global_batch"})
    batches = list(pack(examples, max(len(e) for e in examples), seed=0))
    metrics = {}
    loss_sum, weight = train_step(ours, batches, Dist(), metrics=metrics)
    theirs = _hf(moe_checkpoint)
    ids, mask, labels = _hf_batch(batches)
    out = theirs(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    out.loss.backward()
    assert abs(metrics["router_aux_loss"] - out.aux_loss.item()) < 1e-6
    assert abs(loss_sum / weight + 0.02 * metrics["router_aux_loss"] - out.loss.item()) < 1e-5
    _assert_grads_equal(ours, theirs)
    averaged = {}
    train_step(_ours(tiny_run_files, moe_checkpoint), batches, Dist(), metrics=averaged)
    assert abs(averaged["router_aux_loss"] - metrics["router_aux_loss"]) > 1e-4  # the two scopes differ here


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_filler_micro_batches_add_nothing(tiny_run_files, moe_checkpoint, examples, scope):
    """train.batch_size's fillers (no supervised token) leave the aux term, the gradient and the metrics alone."""
    from qforge.engine.train.loader import sequence_filler

    batches = list(pack(examples[:2], max(len(e) for e in examples), seed=0))
    results = []
    for step in (batches, [batches[0], sequence_filler(examples[2], 4096), batches[1]]):
        ours, metrics = _ours(tiny_run_files, moe_checkpoint, **{"model.router_aux_loss_scope": scope}), {}
        train_step(ours, step, Dist(), metrics=metrics)
        results.append((metrics, {name: p.grad for name, p in ours.named_parameters()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-12)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-7, rtol=1e-6, msg=name)


def test_lora_on_moe_experts_trains_the_adapters_only(tiny_run_files, moe_checkpoint, tmp_path):
    """train.lora.target_modules naming the experts' weights: in the merged export exactly the targeted weights moved
    (q_proj and both fused expert projections); router, norms, embeddings and head are bitwise the base's, and PEFT's
    adapter (final-adapter) on transformers' model gives the merged export's logits; a resume from step 2 repeats
    the last two steps' losses exactly."""
    import peft

    lora = {"train.method": "lora", "train.max_steps": 4, "train.lora.rank": 4, "train.save_every": 2,
            "train.lora.target_modules": "[q_proj,experts.gate_up_proj,experts.down_proj]"}
    result = train(_config(tiny_run_files, moe_checkpoint, tmp_path, **lora))
    resumed = train(_config(tiny_run_files, moe_checkpoint, tmp_path / "resumed", **lora, **{
        "train.resume": str(tmp_path / "checkpoints/step-2")}))
    assert resumed.losses == result.losses[2:]
    before, after = load_model(moe_checkpoint, dtype=torch.float32), load_model(result.final_dir, dtype=torch.float32)
    for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters()):
        targeted = name.endswith(("q_proj.weight", "experts.gate_up_proj", "experts.down_proj"))
        assert torch.equal(a, b) != targeted, name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(LOAD_KEYS <= set(r) for r in records if "loss" in r)
    ids = torch.randint(0, 151_000, (1, 20))
    adapted = peft.PeftModel.from_pretrained(_hf(moe_checkpoint), tmp_path / "final-adapter").eval()
    with torch.no_grad():
        merged, theirs = _hf(result.final_dir).eval()(ids).logits, adapted(ids).logits
    assert (merged - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_frozen_router_gets_no_gradient_and_no_update(tiny_run_files, moe_checkpoint, tmp_path):
    config = _config(tiny_run_files, moe_checkpoint, tmp_path, **{"model.train_router": "false",
                                                                  "train.max_steps": 2})
    result = train(config)
    before, after = load_model(moe_checkpoint, dtype=torch.float32), load_model(result.final_dir, dtype=torch.float32)
    for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters()):
        if name.endswith("mlp.gate.weight"):
            assert torch.equal(a, b), name
        elif "experts" in name:
            assert not torch.equal(a, b), name


def test_resume_is_exact_metrics_carry_the_expert_load_and_export_reloads_in_hf(tiny_run_files, moe_checkpoint,
                                                                              tmp_path):
    full = train(_config(tiny_run_files, moe_checkpoint, tmp_path / "full",
                         **{"train.max_steps": 4, "train.save_every": 2, "train.grad_accum": 2}))
    resumed = train(_config(tiny_run_files, moe_checkpoint, tmp_path / "resumed",
                            **{"train.max_steps": 4, "train.grad_accum": 2,
                               "train.resume": str(tmp_path / "full/checkpoints/step-2")}))
    assert resumed.losses == full.losses[2:]  # exact: fp32 on CPU is deterministic
    with pytest.raises(CheckpointError, match="trained with model.router_aux_loss_coef=0.02, this run sets 0.5"):  # the loss may not change silently
        train(_config(tiny_run_files, moe_checkpoint, tmp_path / "changed",
                      **{"train.max_steps": 4, "train.grad_accum": 2, "model.router_aux_loss_coef": 0.5,
                         "train.resume": str(tmp_path / "full/checkpoints/step-2")}))
    a, b = load_model(full.final_dir, dtype=torch.float32), load_model(resumed.final_dir, dtype=torch.float32)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name
    records = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(LOAD_KEYS <= set(r) for r in steps)
    first = steps[0]
    assert 0 <= first["expert_tokens_min"] <= first["expert_tokens_max"]
    assert first["expert_load_cv_mean"] <= first["expert_load_cv_max"]
    theirs = Qwen3MoeForCausalLM.from_pretrained(full.final_dir, dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), theirs(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_two_rank_fsdp2_matches_single_process(tiny_run_files, moe_checkpoint, tmp_path, scope):
    """4 micro-batches a step: 1 process × 4 vs 2 gloo ranks × 2, each rank loading only its own experts
    (load_sharded): the same losses, aux losses, expert load and final weights. The aux's micro-batch count and
    (global_batch) its expert counts are sums over ranks."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from tiny_run import REPO

    common = {"model.config": "null", "model.tokenizer": "null", "model.path": str(moe_checkpoint),
              "model.router_aux_loss_scope": scope, "model.router_aux_loss_coef": 0.1, "train.max_steps": 2,
              "evaluate.data": "null", "data.eval": "[]", "data.max_tokens": 160}
    config = ["--config", str(REPO / "recipes/configs/demo.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    done = subprocess.run([sys.executable, str(REPO / "recipes/fft.py"), *config,
                           *tiny_overrides(tiny_run_files, single, **common, **{"train.grad_accum": 4})],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "recipes/fft.py"), *config,
                           *tiny_overrides(tiny_run_files, sharded, **common, **{"train.grad_accum": 2})],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    def steps(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    expected, got = steps(single), steps(sharded)
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        for key in ("loss", *LOAD_KEYS):
            assert abs(a[key] - b[key]) <= 1e-5 * max(abs(b[key]), 1e-6), (key, a, b)
    single_weights = load_file(single / "final" / "model.safetensors")
    sharded_weights = load_file(sharded / "final" / "model.safetensors")
    assert single_weights.keys() == sharded_weights.keys()
    # summation order differs (rank sums); Adam's m/√v turns a rounding-level gradient difference into up to
    # ~1e-6 of an update that moves the weights by ~4.5e-3 over the run (lr 3e-3)
    for key in single_weights:
        torch.testing.assert_close(sharded_weights[key], single_weights[key], atol=3e-6, rtol=0, msg=key)


def test_dpo_adds_no_aux_term(moe_checkpoint, tmp_path):
    """DPO on a MoE policy (docs/moe.md): its gradient is the DPO loss's alone, whatever the aux coefficient."""
    import contextlib

    from qforge.engine.data.preference import pack_pairs
    from qforge.engine.train.dpo import DPO
    from qforge.recipes.dpo import DPOConfig

    rows = [{"messages": [{"role": "user", "content": f"{a} + {a} = ?"}], "chosen": f"Đáp án: {2 * a}",
             "rejected": f"Đáp án: {2 * a + 1}, chắc vậy"} for a in range(4)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    grads = []
    for coef in (0.0, 10.0):
        config = load_config(DPOConfig, None, [f"model.path={moe_checkpoint}", f"data.train=[{path}]",
                                               "train.precision=fp32", f"output.dir={tmp_path / str(coef)}",
                                               f"model.router_aux_loss_coef={coef}", "train.max_steps=1"])
        objective = DPO(0.3, 0.5, "cached")
        pairs = objective.load_data(config, ChatTemplate.from_pretrained(moe_checkpoint), Dist())[0][0]
        model = training_weights(config).build(config.model, 0, torch.float32, torch.device("cpu"))
        assert model.router_balance.coef == coef
        objective.prepare(model, config, None, Dist(), contextlib.nullcontext)
        step = objective.train_step(model, pack_pairs(pairs, 4096, seed=0), Dist(), None, contextlib.nullcontext)
        assert "router_aux_loss" not in step.metrics
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0]["layers.0.mlp.gate.weight"].abs().max() > 0  # the router trains through the DPO loss
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad), name


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bf16_precisions_train(tiny_run_files, moe_checkpoint, tmp_path, precision):
    result = train(_config(tiny_run_files, moe_checkpoint, tmp_path, **{"train.precision": precision,
                                                                        "train.max_steps": 1,
                                                                        "model.router_aux_loss_scope": "global_batch"}))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(records) == 1 and all(LOAD_KEYS <= set(r) for r in records)
    # aux = E·Σ f_e·P_e with Σ f_e = k, Σ P_e = 1: k when balanced, at most E·k (all on the chosen experts)
    assert all(0 < r["loss"] < 20 and 1 < r["router_aux_loss"] < 8 * 2 for r in records)
    assert Qwen3MoeForCausalLM.from_pretrained(result.final_dir).config.num_experts == 8
