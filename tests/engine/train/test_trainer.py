"""The FFT loop: split invariance, exact resume, signals, atomic checkpoints, non-finite steps, HF export."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_run import REPO, tiny_overrides, tiny_run_files  # noqa: F401 (fixture)
from transformers import AutoModelForCausalLM

from qforge.engine import load_model
from qforge.engine.config_io import ConfigKeyError, load_config
from qforge.engine.data import PackedBatch, pack
from qforge.engine.data.cache import load_examples
from qforge.engine.data import ChatTemplate
from qforge.engine.train import FFTConfig, NonFiniteLossError, train, train_step
from qforge.engine.train import resume as train_state
from qforge.engine.train.build import build_model, resolve_tokenizer_dir
from qforge.engine.train.optim import build_optimizer
from qforge.engine.train.parallel import Dist
from qforge.engine.vocab import VocabMap


def _config(files, out, **extra) -> FFTConfig:
    return load_config(FFTConfig, None, tiny_overrides(files, out, **extra))


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def _step_once(files, batch_token_budget: int, examples, model_seed=0, loss_weighting="sqrt"):
    """One optimizer step over the same 8 examples packed under a given micro-batch budget."""
    config = _config(files, "unused")
    torch.manual_seed(model_seed)
    model = build_model(config.model, torch.float32, torch.device("cpu"))
    optimizer = build_optimizer(model, config.optim)
    batches = list(pack(examples, batch_token_budget, seed=0, loss_weighting=loss_weighting))
    train_step(model, batches, Dist())
    optimizer.step()
    return model, len(batches)


def test_update_does_not_depend_on_micro_batch_split(tiny_run_files):
    config = _config(tiny_run_files, "unused")
    template = ChatTemplate.from_pretrained(resolve_tokenizer_dir(config.model))
    examples, _ = load_examples([tiny_run_files["train"]], template, cache_dir=tiny_run_files["cache"], progress=False)
    examples = examples[:8]
    longest = max(len(e) for e in examples)
    one, n_one = _step_once(tiny_run_files, 8 * longest, examples)
    eight, n_eight = _step_once(tiny_run_files, longest, examples)
    assert (n_one, n_eight) == (1, 8)
    for (name, a), (_, b) in zip(one.named_parameters(), eight.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_resume_reproduces_uninterrupted_losses_bitwise(tiny_run_files, tmp_path):
    full = train(_config(tiny_run_files, tmp_path / "full", **{"train.max_steps": 8, "train.save_every": 3,
                                                                "train.keep_last": 5}))
    assert sorted(p.name for p in (tmp_path / "full/checkpoints").iterdir()) == ["step-3", "step-6", "step-8"]
    resumed_out = tmp_path / "resumed"
    resumed = train(_config(tiny_run_files, resumed_out, **{"train.max_steps": 8,
                                                             "train.resume": str(tmp_path / "full/checkpoints/step-3")}))
    assert resumed.losses == full.losses[3:]  # exact float equality: fp32 on CPU is deterministic
    final_a = load_model(tmp_path / "full/final", dtype=torch.float32)
    final_b = load_model(resumed_out / "final", dtype=torch.float32)
    for (name, a), (_, b) in zip(final_a.named_parameters(), final_b.named_parameters()):
        assert torch.equal(a, b), name


def test_final_export_loads_in_transformers(tiny_run_files, tmp_path):
    result = train(_config(tiny_run_files, tmp_path, **{"train.max_steps": 2}))
    ours = load_model(result.final_dir, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(result.final_dir, dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
    assert (result.final_dir / "tokenizer.json").is_file()
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes"} <= set(records[0])
    assert any("eval_loss" in r for r in records) is False  # no data.eval configured


def test_crash_during_save_keeps_previous_checkpoint(tiny_run_files, tmp_path, monkeypatch):
    train(_config(tiny_run_files, tmp_path, **{"train.max_steps": 2, "train.save_every": 2}))
    real_save = train_state.dcp.save

    def crash_midway(state, **where):
        real_save(state, **where)  # shard files written, then the process "dies"
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(train_state.dcp, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_run_files, tmp_path, **{"train.max_steps": 4, "train.save_every": 2,
                                                   "train.resume": "auto"}))
    monkeypatch.undo()
    assert train_state.latest_checkpoint(tmp_path).name == "step-2"
    resumed = train(_config(tiny_run_files, tmp_path, **{"train.max_steps": 4, "train.resume": "auto"}))
    assert resumed.steps_done == 4 and len(resumed.losses) == 2


def test_nonfinite_steps_are_skipped_then_stop(tiny_run_files, tmp_path, monkeypatch):
    from qforge.engine.model import Qwen3
    real_loss = Qwen3.loss
    calls = {"n": 0}

    def sometimes_nan(self, batch, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, batch, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 4, 5, 6) else loss

    monkeypatch.setattr(Qwen3, "loss", sometimes_nan)
    with pytest.raises(NonFiniteLossError, match="non-finite for 3 steps in a row"):
        train(_config(tiny_run_files, tmp_path, **{"train.max_steps": 10}))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 3]


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tiny_run_files, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(REPO / "recipes/fft.py"), "--config", str(REPO / "recipes/configs/demo.yaml"),
            *tiny_overrides(tiny_run_files, out, **{"train.max_steps": 10000, "evaluate.data": "null",
                                                     "data.eval": "[]"})]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file()
                                           and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Resume with train.resume=auto" in stderr
    checkpoint = train_state.latest_checkpoint(out)
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["step"] == len(_losses(out)) >= 2


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown key 'train.max_step'; did you mean 'train.max_steps'?"),
    ("optim.lr=fast", "'optim.lr' must be float > 0 (finite), got 'fast'"),
    ("train.precision=fp8", "'train.precision' must be one of ['fp32', 'bf16-mixed', 'bf16'], got 'fp8'"),
    ("data.weights=[1.0, 2.0]", "data.weights has 2 entries for 1 data.train files"),
    # every value's domain (issue #15): key, expected type and allowed range in one line
    ("train.grad_accum=0", "'train.grad_accum' must be int ≥ 1, got 0"),
    ("train.max_steps=-1", "'train.max_steps' must be int ≥ 1 or null, got -1"),
    ("train.max_nonfinite_steps=0", "'train.max_nonfinite_steps' must be int ≥ 1, got 0"),
    ("optim.grad_clip=-1", "'optim.grad_clip' must be float ≥ 0 (finite) or null, got -1"),
    ("optim.min_lr_ratio=-0.1", "'optim.min_lr_ratio' must be float in [0, 1], got -0.1"),
    ("optim.min_lr_ratio=1.5", "'optim.min_lr_ratio' must be float in [0, 1], got 1.5"),
    ("optim.warmup_steps=-2", "'optim.warmup_steps' must be int ≥ 0, got -2"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' must be float ≥ 0 (finite), got -0.1"),
    ("train.save_every=-1", "'train.save_every' must be int ≥ 0, got -1"),
    ("train.keep_last=-1", "'train.keep_last' must be int ≥ 0, got -1"),
    ("optim.lr=0", "'optim.lr' must be float > 0 (finite), got 0"),
    ("optim.lr=.inf", "'optim.lr' must be float > 0 (finite), got inf"),
    ("optim.lr=.nan", "'optim.lr' must be float > 0 (finite), got nan"),
    ("optim.betas=[0.9]", "'optim.betas' must be a pair of float in [0, 1), got too few values"),
    ("optim.betas=[0.9, 1.0]", "'optim.betas[1]' must be float in [0, 1), got 1.0"),
    ("train.device=tpu", "'train.device' must be one of ['auto', 'cpu', 'cuda'], got 'tpu'"),
    ("data.weights=[-1]", "'data.weights[0]' must be float ≥ 0 (finite), got -1"),
    ("data.max_tokens=1", "'data.max_tokens' must be int ≥ 2, got 1"),
])
def test_config_errors_name_the_key(tiny_run_files, tmp_path, override, message):
    with pytest.raises(ConfigKeyError) as error:
        load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path) + [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_scientific_notation_is_a_float_in_files_and_overrides(tiny_run_files, tmp_path):
    """YAML 1.1 reads `1e-5` as a string; every fine-tuning config writes it that way."""
    config_file = tmp_path / "lr.yaml"
    config_file.write_text("optim:\n  lr: 1e-5\n  eps: 1E-8\n")
    overrides = [o for o in tiny_overrides(tiny_run_files, tmp_path) if not o.startswith("optim.lr")]
    config = load_config(FFTConfig, config_file, overrides)
    assert (config.optim.lr, config.optim.eps) == (1e-5, 1e-8)
    override = load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path, **{"optim.lr": "3e-4"}))
    assert override.optim.lr == 3e-4 and isinstance(override.optim.lr, float)


def test_recipe_reports_config_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  config: x.json\n  tokenizer: qwen3\ndata:\n  train: [a.jsonl]\ntrian:\n  max_steps: 3\n")
    proc = subprocess.run([sys.executable, str(REPO / "recipes/fft.py"), "--config", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key 'trian'; did you mean 'train'?" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    debug = subprocess.run([sys.executable, str(REPO / "recipes/fft.py"), "--config", str(bad), "--debug"],
                           capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    bad.write_text("model:\n  config: x.json\n  tokenizer: qwen3\ndata:\n  train: [missing.jsonl]\ntrain:\n  max_steps: 3\n")
    data = subprocess.run([sys.executable, str(REPO / "recipes/fft.py"), "--config", str(bad),
                           f"output.dir={tmp_path / 'out'}", "output.progress=false"], capture_output=True, text=True)
    assert data.returncode == 2, data.stderr[-2000:]  # a file named by the config: docs/errors.md's table
    assert data.stderr.strip().splitlines()[-1] == ("error: data.train: missing.jsonl: no such file or directory; fix "
                                                    "the path in the config or the override")
    assert not (tmp_path / "out").exists()  # checked before output.dir is created


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bf16_precisions_train(tiny_run_files, tmp_path, precision):
    result = train(_config(tiny_run_files, tmp_path, **{"train.precision": precision, "train.max_steps": 6}))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]
    exported = load_model(result.final_dir, dtype=torch.float32)
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert json.loads((result.final_dir / "config.json").read_text())["torch_dtype"] == str(expected)[6:]
    assert exported.config.vocab_size == 151936


def test_activation_checkpointing_gives_the_same_gradients(tiny_run_files):
    config = _config(tiny_run_files, "unused")
    template = ChatTemplate.from_pretrained(resolve_tokenizer_dir(config.model))
    examples, _ = load_examples([tiny_run_files["train"]], template, cache_dir=tiny_run_files["cache"], progress=False)
    batch = pack(examples[:6], 1024, seed=0)[0]
    grads = []
    for checkpointing in (False, True):
        model = build_model(config.model, torch.float32, torch.device("cpu"))
        model.activation_checkpointing = checkpointing
        model.loss(batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_demo_recipe_trains_saves_reloads_and_evaluates(tiny_run_files, tmp_path):
    """The README's main job at test scale: before/after held-out loss and exact match from the reloaded model."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "recipes/fft.py"), "--config",
                           str(REPO / "recipes/configs/demo.yaml"),
                           *tiny_overrides(tiny_run_files, out, **{"train.max_steps": 12, "evaluate.data":
                                                                  tiny_run_files["eval"],
                                                                  "evaluate.max_new_tokens": 12,
                                                                  "data.eval": f"[{tiny_run_files['eval']}]"})],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact-match accuracy" in proc.stdout
    report = json.loads((out / "eval_before_after.json").read_text())
    assert report["before"]["num_questions"] == report["after"]["num_questions"] == 8
    assert report["after"]["held_out_loss"] < report["before"]["held_out_loss"] - 0.5
    assert 0.0 <= report["after"]["exact_match"] <= 1.0


