"""`qforge grpo`: every config key reaches the objective, and bad input is a one-line error with its exit code
(no prompts / a bad row, fewer than 2 generations, an unknown reward with its close match, a judge endpoint that
stays down) before or instead of a run."""
import json
from pathlib import Path

import pytest

from qforge.engine.config_io import load_config
from qforge.recipes.grpo import GRPOConfig, main, objective_for
from qforge.recipes.main import main as qforge_main

REPO = Path(__file__).resolve().parents[2]
TINY = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=1024, tie_word_embeddings=True,
            torch_dtype="float32")


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    rows = (REPO / "recipes/data/vi_arith_train.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tmp_path


def _run(tiny, *overrides) -> int:
    return main(["--config", str(REPO / "recipes/configs/grpo.yaml"), f"model.path=null",
                 f"model.config={tiny / 'config.json'}", "model.tokenizer=qwen3", f"data.train=[{tiny / 'train.jsonl'}]",
                 "data.eval=[]", "data.max_tokens=400", "evaluate.data=null", "grpo.num_generations=2",
                 "grpo.max_new_tokens=4", "train.max_steps=1", f"output.dir={tiny / 'out'}", "output.progress=false",
                 "output.tensorboard=false", *overrides])


def test_the_shipped_config_sets_every_key_of_the_objective():
    config = load_config(GRPOConfig, str(REPO / "recipes/configs/grpo.yaml"),
                         ["grpo.loss_type=dr_grpo", "grpo.beta=0.04", "grpo.num_iterations=2", "grpo.top_p=0.9",
                          "grpo.scale_rewards=none", "grpo.rewards=[numeric,format]", "grpo.reward_weights=[1.0,0.5]",
                          "grpo.mask_truncated_completions=true", "grpo.soft_punish_cache=16",
                          "grpo.soft_punish_weight=0.5"])
    objective = objective_for(config)
    assert (objective.group, objective.num_iterations, objective.max_new_tokens) == (16, 2, 80)
    assert (objective.temperature, objective.top_p, objective.scale_rewards) == (0.7, 0.9, "none")
    loss = objective.settings
    assert (loss.loss_type, loss.beta, loss.epsilon, loss.clip_high, loss.max_completion_length) == (
        "dr_grpo", 0.04, 0.2, 0.28, 80)
    assert objective.rewards.names == ["numeric", "format"] and objective.rewards.weights.tolist() == [1.0, 0.5]
    assert objective.mask_truncated and objective.soft_punish_cache == 16
    assert objective.names == ["numeric", "format", "soft_overlong_punishment"]
    assert objective.weights.tolist() == [1.0, 0.5, 0.5]


def test_qforge_lists_the_subcommand_and_its_config(capsys):
    with pytest.raises(SystemExit) as done:
        qforge_main(["grpo", "--help"])
    assert done.value.code == 0 and "usage: qforge grpo" in capsys.readouterr().out
    assert qforge_main(["configs"]) == 0
    assert any(line.startswith("grpo ") for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("override, code, message", [
    ("grpo.num_generations=1", 2, "'grpo.num_generations' must be int ≥ 2, got 1"),
    ("grpo.soft_punish_cache=9", 2, "grpo.soft_punish_cache=9 is more than grpo.max_new_tokens=4"),
    ("grpo.rewards=[numerik]", 2, "unknown reward 'numerik': did you mean 'numeric'?"),
    ("grpo.rewards=[judge]", 2, "reward 'judge' needs grpo.judge.endpoint.base_url"),
])
def test_bad_settings_are_one_line_errors_before_the_run(tiny, capsys, override, code, message):
    assert _run(tiny, override) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tiny / "out").exists()


@pytest.mark.parametrize("content, message", [
    ("", "train.jsonl: no rows (the file is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "system", "content": "x"}]}\n',
     "train.jsonl:2: messages: the prompt must end with a user (or tool) turn"),
])
def test_no_prompts_or_a_bad_row_is_a_data_error_naming_the_line(tiny, capsys, content, message):
    (tiny / "train.jsonl").write_text(content, encoding="utf-8")
    assert _run(tiny) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_a_judge_endpoint_that_stays_down_stops_the_run_with_exit_6(tiny, capsys):
    assert _run(tiny, "grpo.rewards=[judge]", "grpo.judge.endpoint.base_url=http://127.0.0.1:9/v1",
                "grpo.judge.endpoint.model=judge", "client.max_retries=1", "client.timeout=2") == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: reward judge:") and "resume the run" in err[-1]
