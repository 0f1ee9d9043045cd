"""The GRPO recipe on 2 gloo ranks (torchrun, CPU, FSDP2) trains like one process: train.batch_size=3 prompts a
step, one prompt per micro-batch, so rank 1 gets one real micro-batch and a filler; and the token-budget
layout, 2 ranks × 1 micro-batch = 1 process × 2. scale_rewards=batch divides by the whole step's reward std
(both ranks'), so the advantages, losses and gradients match only if that statistic is global."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import REPO, tiny_overrides, tiny_run_files  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
COMPARED = ("loss", "grad_norm", "reward", "reward_std", "rewards/test_grpo_distributed:r/mean",
            "rewards/test_grpo_distributed:r/std", "completion_length/mean",
            "completion_truncated", "zero_advantage_fraction", "clip_ratio/region", "kl")
# not compared: rollout_s, train_s, tokens/s (timings) and completion_length/max (rank 0's own, by design)


def r(completion: str, row: dict) -> float:
    """A reward that differs between completions and between prompts (so the batch std differs from a rank's)."""
    return (len(completion) % 5) / 4 + (len(row["messages"][0]["content"]) % 3)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("layout", ["batch_size", "grad_accum"])
def test_two_ranks_train_like_one_process(tiny_run_files, tmp_path, layout):
    rows = Path(tiny_run_files["train"]).read_text(encoding="utf-8").splitlines(True)
    (tmp_path / "train.jsonl").write_text("".join(rows[:6]), encoding="utf-8")
    (tmp_path / "empty.yaml").write_text("{}")
    files = {**tiny_run_files, "train": str(tmp_path / "train.jsonl")}

    def args(out, world):
        # data.max_tokens=130 holds one prompt's 2 × (prompt + 6 + 1) tokens (76..122), never two
        layout_settings = ({"train.batch_size": 3} if layout == "batch_size" else {"train.grad_accum": 2 // world})
        return ["--config", str(tmp_path / "empty.yaml"), *tiny_overrides(files, out, **{
            "grpo.rewards": "[test_grpo_distributed:r]", "grpo.num_generations": 2, "grpo.max_new_tokens": 6,
            "grpo.scale_rewards": "batch", "grpo.beta": 0.04, "grpo.num_iterations": 2, "grpo.temperature": 1.2,
            "data.max_tokens": 130, "train.max_steps": 2, **layout_settings})]

    # no empty entry: it would put the working directory (the checkout) on sys.path, hiding HF's `kernels`
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    script = str(REPO / "recipes/grpo.py")
    single = subprocess.run([sys.executable, script, *args(tmp_path / "single", 1)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, *args(tmp_path / "fsdp", 2)], capture_output=True, text=True, env=env,
                          timeout=300)  # a deadlock (unequal forwards over the ranks) fails here
    assert done.returncode == 0, done.stderr[-4000:]
    expected, got = _metrics(tmp_path / "single"), _metrics(tmp_path / "fsdp")
    assert len(expected) == len(got) == 2
    assert expected[0]["reward_std"] > 0 and expected[0]["grad_norm"] > 0 and expected[1]["kl"] > 0
    for step, want in zip(got, expected):  # fp32; only the cross-rank reduction order differs
        for key in COMPARED:
            assert step[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (key, step, want)
    assert (tmp_path / "fsdp/final/model.safetensors").is_file()