def test_labels_outside_kept_vocabulary_error_or_are_dropped(tiny_run_files, tmp_path):
    template = ChatTemplate.from_pretrained(resolve_tokenizer_dir(_config(tiny_run_files, tmp_path).model))
    examples, _ = load_examples([tiny_run_files["train"]], template, cache_dir=tiny_run_files["cache"], progress=False)
    used = sorted({int(t) for e in examples for t in e.labels if t != -100})
    kept_file = tmp_path / "kept.json"
    kept_file.write_text(json.dumps({"kept_ids": used[:-3]}))  # three label ids left out
    with pytest.raises(ValueError, match=r"label tokens \(3 distinct ids.*vocab.drop_unkept_labels=true"):
        train(_config(tiny_run_files, tmp_path / "strict", **{"vocab.restrict": str(kept_file)}))
    result = train(_config(tiny_run_files, tmp_path / "drop", **{"vocab.restrict": str(kept_file), "train.max_steps": 2,
                                                                  "vocab.drop_unkept_labels": "true"}))
    assert all(math.isfinite(loss) for loss in result.losses)
    # the kept set travels with the model: kept_ids.json, and every other id suppressed when generating
    saved = VocabMap.of_model(result.final_dir)
    assert saved.kept_ids.tolist() == used[:-3] and saved.original_size == 151936
    suppressed = json.loads((result.final_dir / "generation_config.json").read_text())["suppress_tokens"]
    assert len(suppressed) == 151936 - len(used[:-3]) and not set(suppressed) & set(used[:-3])


