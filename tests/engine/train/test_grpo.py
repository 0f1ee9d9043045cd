"""The GRPO objective: one step's loss and every gradient equal the GRPO/DAPO loss written by hand over
transformers' fp64 log-probs of the very completions the step sampled; all-equal rewards give a zero gradient
and no NaN; the recipe resumes exactly (sampling included), with and without the reference and old log-probs."""
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from qwen3_fixtures import save_chat_checkpoint
from tiny_run import few_rows, tiny_overrides, tiny_run_files  # noqa: F401 (fixtures)
from transformers import AutoModelForCausalLM

from qforge.engine import load_model
from qforge.engine.config_io import load_config
from qforge.engine.data import ChatTemplate
from qforge.engine.train import FFTConfig
from qforge.engine.train.build import build_vocab
from qforge.engine.train.grpo import GRPO
from qforge.engine.train.grpo_loss import LossSettings
from qforge.engine.train.parallel import Dist
from qforge.recipes.grpo import main as grpo_main


def length_reward(completion: str, row: dict) -> float:
    """A reward that varies between completions of one prompt (a `module:function` user reward for the recipe)."""
    return (len(completion) % 4) / 3


@dataclass
class _Scores:
    values: torch.Tensor
    errors: dict


class Rewards:
    """The reward callable the engine gets from a recipe (RewardSet's interface), here from a plain function."""

    def __init__(self, function):
        self.function, self.names, self.weights = function, ["r"], torch.tensor([1.0])

    def __call__(self, completions, rows):
        return _Scores(torch.tensor([[float(self.function(c, r))] for c, r in zip(completions, rows)]), {"r": 0})



def grpo_step(few_rows, tmp_path, reward, settings=LossSettings(loss_type="dapo"), temperature=0.7, group=4,
              edit=lambda sampled, eos: sampled, checkpoint=None, **options):
    """(objective, model, checkpoint, vocab, step, the prompts, the completions the step sampled, after `edit`):
    one GRPO step on the first two prompts of `few_rows`, from `checkpoint` (default: a tiny random Qwen3)."""
    config = load_config(FFTConfig, None, tiny_overrides(few_rows, tmp_path / "out"))
    checkpoint = checkpoint or save_chat_checkpoint(tmp_path / "policy", seed=3)
    template = ChatTemplate.from_pretrained(checkpoint)
    objective = GRPO(Rewards(reward), settings, num_generations=group, max_new_tokens=6, temperature=temperature,
                     **options)
    datasets, _, _ = objective.load_data(config, template, Dist())
    model = load_model(checkpoint, dtype=torch.float32)
    vocab = build_vocab(config.vocab, datasets, template, model.config.vocab_size)
    objective.prepare(model, config, vocab, Dist(), contextlib.nullcontext)
    batch = objective.pack(datasets[0][:2], 4096, seed=0)[0]
    sampled = []
    sample = objective.sample
    objective.sample = lambda *a, **k: sampled.append(edit(sample(*a, **k), template.eos_id)) or sampled[-1]
    step = objective.train_step(model, [batch], Dist(), vocab, contextlib.nullcontext)
    prompts = [p.prompt_ids.tolist() for p in batch.prompts for _ in range(group)]
    return objective, model, checkpoint, vocab, step, prompts, sampled[0][0]


def dapo_loss_by_hand(hf, objective, vocab, prompts, completions, group=4, temperature=0.7):
    """(loss over transformers' log-probs, to backward; its value; the rewards [groups, G]): rewards → (r − group
    mean) / (unbiased std + 1e-4) → −Σ A·logp / completion tokens (ratio 1), over the kept vocabulary."""
    kept = vocab.loss_tables(torch.device("cpu"))[0]
    eos = objective.template.eos_id
    texts = [objective.template.tokenizer.decode([t for t in c if t != eos]) for c in completions]
    rewards = torch.tensor([length_reward(t, {}) for t in texts], dtype=torch.float64).view(-1, group)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    assert advantages.abs().sum() > 0  # the rewards differ within a group: a real gradient
    tokens = sum(len(c) for c in completions)
    loss = 0.0
    for prompt, completion, advantage in zip(prompts, completions, advantages):
        logits = hf(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1][:, kept] / temperature
        index = torch.searchsorted(kept, torch.tensor(completion))
        loss = loss - advantage * logits.log_softmax(-1).gather(1, index[:, None]).sum() / tokens
    value = -(advantages * torch.tensor([len(c) for c in completions])).sum() / tokens
    return loss, float(value), rewards


