"""train.epochs (steps derived from the data and the step size) and train.batch_size (sequences per step)."""
import json
import math

import numpy as np
import pytest
import torch
from tiny_run import tiny_overrides, tiny_run_files  # noqa: F401 (fixture)

from qforge.engine.config_io import ConfigKeyError, load_config
from qforge.engine.data import ChatTemplate
from qforge.engine.data.cache import load_examples
from qforge.engine.data.packing import PackedBatch
from qforge.engine.train import FFTConfig, train, train_step
from qforge.engine.train.build import build_model, resolve_tokenizer_dir
from qforge.engine.data.example import zero_weight
from qforge.engine.train.loader import SequenceStepLoader, StepLoader, planned_steps
from qforge.engine.train.parallel import Dist


@pytest.fixture(scope="module")
def examples(tiny_run_files):
    config = load_config(FFTConfig, None, tiny_overrides(tiny_run_files, "unused"))
    template = ChatTemplate.from_pretrained(resolve_tokenizer_dir(config.model))
    loaded, _ = load_examples([tiny_run_files["train"]], template, cache_dir=tiny_run_files["cache"], progress=False)
    return loaded


def _config(tiny_run_files, **extra):
    return load_config(FFTConfig, None, tiny_overrides(tiny_run_files, "unused", **extra))


def _settings(tiny_run_files, **extra):
    return _config(tiny_run_files, **extra).train


def test_epochs_give_steps_from_the_data_and_max_steps_wins(tiny_run_files, examples):
    data = _config(tiny_run_files).data
    loader = StepLoader([examples], data, seed=0, grad_accum=2)
    batches = len(loader._epoch_batches())
    settings = _settings(tiny_run_files, **{"train.max_steps": "null", "train.epochs": 2.5})
    assert planned_steps(settings, loader) == math.ceil(2.5 * batches / 2)
    assert planned_steps(_settings(tiny_run_files, **{"train.epochs": 2.5, "train.max_steps": 3}), loader) == 3
    assert planned_steps(_settings(tiny_run_files, **{"train.max_steps": "null"}), loader) == math.ceil(batches / 2)
    by_sequences = SequenceStepLoader([examples], data, seed=0, batch_size=10)
    assert by_sequences.steps_per_epoch == 5  # 48 rows: four steps of 10 and one of 8
    assert planned_steps(_settings(tiny_run_files, **{"train.max_steps": "null", "train.epochs": 2}),
                         by_sequences) == 10


@pytest.mark.parametrize("override, message", [
    ({"train.epochs": 0}, "train.epochs"),
    ({"train.batch_size": 8, "train.grad_accum": 2}, "needs train.grad_accum=1"),
])
def test_step_settings_are_validated(tiny_run_files, override, message):
    with pytest.raises(ConfigKeyError, match=message):
        _settings(tiny_run_files, **override)


def test_sequence_steps_cover_each_epoch_once_split_over_ranks_and_resume_exactly(tiny_run_files, examples):
    data = _config(tiny_run_files, **{"data.max_tokens": 300}).data

    def loaders():
        return [SequenceStepLoader([examples], data, seed=1, batch_size=7, rank=r, world=3) for r in range(3)]

    ranks = loaders()
    seen = []
    for _ in range(ranks[0].steps_per_epoch):
        per_rank = [loader.next_step() for loader in ranks]
        assert len({len(batches) for batches in per_rank}) == 1  # every rank runs as many forwards
        sequences = [ids for batches in per_rank for b in batches if float(b.loss_weight.sum()) > 0
                     for ids in torch.tensor_split(b.input_ids, b.cu_seqlens[1:-1].long())]
        assert len(sequences) <= 7
        seen += [tuple(s.tolist()) for s in sequences]
    assert sorted(seen) == sorted(tuple(e.input_ids[:300].tolist()) for e in examples)  # one epoch = every row once
    assert ranks[0].epoch_progress == 1.0
    state = ranks[1].state_dict()
    expected = [ranks[1].next_step() for _ in range(3)]
    resumed = loaders()[1]
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_step()
        assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_weight, b.loss_weight)
                   for a, b in zip(want, got))


def test_zero_weight_filler_leaves_the_update_unchanged(tiny_run_files, examples):
    config = load_config(FFTConfig, None, tiny_overrides(tiny_run_files, "unused"))
    batches = [PackedBatch.from_examples(examples[:4])]
    grads = []
    for extra in ([], [PackedBatch.from_examples([zero_weight(examples[5], 512)])]):
        torch.manual_seed(0)
        model = build_model(config.model, torch.float32, torch.device("cpu"))
        train_step(model, batches + extra, Dist())
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_training_by_epochs_and_batch_size_logs_the_epoch(tiny_run_files, tmp_path):
    config = load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path, **{
        "train.max_steps": "null", "train.epochs": 2, "train.batch_size": 16}))
    result = train(config)
    assert result.steps_done == 6  # 48 rows / 16 per step × 2 epochs
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert np.allclose(epochs, [1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])


def test_resuming_with_another_batch_size_restarts_the_data_and_says_so(tiny_run_files, tmp_path, caplog):
    steps = {"train.max_steps": 2, "train.save_every": 1, "train.batch_size": 16}
    train(load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path, **steps)))
    with caplog.at_level("WARNING", logger="qforge.train"):  # the cursor counted 16 rows a step: not 8
        train(load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path, **{
            **steps, "train.max_steps": 3, "train.batch_size": 8, "train.resume": "auto"})))
    assert "data changed since" in caplog.text and "train.batch_size" in caplog.text