@pytest.mark.parametrize("weighting", ["token", "sample"])
def test_dropped_labels_leave_the_step_weight_sum(tiny_run_files, tmp_path, weighting):
    """vocab.drop_unkept_labels: the step's Σw and Σw·CE count only the tokens the loss scores (computed here
    independently: full logits, the kept rows selected by hand, torch's cross-entropy)."""
    config = _config(tiny_run_files, "unused")
    template = ChatTemplate.from_pretrained(resolve_tokenizer_dir(config.model))
    examples, _ = load_examples([tiny_run_files["train"]], template, cache_dir=tiny_run_files["cache"], progress=False)
    examples = examples[:6]
    labels = [int(t) for t in examples[0].labels if t != -100]
    dropped = set(labels[:3])  # frequent answer tokens of the first example, left out of the kept set
    used = {int(t) for e in examples for t in e.labels if t != -100}
    kept = sorted(used - dropped)
    vocab = VocabMap.from_ids(kept, 151936)
    model = build_model(config.model, torch.float32, torch.device("cpu"))
    batches = list(pack(examples, 4096, seed=0, loss_weighting=weighting, vocab=vocab))
    loss_sum, weight = train_step(model, batches, Dist(), vocab)

    expected_loss, expected_weight, left_out = 0.0, 0.0, 0
    with torch.no_grad():
        for example in examples:
            one = PackedBatch.from_examples([example])
            logits = model(one.input_ids, one.position_ids, one.cu_seqlens, one.max_seqlen).double()
            targets = [int(t) for t in example.labels[1:]]  # position t predicts token t + 1
            scored = [t for t, label in enumerate(targets) if label != -100 and label not in dropped]
            left_out += sum(label in dropped for label in targets)
            w = {"token": 1.0, "sample": 1.0 / len(scored)}[weighting]
            ce = F.cross_entropy(logits[scored][:, kept], torch.tensor([kept.index(targets[t]) for t in scored]),
                                 reduction="sum")
            expected_loss += w * float(ce)
            expected_weight += w * len(scored)
    assert left_out > 0
    assert weight == pytest.approx(expected_weight, rel=1e-6)
    assert loss_sum == pytest.approx(expected_loss, rel=1e-4)