def test_a_step_is_the_dapo_loss_over_transformers_logprobs_of_its_own_samples(few_rows, tmp_path):
    objective, model, checkpoint, vocab, step, prompts, completions = grpo_step(few_rows, tmp_path, length_reward)
    kept = vocab.loss_tables(torch.device("cpu"))[0]
    eos = objective.template.eos_id
    assert all(torch.isin(torch.tensor(c), kept).all() for c in completions)  # sampled over the kept vocabulary
    assert all(len(c) == 6 or c[-1] == eos for c in completions)

    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
    loss, value, rewards = dapo_loss_by_hand(hf, objective, vocab, prompts, completions)
    loss.backward()
    tokens = sum(len(c) for c in completions)
    assert step.loss_sum / step.weight == pytest.approx(value, abs=1e-6)
    hf_params = dict(hf.named_parameters())
    for name, param in model.named_parameters():
        expected = hf_params[f"model.{name}"].grad
        torch.testing.assert_close(param.grad.double(), expected, atol=2e-5 * expected.abs().max().item() + 1e-9,
                                   rtol=0)
    metrics = step.metrics
    assert metrics["completion_length/mean"] == pytest.approx(tokens / len(completions))
    assert metrics["rewards/r/mean"] == pytest.approx(float(rewards.mean()), abs=1e-6)
    assert metrics["clip_ratio/region"] == 0.0 and metrics["rollout_tokens_per_s"] > 0
    assert sum(mb.num_loss_tokens for mb in step.trained) == tokens


def test_overlong_options_act_on_the_sampled_completions(few_rows, tmp_path):
    """soft_punish_cache adds DAPO's length penalty of each sampled completion as a reward (TRL's closed form, its
    token count with <|im_end|>); mask_truncated_completions leaves exactly the truncated completions' tokens out
    of the loss."""
    def stop_some(sampled, eos):  # the tiny random model hardly ever stops: every third completion does, early
        return [[c[:i % 5] + [eos] if i % 3 == 0 else c for i, c in enumerate(batch)] for batch in sampled]

    objective, _, _, _, step, _, completions = grpo_step(few_rows, tmp_path, length_reward, edit=stop_some,
                                                     mask_truncated_completions=True, soft_punish_cache=3)
    eos = objective.template.eos_id
    lengths = [len(c) for c in completions]
    punishment = [0.0 if n <= 3 else (3 - n) / 3 for n in lengths]
    assert step.metrics["rewards/soft_overlong_punishment/mean"] == pytest.approx(sum(punishment) / len(lengths))
    truncated = [c[-1] != eos for c in completions]
    assert 0 < sum(truncated) < len(completions), lengths  # both kinds sampled: the mask is exercised
    assert step.metrics["completion_truncated"] == pytest.approx(sum(truncated) / len(completions))
    assert sum(mb.num_loss_tokens for mb in step.trained) == sum(n for n, t in zip(lengths, truncated) if not t)


