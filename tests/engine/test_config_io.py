"""Where a bad config key is blamed: on the YAML file that holds it, or on the command line that gave it."""
import copy
import sys
from pathlib import Path

import pytest

from qforge.engine.config_io import ConfigKeyError, apply_overrides, build, load_config, read_yaml
from qforge.recipes.fft import FFTRecipeConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: /models/base}\ndata: {train: [a.jsonl]}\noutput: {dir: out}\n")
    return path


@pytest.mark.parametrize("override, message", [
    ("train.max_stpes=5", "command line: unknown key 'train.max_stpes'; did you mean 'train.max_steps'?"),
    ("trian.max_steps=5", "command line: unknown key 'trian'; did you mean 'train'?"),
    ("train.grad_accum=0", "command line: 'train.grad_accum' must be int ≥ 1, got 0"),
])
def test_a_bad_key_given_on_the_command_line_is_blamed_on_it(config_file, override, message):
    with pytest.raises(ConfigKeyError) as error:
        load_config(FFTRecipeConfig, config_file, [override])
    assert str(error.value) == message


def test_a_bad_key_in_the_file_is_still_blamed_on_the_file(config_file):
    config_file.write_text(config_file.read_text() + "train: {max_stpes: 5}\n")
    with pytest.raises(ConfigKeyError, match=rf"^{config_file}: unknown key 'train.max_stpes'"):
        load_config(FFTRecipeConfig, config_file, ["train.seed=1"])  # another override changes nothing


def test_the_record_of_overrides_survives_copies_and_stages(config_file):
    """recipes/fft.py deep-copies the overridden dict into each stage before building it."""
    raw = copy.deepcopy(apply_overrides(read_yaml(config_file), ["optim.lrr=1e-5"]))
    with pytest.raises(ConfigKeyError, match=r"^command line: unknown key 'optim.lrr'"):
        build(FFTRecipeConfig, raw, str(config_file))
    sys.path.insert(0, str(REPO / "recipes"))
    from fft import stage_configs

    config_file.write_text(config_file.read_text() + "stages: [{name: one}]\n")
    with pytest.raises(ConfigKeyError, match=r"^command line: unknown key 'optim.lrr'"):
        stage_configs(str(config_file), ["optim.lrr=1e-5"])
