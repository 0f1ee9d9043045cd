"""Configs that ship with the repo, multi-stage runs, mixtures and the learning-rate schedule."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from qforge.engine.config_io import load_config
from qforge.engine.data.example import Example
from qforge.recipes.fft import FFTRecipeConfig
from qforge.engine.train.config import OptimSettings
from qforge.engine.train.loader import mixture_epoch
from qforge.engine.train.optim import lr_factor

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "recipes"))
from fft import stage_configs  # noqa: E402


@pytest.mark.parametrize("name", ["demo.yaml", "qwen3-0.6b-1gpu.yaml", "qwen3-8b-8gpu.yaml"])
def test_shipped_fft_configs_parse(name):
    config = load_config(FFTRecipeConfig, REPO / "recipes/configs" / name)
    assert (config.train.max_steps or 0) > 0 or config.train.epochs > 0


def test_stages_chain_weights_and_mixtures(tmp_path):
    path = tmp_path / "two_stage.yaml"
    path.write_text("""
model: {path: /models/base}
data: {train: [a.jsonl]}
output: {dir: out}
stages:
  - name: general
    data: {train: [general.jsonl, vi.jsonl], weights: [0.5, 2.0]}
  - name: vietnamese
    data: {train: [vi.jsonl], weights: null}
    optim: {lr: 5.0e-6}
""")
    first, second = stage_configs(str(path), ["train.max_steps=7"])
    assert first.model.path == "/models/base" and first.output.dir == "out/general"
    assert first.data.weights == [0.5, 2.0] and first.train.max_steps == 7
    assert second.model.path == "out/general/final" and second.output.dir == "out/vietnamese"
    assert second.optim.lr == 5e-6 and second.data.train == ["vi.jsonl"] and second.train.max_steps == 7


def test_mixture_weights_are_epoch_multipliers():
    def examples(tag, n):
        return [Example(np.array([tag, i]), np.array([tag, i])) for i in range(n)]
    a, b = examples(1, 10), examples(2, 4)
    epoch = mixture_epoch([a, b], [0.5, 2.5], seed=3)
    tags = [int(e.input_ids[0]) for e in epoch]
    assert tags.count(1) == 5 and tags.count(2) == 10
    assert len({int(e.input_ids[1]) for e in epoch if e.input_ids[0] == 1}) == 5  # without replacement
    assert mixture_epoch([a, b], [0.5, 2.5], seed=3)[0] is epoch[0]  # deterministic per seed


def test_lr_schedule_closed_form():
    settings = OptimSettings(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 110, settings) == pytest.approx(0.1)
    assert lr_factor(9, 110, settings) == pytest.approx(1.0)
    assert lr_factor(60, 110, settings) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 110, settings) == pytest.approx(0.1)
    linear = OptimSettings(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(25, 100, linear) == pytest.approx(0.75)
    assert lr_factor(5, 100, OptimSettings(schedule="constant")) == 1.0