@pytest.mark.parametrize("default", [True, False, "auto"])
def test_each_row_sets_its_own_thinking_mode_the_run_setting_is_the_default(tiny_run_files, tmp_path, default):
    """A row's `enable_thinking` decides its prompt's rendering; data.enable_thinking (true, false, auto) is the
    default for rows without one: token for token the tokenizer's own chat template (apply_chat_template)."""
    from transformers import AutoTokenizer

    from qwen3_fixtures import qwen3_tokenizer_dir

    messages = [{"role": "user", "content": "Tính 2 + 3."}]
    answered = messages + [{"role": "assistant", "content": "<think>\n2 cộng 3\n</think>\n\nĐáp án: 5"}]
    rows = [{"messages": messages, "enable_thinking": False}, {"messages": messages, "enable_thinking": True},
            {"messages": messages}, {"messages": answered}, {"messages": answered, "enable_thinking": False}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = load_config(FFTConfig, None, [f"data.train=[{path}]", f"data.enable_thinking={str(default).lower()}",
                                           "model.tokenizer=qwen3", f"model.config={tiny_run_files['model_config']}",
                                           f"output.dir={tmp_path / 'out'}"])
    template = ChatTemplate.from_pretrained(qwen3_tokenizer_dir())
    objective = GRPO(Rewards(length_reward), num_generations=2, max_new_tokens=4)
    prompts = objective.load_data(config, template, Dist())[0][0]
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    # rows without a field: the run's setting ("auto": thinking iff the row's reference answer has reasoning)
    expected_modes = [False, True, default is True, default is not False, False]
    assert [p.row.get("enable_thinking") for p in prompts] == [r.get("enable_thinking") for r in rows]
    for prompt, mode in zip(prompts, expected_modes):
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=mode,
                                                 tokenize=True, return_dict=False)
        assert prompt.prompt_ids.tolist() == list(expected), (mode, prompt.row)
    assert prompts[0].prompt_ids.tolist() != prompts[1].prompt_ids.tolist()  # the two modes do render apart


def test_all_equal_rewards_give_a_zero_gradient_and_no_nan(few_rows, tmp_path):
    _, model, _, _, step, _, _ = grpo_step(few_rows, tmp_path, lambda completion, row: 1.0)
    assert step.loss_sum == 0.0 and step.metrics["zero_advantage_fraction"] == 1.0
    assert step.metrics["reward_std"] == 0.0
    for param in model.parameters():
        assert param.grad is None or (torch.isfinite(param.grad).all() and not param.grad.any())


def _losses(out: Path):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"grpo.beta": 0.04, "grpo.num_iterations": 2, "grpo.loss_type": "grpo"}],
                         ids=["on_policy", "reference_and_two_passes"])
def test_recipe_runs_and_resumes_exactly(few_rows, tmp_path, extra):
    def run(out, **more):
        settings = {"grpo.rewards": "[test_grpo:length_reward]", "grpo.num_generations": 2,
                    "grpo.max_new_tokens": 6, "data.max_tokens": 400, "train.max_steps": 4, "train.save_every": 1,
                    "train.keep_last": 4,
                    **extra, **more}
        (tmp_path / "empty.yaml").write_text("{}")
        return grpo_main(["--config", str(tmp_path / "empty.yaml")] + tiny_overrides(few_rows, out, **settings))

    assert run(tmp_path / "full") == 0
    full = _losses(tmp_path / "full")
    assert len(full) == 4 and any(loss != 0 for loss in full)
    records = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    if extra:  # step 1 samples with the start weights: ratio 1, KL 0; step 2 reuses those samples off-policy
        assert records[0]["kl"] == pytest.approx(0.0, abs=1e-7)
        assert records[1]["rollout_s"] == records[0]["rollout_s"] and records[1]["kl"] > 0
    assert (tmp_path / "full/final/model.safetensors").is_file()
    assert run(tmp_path / "resumed", **{"train.resume": str(tmp_path / "full/checkpoints/step-2")}) == 0
    assert _losses(tmp_path / "resumed") == full[2:]
    # step 1 is between the two passes of one rollout batch: its samples and old log-probs are in the checkpoint
    assert run(tmp_path / "odd", **{"train.resume": str(tmp_path / "full/checkpoints/step-1")}) == 0
    assert _losses(tmp_path / "odd") == full[1:]


def test_micro_batch_seeds_follow_their_prompts_not_only_their_place():
    """Under train.batch_size every step of an epoch packs with the same seed: two steps' first micro-batches
    must not sample from the same random streams, and the same prompts must draw the same seed (resume)."""
    import numpy as np

    from qforge.engine.data.prompts import Prompt

    def prompts(first):
        return [Prompt(np.arange(first, first + 5, dtype=np.int32), np.zeros(5, np.int32), 50) for _ in range(2)]

    objective = GRPO(Rewards(length_reward), num_generations=2)
    step_1, step_2, again = (list(objective.pack(prompts(first), 4096, seed=0)) for first in (10, 20, 10))
    assert len(step_1) == len(step_2) == 1
    assert step_1[0].seed != step_2[0].seed
    assert step_1[0].seed == again[0].seed
