"""Distillation on 2 gloo ranks (torchrun, CPU) against one process on the same inputs: the sharded teacher holds
half the weights per rank and gives the single-process step's loss and gradients, FSDP generation with ranks that
stop at different lengths finishes and samples what one process samples, and off-policy scoring split over the
ranks stores the same top-k as one process; the whole on-policy recipe on 2 ranks trains like one process.

One torchrun launch runs every case (distill_distributed_worker.py); the references run the same functions here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_distributed_worker import generation, off_policy_store, on_policy_step
from qwen3_fixtures import save_chat_checkpoint, save_hf_qwen3
from tiny_run import REPO, tiny_overrides, tiny_run_files  # noqa: F401 (fixture)

from qforge.engine import generate, load_model
from qforge.engine.train.parallel import Dist

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("distill_distributed_worker.py")
PROMPTS = [[[11, 12, 13, 14], [21, 22]], [[31, 32, 33, 34, 35, 36]]]  # rank 0 decodes 2 rows, rank 1 one


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_dist")
    student = save_hf_qwen3(root / "student", seed=1)  # tied head
    teacher = save_hf_qwen3(root / "teacher", seed=2, hidden_size=96, num_hidden_layers=3, tie_word_embeddings=False)
    free = generate(load_model(student, dtype=torch.float32), PROMPTS[0], max_new_tokens=10)
    # rank 0's first row stops at the token its greedy decoding produces at step 2 (or at an earlier copy of it),
    # its second runs to 6 tokens and rank 1's to 10
    case = {"student": str(student), "teacher": str(teacher), "prompts": PROMPTS, "max_new_tokens": [6, 10],
            "stop_ids": [free[0][2]], "on_policy_new_tokens": 5}
    (root / "case.json").write_text(json.dumps(case))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), str(root / "case.json"), str(root)],
                          capture_output=True, text=True, env=env, timeout=240)  # a deadlock fails here
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(root / f"rank-{r}.pt", weights_only=False) for r in range(2)]
    return case, root, ranks


def test_generation_with_ranks_stopping_at_different_lengths_matches_one_process(runs):
    case, _, ranks = runs
    expected = generation(case, Dist(), [0, 1])
    for rank in range(2):
        got, want = ranks[rank]["generation"][rank], expected[rank]
        assert (got["greedy"], got["sampled"], got["greedy_gathered"]) == \
            (want["greedy"], want["sampled"], want["greedy"])
        # every forward (prefill + 9 decode steps) gathers both blocks; inside `gathered` each is gathered once
        assert got["all_gathers"][0] >= 2 * 10 and got["all_gathers"][1] <= 2, got["all_gathers"]
        assert got["gathered_inside"] and got["sharded_after"]
    greedy = [ranks[r]["generation"][r]["greedy"] for r in range(2)]
    # rank 0's first row hit the stop id, its second ran to its 6 tokens, rank 1 decoded on to 10
    assert len(greedy[0][0]) < 6 and len(greedy[0][1]) == 6 and len(greedy[1][0]) == 10


def test_on_policy_step_with_a_sharded_teacher_matches_the_replicated_teacher(runs):
    case, _, ranks = runs
    expected = on_policy_step(case, Dist(), [0, 1])
    for rank, result in enumerate(ranks):
        step = result["on_policy"]
        assert step["samples"] == [expected["samples"][rank]]  # the same student samples as one process
        assert step["teacher_sharded_after_step"] and not step["teacher_requires_grad"]
        # FSDP2 shards dim 0 of every tensor: each rank holds half the teacher's rows (±1 row per tensor)
        assert step["teacher_bytes"] == expected["teacher_bytes"]
        assert abs(step["teacher_local_bytes"] / step["teacher_bytes"] - 0.5) < 0.01, step["teacher_local_bytes"]
    assert ranks[0]["on_policy"]["teacher_local_bytes"] + ranks[1]["on_policy"]["teacher_local_bytes"] == \
        expected["teacher_bytes"]
    step = ranks[0]["on_policy"]
    # fp32 throughout; only the order of the sums differs: each rank scores its own tokens (other batch shapes,
    # so other matmul blockings) and the all-reduce adds the two halves. Each token's reverse KL,
    # Σ_v p_v·(log p_v − log q_v), is a small difference of two terms of size ≈ log V (entropy and cross-entropy
    # of near-uniform tiny models, V = 512), so its rounding scales with those terms, not with the KL: a
    # reordered fp32 reduction over n terms errs by ≈ u·sqrt(n)·|terms| (u = 2^-24), here n = V + hidden ≈ 576,
    # summed over `weight` tokens. The old limit, 1e-6·|loss_sum|, scaled with the small result and failed at
    # 5.96e-7 (20 ulps of 0.4795) under transformers 5.25 / torch 2.13; this bound is 2.7e-4 for the 15 tokens,
    # and a token lost or counted twice moves loss_sum by ≈ loss_sum / weight ≈ 3e-2.
    assert step["weight"] == expected["weight"]
    vocab, hidden = 512, 64  # save_hf_qwen3's tiny student
    bound = 2 ** -24 * (vocab + hidden) ** 0.5 * expected["weight"] * 2 * np.log(vocab)
    assert abs(step["loss_sum"] - expected["loss_sum"]) <= bound, (step["loss_sum"], expected["loss_sum"], bound)
    assert step["grads"].keys() == expected["grads"].keys()
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(step["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(ranks[1]["on_policy"]["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_off_policy_scoring_split_over_ranks_stores_what_one_process_stores(runs, tmp_path):
    case, root, ranks = runs
    expected = off_policy_store(case, Dist(), tmp_path)
    got = ranks[0]["store"]
    assert np.array_equal(got["offsets"], expected["offsets"]) and np.array_equal(got["ids"], expected["ids"])
    assert np.abs(got["logprobs"] - expected["logprobs"]).max() <= 1e-6
    assert not [p for p in (root / "store").iterdir() if p.name.startswith(".")]  # no staging directory left


def _metrics(out: Path) -> list[dict]:
    keep = ("step", "loss", "grad_norm", "tokens", "eval_reverse_kl")
    return [{k: v for k, v in json.loads(line).items() if k in keep}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_recipe_on_two_ranks_trains_like_one_process(tiny_run_files, tmp_path):
    """The whole recipe under torchrun (sharded student and teacher, lockstep sampling with the student gathered,
    evaluation that samples only each rank's batches, sharded export): 2 ranks × 1 micro-batch a step = 1 process
    × 2 micro-batches. (The worker's on-policy step covers sampling without `distill.gather_for_sampling`.)"""
    rows = Path(tiny_run_files["train"]).read_text(encoding="utf-8").splitlines(True)
    (tmp_path / "train.jsonl").write_text("".join(rows[:8]), encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("".join(rows[40:43]), encoding="utf-8")
    (tmp_path / "empty.yaml").write_text("{}")
    files = {**tiny_run_files, "train": str(tmp_path / "train.jsonl")}
    teacher = save_chat_checkpoint(tmp_path / "teacher", seed=5)

    def args(out, grad_accum):
        return ["--config", str(tmp_path / "empty.yaml"), *tiny_overrides(files, out, **{
            "distill.teacher": str(teacher), "distill.mode": "on_policy", "distill.max_new_tokens": 8,
            "data.max_tokens": 400, "data.eval": f"[{tmp_path / 'eval.jsonl'}]", "evaluate.data": "null",
            "train.max_steps": 2, "train.eval_every": 1, "train.grad_accum": grad_accum,
            "distill.gather_for_sampling": True})]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(REPO / "recipes/distill.py")
    subprocess.run([sys.executable, script, *args(tmp_path / "single", 2)], check=True, capture_output=True, env=env,
                   timeout=300)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, *args(tmp_path / "fsdp", 1)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    single, sharded = _metrics(tmp_path / "single"), _metrics(tmp_path / "fsdp")
    assert [m.keys() for m in sharded] == [m.keys() for m in single] and len(single) == 4  # 2 steps, 2 evaluations
    for got, expected in zip(sharded, single):  # fp32; only the cross-rank reduction order differs
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5), (key, got, expected)
    assert (tmp_path / "fsdp/final/model.safetensors").is_file()
